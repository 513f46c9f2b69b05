"""Security and token safety: who may use the server, what it never reveals, what it
writes, and what a dead refresh token or a killed process leaves behind."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import signal
import stat
import sys
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

import fakes
import helpers
import kiro2api
from fakes import Status, Stream
from helpers import API_KEY, free_port, start_server_process

ROOT = Path(__file__).resolve().parents[1]
BODY = {"model": "claude-sonnet-4-5", "max_tokens": 10,
        "messages": [{"role": "user", "content": "Hi"}]}


# --no-auth ################################################################


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.com", "[::]"])
def test_no_auth_is_refused_on_a_host_others_can_reach(monkeypatch, host):
    monkeypatch.setattr(kiro2api, "serve", lambda config: pytest.fail("served"))
    result = CliRunner().invoke(kiro2api.cli, ["server", "--no-auth", "--host", host])
    assert result.exit_code == 2, result.output
    assert "--no-auth" in result.output and "loopback" in result.output


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"])
def test_no_auth_is_allowed_on_loopback(monkeypatch, host):
    seen = []
    monkeypatch.setattr(kiro2api, "serve", seen.append)
    result = CliRunner().invoke(kiro2api.cli, ["server", "--no-auth", "--host", host])
    assert result.exit_code == 0, result.output
    assert seen[0].no_auth and seen[0].api_key is None


def test_no_auth_with_the_host_from_the_environment_is_refused_too(monkeypatch):
    monkeypatch.setattr(kiro2api, "serve", lambda config: pytest.fail("served"))
    monkeypatch.setenv("KIRO2API_HOST", "0.0.0.0")
    result = CliRunner().invoke(kiro2api.cli, ["server", "--no-auth"])
    assert result.exit_code == 2, result.output


def test_keys_are_compared_whatever_their_length_or_bytes():
    assert kiro2api.same_secret("k" * 40, "k" * 40)
    for wrong in ("", "k", "k" * 39, "k" * 41, "K" * 40, "k" * 39 + "\udcff", "é" * 40):
        assert not kiro2api.same_secret(wrong, "k" * 40)
    assert kiro2api.same_secret("\udcff\udcfe", "\udcff\udcfe")  # escaped non-UTF-8 bytes


# What a caller without the key sees #######################################


async def get(url, path, headers=None):
    async with aiohttp.ClientSession() as session:
        async with session.get(url + path, headers=headers or {}) as response:
            return response.status, await response.text()


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"},
                                     {"Authorization": f"Basic {API_KEY}"}],
                         ids=["none", "wrong", "basic"])
async def test_health_without_the_key_tells_liveness_only(proxy, headers):
    status, text = await get(proxy.url, "/health", headers)
    assert status == 200
    assert json.loads(text) == {"status": "ok", "version": kiro2api.__version__}
    token_file = proxy.config.token_files[0]
    assert token_file.name not in text and "Github" not in text and "us-east-1" not in text


@pytest.mark.parametrize("headers", [{"x-api-key": API_KEY},
                                     {"Authorization": f"Bearer {API_KEY}"}],
                         ids=["x-api-key", "bearer"])
async def test_health_with_the_key_shows_the_accounts(proxy, headers):
    status, text = await get(proxy.url, "/health", headers)
    assert status == 200
    body = json.loads(text)
    assert body["status"] == "ok" and body["uptime_seconds"] >= 0
    (account,) = body["accounts"]
    assert account["path"] == str(proxy.config.token_files[0])
    assert account["provider"] == "Github" and account["state"] == "ok"


async def test_metrics_need_the_key_and_a_refused_scrape_is_logged(proxy, caplog):
    caplog.set_level(logging.INFO, logger="kiro2api")
    status, text = await get(proxy.url, "/metrics")
    assert status == 401
    assert json.loads(text)["error"]["type"] == "authentication_error"
    assert str(proxy.config.token_files[0]) not in text
    (line,) = [r.fields for r in caplog.records if hasattr(r, "fields")]
    assert line["route"] == "/metrics" and line["status"] == 401
    status, text = await get(proxy.url, "/metrics", {"Authorization": f"Bearer {API_KEY}"})
    assert status == 200
    assert f'kiro2api_account_up{{account="{proxy.config.token_files[0]}"}} 1' in text
    assert len([r for r in caplog.records if hasattr(r, "fields")]) == 1  # scrapes are quiet


async def test_with_no_key_configured_the_kiro_access_token_opens_the_details(
        aiohttp_server, proxy_config):
    config = dataclasses.replace(proxy_config, api_key=None)
    server = await aiohttp_server(kiro2api.make_app(config))
    url = str(server.make_url("")).rstrip("/")
    access = {"Authorization": f"Bearer {helpers.INITIAL_TOKENS['accessToken']}"}
    for headers in ({}, {"x-api-key": API_KEY}):
        assert json.loads((await get(url, "/health", headers))[1]) == {
            "status": "ok", "version": kiro2api.__version__}
        assert (await get(url, "/metrics", headers))[0] == 401
    status, text = await get(url, "/health", access)
    assert status == 200 and len(json.loads(text)["accounts"]) == 1
    assert (await get(url, "/metrics", access))[0] == 200


async def test_no_auth_leaves_health_and_metrics_open(aiohttp_server, proxy_config):
    config = dataclasses.replace(proxy_config, api_key=None, no_auth=True)
    server = await aiohttp_server(kiro2api.make_app(config))
    url = str(server.make_url("")).rstrip("/")
    status, text = await get(url, "/health")
    assert status == 200 and len(json.loads(text)["accounts"]) == 1
    assert (await get(url, "/metrics"))[0] == 200


# An account whose refresh token is dead ###################################


@pytest.fixture
async def dead_account(aiohttp_server, fake_upstream, proxy_config):
    """kiro2api in front of an account whose token expired and whose refresh token
    the auth service refuses for good."""
    helpers.write_token(proxy_config.token_files[0], expires_in=-60)
    fake_upstream.auth_script.append(Status(400, {"error": "invalid_grant",
                                                  "error_description": "Invalid refresh token"}))
    server = await aiohttp_server(kiro2api.make_app(proxy_config))
    return str(server.make_url("")).rstrip("/")


@pytest.mark.parametrize("route", ["/v1/messages", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_dead_refresh_token_is_a_clear_401_on_every_route(dead_account, fake_upstream,
                                                                  proxy_config, route, stream):
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # the second request is refused without asking again
            async with session.post(dead_account + route, json={**BODY, "stream": stream},
                                    headers={"x-api-key": API_KEY}) as response:
                assert response.status == 401
                body = await response.json()
            error = body["error"]
            assert error["type"] == "authentication_error"
            assert str(proxy_config.token_files[0]) in error["message"]
            assert "log in to Kiro again" in error["message"]
        async with session.get(dead_account + "/health",
                               headers={"x-api-key": API_KEY}) as response:
            health = await response.json()
    assert len(fake_upstream.calls("/refreshToken")) == 1
    assert fake_upstream.calls("/generateAssistantResponse") == []
    assert health["status"] == "degraded"
    (account,) = health["accounts"]
    assert account["path"] == str(proxy_config.token_files[0])
    assert account["state"] == "error" and "log in to Kiro again" in account["error"]


# Secrets in logs and error bodies #########################################

KEY = "k2a-client-key-5f1e0c9b7a3d"
WRONG_KEY = "k2a-wrong-key-0a9b8c7d6e5f"
ACCESS = "aoa-SECRET-ACCESS-TOKEN-3c2b1a09f8e7d6c5b4a3"
REFRESH = "aor-SECRET-REFRESH-TOKEN-9e8d7c6b5a4f3e2d1c0b"
PROMPT = "PROMPT-TEXT-quartz-lantern-4711"


async def run_server(fake, token_file: Path, level: str, *, umask: int = 0o022):
    port = free_port()
    process = await start_server_process(
        [sys.executable, str(ROOT / "kiro2api.py"), "server", "--port", str(port),
         "--api-key", KEY, "--token-file", str(token_file), "--upstream", fake.url,
         "--social-auth-url", fake.url, "--oidc-url", fake.url, "--log-level", level,
         "--retries", "1", "--retry-seconds", "5"], port,
        env={k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")},
        preexec_fn=lambda: os.umask(umask))
    return process, f"http://127.0.0.1:{port}"


async def full_cycles(url: str, fake) -> list[str]:
    """Requests through every path that handles a secret; the answers' bodies."""
    prompt_body = {"model": "claude-sonnet-4-5", "max_tokens": 50, "system": PROMPT,
                   "messages": [{"role": "user", "content": PROMPT}]}
    invalid = {"message": "The bearer token included in the request is invalid."}
    fake.script.extend([
        Stream(fakes.text("Hello") + fakes.tail()),  # streamed, after the refresh
        Status(403, invalid), Stream(fakes.text("again") + fakes.tail()),  # refresh, retry
        Status(503, {"message": "busy"}, {"Retry-After": "0"}),  # retried
        Stream(fakes.text("ok") + fakes.tail()),
        Status(400, {"message": "Improperly formed request."}),
        Stream(fakes.text("cut") + [fakes.exception("ThrottlingException", "slow")]),
    ])
    requests = [
        ("/v1/messages", {**prompt_body, "stream": True}, KEY),
        ("/v1/chat/completions", {"model": "claude-sonnet-4-5",
                                  "messages": [{"role": "system", "content": PROMPT},
                                               {"role": "user", "content": PROMPT}]}, KEY),
        ("/v1/messages", prompt_body, KEY),
        ("/v1/messages", prompt_body, KEY),  # upstream 400
        ("/v1/chat/completions", {"model": "claude-sonnet-4-5", "stream": True,
                                  "messages": [{"role": "user", "content": PROMPT}]}, KEY),
        ("/v1/messages", prompt_body, WRONG_KEY),
        ("/v1/messages", {"model": "claude-sonnet-4-5", "messages": [
            {"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "x"}]}]},
         KEY),
        ("/v1/chat/completions", {"model": "claude-sonnet-4-5", "messages": [
            {"role": "user", "content": PROMPT}], "tools": PROMPT}, KEY),
        ("/v1/messages/count_tokens", prompt_body, KEY),
    ]
    bodies = []
    async with aiohttp.ClientSession() as session:
        for path, body, key in requests:
            async with session.post(url + path, json=body, headers={
                    "Authorization": f"Bearer {key}"}) as response:
                bodies.append(f"{response.status} {await response.text()}")
        for path in ("/health", "/metrics", "/v1/models"):
            async with session.get(url + path, headers={"x-api-key": KEY}) as response:
                bodies.append(await response.text())
    return bodies


def secrets(fake) -> list[str]:
    issued = [f"aoa-social-access-{n}" for n in range(1, fake.refreshes + 1)]
    issued += [f"aor-social-refresh-{n}" for n in range(1, fake.refreshes + 1)]
    return [KEY, WRONG_KEY, ACCESS, REFRESH, *issued]


@pytest.mark.parametrize("level", ["DEBUG", "INFO"])
@pytest.mark.slow  # a server process
async def test_no_secret_in_the_log_or_any_answer_and_every_file_0600(fake_upstream, tmp_path,
                                                                      level):
    (tmp_path / "cache").mkdir()
    token_file = tmp_path / "cache" / "kiro-auth-token.json"
    helpers.write_token(token_file, expires_in=60, accessToken=ACCESS, refreshToken=REFRESH,
                        mode=0o644)  # due for a refresh; readable by all, as some tools leave it
    process, url = await run_server(fake_upstream, token_file, level, umask=0)
    try:
        bodies = await full_cycles(url, fake_upstream)
    finally:
        process.send_signal(signal.SIGTERM)
        log = (await asyncio.wait_for(process.stdout.read(), 30)).decode()
        await process.wait()
    assert fake_upstream.refreshes == 2  # due at start, then a rejected token
    assert len(fake_upstream.calls("/generateAssistantResponse")) == 7
    if level == "DEBUG":
        assert "DEBUG" in log
    assert "refreshed" in log and "status=401" in log and "status=200" in log
    for secret in secrets(fake_upstream):
        assert secret not in log, f"{secret} in the {level} log"
        for body in bodies:
            assert secret not in body, f"{secret} in {body[:300]}"
    assert PROMPT not in log
    for body in bodies:
        assert PROMPT not in body, body[:300]
    written = {p.name: stat.S_IMODE(p.stat().st_mode) for p in token_file.parent.iterdir()}
    assert written == {token_file.name: 0o600, token_file.name + ".lock": 0o600}


# A process killed while it refreshes ######################################

REFRESH_LOOP = """
import asyncio, sys
from pathlib import Path
import aiohttp
sys.path.insert(0, sys.argv[1])
import kiro2api

async def main():
    path, url = Path(sys.argv[2]), sys.argv[3]
    config = kiro2api.Config(token_files=(path,), social_auth_url=url, oidc_url=url,
                             environment_proxies={})
    async with aiohttp.ClientSession() as session:
        store = kiro2api.TokenStore(path, config=config, session=session)
        while True:
            await store.refresh()
            print(store.refreshes, flush=True)

asyncio.run(main())
"""
KILLS = 12


@pytest.mark.slow  # processes, killed
async def test_sigkill_at_any_moment_of_a_refresh_leaves_the_old_or_the_new_tokens(
        fake_upstream, tmp_path):
    (tmp_path / "cache").mkdir()
    token_file = tmp_path / "cache" / "kiro-auth-token.json"
    helpers.write_token(token_file, mode=0o600)
    rng = random.Random(11)
    pairs = {(helpers.SOCIAL_ACCESS, helpers.SOCIAL_REFRESH)}
    for _ in range(KILLS):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", REFRESH_LOOP, str(ROOT), str(token_file), fake_upstream.url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await asyncio.wait_for(process.stdout.readline(), 30)  # refreshing in a loop now
        await asyncio.sleep(rng.uniform(0, 0.2))
        process.kill()
        await process.wait()
        data = json.loads(token_file.read_text())  # parses: never a half-written file
        pair = (data["accessToken"], data["refreshToken"])
        assert pair in pairs or pair[0].removeprefix("aoa-social-access-") == \
            pair[1].removeprefix("aor-social-refresh-"), pair  # a token and its own refresh token
        pairs.add(pair)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        kiro2api.read_token_file(token_file)
    assert fake_upstream.refreshes >= KILLS  # every process refreshed at least once
    # What a killed writer left (a temporary file holds tokens) goes with the next refresh.
    async with aiohttp.ClientSession() as session:
        config = kiro2api.Config(token_files=(token_file,), social_auth_url=fake_upstream.url,
                                 environment_proxies={})
        await kiro2api.TokenStore(token_file, config=config, session=session).refresh()
    assert sorted(p.name for p in token_file.parent.iterdir()) == [token_file.name,
                                                          token_file.name + ".lock"]


def test_proxy_credentials_never_reach_a_message():
    # aiohttp's proxy errors quote the proxy's URL, password and all; every
    # message built from a client error goes through describe().
    error = Exception("407, message='Proxy Authentication Required', "
                      "url='http://alice:S3CRET-PW@proxy.internal:3128'")
    assert kiro2api.describe(error) == (
        "407, message='Proxy Authentication Required', url='http://***@proxy.internal:3128'")
    assert kiro2api.describe(Exception()) == "Exception"
