"""Shared fixtures: an isolated environment for every test (helpers are in helpers.py)."""

from __future__ import annotations

import pytest

from helpers import API_KEY, Proxy, write_token_file

_ENV_PREFIXES = ("KIRO2API_", "ANTHROPIC_", "OPENAI_", "CODEX_")
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
        management_url=fake_upstream.url + "/management",
        ping_interval=30.0,
        retries=0,  # the retry tests turn them on
    )


@pytest.fixture
async def proxy(aiohttp_server, fake_upstream, proxy_config):
    """kiro2api serving on 127.0.0.1, talking to the fake upstream."""
    import kiro2api

    server = await aiohttp_server(kiro2api.make_app(proxy_config))
    return Proxy(str(server.make_url("")).rstrip("/"), fake_upstream, proxy_config)


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server for this test (``.url``), stopped by PID afterwards."""
    from helpers import RedisServer

    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir).start()
    yield server
    server.stop()
