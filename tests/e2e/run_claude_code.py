"""End to end with the real Claude Code: part of ``make e2e``.

Installs ``@anthropic-ai/claude-code`` (``CLAUDE_CODE_VERSION``, default the
pinned 2.1.332; ``latest`` for the newest) and runs the shell-tool loop of
tests/e2e/harness.py in print mode against kiro2api's ``/v1/messages``: Kiro
calls ``Bash {"command": …}``. The model is the ``sonnet`` alias, as a user
would pass it (2.1.332 sends ``claude-sonnet-5-5``). Claude Code refuses
``--dangerously-skip-permissions`` as root, so only Bash is allowed instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import harness
from harness import Agent, Run


def shell_tool(model: str, command: str) -> tuple[str, dict[str, Any]]:
    return "Bash", {"command": command, "description": "Print the marker"}


def command(program: Path, run: Run) -> tuple[list[str], dict[str, str]]:
    # --allowedTools takes several values: the prompt goes after "--".
    argv = [str(program), "-p", "--model", run.model, "--allowedTools", "Bash", "--",
            harness.PROMPT]
    # Its warm-up probe and the rest of its own traffic stay on, as for a user;
    # only what would leave the machine is off.
    env = {"ANTHROPIC_BASE_URL": run.url, "ANTHROPIC_API_KEY": harness.API_KEY,
           "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1"}
    return argv, env


CLAUDE_CODE = Agent(name="claude-code", package="@anthropic-ai/claude-code", pinned="2.1.332",
                    version_env="CLAUDE_CODE_VERSION", binary="claude", models=("sonnet",),
                    shell_tool=shell_tool, command=command)

if __name__ == "__main__":
    harness.main(CLAUDE_CODE)
