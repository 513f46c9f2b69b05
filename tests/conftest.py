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
