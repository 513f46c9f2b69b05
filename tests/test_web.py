"""The HTTP surface, against the real application."""

from __future__ import annotations

import pytest

import kiro2api


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    config = kiro2api.Config(token_files=(tmp_path / "token.json",))
    return await aiohttp_client(kiro2api.make_app(config))


async def test_health_reports_version(client):
    response = await client.get("/health")
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "ok"
    assert body["version"] == kiro2api.__version__


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_root_answers_probes(client, method):
    response = await client.request(method, "/")
    assert response.status == 200
