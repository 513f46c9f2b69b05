"""The parts of the token store one at a time, without a server: the token file,
the refresh protocols, the single-flight holder and the account pool."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import kiro2api
from fakes import (
    CLIENT_ID, CLIENT_SECRET, SOCIAL_ACCESS, SOCIAL_REFRESH, FakeClock, until, write_token,
)

UTC = timezone.utc
MOMENT = datetime(2026, 4, 6, 19, 29, 16, 90000, tzinfo=UTC)


def credentials(**changes) -> kiro2api.Credentials:
    base = kiro2api.Credentials(access_token="aoa-1", refresh_token="aor-1",
                                expires_at=MOMENT, auth_method="social")
    return dataclasses.replace(base, **changes)


# Refresh protocols ########################################################


def test_every_auth_method_of_a_token_file_has_a_refresh_protocol():
    assert set(kiro2api.AUTH_METHODS.values()) == set(kiro2api.REFRESH_PROTOCOLS)


def test_social_request_goes_to_the_region_of_the_login():
    config = kiro2api.Config()
    request = kiro2api.social_refresh_request(credentials(region="eu-central-1"), config)
    assert request.url == "https://prod.eu-central-1.auth.desktop.kiro.dev/refreshToken"
    assert request.body == {"refreshToken": "aor-1"}
    assert request.option == "--social-auth-url"
    assert "aor-1" not in repr(request)


def test_idc_request_is_the_oidc_refresh_grant():
    config = kiro2api.Config(oidc_url="http://fake/{region}/")
    base = credentials(auth_method="idc", client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    request = kiro2api.idc_refresh_request(base, config)
    assert request.url == "http://fake/us-east-1/token"
    assert request.body == {"clientId": CLIENT_ID, "clientSecret": CLIENT_SECRET,
                            "grantType": "refresh_token", "refreshToken": "aor-1"}
    assert request.option == "--oidc-url"


def test_an_answer_is_read_against_the_time_given():
    fresh, updates = kiro2api.refreshed_credentials(
        credentials(), {"accessToken": " aoa-2 ", "refreshToken": "aor-2", "expiresIn": 600,
                        "profileArn": "arn:new"}, MOMENT)
    assert (fresh.access_token, fresh.refresh_token, fresh.profile_arn) == (
        "aoa-2", "aor-2", "arn:new")
    assert fresh.expires_at == MOMENT + timedelta(seconds=600)
    assert updates == {"accessToken": "aoa-2", "refreshToken": "aor-2",
                       "expiresAt": "2026-04-06T19:39:16.090Z", "profileArn": "arn:new"}


@pytest.mark.parametrize("expires_in", [None, 0, -5, True, "600", float("inf")])
def test_an_answer_without_a_usable_lifetime_lasts_an_hour(expires_in):
    fresh, updates = kiro2api.refreshed_credentials(
        credentials(profile_arn="arn:old"), {"accessToken": "aoa-2", "expiresIn": expires_in},
        MOMENT)
    assert fresh.expires_at == MOMENT + timedelta(hours=1)
    assert (fresh.refresh_token, fresh.profile_arn) == ("aor-1", "arn:old")  # kept
    assert "profileArn" not in updates


@pytest.mark.parametrize("answer", [{}, {"accessToken": "  "}, {"accessToken": 5}])
def test_an_answer_without_an_access_token_is_refused(answer):
    with pytest.raises(ValueError, match="without an accessToken"):
        kiro2api.refreshed_credentials(credentials(), answer, MOMENT)


@pytest.mark.parametrize("status, answer, permanent", [
    (400, {"error": "invalid_grant"}, True),
    (401, {"message": "nope"}, True),
    (500, {"error": {"code": "invalid_client", "message": "gone"}}, True),
    (500, {"message": "Invalid refresh token"}, True),
    (503, {"message": "busy"}, False),
    (502, None, False),
])
def test_a_refusal_says_whether_logging_in_again_is_needed(status, answer, permanent):
    request = kiro2api.AuthRequest("http://auth/refreshToken", {}, "--social-auth-url")
    raw = json.dumps(answer).encode() if answer is not None else b"aor-1 <html>"
    error = kiro2api.refusal(request, credentials(), Path("t.json"), status, answer, raw)
    assert error.permanent is permanent and error.status == status
    assert str(error).startswith("http://auth/refreshToken refused to refresh the token of t.json")
    assert "aor-1" not in str(error)


# Token file ###############################################################


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "kiro-auth-token.json"
    write_token(path, ideOnly=True)
    return kiro2api.TokenFile(path)


async def test_the_file_merges_updates_and_keeps_unknown_keys(token_file):
    data, on_disk = await token_file.read()
    fresh = dataclasses.replace(on_disk, access_token="aoa-2")
    kept = await token_file.write(data, on_disk, fresh, {"accessToken": "aoa-2"})
    assert kept is fresh
    after = json.loads(token_file.path.read_text())
    assert list(after) == list(data) and after["ideOnly"] is True
    assert after["accessToken"] == "aoa-2"


async def test_the_file_keeps_a_longer_lived_token_written_meanwhile(token_file):
    data, on_disk = await token_file.read()
    write_token(token_file.path, accessToken="aoa-ide", expires_in=7200)
    fresh = dataclasses.replace(on_disk, access_token="aoa-ours",
                                expires_at=on_disk.expires_at + timedelta(minutes=1))
    kept = await token_file.write(data, on_disk, fresh, {"accessToken": "aoa-ours"})
    assert kept.access_token == "aoa-ide"
    assert json.loads(token_file.path.read_text())["accessToken"] == "aoa-ide"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
async def test_a_file_that_cannot_be_written_is_a_token_file_error(token_file):
    data, on_disk = await token_file.read()
    token_file.path.parent.chmod(0o500)
    try:
        with pytest.raises(kiro2api.TokenFileError, match="no permission to write"):
            await token_file.ensure_writable()
        with pytest.raises(kiro2api.TokenFileError, match="keeps the new one in memory"):
            await token_file.write(data, on_disk, on_disk, {})
    finally:
        token_file.path.parent.chmod(0o700)


async def test_the_lock_removes_what_a_killed_writer_left(token_file):
    leftover = token_file.path.with_name(f".{token_file.path.name}.x1y2.tmp")
    leftover.write_text("{}")
    async with token_file.lock():
        assert not leftover.exists()


# Token holder #############################################################


class Exchange:
    """An auth service in memory: each call hands out the next numbered token."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: kiro2api.RefreshError | None = None

    async def __call__(self, base):
        self.calls.append(base.refresh_token)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        n = len(self.calls)
        return kiro2api.refreshed_credentials(
            base, {"accessToken": f"aoa-{n}", "refreshToken": f"aor-{n}"}, self.clock.now())


@pytest.fixture
def clock():
    return FakeClock()


def holder_for(tmp_path, clock, *, expires_in):
    path = tmp_path / "token.json"
    write_token(path, expires_in=expires_in)
    exchange = Exchange(clock)
    file = kiro2api.TokenFile(path, clock=clock)
    return kiro2api.TokenHolder(file, exchange, clock=clock), exchange


async def test_callers_wait_for_one_refresh_and_share_it(tmp_path, clock):
    holder, exchange = holder_for(tmp_path, clock, expires_in=-60)
    exchange.gate.clear()
    callers = [asyncio.create_task(holder.credentials()) for _ in range(20)]
    await until(lambda: holder.waiters == 20)
    assert exchange.calls == [SOCIAL_REFRESH]
    exchange.gate.set()
    assert {c.access_token for c in await asyncio.gather(*callers)} == {"aoa-1"}
    assert holder.waiters == 0 and holder.refreshes == 1


async def test_a_token_turns_due_as_the_clock_runs(tmp_path, clock):
    holder, exchange = holder_for(tmp_path, clock, expires_in=600)
    assert (await holder.credentials()).access_token == SOCIAL_ACCESS
    clock.advance(299)
    assert (await holder.credentials()).access_token == SOCIAL_ACCESS
    clock.advance(2)  # less than REFRESH_MARGIN left now
    assert (await holder.credentials()).access_token == "aoa-1"
    assert exchange.calls == [SOCIAL_REFRESH]


async def test_a_failed_early_refresh_waits_for_the_retry_interval(tmp_path, clock):
    holder, exchange = holder_for(tmp_path, clock, expires_in=240)
    exchange.fail = kiro2api.RefreshError("busy", status=503)
    assert (await holder.credentials()).access_token == SOCIAL_ACCESS
    assert holder.error is exchange.fail and holder.failures == 1
    clock.advance(kiro2api.REFRESH_RETRY_SECONDS - 1)
    assert (await holder.credentials()).access_token == SOCIAL_ACCESS
    assert len(exchange.calls) == 1
    exchange.fail = None
    clock.advance(1)
    assert (await holder.credentials()).access_token == "aoa-2"
    assert holder.error is None


def test_modes_are_an_enum():
    assert {m.name for m in kiro2api.Mode} == {"LOAD", "AUTO", "FORCE"}


def test_refresh_base_prefers_a_fresh_token_someone_else_wrote():
    held = kiro2api.HeldTokens()
    held.add("aoa-old")
    now = MOMENT - timedelta(hours=1)
    ours = credentials(access_token="aoa-ours", expires_at=now)
    theirs = credentials(access_token="aoa-theirs", expires_at=MOMENT)
    assert kiro2api.refresh_base(ours, ours, held, now) == ours
    assert kiro2api.refresh_base(ours, theirs, held, now) is None
    assert kiro2api.refresh_base(ours, dataclasses.replace(theirs, expires_at=now), held,
                                 now).access_token == "aoa-theirs"
    assert kiro2api.refresh_base(ours, credentials(access_token="aoa-old"), held, now) is ours


def test_held_tokens_forget_the_oldest_beyond_the_limit():
    held = kiro2api.HeldTokens()
    for n in range(kiro2api.HELD_TOKENS_MAX + 1):
        held.add(f"aoa-{n}")
    assert not held.knows("aoa-0") and held.knows("aoa-1")
    assert held.knows(f"aoa-{kiro2api.HELD_TOKENS_MAX}")
    assert not held.knows("") and "aoa-5" in held


# Account pool #############################################################


def account(tmp_path, clock, name):
    path = tmp_path / f"{name}.json"
    write_token(path)
    return kiro2api.TokenStore(path, config=kiro2api.Config(clock=clock), session=None)


def test_a_cooldown_ends_when_the_clock_says_so(tmp_path, clock):
    first, second = account(tmp_path, clock, "a"), account(tmp_path, clock, "b")
    kiro2api.set_aside(first, 60, "slow down")
    assert kiro2api.account_order([first, second]) == [second, first]
    health = first.health()
    assert (health["cooldown_seconds"], health["cooldown_reason"]) == (60, "slow down")
    clock.advance(59)
    assert first.health()["cooldown_seconds"] == 1
    clock.advance(1)
    assert kiro2api.account_order([first, second]) == [first, second]
    assert first.health()["cooldown_reason"] is None


def test_resting_accounts_come_back_in_the_order_they_were_set_aside(tmp_path, clock):
    a, b, c = (account(tmp_path, clock, n) for n in "abc")
    kiro2api.set_aside(a, 600, "refused")
    kiro2api.set_aside(b, 60, "throttled")
    assert kiro2api.account_order([a, b, c]) == [c, b, a]


async def test_reread_looks_at_the_file_at_most_once_a_second(tmp_path, clock):
    store = account(tmp_path, clock, "a")
    await store.load()
    await store.reread()
    write_token(store.path, accessToken="aoa-from-the-ide")
    await store.reread()
    assert not store.knows("aoa-from-the-ide")
    clock.advance(kiro2api.REREAD_SECONDS)
    await store.reread()
    assert store.knows("aoa-from-the-ide")
    assert (await store.credentials()).access_token == "aoa-from-the-ide"


async def test_health_reads_expiry_on_the_clock(tmp_path, clock):
    store = account(tmp_path, clock, "a")
    await store.load()
    assert store.health()["state"] == "ok"
    clock.advance(3600 - 200)
    assert store.health()["state"] == "expiring"
    clock.advance(201)  # the file was written a moment after the clock started
    assert store.health()["state"] == "expired"
