"""The HTTP surface, against the real application."""

from __future__ import annotations

import pytest

import kiro2api
from helpers import API_KEY, write_token_file


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    config = kiro2api.Config(token_files=(write_token_file(tmp_path / "token.json"),))
    return await aiohttp_client(kiro2api.make_app(config))


async def test_health_reports_version(client):
    response = await client.get("/health")
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "ok"
    assert body["version"] == kiro2api.__version__


async def test_health_is_degraded_when_no_account_is_usable(aiohttp_client, tmp_path):
    config = kiro2api.Config(token_files=(tmp_path / "missing.json",), api_key=API_KEY)
    client = await aiohttp_client(kiro2api.make_app(config))
    body = await (await client.get("/health", headers={"x-api-key": API_KEY})).json()
    assert body["status"] == "degraded"
    assert body["accounts"][0]["state"] == "error"
    assert "does not exist" in body["accounts"][0]["error"]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_root_answers_probes(client, method):
    response = await client.request(method, "/")
    assert response.status == 200


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_api_hello_answers_without_a_key(aiohttp_client, tmp_path, method):
    config = kiro2api.Config(token_files=(tmp_path / "t.json",), api_key="k")
    client = await aiohttp_client(kiro2api.make_app(config))
    response = await client.request(method, "/api/hello")
    assert response.status == 200
    if method == "GET":
        assert (await response.json())["name"] == "kiro2api"
