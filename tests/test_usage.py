"""Usage limits at a glance: ``kiro2api usage``, ``GET /v1/usage`` and the JSON the
status page reads (``GET /v1/status``), against the fake's GetUsageLimits for every
kind of account and for one whose usage Kiro will not give."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import aiohttp
import pytest
from click.testing import CliRunner

import convert
import fakes
import helpers
import kiro2api
from fakes import FakeClock, Status
from helpers import API_KEY

API_KEY_KIRO = "ksk_" + "u" * 40
IDP_ACCESS = "eyJ0eXAiOiJKV1QiLCJhbGciOi.usageIdpToken"
IDC_ACCESS = "aoa-usage-identity-center"
BROKEN_ACCESS = "aoa-usage-broken"
RESET = 1798761600  # fakes.USAGE_LIMITS' nextDateReset: 2027-01-01 00:00 UTC
TRIAL_END = 1793491200  # 2026-11-01 00:00 UTC


def limits(plan, used, limit, **row):
    """A GetUsageLimits answer of ``plan`` with ``used`` of ``limit`` credits."""
    overage = row.pop("overage", "DISABLED")
    return {**fakes.USAGE_LIMITS, "subscriptionInfo": {"subscriptionTitle": plan},
            "overageConfiguration": {"overageStatus": overage},
            "usageBreakdownList": [{"resourceType": "CREDIT", "currentUsage": int(used),
                                    "currentUsageWithPrecision": used,
                                    "usageLimitWithPrecision": limit, **row}]}


FREE_NEAR_LIMIT = limits("KIRO FREE", 46.0, 50, freeTrialInfo={
    "freeTrialStatus": "ACTIVE", "usageLimitWithPrecision": 500.0,
    "currentUsageWithPrecision": 10.5, "freeTrialExpiry": TRIAL_END})
PRO_PLUS_WITH_BONUS = limits("KIRO PRO+", 300.25, 2000, bonuses=[{
    "bonusCode": "WELCOME", "displayName": "Welcome bonus", "status": "ACTIVE",
    "currentUsage": 0, "usageLimit": 100, "expiresAt": "2026-12-01T00:00:00Z"}])
POWER_IN_OVERAGE = limits("KIRO POWER", 10000.0, 10000, overage="ENABLED",
                          currentOveragesWithPrecision=125.5)


def account(tmp_path, name, method, **overrides):
    path = tmp_path / name / "token.json"
    path.parent.mkdir()
    helpers.write_token(path, method=method, mode=0o600, **overrides)
    return path


@pytest.fixture
def pool(fake_upstream, tmp_path):
    """One account of every kind, each with its own GetUsageLimits answer, and one
    (``broken``) that Kiro refuses its usage limits: token files, then the API key."""
    fake = fake_upstream
    fake.kinds.update({helpers.IDC_ACCESS: "builder_id", IDC_ACCESS: "idc",
                       IDP_ACCESS: "external_idp"})
    fake.usage_replies.update({
        helpers.IDC_ACCESS: Status(200, FREE_NEAR_LIMIT),
        IDC_ACCESS: Status(200, PRO_PLUS_WITH_BONUS),
        API_KEY_KIRO: Status(200, POWER_IN_OVERAGE),
        BROKEN_ACCESS: Status(403, {"message": "User is not authorized to make this call."}),
    })
    files = {
        "social": account(tmp_path, "social", "social"),
        "builder": account(tmp_path, "builder", "idc"),
        "idc": account(tmp_path, "idc", "idc", accessToken=IDC_ACCESS, provider="Enterprise",
                       startUrl="https://d-9067c98495.awsapps.com/start",
                       profileArn=fakes.IDC_PROFILE_ARN),
        "idp": account(tmp_path, "idp", "social", accessToken=IDP_ACCESS,
                       authMethod="external_idp", provider="ExternalIdp", profileArn=None,
                       clientId="entra-client-id", region="eu-central-1",
                       tokenEndpoint="https://login.microsoftonline.com/t/oauth2/v2.0/token"),
        "broken": account(tmp_path, "broken", "social", accessToken=BROKEN_ACCESS),
    }
    return files


def usage_calls(fake):
    return [c for c in fake.requests
            if c.headers.get("x-amz-target", "").endswith("GetUsageLimits")]


# kiro2api usage ###########################################################


def service_args(fake):
    url = fake.url
    return ["--upstream", f"{url}/runtime#runtime", "--upstream", f"{url}/q",
            "--management-url", f"{url}/management", "--social-auth-url", url,
            "--oidc-url", url]


async def run_usage(fake, *args):
    """``kiro2api usage`` in-process (in a thread: the fake serves on this loop)."""
    return await asyncio.to_thread(CliRunner().invoke, kiro2api.cli,
                                   ["usage", *service_args(fake), *args])


def file_args(*paths):
    return [arg for path in paths for arg in ("--token-file", str(path))]


async def test_usage_shows_every_kind_of_account_and_the_one_that_failed(fake_upstream, pool):
    result = await run_usage(fake_upstream, *file_args(*pool.values()),
                             "--kiro-api-key", API_KEY_KIRO)
    assert result.exit_code == 0, result.output
    blocks = result.output.strip().split("\naccount ")
    assert len(blocks) == 6, result.output
    social, builder, idc, idp, broken, key = (f"account {b}".splitlines() if i else
                                              b.splitlines() for i, b in enumerate(blocks))
    assert social == [
        f"account {pool['social']} (social)",
        "  plan     KIRO PRO",
        "  credits  120.5 of 1000 used (12.1 %), 879.5 left",
        social[3]]
    assert social[3].startswith("  resets   2027-01-01 00:00 UTC, in ")
    assert builder[0] == f"account {pool['builder']} (builder_id)"
    assert builder[2:] == [
        "  credits  46 of 50 used (92 %), 4 left",
        builder[3],
        "  trial    free trial (ACTIVE): 10.5 of 500 used, until 2026-11-01",
        "  warning  92 % of the credits used, 4 left"]
    assert idc[0] == f"account {pool['idc']} (idc)"
    assert idc[1:3] == ["  plan     KIRO PRO+",
                        "  credits  300.25 of 2000 used (15 %), 1699.75 left"]
    assert idc[4] == "  bonus    Welcome bonus (ACTIVE): 0 of 100 used, until 2026-12-01"
    assert idp[0] == f"account {pool['idp']} (external_idp)" and idp[1] == "  plan     KIRO PRO"
    assert broken == [f"account {pool['broken']} (social)",
                      "  error    Kiro did not give the usage limits "
                      "(HTTP 403, HTTP 403, HTTP 404)"]
    assert key[:3] == ["account kiro-api-key-1 (api_key)", "  plan     KIRO POWER",
                       "  credits  10000 of 10000 used (100 %), 0 left"]
    assert key[3] == "  overage  on, 125.5 credits past the limit"
    assert key[5] == "  warning  100 % of the credits used, 0 left, then overage billing"
    assert API_KEY_KIRO not in result.output and helpers.SOCIAL_ACCESS not in result.output
    sent = {c.headers["Authorization"].removeprefix("Bearer "): c for c in usage_calls(
        fake_upstream)}
    assert sent[IDP_ACCESS].headers["TokenType"] == "EXTERNAL_IDP"
    assert sent[API_KEY_KIRO].headers["TokenType"] == "API_KEY"
    assert sent[helpers.SOCIAL_ACCESS].body["profileArn"] == helpers.PROFILE_ARN
    assert "profileArn" not in sent[helpers.IDC_ACCESS].body  # Builder ID has none


async def test_usage_json_gives_each_account_with_its_error(fake_upstream, pool):
    result = await run_usage(fake_upstream, *file_args(pool["builder"], pool["broken"]),
                             "--json")
    assert result.exit_code == 0, result.output
    builder, broken = json.loads(result.output)["accounts"]
    assert builder["account"] == str(pool["builder"]) and builder["kind"] == "builder_id"
    assert builder["plan"] == "KIRO FREE" and builder["error"] is None
    assert builder["credits"] == {"used": 46.0, "limit": 50, "left": 4.0, "percent": 92.0}
    assert builder["near_limit"] is True and builder["exhausted"] is False
    assert builder["overage"] == {"enabled": False, "used": None}
    assert builder["reset_at"] == "2027-01-01T00:00:00.000Z"
    assert builder["days_until_reset"] == 12
    assert builder["extra_credits"] == [{
        "kind": "free_trial", "name": "free trial", "status": "ACTIVE", "used": 10.5,
        "limit": 500.0, "expires_at": "2026-11-01T00:00:00.000Z"}]
    assert builder["read_at"].endswith("Z")
    assert broken["credits"] is None and broken["read_at"] is None
    assert broken["error"].startswith("Kiro did not give the usage limits (HTTP 403")


async def test_usage_fails_when_no_account_can_be_read(fake_upstream, pool, tmp_path):
    result = await run_usage(fake_upstream, *file_args(pool["broken"], tmp_path / "none.json"))
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[2] == f"account {tmp_path / 'none.json'} (kind unknown)"
    assert lines[3].startswith("  error    ") and "does not exist" in lines[3]


async def test_usage_refreshes_a_token_that_is_due_and_saves_it(fake_upstream, tmp_path):
    path = account(tmp_path, "old", "social", expires_in=-60)
    result = await run_usage(fake_upstream, *file_args(path))
    assert result.exit_code == 0, result.output
    (call,) = usage_calls(fake_upstream)
    assert call.headers["Authorization"] == "Bearer aoa-social-access-1"
    assert json.loads(path.read_text())["accessToken"] == "aoa-social-access-1"


def test_usage_warns_only_from_ninety_per_cent(tmp_path):
    store = kiro2api.TokenStore(helpers.write_token_file(tmp_path / "token.json"),
                                config=kiro2api.Config(), session=None)

    def warning(used):
        store.kiro.remember_usage(convert.UsageLimits(
            plan="KIRO PRO", used=used, limit=1000, overage=False, reset_at=RESET,
            days_until_reset=3))
        return kiro2api.usage_warning(kiro2api.usage_report(store))

    assert warning(899.9) is None
    assert warning(900.0) == "90 % of the credits used, 100 left"
    assert warning(1000.0).startswith(
        "the credits are used up until the reset (2027-01-01 00:00 UTC, in ")


# GET /v1/usage ############################################################


async def start(aiohttp_server, config):
    server = await aiohttp_server(kiro2api.make_app(config))
    return str(server.make_url("")).rstrip("/")


async def get(url, path, key=API_KEY):
    async with aiohttp.ClientSession() as session:
        async with session.get(url + path, headers={"x-api-key": key} if key else {}) as r:
            return r.status, await r.json()


@pytest.fixture
def service(fake_upstream, proxy_config):
    url = fake_upstream.url
    return dataclasses.replace(proxy_config, upstream=(f"{url}/runtime#runtime", f"{url}/q"))


async def test_v1_usage_needs_the_client_key(aiohttp_server, service):
    url = await start(aiohttp_server, service)
    status, body = await get(url, "/v1/usage", key=None)
    assert status == 401 and body["error"]["type"] == "authentication_error"


async def test_v1_usage_gives_every_account_and_the_failing_one(
        aiohttp_server, fake_upstream, service, pool):
    config = dataclasses.replace(service, token_files=tuple(pool.values()),
                                 kiro_api_keys=(API_KEY_KIRO,))
    url = await start(aiohttp_server, config)
    status, body = await get(url, "/v1/usage")
    assert status == 200
    reports = {r["account"]: r for r in body["accounts"]}
    assert [r["kind"] for r in body["accounts"]] == [
        "social", "builder_id", "idc", "external_idp", "social", "api_key"]
    assert reports[str(pool["social"])]["credits"]["used"] == 120.5
    assert reports[str(pool["idc"])]["extra_credits"][0]["name"] == "Welcome bonus"
    assert reports["kiro-api-key-1"]["overage"] == {"enabled": True, "used": 125.5}
    assert reports["kiro-api-key-1"]["exhausted"] is False  # overage billing goes on
    broken = reports[str(pool["broken"])]
    assert broken["credits"] is None and "HTTP 403" in broken["error"]
    text = json.dumps(body)
    for secret in (API_KEY_KIRO, helpers.SOCIAL_ACCESS, helpers.IDC_ACCESS, IDP_ACCESS,
                   helpers.SOCIAL_REFRESH):
        assert secret not in text


async def test_v1_usage_reads_each_account_once_a_minute(
        aiohttp_server, fake_upstream, service, pool):
    clock = FakeClock()
    config = dataclasses.replace(service, token_files=(pool["social"], pool["broken"]),
                                 clock=clock)
    url = await start(aiohttp_server, config)
    _, first = await get(url, "/v1/usage")
    reads = len(usage_calls(fake_upstream))
    assert reads == 3  # social's; broken's with its ARN and without (then REST, unanswered)
    clock.advance(30)
    _, again = await get(url, "/v1/usage")
    assert len(usage_calls(fake_upstream)) == reads  # neither the good nor the failing one
    assert [r["read_at"] for r in again["accounts"]] == [r["read_at"] for r in first["accounts"]]
    assert again["accounts"][1]["error"] == first["accounts"][1]["error"]
    fake_upstream.usage_replies.pop(BROKEN_ACCESS)
    clock.advance(31)
    _, later = await get(url, "/v1/usage")
    assert len(usage_calls(fake_upstream)) == reads + 2
    social, broken = later["accounts"]
    assert broken["error"] is None and broken["credits"]["used"] == 120.5
    assert social["read_at"] > first["accounts"][0]["read_at"]


async def test_requests_at_once_share_one_read(aiohttp_server, fake_upstream, service, tmp_path):
    fake_upstream.usage_reply = Status(200, fakes.USAGE_LIMITS, delay=0.2)
    url = await start(aiohttp_server, service)
    answers = await asyncio.gather(*(get(url, "/v1/usage") for _ in range(5)))
    assert [status for status, _ in answers] == [200] * 5
    assert len(usage_calls(fake_upstream)) == 1
    assert len({json.dumps(body) for _, body in answers}) == 1


async def test_the_read_time_is_when_kiro_was_asked(aiohttp_server, fake_upstream, service):
    before = kiro2api.utcnow()
    url = await start(aiohttp_server, service)
    _, body = await get(url, "/v1/usage")
    read_at = kiro2api.parse_expires_at(body["accounts"][0]["read_at"])
    assert before.timestamp() - 0.01 <= read_at.timestamp() <= kiro2api.utcnow().timestamp()


async def test_a_429_after_v1_usage_uses_the_same_reading(
        aiohttp_server, fake_upstream, service):
    url = await start(aiohttp_server, service)
    await get(url, "/v1/usage")
    fake_upstream.script.append(Status(429, {"message": "Too many requests"}))
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/messages", headers={"x-api-key": API_KEY}, json={
                "model": "claude-sonnet-4-5", "max_tokens": 8,
                "messages": [{"role": "user", "content": "Hi"}]}) as response:
            assert response.status == 429
    assert len(usage_calls(fake_upstream)) == 1


# Usage limits read ########################################################


def test_usage_limits_read_overage_trial_and_bonuses():
    usage = convert.usage_limits(PRO_PLUS_WITH_BONUS)
    assert (usage.plan, usage.used, usage.limit, usage.overage) == ("KIRO PRO+", 300.25, 2000,
                                                                   False)
    assert usage.extra == ({"kind": "bonus", "name": "Welcome bonus", "status": "ACTIVE",
                            "used": 0, "limit": 100, "expires_at": 1796083200.0},)
    power = convert.usage_limits(POWER_IN_OVERAGE)
    assert power.overage and power.overage_used == 125.5 and not power.exhausted
    assert power.percent == 100.0
    free = convert.usage_limits(FREE_NEAR_LIMIT)
    assert free.extra[0]["expires_at"] == TRIAL_END and free.extra[0]["kind"] == "free_trial"


def test_usage_limits_from_another_replica_ignore_what_they_do_not_know():
    usage = convert.usage_limits(FREE_NEAR_LIMIT)
    sent = json.loads(json.dumps(dataclasses.asdict(usage)))
    assert convert.UsageLimits.from_fields({**sent, "from_a_newer_version": 1}) == usage
    older = {k: v for k, v in sent.items() if k not in ("extra", "overage_used")}
    assert convert.UsageLimits.from_fields(older).extra == ()


@pytest.mark.parametrize("row, expected", [
    ({"bonuses": [{"bonusCode": "B1", "usageLimitWithPrecision": 5.5, "expiresAt": 17e8}]},
     ({"kind": "bonus", "name": "B1", "status": None, "used": None, "limit": 5.5,
       "expires_at": 17e8},)),
    ({"bonuses": "none", "freeTrialInfo": "none"}, ()),
    ({"bonuses": [None, {"expiresAt": "not a date"}]},
     ({"kind": "bonus", "name": "bonus", "status": None, "used": None, "limit": None,
       "expires_at": None},)),
], ids=["number-expiry", "not-lists", "odd-entries"])
def test_extra_credits_take_what_they_can(row, expected):
    assert convert.extra_credits(row) == expected
