"""End to end with the real Codex CLI: ``make e2e`` (or ``python tests/e2e/run_codex.py``).

Installs ``@openai/codex`` (``CODEX_VERSION``, default the pinned 0.171.0;
``latest`` for the newest release) and runs the shell-tool loop of
tests/e2e/harness.py for both of Codex's tool shapes (tests/data/codex-0.171.0-*):

- ``claude-sonnet-4.5``, a name Codex does not know: top-level function tools,
  Kiro calls ``exec_command {"cmd": …}``;
- ``gpt-5.6-sol``, Responses Lite: Kiro calls the code-mode ``exec`` (a
  freeform tool) with JavaScript that calls ``tools.exec_command``.

Codex talks to kiro2api's ``POST /v1/responses`` through a custom provider
in a CODEX_HOME of its own. ``E2E_MODELS`` picks other models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import harness
from harness import Agent, Run

LITE_MODELS = {"gpt-5.6-sol"}
CONFIG = """\
model = "{model}"
model_provider = "kiro2api"

[model_providers.kiro2api]
name = "kiro2api"
base_url = "{url}/v1"
env_key = "KIRO2API_KEY"
wire_api = "responses"
"""


def shell_tool(model: str, command: str) -> tuple[str, dict[str, Any]]:
    if model in LITE_MODELS:
        # A freeform tool; kiro2api declares it to Kiro with one string, "input".
        source = f"const r = await tools.exec_command({{cmd: {json.dumps(command)}}}); text(r);"
        return "exec", {"input": source}
    return "exec_command", {"cmd": command}


def command(program: Path, run: Run) -> tuple[list[str], dict[str, str]]:
    codex_home = run.root / "codex-home"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(CONFIG.format(model=run.model, url=run.url))
    # exec asks for no approvals; the bypass lets the command write its file
    # where bubblewrap cannot run. The fake Kiro chose the command.
    argv = [str(program), "exec", "--skip-git-repo-check", "--ephemeral", "--color", "never",
            "--dangerously-bypass-approvals-and-sandbox", "-C", str(run.work), harness.PROMPT]
    return argv, {"CODEX_HOME": str(codex_home), "KIRO2API_KEY": harness.API_KEY}


CODEX = Agent(name="codex", package="@openai/codex", pinned="0.171.0",
              version_env="CODEX_VERSION", binary="codex",
              models=("claude-sonnet-4.5", "gpt-5.6-sol"), shell_tool=shell_tool,
              command=command)

if __name__ == "__main__":
    harness.main(CODEX)
