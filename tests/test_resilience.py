"""Faults between kiro2api and the upstream: retries, timeouts, clients that hang up."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import json
import os
import random
import socket
from datetime import datetime, timedelta, timezone

import aiohttp
import anthropic
import pytest

import fakes
import kiro2api
from fakes import Status, Stream
from helpers import API_KEY, parse_sse

BODY = {"model": "claude-sonnet-4-5", "max_tokens": 10,
        "messages": [{"role": "user", "content": "Hi"}]}


async def start(aiohttp_server, config, **changes):
    server = await aiohttp_server(kiro2api.make_app(dataclasses.replace(config, **changes)))
    return anthropic.AsyncAnthropic(base_url=str(server.make_url("")).rstrip("/"),
                                    api_key=config.api_key, max_retries=0)


async def start_app(aiohttp_server, app):
    server = await aiohttp_server(app)
    return anthropic.AsyncAnthropic(base_url=str(server.make_url("")).rstrip("/"),
                                    api_key=app[kiro2api.CONFIG].api_key, max_retries=0)


async def test_429_and_5xx_are_retried_before_the_first_byte(aiohttp_server, fake_upstream,
                                                              proxy_config):
    client = await start(aiohttp_server, proxy_config, retries=3)
    fake_upstream.script.extend([
        Status(503, {"message": "busy"}, {"Retry-After": "0"}),
        Status(429, {"message": "Too many requests"}, {"Retry-After": "0"}),
        Stream(fakes.text("finally") + fakes.tail()),
    ])
    message = await client.messages.create(**BODY)
    assert message.content[0].text == "finally"
    assert len(fake_upstream.calls("/generateAssistantResponse")) == 3


async def test_retries_stop_at_the_configured_count(aiohttp_server, fake_upstream, proxy_config):
    client = await start(aiohttp_server, proxy_config, retries=2)
    fake_upstream.script.extend(
        [Status(500, {"message": "boom"}, {"Retry-After": "0"})] * 4)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client.messages.create(**BODY)
    assert caught.value.status_code == 502
    assert len(fake_upstream.calls("/generateAssistantResponse")) == 3


async def test_client_errors_are_not_retried(aiohttp_server, fake_upstream, proxy_config):
    client = await start(aiohttp_server, proxy_config, retries=3)
    fake_upstream.script.append(Status(400, {"message": "Improperly formed request."}))
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.create(**BODY)
    assert len(fake_upstream.calls("/generateAssistantResponse")) == 1


async def test_retry_after_beyond_the_time_budget_is_not_waited_for(
        aiohttp_server, fake_upstream, proxy_config):
    client = await start(aiohttp_server, proxy_config, retries=3, retry_seconds=1.0)
    fake_upstream.script.append(Status(429, {"message": "slow down"}, {"Retry-After": "60"}))
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.create(**BODY)
    assert caught.value.response.headers["Retry-After"] == "60"
    assert len(fake_upstream.calls("/generateAssistantResponse")) == 1


async def test_unreachable_upstream_is_a_502_after_retries(aiohttp_server, unused_tcp_port,
                                                          proxy_config):
    client = await start(aiohttp_server, proxy_config, retries=1,
                         upstream=f"http://127.0.0.1:{unused_tcp_port}")
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client.messages.create(**BODY)
    assert caught.value.status_code == 502
    assert "could not reach Kiro" in caught.value.body["error"]["message"]


async def test_slow_first_byte_is_a_504(aiohttp_server, fake_upstream, proxy_config):
    client = await start(aiohttp_server, proxy_config, first_byte_timeout=0.2)
    fake_upstream.script.append(Status(200, {}, delay=2.0))
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client.messages.create(**BODY)
    assert caught.value.status_code == 504
    assert caught.value.body["error"]["type"] == "timeout_error"


async def test_silence_mid_stream_ends_with_an_error_event(aiohttp_server, fake_upstream,
                                                          proxy_config):
    client = await start(aiohttp_server, proxy_config, idle_timeout=0.3)
    fake_upstream.script.append(Stream(fakes.text("a", "b") + fakes.tail(), split=(60,),
                                       delay=1.0))
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with client.messages.stream(**BODY) as stream:
            async for _ in stream:
                pass
    assert "stopped sending" in str(caught.value)


async def test_slow_first_byte_is_a_504_in_the_openai_envelope(aiohttp_server, fake_upstream,
                                                               proxy_config):
    server = await aiohttp_server(kiro2api.make_app(
        dataclasses.replace(proxy_config, first_byte_timeout=0.2)))
    fake_upstream.script.append(Status(200, {}, delay=2.0))
    status, body = await post_json(server.make_url("/v1/chat/completions"), OPENAI_BODY)
    assert status == 504
    assert body["error"]["code"] == "timeout" and "--first-byte-timeout" in body["error"]["message"]


async def test_silence_before_the_first_byte_is_a_504_naming_the_idle_timeout(
        aiohttp_server, fake_upstream, proxy_config):
    server = await aiohttp_server(kiro2api.make_app(
        dataclasses.replace(proxy_config, idle_timeout=0.2, first_byte_timeout=30)))
    fake_upstream.script.append(Status(200, {}, delay=2.0))
    status, body = await asyncio.wait_for(
        post_json(server.make_url("/v1/chat/completions"), OPENAI_BODY), 10)
    assert status == 504
    assert body["error"]["code"] == "timeout" and "--idle-timeout" in body["error"]["message"]


async def test_the_watchdog_forgets_every_call_once_it_is_over(aiohttp_server, fake_upstream,
                                                               proxy_config):
    app = kiro2api.make_app(proxy_config)
    client = await start_app(aiohttp_server, app)
    fake_upstream.script.extend([Stream(fakes.text("a", "b") + fakes.tail()),
                                 Status(400, {"message": "Improperly formed request."})])
    async with client.messages.stream(**BODY) as stream:
        assert await stream.get_final_text() == "ab"
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.create(**BODY)
    assert app[kiro2api.WATCHDOG].watches == set()


# The watchdog's rules, on a clock of its own (``check(now)``), no waiting.

async def watched(**limits):
    watchdog = kiro2api.Watchdog(kiro2api.Config(**limits))
    return watchdog, watchdog.watch()


async def test_the_watchdog_ticks_a_tenth_of_the_shorter_limit_at_most_a_second():
    assert kiro2api.Watchdog(kiro2api.Config()).tick == 1.0
    assert kiro2api.Watchdog(kiro2api.Config(idle_timeout=0.3, first_byte_timeout=5)).tick \
        == pytest.approx(0.03)


async def test_a_call_waiting_in_silence_is_aborted_once_the_idle_limit_is_past():
    watchdog, watch = await watched(idle_timeout=10, first_byte_timeout=1000)
    watch.first_byte_by = float("inf")
    watch.wait()  # the request is out
    watchdog.check(100.0)  # the change is seen: silence counts from this tick
    watchdog.check(109.9)
    assert watch.expired is None
    watchdog.check(110.0)
    assert watch.expired == kiro2api.IDLE and watch not in watchdog.watches
    assert isinstance(watch.timeout(), aiohttp.ServerTimeoutError)


async def test_every_read_and_every_pause_of_the_caller_restarts_the_idle_clock():
    watchdog, watch = await watched(idle_timeout=10, first_byte_timeout=1000)
    watch.first_byte_by = float("inf")
    watch.wait()
    watchdog.check(100.0)
    watch.turns += 2  # a read came in and the next one began
    watchdog.check(108.0)
    watchdog.check(117.0)
    assert watch.expired is None
    watch.turns += 1  # the caller writes to a slow client: not waiting on Kiro
    for now in (120.0, 200.0, 300.0):
        watchdog.check(now)
    assert watch.expired is None
    watch.turns += 1  # reading again
    watchdog.check(301.0)
    watchdog.check(310.9)
    assert watch.expired is None
    watchdog.check(311.0)
    assert watch.expired == kiro2api.IDLE


async def test_a_call_without_its_first_bytes_is_aborted_at_the_first_byte_limit():
    watchdog, watch = await watched(idle_timeout=1000, first_byte_timeout=20)
    watch.wait()
    deadline = watch.first_byte_by
    watchdog.check(deadline - 0.01)
    watch.turns += 2  # the headers came, not the body
    watchdog.check(deadline - 0.005)
    assert watch.expired is None
    watchdog.check(deadline)
    assert watch.expired == kiro2api.FIRST_BYTE
    timeout = watch.timeout()
    assert isinstance(timeout, asyncio.TimeoutError)
    assert not isinstance(timeout, aiohttp.ServerTimeoutError)  # so the 504 names this limit


# Retries ##################################################################

OPENAI_BODY = {"model": "claude-sonnet-4-5", "max_tokens": 10,
               "messages": [{"role": "user", "content": "Hi"}]}


async def post_json(url, body, **kwargs):
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, headers={"x-api-key": API_KEY},
                                **kwargs) as response:
            return response.status, await response.json(content_type=None)


def test_retry_after_is_read_as_seconds_or_as_an_http_date():
    soon = datetime.now(timezone.utc) + timedelta(seconds=90)
    assert kiro2api.parse_retry_after(" 7 ") == 7.0
    assert 80 <= kiro2api.parse_retry_after(email.utils.format_datetime(soon, usegmt=True)) <= 90
    assert kiro2api.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # past: now
    for unreadable in (None, "", "soon", "-3", "1.5e3"):
        assert kiro2api.parse_retry_after(unreadable) is None


def test_backoff_doubles_each_attempt_with_jitter():
    for attempt in range(1, 6):
        base = kiro2api.RETRY_BASE_SECONDS * 2 ** (attempt - 1)
        delays = {kiro2api.retry_delay(attempt, None) for _ in range(50)}
        assert all(0.75 * base <= d <= 1.25 * base for d in delays)
        assert len(delays) > 1  # jittered, so clients that failed together spread out
    assert kiro2api.retry_delay(3, "2") == 2.0  # the upstream's Retry-After wins


async def test_retry_after_date_beyond_the_budget_is_not_waited_for(
        aiohttp_server, fake_upstream, proxy_config):
    client = await start(aiohttp_server, proxy_config, retries=3, retry_seconds=5.0)
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    fake_upstream.script.extend([
        Status(503, {"message": "busy"}, {"Retry-After": email.utils.format_datetime(
            later, usegmt=True)}),
        Stream(fakes.text("too late") + fakes.tail())])
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client.messages.create(**BODY)
    assert caught.value.status_code == 503
    assert len(fake_upstream.calls("/generateAssistantResponse")) == 1


async def test_a_failure_after_the_first_byte_is_never_retried(aiohttp_server, fake_upstream,
                                                               proxy_config):
    server = await aiohttp_server(kiro2api.make_app(
        dataclasses.replace(proxy_config, retries=3, retry_seconds=30.0)))
    fake_upstream.script.append(Stream(fakes.text("Hello") + [
        fakes.exception("ThrottlingException", "slow down")]))
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/messages"), json={**BODY, "stream": True},
                                headers={"x-api-key": API_KEY}) as response:
            assert response.status == 200
            text = (await response.read()).decode()
    assert parse_sse(text, comments=True)[-1][0] == "error"
    assert "message_stop" not in text
    assert len(fake_upstream.calls("/generateAssistantResponse")) == 1


@pytest.mark.parametrize("route", ["/v1/messages", "/v1/chat/completions"])
async def test_a_failed_refresh_after_a_rejected_token_is_a_401_saying_log_in_again(
        proxy, route):
    proxy.fake.script.append(Status(403, {
        "message": "The bearer token included in the request is invalid."}))
    proxy.fake.auth_script.append(Status(400, {"error": "invalid_grant",
                                               "error_description": "Invalid refresh token"}))
    status, body = await post_json(proxy.url + route, BODY)
    assert status == 401
    assert body["error"]["type"] == "authentication_error"
    assert "log in to Kiro again" in body["error"]["message"]
    assert len(proxy.fake.calls("/refreshToken")) == 1
    assert len(proxy.fake.calls("/generateAssistantResponse")) == 1


# Timeouts #################################################################


@pytest.fixture
def black_hole():
    """A port whose listen queue is full: connecting to it hangs until timed out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # Linux queues backlog + 1; later SYNs are dropped, not refused
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for s in (*fillers, listener):
        s.close()


@pytest.mark.parametrize(("route", "kind"), [("/v1/messages", ("type", "timeout_error")),
                                             ("/v1/chat/completions", ("code", "timeout"))])
async def test_connect_timeout_is_a_504_naming_the_limit(aiohttp_server, proxy_config,
                                                        black_hole, route, kind):
    server = await aiohttp_server(kiro2api.make_app(dataclasses.replace(
        proxy_config, upstream=f"http://127.0.0.1:{black_hole}", connect_timeout=0.3)))
    status, body = await asyncio.wait_for(post_json(server.make_url(route), BODY), 10)
    assert status == 504
    assert body["error"][kind[0]] == kind[1]
    assert "could not connect to Kiro" in body["error"]["message"]
    assert "--connect-timeout" in body["error"]["message"]


async def test_silence_mid_stream_ends_the_openai_stream_with_an_error_chunk(
        aiohttp_server, fake_upstream, proxy_config):
    server = await aiohttp_server(kiro2api.make_app(
        dataclasses.replace(proxy_config, idle_timeout=0.3)))
    fake_upstream.script.append(Stream(fakes.text("a", "b") + fakes.tail(), split=(60,),
                                       delay=1.0))
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/chat/completions"),
                                json={**OPENAI_BODY, "stream": True},
                                headers={"x-api-key": API_KEY}) as response:
            text = (await asyncio.wait_for(response.read(), 10)).decode()
    last = parse_sse(text, comments=True)[-1][1]
    assert "stopped sending" in last["error"]["message"]
    assert "[DONE]" not in text


# Clients that hang up #####################################################


def request_bytes(path: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n")
    return head.encode() + body


async def hang_up(port: int, request: bytes, rng: random.Random) -> bytes:
    """Send ``request`` and hang up at a random point; what was read before it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        where = rng.choice(("sending", "waiting", "reading", "reading", "never"))
        if where == "sending":
            writer.write(request[:rng.randrange(1, len(request))])
            await writer.drain()
            return received
        writer.write(request)
        await writer.drain()
        if where == "waiting":
            await asyncio.sleep(rng.uniform(0, 0.01))
        elif where == "reading":
            want = rng.randrange(1, 3000)
            while len(received) < want and (chunk := await reader.read(want - len(received))):
                received += chunk
        else:
            received = await reader.read()
        return received
    finally:
        if rng.random() < 0.5:
            writer.transport.abort()  # RST
        else:
            writer.close()  # FIN
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def held_sockets(port: int) -> int:
    """Sockets of this network namespace connected to ``port`` that someone still holds
    (every TCP state but TIME_WAIT, which no descriptor holds)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] != "06":
                    count += 1
    return count


def snapshot(fake: fakes.FakeUpstream) -> dict[str, int]:
    return {"file descriptors": len(os.listdir("/proc/self/fd")),
            "tasks": len(asyncio.all_tasks()),
            "upstream connections": held_sockets(int(fake.url.rsplit(":", 1)[1])),
            "upstream answers being written": fake.streaming}


HANG_UPS = 1000
CONCURRENCY = 50


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts through /proc (Linux)")
@pytest.mark.slow  # over a second
async def test_a_thousand_clients_hanging_up_at_random_leave_nothing_behind(
        aiohttp_server, fake_upstream, proxy_config):
    app = kiro2api.make_app(proxy_config)
    server = await aiohttp_server(app)  # handler_cancellation, as ``serve`` runs it
    rng = random.Random(7)
    bodies = []
    for stream in (True, False):
        bodies.append(request_bytes("/v1/messages", json.dumps({**BODY, "stream": stream})
                                    .encode()))
        bodies.append(request_bytes("/v1/chat/completions", json.dumps(
            {**OPENAI_BODY, "stream": stream}).encode()))

    # Warm up: CONCURRENCY answers at once, slow enough to overlap, leave the
    # proxy's pool of upstream connections at the size the run can use.
    fake_upstream.script.extend(Stream(fakes.text("warm") + fakes.tail(), first_byte_delay=0.3)
                                for _ in range(CONCURRENCY))
    await asyncio.gather(*(hang_up(server.port, bodies[0], random.Random("never"))
                           for _ in range(CONCURRENCY)))
    before = snapshot(fake_upstream)
    assert before["upstream connections"] <= CONCURRENCY

    fake_upstream.script.extend(
        Stream(fakes.text(*(f"part {i} " for i in range(20))) + fakes.tail(), split=(40, 90),
               delay=rng.choice((0, 0.001, 0.003)), first_byte_delay=rng.choice((0, 0.005)))
        for _ in range(HANG_UPS))
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> bytes:
        async with gate:
            return await hang_up(server.port, bodies[i % len(bodies)], random.Random(i))

    answers = await asyncio.gather(*(one(i) for i in range(HANG_UPS)))
    assert sum(b" 200 OK" in a for a in answers) > HANG_UPS // 4  # many got under way
    deadline = asyncio.get_running_loop().time() + 10
    while (after := snapshot(fake_upstream)) != before and any(
            after[k] > before[k] for k in after):
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert {k: after[k] - before[k] for k in after if after[k] > before[k]} == {}, (before, after)
    assert fake_upstream.interrupted > 50  # upstream answers were cut, not read to the end
    assert app[kiro2api.STREAMS] == set()


async def test_a_client_hanging_up_mid_stream_closes_the_upstream_answer(proxy):
    proxy.fake.script.append(Stream(fakes.text(*(f"{i} " for i in range(3000))) + fakes.tail(),
                                    split=(60,), delay=0.02))  # a minute long
    port = int(proxy.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes("/v1/messages", json.dumps({**BODY, "stream": True}).encode()))
    received = b""
    while b"content_block_delta" not in received:
        received += await asyncio.wait_for(reader.read(4096), 10)
    writer.transport.abort()
    await proxy.fake.wait_for("/generateAssistantResponse")
    deadline = asyncio.get_running_loop().time() + 10
    while proxy.fake.streaming and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert (proxy.fake.streaming, proxy.fake.interrupted) == (0, 1)
