"""What the end-to-end runs share: an agent CLI from npm, the fake Kiro, a real kiro2api.

``npm_install`` puts one pinned package version in a cache directory of its
own (outside the checkout) and reuses it on later runs. ``Stack`` starts the
tests' ``FakeUpstream`` in this process and ``kiro2api.py server`` as a child
process in front of it, with a made-up token file, as tests/demo.py does.
Nothing here talks to Kiro; only npm reaches the network, and only to install.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
sys.path[:0] = [str(ROOT), str(TESTS)]

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from fakes import FakeUpstream  # noqa: E402
from helpers import free_port, write_token  # noqa: E402

API_KEY = "e2e-client-key"
GENERATE = "/generateAssistantResponse"
# kiro2api answers /health well within this on a cold start.
STARTUP_SECONDS = 15.0


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


class Stack:
    """The fake Kiro on a free port and a real kiro2api server process in front of it.

    ``async with Stack(workdir) as stack:`` leaves ``stack.fake`` (script and
    recorded requests), ``stack.url`` (kiro2api's base URL) and ``stack.log``
    (the server's output, a file in ``workdir``).
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.fake = FakeUpstream()
        self.log = workdir / "kiro2api.log"
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._process: subprocess.Popen[bytes] | None = None

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
                   "--oidc-url", fake_url, "--log-level", "DEBUG"]
        # The developer's own KIRO2API_* settings stay out of the run.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("KIRO2API_") and k != "PYTHONPATH"}
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                             stderr=subprocess.STDOUT)
        try:
            await self._wait_until_up()
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

