"""What a failure costs with the real Codex CLI: ``make e2e-codex-failures`` (part of ``make e2e``).

For each way Kiro can fail a streamed request, the fake Kiro answers every
generateAssistantResponse with that failure and ``codex exec`` runs once
(model ``claude-sonnet-4.5``). kiro2api runs with ``--retries 0``, so each
Kiro call is one ``POST /v1/responses`` of Codex's; the run records how many
Codex made, its exit status and the last error it showed, and checks the
cost we mean kiro2api's answers to have (PROTOCOL-2026.md 10.15.5):

- a refusal no retry can fix (suspended, too long, out of credits,
  malformed, unknown model) and an answer Kiro cut short: one request;
- a transient failure (HTTP 500, a stream that breaks): Codex reconnects,
  at most six requests (its ``stream_max_retries`` of 5), never the thirty
  it spends on an HTTP 5xx.

The transient cases run a second time with kiro2api's default retries, to
show what a user pays in Kiro calls: up to 1 + 3 per Codex request.

Every run of Codex takes its default retry settings; its backoff keeps the
six-request cases at about 7 s each, the whole table under a minute.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import harness
import kiro2api
import run_codex
from fakes import BROKEN_STREAMS, Status, Stream, exception, text
from harness import E2EError, Run, Stack

MODEL = "claude-sonnet-4.5"
# Codex makes at most 30 requests for one turn (HTTP 5xx): one reply each,
# and one more so that an overrun still ends in a failure, never a greeting.
REPLIES = 31
TIMEOUT_SECONDS = 120.0
DEFAULT_RETRIES = kiro2api.Config.__dataclass_fields__["retries"].default
ERROR_LINE = re.compile(r"^ERROR: (.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Case:
    label: str  # the upstream answer, for the table
    reply: Callable[[], Stream | Status]
    most: int  # the most Codex requests this answer may cost
    shown: str  # a piece of the error Codex must show
    kiro_retries: bool = False  # also run with kiro2api's default --retries
    kept: str = ""  # text of the answer Codex must still show


CASES = (
    Case("403 TEMPORARILY_SUSPENDED",
         lambda: Status(403, {"message": "Account suspended", "reason": "TEMPORARILY_SUSPENDED"}),
         1, "TEMPORARILY_SUSPENDED"),
    Case("400 CONTENT_LENGTH_EXCEEDS_THRESHOLD",
         lambda: Status(400, {"message": "Input is too long.",
                              "reason": "CONTENT_LENGTH_EXCEEDS_THRESHOLD"}),
         1, "ran out of room"),
    Case("402 MONTHLY_REQUEST_COUNT",
         lambda: Status(402, {"message": "quota", "reason": "MONTHLY_REQUEST_COUNT"}),
         1, "Quota exceeded"),
    Case("400 Improperly formed request.",
         lambda: Status(400, {"message": "Improperly formed request."}),
         1, "Improperly formed"),
    Case("400 INVALID_MODEL_ID",
         lambda: Status(400, {"message": "Invalid model.", "reason": "INVALID_MODEL_ID"}),
         1, "model"),
    Case("500 boom", lambda: Status(500, {"message": "boom"}), 6, "boom", kiro_retries=True),
    Case("broken stream (bad CRC)", BROKEN_STREAMS["bad-crc"], 6, "corrupt",
         kiro_retries=True),
    Case("ContentLengthExceededException cut",
         lambda: Stream(text("Part") + [exception("ContentLengthExceededException",
                                                  "output too long")]),
         1, "Incomplete response returned", kept="Part"),
)


@dataclass
class Outcome:
    case: Case
    kiro_retries: int  # kiro2api's --retries
    requests: int  # POST /v1/responses, from kiro2api's log
    kiro_calls: int  # generateAssistantResponse calls the fake answered
    status: int | None
    shown: str
    seconds: float
    problems: list[str]


def last_error(err: str) -> str:
    found = ERROR_LINE.findall(err)
    return found[-1].strip() if found else ""


def responses_requests(log: Path) -> int:
    return sum("method=POST route=/v1/responses " in line
               for line in log.read_text(errors="replace").splitlines())


def judge(case: Case, retries: int, requests: int, kiro_calls: int, status: int | None,
          shown: str, output: str) -> list[str]:
    problems = []
    if status is None:
        problems.append("Codex did not finish in time")
    elif status == 0:
        problems.append("Codex exited 0 on a failure")
    if not 1 <= requests <= case.most:
        expected = "1" if case.most == 1 else f"at most {case.most}"
        problems.append(f"{requests} Codex requests, not {expected}")
    if not requests <= kiro_calls <= requests * (1 + retries):
        problems.append(f"{kiro_calls} Kiro calls for {requests} requests "
                        f"with --retries {retries}")
    if case.shown not in shown:
        problems.append(f"Codex showed {shown!r}, without {case.shown!r}")
    if case.kept and case.kept not in output:
        problems.append(f"Codex did not show the partial answer {case.kept!r}")
    return problems


async def run_case(program: Path, case: Case, retries: int) -> Outcome:
    slug = re.sub(r"[^a-z0-9]+", "-", case.label.lower()).strip("-")
    root = harness.run_root(f"codex-failure-{slug}-r{retries}")
    options = ("--retries", str(retries)) if retries != DEFAULT_RETRIES else ()
    async with Stack(root, options) as stack:
        run = Run(root, stack.url, MODEL)
        run.home.mkdir()
        run.work.mkdir()
        stack.fake.script.extend(case.reply() for _ in range(REPLIES))
        argv, extra = run_codex.command(program, run)
        started = time.monotonic()
        status, out, err = await harness.run_agent(
            argv, env=harness.agent_env(run.home, **extra), cwd=run.work,
            timeout=float(os.environ.get("E2E_TIMEOUT") or TIMEOUT_SECONDS))
        seconds = time.monotonic() - started
        (root / "agent.stdout").write_text(out)
        (root / "agent.stderr").write_text(err)
        kiro_calls = len(stack.generate_calls())
    requests = responses_requests(stack.log)
    shown = last_error(err)
    outcome = Outcome(case, retries, requests, kiro_calls, status, shown, seconds,
                      judge(case, retries, requests, kiro_calls, status, shown, out + err))
    if outcome.problems:
        print(f"e2e FAILED: Codex against {case.label} (--retries {retries}): "
              + "; ".join(outcome.problems) + f"\n--- Codex stderr (last 3000)\n{err[-3000:]}"
              + f"\n--- everything is kept in {root}", file=sys.stderr)
    elif not os.environ.get("E2E_KEEP"):
        shutil.rmtree(root)
    return outcome


def table(outcomes: list[Outcome]) -> str:
    rows = [("upstream answer", "--retries", "Codex requests", "Kiro calls", "exit", "s",
             "Codex showed")]
    rows += [(o.case.label, str(o.kiro_retries), str(o.requests), str(o.kiro_calls),
              str(o.status), f"{o.seconds:.1f}", o.shown[:160]) for o in outcomes]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths))
                     + "  " + row[-1] for row in rows)


async def run_all() -> bool:
    version = harness.resolve_version("@openai/codex", os.environ.get("CODEX_VERSION")
                                      or run_codex.CODEX.pinned)
    program = harness.npm_install("@openai/codex", version, "codex")
    print(f"e2e: what failures cost with Codex {version}", flush=True)
    outcomes = [await run_case(program, case, 0) for case in CASES]
    outcomes += [await run_case(program, case, DEFAULT_RETRIES)
                 for case in CASES if case.kiro_retries]
    print(table(outcomes), flush=True)
    failed = [o for o in outcomes if o.problems]
    if not failed:
        print(f"e2e passed: Codex {version} pays what we intend for {len(CASES)} failures",
              flush=True)
    return not failed


def main() -> None:
    try:
        passed = asyncio.run(run_all())
    except E2EError as error:
        sys.exit(f"e2e could not run the Codex failures: {error}")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
