"""What the tests share that is not a fixture; tests import it as ``helpers``.

- Token files: ``write_token`` writes one as the Kiro IDE does (social, or IdC
  with its client registration beside it); ``write_token_file`` is the preset
  the proxy fixtures use.
- Reading answers: ``parse_sse`` turns a text/event-stream body into its events.
- Servers: ``API_KEY``, ``free_port``, ``start_server_process`` for a real
  server process (``child_env`` its environment, ``TLS`` the test CA's files),
  ``Proxy`` for the app the ``proxy`` fixture serves, ``RedisServer`` for a
  real ``redis-server`` (Debian's package) on a free loopback port.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp

API_KEY = "test-client-key"
# tests/tls: a test CA and a certificate it signed for localhost and
# 127.0.0.1, valid 2000-2100 (made with `openssl ca`; nothing else uses them).
TLS = Path(__file__).resolve().parent / "tls"


# Token files ##############################################################

SOCIAL_ACCESS = "aoaAAAAAsocialAccessToken0123456789abcdefghijklmnopqrstuvwxyzSOCIAL"
SOCIAL_REFRESH = "aorAAAAAsocialRefreshToken0123456789abcdefghijklmnopqrstuvwxyzSOCIAL"
IDC_ACCESS = "aoaAAAAAidcAccessToken0123456789abcdefghijklmnopqrstuvwxyzIDC"
IDC_REFRESH = "aorAAAAAidcRefreshToken0123456789abcdefghijklmnopqrstuvwxyzIDC"
CLIENT_ID_HASH = "0123456789abcdef0123456789abcdef01234567"
CLIENT_ID = "fakeClientId-0123456789"
CLIENT_SECRET = "eyJraWQiOiJmYWtlLWNsaWVudC1zZWNyZXQifQ.secret"
PROFILE_ARN = "arn:aws:codewhisperer:us-east-1:699475941385:profile/EHGA3GRVQMUK"

# The proxy fixtures' account: short tokens a test can spot in a header, and
# the profile ARN the fake upstream hands out on refresh.
INITIAL_TOKENS = {
    "accessToken": "aoa-initial-access",
    "refreshToken": "aor-initial-refresh",
    "provider": "Github",
    "profileArn": "arn:aws:codewhisperer:us-east-1:111122223333:profile/FAKE",
}


def ide_time(seconds_from_now: float) -> str:
    """An ``expiresAt`` as the Kiro IDE writes it, this many seconds from now."""
    moment = datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def write_token(path: Path, *, method: str = "social", expires_in: float = 3600,
                mode: int = 0o644, **overrides: Any) -> dict[str, Any]:
    """Write a token file as the Kiro IDE does (``method`` social or idc; for idc
    also the client registration beside it); keys set to None are left out."""
    if method == "social":
        data: dict[str, Any] = {
            "accessToken": SOCIAL_ACCESS, "refreshToken": SOCIAL_REFRESH,
            "expiresAt": ide_time(expires_in), "authMethod": "social", "provider": "Google",
            "profileArn": PROFILE_ARN,
        }
    else:
        data = {
            "accessToken": IDC_ACCESS, "refreshToken": IDC_REFRESH,
            "expiresAt": ide_time(expires_in), "clientIdHash": CLIENT_ID_HASH,
            "authMethod": "IdC", "provider": "BuilderId", "region": "us-east-1",
        }
        registration = path.parent / f"{CLIENT_ID_HASH}.json"
        registration.write_text(json.dumps({"clientId": CLIENT_ID, "clientSecret": CLIENT_SECRET,
                                            "expiresAt": ide_time(90 * 86400)}))
    data.update(overrides)
    data = {k: v for k, v in data.items() if v is not None}
    path.write_text(json.dumps(data, indent=2))
    path.chmod(mode)
    return data


def write_token_file(path: Path, **overrides: Any) -> Path:
    """The proxy fixtures' social token file (``INITIAL_TOKENS``, valid for an
    hour, mode 0600) with ``overrides``; returns ``path``."""
    write_token(path, mode=0o600, **{**INITIAL_TOKENS, **overrides})
    return path


# Server-sent events #######################################################


def parse_sse(body: bytes | str, *, comments: bool = False) -> list[tuple[str | None, Any]]:
    """The events of a whole text/event-stream body as ``(event name or None, data)``.

    Strict about the framing the proxy writes: every event ends in a blank
    line and is an optional ``event:`` line followed by exactly one ``data:``
    line, whose JSON is parsed (OpenAI's ``[DONE]`` stays text). Comment
    blocks (``: keep-alive``) are left out if ``comments``, else they fail
    the test, as anything else does.
    """
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    assert not text or text.endswith("\n\n"), text[-200:]
    events: list[tuple[str | None, Any]] = []
    for block in text.split("\n\n")[:-1]:
        if block.startswith(":"):
            assert comments and "\n" not in block, block
            continue
        lines = block.split("\n")
        name = None
        if lines[0].startswith("event: "):
            name = lines.pop(0).removeprefix("event: ")
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        data = lines[0].removeprefix("data: ")
        events.append((name, data if data == "[DONE]" else json.loads(data)))
    return events


# Servers ##################################################################


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """The test's environment without anything that could bring in the checkout."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


async def start_server_process(command, port, **popen):
    """Start ``command`` (a kiro2api server on ``port``) and wait until /health answers.

    ``popen`` goes to ``asyncio.create_subprocess_exec``; by default the output
    goes to a pipe on ``stdout``. If the server exits or stays silent for about
    ten seconds, the test fails with what it printed.
    """
    import pytest  # here: the demo and the benchmarks import this module without pytest

    popen.setdefault("stdout", asyncio.subprocess.PIPE)
    popen.setdefault("stderr", asyncio.subprocess.STDOUT)
    process = await asyncio.create_subprocess_exec(*command, **popen)
    output = process.stderr if popen["stderr"] == asyncio.subprocess.PIPE else process.stdout
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            if process.returncode is not None:
                break
            try:
                async with session.get(f"http://127.0.0.1:{port}/health") as response:
                    await response.read()
                    return process
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
    if process.returncode is None:
        process.kill()
    await process.wait()
    printed = (await output.read()).decode(errors="replace") if output else ""
    pytest.fail(f"the server did not answer /health (exit status {process.returncode}):\n"
                f"{printed[-2000:]}")


class Proxy:
    """The real kiro2api app on a real port, in front of ``fake``."""

    def __init__(self, url, fake, config):
        self.url = url
        self.fake = fake
        self.config = config

    def anthropic(self, **kwargs):
        import anthropic

        return anthropic.AsyncAnthropic(base_url=self.url, api_key=API_KEY, max_retries=0,
                                        **kwargs)

    def openai(self, **kwargs):
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0,
                                  **kwargs)


class RedisServer:
    """A real ``redis-server`` on a free loopback port, no persistence, in ``workdir``;
    stopped by its PID (and started again on the same port by ``start``)."""

    def __init__(self, workdir: Path, *, unix_socket: Path | None = None,
                 tls: bool = False) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.unix_socket = unix_socket  # served too, if given
        # With tls, only TLS (the test CA's certificate for localhost) on the port.
        self.tls = tls
        self.url = (f"rediss://localhost:{self.port}/0?ssl_ca_certs={TLS / 'ca.pem'}" if tls
                    else f"redis://127.0.0.1:{self.port}/0")
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary, "these tests need Redis: apt-get install redis-server (.ci/run does)"
        ports = ("--port", "0", "--tls-port", str(self.port),
                 "--tls-cert-file", str(TLS / "localhost.pem"),
                 "--tls-key-file", str(TLS / "localhost.key"),
                 "--tls-ca-cert-file", str(TLS / "ca.pem"), "--tls-auth-clients", "no",
                 ) if self.tls else ("--port", str(self.port))
        self.process = subprocess.Popen(
            [binary, *ports, "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
             *(("--unixsocket", str(self.unix_socket)) if self.unix_socket else ())],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "redis-server exited at start"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if self.tls:
                        context = ssl.create_default_context(cafile=str(TLS / "ca.pem"))
                        s = context.wrap_socket(s, server_hostname="localhost")
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        self.process = None
