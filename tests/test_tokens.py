"""The token store: reading token files, refreshing, writing back, concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import socket
import stat
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import pytest

import kiro2api
from fakes import FakeClock, Status, until
from helpers import (
    CLIENT_ID, CLIENT_ID_HASH, CLIENT_SECRET, IDC_ACCESS, IDC_REFRESH, PROFILE_ARN, SOCIAL_ACCESS,
    SOCIAL_REFRESH, write_token,
)

UTC = timezone.utc
IDE_FORMAT = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
MAIN = Path(kiro2api.__file__).resolve().parent

NaN = float("nan")


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def token_path(tmp_path):
    cache = tmp_path / "sso-cache"
    cache.mkdir()
    return cache / "kiro-auth-token.json"


@pytest.fixture
def make_store(fake_upstream, session):
    def make(path, *, auth_url=None, **kwargs):
        url = auth_url or fake_upstream.url
        config = kiro2api.Config(token_files=(path,), social_auth_url=url, oidc_url=url)
        return kiro2api.TokenStore(path, config=config, session=session, **kwargs)
    return make


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# expiresAt ################################################################

IDE_MOMENT = datetime(2026, 4, 6, 19, 29, 16, 90000, tzinfo=UTC)


@pytest.mark.parametrize("value, expected", [
    ("2026-04-06T19:29:16.090Z", IDE_MOMENT),
    ("2026-04-06T19:29:16.090000+00:00", IDE_MOMENT),
    ("2026-04-06T21:29:16.090123456+02:00", IDE_MOMENT.replace(microsecond=90123)),
    ("2026-04-06T19:29:16.09z", IDE_MOMENT),
    ("2026-04-06T18:59:16.090-0030", IDE_MOMENT),
    ("2026-04-06T19:29:16Z", IDE_MOMENT.replace(microsecond=0)),
    ("2026-04-06 19:29:16", IDE_MOMENT.replace(microsecond=0)),  # no zone: UTC
    (int(IDE_MOMENT.timestamp() * 1000), IDE_MOMENT),  # epoch milliseconds
    (int(IDE_MOMENT.timestamp()), IDE_MOMENT.replace(microsecond=0)),  # epoch seconds
], ids=["ide", "offset", "nanoseconds", "short-fraction", "offset-no-colon", "no-fraction",
        "no-zone", "epoch-ms", "epoch-s"])
def test_expires_at_parses_every_format_seen(value, expected):
    assert kiro2api.parse_expires_at(value) == expected


@pytest.mark.parametrize("value", [None, "", "soon", "2026-13-45T99:00:00Z", True, {}, []])
def test_expires_at_missing_or_unreadable_is_unknown(value):
    assert kiro2api.parse_expires_at(value) is None


def test_expires_at_is_written_in_the_ide_format():
    moment = datetime(2026, 4, 6, 21, 29, 16, 90999, tzinfo=timezone(timedelta(hours=2)))
    assert kiro2api.format_expires_at(moment) == "2026-04-06T19:29:16.090Z"


# Reading token files ######################################################


def test_reads_a_social_login(token_path):
    write_token(token_path, expiresAt="2026-04-06T19:29:16.090Z")
    _, c = kiro2api.read_token_file(token_path)
    assert (c.access_token, c.refresh_token, c.expires_at) == (SOCIAL_ACCESS, SOCIAL_REFRESH,
                                                               IDE_MOMENT)
    assert (c.auth_method, c.provider, c.region, c.profile_arn) == (
        "social", "Google", "us-east-1", PROFILE_ARN)
    assert (c.client_id, c.client_secret) == (None, None)


def test_reads_an_idc_login_and_its_client_registration(token_path):
    write_token(token_path, method="idc", region="eu-central-1")
    _, c = kiro2api.read_token_file(token_path)
    assert (c.access_token, c.refresh_token) == (IDC_ACCESS, IDC_REFRESH)
    assert (c.auth_method, c.provider, c.region, c.profile_arn) == (
        "idc", "BuilderId", "eu-central-1", None)
    assert (c.client_id, c.client_secret) == (CLIENT_ID, CLIENT_SECRET)


def test_idc_client_may_be_inline(token_path):
    write_token(token_path, method="idc", clientIdHash=None, clientId="inline-id",
                clientSecret="inline-secret")
    (token_path.parent / f"{CLIENT_ID_HASH}.json").unlink()
    _, c = kiro2api.read_token_file(token_path)
    assert (c.client_id, c.client_secret) == ("inline-id", "inline-secret")


@pytest.mark.parametrize("auth_method, flavour, expected", [
    ("Social", "social", "social"),
    ("IdC", "idc", "idc"),
    ("builder-id", "idc", "idc"),
    ("IAM", "idc", "idc"),
    (None, "social", "social"),  # the original tool's rewrite drops authMethod
    (None, "idc", "idc"),  # ... but a clientIdHash tells
])
def test_auth_method_is_matched_case_insensitively(token_path, auth_method, flavour, expected):
    write_token(token_path, method=flavour, authMethod=auth_method)
    _, c = kiro2api.read_token_file(token_path)
    assert c.auth_method == expected


def test_region_defaults_to_us_east_1(token_path):
    write_token(token_path, method="idc", region=None)
    assert kiro2api.read_token_file(token_path)[1].region == "us-east-1"


def test_credentials_repr_hides_secrets(token_path):
    write_token(token_path, method="idc")
    text = repr(kiro2api.read_token_file(token_path)[1])
    assert IDC_ACCESS not in text and IDC_REFRESH not in text and CLIENT_SECRET not in text


def _registration(path):
    return path.parent / f"{CLIENT_ID_HASH}.json"


BAD_FILES = {
    "missing": (lambda p: None, "does not exist; log in to Kiro first"),
    "directory": (lambda p: p.mkdir(), "cannot read"),
    "invalid-json": (lambda p: p.write_text('{"accessToken": '), "is not valid JSON"),
    "not-utf8": (lambda p: p.write_bytes(b'{"a": "\xff"}'), "is not valid JSON"),
    "not-an-object": (lambda p: p.write_text("[1, 2]"), "holds JSON but not an object"),
    "no-access-token": (lambda p: write_token(p, accessToken=None), "has no accessToken"),
    "empty-refresh-token": (lambda p: write_token(p, refreshToken=" "), "has no refreshToken"),
    "unsupported-method": (lambda p: write_token(p, authMethod="saml"),
                           "authMethod 'saml' is not supported"),
    "external-idp-without-endpoint": (lambda p: write_token(p, authMethod="external_idp",
                                                            clientId="c"),
                                      "has no tokenEndpoint"),
    "bad-region": (lambda p: write_token(p, region="x/../../evil"), "is not an AWS region"),
    "idc-without-hash": (lambda p: write_token(p, method="idc", clientIdHash=None),
                         "IdC login without a clientIdHash"),
    "registration-missing": (lambda p: (write_token(p, method="idc"),
                                        _registration(p).unlink()),
                             f"{CLIENT_ID_HASH}.json (the IdC client registration"),
    "registration-incomplete": (lambda p: (write_token(p, method="idc"),
                                           _registration(p).write_text('{"clientId": "x"}')),
                                "has no clientSecret"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_bad_token_files_give_one_clear_line(token_path, case):
    make, expected = BAD_FILES[case]
    make(token_path)
    with pytest.raises(kiro2api.TokenFileError) as caught:
        kiro2api.read_token_file(token_path)
    message = str(caught.value)
    assert expected in message
    assert str(token_path.parent) in message
    assert "\n" not in message


# Refreshing ###############################################################


async def test_social_refresh_posts_the_refresh_token_and_merges_the_file(
        token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=-60, profileArn=None, ideOnly={"keep": [1, 2]},
                mode=0o644)
    before = json.loads(token_path.read_text())
    store = make_store(token_path)
    credentials = await store.credentials()

    (call,) = fake_upstream.requests
    assert call.path == "/refreshToken"
    assert call.body == {"refreshToken": SOCIAL_REFRESH}
    assert credentials.access_token == "aoa-social-access-1"
    assert credentials.refresh_token == "aor-social-refresh-1"  # rotated
    after = json.loads(token_path.read_text())
    assert list(after) == list(before) + ["profileArn"]  # order kept, the new key last
    assert after["ideOnly"] == {"keep": [1, 2]} and after["provider"] == "Google"
    assert after["accessToken"] == "aoa-social-access-1"
    assert after["refreshToken"] == "aor-social-refresh-1"
    assert after["profileArn"] == "arn:aws:codewhisperer:us-east-1:111122223333:profile/FAKE"
    assert re.fullmatch(IDE_FORMAT, after["expiresAt"])
    left = (kiro2api.parse_expires_at(after["expiresAt"]) - datetime.now(UTC)).total_seconds()
    assert 3590 < left <= 3600
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in token_path.parent.iterdir()) == [
        "kiro-auth-token.json", "kiro-auth-token.json.lock"]  # no temporary file left


async def test_idc_refresh_posts_the_camel_case_body_to_the_region(
        token_path, make_store, fake_upstream):
    write_token(token_path, method="idc", expires_in=-60, region="eu-central-1")
    before = json.loads(token_path.read_text())
    store = make_store(token_path, auth_url=fake_upstream.url + "/{region}")
    credentials = await store.credentials()

    (call,) = fake_upstream.requests
    assert call.path == "/eu-central-1/token"
    assert call.body == {"clientId": CLIENT_ID, "clientSecret": CLIENT_SECRET,
                         "grantType": "refresh_token", "refreshToken": IDC_REFRESH}
    assert credentials.access_token == "aoa-idc-access-1"
    after = json.loads(token_path.read_text())
    assert list(after) == list(before)
    assert "profileArn" not in after and after["clientIdHash"] == CLIENT_ID_HASH
    assert after["refreshToken"] == "aor-idc-refresh-1"
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600


async def test_refresh_without_rotation_keeps_the_refresh_token_and_profile(
        token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=-60)
    fake_upstream.auth_script.append(Status(200, {"accessToken": "aoa-only"}))
    credentials = await make_store(token_path).credentials()
    after = json.loads(token_path.read_text())
    assert (after["accessToken"], after["refreshToken"], after["profileArn"]) == (
        "aoa-only", SOCIAL_REFRESH, PROFILE_ARN)
    assert credentials.refresh_token == SOCIAL_REFRESH
    left = credentials.seconds_left()
    assert 3590 < left <= 3600  # expiresIn defaults to an hour


async def test_an_expires_in_that_is_not_a_number_counts_as_an_hour(
        token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=-60)
    fake_upstream.auth_script.append(Status(200, {"accessToken": "aoa-new", "expiresIn": NaN,
                                                  "refreshToken": "aor-rotated"}))
    credentials = await make_store(token_path).credentials()
    assert 3590 < credentials.seconds_left() <= 3600
    after = json.loads(token_path.read_text())  # the rotated refresh token is saved
    assert (after["accessToken"], after["refreshToken"]) == ("aoa-new", "aor-rotated")


async def test_the_next_refresh_sends_the_rotated_refresh_token(
        token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=-60)
    store = make_store(token_path)
    first = await store.credentials()
    await store.refresh(stale_access_token=first.access_token)
    assert [r.body["refreshToken"] for r in fake_upstream.requests] == [
        SOCIAL_REFRESH, "aor-social-refresh-1"]


@pytest.mark.parametrize("seconds_left, refreshes", [(-3600, 1), (240, 1), (600, 0)])
async def test_refreshes_when_less_than_five_minutes_remain(
        token_path, make_store, fake_upstream, seconds_left, refreshes):
    write_token(token_path, expires_in=seconds_left)
    await make_store(token_path).credentials()
    assert fake_upstream.refreshes == refreshes


async def test_unknown_expiry_is_used_until_rejected(token_path, make_store, fake_upstream):
    write_token(token_path, expiresAt=None)
    store = make_store(token_path)
    assert (await store.credentials()).access_token == SOCIAL_ACCESS
    assert fake_upstream.requests == []
    # Upstream rejects it; the forced refresh fails once, so the next request tries again.
    fake_upstream.auth_script.append(Status(503, {"message": "busy"}))
    with pytest.raises(kiro2api.RefreshError):
        await store.refresh(stale_access_token=SOCIAL_ACCESS)
    assert store.health()["state"] == "error"
    assert (await store.credentials()).access_token == "aoa-social-access-1"
    assert len(fake_upstream.requests) == 2
    assert store.health()["state"] == "ok"


async def test_forced_refresh_of_an_already_replaced_token_does_nothing(
        token_path, make_store, fake_upstream):
    write_token(token_path)
    store = make_store(token_path)
    await store.credentials()
    assert (await store.refresh(stale_access_token="an-older-token")).access_token \
        == SOCIAL_ACCESS
    assert fake_upstream.requests == []


REFUSALS = {
    "invalid-grant": (Status(400, {"error": "invalid_grant",
                                   "error_description": "Refresh token has expired"}),
                      400, "invalid_grant", True, "HTTP 400 invalid_grant: Refresh token has "
                      "expired); log in to Kiro again"),
    "invalid-refresh-token": (Status(401, {"message": "Invalid refresh token provided"}),
                              401, None, True, "Invalid refresh token provided); log in"),
    "server-error": (Status(500, "upstream exploded\n<trace>"), 500, None, False,
                     "HTTP 500: upstream exploded <trace>); try again later"),
    "not-json": (Status(200, "<html>hello</html>"), 200, None, False,
                 "answered HTTP 200 with no JSON; check --social-auth-url"),
    "no-access-token": (Status(200, {"expiresIn": 3600}), 200, None, False,
                        "answered HTTP 200 with an answer without an accessToken"),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
async def test_refresh_failures_are_typed_and_leave_the_file_alone(
        token_path, make_store, fake_upstream, case):
    reply, status, reason, permanent, expected = REFUSALS[case]
    write_token(token_path, expires_in=-60)
    before = token_path.read_bytes()
    fake_upstream.auth_script.append(reply)
    store = make_store(token_path)
    with pytest.raises(kiro2api.RefreshError) as caught:
        await store.credentials()
    error = caught.value
    assert (error.status, error.reason, error.permanent) == (status, reason, permanent)
    assert expected in str(error)
    assert f"{fake_upstream.url}/refreshToken" in str(error)
    assert "\n" not in str(error)
    assert token_path.read_bytes() == before
    assert store.health()["state"] == "error"
    assert store.health()["error"] == str(error)


async def test_refusal_text_never_echoes_the_refresh_token(token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=-60)
    fake_upstream.auth_script.append(Status(400, {"message": f"bad token {SOCIAL_REFRESH}"}))
    with pytest.raises(kiro2api.RefreshError) as caught:
        await make_store(token_path).credentials()
    assert SOCIAL_REFRESH not in str(caught.value)


async def test_unreachable_auth_service(token_path, make_store):
    write_token(token_path, expires_in=-60)
    before = token_path.read_bytes()
    url = closed_port_url()
    with pytest.raises(kiro2api.RefreshError) as caught:
        await make_store(token_path, auth_url=url).credentials()
    assert f"cannot reach {url}/refreshToken" in str(caught.value)
    assert caught.value.permanent is False
    assert token_path.read_bytes() == before


async def test_silent_auth_service_times_out(token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=-60)
    fake_upstream.auth_delay = 2.0
    with pytest.raises(kiro2api.RefreshError, match="did not answer within 0.2 s"):
        await make_store(token_path, timeout=0.2).credentials()


async def test_a_refused_refresh_token_is_not_sent_again_until_a_new_login(
        token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=-60)
    fake_upstream.auth_script.append(Status(400, {"error": "invalid_grant"}))
    store = make_store(token_path)
    for _ in range(3):
        with pytest.raises(kiro2api.RefreshError, match="invalid_grant"):
            await store.credentials()
    assert len(fake_upstream.requests) == 1
    write_token(token_path, expires_in=-60, refreshToken="aor-after-logging-in-again")
    assert (await store.credentials()).access_token == "aoa-social-access-1"
    assert fake_upstream.requests[-1].body == {"refreshToken": "aor-after-logging-in-again"}


async def test_a_symlinked_token_file_stays_a_symlink(tmp_path, make_store):
    real = tmp_path / "real.json"
    write_token(real, expires_in=-60)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    await make_store(link).credentials()
    assert link.is_symlink()
    assert json.loads(real.read_text())["accessToken"] == "aoa-social-access-1"


# Health and client keys ###################################################


async def test_health_reports_the_state_but_never_a_token(token_path, make_store):
    write_token(token_path, expires_in=200)
    store = make_store(token_path)
    assert store.health()["state"] == "unknown"
    await store.load()
    health = store.health()
    assert health["state"] == "expiring"
    assert (health["path"], health["auth_method"], health["provider"], health["region"]) == (
        str(token_path), "social", "Google", "us-east-1")
    assert 190 < health["seconds_left"] <= 200
    await store.credentials()
    health = store.health()
    assert health["state"] == "ok" and health["error"] is None and health["refreshes"] == 1
    text = json.dumps(health)
    for secret in (SOCIAL_ACCESS, SOCIAL_REFRESH, "aoa-social-access-1", "aor-social-refresh-1"):
        assert secret not in text


async def test_health_of_an_expired_token(token_path, make_store):
    write_token(token_path, expires_in=-10)
    store = make_store(token_path)
    await store.load()
    assert store.health()["state"] == "expired"


async def test_knows_every_access_token_it_has_held(token_path, make_store):
    write_token(token_path, expires_in=-60)
    store = make_store(token_path)
    assert not store.knows(SOCIAL_ACCESS)  # not read yet
    await store.credentials()
    assert store.knows(SOCIAL_ACCESS) and store.knows("aoa-social-access-1")
    assert not store.knows("aoa-social-access-2")
    assert not store.knows("") and not store.knows(SOCIAL_ACCESS[:-1])
    assert not store.knows("ünïcode")


# Concurrency ##############################################################


async def test_fifty_concurrent_requests_cause_one_refresh(token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=-60)
    fake_upstream.auth_delay = 0.1
    store = make_store(token_path)
    results = await asyncio.gather(*(store.credentials() for _ in range(50)))
    assert {c.access_token for c in results} == {"aoa-social-access-1"}
    assert len(fake_upstream.calls("/refreshToken")) == 1


async def test_fifty_concurrent_forced_refreshes_cause_one_refresh(
        token_path, make_store, fake_upstream):
    write_token(token_path)
    fake_upstream.auth_delay = 0.1
    store = make_store(token_path)
    stale = (await store.credentials()).access_token
    results = await asyncio.gather(
        *(store.refresh(stale_access_token=stale) for _ in range(50)))
    assert {c.access_token for c in results} == {"aoa-social-access-1"}
    assert len(fake_upstream.calls("/refreshToken")) == 1


async def test_concurrent_waiters_share_a_failure(token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=-60)
    fake_upstream.auth_delay = 0.1
    fake_upstream.auth_script.append(Status(503, {"message": "busy"}))
    store = make_store(token_path)
    results = await asyncio.gather(*(store.credentials() for _ in range(50)),
                                   return_exceptions=True)
    assert all(isinstance(r, kiro2api.RefreshError) for r in results)
    assert len(fake_upstream.calls("/refreshToken")) == 1


async def test_a_cancelled_caller_does_not_cancel_the_refresh(
        token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=-60)
    fake_upstream.auth_gate = asyncio.Event()
    store = make_store(token_path)
    caller = asyncio.create_task(store.credentials())
    await fake_upstream.wait_for("/refreshToken")
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    fake_upstream.auth_gate.set()
    assert (await store.credentials()).access_token == "aoa-social-access-1"
    assert json.loads(token_path.read_text())["accessToken"] == "aoa-social-access-1"
    assert len(fake_upstream.calls("/refreshToken")) == 1


async def test_uses_a_token_someone_else_refreshed_instead_of_refreshing(
        token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=-60)
    store = make_store(token_path)
    await store.load()
    write_token(token_path, accessToken="aoa-from-the-ide", refreshToken="aor-from-the-ide")
    assert (await store.credentials()).access_token == "aoa-from-the-ide"
    assert fake_upstream.requests == []
    assert store.knows("aoa-from-the-ide")


async def test_refreshes_with_the_refresh_token_now_in_the_file(
        token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=-60)
    store = make_store(token_path)
    await store.load()
    # The IDE refreshed (rotating the refresh token) and that token is due too.
    write_token(token_path, accessToken="aoa-from-the-ide", refreshToken="aor-from-the-ide",
                expires_in=60)
    assert (await store.credentials()).access_token == "aoa-social-access-1"
    assert fake_upstream.requests[0].body == {"refreshToken": "aor-from-the-ide"}


@pytest.mark.parametrize("theirs_left, kept", [(7200, "theirs"), (1800, "ours")])
async def test_refresh_racing_an_external_writer_keeps_the_newer_token(
        token_path, make_store, fake_upstream, theirs_left, kept):
    write_token(token_path, expires_in=-60)
    fake_upstream.auth_gate = asyncio.Event()
    store = make_store(token_path)
    refreshing = asyncio.create_task(store.credentials())
    await fake_upstream.wait_for("/refreshToken")
    # The IDE ignores our lock and writes while our refresh is in flight.
    write_token(token_path, accessToken="aoa-ide", refreshToken="aor-ide",
                expires_in=theirs_left, ideMarker=True)
    fake_upstream.auth_gate.set()
    credentials = await refreshing
    after = json.loads(token_path.read_text())
    expected = "aoa-ide" if kept == "theirs" else "aoa-social-access-1"
    assert credentials.access_token == after["accessToken"] == expected
    assert after["ideMarker"] is True  # merged into what the IDE wrote


async def test_waits_for_the_lock_another_process_holds(token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=-60)
    store = make_store(token_path)
    fd = os.open(store.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        waiting = asyncio.create_task(store.credentials())
        await asyncio.sleep(0.3)
        assert not waiting.done() and fake_upstream.requests == []
    finally:
        os.close(fd)
    assert (await waiting).access_token == "aoa-social-access-1"


async def test_a_stuck_lock_holder_is_reported(token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=-60)
    clock = FakeClock()
    store = make_store(token_path, lock_timeout=20, clock=clock)
    fd = os.open(store.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        waiting = asyncio.create_task(store.credentials())
        while not waiting.done():  # the lock is polled; the store's clock runs fast
            clock.advance(5)
            await asyncio.sleep(kiro2api.LOCK_POLL_SECONDS)
        with pytest.raises(kiro2api.TokenError, match="stayed locked for 20 s") as caught:
            await waiting
        assert isinstance(caught.value, kiro2api.TokenLockError)
    finally:
        os.close(fd)
    assert fake_upstream.requests == []


async def wait_until_waiting_for(lock_path, processes):
    """Wait until every process has ``lock_path`` open: it has read the token file
    and is waiting for the lock. (Without /proc, give them a generous second.)"""
    if not Path("/proc/self/fd").is_dir():
        await asyncio.sleep(1.0)
        return
    waiting: set[int] = set()
    while len(waiting) < len(processes):
        for process in processes:
            assert process.returncode is None, await process.communicate()
            fds = Path(f"/proc/{process.pid}/fd")
            with contextlib.suppress(OSError):
                if any(os.readlink(fd) == os.path.realpath(lock_path) for fd in fds.iterdir()):
                    waiting.add(process.pid)
        await asyncio.sleep(0.01)


@pytest.mark.slow  # two kiro2api processes
async def test_two_processes_refreshing_at_once_refresh_once(token_path, fake_upstream):
    write_token(token_path, expires_in=-60, ideOnly="kept")
    before = json.loads(token_path.read_text())
    command = [sys.executable, str(MAIN / "kiro2api.py"), "refresh",
               "--token-file", str(token_path), "--social-auth-url", fake_upstream.url]
    lock_path = token_path.with_name(token_path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # Hold the lock until both processes have read the expired token and
        # wait for it: then both mean to refresh the same refresh token.
        fcntl.flock(fd, fcntl.LOCK_EX)
        processes = [
            await asyncio.create_subprocess_exec(*command, cwd=MAIN,
                                                 stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE)
            for _ in range(2)
        ]
        await wait_until_waiting_for(lock_path, processes)
        assert fake_upstream.requests == [] and json.loads(token_path.read_text()) == before
    finally:
        os.close(fd)
    outputs = [await p.communicate() for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert [r.body for r in fake_upstream.calls("/refreshToken")] == [
        {"refreshToken": SOCIAL_REFRESH}]
    after = json.loads(token_path.read_text())
    assert after["accessToken"] == "aoa-social-access-1" and after["ideOnly"] == "kept"
    assert after["refreshToken"] == "aor-social-refresh-1"
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    stdout = sorted(out.decode() for out, _ in outputs)
    assert stdout[0].startswith("Already refreshed by another program")
    assert stdout[1].startswith("Refreshed")


async def test_fifty_concurrent_requests_through_the_server_cause_one_refresh(
        aiohttp_server, fake_upstream, token_path, session):
    write_token(token_path, expires_in=-60)
    config = kiro2api.Config(api_key="k", token_files=(token_path,), upstream=fake_upstream.url,
                             social_auth_url=fake_upstream.url, oidc_url=fake_upstream.url,
                             retries=0)
    server = await aiohttp_server(kiro2api.make_app(config))
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10,
            "messages": [{"role": "user", "content": "Hi"}]}

    async def ask() -> str:
        async with session.post(server.make_url("/v1/messages"), json=body,
                                headers={"x-api-key": "k"}) as response:
            assert response.status == 200, await response.text()
            return (await response.json())["content"][0]["text"]

    fake_upstream.auth_gate = asyncio.Event()
    requests = [asyncio.create_task(ask()) for _ in range(50)]
    await fake_upstream.wait_for("/refreshToken")
    holder = server.app[kiro2api.ACCOUNTS][0].holder
    await until(lambda: holder.waiters == 50)  # every request waits for the one refresh
    fake_upstream.auth_gate.set()
    assert await asyncio.gather(*requests) == ["Hello"] * 50
    assert len(fake_upstream.calls("/refreshToken")) == 1
    calls = fake_upstream.calls("/generateAssistantResponse")
    assert [c.headers["Authorization"] for c in calls] == ["Bearer aoa-social-access-1"] * 50
    assert json.loads(token_path.read_text())["accessToken"] == "aoa-social-access-1"


async def test_a_failed_early_refresh_keeps_serving_the_token_until_it_expires(
        token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=240)
    before = token_path.read_bytes()
    fake_upstream.auth_script.append(Status(503, {"message": "busy"}))
    store = make_store(token_path)
    assert (await store.credentials()).access_token == SOCIAL_ACCESS
    health = store.health()
    assert health["state"] == "error" and "HTTP 503: busy" in health["error"]
    # Not asked again at every request while the retry interval runs.
    assert (await store.credentials()).access_token == SOCIAL_ACCESS
    assert len(fake_upstream.calls("/refreshToken")) == 1
    assert token_path.read_bytes() == before


async def test_a_failed_early_refresh_is_tried_again_after_the_interval(
        token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=240)
    fake_upstream.auth_script.append(Status(400, {"error": "invalid_grant"}))
    clock = FakeClock()
    store = make_store(token_path, clock=clock)
    assert (await store.credentials()).access_token == SOCIAL_ACCESS
    clock.advance(kiro2api.REFRESH_RETRY_SECONDS)
    # The refused refresh token is not sent again: the token serves until it expires.
    assert (await store.credentials()).access_token == SOCIAL_ACCESS
    assert len(fake_upstream.calls("/refreshToken")) == 1
    # A forced refresh (upstream rejected the token) still fails loudly.
    with pytest.raises(kiro2api.RefreshError, match="invalid_grant"):
        await store.refresh(stale_access_token=SOCIAL_ACCESS)
    store2 = make_store(token_path, clock=clock)
    fake_upstream.auth_script.append(Status(503, {"message": "busy"}))
    assert (await store2.credentials()).access_token == SOCIAL_ACCESS
    clock.advance(kiro2api.REFRESH_RETRY_SECONDS)
    assert (await store2.credentials()).access_token == "aoa-social-access-1"
    assert store2.health()["state"] == "ok"


async def test_a_failed_refresh_of_an_expired_token_is_an_error(
        token_path, make_store, fake_upstream):
    write_token(token_path, expires_in=-1)
    fake_upstream.auth_script.append(Status(503, {"message": "busy"}))
    with pytest.raises(kiro2api.RefreshError, match="HTTP 503: busy"):
        await make_store(token_path).credentials()


# A login that appears or changes while the server runs ####################

BODY = {"model": "claude-sonnet-4-5", "max_tokens": 10,
        "messages": [{"role": "user", "content": "Hi"}]}


def watching_config(fake_upstream, token_path, **changes):
    return kiro2api.Config(token_files=(token_path,), upstream=fake_upstream.url,
                           social_auth_url=fake_upstream.url, oidc_url=fake_upstream.url,
                           management_url=fake_upstream.url + "/management", retries=0,
                           watch_interval=0.05, **changes)


async def health_until(session, url, condition, headers=None):
    """Ask /health again and again (10 s at most) until ``condition(answer)``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        async with session.get(url + "/health", headers=headers or {}) as response:
            answer = await response.json()
        if condition(answer):
            return answer
        assert loop.time() < deadline, answer
        await asyncio.sleep(0.02)


async def test_a_token_file_written_after_the_server_started_is_read_without_a_request(
        aiohttp_server, fake_upstream, token_path, session):
    server = await aiohttp_server(kiro2api.make_app(watching_config(fake_upstream, token_path)))
    url = str(server.make_url("")).rstrip("/")
    async with session.get(url + "/health") as response:
        assert (await response.json())["status"] == "degraded"
    async with session.post(url + "/v1/messages", json=BODY,
                            headers={"Authorization": "Bearer aoa-a-guess"}) as response:
        assert response.status == 503
        message = (await response.json())["error"]["message"]
    assert "no Kiro login yet" in message and f"{token_path} does not exist" in message
    assert "log in to Kiro" in message and "kiro2api export" in message

    write_token(token_path)  # the user logs in to Kiro
    await health_until(session, url, lambda answer: answer["status"] == "ok")
    assert fake_upstream.requests == []  # no request made the server look
    async with session.post(url + "/v1/messages", json=BODY,
                            headers={"Authorization": f"Bearer {SOCIAL_ACCESS}"}) as response:
        assert response.status == 200, await response.text()


async def test_a_token_file_rewritten_while_the_server_runs_is_used_at_once(
        aiohttp_server, fake_upstream, token_path, session):
    write_token(token_path)
    config = watching_config(fake_upstream, token_path, api_key="k")
    server = await aiohttp_server(kiro2api.make_app(config))
    url = str(server.make_url("")).rstrip("/")
    write_token(token_path, accessToken="aoa-the-ide-refreshed", expires_in=7200)
    await health_until(session, url, lambda answer: answer["accounts"][0]["seconds_left"] > 3600,
                       headers={"x-api-key": "k"})
    async with session.post(url + "/v1/messages", json=BODY,
                            headers={"x-api-key": "k"}) as response:
        assert response.status == 200, await response.text()
    (call,) = fake_upstream.calls("/generateAssistantResponse")
    assert call.headers["Authorization"] == "Bearer aoa-the-ide-refreshed"


async def test_the_token_file_watcher_stops_with_the_server(aiohttp_server, fake_upstream,
                                                            token_path):
    def watchers():
        return [t for t in asyncio.all_tasks() if t.get_name() == kiro2api.WATCHER_TASK]

    server = await aiohttp_server(kiro2api.make_app(watching_config(fake_upstream, token_path)))
    assert len(watchers()) == 1
    await server.close()
    assert watchers() == []
