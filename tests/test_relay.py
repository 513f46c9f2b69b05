"""The relay and the error taxonomy: one Failure, rendered by each client API."""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import pytest

import convert
import eventstream
import kiro2api
from conftest import API_KEY

ANTHROPIC_BODY = {"model": "claude-sonnet-4-5", "max_tokens": 16,
                  "messages": [{"role": "user", "content": "Hi"}]}
OPENAI_BODY = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "Hi"}]}
ROUTES = [("/v1/messages", ANTHROPIC_BODY), ("/v1/chat/completions", OPENAI_BODY)]


async def post(url: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, headers={"x-api-key": API_KEY}) as response:
            return response.status, await response.json()


# Token trouble through the running app ####################################


@pytest.mark.parametrize(("route", "body"), ROUTES)
@pytest.mark.parametrize("stream", [False, True])
async def test_a_missing_token_file_is_a_503_saying_what_to_do(
        aiohttp_server, fake_upstream, proxy_config, tmp_path, route, body, stream):
    missing = tmp_path / "nowhere" / "kiro-auth-token.json"
    config = dataclasses.replace(proxy_config, token_files=(missing,))
    server = await aiohttp_server(kiro2api.make_app(config))
    status, answer = await post(str(server.make_url(route)), {**body, "stream": stream})
    assert status == 503
    if route == "/v1/messages":
        assert answer["type"] == "error"
        assert answer["error"]["type"] == "overloaded_error"
    else:
        assert set(answer["error"]) == {"message", "type", "param", "code"}
        assert answer["error"]["type"] == "server_error"
    message = answer["error"]["message"]
    assert str(missing) in message and "log in to Kiro" in message
    assert fake_upstream.calls("/generateAssistantResponse") == []


@pytest.mark.parametrize(("api", "error_type"), [
    (convert.ANTHROPIC_MESSAGES, "overloaded_error"), (convert.OPENAI_CHAT, "server_error")])
def test_a_stuck_token_lock_is_a_503(api, error_type):
    exc = kiro2api.TokenError("/t/token.json.lock stayed locked for 60 s; another kiro2api "
                              "seems stuck refreshing /t/token.json: stop it and try again")
    failure = kiro2api.failure_of(exc)
    assert (failure.kind, failure.status) == ("unavailable", 503)
    assert api.error_body(failure)["error"]["type"] == error_type
    assert "stop it and try again" in api.error_body(failure)["error"]["message"]


def test_token_file_errors_are_503_and_a_refused_refresh_token_401():
    assert kiro2api.failure_of(kiro2api.TokenFileError("x does not exist")).status == 503
    assert kiro2api.failure_of(kiro2api.RefreshError("down", status=500)).status == 503
    refused = kiro2api.failure_of(kiro2api.RefreshError(
        "log in to Kiro again", status=400, reason="invalid_grant", permanent=True))
    assert (refused.kind, refused.status) == ("authentication", 401)
    assert convert.anthropic_error(refused)["error"]["type"] == "authentication_error"
    assert convert.openai_error(refused)["error"]["type"] == "authentication_error"


# failure_of: one place for every exception #################################


@pytest.mark.parametrize(("exc", "kind", "status"), [
    (convert.ConversionError("bad", param="messages"), "invalid_request", 400),
    (convert.ConversionError("no such model", status=404), "not_found", 404),
    (convert.StreamError("ThrottlingException", "slow"), "rate_limit", 429),
    (convert.StreamError("InternalServerException", "oops"), "upstream", 502),
    (eventstream.ChecksumError("message", expected=1, actual=2, offset=0), "upstream", 502),
    (asyncio.TimeoutError(), "timeout", 504),
    (aiohttp.ClientPayloadError("cut"), "upstream", 502),
    (RuntimeError("a bug"), "internal", 500),
])
def test_failure_of_gives_kind_and_status(exc, kind, status):
    failure = kiro2api.failure_of(exc)
    assert (failure.kind, failure.status) == (kind, status)
    assert failure.message


def test_a_bug_is_the_internal_failure_the_middleware_logs():
    assert kiro2api.failure_of(KeyError("x")) is kiro2api.INTERNAL_FAILURE


def test_an_upstream_failure_keeps_its_retry_after_and_code():
    failure = convert.upstream_failure(429, '{"message": "slow down"}', retry_after="7")
    assert kiro2api.failure_of(kiro2api.UpstreamError(failure)) is failure
    assert (failure.retry_after, failure.code) == ("7", "rate_limit_exceeded")
    assert convert.openai_error(failure)["error"]["type"] == "rate_limit_exceeded"
    assert convert.anthropic_error(failure)["error"]["type"] == "rate_limit_error"


def test_every_kind_has_an_error_type_in_every_api():
    kinds = set(convert.STATUS_OF_KIND)
    assert set(convert.ANTHROPIC_ERROR_TYPES) == kinds
    assert set(convert.OPENAI_ERROR_TYPES) == kinds
    assert set(convert.KIND_OF_STATUS.values()) <= kinds


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request"), (405, "invalid_request"), (413, "too_large"), (418,
     "invalid_request"), (500, "internal"), (529, "overloaded"), (599, "internal")])
def test_a_bare_status_has_a_kind(status, kind):
    assert convert.failure(status, "m").kind == kind


# Renderers and client APIs ################################################


def test_every_renderer_keeps_the_contract():
    answer = convert.Answer(id="x_1", model="m", created=1, input_tokens=3)
    for api in (convert.ANTHROPIC_MESSAGES, convert.OPENAI_CHAT, convert.OPENAI_RESPONSES):
        renderer = api.renderer({"stream": True}, answer)
        assert isinstance(renderer, convert.EventConsumer)
        assert renderer.keepalive().endswith(b"\n\n")
        events = [convert.Text("Hi"), convert.Thinking("hm"), convert.ThinkingSignature("s"),
                  convert.RedactedThinking("r"), convert.ToolCall("t1", "f", "{}")]
        assert renderer.start() and renderer.render(events)
        assert renderer.finish("end_turn", convert.Usage(3, 1))
        assert b"error" in renderer.error(convert.failure(502, "broke"))
        body = renderer.collect(events, "tool_use", convert.Usage(3, 1))
        assert body["id"] == "x_1" and body["model"] == "m"


def test_a_consumer_missing_an_event_method_fails_when_made():
    class Incomplete(convert.EventConsumer):
        def on_text(self, event):
            return b""

    with pytest.raises(AttributeError, match="on_"):
        Incomplete()


def test_collect_matches_the_collect_functions():
    events = [convert.Text("a"), convert.Text("b"), convert.ToolCall("t1", "f", '{"x": 1}')]
    usage = convert.Usage(3, 2)
    anthropic = convert.AnthropicStream(message_id="m1", model="m", input_tokens=3)
    assert anthropic.collect(events, "tool_use", usage) == convert.collect_anthropic(
        events, message_id="m1", model="m", stop_reason="tool_use", usage=usage)
    openai = convert.OpenAIStream(completion_id="c1", model="m", created=5)
    assert openai.collect(events, "tool_use", usage) == convert.collect_openai(
        events, completion_id="c1", model="m", created=5, stop_reason="tool_use", usage=usage)


def test_the_openai_text_chunk_is_the_one_chunk_spelling():
    for include_usage in (False, True):
        stream = convert.OpenAIStream(completion_id="c", model="m", created=1,
                                      include_usage=include_usage)
        text = 'say "\u00e9\ud800"'
        assert stream.render([convert.Text(text)]) == stream._chunk(
            '{"content":%s}' % convert._json_string(text))
        assert stream.render([convert.Thinking(text)]) == stream._chunk(
            '{"reasoning_content":%s}' % convert._json_string(text))


async def test_the_profile_arn_reaches_the_upstream(proxy):
    import fakes

    proxy.fake.script.append(fakes.Stream(fakes.text("Hello") + fakes.tail()))
    status, _ = await post(proxy.url + "/v1/messages", ANTHROPIC_BODY)
    assert status == 200
    (call,) = proxy.fake.calls("/generateAssistantResponse")
    assert call.body["profileArn"] == "arn:aws:codewhisperer:us-east-1:111122223333:profile/FAKE"


def test_every_route_serves_its_api():
    app = kiro2api.make_app(kiro2api.Config(api_key=API_KEY))
    routes = {r.resource.canonical for r in app.router.routes() if r.method == "POST"}
    assert {route for route, _, _ in kiro2api.API_ROUTES} <= routes
