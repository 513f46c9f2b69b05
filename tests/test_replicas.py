"""Replicas that share their Kiro accounts through Redis (``--state``).

Against a real ``redis-server`` (the ``redis_server`` fixture) and a fake Kiro
auth that rotates refresh tokens as Kiro does (``fake.rotate``: a used one is
refused with ``invalid_grant``). Replicas are separate apps, each with its own
copy of the same token file; the tests at the end are real server processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import subprocess
import sys

import aiohttp
import anthropic
import pytest
import redis.asyncio
from anthropic.types import Message
from click.testing import CliRunner

import convert
import helpers
import kiro2api
from fakes import FakeClock, Status
from helpers import API_KEY, child_env, free_port, start_server_process, write_token_file

BODY = {"model": "claude-sonnet-4-5", "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hi"}]}
FIRST_REFRESH = "aor-initial-refresh"  # the proxy fixtures' token file's


@pytest.fixture
def rotating(fake_upstream):
    fake_upstream.rotate = True
    return fake_upstream


def token_copy(tmp_path, name, expires_in=60.0, **overrides):
    """A replica's own copy of the account's token file (the same contents for every
    replica; 60 s left means the first request refreshes it)."""
    path = tmp_path / name / "kiro-auth-token.json"
    path.parent.mkdir(exist_ok=True)
    return write_token_file(path, expiresAt=helpers.ide_time(expires_in), **overrides)


class Replica:
    def __init__(self, url, config):
        self.url = url
        self.config = config
        self.client = anthropic.AsyncAnthropic(base_url=url, api_key=API_KEY, max_retries=0)

    async def ask(self):
        message = await self.client.messages.create(**BODY)
        assert isinstance(message, Message) and message.content[0].text == "Hello"
        return message

    async def health(self):
        async with aiohttp.ClientSession() as session:
            async with session.get(self.url + "/health",
                                   headers={"x-api-key": API_KEY}) as response:
                return await response.json()

    def file(self):
        return json.loads(self.config.token_files[0].read_text())


@pytest.fixture
async def replica(redis_server, aiohttp_server, proxy_config, tmp_path):
    """``await replica(name, **config changes)``: one more in-process replica on the
    test's Redis, with its own copy of the token file unless given ``token_files``."""
    async def start(name, **changes):
        if "token_files" not in changes:
            changes["token_files"] = (token_copy(tmp_path, name),)
        changes = {"state": redis_server.url, "state_lock_seconds": 3.0, **changes}
        config = dataclasses.replace(proxy_config, **changes)
        server = await aiohttp_server(kiro2api.make_app(config))
        started.append(Replica(str(server.make_url("")).rstrip("/"), config))
        return started[-1]
    started: list[Replica] = []
    yield start
    for one in started:
        await one.client.close()


async def stored(redis_url):
    """Every kiro2api key in Redis and its value (hashes as dicts)."""
    client = redis.asyncio.from_url(redis_url, decode_responses=True)
    try:
        found = {}
        async for key in client.scan_iter("kiro2api:*"):
            kind = await client.type(key)
            found[key] = await (client.hgetall(key) if kind == "hash" else client.get(key))
        return found
    finally:
        await client.aclose()


def authorizations(fake):
    return [c.headers["Authorization"] for c in fake.requests
            if c.path.endswith("generateAssistantResponse") or c.path.startswith("/q/")]


# One login for the fleet ##################################################

async def test_one_replica_refreshes_and_the_other_takes_its_login(
        replica, rotating, redis_server):
    a, b = await replica("a"), await replica("b")
    await a.ask()
    await b.ask()
    assert rotating.spent == [FIRST_REFRESH] and rotating.reused == []
    assert authorizations(rotating) == ["Bearer aoa-social-access-1"] * 2
    # b wrote the fleet's login to its own file: it can start without Redis.
    assert (b.file()["accessToken"], b.file()["refreshToken"]) == (
        "aoa-social-access-1", "aor-social-refresh-1")
    record = await stored(redis_server.url)
    (login,) = [v for k, v in record.items() if k.startswith("kiro2api:login:")]
    assert login["version"] == "2"  # the file's login, then the refreshed one
    assert json.loads(login["login"])["refreshToken"] == "aor-social-refresh-1"


async def test_replicas_refreshing_at_once_use_the_refresh_token_once(
        replica, rotating):
    replicas = [await replica(name) for name in "abc"]
    rotating.auth_delay = 0.3  # all of them find the token due before the first is back
    await asyncio.gather(*(r.ask() for r in replicas for _ in range(4)))
    assert rotating.spent == [FIRST_REFRESH] and rotating.reused == []
    assert set(authorizations(rotating)) == {"Bearer aoa-social-access-1"}


async def test_a_replica_started_with_the_rotated_away_file_takes_the_stored_login(
        replica, rotating, tmp_path):
    a = await replica("a")
    await a.ask()
    late = await replica("late")  # its file still holds aor-initial-refresh, spent now
    await late.ask()
    assert rotating.spent == [FIRST_REFRESH] and rotating.reused == []
    assert authorizations(rotating)[-1] == "Bearer aoa-social-access-1"
    assert late.file()["refreshToken"] == "aor-social-refresh-1"
    account = (await late.health())["accounts"][0]
    assert account["state"] == "ok" and account["refreshes"] == 0


async def test_the_next_generation_refreshes_from_the_stored_refresh_token(
        replica, rotating, redis_server):
    rotating.expires_in = 360  # due 60 s after it was issued
    clock = FakeClock()
    both = {"clock": kiro2api.Clock(clock.monotonic, clock.now)}
    a, b = await replica("a", **both), await replica("b", **both)
    await a.ask()  # initial -> 1
    await b.ask()
    clock.advance(70)
    await b.ask()  # 1 is due: b refreshes with a's refresh token -> 2
    await a.ask()
    clock.advance(70)
    await a.ask()  # 2 is due: a refreshes with b's -> 3
    assert rotating.spent == [FIRST_REFRESH, "aor-social-refresh-1", "aor-social-refresh-2"]
    assert rotating.reused == []
    record = await stored(redis_server.url)
    (login,) = [v for k, v in record.items() if k.startswith("kiro2api:login:")]
    assert login["version"] == "4"
    aliases = sorted(k for k in record if k.startswith("kiro2api:alias:"))
    assert len(aliases) == 4 and {record[k] for k in aliases} == {
        k.removeprefix("kiro2api:login:") for k in record if k.startswith("kiro2api:login:")}


async def test_a_kiro_api_key_account_is_one_record_for_every_replica(
        replica, fake_upstream, redis_server):
    key = "ksk_" + "k" * 40
    changes = {"token_files": (), "kiro_api_keys": (key,),
               "upstream": (fake_upstream.url + "/runtime#runtime",)}
    a, b = await replica("a", **changes), await replica("b", **changes)
    await a.ask()
    await b.ask()
    record = await stored(redis_server.url)
    assert [k for k in record if k.startswith("kiro2api:alias:")] == [
        f"kiro2api:alias:{kiro2api.state_digest(key)}"]
    assert not any(key in f"{k}{v}" for k, v in record.items())  # the key itself is not kept


# What one replica learns, the others know #################################

async def test_a_suspended_account_on_one_replica_is_not_called_by_the_others(
        replica, fake_upstream, proxy_config, tmp_path):
    url = fake_upstream.url
    service = {"upstream": (f"{url}/runtime#runtime", f"{url}/q")}

    def accounts(name):
        social = tmp_path / name / "social.json"
        social.parent.mkdir()
        helpers.write_token(social, method="social", mode=0o600)
        idc = tmp_path / name / "idc" / "token.json"
        idc.parent.mkdir()
        helpers.write_token(idc, method="idc", mode=0o600)
        return (social, idc)
    fake_upstream.suspended.add(helpers.SOCIAL_ACCESS)
    a = await replica("a", token_files=accounts("a"), **service)
    b = await replica("b", token_files=accounts("b"), **service)
    await a.ask()
    await wait_until(b, lambda h: h["accounts"][0]["state"] == "suspended")
    await b.ask()
    tokens = [c.headers["Authorization"] for c in fake_upstream.requests
              if c.path.startswith(("/runtime/", "/q/"))]
    assert tokens == [f"Bearer {helpers.SOCIAL_ACCESS}"] + [f"Bearer {helpers.IDC_ACCESS}"] * 2
    suspended = (await b.health())["accounts"][0]
    assert suspended["cooldown_seconds"] > 11 * 3600 and "suspended" in suspended[
        "cooldown_reason"]


async def test_the_way_one_replica_found_refused_the_others_skip(
        replica, fake_upstream):
    changes = {"upstream": (fake_upstream.url + "/q",),
               "kiro_version": convert.ClientVersions.parse("0.11.63")}
    a, b = await replica("a", **changes), await replica("b", **changes)
    await a.ask()
    assert fake_upstream.dialects == [("q", "ide"), ("q", "cli")]
    await wait_until(b, lambda h: h["accounts"][0]["shape"] == "cli")
    await b.ask()
    assert fake_upstream.dialects == [("q", "ide"), ("q", "cli"), ("q", "cli")]


async def test_one_replica_reads_the_usage_limits_for_the_fleet(
        replica, fake_upstream, redis_server):
    changes = {"upstream": (fake_upstream.url + "/runtime#runtime",)}
    a, b = await replica("a", **changes), await replica("b", **changes)
    busy = Status(429, {"message": "Too many requests, please wait before trying again."})
    fake_upstream.script.extend([busy, busy])
    with pytest.raises(anthropic.RateLimitError):
        await a.ask()  # a 429 may mean no credits: a reads the usage limits
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not any("usage" in json.loads(v.get("kiro", "{}")) and json.loads(v["kiro"])["usage"]
                  for k, v in (await stored(redis_server.url)).items() if ":health:" in k):
        assert loop.time() < deadline
        await asyncio.sleep(0.02)
    with pytest.raises(anthropic.RateLimitError):
        await b.ask()  # b takes a's answer
    reads = [c for c in fake_upstream.calls("/management/")
             if c.headers["x-amz-target"].endswith("GetUsageLimits")]
    assert len(reads) == 1


async def wait_until(replica, condition, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition(health := await replica.health()):
        assert loop.time() < deadline, health
        await asyncio.sleep(0.05)
    return health


# When Redis is away #######################################################

async def test_redis_away_at_start_serves_with_the_file_and_joins_when_it_comes(
        replica, rotating, redis_server, caplog, tmp_path):
    redis_server.stop()
    with caplog.at_level(logging.INFO, "kiro2api"):
        a = await replica("a", token_files=(token_copy(tmp_path, "a", expires_in=3600),))
        await a.ask()
        await a.ask()
    health = await a.health()
    assert health["status"] == "degraded"
    assert health["state_store"]["status"] == "degraded" and health["state_store"]["errors"]
    assert health["accounts"][0]["state"] == "ok"
    warnings = [r for r in caplog.records if "state store" in r.getMessage()]
    assert len(warnings) == 1, warnings  # said once, not once per request
    redis_server.start()
    health = await wait_until(a, lambda h: h["state_store"]["status"] == "ok", timeout=15)
    assert health["status"] == "ok" and rotating.spent == []


async def test_redis_away_no_early_refresh_and_an_expired_token_is_handed_over(
        replica, rotating, redis_server, tmp_path):
    clock = FakeClock()
    a = await replica("a", clock=kiro2api.Clock(clock.monotonic, clock.now))
    redis_server.stop()
    await a.ask()  # due early, but without the fleet's lock: not refreshed
    assert rotating.spent == []
    await a.ask()
    health = await a.health()
    assert health["accounts"][0]["state"] == "expiring"
    # Expired for real: refreshed alone, loudly, and handed over when Redis is back.
    clock.advance(120)
    await a.ask()
    assert rotating.spent == [FIRST_REFRESH]
    redis_server.start()
    await wait_until(a, lambda h: h["state_store"]["status"] == "ok", timeout=15)
    b = await replica("b")  # with the original file: takes the handed-over login
    await b.ask()
    assert rotating.spent == [FIRST_REFRESH] and rotating.reused == []
    assert b.file()["refreshToken"] == "aor-social-refresh-1"


# The command line #########################################################

def test_state_wants_a_redis_url():
    result = CliRunner().invoke(kiro2api.cli, ["server", "--state", "http://user:pw@host/"])
    assert result.exit_code == 2
    assert "is not a Redis URL" in result.output and "pw" not in result.output


def test_state_location_hides_the_password():
    assert kiro2api.state_location("rediss://kiro:s3cret@redis.internal:6380/2") == \
        "rediss://redis.internal:6380/2"
    assert kiro2api.state_location("unix:///run/redis.sock?db=1") == "unix:///run/redis.sock"


# Real server processes ####################################################

class ReplicaProcess:
    """``kiro2api server --state`` in a process of its own, with its own HOME holding
    a copy of the account's token file (at the default path: no --token-file)."""

    def __init__(self, tmp_path, name, fake, redis_url, expires_in):
        self.home = tmp_path / name
        self.token_file = self.home / ".aws" / "sso" / "cache" / "kiro-auth-token.json"
        self.token_file.parent.mkdir(parents=True)
        write_token_file(self.token_file, expiresAt=helpers.ide_time(expires_in))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable, kiro2api.__file__, "server", "--port", str(self.port),
            "--api-key", API_KEY, "--upstream", fake.url, "--social-auth-url", fake.url,
            "--oidc-url", fake.url, "--management-url", fake.url + "/management",
            "--state", redis_url, "--state-lock-seconds", "3"]
        self.log = self.home / "server.log"
        self.process = None

    async def start(self):
        with open(self.log, "wb") as log:
            self.process = await start_server_process(
                self.command, self.port, env={**child_env(), "HOME": str(self.home)},
                stdout=log, stderr=asyncio.subprocess.STDOUT)
        return self

    async def stop(self, how=signal.SIGTERM):
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(how)
            await self.process.wait()

    async def health(self):
        async with aiohttp.ClientSession() as session:
            async with session.get(self.url + "/health",
                                   headers={"x-api-key": API_KEY}) as response:
                return await response.json()


@pytest.fixture
async def processes(tmp_path, rotating, redis_server):
    """``await processes(name, expires_in=60)``: start one more replica process."""
    started = []

    async def start(name, expires_in=60.0):
        started.append(ReplicaProcess(tmp_path, name, rotating, redis_server.url, expires_in))
        return await started[-1].start()
    yield start
    for one in started:
        await one.stop()


class Load:
    """Clients sending requests round the replicas until ``stop``; every answer is
    checked against the SDK's type, and every failure kept."""

    def __init__(self, urls, clients=6):
        self.answers = 0
        self.failures: list[str] = []
        self._running = True
        self._clients = [anthropic.AsyncAnthropic(base_url=urls[n % len(urls)], api_key=API_KEY,
                                                  max_retries=0, timeout=30)
                         for n in range(clients)]
        self._tasks = [asyncio.create_task(self._run(c)) for c in self._clients]

    async def _run(self, client):
        while self._running:
            try:
                message = await client.messages.create(**BODY)
                assert isinstance(message, Message) and message.content[0].text == "Hello"
                self.answers += 1
            except Exception as exc:  # noqa: BLE001 -- every failure is the test's finding
                self.failures.append(repr(exc))
            await asyncio.sleep(0.02)

    async def stop(self):
        self._running = False
        await asyncio.gather(*self._tasks)
        for client in self._clients:
            await client.close()
        return self


@pytest.mark.slow  # three server processes, several seconds of load
async def test_three_replica_processes_under_load_refresh_each_generation_once(
        processes, rotating):
    rotating.expires_in = 302  # each new token is due two seconds after it was issued
    replicas = [await processes(name) for name in ("a", "b", "c")]
    load = Load([r.url for r in replicas])
    await asyncio.sleep(8)
    await load.stop()
    assert load.failures == [] and load.answers > 50
    assert rotating.reused == []
    generations = rotating.refreshes
    assert generations >= 3
    # One refresh per generation, each with the refresh token the one before gave.
    assert rotating.spent == [FIRST_REFRESH] + [
        f"aor-social-refresh-{n}" for n in range(1, generations)]
    # A replica started now with the original file serves with the fleet's login.
    late = await processes("late", expires_in=3600)
    client = anthropic.AsyncAnthropic(base_url=late.url, api_key=API_KEY, max_retries=0)
    await client.messages.create(**BODY)
    await client.close()
    assert rotating.reused == [] and rotating.refreshes in (generations, generations + 1)
    assert json.loads(late.token_file.read_text())["refreshToken"] != FIRST_REFRESH


@pytest.mark.slow  # server processes, a lock's time-to-live
async def test_a_replica_killed_holding_the_refresh_lock_delays_the_refresh_only(
        processes, rotating):
    a, b = await processes("a"), await processes("b")
    held = rotating.auth_gate = asyncio.Event()  # a's refresh reaches the auth, unanswered
    first = asyncio.create_task(ask_once(a.url))
    await rotating.wait_for("/refreshToken")
    await a.stop(signal.SIGKILL)
    first.cancel()
    rotating.auth_gate = None  # the killed replica's call stays unanswered for good
    loop = asyncio.get_running_loop()
    started = loop.time()
    load = Load([b.url], clients=3)
    await asyncio.sleep(0.5)
    assert load.answers == 0  # waiting for the lock, not failing
    while not load.answers:
        await asyncio.sleep(0.05)
        assert loop.time() - started < 10, load.failures
    waited = loop.time() - started
    await asyncio.sleep(0.3)
    await load.stop()
    assert load.failures == []
    assert 1.5 < waited < 8  # the lock's 3 s time-to-live, counted from a's refresh
    assert rotating.spent == [FIRST_REFRESH] and rotating.reused == []
    assert held.is_set() is False


async def ask_once(url):
    client = anthropic.AsyncAnthropic(base_url=url, api_key=API_KEY, max_retries=0)
    try:
        return await client.messages.create(**BODY)
    finally:
        await client.close()


@pytest.mark.slow  # server processes, Redis stopped and started under load
async def test_redis_stopped_under_load_and_started_again(processes, rotating, redis_server):
    # Valid for five more seconds before they are due: the outage makes them due.
    a, b = await processes("a", expires_in=305), await processes("b", expires_in=305)
    load = Load([a.url, b.url])
    await asyncio.sleep(1)
    redis_server.stop()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    for replica in (a, b):
        while (await replica.health())["state_store"]["status"] != "degraded":
            assert loop.time() < deadline
            await asyncio.sleep(0.1)
    await asyncio.sleep(6)  # the tokens are due now: no refresh without the fleet's lock
    assert rotating.spent == []
    health = await a.health()
    assert health["status"] == "degraded" and health["accounts"][0]["state"] == "expiring"
    redis_server.start()
    deadline = loop.time() + 20
    for replica in (a, b):
        while (await replica.health())["state_store"]["status"] != "ok":
            assert loop.time() < deadline
            await asyncio.sleep(0.1)
    while rotating.refreshes < 1:  # refreshes resume, one for the fleet
        assert loop.time() < deadline
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)
    await load.stop()
    assert load.failures == [] and load.answers > 50
    assert rotating.spent == [FIRST_REFRESH] and rotating.reused == []
    async with aiohttp.ClientSession() as session:
        async with session.get(a.url + "/metrics",
                               headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            metrics = await response.text()
    assert "kiro2api_state_store_up 1" in metrics
    errors = [line for line in metrics.splitlines()
              if line.startswith("kiro2api_state_store_errors_total ")]
    assert errors and int(errors[0].split()[1]) >= 1


async def test_nothing_secret_reaches_the_log_or_health(replica, rotating, redis_server,
                                                       caplog):
    with caplog.at_level(logging.INFO, "kiro2api"):
        a, b = await replica("a"), await replica("b")
        await a.ask()
        await b.ask()
        text = caplog.text + json.dumps(await b.health())
    for secret in (FIRST_REFRESH, "aoa-initial-access", "aor-social-refresh-1",
                   "aoa-social-access-1"):
        assert secret not in text
    assert "took the login the fleet stored" in text


async def test_a_unix_socket_url_works(replica, rotating, tmp_path):
    socket_path = tmp_path / "redis.sock"
    server = helpers.RedisServer(tmp_path, unix_socket=socket_path).start()
    try:
        a = await replica("a", state=f"unix://{socket_path}?db=3")
        b = await replica("b", state=f"unix://{socket_path}?db=3")
        await a.ask()
        await b.ask()
        assert rotating.spent == [FIRST_REFRESH]
        assert (await b.health())["state_store"] == {
            "location": f"unix://{socket_path}", "status": "ok", "problem": None, "errors": 0}
    finally:
        server.stop()


def test_state_without_the_redis_package_says_what_to_install(tmp_path):
    # The package hidden from a real process: an import of it fails, as when missing.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "redis.py").write_text("raise ImportError('no redis here')\n")
    done = subprocess.run(
        [sys.executable, kiro2api.__file__, "server", "--state", "redis://127.0.0.1:1/0"],
        env={**child_env(), "PYTHONPATH": str(hide)}, capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 2
    assert "pip install 'kiro2api[redis]'" in done.stderr


async def test_a_tls_url_works(replica, rotating, tmp_path):
    server = helpers.RedisServer(tmp_path, tls=True).start()
    try:
        a, b = await replica("a", state=server.url), await replica("b", state=server.url)
        await a.ask()
        await b.ask()
        assert rotating.spent == [FIRST_REFRESH]
        health = await b.health()
        assert health["state_store"]["status"] == "ok"
        assert health["state_store"]["location"] == f"rediss://localhost:{server.port}/0"
    finally:
        server.stop()


async def test_a_login_refreshed_alone_replaces_the_one_it_was_refreshed_from(
        replica, rotating, redis_server):
    rotating.expires_in = 360
    clock = FakeClock()
    both = {"clock": kiro2api.Clock(clock.monotonic, clock.now)}
    a, b = await replica("a", **both), await replica("b", **both)
    await a.ask()  # the fleet's login: version 1
    await b.ask()
    redis_server.stop()
    clock.advance(400)  # expired for real, with Redis away: b refreshes alone
    await b.ask()
    assert rotating.spent == [FIRST_REFRESH, "aor-social-refresh-1"]
    redis_server.start()
    await wait_until(b, lambda h: h["state_store"]["status"] == "ok", timeout=15)
    await wait_until(a, lambda h: h["state_store"]["status"] == "ok", timeout=15)
    await a.ask()  # takes b's login rather than refreshing the spent one
    assert rotating.spent == [FIRST_REFRESH, "aor-social-refresh-1"]
    assert rotating.reused == []
    assert authorizations(rotating)[-1] == "Bearer aoa-social-access-2"
