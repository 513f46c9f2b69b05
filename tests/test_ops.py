"""Operations: the one-file build, the systemd unit, the demo, and outbound
HTTP proxies (``--proxy``, ``HTTP_PROXY``/``NO_PROXY``, proxy credentials)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import urllib.request
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner

import kiro2api
from helpers import (
    API_KEY, TLS, child_env, free_port, start_server_process, write_token_file,
)

MAIN = Path(kiro2api.__file__).resolve().parent
UNIT = MAIN / "kiro2api.service"
MESSAGE = {"model": "claude-sonnet-4-6", "max_tokens": 100,
           "messages": [{"role": "user", "content": "Hi"}]}


def make(*args: str, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(["make", "-s", *args, f"PYTHON={sys.executable}"], cwd=MAIN,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done


def build_pyz(tmp_path: Path, name: str = "dist", **env: str) -> Path:
    """``make dist`` into ``tmp_path / name``, leaving the checkout alone."""
    make("dist", f"DIST={tmp_path / name}", f"BUILD={tmp_path / (name + '-build')}", **env)
    return tmp_path / name / "kiro2api.pyz"


# The one-file build #######################################################


@pytest.mark.slow  # make
def test_pyz_holds_the_three_modules_and_builds_reproducibly(tmp_path):
    # The time zone changes what the current time looks like inside a zip
    # file, so two builds differ unless no timestamp comes from the clock.
    first = build_pyz(tmp_path, "utc", TZ="UTC0")
    second = build_pyz(tmp_path, "plus9", TZ="XYZ-9")
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(first) as pyz:
        names = pyz.namelist()
        assert sorted(names) == ["__main__.py", "convert.py", "eventstream.py", "kiro2api.py"]
        for module in ("kiro2api.py", "eventstream.py", "convert.py"):
            assert pyz.read(module) == (MAIN / module).read_bytes()


@pytest.mark.slow  # make and the pyz
def test_pyz_version(tmp_path):
    pyz = build_pyz(tmp_path)
    done = subprocess.run([sys.executable, str(pyz), "--version"], cwd=tmp_path,
                          env=child_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"kiro2api, version {kiro2api.__version__}"


# Stand-ins for what a Python without the dependencies (or with Debian 12's
# aiohttp 3.8) has: a package name that imports and nothing else.
STUB_PACKAGES = {
    "no aiohttp": {},
    "no click": {"aiohttp/__init__.py": "__version__ = '3.14.0'\n",
                 "aiohttp/web.py": "AppKey = object\n"},
    "aiohttp 3.8": {"aiohttp/__init__.py": "__version__ = '3.8.6'\n", "aiohttp/web.py": "",
                    "click/__init__.py": "", "click/core.py": "ParameterSource = None\n"},
}
MISSING_ADVICE = {
    "no aiohttp": "has no aiohttp: pip install 'aiohttp>=3.9' 'click>=8.1', or on "
                  "Debian/Ubuntu apt install python3-aiohttp python3-click",
    "no click": "has no click: pip install 'aiohttp>=3.9' 'click>=8.1', or on "
                "Debian/Ubuntu apt install python3-aiohttp python3-click",
    "aiohttp 3.8": "has 3.8.6: pip install 'aiohttp>=3.9'",
}


@pytest.mark.parametrize("python", sorted(STUB_PACKAGES))
@pytest.mark.parametrize("run", ["pyz", "script"])
@pytest.mark.slow  # make and a Python process
def test_without_its_dependencies_it_says_what_to_install(tmp_path, python, run):
    stubs = tmp_path / "site"
    for name, text in STUB_PACKAGES[python].items():
        (stubs / name).parent.mkdir(parents=True, exist_ok=True)
        (stubs / name).write_text(text)
    program = build_pyz(tmp_path) if run == "pyz" else MAIN / "kiro2api.py"
    # -S: no site-packages, so nothing but the standard library and the stubs.
    done = subprocess.run([sys.executable, "-S", str(program), "server"], cwd=tmp_path,
                          env={**child_env(), "PYTHONPATH": str(stubs)},
                          capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (1, ""), done.stderr
    line, = done.stderr.splitlines()
    assert line.startswith("kiro2api needs aiohttp"), line
    assert MISSING_ADVICE[python] in line, line


@pytest.mark.slow  # make
def test_make_install_puts_the_pyz_and_the_unit_under_destdir(tmp_path):
    root = tmp_path / "root"
    make("install", f"DESTDIR={root}", f"DIST={tmp_path / 'dist'}",
         f"BUILD={tmp_path / 'build'}")
    installed = root / "opt/kiro2api/kiro2api.pyz"
    assert installed.read_bytes() == (tmp_path / "dist/kiro2api.pyz").read_bytes()
    assert os.access(installed, os.X_OK)
    assert (root / "etc/systemd/system/kiro2api.service").read_bytes() == UNIT.read_bytes()


@pytest.mark.slow  # make
def test_installed_unit_runs_the_pyz_where_prefix_put_it(tmp_path):
    root = tmp_path / "root"
    make("install", f"DESTDIR={root}", "PREFIX=/usr/local/lib/kiro2api",
         "UNITDIR=/lib/systemd/system", f"DIST={tmp_path / 'dist'}", f"BUILD={tmp_path / 'build'}")
    assert (root / "usr/local/lib/kiro2api/kiro2api.pyz").is_file()
    unit = (root / "lib/systemd/system/kiro2api.service").read_text()
    # DESTDIR is only where the files are staged; the system runs them from PREFIX.
    assert str(root) not in unit
    expected = UNIT.read_text().replace(
        "\nExecStart=/usr/bin/python3 /opt/kiro2api/kiro2api.pyz server\n",
        "\nExecStart=/usr/bin/python3 /usr/local/lib/kiro2api/kiro2api.pyz server\n")
    assert expected != UNIT.read_text()
    assert unit == expected


# The Makefile and lint ####################################################


@pytest.mark.slow  # make
def test_make_alone_lists_every_target_and_builds_nothing(tmp_path):
    venv = tmp_path / "venv"
    plain = make(f"VENV={venv}")
    assert plain.stdout == make("help", f"VENV={venv}").stdout
    assert not venv.exists()
    phony = re.search(r"^\.PHONY: (.*)$", (MAIN / "Makefile").read_text(), re.M)[1].split()
    header, *lines = plain.stdout.splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(phony), plain.stdout
    assert all(len(line.split()) > 1 for line in lines), plain.stdout  # each says what it does


@pytest.mark.slow  # a ruff process
def test_ruff_finds_nothing():
    # ruff is in the test extras, pinned, so this runs wherever the tests do (CI too).
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=MAIN,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("case", ["a lint error", "no ruff"])
@pytest.mark.slow  # make and ruff
def test_make_lint_fails_when_ruff_does_or_is_missing(tmp_path, case):
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("Makefile", "setup.cfg", "pyproject.toml", "kiro2api.py", "eventstream.py",
                 "convert.py"):
        shutil.copy(MAIN / name, tree)
    (tree / "tests").mkdir()
    (tree / "bench").mkdir()
    if case == "a lint error":
        (tree / "tests/test_unused.py").write_text("import os\n")
    # A virtualenv that make takes as set up: its python is this one, or this one
    # without site-packages (so without ruff).
    bin_dir = tmp_path / "venv/bin"
    bin_dir.mkdir(parents=True)
    flags = "-S " if case == "no ruff" else ""
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" {flags}"$@"\n')
    (bin_dir / "python").chmod(0o755)
    (bin_dir / ".installed").touch()
    done = subprocess.run(["make", "-s", "lint", f"VENV={tmp_path / 'venv'}"], cwd=tree,
                          capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert ("F401" if case == "a lint error" else "No module named ruff") in output, output


# PR_SET_MDWE (Linux 6.3+) is what MemoryDenyWriteExecute=yes asks of the
# kernel: no memory that is both writable and executable. The wrapper sets
# it, checks it took, and runs the real command under it.
MDWE_WRAPPER = """\
import ctypes, os, sys
prctl = ctypes.CDLL(None, use_errno=True).prctl
if prctl(65, 1, 0, 0, 0) != 0 or prctl(66, 0, 0, 0, 0) != 1:
    sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""


def mdwe_supported() -> bool:
    done = subprocess.run([sys.executable, "-c", MDWE_WRAPPER, "/bin/true"], timeout=30)
    return done.returncode == 0


@pytest.mark.parametrize("hardened", [False, True], ids=["plain", "memory-deny-write-execute"])
@pytest.mark.slow  # make and a server process
async def test_pyz_serves_and_stops_cleanly_on_sigterm(tmp_path, fake_upstream, hardened):
    if hardened and not mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3 or newer)")
    pyz = build_pyz(tmp_path)
    token_file = write_token_file(tmp_path / "kiro-auth-token.json")
    port = free_port()
    command = [sys.executable, str(pyz), "server", "--port", str(port), "--api-key", API_KEY,
               "--token-file", str(token_file), "--upstream", fake_upstream.url,
               "--social-auth-url", fake_upstream.url, "--oidc-url", fake_upstream.url]
    if hardened:
        command = [sys.executable, "-c", MDWE_WRAPPER, *command]
    process = await start_server_process(command, port, cwd=tmp_path, env=child_env(),
                                         stdout=None, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/health") as response:
                health = await response.json()
            assert health["status"] == "ok" and health["version"] == kiro2api.__version__
            async with session.post(url + "/v1/messages", json=MESSAGE,
                                    headers={"x-api-key": API_KEY}) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["content"][0]["text"] == "Hello"
        process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(process.wait(), 10)
        stderr = (await process.stderr.read()).decode()
        assert status == 0, stderr
        assert "Traceback" not in stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.slow  # a server process
@pytest.mark.skipif(not shutil.which("ss"), reason="needs ss (iproute2) to read the backlog")
async def test_backlog_reaches_the_listening_socket(tmp_path, fake_upstream):
    token_file = write_token_file(tmp_path / "kiro-auth-token.json")
    port = free_port()
    process = await start_server_process(
        [sys.executable, str(MAIN / "kiro2api.py"), "server", "--port", str(port),
         "--api-key", API_KEY, "--token-file", str(token_file), "--upstream", fake_upstream.url,
         "--backlog", "777"], port, env=child_env())
    try:
        # For a listening socket, ss prints the backlog where others have Send-Q.
        listed = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                                text=True, check=True).stdout.split()
        assert listed[:1] == ["LISTEN"] and listed[2] == "777", listed
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 10)


# The systemd unit #########################################################


def unit_entries() -> list[tuple[str, str, str]]:
    """(section, key, value) for every setting; fails on any line that is
    not blank, a comment, a [Section] or a Key=Value."""
    entries, section = [], None
    for number, line in enumerate(UNIT.read_text().splitlines(), 1):
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if match := re.fullmatch(r"\[([A-Za-z]+)\]", line):
            section = match[1]
            continue
        match = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)=(.*)", line)
        assert match and section, f"kiro2api.service:{number}: {line!r}"
        assert not line.endswith("\\"), f"kiro2api.service:{number}: a continued line"
        entries.append((section, match[1], match[2]))
    return entries


def seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert match and match[2] in units, value
    return float(match[1]) * units[match[2]]


def test_unit_has_the_settings_the_deployment_relies_on():
    entries = unit_entries()
    service = {}
    for section, key, value in entries:
        if section == "Service":
            service.setdefault(key, []).append(value)
    assert {section for section, _, _ in entries} == {"Unit", "Service", "Install"}
    expected = {
        "User": "kiro2api", "Group": "kiro2api",
        "ExecStart": "/usr/bin/python3 /opt/kiro2api/kiro2api.pyz server",
        "EnvironmentFile": "-/etc/kiro2api/env",
        "Environment": "KIRO2API_TOKEN_FILE=/var/lib/kiro2api/kiro-auth-token.json",
        "StateDirectory": "kiro2api",
        "ReadWritePaths": "/var/lib/kiro2api",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "ProtectKernelTunables": "yes", "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes", "UMask": "0077",
    }
    for key, value in expected.items():
        assert service.get(key) == [value], key
    # The token's directory is the state directory, and the only writable path.
    token_dir = str(Path(service["Environment"][0].partition("=")[2]).parent)
    assert token_dir == "/var/lib/" + service["StateDirectory"][0]
    (timeout,) = service["TimeoutStopSec"]
    assert seconds(timeout) > kiro2api.Config().shutdown_timeout + 5


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.slow  # systemd-analyze
def test_systemd_analyze_verify():
    # verify exits 0 on unknown keys and bad values, but names the file.
    done = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True,
                          text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "kiro2api.service" not in output, output


# The demo #################################################################


@pytest.mark.slow  # the demo process
def test_demo_streams_an_answer_without_a_kiro_account(tmp_path):
    env = {**child_env(), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(MAIN / "tests/demo.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Hello! I am the fake Kiro backend" in done.stdout
    assert "and the SDK is printing them as they arrive.\n" in done.stdout
    assert "stop_reason=end_turn" in done.stdout
    assert "exit status 0" in done.stdout


@pytest.mark.slow  # the demo's processes
async def test_fake_serves_until_interrupted(tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(MAIN / "tests/demo.py"), "--serve", cwd=tmp_path,
        env={**child_env(), "HOME": str(tmp_path)}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    server_pid = None
    try:
        printed = ""
        while not (found := re.search(r"kiro2api: +(\S+) +client key: (\S+)\n(?s:.*)"
                                      r"kiro2api is process (\d+)", printed)):
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            assert line, printed + (await process.stderr.read()).decode()
            printed += line.decode()
        url, key, server_pid = found[1], found[2], int(found[3])
        answers = []
        async with aiohttp.ClientSession(headers={"x-api-key": key}) as session:
            for _ in range(2):  # the fake answers every request, not just the first
                async with session.post(url + "/v1/messages", json=MESSAGE) as response:
                    assert response.status == 200, await response.text()
                    answers.append((await response.json())["content"][0]["text"])
        assert answers[0].startswith("Hello! I am the fake Kiro backend") and \
            answers[1] == answers[0]
        process.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, out.decode() + err.decode()
        assert "stopped kiro2api (exit status 0) and the fake backend" in out.decode()
        assert err.decode().rstrip().endswith("kiro2api stopped"), err.decode()
        with pytest.raises(aiohttp.ClientConnectionError):  # nothing listens there now
            async with aiohttp.ClientSession() as session, session.get(url + "/health"):
                pass
    finally:
        if process.returncode is None:
            # kiro2api is in a session of its own: a killed demo would leave it running.
            if server_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server_pid, signal.SIGKILL)
            process.kill()
            await process.wait()


# Outbound proxies #########################################################


@dataclasses.dataclass
class Forwarded:
    target: str  # the request-target as the client sent it
    proxy_authorization: str | None


class ForwardProxy:
    """A plain HTTP forward proxy: takes absolute-form requests
    (``POST http://host:port/path``), sends them on with its own session and
    streams the answers back; ``seen`` records what came through."""

    HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authorization", "proxy-connection",
                            "te", "trailer", "transfer-encoding", "upgrade", "host",
                            "content-length"})

    def __init__(self) -> None:
        self.seen: list[Forwarded] = []
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        app.cleanup_ctx.append(self._session)
        return app

    async def _session(self, app: web.Application):
        self._client = aiohttp.ClientSession(auto_decompress=False)
        yield
        await self._client.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        target = request.raw_path
        self.seen.append(Forwarded(target, request.headers.get("Proxy-Authorization")))
        if not target.startswith("http://"):
            return web.Response(status=400, text="not a proxy request")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self.HOP_BY_HOP}
        async with self._client.request(request.method, target, headers=headers,
                                        data=await request.read()) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in self.HOP_BY_HOP})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    def targets(self) -> list[str]:
        return [seen.target for seen in self.seen]


@pytest.fixture
async def forward_proxy(aiohttp_server):
    proxy = ForwardProxy()
    server = await aiohttp_server(proxy.app())
    proxy.url = str(server.make_url("")).rstrip("/")
    return proxy


@pytest.fixture
def expired_config(proxy_config):
    """The tests' Config, with a token that must be refreshed first."""
    write_token_file(proxy_config.token_files[0], expiresAt="2020-01-01T00:00:00.000Z")
    return proxy_config


async def ask(aiohttp_server, config: kiro2api.Config) -> None:
    """One /v1/messages request through the real app; it must succeed."""
    server = await aiohttp_server(kiro2api.make_app(config))
    async with aiohttp.ClientSession() as session:  # no trust_env: straight to the app
        async with session.post(server.make_url("/v1/messages"), json=MESSAGE,
                                headers={"x-api-key": API_KEY}) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["content"][0]["text"] == "Hello"


async def test_proxy_option_carries_the_refresh_and_the_upstream_call(
        aiohttp_server, fake_upstream, forward_proxy, expired_config):
    config = dataclasses.replace(expired_config, proxy=forward_proxy.url)
    await ask(aiohttp_server, config)
    assert forward_proxy.targets() == [fake_upstream.url + "/refreshToken",
                                       fake_upstream.url + "/generateAssistantResponse"]
    # ... and they reached the upstream, with the refreshed token.
    (call,) = fake_upstream.calls("/generateAssistantResponse")
    assert call.headers["Authorization"] == "Bearer aoa-social-access-1"


def with_environment(config):
    """``config`` as the CLI would build it now: the proxy variables are read then."""
    return dataclasses.replace(config, environment_proxies=urllib.request.getproxies_environment())


async def test_http_proxy_variable_is_honoured_without_the_option(
        aiohttp_server, fake_upstream, forward_proxy, expired_config, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    await ask(aiohttp_server, with_environment(expired_config))
    assert forward_proxy.targets() == [fake_upstream.url + "/refreshToken",
                                       fake_upstream.url + "/generateAssistantResponse"]


async def test_no_proxy_bypasses_the_proxy_variable(
        aiohttp_server, fake_upstream, forward_proxy, expired_config, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    config = with_environment(expired_config)
    assert config.environment_proxies["http"] == forward_proxy.url
    await ask(aiohttp_server, config)
    assert forward_proxy.seen == []
    assert len(fake_upstream.calls("/refreshToken")) == 1
    assert len(fake_upstream.calls("/generateAssistantResponse")) == 1


async def test_proxy_option_wins_over_the_variable(
        aiohttp_server, fake_upstream, forward_proxy, expired_config, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # discard: would fail
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # and this must not bypass --proxy
    config = dataclasses.replace(expired_config, proxy=forward_proxy.url)
    await ask(aiohttp_server, config)
    assert len(forward_proxy.seen) == 2


@pytest.mark.parametrize("via", ["option", "variable"])
async def test_credentials_in_the_proxy_url_become_proxy_authorization(
        aiohttp_server, fake_upstream, forward_proxy, expired_config, monkeypatch, via):
    url = forward_proxy.url.replace("http://", "http://alice:s%40cret@")
    if via == "option":
        config = dataclasses.replace(expired_config, proxy=url)
    else:
        monkeypatch.setenv("HTTP_PROXY", url)
        config = with_environment(expired_config)
    await ask(aiohttp_server, config)
    expected = "Basic " + base64.b64encode(b"alice:s@cret").decode()
    assert [seen.proxy_authorization for seen in forward_proxy.seen] == [expected, expected]
    # The upstream never sees them.
    assert all("Proxy-Authorization" not in r.headers for r in fake_upstream.requests)


@pytest.mark.slow  # a kiro2api process
async def test_refresh_command_goes_through_the_proxy(tmp_path, fake_upstream, forward_proxy):
    token_file = write_token_file(tmp_path / "kiro-auth-token.json",
                                  expiresAt="2020-01-01T00:00:00.000Z")
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(MAIN / "kiro2api.py"), "refresh", "--token-file", str(token_file),
        "--social-auth-url", fake_upstream.url, "--proxy", forward_proxy.url, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    assert forward_proxy.targets() == [fake_upstream.url + "/refreshToken"]
    assert json.loads(token_file.read_text())["accessToken"] == "aoa-social-access-1"


@pytest.mark.parametrize("args, env", [
    (["--proxy", "http://127.0.0.1:3128"], {}),
    ([], {"KIRO2API_PROXY": "http://127.0.0.1:3128"}),
    (["--proxy", "http://127.0.0.1:3128"], {"KIRO2API_PROXY": "http://127.0.0.1:9"}),
])
def test_server_proxy_option_and_variable_reach_the_config(monkeypatch, args, env):
    served: list[kiro2api.Config] = []
    monkeypatch.setattr(kiro2api, "serve", served.append)
    result = CliRunner().invoke(kiro2api.cli, ["server", *args], env=env)
    assert result.exit_code == 0, result.output
    assert served[0].proxy == "http://127.0.0.1:3128"


def test_server_without_a_proxy_setting_leaves_it_to_the_environment(monkeypatch):
    served: list[kiro2api.Config] = []
    monkeypatch.setattr(kiro2api, "serve", served.append)
    result = CliRunner().invoke(kiro2api.cli, ["server"])
    assert result.exit_code == 0, result.output
    assert served[0].proxy is None


# HTTPS_PROXY: a CONNECT tunnel to an upstream that speaks TLS ##############


class ConnectProxy:
    """An HTTPS forward proxy: ``CONNECT host:port`` opens that connection and
    relays bytes both ways, so it never sees inside the TLS; ``seen`` records
    each request line and its Proxy-Authorization."""

    def __init__(self) -> None:
        self.seen: list[Forwarded] = []
        self.url = ""
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ", 2)
            headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in head[1:])}
            self.seen.append(Forwarded(f"{method} {target}", headers.get("proxy-authorization")))
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            try:
                await asyncio.gather(self._relay(reader, up_writer),
                                     self._relay(up_reader, writer))
            finally:
                up_writer.close()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._tasks.discard(asyncio.current_task())

    @staticmethod
    async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()


@pytest.fixture
async def connect_proxy():
    proxy = ConnectProxy()
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def tls_upstream(aiohttp_server):
    """The fake Kiro backend over https, with the test CA's certificate."""
    import ssl

    from fakes import FakeUpstream

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(TLS / "localhost.pem", TLS / "localhost.key")
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app(), ssl=context)
    fake.url = str(server.make_url("")).rstrip("/")
    assert fake.url.startswith("https://127.0.0.1:")
    return fake


@pytest.mark.parametrize("bypass", [False, True], ids=["https-proxy", "no-proxy"])
@pytest.mark.slow  # a server process
async def test_https_proxy_variable_tunnels_the_refresh_and_the_call(
        tmp_path, tls_upstream, connect_proxy, bypass):
    """A real server process, as systemd would start it: HTTPS_PROXY (with
    credentials) carries the token refresh and the upstream call through
    CONNECT, unless NO_PROXY names the host; the JSON log has the request's
    line and the refresh, and no secret."""
    token_file = write_token_file(tmp_path / "kiro-auth-token.json",
                                  expiresAt="2020-01-01T00:00:00.000Z")
    port = free_port()
    env = {**child_env(), "SSL_CERT_FILE": str(TLS / "ca.pem"),
           "HTTPS_PROXY": connect_proxy.url.replace("http://", "http://alice:s%40cret@")}
    if bypass:
        env["NO_PROXY"] = "localhost,127.0.0.1"
    url = tls_upstream.url
    process = await start_server_process(
        [sys.executable, str(MAIN / "kiro2api.py"), "server", "--port", str(port),
         "--api-key", API_KEY, "--token-file", str(token_file), "--upstream", url,
         "--social-auth-url", url, "--oidc-url", url, "--log-format", "json"], port,
        env=env, stdout=None, stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as session, session.post(
                f"http://127.0.0.1:{port}/v1/messages", json=MESSAGE,
                headers={"x-api-key": API_KEY}) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["content"][0]["text"] == "Hello"
            request_id = response.headers["request-id"]
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    stderr = (await process.stderr.read()).decode()

    assert [r.path for r in tls_upstream.requests] == ["/refreshToken",
                                                       "/generateAssistantResponse"]
    if bypass:
        assert connect_proxy.seen == []
    else:
        # One tunnel per connection: aiohttp may carry both calls in one.
        host = url.removeprefix("https://")
        assert connect_proxy.seen and {s.target for s in connect_proxy.seen} == {
            f"CONNECT {host}"}
        expected = "Basic " + base64.b64encode(b"alice:s@cret").decode()
        assert {s.proxy_authorization for s in connect_proxy.seen} == {expected}

    lines = [json.loads(line) for line in stderr.splitlines()]  # every line is JSON
    (entry,) = [line for line in lines if line.get("request_id") == request_id]
    assert entry["route"] == "/v1/messages" and entry["model"] == MESSAGE["model"]
    assert entry["status"] == 200 and entry["retries"] == 0 and entry["bytes_out"] > 0
    assert entry["duration_ms"] >= entry["upstream_first_byte_ms"] > 0
    assert any("refreshed (social login)" in line["message"] for line in lines)
    for secret in ("aoa-initial-access", "aor-initial-refresh", "aoa-social-access-1",
                   "aor-social-refresh-1", API_KEY, "s@cret", "s%40cret"):
        assert secret not in stderr
