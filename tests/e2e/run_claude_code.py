"""End to end with the real Claude Code: part of ``make e2e``.

Installs ``@anthropic-ai/claude-code`` (``CLAUDE_CODE_VERSION``, default the
pinned 2.1.332; ``latest`` for the newest) and runs the shell-tool loop of
tests/e2e/harness.py in print mode against kiro2api's ``/v1/messages``: Kiro
calls ``Bash {"command": …}``. The model is the ``sonnet`` alias, as a user
would pass it (2.1.332 sends ``claude-sonnet-5-5``). Claude Code refuses
``--dangerously-skip-permissions`` as root, so only Bash is allowed instead.

Then a deferred-tool loop (PROTOCOL-2026.md 10.17.3), through a ``Recorder``
that keeps what Claude Code sends: Kiro calls ``ToolSearch {"query":
"select:CronList"}``, Claude Code answers with a ``tool_reference`` and now
offers CronList (``defer_loading``), Kiro calls ``CronList {}``, Claude Code
runs it and Kiro answers text. It passes with three requests, each a 200,
CronList declared to Kiro once loaded, its result sent back, tool search on
throughout (no "Tool references removed"), exit 0 and the answer printed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

import harness
from fakes import Stream, tail, text, tool
from harness import Agent, Failed, Run, Stack

DEFERRED = "CronList"  # deferred in print mode; lists jobs, needs no permission
SEARCH_ID = "tooluse_e2e_search_1"
LOADED_ID = "tooluse_e2e_loaded_1"
SEARCH_PROMPT = "List my scheduled cron jobs."
# What the client does when tool search is refused (10.17.3): none of it may happen.
SEARCH_OFF = ("Tool references removed", "ToolSearch is no longer available")
SEARCH_BETA = "advanced-tool-use-2025-11-20"


def shell_tool(model: str, command: str) -> tuple[str, dict[str, Any]]:
    return "Bash", {"command": command, "description": "Print the marker"}


def command(program: Path, run: Run, prompt: str = harness.PROMPT
            ) -> tuple[list[str], dict[str, str]]:
    # --allowedTools takes several values: the prompt goes after "--".
    argv = [str(program), "-p", "--model", run.model, "--allowedTools", "Bash", "--", prompt]
    # Its warm-up probe and the rest of its own traffic stay on, as for a user;
    # only what would leave the machine is off.
    env = {"ANTHROPIC_BASE_URL": run.url, "ANTHROPIC_API_KEY": harness.API_KEY,
           "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1"}
    return argv, env


def tool_names(tools: list[Any]) -> list[str]:
    return [t.get("name", "") for t in tools]


def kiro_tool_names(call: Any) -> list[str]:
    declared = harness.kiro_context(call).get("tools", [])
    return [t.get("toolSpecification", {}).get("name", "") for t in declared]


def tool_results(message: dict[str, Any]) -> dict[str, Any]:
    """The tool_result blocks of a Messages API message, by tool_use_id."""
    content = message.get("content")
    blocks = content if isinstance(content, list) else []
    return {b.get("tool_use_id"): b for b in blocks
            if isinstance(b, dict) and b.get("type") == "tool_result"}


def check_tool_search(stack: Stack, status: int | None, out: str, answer: str) -> None:
    """Raise ``Failed`` with the first check of the deferred-tool loop that does not hold."""
    if status is None:
        raise Failed("Claude Code did not finish in time")
    refused = [f"{e.method} {e.path} -> {e.status}" for e in stack.exchanges if e.status != 200]
    if refused:
        raise Failed(f"kiro2api did not answer every request with 200: {refused}")
    logged = [line for line in stack.log.read_text(errors="replace").splitlines()
              if " route=" in line and " status=200 " not in line]
    if logged:
        raise Failed(f"kiro2api logged answers other than 200: {logged}")
    requests = [e for e in stack.exchanges
                if e.method == "POST" and e.path.split("?")[0] == "/v1/messages"]
    calls = stack.generate_calls()
    if len(requests) != 3 or len(calls) != 3:
        raise Failed(f"{len(requests)} POST /v1/messages and {len(calls)} Kiro calls, not 3 "
                     "(search, loaded tool, answer)")
    for i, request in enumerate(requests, 1):
        dumped = json.dumps(request.body)
        off = [needle for needle in SEARCH_OFF if needle in dumped]
        if off:
            raise Failed(f"request {i} has tool search turned off: it contains {off}")
        if SEARCH_BETA not in request.headers.get("anthropic-beta", ""):
            raise Failed(f"request {i} dropped the {SEARCH_BETA} beta")
    first, second, third = (r.body for r in requests)
    if "ToolSearch" not in tool_names(first["tools"]):
        raise Failed(f"the first request offers no ToolSearch: {tool_names(first['tools'])}")
    if DEFERRED in tool_names(first["tools"]) or DEFERRED not in json.dumps(first["messages"]):
        raise Failed(f"{DEFERRED} is not among the first request's deferred tools")
    result = tool_results(second["messages"][-1]).get(SEARCH_ID)
    reference = {"type": "tool_reference", "tool_name": DEFERRED}
    if result is None or reference not in result.get("content", []):
        raise Failed(f"the second request's last message has no tool_result for "
                     f"{SEARCH_ID} holding {reference}: {json.dumps(second['messages'][-1])}")
    loaded = [t for t in second["tools"] if t.get("name") == DEFERRED]
    if not loaded or loaded[0].get("defer_loading") is not True:
        raise Failed(f"the second request does not offer {DEFERRED} with defer_loading")
    if DEFERRED in kiro_tool_names(calls[0]):
        raise Failed(f"kiro2api offered {DEFERRED} to Kiro before it was loaded")
    if DEFERRED not in kiro_tool_names(calls[1]):
        raise Failed(f"kiro2api did not offer the loaded {DEFERRED} to Kiro: "
                     f"{kiro_tool_names(calls[1])}")
    searched = harness.kiro_context(calls[1]).get("toolResults", [])
    if [r.get("toolUseId") for r in searched] != [SEARCH_ID] or DEFERRED not in json.dumps(
            searched):
        raise Failed(f"the second Kiro call's toolResults do not name {DEFERRED}: "
                     f"{json.dumps(searched)}")
    ran = tool_results(third["messages"][-1]).get(LOADED_ID)
    if ran is None or ran.get("is_error"):
        raise Failed(f"Claude Code did not run {DEFERRED}: the third request's last message "
                     f"is {json.dumps(third['messages'][-1])[:1500]}")
    sent = harness.kiro_context(calls[2]).get("toolResults", [])
    if [r.get("toolUseId") for r in sent] != [LOADED_ID] or sent[0].get("status") != "success":
        raise Failed(f"the third Kiro call does not carry {DEFERRED}'s result: {json.dumps(sent)}")
    if status != 0:
        raise Failed(f"Claude Code exited with status {status}")
    if answer not in out:
        raise Failed("Claude Code's stdout lacks the final answer")


async def tool_search(program: Path, version: str, timeout: float) -> bool:
    """The deferred-tool loop with the ``sonnet`` alias; True if every check held."""
    answer = f"No cron jobs are scheduled (kiro2api-e2e-answer-{secrets.token_hex(6)})."
    label = f"claude-code {version} (tool search, {DEFERRED})"
    root = harness.run_root(f"claude-code-{version}-tool-search")
    print(f"e2e: {label} in {root}", flush=True)
    passed = False
    async with Stack(root, record=True) as stack:
        run = Run(root, stack.url, "sonnet")
        run.home.mkdir()
        run.work.mkdir()
        stack.fake.script.extend([
            Stream(tool(SEARCH_ID, "ToolSearch", '{"query": "sel', f'ect:{DEFERRED}"}}') + tail()),
            Stream(tool(LOADED_ID, DEFERRED, "{}") + tail()),
            Stream(text(*answer.partition(" (")) + tail()),
        ])
        argv, extra = command(program, run, SEARCH_PROMPT)
        status, out, err = await harness.run_agent(argv, env=harness.agent_env(run.home, **extra),
                                                   cwd=run.work, timeout=timeout)
        (root / "agent.stdout").write_text(out)
        (root / "agent.stderr").write_text(err)
        (root / "requests.json").write_text(json.dumps(
            [e.__dict__ for e in stack.exchanges], indent=1, default=repr))
        try:
            check_tool_search(stack, status, out, answer)
            passed = True
        except Failed as failure:
            print(f"e2e FAILED: {label}: {failure}", file=sys.stderr)
            harness.report(stack, status, out, err, root)
    if passed:
        print(f"e2e passed: {label}: ToolSearch loaded {DEFERRED}, Claude Code ran it, "
              "3 requests answered 200 with tool search on", flush=True)
        if not os.environ.get("E2E_KEEP"):
            shutil.rmtree(root)
    return passed


CLAUDE_CODE = Agent(name="claude-code", package="@anthropic-ai/claude-code", pinned="2.1.332",
                    version_env="CLAUDE_CODE_VERSION", binary="claude", models=("sonnet",),
                    shell_tool=shell_tool, command=command, more=(tool_search,))

if __name__ == "__main__":
    harness.main(CLAUDE_CODE)
