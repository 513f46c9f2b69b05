"""End to end with the real Codex CLI: ``make e2e`` (or ``python tests/e2e/run_codex.py``).

Installs ``@openai/codex`` (``CODEX_VERSION``, default the pinned 0.171.0;
``latest`` for the newest release) into a cache directory, then runs one
shell-tool loop per model through a real kiro2api process in front of the
fake Kiro:

1. the fake answers the first generateAssistantResponse with a tool call whose
   command prints a random marker and writes it to a file: ``exec_command``
   for claude-sonnet-4.5 (Codex's tools for an unknown model name), the
   code-mode ``exec`` with JavaScript calling ``tools.exec_command`` for
   gpt-5.6-sol (Responses Lite);
2. Codex runs it and sends the output back; the fake answers with text.

A model passes when Codex exits 0 and prints the final answer, the marker file
exists, the command's output reached Kiro as a toolResult of the second call,
and kiro2api made exactly two calls (no reconnects, no retries). Opt-in,
because it needs npm and the network once; ``pytest`` does not collect it.

Environment: ``CODEX_VERSION``, ``E2E_CACHE`` (default ~/.cache/kiro2api-e2e),
``E2E_MODELS`` (default "claude-sonnet-4.5 gpt-5.6-sol"), ``E2E_TIMEOUT``
(seconds per run, default 180), ``E2E_KEEP=1`` keeps each run's directory
(under E2E_CACHE/runs) even when it passes; a failed run's is always kept.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import harness
from harness import E2EError, Stack

from fakes import Stream, tail, text, tool

PACKAGE = "@openai/codex"
PINNED = "0.171.0"
MODELS = "claude-sonnet-4.5 gpt-5.6-sol"
# Codex's names for them in 0.171.0 (tests/data/codex-0.171.0-*-turn1.json):
# the shell tool Kiro is told about, and its arguments for a shell command.
LITE_MODELS = {"gpt-5.6-sol"}
PROMPT = "Run the marker command, then tell me you are done."
TOOL_USE_ID = "tooluse_e2e_exec_1"
CONFIG = """\
model = "{model}"
model_provider = "kiro2api"

[model_providers.kiro2api]
name = "kiro2api"
base_url = "{url}/v1"
env_key = "KIRO2API_KEY"
wire_api = "responses"
"""


class Failed(Exception):
    """One of the run's checks did not hold."""


def shell_tool(model: str, command: str) -> tuple[str, dict[str, str]]:
    """The tool Kiro calls to run ``command`` under ``model``, and its input."""
    if model in LITE_MODELS:
        # A freeform tool; kiro2api declares it to Kiro with one string, "input".
        source = f"const r = await tools.exec_command({{cmd: {json.dumps(command)}}}); text(r);"
        return "exec", {"input": source}
    return "exec_command", {"cmd": command}


def script(stack: Stack, name: str, arguments: dict[str, str], answer: str) -> None:
    """Turn 1: a call to ``name``, its input in three fragments; turn 2: ``answer``."""
    encoded = json.dumps(arguments)
    third = len(encoded) // 3
    fragments = (encoded[:third], encoded[third:2 * third], encoded[2 * third:])
    stack.fake.script.append(Stream(tool(TOOL_USE_ID, name, *fragments) + tail()))
    stack.fake.script.append(Stream(text(*answer.partition(": ")) + tail()))


def tool_results(call: Any) -> list[Any]:
    current = call.body["conversationState"]["currentMessage"]["userInputMessage"]
    return current.get("userInputMessageContext", {}).get("toolResults", [])


def tool_uses(call: Any) -> list[Any]:
    history = call.body["conversationState"].get("history", [])
    return [use for entry in history
            for use in entry.get("assistantResponseMessage", {}).get("toolUses", [])]


def check(stack: Stack, status: int | None, out: str, work: Path, *, tool_name: str,
          marker: str, answer: str) -> None:
    if status is None:
        raise Failed("codex did not finish in time")
    calls = stack.generate_calls()
    names = [t.get("toolSpecification", {}).get("name") for t in (
        calls[0].body["conversationState"]["currentMessage"]["userInputMessage"]
        .get("userInputMessageContext", {}).get("tools", []))] if calls else []
    if len(calls) != 2:
        raise Failed(f"kiro2api made {len(calls)} generateAssistantResponse calls, not 2")
    if tool_name not in names:
        raise Failed(f"the first call did not declare {tool_name} to Kiro (tools: {names})")
    results = tool_results(calls[1])
    if marker not in json.dumps(results):
        raise Failed(f"the command's output is not in the second call's toolResults: "
                     f"{json.dumps(results)[:1500]}")
    if [r.get("toolUseId") for r in results] != [TOOL_USE_ID]:
        raise Failed(f"toolResults answer {[r.get('toolUseId') for r in results]}, "
                     f"not [{TOOL_USE_ID!r}]")
    if TOOL_USE_ID not in [u.get("toolUseId") for u in tool_uses(calls[1])]:
        raise Failed("the second call's history has no toolUse with the id the result answers")
    written = work / "e2e-marker.txt"
    if not written.exists() or written.read_text().strip() != marker:
        raise Failed(f"the command did not run in {work}: no {written.name} with the marker")
    if status != 0:
        raise Failed(f"codex exited with status {status}")
    if answer not in out:
        raise Failed("codex's stdout lacks the final answer")


def report(stack: Stack, status: int | None, out: str, err: str, kept: Path) -> None:
    """What a failed run leaves on stderr: the calls upstream, codex's output, the log."""
    print(f"\ncodex exit status: {status}", file=sys.stderr)
    for i, call in enumerate(stack.generate_calls(), 1):
        print(f"generate call {i}: {json.dumps(call.body)[:600]}", file=sys.stderr)
    print(f"--- codex stdout (last 3000)\n{out[-3000:]}", file=sys.stderr)
    print(f"--- codex stderr (last 6000)\n{err[-6000:]}", file=sys.stderr)
    log = stack.log.read_text(errors="replace").splitlines()
    info = [line for line in log if " DEBUG " not in line and not line.startswith("DEBUG")]
    print("--- kiro2api log (not DEBUG, last 60 lines)\n" + "\n".join(info[-60:]),
          file=sys.stderr)
    print(f"--- everything is kept in {kept}", file=sys.stderr)


async def run_one(codex: Path, version: str, model: str, timeout: float) -> bool:
    """One shell-tool loop with ``model``; True if every check held."""
    token = secrets.token_hex(6)
    marker = f"kiro2api-e2e-{token}"
    answer = f"All done: the marker kiro2api-e2e-answer-{token} is printed."
    tool_name, arguments = shell_tool(model, f"echo {marker} | tee e2e-marker.txt")

    # Not under /tmp: Codex refuses to put its helper binaries in a temporary
    # CODEX_HOME (a warning, and it runs without them).
    runs = harness.cache_root() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"codex-{version}-{model}-", dir=runs))
    home, codex_home, work = root / "home", root / "codex-home", root / "work"
    for path in (home, codex_home, work):
        path.mkdir()
    print(f"e2e: codex {version}, model {model}, in {root}", flush=True)
    passed = False
    async with Stack(root) as stack:
        script(stack, tool_name, arguments, answer)
        (codex_home / "config.toml").write_text(CONFIG.format(model=model, url=stack.url))
        env = harness.agent_env(home, CODEX_HOME=str(codex_home), KIRO2API_KEY=harness.API_KEY)
        # exec asks no approvals; the bypass lets the command write its file
        # wherever bubblewrap cannot run. The fake Kiro chose the command.
        argv = [str(codex), "exec", "--skip-git-repo-check", "--ephemeral", "--color", "never",
                "--dangerously-bypass-approvals-and-sandbox", "-C", str(work), PROMPT]
        status, out, err = await harness.run_agent(argv, env=env, cwd=work, timeout=timeout)
        (root / "codex.stdout").write_text(out)
        (root / "codex.stderr").write_text(err)
        try:
            check(stack, status, out, work, tool_name=tool_name, marker=marker, answer=answer)
            passed = True
        except Failed as failure:
            print(f"e2e FAILED (codex {version}, {model}): {failure}", file=sys.stderr)
            report(stack, status, out, err, root)
    if passed:
        print(f"e2e passed: codex {version} ({model}) ran {tool_name} through kiro2api "
              f"in 2 Kiro calls and printed the answer", flush=True)
        if not os.environ.get("E2E_KEEP"):
            shutil.rmtree(root)
    return passed


async def main() -> int:
    version = harness.resolve_version(PACKAGE, os.environ.get("CODEX_VERSION") or PINNED)
    codex = harness.npm_install(PACKAGE, version, "codex")
    timeout = float(os.environ.get("E2E_TIMEOUT") or 180)
    models = (os.environ.get("E2E_MODELS") or MODELS).split()
    results = [await run_one(codex, version, model, timeout) for model in models]
    return 0 if all(results) else 1


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except E2EError as error:
        sys.exit(f"e2e could not run: {error}")
