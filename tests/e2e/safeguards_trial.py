"""What interactive Claude Code does with each answer to its ``safeguards`` field.

Opt-in: not part of ``make e2e``, not collected by pytest (PROTOCOL-2026.md
10.17.4). For each variant the fake Kiro (tests/fakes.py) answers the prompt
with ``Bash {"command": "rm -rf ../outside/build-e2e-dir"}`` (a directory beside
the cwd: ``rm`` inside the cwd runs in auto mode without any check, see
``--inside``), a turn that carries only tool results with text, and anything
else (session titles) with "OK". A real kiro2api runs in front of it
(harness.Stack, default ``--safeguards off``), and between Claude Code and
kiro2api a small proxy replaces the ``safeguard_results`` of each streamed
``message_delta`` with the variant's, or removes them.

Claude Code (``CLAUDE_CODE_VERSION``, default 2.1.332) runs interactively, in
auto mode (the default), in a tmux session on a socket of its own
(``tmux -L kiro2api-safeguards``, killed at the end), with a fresh HOME whose
onboarding is done and whose cwd is trusted. The prompt is typed with
``tmux send-keys`` (``--rounds`` times while the directory is there) and every
new screen is captured. Approval prompts are answered No (``--approve``: Yes);
the "can't check" dialog with Enter, "stay in auto mode" (``--dialog-key``).

    .venv/bin/python tests/e2e/safeguards_trial.py [--out DIR] [--approve] [VARIANT ...]

(DIR defaults to E2E_CACHE/safeguards-trial, ~/.cache/kiro2api-e2e/safeguards-trial.)

Variants: none (field removed), unsupported, disabled (``unavailable``
``disabled``), not_judged (kiro2api's own answer, no rewrite), not_flagged,
flagged, error (these three per call), whole_error (the status ``unavailable``
``error``). Each leaves DIR/<variant>.txt (the screens in order, the requests
and the ``safeguard_results`` before and after the rewrite, whether the
directory survived) and DIR/<variant>.kiro2api.log; DIR/RESULTS.table.md has one
row per variant. The run directories under E2E_CACHE/runs are removed unless
E2E_KEEP=1. Needs tmux; npm only to install Claude Code once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from aiohttp import web  # noqa: E402

import harness  # noqa: E402
from fakes import FakeUpstream, Stream, tail, text, tool  # noqa: E402

PROMPT = "Delete the build-e2e-dir directory here, then tell me you are done."
DOOMED = "build-e2e-dir"
COMMAND = "rm -rf {path}"  # {path}: the directory, relative to the cwd
ANSWER = "Finished: the build-e2e-dir step is over."
SOCKET = "kiro2api-safeguards"  # tmux -L: a server of our own, killed at the end

# variant -> ("status", STATUS) for the whole answer, ("call", CALL) for each
# tool_use, ("remove", None) or ("keep", None).
VARIANTS: dict[str, tuple[str, Any]] = {
    "none": ("remove", None),
    "unsupported": ("status", {"type": "unsupported"}),
    "disabled": ("status", {"type": "unavailable", "reason": "disabled"}),
    "not_judged": ("keep", None),
    "not_flagged": ("call", {"type": "evaluated", "outcome": "not_flagged"}),
    "flagged": ("call", {"type": "evaluated", "outcome": "flagged",
                         "explanation": "deletes a directory"}),
    "error": ("call", {"type": "unavailable", "reason": "error"}),
    "whole_error": ("status", {"type": "unavailable", "reason": "error"}),
}
ORDER = ("none", "unsupported", "disabled", "not_judged", "not_flagged", "flagged", "error",
         "whole_error")


# The fake Kiro: answers by what is asked, not in a fixed order #############


class TrialUpstream(FakeUpstream):
    """The main thread's turn with the prompt gets the Bash call (a new id each
    time), a turn carrying tool results gets the text answer, anything else
    (titles, suggestions, probes) a short text."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command
        self.models_rpc = True
        self.turns: list[str] = []  # what each generate call was answered: tool, answer, other
        self.calls_made = 0
        self.contents: list[str] = []  # each call's currentMessage content, cut short

    async def _generate(self, request: web.Request, *, record: bool = True
                        ) -> web.StreamResponse:
        body = await self._record(request)
        current = body["conversationState"]["currentMessage"]["userInputMessage"]
        context = current.get("userInputMessageContext", {})
        names = [t.get("toolSpecification", {}).get("name") for t in context.get("tools", [])]
        # A prompt (also one that comes with the result of a call the user refused)
        # gets the call; a turn with only tool results the answer.
        if "Bash" in names and PROMPT in current.get("content", ""):
            self.calls_made += 1
            self.turns.append("tool")
            arguments = json.dumps({"command": self.command, "description": "Delete the directory"})
            self.script.append(Stream(tool(f"tooluse_sg_{self.calls_made}", "Bash",
                                           arguments[:20], arguments[20:]) + tail()))
        elif context.get("toolResults"):
            self.turns.append("answer")
            self.script.append(Stream(text(*ANSWER.partition(": ")) + tail()))
        else:
            self.turns.append("other")
            self.script.append(Stream(text("OK") + tail()))
        self.contents.append(current.get("content", "")[:300])
        return await super()._generate(request, record=False)


# The rewriting proxy #######################################################


@dataclass
class Seen:
    """One /v1/messages request through the proxy and what its answer carried."""

    path: str
    safeguards: bool
    model: str
    status: int = 0
    original: Any = None  # safeguard_results as kiro2api sent them
    sent: Any = None  # as Claude Code got them ("removed" when left out)
    tool_uses: list[str] = field(default_factory=list)
    tool_results: list[Any] = field(default_factory=list)  # what the request answered
    text: str = ""  # the last message's text, cut short
    max_tokens: Any = None


class Rewriter(harness.Recorder):
    """harness.Recorder's pass-through, rewriting each SSE ``message_delta``."""

    def __init__(self, target: str, variant: str) -> None:
        super().__init__(target)
        self.how, self.value = VARIANTS[variant]
        self.seen: list[Seen] = []

    def rewrite(self, results: Any) -> Any:
        if self.how == "keep":
            return results
        if self.how == "remove":
            return None
        if self.how == "status":
            return [{"type": "dangerous_tool_use", "status": self.value}]
        ids = list(results[0]["status"]["tool_uses"])
        return [{"type": "dangerous_tool_use", "status": {
            "type": "available", "tool_uses": {i: self.value for i in ids}}}]

    def event(self, raw: bytes, seen: Seen) -> bytes:
        lines = raw.split(b"\n")
        data = [line[5:].strip() for line in lines if line.startswith(b"data:")]
        if not data:
            return raw
        try:
            payload = json.loads(b"".join(data))
        except ValueError:
            return raw
        if payload.get("type") == "content_block_start" and \
                payload.get("content_block", {}).get("type") == "tool_use":
            seen.tool_uses.append(payload["content_block"].get("id"))
        if payload.get("type") != "message_delta" or \
                "safeguard_results" not in payload.get("delta", {}):
            return raw
        seen.original = payload["delta"]["safeguard_results"]
        new = self.rewrite(seen.original)
        if new is None:
            del payload["delta"]["safeguard_results"]
            seen.sent = "removed"
        else:
            payload["delta"]["safeguard_results"] = new
            seen.sent = new
        kept = [line for line in lines if not line.startswith(b"data:")]
        return b"\n".join([*[k for k in kept if k], b"data: " + json.dumps(payload).encode()])

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if request.path.split("?")[0] != "/v1/messages":
            return await super()._forward(request)
        assert self._session is not None
        raw = await request.read()
        body = json.loads(raw)
        last = body["messages"][-1] if body.get("messages") else {}
        content = last.get("content") if isinstance(last.get("content"), list) else []
        words = last.get("content") if isinstance(last.get("content"), str) else " ".join(
            b.get("text", "") for b in content if b.get("type") == "text")
        seen = Seen(request.path_qs, "safeguards" in body, body.get("model", ""),
                    tool_results=[b for b in content if b.get("type") == "tool_result"],
                    text=words[-160:], max_tokens=body.get("max_tokens"))
        self.seen.append(seen)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in harness.NOT_FORWARDED}
        async with self._session.request(request.method, self.target + request.path_qs,
                                         headers=headers, data=raw) as upstream:
            seen.status = upstream.status
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items()
                if k.lower() not in harness.NOT_FORWARDED})
            await response.prepare(request)
            if "text/event-stream" not in upstream.headers.get("Content-Type", ""):
                await response.write(await upstream.read())
                await response.write_eof()
                return response
            buffer = b""
            async for chunk in upstream.content.iter_any():
                buffer += chunk.replace(b"\r\n", b"\n")
                while b"\n\n" in buffer:
                    raw_event, buffer = buffer.split(b"\n\n", 1)
                    await response.write(self.event(raw_event, seen) + b"\n\n")
            if buffer:
                await response.write(buffer)
            await response.write_eof()
            return response


# tmux ######################################################################


def tmux(*args: str) -> str:
    done = subprocess.run(["tmux", "-L", SOCKET, *args], capture_output=True, text=True)
    return done.stdout


def screen(session: str) -> str:
    return "\n".join(line.rstrip() for line in tmux(
        "capture-pane", "-p", "-t", session).splitlines()).strip("\n")


def write_config(home: Path, work: Path, version: str) -> None:
    """Onboarding done, the working directory trusted, nothing else."""
    config = {"hasCompletedOnboarding": True, "lastOnboardingVersion": version,
              "theme": "dark", "numStartups": 1, "autoUpdates": False,
              "bypassPermissionsModeAccepted": False,
              "projects": {str(work): {"hasTrustDialogAccepted": True,
                                       "hasCompletedProjectOnboarding": True,
                                       "allowedTools": []}}}
    for place in (home / ".claude.json", home / ".claude" / ".claude.json"):
        place.parent.mkdir(parents=True, exist_ok=True)
        place.write_text(json.dumps(config, indent=1))


# The screens that matter, as regular expressions over the captured pane.
READY = re.compile(r"\? for shortcuts|auto mode on|^\s*❯\s*$", re.M)
APPROVAL = re.compile(r"Do you want to proceed\?")
DIALOG = re.compile(r"Auto mode can't check actions in this session")
BUSY = re.compile(r"esc to interrupt|…\s*\(\d+s", re.I)
GATEWAY = re.compile(r"go(?:es)? through \S+|gateway|isn't getting through|doesn't pass it",
                     re.I)


@dataclass
class Outcome:
    variant: str
    ran: bool = False
    asked: int = 0  # approval prompts seen
    dialogs: int = 0  # "can't check" dialogs answered
    notice: bool = False  # "Auto mode can't check ..." anywhere on a screen
    blames_gateway: bool = False
    finished: bool = False
    ran_after: list[str] = field(default_factory=list)  # per round: did the directory go
    key_lines: list[str] = field(default_factory=list)
    screens: list[tuple[float, str, str]] = field(default_factory=list)  # (t, why, text)


KEY = re.compile(r"auto mode (?!on \(shift)|approval|proceed|blocked|couldn't|can't|"
                 r"did not run|no result|interrupted|denied|rejected|flagged|go through|"
                 r"Finished|error|gateway|Enter to|Esc to|^\s*❯? *(No|Yes)\b|Ran \d", re.I)


def key_lines(text_: str) -> list[str]:
    lines = [line.strip() for line in text_.splitlines()]
    return [line for line in lines if KEY.search(line) and line[:1] not in ("▎", "▝", "▐")]


OPTION = re.compile(r"^\s*(❯)?\s*(?:\d\.\s*)?((?:Yes|No)\b.*)$")


def choose(session: str, shown: str, wanted: str) -> str:
    """Move the ❯ of the approval prompt to the option ``wanted`` ("Yes", "No"), Enter."""
    prompt = shown.rsplit("Do you want to proceed?", 1)[-1]
    found = [m for m in map(OPTION.match, prompt.splitlines()) if m]
    options = [m.group(2).strip() for m in found]
    at = next((i for i, m in enumerate(found) if m.group(1)), None)
    target = next((i for i, o in enumerate(options) if o == wanted), None)
    if target is None or at is None:
        tmux("send-keys", "-t", session, "Escape")
        return f"Escape (no option {wanted!r} under the cursor's list {options})"
    key = "Down" if target > at else "Up"
    for _ in range(abs(target - at)):
        tmux("send-keys", "-t", session, key)
    tmux("send-keys", "-t", session, "Enter")
    return f"{wanted!r} ({abs(target - at)} x {key}, Enter) of {options}"


class Driver:
    """Types prompts into one tmux session and answers what comes up, noting every screen."""

    def __init__(self, session: str, outcome: Outcome, fake: TrialUpstream, *,
                 approve: bool, dialog_key: str) -> None:
        self.session, self.outcome, self.fake = session, outcome, fake
        self.approve, self.dialog_key = approve, dialog_key
        self.start = self.changed = time.monotonic()
        self.last = ""
        self.handled = ""  # the screen last answered: the same one again is not new

    def note(self, why: str, text_: str = "") -> None:
        self.outcome.screens.append((time.monotonic() - self.start, why, text_))

    def look(self) -> str:
        now = screen(self.session)
        if now != self.last:
            self.note("screen", now)
            self.last, self.changed = now, time.monotonic()
        return now

    async def ready(self, limit: float = 40) -> bool:
        deadline = time.monotonic() + limit
        while not READY.search(self.look()):
            if time.monotonic() > deadline:
                self.note(f"NOT READY: no input box within {limit:g} s", self.last)
                return False
            await asyncio.sleep(0.4)
        await asyncio.sleep(1.5)
        return True

    async def answer(self, shown: str) -> bool:
        """Answer an approval prompt or a "can't check" dialog on the screen, if new."""
        if BUSY.search(shown) or shown == self.handled:
            return False
        if APPROVAL.search(shown):
            self.outcome.asked += 1
            what = "Yes" if self.approve else "No"
        elif DIALOG.search(shown) and re.search(r"Enter to|Esc to", shown):
            self.outcome.dialogs += 1
            what = ""
        else:
            return False
        self.outcome.key_lines += key_lines(shown)
        self.note("APPROVAL PROMPT" if what else "DIALOG")
        await asyncio.sleep(0.5)
        if what:
            self.note("answered " + choose(self.session, shown, what))
        else:
            tmux("send-keys", "-t", self.session, self.dialog_key)
            self.note(f"answered the dialog with {self.dialog_key}")
        self.handled = shown
        await asyncio.sleep(1.5)
        return True

    async def round(self, number: int, timeout: float) -> None:
        """One prompt, until Kiro was asked and the screen has not changed for 8 s."""
        asked = len(self.fake.turns)
        tmux("send-keys", "-t", self.session, "-l", PROMPT)
        await asyncio.sleep(0.5)
        tmux("send-keys", "-t", self.session, "Enter")
        self.note(f"round {number}: sent the prompt")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            shown = self.look()
            if await self.answer(shown):
                continue
            if ANSWER.split(":")[0] in shown and number == 1:
                self.outcome.finished = True
            if len(self.fake.turns) > asked and not BUSY.search(shown) \
                    and time.monotonic() - self.changed > 8:
                return
            await asyncio.sleep(0.4)
        self.note(f"round {number}: TIMEOUT after {timeout:g} s")


async def drive(driver: Driver, doomed: Path, *, timeout: float, rounds: int) -> None:
    outcome = driver.outcome
    if not await driver.ready():
        return
    for number in range(1, rounds + 1):
        asked = len(driver.fake.turns)
        await driver.round(number, timeout)
        outcome.ran_after.append("still there" if doomed.exists() else "gone")
        driver.note(f"round {number} over: Kiro answered {driver.fake.turns[asked:]}; "
                    f"the directory is {outcome.ran_after[-1]}", driver.look())
        outcome.key_lines += [line for line in key_lines(driver.last)
                              if line not in outcome.key_lines]
        if not doomed.exists():
            break
    everything = "\n".join(s for _, _, s in outcome.screens)
    outcome.notice = bool(DIALOG.search(everything))
    outcome.blames_gateway = bool(GATEWAY.search(everything))
    outcome.ran = not doomed.exists()


async def trial(variant: str, program: Path, version: str, out: Path, *, timeout: float,
                approve: bool,
                command: str, outside: bool, tag: str = "", rounds: int = 2,
                dialog_key: str = "Enter") -> Outcome:
    root = harness.run_root(f"safeguards-{variant}")
    home, work = root / "home", root / "work"
    work.mkdir()
    doomed = (root / "outside" if outside else work) / DOOMED
    doomed.mkdir(parents=True)
    (doomed / "keep.txt").write_text("still here\n")
    home.mkdir()
    relative = f"../outside/{DOOMED}" if outside else f"./{DOOMED}"
    write_config(home, work, version)
    outcome = Outcome(variant)
    session = f"sg-{variant}"
    print(f"safeguards trial: {variant} in {root}", flush=True)
    stack = harness.Stack(root)
    stack.fake = fake = TrialUpstream(command.format(path=relative))
    async with stack:
        proxy = Rewriter(stack.url, variant)
        await proxy.start()
        try:
            env = {"HOME": str(home), "CLAUDE_CONFIG_DIR": str(home / ".claude"),
                   "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm-256color",
                   "LANG": "C.UTF-8", "NO_PROXY": "127.0.0.1,localhost",
                   "ANTHROPIC_BASE_URL": proxy.url, "ANTHROPIC_AUTH_TOKEN": harness.API_KEY,
                   "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1",
                   "DISABLE_ERROR_REPORTING": "1"}
            launcher = root / "claude.sh"
            launcher.write_text("#!/bin/sh\nexec env -i " + " ".join(
                f"{k}={shlex.quote(v)}" for k, v in env.items())
                + f" {shlex.quote(str(program))} --model sonnet\n")
            launcher.chmod(0o755)
            tmux("kill-session", "-t", session)
            tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "50", "-c", str(work),
                 str(launcher))
            try:
                driver = Driver(session, outcome, fake, approve=approve, dialog_key=dialog_key)
                await drive(driver, doomed, timeout=timeout, rounds=rounds)
            finally:
                tmux("kill-session", "-t", session)
        finally:
            await proxy.stop()
        write_capture(out / f"{variant}{tag}.txt", outcome, proxy, fake, root)
    if not os.environ.get("E2E_KEEP"):
        shutil.rmtree(root)
    return outcome


def write_capture(path: Path, outcome: Outcome, proxy: Rewriter, fake: TrialUpstream,
                  root: Path) -> None:
    lines = [f"variant: {outcome.variant} {VARIANTS[outcome.variant]}",
             f"command: {fake.command}",
             f"run directory: {root}",
             f"command ran (directory gone): {outcome.ran}",
             f"after each round: {outcome.ran_after}",
             f"approval prompts: {outcome.asked}",
             f"'can't check' dialogs answered: {outcome.dialogs}",
             f"'Auto mode can't check actions in this session' on a screen: {outcome.notice}",
             f"wording about the gateway/host: {outcome.blames_gateway}",
             f"final answer shown: {outcome.finished}",
             f"fake Kiro answered, in order: {fake.turns}",
             *[f"  Kiro call {i}: {turn}, content {content!r}"
               for i, (turn, content) in enumerate(zip(fake.turns, fake.contents), 1)], "",
             "requests to /v1/messages through the rewriting proxy:"]
    for i, seen in enumerate(proxy.seen, 1):
        lines.append(f"  {i}. {seen.model} max_tokens={seen.max_tokens} "
                     f"safeguards={seen.safeguards} -> {seen.status}; last text {seen.text!r}; "
                     f"answer's tool_use ids {seen.tool_uses}; tool_results "
                     f"{json.dumps(seen.tool_results)[:600]}")
        if seen.original is not None:
            lines.append(f"     kiro2api sent: {json.dumps(seen.original)}")
            lines.append(f"     client got:    {json.dumps(seen.sent)}")
    lines += ["", "key lines:", *[f"  {k}" for k in outcome.key_lines], ""]
    for t, why, text_ in outcome.screens:
        lines.append(f"===== t={t:6.1f}s {why}")
        if text_:
            lines.append(re.sub(r"\n{3,}", "\n\n", text_))
    path.write_text("\n".join(lines) + "\n")
    if (root / "kiro2api.log").exists():
        shutil.copy(root / "kiro2api.log", path.with_suffix(".kiro2api.log"))


def results_table(outcomes: list[Outcome]) -> str:
    rows = ["| variant | ran? (per round) | asked? | dialog | can't-check notice | "
            "gateway named | screen (key lines) |", "|---|---|---|---|---|---|---|"]
    for o in outcomes:
        said = "; ".join(dict.fromkeys(o.key_lines))[:600].replace("|", "\\|")
        rows.append(f"| {o.variant} | {'yes' if o.ran else 'no'} ({', '.join(o.ran_after)}) | "
                    f"{o.asked or 'no'} | {o.dialogs or 'no'} | {'yes' if o.notice else 'no'} | "
                    f"{'yes' if o.blames_gateway else 'no'} | {said} |")
    return "\n".join(rows) + "\n"


async def main_async(args: argparse.Namespace) -> int:
    if shutil.which("tmux") is None:
        raise harness.E2EError("tmux is not on PATH")
    version = harness.resolve_version("@anthropic-ai/claude-code",
                                      os.environ.get("CLAUDE_CODE_VERSION") or "2.1.332")
    program = harness.npm_install("@anthropic-ai/claude-code", version, "claude")
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    try:
        for variant in args.variants or ORDER:
            outcomes.append(await trial(variant, program, version, args.out,
                                        timeout=args.timeout,
                                        approve=args.approve, command=args.command,
                                        outside=not args.inside, tag=args.tag,
                                        rounds=args.rounds, dialog_key=args.dialog_key))
            print(results_table(outcomes[-1:]).splitlines()[-1], flush=True)
    finally:
        tmux("kill-server")
    (args.out / "RESULTS.table.md").write_text(
        f"Claude Code {version}, interactive in tmux, approval prompts answered "
        f"{'Yes' if args.approve else 'No'}\n\n" + results_table(outcomes))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", metavar="VARIANT")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the captures go (default E2E_CACHE/safeguards-trial)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--approve", action="store_true")
    parser.add_argument("--command", default=COMMAND,
                        help="the Bash command Kiro calls; {path} is the directory "
                             "(default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="prompts sent, one after the other, while the directory is there")
    parser.add_argument("--dialog-key", default="Enter",
                        help="tmux key that answers the 'can't check' dialog (Enter: stay in "
                             "auto mode; Escape: cancel; BTab: accept edits mode)")
    parser.add_argument("--tag", default="", help="appended to the capture files' names")
    parser.add_argument("--inside", action="store_true",
                        help="the directory is in the cwd (rm there needs no check), not beside it")
    args = parser.parse_args()
    args.out = args.out or harness.cache_root() / "safeguards-trial"
    for v in args.variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v}: one of {', '.join(VARIANTS)}")
    try:
        sys.exit(asyncio.run(main_async(args)))
    except harness.E2EError as error:
        sys.exit(f"safeguards trial could not run: {error}")


if __name__ == "__main__":
    main()
