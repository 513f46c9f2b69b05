"""Shared fixtures: an isolated environment for every test."""

from __future__ import annotations

import pytest

_ENV_PREFIXES = ("KIRO2API_", "ANTHROPIC_", "OPENAI_")
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No test sees the developer's home, tokens, keys or proxies."""
    import os

    for name in list(os.environ):
        if name.startswith(_ENV_PREFIXES) or name.upper() in _PROXY_VARS:
            monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    return home


@pytest.fixture
async def fake_upstream(aiohttp_server):
    """A running fake Kiro backend; ``fake_upstream.url`` is its base URL."""
    from fakes import FakeUpstream

    fake = FakeUpstream()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


API_KEY = "test-client-key"


def write_token_file(path, **overrides):
    """A social-login token file, valid for an hour unless overridden."""
    import datetime
    import json

    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    data = {
        "accessToken": "aoa-initial-access",
        "refreshToken": "aor-initial-refresh",
        "expiresAt": expires.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "authMethod": "social",
        "provider": "Github",
        "profileArn": "arn:aws:codewhisperer:us-east-1:111122223333:profile/FAKE",
    }
    data.update(overrides)
    path.write_text(json.dumps(data, indent=2))
    path.chmod(0o600)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_server_process(command, port, **popen):
    """Start ``command`` (a kiro2api server on ``port``) and wait until /health answers.

    ``popen`` goes to ``asyncio.create_subprocess_exec``; by default the output
    goes to a pipe on ``stdout``. If the server exits or stays silent for about
    ten seconds, the test fails with what it printed.
    """
    import asyncio

    import aiohttp

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


@pytest.fixture
def proxy_config(fake_upstream, tmp_path):
    import kiro2api

    token_file = write_token_file(tmp_path / "kiro-auth-token.json")
    return kiro2api.Config(
        api_key=API_KEY,
        token_files=(token_file,),
        upstream=fake_upstream.url,
        social_auth_url=fake_upstream.url,
        oidc_url=fake_upstream.url,
        ping_interval=30.0,
        retries=0,  # the retry tests turn them on
    )


@pytest.fixture
async def proxy(aiohttp_server, fake_upstream, proxy_config):
    """kiro2api serving on 127.0.0.1, talking to the fake upstream."""
    import kiro2api

    server = await aiohttp_server(kiro2api.make_app(proxy_config))
    return Proxy(str(server.make_url("")).rstrip("/"), fake_upstream, proxy_config)
