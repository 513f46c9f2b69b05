"""Several --token-file accounts: first healthy one serves, failover, cooldown."""

from __future__ import annotations

import dataclasses

import aiohttp
import anthropic
import pytest

import helpers
import kiro2api
from fakes import Status
from helpers import API_KEY

BODY = {"model": "claude-sonnet-4-5", "max_tokens": 10,
        "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
async def pool(aiohttp_server, fake_upstream, proxy_config, tmp_path):
    """Two accounts: a social one (first) and an IdC one."""
    social, idc = tmp_path / "social" / "token.json", tmp_path / "idc" / "token.json"
    social.parent.mkdir()
    idc.parent.mkdir()
    helpers.write_token(social, method="social")
    helpers.write_token(idc, method="idc")
    config = dataclasses.replace(proxy_config, token_files=(social, idc))
    server = await aiohttp_server(kiro2api.make_app(config))
    url = str(server.make_url("")).rstrip("/")
    client = anthropic.AsyncAnthropic(base_url=url, api_key=API_KEY, max_retries=0)
    return client, url


def tokens(fake):
    return [c.headers["Authorization"].removeprefix("Bearer ")
            for c in fake.calls("/generateAssistantResponse")]


async def health(url):
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/health", headers={"x-api-key": API_KEY}) as response:
            return await response.json()


async def test_requests_stick_to_the_first_healthy_account(pool, fake_upstream):
    client, _ = pool
    for _ in range(3):
        await client.messages.create(**BODY)
    assert tokens(fake_upstream) == [helpers.SOCIAL_ACCESS] * 3


@pytest.mark.parametrize(("refusal", "reason"), [
    (Status(429, {"message": "Too many requests"}), "rate limiting"),
    (Status(402, {"message": "quota", "reason": "MONTHLY_REQUEST_COUNT"}), "out of quota"),
    (Status(403, {"message": "suspended", "reason": "TEMPORARILY_SUSPENDED"}), "refused"),
], ids=["throttled", "quota", "suspended"])
async def test_refused_account_fails_over_and_cools_down(pool, fake_upstream, refusal, reason):
    client, url = pool
    fake_upstream.script.append(refusal)
    message = await client.messages.create(**BODY)
    assert message.content[0].text == "Hello"
    assert tokens(fake_upstream) == [helpers.SOCIAL_ACCESS, helpers.IDC_ACCESS]
    await client.messages.create(**BODY)  # the refused account rests
    assert tokens(fake_upstream)[-1] == helpers.IDC_ACCESS
    first = (await health(url))["accounts"][0]
    assert first["cooldown_seconds"] > 0 and reason in first["cooldown_reason"]


async def test_unrefreshable_account_fails_over(aiohttp_server, fake_upstream, proxy_config,
                                               tmp_path):
    social, idc = tmp_path / "social.json", tmp_path / "idc" / "token.json"
    idc.parent.mkdir()
    helpers.write_token(social, method="social", expires_in=-60)
    helpers.write_token(idc, method="idc")
    fake_upstream.auth_script.append(Status(400, {"error": "invalid_grant"}))
    config = dataclasses.replace(proxy_config, token_files=(social, idc))
    server = await aiohttp_server(kiro2api.make_app(config))
    url = str(server.make_url("")).rstrip("/")
    client = anthropic.AsyncAnthropic(base_url=url, api_key=API_KEY, max_retries=0)
    message = await client.messages.create(**BODY)
    assert message.content[0].text == "Hello"
    assert tokens(fake_upstream) == [helpers.IDC_ACCESS]
    first = (await health(url))["accounts"][0]
    assert first["state"] == "error" and "log in to Kiro again" in first["error"]


async def test_when_every_account_is_refused_the_last_error_reaches_the_client(
        pool, fake_upstream):
    client, _ = pool
    fake_upstream.script.extend([Status(429, {"message": "slow down"}),
                                 Status(429, {"message": "slow down too"})])
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.create(**BODY)
    assert "slow down too" in caught.value.body["error"]["message"]


async def test_failover_is_logged_and_metrics_show_each_account(pool, fake_upstream, caplog):
    import logging

    from test_observability import parse_metrics

    caplog.set_level(logging.INFO, logger="kiro2api")
    client, url = pool
    fake_upstream.script.append(Status(429, {"message": "Too many requests"}))
    response = await client.messages.with_raw_response.create(**BODY)
    request_id = response.headers["request-id"]
    (set_aside,) = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert "social" in set_aside and "Too many requests" in set_aside
    (line,) = [r.fields for r in caplog.records
               if getattr(r, "fields", {}).get("request_id") == request_id]
    assert line["failovers"] == 1 and line["account"] == "token.json" and line["status"] == 200
    async with aiohttp.ClientSession(headers={"x-api-key": API_KEY}) as session, \
            session.get(url + "/metrics") as answer:
        samples = parse_metrics(await answer.text())
    first, second = (f'account="{a["path"]}"' for a in (await health(url))["accounts"])
    assert "social" in first and "idc" in second
    assert samples[("kiro2api_account_failovers_total", "")] == 1
    assert samples[("kiro2api_account_up", first)] == 0  # cooling down
    assert samples[("kiro2api_account_up", second)] == 1
    assert all(secret not in r.getMessage() for r in caplog.records
               for secret in (helpers.SOCIAL_ACCESS, helpers.IDC_ACCESS, helpers.SOCIAL_REFRESH))


async def test_models_come_from_the_next_account_when_the_first_cannot_list_them(
        pool, fake_upstream):
    client, _ = pool
    fake_upstream.models_script.append(Status(500, {"message": "boom"}))
    ids = [model.id for model in (await client.models.list()).data]
    assert "claude-opus-4-7" in ids  # the account's list (the fake offers Opus 4.7) ...
    assert "claude-haiku-4-5" not in ids  # ... not the built-in one
    calls = fake_upstream.calls("/ListAvailableModels")
    assert [c.headers["Authorization"] for c in calls] == [
        f"Bearer {helpers.SOCIAL_ACCESS}", f"Bearer {helpers.IDC_ACCESS}"]


async def test_models_are_those_of_every_account(pool, fake_upstream):
    client, _ = pool
    fake_upstream.models_script.extend([
        Status(200, {"models": [{"modelId": "claude-opus-5"}, {"modelId": "glm-5"}]}),
        Status(200, {"models": [{"modelId": "glm-5"}, {"modelId": "gpt-5.6-sol"}]})])
    ids = [model.id for model in (await client.models.list()).data]
    assert ids == ["claude-opus-5", "glm-5", "gpt-5.6-sol"]
