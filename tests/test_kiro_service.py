"""Today's Kiro service, end to end: every kind of account through the running
server, against the fake's 2026 rules (tests/fakes.py, "Today's service").

Each test drives the server with an official SDK and checks what reached the
fake Kiro (host, dialect, headers, profile ARN) and what the client got.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sqlite3
import sys

import aiohttp
import anthropic
import openai
import pytest
from anthropic.types import Message
from openai.types.chat import ChatCompletion

import convert
import fakes
import helpers
import kiro2api
from fakes import IDC_PROFILE_ARN, SERVICE_ARN, Status, Stream
from helpers import API_KEY, TLS, child_env, free_port, start_server_process

BODY = {"model": "claude-sonnet-4-5", "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hi"}]}
API_KEY_KIRO = "ksk_" + "k" * 40
IDP_ACCESS = "eyJ0eXAiOiJKV1QiLCJhbGciOi.entraAccessToken"


@pytest.fixture
def service(fake_upstream, proxy_config):
    """A config for today's hosts on the fake: runtime first, the legacy host second."""
    url = fake_upstream.url
    return dataclasses.replace(proxy_config, upstream=(f"{url}/runtime#runtime", f"{url}/q"))


def with_social(service, tmp_path, **changes):
    """``service`` with one social account (the IDE's token file) and ``changes``."""
    return dataclasses.replace(service, token_files=(account(tmp_path, "s", "social"),),
                               **changes)


async def start(aiohttp_server, config):
    server = await aiohttp_server(kiro2api.make_app(config))
    url = str(server.make_url("")).rstrip("/")
    return url, anthropic.AsyncAnthropic(base_url=url, api_key=API_KEY, max_retries=0)


async def health(url):
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/health", headers={"x-api-key": API_KEY}) as response:
            return (await response.json())["accounts"]


def generate_calls(fake):
    return [c for c in fake.requests if c.path.startswith(("/runtime/", "/q/"))]


def account(tmp_path, name, method, **overrides):
    path = tmp_path / name / "token.json"
    path.parent.mkdir()
    helpers.write_token(path, method=method, mode=0o600, **overrides)
    return path


async def ask(client):
    message = await client.messages.create(**BODY)
    assert isinstance(message, Message) and message.content[0].text == "Hello"
    return message


# Every kind of account ####################################################

async def test_social_account_uses_the_cli_dialect_on_runtime_with_its_arn(
        aiohttp_server, fake_upstream, service, tmp_path):
    config = with_social(service, tmp_path)
    _, client = await start(aiohttp_server, config)
    await ask(client)
    assert fake_upstream.dialects == [("runtime", "cli")]
    (call,) = generate_calls(fake_upstream)
    assert call.path == "/runtime/"
    assert call.headers["x-amz-target"] == (
        "AmazonCodeWhispererStreamingService.GenerateAssistantResponse")
    assert call.headers["Content-Type"] == "application/x-amz-json-1.0"
    assert "app/AmazonQ-For-CLI" in call.headers["User-Agent"]
    assert "TokenType" not in call.headers
    assert call.body["profileArn"] == helpers.PROFILE_ARN
    state = call.body["conversationState"]
    assert state["currentMessage"]["userInputMessage"]["origin"] == "KIRO_CLI"
    assert state["agentContinuationId"]


async def test_builder_id_carries_the_service_arn_on_runtime(
        aiohttp_server, fake_upstream, service, tmp_path):
    fake_upstream.kinds[helpers.IDC_ACCESS] = "builder_id"
    config = dataclasses.replace(service, token_files=(account(tmp_path, "b", "idc"),))
    url, client = await start(aiohttp_server, config)
    await ask(client)
    (call,) = generate_calls(fake_upstream)
    assert call.body["profileArn"] == SERVICE_ARN
    assert not fake_upstream.calls("/management/")  # nothing to look up
    (entry,) = await health(url)
    assert (entry["kind"], entry["shape"]) == ("builder_id", "cli")


async def test_builder_id_on_the_legacy_host_goes_without_an_arn(
        aiohttp_server, fake_upstream, service, tmp_path):
    fake_upstream.kinds[helpers.IDC_ACCESS] = "builder_id"
    config = dataclasses.replace(service, token_files=(account(tmp_path, "b", "idc"),),
                                 upstream=(fake_upstream.url + "/q",))
    _, client = await start(aiohttp_server, config)
    await ask(client)
    (call,) = generate_calls(fake_upstream)
    assert call.path == "/q/generateAssistantResponse" and "profileArn" not in call.body
    assert "KiroIDE-1." in call.headers["x-amz-user-agent"]
    assert call.headers["x-amzn-kiro-agent-mode"] == "vibe"


async def test_identity_center_looks_its_profile_up_once(
        aiohttp_server, fake_upstream, service, tmp_path):
    path = account(tmp_path, "i", "idc", provider="Enterprise",
                   startUrl="https://d-9067c98495.awsapps.com/start")
    fake_upstream.kinds[helpers.IDC_ACCESS] = "idc"
    config = dataclasses.replace(service, token_files=(path,))
    _, client = await start(aiohttp_server, config)
    await ask(client)
    await ask(client)
    lookups = fake_upstream.calls("/management/")
    assert [c.headers["x-amz-target"] for c in lookups] == [
        "AmazonCodeWhispererService.ListAvailableProfiles"]
    assert [c.body["profileArn"] for c in generate_calls(fake_upstream)] == [IDC_PROFILE_ARN] * 2


async def test_profiles_are_looked_up_on_a_legacy_host_when_management_is_down(
        aiohttp_server, fake_upstream, service, tmp_path):
    path = account(tmp_path, "i", "idc", provider="Enterprise",
                   startUrl="https://d-9067c98495.awsapps.com/start")
    fake_upstream.kinds[helpers.IDC_ACCESS] = "idc"
    config = dataclasses.replace(service, token_files=(path,),
                                 management_url=f"http://127.0.0.1:{free_port()}")
    _, client = await start(aiohttp_server, config)
    await ask(client)
    (lookup,) = fake_upstream.calls("/q/")
    assert lookup.headers["x-amz-target"] == "AmazonCodeWhispererService.ListAvailableProfiles"
    assert generate_calls(fake_upstream)[-1].body["profileArn"] == IDC_PROFILE_ARN


async def test_an_invalid_arn_in_the_file_is_looked_up_and_the_call_made_again(
        aiohttp_server, fake_upstream, service, tmp_path):
    stale = "arn:aws:codewhisperer:eu-central-1:610548660232:profile/OLDOLDOLD"
    path = account(tmp_path, "i", "idc", provider="Enterprise", profileArn=stale,
                   startUrl="https://d-9067c98495.awsapps.com/start")
    fake_upstream.kinds[helpers.IDC_ACCESS] = "idc"
    config = dataclasses.replace(service, token_files=(path,))
    _, client = await start(aiohttp_server, config)
    await ask(client)
    assert [c.body["profileArn"] for c in generate_calls(fake_upstream)] == [
        stale, IDC_PROFILE_ARN]
    await ask(client)  # the looked-up one from now on
    assert generate_calls(fake_upstream)[-1].body["profileArn"] == IDC_PROFILE_ARN


async def test_kiro_api_key_is_sent_as_an_api_key_and_never_logged(
        aiohttp_server, fake_upstream, service, caplog):
    caplog.set_level(logging.INFO)
    config = dataclasses.replace(service, token_files=(), kiro_api_keys=(API_KEY_KIRO,))
    url, client = await start(aiohttp_server, config)
    await ask(client)
    (call,) = generate_calls(fake_upstream)
    assert call.headers["Authorization"] == f"Bearer {API_KEY_KIRO}"
    assert call.headers["TokenType"] == "API_KEY" and "profileArn" not in call.body
    assert not fake_upstream.calls("/refreshToken") and not fake_upstream.calls("/token")
    (entry,) = await health(url)
    assert entry["kind"] == "api_key" and entry["state"] == "ok"
    everything = caplog.text + json.dumps(entry)
    assert API_KEY_KIRO not in everything and API_KEY_KIRO[:12] not in everything


async def test_external_idp_sends_its_token_type_and_finds_its_profile(
        aiohttp_server, fake_upstream, service, tmp_path):
    path = account(tmp_path, "e", "social", accessToken=IDP_ACCESS, authMethod="external_idp",
                   provider="ExternalIdp", profileArn=None, clientId="entra-client-id",
                   tokenEndpoint="https://login.microsoftonline.com/tenant/oauth2/v2.0/token",
                   region="eu-central-1")
    fake_upstream.kinds[IDP_ACCESS] = "external_idp"
    config = dataclasses.replace(service, token_files=(path,))
    url, client = await start(aiohttp_server, config)
    await ask(client)
    (lookup,) = fake_upstream.calls("/management/")
    assert lookup.headers["TokenType"] == "EXTERNAL_IDP"
    (call,) = generate_calls(fake_upstream)
    assert call.headers["TokenType"] == "EXTERNAL_IDP"
    assert call.body["profileArn"] == IDC_PROFILE_ARN
    (entry,) = await health(url)
    assert entry["kind"] == "external_idp"


def kiro_cli_store(path, expires_at):
    """kiro-cli's data.sqlite3 with a social login, its profile, and a row of its own."""
    row = {"access_token": "aoa-cli-access", "refresh_token": "aor-cli-refresh",
           "expires_at": expires_at, "provider": "Github", "kiro_cli_private": {"kept": True}}
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE auth_kv (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO auth_kv VALUES (?, ?)", ("kirocli:social:token", json.dumps(row)))
        db.execute("INSERT INTO auth_kv VALUES ('other:row', '{\"x\": 1}')")
        db.execute("INSERT INTO state VALUES (?, ?)", (
            "api.codewhisperer.profile", json.dumps({"arn": helpers.PROFILE_ARN})))
    path.chmod(0o600)
    return path


def kiro_cli_rows(path):
    with sqlite3.connect(path) as db:
        return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM auth_kv")}


async def test_kiro_cli_store_is_an_account_with_the_profile_kiro_cli_chose(
        aiohttp_server, fake_upstream, service, tmp_path):
    store = kiro_cli_store(tmp_path / "data.sqlite3", helpers.ide_time(3600))
    before = kiro_cli_rows(store)
    config = dataclasses.replace(service, token_files=(store,))
    _, client = await start(aiohttp_server, config)
    await ask(client)
    (call,) = generate_calls(fake_upstream)
    assert call.headers["Authorization"] == "Bearer aoa-cli-access"
    assert call.body["profileArn"] == helpers.PROFILE_ARN
    assert kiro_cli_rows(store) == before  # read only, not touched


async def test_kiro_cli_store_gets_the_refreshed_token_written_back_in_place(
        aiohttp_server, fake_upstream, service, tmp_path):
    store = kiro_cli_store(tmp_path / "data.sqlite3", "2020-01-01T00:00:00Z")
    config = dataclasses.replace(service, token_files=(store,))
    _, client = await start(aiohttp_server, config)
    await ask(client)
    (refresh,) = fake_upstream.calls("/refreshToken")
    assert refresh.body == {"refreshToken": "aor-cli-refresh"}
    (call,) = generate_calls(fake_upstream)
    assert call.headers["Authorization"] == "Bearer aoa-social-access-1"
    rows = kiro_cli_rows(store)
    written = rows["kirocli:social:token"]
    assert (written["access_token"], written["refresh_token"]) == (
        "aoa-social-access-1", "aor-social-refresh-1")
    assert written["kiro_cli_private"] == {"kept": True} and written["provider"] == "Github"
    assert kiro2api.parse_expires_at(written["expires_at"]) > kiro2api.utcnow()
    assert rows["other:row"] == {"x": 1}


async def test_a_kiro_cli_store_missing_at_start_is_read_once_kiro_cli_writes_it(
        aiohttp_server, fake_upstream, service, tmp_path):
    path = tmp_path / "data.sqlite3"
    config = dataclasses.replace(service, token_files=(path,), watch_interval=0.05)
    url, client = await start(aiohttp_server, config)
    (entry,) = await health(url)
    assert entry["state"] == "error"
    assert entry["error"] == (f"{path} does not exist; log in with kiro-cli first (kiro-cli "
                              f"login), or point --token-file (KIRO2API_TOKEN_FILE) at its store")
    # kiro-cli logs in; written beside and renamed, so the server never sees half of it.
    kiro_cli_store(tmp_path / "new.sqlite3", helpers.ide_time(3600)).rename(path)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while (entry := (await health(url))[0])["state"] != "ok":
        assert loop.time() < deadline, entry
        await asyncio.sleep(0.02)
    assert generate_calls(fake_upstream) == []  # no request needed
    await ask(client)
    (call,) = generate_calls(fake_upstream)
    assert call.headers["Authorization"] == "Bearer aoa-cli-access"


async def test_models_come_from_the_management_rpc_with_the_profile_arn(
        aiohttp_server, fake_upstream, service, tmp_path):
    fake_upstream.models_rpc = True
    config = with_social(service, tmp_path)
    url, _ = await start(aiohttp_server, config)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    ids = [model.id async for model in client.models.list()]
    assert "claude-opus-4.7" in ids and "qwen3-coder-next" in ids
    (call,) = fake_upstream.calls("/management/")
    assert call.headers["x-amz-target"] == "AmazonCodeWhispererService.ListAvailableModels"
    assert call.body == {"origin": "KIRO_CLI", "profileArn": helpers.PROFILE_ARN}
    assert not fake_upstream.calls("/ListAvailableModels")


async def test_models_of_an_account_without_an_arn_come_from_the_legacy_host(
        aiohttp_server, fake_upstream, service, tmp_path):
    fake_upstream.models_rpc = True
    fake_upstream.kinds[helpers.IDC_ACCESS] = "builder_id"
    config = dataclasses.replace(service, token_files=(account(tmp_path, "b", "idc"),))
    url, _ = await start(aiohttp_server, config)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    assert "claude-opus-4.7" in [model.id async for model in client.models.list()]
    assert not fake_upstream.calls("/management/")
    (call,) = fake_upstream.calls("/q/ListAvailableModels")
    assert call.headers["Authorization"] == f"Bearer {helpers.IDC_ACCESS}"


# Ways: fallback, stickiness ###############################################

async def test_a_refusing_host_falls_back_to_the_next_and_the_way_sticks(
        aiohttp_server, fake_upstream, service, tmp_path):
    fake_upstream.down["runtime"] = (403, fakes.NOT_AUTHORIZED)
    config = with_social(service, tmp_path)
    url, client = await start(aiohttp_server, config)
    await ask(client)
    assert fake_upstream.dialects == [("runtime", "cli"), ("runtime", "ide"), ("q", "ide")]
    await ask(client)
    assert fake_upstream.dialects[3:] == [("q", "ide")]  # straight to the way that worked
    (entry,) = await health(url)
    assert (entry["host"], entry["shape"], entry["state"]) == (
        fake_upstream.url + "/q", "ide", "ok")
    assert len(entry["refused"]) == 2
    assert all("not authorized" in why for why in entry["refused"].values())


async def test_a_body_problem_never_moves_to_another_host(
        aiohttp_server, fake_upstream, service, tmp_path):
    fake_upstream.script.append(Status(400, {"message": "Improperly formed request.",
                                             "reason": "REQUEST_BODY_INVALID"}))
    config = with_social(service, tmp_path)
    _, client = await start(aiohttp_server, config)
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.create(**BODY)
    assert fake_upstream.dialects == [("runtime", "cli")]


async def test_every_way_refused_answers_the_first_refusal(
        aiohttp_server, fake_upstream, service, tmp_path):
    fake_upstream.down["runtime"] = (403, fakes.NOT_AUTHORIZED)
    fake_upstream.down["q"] = (404, {"message": "no such thing"})
    config = with_social(service, tmp_path)
    _, client = await start(aiohttp_server, config)
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        await client.messages.create(**BODY)
    assert "not authorized" in caught.value.message
    assert len(fake_upstream.dialects) == 4


async def test_an_old_ide_version_is_refused_and_the_cli_dialect_serves(
        aiohttp_server, fake_upstream, service, tmp_path):
    config = with_social(service, tmp_path, upstream=(fake_upstream.url + "/q",),
                         kiro_version=convert.ClientVersions.parse("0.11.63"))
    _, client = await start(aiohttp_server, config)
    await ask(client)
    assert fake_upstream.dialects == [("q", "ide"), ("q", "cli")]


# When Kiro says no ########################################################

async def test_a_suspended_account_is_set_aside_and_the_next_one_serves(
        aiohttp_server, fake_upstream, service, tmp_path):
    first = account(tmp_path, "s", "social")
    second = account(tmp_path, "i", "idc")
    fake_upstream.suspended.add(helpers.SOCIAL_ACCESS)
    config = dataclasses.replace(service, token_files=(first, second))
    url, client = await start(aiohttp_server, config)
    await ask(client)
    await ask(client)
    tokens = [c.headers["Authorization"] for c in generate_calls(fake_upstream)]
    assert tokens == [f"Bearer {helpers.SOCIAL_ACCESS}"] + [f"Bearer {helpers.IDC_ACCESS}"] * 2
    suspended, other = await health(url)
    assert suspended["state"] == "suspended" and other["state"] == "ok"
    assert "suspended" in suspended["cooldown_reason"]
    assert suspended["cooldown_seconds"] > 11 * 3600


async def test_a_suspended_only_account_is_a_permission_error(
        aiohttp_server, fake_upstream, service, tmp_path):
    fake_upstream.suspended.add(helpers.SOCIAL_ACCESS)
    config = with_social(service, tmp_path)
    _, client = await start(aiohttp_server, config)
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        await client.messages.create(**BODY)
    assert "suspended" in caught.value.message
    assert len(fake_upstream.dialects) == 1  # a ban is not a reason to try other hosts


EXHAUSTED_USAGE = {**fakes.USAGE_LIMITS, "usageBreakdownList": [{
    "resourceType": "CREDIT", "currentUsageWithPrecision": 1000.0,
    "usageLimitWithPrecision": 1000}]}


async def test_a_429_with_the_credits_used_up_is_a_billing_error_until_the_reset(
        aiohttp_server, fake_upstream, service, tmp_path):
    fake_upstream.script.append(Status(429, {"message": "Too many requests, please wait "
                                                        "before trying again."}))
    fake_upstream.usage_reply = Status(200, EXHAUSTED_USAGE)
    config = with_social(service, tmp_path, retries=2)
    url, client = await start(aiohttp_server, config)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client.messages.create(**BODY)
    assert caught.value.status_code == 402
    assert caught.value.body["error"]["type"] == "billing_error"
    assert "used up (1000 of 1000)" in caught.value.message
    assert "2027-01-01" in caught.value.message  # nextDateReset 1798761600
    (usage,) = [c for c in fake_upstream.calls("/management/")
                if c.headers["x-amz-target"].endswith("GetUsageLimits")]
    assert usage.body["profileArn"] == helpers.PROFILE_ARN
    assert len(generate_calls(fake_upstream)) == 1  # no retry into a wall
    (entry,) = await health(url)
    assert entry["state"] == "exhausted"
    assert abs(entry["cooldown_seconds"] - (1798761600 - kiro2api.utcnow().timestamp())) < 60


async def test_a_429_with_credits_left_is_a_rate_limit(
        aiohttp_server, fake_upstream, service, tmp_path):
    fake_upstream.script.append(Status(429, {"message": "Too many requests"},
                                       headers={"Retry-After": "7"}))
    config = with_social(service, tmp_path)
    _, client = await start(aiohttp_server, config)
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.create(**BODY)
    assert caught.value.response.headers["Retry-After"] == "7"


async def test_monthly_limit_reached_is_a_billing_error(
        aiohttp_server, fake_upstream, service, tmp_path):
    fake_upstream.script.append(Status(402, fakes.EXHAUSTED))
    config = with_social(service, tmp_path)
    url, client = await start(aiohttp_server, config)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client.messages.create(**BODY)
    assert caught.value.status_code == 402
    (entry,) = await health(url)
    assert entry["state"] == "exhausted"


CAPACITY = Status(429, {"message": "I am experiencing high traffic, please try again shortly.",
                        "reason": "INSUFFICIENT_MODEL_CAPACITY"})


async def test_a_model_out_of_capacity_is_retried_then_overloaded(
        aiohttp_server, fake_upstream, service, tmp_path):
    fake_upstream.script.extend([CAPACITY] * 2)
    config = with_social(service, tmp_path, retries=1, retry_seconds=30.0)
    url, client = await start(aiohttp_server, config)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client.messages.create(**BODY)
    assert caught.value.status_code == 529
    assert caught.value.body["error"]["type"] == "overloaded_error"
    assert caught.value.response.headers["Retry-After"] == "10"
    assert len(generate_calls(fake_upstream)) == 2  # within the retry budget
    (entry,) = await health(url)
    assert entry["cooldown_seconds"] == 0  # the model is busy, not the account


async def test_a_model_out_of_capacity_is_a_503_for_openai_clients(
        aiohttp_server, fake_upstream, service, tmp_path):
    fake_upstream.script.append(Status(500, {"message": "Encountered unexpectedly high load",
                                             "reason": "MODEL_TEMPORARILY_UNAVAILABLE"}))
    config = with_social(service, tmp_path)
    url, _ = await start(aiohttp_server, config)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="claude-sonnet-4-5",
                                             messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.status_code == 503
    assert caught.value.response.headers["Retry-After"] == "10"
    assert "capacity" in caught.value.message


async def test_an_empty_stream_is_asked_again(aiohttp_server, fake_upstream, service, tmp_path):
    fake_upstream.script.extend([Stream([]), Stream([])])
    config = with_social(service, tmp_path)
    url, _ = await start(aiohttp_server, config)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    answer = await client.chat.completions.create(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "Hi"}])
    assert isinstance(answer, ChatCompletion) and answer.choices[0].message.content == "Hello"
    assert len(generate_calls(fake_upstream)) == 3


async def test_empty_streams_again_and_again_are_a_502(
        aiohttp_server, fake_upstream, service, tmp_path):
    fake_upstream.script.extend([Stream([])] * 3)
    config = with_social(service, tmp_path)
    url, _ = await start(aiohttp_server, config)
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/messages", json={**BODY, "stream": True},
                                headers={"x-api-key": API_KEY}) as response:
            assert response.status == 502
            body = await response.json()
    assert body["type"] == "error" and "empty stream" in body["error"]["message"]
    assert len(generate_calls(fake_upstream)) == 3


# External identity providers: the refresh goes to the organisation ########

def external_idp_file(tmp_path, endpoint, **overrides):
    return account(tmp_path, "e", "social", accessToken=IDP_ACCESS, refreshToken="idp-refresh-0",
                   authMethod="external_idp", provider="ExternalIdp", profileArn=None,
                   clientId="entra-client-id", tokenEndpoint=endpoint,
                   scopes=["api://kiro/.default", "offline_access"],
                   expiresAt="2020-01-01T00:00:00.000Z", kiroPrivate="kept", **overrides)


async def test_an_unlisted_identity_provider_never_gets_the_refresh_token(
        aiohttp_server, fake_upstream, service, tmp_path):
    path = external_idp_file(tmp_path, "https://login.example.com/tenant/oauth2/v2.0/token")
    config = dataclasses.replace(service, token_files=(path,))
    _, client = await start(aiohttp_server, config)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        await client.messages.create(**BODY)
    assert "--allow-idp-host login.example.com" in caught.value.message
    assert fake_upstream.requests == []


@pytest.mark.slow  # a server process, as it must trust the test CA from its start
async def test_external_idp_refreshes_at_its_https_token_endpoint(tmp_path):
    import ssl

    fake = fakes.FakeUpstream()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(TLS / "localhost.pem", TLS / "localhost.key")
    runner = aiohttp.web.AppRunner(fake.app())
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "localhost", 0, ssl_context=context)
    await site.start()
    url = f"https://localhost:{runner.addresses[0][1]}"
    path = external_idp_file(tmp_path, f"{url}/tenant/oauth2/v2.0/token")
    port = free_port()
    process = await start_server_process(
        [sys.executable, kiro2api.__file__, "server", "--port", str(port),
         "--api-key", API_KEY, "--token-file", str(path), "--upstream", f"{url}/runtime#runtime",
         "--management-url", f"{url}/management", "--allow-idp-host", "localhost"], port,
        env={**child_env(), "SSL_CERT_FILE": str(TLS / "ca.pem")})
    try:
        client = anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{port}", api_key=API_KEY,
                                          max_retries=0)
        await ask(client)
    finally:
        process.terminate()
        await process.wait()
        await runner.cleanup()
    (refresh,) = fake.calls("/tenant/oauth2/v2.0/token")
    assert refresh.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert refresh.body == {"client_id": "entra-client-id", "grant_type": "refresh_token",
                            "refresh_token": "idp-refresh-0",
                            "scope": "api://kiro/.default offline_access"}
    (call,) = generate_calls(fake)
    assert call.headers["Authorization"] == "Bearer eyJ-idp-access-1"
    assert call.headers["TokenType"] == "EXTERNAL_IDP"
    written = json.loads(path.read_text())
    assert (written["accessToken"], written["refreshToken"]) == (
        "eyJ-idp-access-1", "idp-refresh-1")
    assert written["kiroPrivate"] == "kept" and written["tokenEndpoint"].startswith(url)
