"""End to end with the real Qwen Code: part of ``make e2e``.

Installs ``@qwen-code/qwen-code`` (``QWEN_CODE_VERSION``, default the pinned
0.24.4; ``latest`` for the newest) and runs the shell-tool loop of
tests/e2e/harness.py headless against kiro2api's ``/v1/chat/completions``:
Kiro calls ``run_shell_command {"command": …}``. Its package asks for Node 22;
0.24.4 also runs on Node 20.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import harness
from harness import Agent, Run


def shell_tool(model: str, command: str) -> tuple[str, dict[str, Any]]:
    return "run_shell_command", {"command": command}


def command(program: Path, run: Run) -> tuple[list[str], dict[str, str]]:
    argv = [str(program), "--approval-mode", "yolo", harness.PROMPT]
    env = {"OPENAI_BASE_URL": run.url + "/v1", "OPENAI_API_KEY": harness.API_KEY,
           "OPENAI_MODEL": run.model, "QWEN_USAGE_STATISTICS_ENABLED": "0",
           "QWEN_TELEMETRY_ENABLED": "0"}
    return argv, env


QWEN_CODE = Agent(name="qwen-code", package="@qwen-code/qwen-code", pinned="0.24.4",
                  version_env="QWEN_CODE_VERSION", binary="qwen",
                  models=("claude-sonnet-4.5",), shell_tool=shell_tool, command=command)

if __name__ == "__main__":
    harness.main(QWEN_CODE)
