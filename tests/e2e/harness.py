"""What the end-to-end runs share: an agent CLI from npm, the fake Kiro, a real kiro2api.

``npm_install`` puts one pinned package version in a cache directory of its
own (outside the checkout) and reuses it on later runs. ``Stack`` starts the
tests' ``FakeUpstream`` in this process and ``kiro2api.py server`` as a child
process in front of it, with a made-up token file, as tests/demo.py does.
``main(agent)`` runs one shell-tool loop per model of an ``Agent``:

1. the fake answers the first generateAssistantResponse with a call to the
   agent's shell tool whose command prints a random marker into a file;
2. the agent runs it and sends the output back; the fake answers with text.

A run passes when the agent exits 0 and prints the final answer, the marker
file exists, the command's output reached Kiro as a toolResult of the second
call (answering the toolUse in its history), and kiro2api made exactly two
calls: no reconnects, no retries, no side requests that reach Kiro.

Nothing here talks to Kiro; only npm reaches the network, and only to install.
Environment: ``E2E_CACHE`` (default ~/.cache/kiro2api-e2e), ``E2E_MODELS``
(space-separated, instead of the agent's own list; for one agent at a time), ``E2E_TIMEOUT``
(seconds per run, default 180), ``E2E_KEEP=1`` keeps each run's directory
(under E2E_CACHE/runs) even when it passes; a failed run's is always kept.
``E2E_SERVER_OPTIONS`` adds options to kiro2api's command line (``--workers 2``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
sys.path[:0] = [str(ROOT), str(TESTS)]

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from fakes import FakeUpstream, Stream, tail, text, tool  # noqa: E402
from helpers import free_port, write_token  # noqa: E402

API_KEY = "e2e-client-key"
GENERATE = "/generateAssistantResponse"
# kiro2api answers /health well within this on a cold start.
STARTUP_SECONDS = 15.0
TIMEOUT_SECONDS = 180.0  # per run: agent start, two turns, the command
PROMPT = "Run the marker command, then tell me you are done."
TOOL_USE_ID = "tooluse_e2e_shell_1"
MARKER_FILE = "e2e-marker.txt"


class E2EError(Exception):
    """The run could not be set up (npm, a server that would not start)."""


def cache_root() -> Path:
    """Where installed agent CLIs are kept: $E2E_CACHE, else ~/.cache/kiro2api-e2e."""
    configured = os.environ.get("E2E_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kiro2api-e2e"


def resolve_version(package: str, version: str) -> str:
    """An exact version for ``version`` ("latest", a tag or one already exact)."""
    if version and version[0].isdigit():
        return version
    found = _npm("view", f"{package}@{version or 'latest'}", "version", "--json")
    value = json.loads(found)
    # A range can match several versions; npm lists them oldest first.
    return value[-1] if isinstance(value, list) else value


def npm_install(package: str, version: str, binary: str) -> Path:
    """``node_modules/.bin/<binary>`` of ``package@version``, installed once per version."""
    name = package.rsplit("/", 1)[-1]
    prefix = cache_root() / f"{name}-{version}"
    program = prefix / "node_modules" / ".bin" / binary
    installed = prefix / "node_modules" / package / "package.json"
    if program.exists() and installed.exists():
        if json.loads(installed.read_text()).get("version") == version:
            return program
    prefix.mkdir(parents=True, exist_ok=True)
    print(f"e2e: npm install {package}@{version} into {prefix}", flush=True)
    _npm("install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--loglevel=error",
         f"{package}@{version}")
    if not program.exists():
        raise E2EError(f"npm installed {package}@{version} but {program} is missing")
    return program


def _npm(*args: str) -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise E2EError("npm is not on PATH; the end-to-end run installs the agents with it")
    done = subprocess.run([npm, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise E2EError(f"npm {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


@dataclass
class Exchange:
    """One request an agent made to kiro2api, and the status kiro2api answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, else the bytes
    status: int = 0


# Hop-by-hop and length headers: aiohttp sets its own on each side.
NOT_FORWARDED = {"host", "content-length", "transfer-encoding", "connection", "keep-alive",
                 "accept-encoding", "content-encoding"}


class Recorder:
    """A pass-through in front of kiro2api that keeps what the agent sent.

    Answers stream through as they come (SSE included); only the request
    side is kept, with the status. Bodies are sent as they are, and answers
    come back uncompressed (the agent's Accept-Encoding is not passed on).
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.exchanges: list[Exchange] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        exchange = Exchange(request.method, request.path_qs, dict(request.headers), body)
        self.exchanges.append(exchange)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED}
        async with self._session.request(request.method, self.target + request.path_qs,
                                         headers=headers, data=raw or None) as upstream:
            exchange.status = upstream.status
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in NOT_FORWARDED})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


class Stack:
    """The fake Kiro on a free port and a real kiro2api server process in front of it.

    ``async with Stack(workdir) as stack:`` leaves ``stack.fake`` (script and
    recorded requests), ``stack.url`` (kiro2api's base URL) and ``stack.log``
    (the server's output, a file in ``workdir``). ``options`` go on kiro2api's
    command line after the harness's own (``("--retries", "0")``). With
    ``record``, ``stack.url`` is a ``Recorder`` in front of kiro2api and
    ``stack.exchanges`` what the agent sent.
    """

    def __init__(self, workdir: Path, options: tuple[str, ...] = (), *,
                 record: bool = False) -> None:
        self.workdir = workdir
        self.options = options
        self.record = record
        self.fake = FakeUpstream()
        self.fake.models_rpc = True  # ListAvailableModels on --management-url, as in 2026
        self.log = workdir / "kiro2api.log"
        self.url = ""
        self._recorder: Recorder | None = None
        self._runner: web.AppRunner | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def exchanges(self) -> list[Exchange]:
        """What the agent sent through the Recorder (with ``record``), in order."""
        assert self._recorder is not None, "the Stack was started without record=True"
        return self._recorder.exchanges

    async def __aenter__(self) -> Stack:
        self._runner = web.AppRunner(self.fake.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        fake_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        token_file = self.workdir / "kiro-auth-token.json"
        write_token(token_file, mode=0o600)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, str(ROOT / "kiro2api.py"), "server", "--port", str(port),
                   "--api-key", API_KEY, "--token-file", str(token_file),
                   "--upstream", fake_url, "--social-auth-url", fake_url,
                   "--oidc-url", fake_url, "--management-url", fake_url + "/management",
                   "--log-level", "DEBUG", *self.options,
                   *shlex.split(os.environ.get("E2E_SERVER_OPTIONS", ""))]
        # The developer's own KIRO2API_* settings stay out of the run.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("KIRO2API_") and k != "PYTHONPATH"}
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                             stderr=subprocess.STDOUT)
        try:
            await self._wait_until_up()
            if self.record:
                self._recorder = Recorder(self.url)
                await self._recorder.start()
                self.url = self._recorder.url
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _wait_until_up(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + STARTUP_SECONDS
        async with aiohttp.ClientSession() as session:
            while True:
                if self._process.poll() is not None:
                    raise E2EError(f"kiro2api exited with status {self._process.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-2000:])
                try:
                    async with session.get(self.url + "/health") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise E2EError(f"kiro2api did not answer {self.url}/health "
                                   f"within {STARTUP_SECONDS:g} s")
                await asyncio.sleep(0.1)

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._recorder is not None:
            await self._recorder.stop()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                await asyncio.to_thread(self._process.wait, 10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._runner is not None:
            await self._runner.cleanup()

    def generate_calls(self) -> list[Any]:
        """The generateAssistantResponse calls kiro2api made, in order."""
        return self.fake.calls(GENERATE)


async def run_agent(command: list[str], *, env: dict[str, str], cwd: Path,
                    timeout: float) -> tuple[int | None, str, str]:
    """Run an agent CLI to the end, stdin closed: (exit status or None on timeout, out, err)."""
    process = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
        status: int | None = process.returncode
    except asyncio.TimeoutError:
        # Its own group: node launchers leave the native binary as a child.
        os.killpg(process.pid, 9)
        out, err = await process.communicate()
        status = None
    return status, out.decode(errors="replace"), err.decode(errors="replace")


def agent_env(home: Path, **extra: str) -> dict[str, str]:
    """A small environment for an agent: its own HOME, no proxies, no keys of ours."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "TERM": "dumb", "LANG": os.environ.get("LANG", "C.UTF-8"),
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    env.update(extra)
    return env


# One agent's loop ##########################################################


@dataclass(frozen=True)
class Run:
    """Where one run lives: ``root`` holds ``home`` (the agent's HOME) and ``work`` (its cwd)."""

    root: Path
    url: str  # kiro2api's base URL, no trailing slash
    model: str

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def work(self) -> Path:
        return self.root / "work"


@dataclass(frozen=True)
class Agent:
    """An agent CLI from npm and how to drive one non-interactive turn with it."""

    name: str  # short, for messages and directory names
    package: str
    pinned: str
    version_env: str  # the variable that overrides ``pinned``; "latest" is the newest
    binary: str  # under node_modules/.bin
    models: tuple[str, ...]  # run once each, unless E2E_MODELS names others
    # (model, command) -> the tool Kiro calls to run ``command``, and its input.
    shell_tool: Callable[[str, str], tuple[str, dict[str, Any]]]
    # (program, run) -> argv and the variables added to ``agent_env``; it may
    # write config files under run.home or run.root.
    command: Callable[[Path, Run], tuple[list[str], dict[str, str]]]
    # More runs after the loops, once each: (program, version, timeout) -> passed.
    more: tuple[Callable[[Path, str, float], Awaitable[bool]], ...] = ()


class Failed(Exception):
    """One of the run's checks did not hold."""


def script(fake: FakeUpstream, name: str, arguments: dict[str, Any], answer: str) -> None:
    """Turn 1: a call to ``name``, its input in three fragments; turn 2: ``answer``."""
    encoded = json.dumps(arguments)
    third = len(encoded) // 3
    fragments = (encoded[:third], encoded[third:2 * third], encoded[2 * third:])
    fake.script.append(Stream(tool(TOOL_USE_ID, name, *fragments) + tail()))
    fake.script.append(Stream(text(*answer.partition(": ")) + tail()))


def kiro_context(call: Any) -> dict[str, Any]:
    current = call.body["conversationState"]["currentMessage"]["userInputMessage"]
    return current.get("userInputMessageContext", {})


def history_tool_uses(call: Any) -> list[Any]:
    history = call.body["conversationState"].get("history", [])
    return [use for entry in history
            for use in entry.get("assistantResponseMessage", {}).get("toolUses", [])]


def check(stack: Stack, status: int | None, out: str, run: Run, *, tool_name: str,
          marker: str, answer: str) -> None:
    """Raise ``Failed`` with the first check that does not hold, in the order that explains most."""
    if status is None:
        raise Failed("the agent did not finish in time")
    calls = stack.generate_calls()
    if len(calls) != 2:
        raise Failed(f"kiro2api made {len(calls)} generateAssistantResponse calls, not 2")
    declared = kiro_context(calls[0]).get("tools", [])
    names = [t.get("toolSpecification", {}).get("name") for t in declared]
    if tool_name not in names:
        raise Failed(f"the first call did not declare {tool_name} to Kiro (tools: {names})")
    results = kiro_context(calls[1]).get("toolResults", [])
    if marker not in json.dumps(results):
        raise Failed(f"the command's output is not in the second call's toolResults: "
                     f"{json.dumps(results)[:1500]}")
    answered = [r.get("toolUseId") for r in results]
    if answered != [TOOL_USE_ID]:
        raise Failed(f"toolResults answer {answered}, not [{TOOL_USE_ID!r}]")
    if TOOL_USE_ID not in [u.get("toolUseId") for u in history_tool_uses(calls[1])]:
        raise Failed("the second call's history has no toolUse with the id the result answers")
    written = run.work / MARKER_FILE
    if not written.exists() or written.read_text().strip() != marker:
        raise Failed(f"the command did not run in {run.work}: no {MARKER_FILE} with the marker")
    if status != 0:
        raise Failed(f"the agent exited with status {status}")
    if answer not in out:
        raise Failed("the agent's stdout lacks the final answer")


def report(stack: Stack, status: int | None, out: str, err: str, root: Path) -> None:
    """What a failed run leaves on stderr: the calls upstream, the agent's output, the log."""
    say = functools.partial(print, file=sys.stderr)
    say(f"\nagent exit status: {status}")
    if stack.record:
        for exchange in stack.exchanges:
            say(f"agent -> kiro2api: {exchange.method} {exchange.path} -> {exchange.status}")
    for i, call in enumerate(stack.generate_calls(), 1):
        say(f"generate call {i}: {json.dumps(call.body)[:600]}")
    say(f"--- agent stdout (last 3000)\n{out[-3000:]}")
    say(f"--- agent stderr (last 6000)\n{err[-6000:]}")
    log = stack.log.read_text(errors="replace").splitlines()
    info = [line for line in log if not line.startswith("DEBUG")]
    say("--- kiro2api log (not DEBUG, last 60 lines)\n" + "\n".join(info[-60:]))
    say(f"--- everything is kept in {root}")


def run_root(prefix: str) -> Path:
    """A new directory for one run under E2E_CACHE/runs, named from ``prefix``."""
    # Not under /tmp: Codex refuses to put its helper binaries in a temporary
    # CODEX_HOME (a warning, and it runs without them).
    runs = cache_root() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix + "-", dir=runs))


async def run_one(agent: Agent, program: Path, version: str, model: str,
                  timeout: float) -> bool:
    """One shell-tool loop with ``model``; True if every check held."""
    token = secrets.token_hex(6)
    marker = f"kiro2api-e2e-{token}"
    answer = f"All done: the marker kiro2api-e2e-answer-{token} is printed."
    tool_name, arguments = agent.shell_tool(model, f"echo {marker} | tee {MARKER_FILE}")
    label = f"{agent.name} {version} ({model})"

    root = run_root(f"{agent.name}-{version}-{model}")
    print(f"e2e: {label} in {root}", flush=True)
    passed = False
    async with Stack(root) as stack:
        run = Run(root, stack.url, model)
        run.home.mkdir()
        run.work.mkdir()
        script(stack.fake, tool_name, arguments, answer)
        argv, extra = agent.command(program, run)
        status, out, err = await run_agent(argv, env=agent_env(run.home, **extra),
                                           cwd=run.work, timeout=timeout)
        (root / "agent.stdout").write_text(out)
        (root / "agent.stderr").write_text(err)
        try:
            check(stack, status, out, run, tool_name=tool_name, marker=marker, answer=answer)
            passed = True
        except Failed as failure:
            print(f"e2e FAILED: {label}: {failure}", file=sys.stderr)
            report(stack, status, out, err, root)
    if passed:
        print(f"e2e passed: {label} ran {tool_name} through kiro2api in 2 Kiro calls "
              f"and printed the answer", flush=True)
        if not os.environ.get("E2E_KEEP"):
            shutil.rmtree(root)
    return passed


async def run_agent_models(agent: Agent) -> bool:
    version = resolve_version(agent.package, os.environ.get(agent.version_env) or agent.pinned)
    program = npm_install(agent.package, version, agent.binary)
    timeout = float(os.environ.get("E2E_TIMEOUT") or TIMEOUT_SECONDS)
    models = os.environ.get("E2E_MODELS", "").split() or agent.models
    results = [await run_one(agent, program, version, model, timeout) for model in models]
    results += [await more(program, version, timeout) for more in agent.more]
    return all(results)


def main(agent: Agent) -> None:
    """Run ``agent``'s loops as a script: exit 0 if all passed, 1 if one failed."""
    try:
        passed = asyncio.run(run_agent_models(agent))
    except E2EError as error:
        sys.exit(f"e2e could not run {agent.name}: {error}")
    sys.exit(0 if passed else 1)
