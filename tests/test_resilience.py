"""Faults between kiro2api and the upstream: retries, timeouts, hang-ups."""

from __future__ import annotations

import dataclasses

import anthropic
import pytest

import fakes
import kiro2api
from fakes import Status, Stream

BODY = {"model": "claude-sonnet-4-5", "max_tokens": 10,
        "messages": [{"role": "user", "content": "Hi"}]}


async def start(aiohttp_server, config, **changes):
    server = await aiohttp_server(kiro2api.make_app(dataclasses.replace(config, **changes)))
    return anthropic.AsyncAnthropic(base_url=str(server.make_url("")).rstrip("/"),
                                    api_key=config.api_key, max_retries=0)


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
