"""``--workers N``: N real server processes on one port, under one supervisor, in
front of the fake upstream; and the tallies they add up (``kiro2api.Tally``)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys

import aiohttp
import anthropic
import pytest
from anthropic.types import Message
from click.testing import CliRunner

import convert
import fakes
import helpers
import kiro2api
from fakes import Stream
from helpers import API_KEY, child_env, free_port, parse_sse, start_server_process

BODY = {"model": "claude-sonnet-4-5", "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hi"}]}
KEYED = {"x-api-key": API_KEY}


# The tallies, without processes ###########################################

def busy_metrics() -> kiro2api.Metrics:
    metrics = kiro2api.Metrics()
    metrics.count_request("/v1/messages", 200, 0.2)
    metrics.count_request("/v1/messages", 429, 0.01)
    metrics.count_request("/v1/chat/completions", 200, 3.0)
    metrics.observe_first_byte(0.3)
    metrics.retries, metrics.failovers = 2, 1
    metrics.safeguard_checks["allowed"] += 3
    return metrics


def test_tallies_added_up_count_what_each_worker_counted():
    one = kiro2api.Tally(busy_metrics(), 3, {"a.json": [1, 0, 0.5]})
    other = kiro2api.Tally(busy_metrics(), 2, {"a.json": [2, 1, 0.25], "b.json": [0, 0, 1.0]})
    whole = kiro2api.Tally()
    for tally in (one, other):
        whole.add(tally.state())
    metrics = whole.metrics
    assert metrics.requests == {("/v1/messages", 200): 2, ("/v1/messages", 429): 2,
                                ("/v1/chat/completions", 200): 2}
    assert (metrics.retries, metrics.failovers, dict(metrics.safeguard_checks)) == (
        4, 2, {"allowed": 6})
    assert metrics.upstream_first_byte.count == 2
    assert metrics.upstream_first_byte.sum == pytest.approx(0.6)
    durations = metrics.request_duration["/v1/messages"]
    assert durations.count == 4 and durations.counts[0] == 2  # the two 0.01 s answers
    assert whole.streams_open == 5
    assert whole.accounts == {"a.json": [3, 1, 0.75], "b.json": [0, 0, 1.0]}
    # The status page's last hour too: four requests of this minute on /v1/messages.
    now = kiro2api.time.monotonic()
    assert metrics.recent.totals(now)[("/v1/messages", 200)] == 2
    assert metrics.recent.series(now)[-1]["requests"] == 6


def test_a_tally_survives_json_and_an_older_minute_does_not_reset_a_newer_one():
    ring = kiro2api.MinuteRing()
    ring.count_request("/v1/messages", 200, now=3600.0)  # minute 60, slot 0
    old = kiro2api.MinuteRing()
    old.count_request("/v1/messages", 500, now=0.0)  # minute 0, slot 0: an hour older
    ring.add(kiro2api.json.loads(kiro2api.json.dumps(old.state())))
    assert ring.totals(3600.0) == {("/v1/messages", 200): 1}
    newer = kiro2api.MinuteRing()
    newer.count_request("/v1/messages", 201, now=7200.0)  # minute 120 replaces 60
    ring.add(newer.state())
    assert ring.totals(7200.0) == {("/v1/messages", 201): 1}


@pytest.fixture
def served(monkeypatch):
    seen: list[kiro2api.Config] = []
    monkeypatch.setattr(kiro2api, "serve", seen.append)
    return seen


def test_workers_from_the_option_or_the_variable_and_at_least_one(served, monkeypatch):
    assert CliRunner().invoke(kiro2api.cli, ["server"]).exit_code == 0
    monkeypatch.setenv("KIRO2API_WORKERS", "2")
    assert CliRunner().invoke(kiro2api.cli, ["server"]).exit_code == 0
    assert CliRunner().invoke(kiro2api.cli, ["server", "--workers", "3"]).exit_code == 0
    assert [config.workers for config in served] == [1, 2, 3]
    result = CliRunner().invoke(kiro2api.cli, ["server", "--workers", "0"])
    assert result.exit_code == 2 and "--workers" in result.output


# Real processes ###########################################################

class Workers:
    """``kiro2api server --workers N`` in front of ``fake``, its log in a file."""

    def __init__(self, tmp_path, fake, n=2, *extra, expires_in=3600.0, upstream=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "server.log"
        self.token_file = helpers.write_token_file(tmp_path / "kiro-auth-token.json",
                                                   expiresAt=helpers.ide_time(expires_in))
        self.command = [
            sys.executable, kiro2api.__file__, "server", "--workers", str(n),
            "--port", str(self.port), "--api-key", API_KEY, "--token-file",
            str(self.token_file), "--upstream", upstream or fake.url, "--social-auth-url", fake.url,
            "--oidc-url", fake.url, "--management-url", fake.url + "/management", *extra]
        self.process = None

    async def start(self):
        with open(self.log, "wb") as log:
            self.process = await start_server_process(
                self.command, self.port, env=child_env(), stdout=log,
                stderr=asyncio.subprocess.STDOUT)
        await self.until(lambda: len(self.pids()) >= 2 and self.lines("listening on") >= 2)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self, needle: str) -> int:
        return sum(needle in line for line in self.text().splitlines())

    def pids(self) -> dict[int, int]:
        """Each worker's latest pid, from the supervisor's log."""
        return {int(k): int(pid) for k, pid in
                re.findall(r"worker (\d+) started \(pid (\d+)\)", self.text())}

    async def until(self, condition, timeout=15.0):
        for _ in range(int(timeout / 0.05)):
            if condition():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"not within {timeout} s; the log:\n{self.text()[-3000:]}")

    async def get(self, path):
        """GET on a connection of its own (so the kernel may pick either worker)."""
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(self.url + path, headers=KEYED) as response:
                assert response.status == 200
                return await (response.json() if path == "/health" else response.text())

    async def answered_by(self, worker, condition=lambda health: True, tries=200):
        """/health as worker ``worker`` answers it, once ``condition`` holds there."""
        for _ in range(tries):
            health = await self.get("/health")
            if health["worker"] == worker and condition(health):
                return health
            await asyncio.sleep(0.01)
        raise AssertionError(f"worker {worker} never answered so")

    async def stop(self, how=signal.SIGTERM):
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(how)
            return await asyncio.wait_for(self.process.wait(), 30)
        return self.process.returncode if self.process else None


@pytest.fixture
async def workers(tmp_path, fake_upstream):
    started = []

    async def start(*extra, n=2, **options):
        started.append(Workers(tmp_path, fake_upstream, n, *extra, **options))
        return await started[-1].start()
    yield start
    for one in started:
        await one.stop(signal.SIGKILL)


async def ask(url, clients=1, each=1):
    """``clients`` SDK clients asking ``each`` questions each, all answers checked."""
    async def one():
        client = anthropic.AsyncAnthropic(base_url=url, api_key=API_KEY, max_retries=0)
        try:
            for _ in range(each):
                message = await client.messages.create(**BODY)
                assert isinstance(message, Message) and message.content[0].text == "Hello"
        finally:
            await client.close()
    await asyncio.gather(*(one() for _ in range(clients)))


def metric(text: str, name: str) -> float:
    found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith(name + " ") or line.startswith(name + "{")]
    assert len(found) == 1, (name, found)
    return found[0]


MESSAGES_200 = 'kiro2api_requests_total{route="/v1/messages",status="200"}'


@pytest.mark.slow
async def test_two_workers_answer_on_one_port_and_metrics_count_both(workers, fake_upstream):
    server = await workers()
    await ask(server.url, clients=10, each=3)
    served_by = {k: server.lines(f"(worker {k}): request_id") for k in (1, 2)}
    assert sum(served_by.values()) == 30 and min(served_by.values()) > 0, served_by
    for worker in (1, 2):  # whichever answers counts both
        health = await server.answered_by(worker)
        assert health["accounts"][0]["credits"] == pytest.approx(0.3)
        assert health["workers"] == {"running": 2, "restarts": 0}
        for _ in range(20):
            text = await server.get("/metrics")
            assert metric(text, MESSAGES_200) == 30
            assert metric(text, "kiro2api_credits_total") == pytest.approx(0.3)
    status = await server.get("/v1/status")
    assert '"credits_spent": 0.3' in status


@pytest.mark.slow
async def test_health_one_worker_learns_the_other_knows(workers, fake_upstream):
    # The IDE shape is refused on /q for an old client version: the worker that
    # learns it shares the way that works, and the other never tries the IDE shape.
    server = await workers("--kiro-version", "0.11.63", upstream=fake_upstream.url + "/q")
    await ask(server.url)
    assert fake_upstream.dialects == [("q", "ide"), ("q", "cli")]
    for worker in (1, 2):
        await server.answered_by(worker, lambda h: h["accounts"][0]["shape"] == "cli")
    await ask(server.url, clients=8, each=2)
    assert fake_upstream.dialects == [("q", "ide")] + [("q", "cli")] * 17


@pytest.mark.slow
async def test_a_refresh_under_load_happens_once(workers, fake_upstream):
    fake_upstream.rotate = True
    server = await workers(expires_in=60.0)  # due: the first requests refresh it
    await ask(server.url, clients=12, each=4)
    assert fake_upstream.refreshes == 1 and fake_upstream.reused == []
    assert min(server.lines(f"(worker {k}): request_id") for k in (1, 2)) > 0
    assert server.lines("refreshed") >= 1


async def long_stream(url):
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/messages", json={**BODY, "stream": True},
                                headers=KEYED) as response:
            return (await response.read()).decode()


@pytest.mark.slow
async def test_sigterm_ends_every_worker_s_streams_in_band_and_exits_0(workers, fake_upstream):
    server = await workers("--shutdown-timeout", "0.5")
    for _ in range(12):
        fake_upstream.script.append(Stream(fakes.text(*"abcdefghij") + fakes.tail(),
                                           split=(60,), delay=0.5))
    readers = [asyncio.create_task(long_stream(server.url)) for _ in range(12)]
    await fake_upstream.wait_for("/generateAssistantResponse", count=12)
    assert await server.stop() == 0
    for body in await asyncio.gather(*readers):
        assert "message_stop" not in body
        name, last = parse_sse(body)[-1]
        assert name == "error" and "shutting down" in last["error"]["message"]
    text = server.text()
    for worker in (1, 2):
        assert f"(worker {worker}): shutting down: waiting up to 0.5 s" in text, text
        assert f"(worker {worker}): kiro2api stopped" in text
    assert text.rstrip().endswith("kiro2api: kiro2api stopped")
    for pid in server.pids().values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
async def test_a_killed_worker_comes_back_and_the_counts_stay(workers, fake_upstream):
    server = await workers()
    await ask(server.url, clients=6, each=2)
    before = metric(await server.get("/metrics"), MESSAGES_200)
    assert before == 12
    old = server.pids()[1]
    os.kill(old, signal.SIGKILL)
    await server.until(lambda: server.pids()[1] != old)
    assert f"worker 1 (pid {old}) was killed by SIGKILL" in server.text()
    await server.until(lambda: server.lines("(worker 1): kiro2api") >= 2)  # listening again
    await server.answered_by(1)
    await ask(server.url, clients=2)
    text = await server.get("/metrics")
    assert metric(text, MESSAGES_200) == 14
    assert metric(text, "kiro2api_workers") == 2
    assert metric(text, "kiro2api_worker_restarts_total") == 1


@pytest.mark.slow
async def test_workers_stop_when_their_supervisor_is_killed(workers):
    server = await workers()
    pids = list(server.pids().values())
    await server.stop(signal.SIGKILL)
    await server.until(lambda: server.lines("the supervisor went away") == 2)
    for pid in pids:
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"worker pid {pid} outlived its supervisor")


@pytest.mark.slow
async def test_a_port_in_use_stops_the_supervisor_before_any_worker(tmp_path):
    import socket

    token_file = helpers.write_token_file(tmp_path / "token.json")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable, kiro2api.__file__, "server", "--workers", "2", "--port", str(port),
            "--api-key", API_KEY, "--token-file", str(token_file),
            stderr=asyncio.subprocess.PIPE, env=child_env())
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    lines = err.decode().splitlines()
    assert lines[-1].startswith(f"Error: cannot listen on 127.0.0.1:{port}: "), lines
    assert not any("started (pid" in line for line in lines)


def test_the_config_a_worker_is_handed_comes_back_whole():
    config = kiro2api.Config(api_key="k", model_map={"a": "b"}, workers=2, worker=1,
                             hub="/tmp/x", kiro_version=convert.ClientVersions.parse("0.11.63"))
    again = kiro2api.pickle.loads(kiro2api.pickle.dumps(config))
    assert again == config and again.api_key == "k"


@pytest.mark.slow
async def test_workers_with_state_share_health_through_redis_and_count_through_the_hub(
        workers, fake_upstream, redis_server):
    fake_upstream.rotate = True
    server = await workers("--kiro-version", "0.11.63", "--state", redis_server.url,
                           upstream=fake_upstream.url + "/q", expires_in=60.0)
    await ask(server.url)
    for worker in (1, 2):
        health = await server.answered_by(worker, lambda h: h["accounts"][0]["shape"] == "cli")
        assert health["state_store"]["status"] == "ok"
    await ask(server.url, clients=8, each=2)
    assert fake_upstream.dialects == [("q", "ide")] + [("q", "cli")] * 17
    assert fake_upstream.refreshes == 1 and fake_upstream.reused == []
    assert metric(await server.get("/metrics"), MESSAGES_200) == 17


def test_workers_are_for_linux_only(served, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    result = CliRunner().invoke(kiro2api.cli, ["server", "--workers", "2"])
    assert result.exit_code == 2 and "--workers needs Linux" in result.output
    assert CliRunner().invoke(kiro2api.cli, ["server"]).exit_code == 0
    assert [config.workers for config in served] == [1]


@pytest.mark.slow  # worker processes
async def test_a_worker_that_dies_before_it_listens_stops_the_server_with_its_status(
        monkeypatch, caplog):
    # A worker that fails at its start (here: one that exits 3 at once) is no
    # worker to start again and again: the others stop, and so does the server.
    monkeypatch.setattr(kiro2api, "WORKER_BOOT", "import sys; sys.exit(3)")
    caplog.set_level("INFO", logger="kiro2api")
    config = kiro2api.Config(port=free_port(), api_key=API_KEY, workers=2)
    status = await asyncio.wait_for(kiro2api.supervise(config), 30)
    assert status == 3
    assert "exited with status 3 before it listened; stopping the server" in caplog.text
    assert caplog.text.rstrip().endswith("kiro2api stopped")
