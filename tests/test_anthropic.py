"""/v1/messages end to end: the anthropic SDK -> kiro2api -> the fake upstream."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import aiohttp
import anthropic
import pydantic
import pytest
from anthropic.types import ErrorResponse, Message, RawMessageStreamEvent

import fakes
import kiro2api
from fakes import Status, Stream
from helpers import API_KEY, Proxy, parse_sse, write_token_file

STREAM_EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
BASIC = {"model": "claude-sonnet-4-5", "max_tokens": 1024,
         "messages": [{"role": "user", "content": "Hi"}]}
UNICODE = "héllo, 世界 🎉 ok"


async def raw_sse(proxy, body, headers=None):
    """POST a streaming request and return [(event line, parsed data)], validated."""
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/messages", json={**body, "stream": True},
                                headers={"x-api-key": API_KEY, **(headers or {})}) as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"].startswith("text/event-stream")
            raw = await response.read()
    events = parse_sse(raw)
    for name, data in events:
        assert data["type"] == name, (name, data)
        if name == "ping":  # not in the SDK's event union; it skips pings itself
            assert data == {"type": "ping"}
        elif name == "error":
            ErrorResponse.model_validate(data)
        else:
            STREAM_EVENT.validate_python(data)
    assert raw.endswith(b"\n\n")
    return events


def check_block_order(events):
    """Indexes are contiguous from 0, every block starts, gets deltas, then stops."""
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"]
    open_index, next_index = None, 0
    for name, data in events[2:]:
        if name == "content_block_start":
            assert open_index is None and data["index"] == next_index
            open_index, next_index = data["index"], next_index + 1
        elif name == "content_block_delta":
            assert data["index"] == open_index
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
        else:
            assert open_index is None, f"{name} while block {open_index} is open"


async def test_streaming_text_with_characters_split_across_reads(proxy):
    chunks = ["hé", "llo, 世", "界 🎉", " ok"]
    proxy.fake.script.append(Stream(fakes.text(*chunks) + fakes.tail(), split=(1, 2, 3)))
    events = await raw_sse(proxy, BASIC)
    check_block_order(events)
    names = [name for name, _ in events]
    assert names == ["message_start", "ping", "content_block_start"] + \
        ["content_block_delta"] * 4 + ["content_block_stop", "message_delta", "message_stop"]
    deltas = [d["delta"]["text"] for n, d in events if n == "content_block_delta"]
    assert deltas == chunks
    assert events[0][1]["message"]["model"] == "claude-sonnet-4-5"
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"


async def test_sdk_stream_accumulates_text(proxy):
    proxy.fake.script.append(Stream(fakes.text("héllo, 世", "界 🎉", " ok") + fakes.tail(),
                                    split=(1,)))
    async with proxy.anthropic().messages.stream(**BASIC) as stream:
        message = await stream.get_final_message()
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == UNICODE
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens > 0


async def test_streaming_tool_use_input_parses(proxy):
    frames = (fakes.text("Let me look.")
              + fakes.tool("tooluse_1", "read_file", '{"pa', 'th": "a.', 'txt"}')
              + fakes.tool("tooluse_2", "list_dir", '{"dir": "."}')
              + fakes.tail())
    proxy.fake.script.append(Stream(frames, split=(5, 1, 17)))
    events = await raw_sse(proxy, BASIC)
    check_block_order(events)
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use", "tool_use"]
    assert [b.get("id") for b in starts[1:]] == ["tooluse_1", "tooluse_2"]
    assert all(b["input"] == {} for b in starts[1:])
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"

    proxy.fake.script.append(Stream(frames, split=(3,)))
    async with proxy.anthropic().messages.stream(**BASIC) as stream:
        message = await stream.get_final_message()
    assert message.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in message.content] == [
        ("text", None), ("tool_use", {"path": "a.txt"}), ("tool_use", {"dir": "."})]


async def test_non_streaming_message(proxy):
    frames = fakes.text("Hel", "lo") + fakes.tool("tooluse_9", "read_file", '{"path":"x"}')
    proxy.fake.script.append(Stream(frames + fakes.tail()))
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/messages", json=BASIC,
                                headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            assert response.status == 200
            body = await response.json()
    message = Message.model_validate(body)
    assert message.id.startswith("msg_")
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "Hello"
    assert message.content[1].input == {"path": "x"}
    assert message.stop_reason == "tool_use"

    proxy.fake.script.append(Stream(fakes.text("Hi there") + fakes.tail()))
    message = await proxy.anthropic().messages.create(**BASIC)
    assert message.content[0].text == "Hi there"


async def test_usage_comes_from_metadata_event_when_sent(proxy):
    usage = {"tokenUsage": {"uncachedInputTokens": 120, "cacheReadInputTokens": 30,
                            "cacheWriteInputTokens": 7, "outputTokens": 11, "totalTokens": 168}}
    proxy.fake.script.append(Stream(fakes.text("ok") + [fakes.event("metadataEvent", usage)]
                                    + fakes.tail()))
    message = await proxy.anthropic().messages.create(**BASIC)
    # Anthropic's split: input_tokens excludes what was read from or written
    # to the cache, and clients add the three up for the prompt's size.
    assert message.usage.input_tokens == 120
    assert message.usage.output_tokens == 11
    assert message.usage.cache_read_input_tokens == 30
    assert message.usage.cache_creation_input_tokens == 7


async def test_usage_without_metadata_reports_no_cache_figures(proxy):
    proxy.fake.script.append(Stream(fakes.text("ok") + fakes.tail()))
    message = await proxy.anthropic().messages.create(**BASIC)
    assert message.usage.cache_read_input_tokens is None
    assert message.usage.cache_creation_input_tokens is None
    assert message.usage.input_tokens > 0


async def test_output_limit_exception_ends_as_max_tokens(proxy):
    frames = fakes.text("partial answer") + [
        fakes.exception("ContentLengthExceededException", "output too long")]
    proxy.fake.script.append(Stream(frames))
    events = await raw_sse(proxy, BASIC)
    check_block_order(events)
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-1][0] == "message_stop"


async def test_tool_call_cut_off_is_never_emitted(proxy):
    frames = fakes.text("Writing.") + fakes.tool("tooluse_1", "write", '{"content": "abc',
                                                 stop=False)
    proxy.fake.script.append(Stream(frames))
    events = await raw_sse(proxy, BASIC)
    assert all(d["content_block"]["type"] != "tool_use"
               for n, d in events if n == "content_block_start")
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"


@pytest.mark.parametrize("broken", fakes.BROKEN_STREAMS.values(), ids=fakes.BROKEN_STREAMS)
async def test_mid_stream_failure_ends_with_error_event(proxy, broken):
    proxy.fake.script.append(broken())
    events = await raw_sse(proxy, BASIC)
    names = [name for name, _ in events]
    assert names[-1] == "error"
    assert "message_stop" not in names and "message_delta" not in names
    assert events[-1][1]["error"]["message"]
    check_block_order(events[:-1])


@pytest.mark.parametrize("stream", [
    Stream(fakes.text("Hello") + fakes.tail(), corrupt_at=3),
    Stream(fakes.text("Hello") + [fakes.exception("InternalServerException", "boom")]),
], ids=["bad-crc", "exception-frame"])
async def test_non_streaming_upstream_failure_is_an_error_status(proxy, stream):
    proxy.fake.script.append(stream)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await proxy.anthropic().messages.create(**BASIC)
    assert caught.value.status_code == 502
    assert caught.value.body["type"] == "error"


@pytest.mark.parametrize(("reply", "status", "error_type", "text"), [
    (Status(400, {"message": "Improperly formed request.", "reason": None}),
     400, "invalid_request_error", "Improperly formed request"),
    (Status(400, {"message": "Input is too long.", "reason": "CONTENT_LENGTH_EXCEEDS_THRESHOLD"}),
     400, "invalid_request_error", "prompt is too long"),
    (Status(429, {"message": "Too many requests"}, {"Retry-After": "7"}),
     429, "rate_limit_error", "Too many requests"),
    (Status(402, {"message": "quota", "reason": "MONTHLY_REQUEST_COUNT"}),
     402, "billing_error", "out of quota"),
    (Status(403, {"message": "Account suspended", "reason": "TEMPORARILY_SUSPENDED"}),
     403, "permission_error", "TEMPORARILY_SUSPENDED"),
    (Status(500, {"message": "boom"}), 502, "api_error", "boom"),
    (Status(503, "unavailable"), 503, "overloaded_error", "unavailable"),
    (Status(400, {"message": "Invalid model.", "reason": "INVALID_MODEL_ID"}),
     404, "not_found_error", "Kiro has no such model"),
], ids=["malformed", "too-long", "throttled", "quota", "suspended", "5xx", "503", "model"])
async def test_upstream_refusal_maps_to_anthropic_error(proxy, reply, status, error_type, text):
    proxy.fake.script.append(reply)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await proxy.anthropic().messages.create(**BASIC)
    error = caught.value
    assert error.status_code == status
    assert error.body == {"type": "error", "error": {"type": error_type,
                                                     "message": error.body["error"]["message"]}}
    assert text in error.body["error"]["message"]
    if status == 429:
        assert error.response.headers["Retry-After"] == "7"
    if text == "prompt is too long":
        assert error.body["error"]["message"].startswith("prompt is too long")


async def test_invalid_bearer_refreshes_once_and_retries(proxy):
    invalid = {"message": "The bearer token included in the request is invalid.", "reason": None}
    proxy.fake.script.append(Status(403, invalid))
    message = await proxy.anthropic().messages.create(**BASIC)
    assert message.content[0].text == "Hello"
    calls = proxy.fake.calls("/generateAssistantResponse")
    assert [c.headers["Authorization"] for c in calls] == [
        "Bearer aoa-initial-access", "Bearer aoa-social-access-1"]
    assert len(proxy.fake.calls("/refreshToken")) == 1


async def test_invalid_bearer_twice_is_an_authentication_error(proxy):
    invalid = {"message": "The bearer token included in the request is invalid."}
    proxy.fake.script.extend([Status(403, invalid), Status(403, invalid)])
    with pytest.raises(anthropic.AuthenticationError) as caught:
        await proxy.anthropic().messages.create(**BASIC)
    assert "log in to Kiro again" in caught.value.body["error"]["message"]
    assert len(proxy.fake.calls("/generateAssistantResponse")) == 2


async def test_upstream_request_carries_kiro_headers_and_payload(proxy):
    await proxy.anthropic().messages.create(
        **BASIC, metadata={"user_id": "u"}, stop_sequences=["X"],
        extra_body={"temperature": 0.2, "top_p": 0.9, "top_k": 5})
    (call,) = proxy.fake.calls("/generateAssistantResponse")
    assert call.headers["Authorization"] == "Bearer aoa-initial-access"
    assert call.headers["x-amzn-kiro-agent-mode"] == "vibe"
    assert call.headers["x-amzn-codewhisperer-optout"] == "true"
    assert call.headers["amz-sdk-request"] == "attempt=1; max=3"
    assert "KiroIDE-" in call.headers["x-amz-user-agent"]
    state = call.body["conversationState"]
    assert call.body["profileArn"] == "arn:aws:codewhisperer:us-east-1:111122223333:profile/FAKE"
    assert state["currentMessage"] == {"userInputMessage": {
        "content": "Hi", "modelId": "claude-sonnet-4.5", "origin": "AI_EDITOR"}}
    assert state["chatTriggerType"] == "MANUAL"
    assert len(state["conversationId"]) == 36


# Client mistakes ##########################################################


async def post(proxy, path, data, headers=None):
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + path, data=data,
                                headers={"x-api-key": API_KEY, **(headers or {})}) as response:
            return response.status, await response.json()


@pytest.mark.parametrize(("data", "needle"), [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe garbage", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "model"),
    (json.dumps({"model": "claude-sonnet-4-5"}), "messages"),
    (json.dumps({"model": "claude-sonnet-4-5", "messages": []}), "at least one message"),
    (json.dumps({"model": 7, "messages": [{"role": "user", "content": "x"}]}), "model"),
    (json.dumps({"model": "m", "messages": [{"role": "robot", "content": "x"}]}), "role"),
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": 5}]}), "content"),
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "hologram"}]}]}), "hologram"),
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]}),
     "messages.0.content.0"),
    (json.dumps({"model": "m", "system": 5, "messages": [{"role": "user", "content": "x"}]}),
     "system"),
    (json.dumps({"model": "m", "tools": {"a": 1}, "messages": [{"role": "user",
                                                                  "content": "x"}]}), "tools"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b"", "not valid JSON"),
    (b'"just a string"', "JSON object"),
    (json.dumps({"model": "m", "messages": {"role": "user"}}), "messages"),
    (json.dumps({"model": "m", "messages": ["hi"]}), "messages.0"),
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": 5}]}]}), "messages.0.content.0.text"),
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}, {
        "role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                          "input": "{}"}]}]}), "messages.1.content.0.input"),
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": 5}]}]}), "tool_result content"),
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image"}]}]}), "needs a source"),
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}),
     "'tool_use' is not supported in a user message"),
    (json.dumps({"model": "m", "stop_sequences": "END",
                 "messages": [{"role": "user", "content": "x"}]}), "stop_sequences"),
    (json.dumps({"model": "m", "tools": [{"description": "nameless"}],
                 "messages": [{"role": "user", "content": "x"}]}), "tools.0"),
    (json.dumps({"model": "m", "stream": "yes",
                 "messages": [{"role": "user", "content": "x"}]}),
     "stream: expected true or false, got 'yes'"),
    (json.dumps({"model": "m", "max_tokens": "lots",
                 "messages": [{"role": "user", "content": "x"}]}),
     "max_tokens: expected a whole number"),
    (json.dumps({"model": "m", "temperature": "hot",
                 "messages": [{"role": "user", "content": "x"}]}),
     "temperature: expected a number"),
], ids=["broken", "not-utf8", "array", "no-model", "no-messages", "empty-messages",
        "model-type", "bad-role", "content-type", "unknown-block", "url-image", "system-type",
        "tools-type", "deep-nesting", "empty-body", "string-body", "messages-object",
        "message-string", "text-type", "tool-input-type", "tool-result-content-type",
        "image-without-source", "tool-use-from-user", "stop-sequences-type",
        "tool-without-name", "stream-type", "max-tokens-type", "temperature-type"])
async def test_bad_request_gets_a_400_envelope(proxy, data, needle):
    status, body = await post(proxy, "/v1/messages", data)
    assert status == 400
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert needle in body["error"]["message"]
    assert proxy.fake.calls("/generateAssistantResponse") == []


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_bad_request_on_each_anthropic_route_gets_a_400(proxy, path):
    status, body = await post(proxy, path, b"{not json")
    assert (status, body["type"], body["error"]["type"]) == (400, "error",
                                                              "invalid_request_error")
    status, body = await post(proxy, path, json.dumps({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "hologram"}]}]}))
    assert status == 400 and "'hologram' is not supported" in body["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens",
                                  "/v1/chat/completions"])
async def test_json_nested_near_the_interpreter_limit_is_never_a_500(proxy, path):
    import sys

    # Python reads and writes JSON nested up to about its recursion limit; a
    # body that parses but nests too deeply to be sent on must still be a 400.
    limit = sys.getrecursionlimit()
    statuses = set()
    for depth in range(limit // 2, limit + 10, 4):
        deep = '{"a":' * depth + "1" + "}" * depth
        if path == "/v1/chat/completions":
            data = ('{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant",'
                    '"tool_calls":[{"id":"t","type":"function","function":{"name":"f",'
                    '"arguments":' + deep + '}}]},{"role":"tool","tool_call_id":"t",'
                    '"content":"r"}]}')
        else:
            data = ('{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant",'
                    '"content":[{"type":"tool_use","id":"t","name":"f","input":' + deep + '}]},'
                    '{"role":"user","content":[{"type":"tool_result","tool_use_id":"t",'
                    '"content":"r"}]}]}')
        status, _ = await post(proxy, path, data)
        statuses.add(status)
    assert statuses == {200, 400}


async def test_an_api_key_that_is_not_utf8_is_refused_not_a_crash(proxy):

    host, port = proxy.url.removeprefix("http://").split(":")
    body = json.dumps(BASIC).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: \xff\xfe\r\n"
                 b"Content-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b'"authentication_error"' in answer
    assert proxy.fake.calls("/generateAssistantResponse") == []


async def test_oversized_body_gets_413(aiohttp_server, fake_upstream, proxy_config):

    import kiro2api

    config = dataclasses.replace(proxy_config, max_body_bytes=1000)
    server = await aiohttp_server(kiro2api.make_app(config))
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/messages"), data=b"x" * 5000,
                                headers={"x-api-key": API_KEY}) as response:
            assert response.status == 413
            body = await response.json()
    assert body["error"]["type"] == "request_too_large"


async def test_unknown_route_and_method_get_envelopes(proxy):
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/v1/nothing",
                               headers={"x-api-key": API_KEY}) as response:
            assert response.status == 404
            assert (await response.json())["error"]["type"] == "not_found_error"
        async with session.get(proxy.url + "/v1/messages",
                               headers={"x-api-key": API_KEY}) as response:
            assert response.status == 405
            assert response.headers["Allow"] == "POST"
            assert (await response.json())["type"] == "error"


# Authentication ###########################################################


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"},
                                     {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Basic {API_KEY}"}])
async def test_wrong_or_missing_key_is_refused(proxy, headers):
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/messages", json=BASIC,
                                headers=headers) as response:
            assert response.status == 401
            body = await response.json()
    assert body["error"]["type"] == "authentication_error"
    assert proxy.fake.calls("/generateAssistantResponse") == []


@pytest.mark.slow  # over a second
async def test_without_configured_key_the_kiro_access_token_is_accepted(
        aiohttp_server, fake_upstream, tmp_path):
    import kiro2api

    token_file = write_token_file(tmp_path / "t.json")
    clock = fakes.FakeClock()
    config = kiro2api.Config(token_files=(token_file,), upstream=fake_upstream.url,
                             social_auth_url=fake_upstream.url, oidc_url=fake_upstream.url,
                             management_url=fake_upstream.url + "/management", clock=clock)
    server = await aiohttp_server(kiro2api.make_app(config))
    url = str(server.make_url("")).rstrip("/")
    client = anthropic.AsyncAnthropic(base_url=url, auth_token="aoa-initial-access",
                                      max_retries=0)
    message = await client.messages.create(**BASIC)
    assert message.content[0].text == "Hello"
    stranger = anthropic.AsyncAnthropic(base_url=url, api_key="guess", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        await stranger.messages.create(**BASIC)

    # The Kiro IDE (or `kiro2api refresh`) writes a new token; `kiro2api
    # export` prints it, and the server takes it at once.
    clock.advance(kiro2api.REREAD_SECONDS)  # since the stranger's look at the file
    write_token_file(token_file, accessToken="aoa-refreshed-by-the-ide")
    client = anthropic.AsyncAnthropic(base_url=url, auth_token="aoa-refreshed-by-the-ide",
                                      max_retries=0)
    assert (await client.messages.create(**BASIC)).content[0].text == "Hello"
    assert fake_upstream.calls("/generateAssistantResponse")[-1].headers["Authorization"] == \
        "Bearer aoa-refreshed-by-the-ide"
    assert fake_upstream.calls("/refreshToken") == []


async def test_anthropic_headers_of_claude_code_are_accepted(proxy):
    events = await raw_sse(proxy, BASIC, headers={
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
    })
    assert events[-1][0] == "message_stop"
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/messages?beta=true", json=BASIC,
                                headers={"x-api-key": API_KEY}) as response:
            assert response.status == 200


# Other routes #############################################################


async def test_models_list_serves_both_sdks(proxy):
    from anthropic.types import ModelInfo
    from openai.types import Model

    page = await proxy.anthropic().models.list()
    ids = [model.id for model in page.data]
    assert "claude-sonnet-4-5" in ids and "claude-opus-4-7" in ids
    for model in page.data:  # every field the SDK's type requires
        ModelInfo.model_validate(model.model_dump(exclude_unset=True))
    async for model in await proxy.openai().models.list():
        Model.model_validate(model.model_dump(exclude_unset=True))
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/v1/models",
                               headers={"x-api-key": API_KEY}) as response:
            body = await response.json()
    assert body["object"] == "list"
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in body["data"])


async def test_models_retrieve_serves_both_sdks_and_names_an_unknown_model(proxy):
    import openai
    from anthropic.types import ModelInfo
    from openai.types import Model

    anthropic_client, openai_client = proxy.anthropic(), proxy.openai()
    info = await anthropic_client.models.retrieve("claude-sonnet-4-5")
    assert ModelInfo.model_validate(info.model_dump(exclude_unset=True)).id == "claude-sonnet-4-5"
    assert info.type == "model" and info.display_name
    model = await openai_client.models.retrieve("claude-opus-4-7")
    assert Model.model_validate(model.model_dump(exclude_unset=True)).id == "claude-opus-4-7"
    assert (model.object, model.owned_by) == ("model", "anthropic")
    with pytest.raises(anthropic.NotFoundError) as caught:
        await anthropic_client.models.retrieve("claude-nonesuch")
    assert caught.value.body["error"]["type"] == "not_found_error"
    assert "'claude-nonesuch'" in caught.value.body["error"]["message"]
    with pytest.raises(openai.NotFoundError) as caught:  # OpenAI's envelope for its SDK
        await openai_client.models.retrieve("claude-nonesuch")
    assert caught.value.body["type"] == "invalid_request_error"
    assert caught.value.code == "model_not_found"


async def test_count_tokens_estimates_and_validates(proxy):
    client = proxy.anthropic()
    short = await client.messages.count_tokens(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "Hi"}])
    long = await client.messages.count_tokens(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "word " * 1000}])
    assert 0 < short.input_tokens < long.input_tokens
    assert 1000 <= long.input_tokens <= 2000
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.count_tokens(model="claude-sonnet-4-5", messages=[])
    assert proxy.fake.calls("/generateAssistantResponse") == []


async def test_health_shows_account_without_secrets(proxy):
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/health", headers={"x-api-key": API_KEY}) as response:
            text = await response.text()
    assert "aoa-initial-access" not in text and "aor-initial-refresh" not in text
    body = json.loads(text)
    assert body["status"] == "ok"
    assert len(body["accounts"]) == 1


async def test_models_come_from_the_account_and_are_cached(proxy):
    client = proxy.anthropic()
    ids = [m.id for m in (await client.models.list()).data]
    assert ids[:3] == ["claude-sonnet-4.5", "claude-opus-4.7", "qwen3-coder-next"]
    assert "claude-sonnet-4-5" in ids and "claude-opus-4-7" in ids
    assert "claude-haiku-4-5" not in ids  # the account does not offer it
    await client.models.list()
    (call,) = proxy.fake.calls("/ListAvailableModels")
    assert call.headers["Authorization"] == "Bearer aoa-initial-access"


async def test_models_fall_back_to_the_built_in_list(proxy):
    proxy.fake.models_reply = Status(500, {"message": "boom"})
    ids = [m.id for m in (await proxy.anthropic().models.list()).data]
    assert ids[0] == "claude-sonnet-4-5" and "claude-haiku-4-5" in ids


# The exact CodeWhisperer request, through the server #####################

PROFILE_ARN = "arn:aws:codewhisperer:us-east-1:111122223333:profile/FAKE"


def _anthropic_cases():
    from test_convert import CASES

    return CASES


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in _anthropic_cases()],
                         ids=[c[0] for c in _anthropic_cases()])
async def test_the_upstream_receives_the_exact_codewhisperer_request(proxy, body, expected):
    rest = {k: v for k, v in body.items() if k not in ("messages", "max_tokens")}
    await proxy.anthropic().messages.create(
        model="claude-sonnet-4-5-20250929", max_tokens=body.get("max_tokens", 1024),
        messages=body["messages"], extra_body=rest)
    (call,) = proxy.fake.calls("/generateAssistantResponse")
    conversation_id = call.body["conversationState"]["conversationId"]
    assert len(conversation_id) == 36 and conversation_id.count("-") == 4
    sent = json.loads(json.dumps(call.body))
    sent["conversationState"]["conversationId"] = "conv-1"
    assert sent == {**expected, "profileArn": PROFILE_ARN}


# Streams: usage, payload shapes, keep-alives ##############################


async def test_streamed_usage_is_estimated_first_and_corrected_from_metadata(proxy):
    usage = {"tokenUsage": {"uncachedInputTokens": 120, "cacheReadInputTokens": 30,
                            "cacheWriteInputTokens": 7, "outputTokens": 11}}
    proxy.fake.script.append(Stream(fakes.text("ok") + [fakes.event("metadataEvent", usage)]
                                    + fakes.tail(), split=(9,)))
    body = {**BASIC, "messages": [{"role": "user", "content": "word " * 400}]}
    events = await raw_sse(proxy, body)
    estimated = events[0][1]["message"]["usage"]
    assert estimated["output_tokens"] == 0 and 400 <= estimated["input_tokens"] <= 800
    # Anthropic's split: input_tokens is neither read from nor written to the cache.
    assert events[-2][1]["usage"] == {"input_tokens": 120, "output_tokens": 11,
                                      "cache_read_input_tokens": 30,
                                      "cache_creation_input_tokens": 7}


async def test_streamed_usage_is_corrected_from_context_usage(proxy):
    # 10% of claude-sonnet-4.5's 200k window, less the 10 tokens of 40 characters sent.
    proxy.fake.script.append(Stream(fakes.text("abcd" * 10) + fakes.tail(percentage=10.0)))
    events = await raw_sse(proxy, BASIC)
    assert events[-2][1]["usage"] == {"input_tokens": 19_990, "output_tokens": 10}
    assert events[0][1]["message"]["usage"]["input_tokens"] < 100  # "Hi": the estimate


def _shaped(event_type, payload, wrapped):
    return fakes.event(event_type, {event_type: payload} if wrapped else payload)


@pytest.mark.parametrize("wrapped", [False, True], ids=["flat", "wrapped"])
async def test_flat_and_wrapped_payloads_give_the_same_answer(proxy, wrapped):
    frames = [
        _shaped("assistantResponseEvent", {"content": "Reading."}, wrapped),
        _shaped("toolUseEvent", {"toolUseId": "t1", "name": "read_file", "input": '{"pa'},
                wrapped),
        _shaped("toolUseEvent", {"toolUseId": "t1", "name": "read_file", "input": 'th": "a"}'},
                wrapped),
        _shaped("toolUseEvent", {"toolUseId": "t1", "name": "read_file", "stop": True}, wrapped),
        _shaped("metadataEvent", {"tokenUsage": {"uncachedInputTokens": 40,
                                                 "outputTokens": 9}}, wrapped),
        _shaped("contextUsageEvent", {"contextUsagePercentage": 3.5}, wrapped),
    ]
    proxy.fake.script.append(Stream(frames, split=(11, 2)))
    async with proxy.anthropic().messages.stream(**BASIC) as stream:
        message = await stream.get_final_message()
    assert [(b.type, getattr(b, "text", None), getattr(b, "input", None))
            for b in message.content] == [("text", "Reading.", None),
                                          ("tool_use", None, {"path": "a"})]
    assert (message.stop_reason, message.usage.input_tokens, message.usage.output_tokens) == (
        "tool_use", 40, 9)


async def test_an_idle_stream_gets_ping_events(aiohttp_server, fake_upstream, proxy_config):

    import kiro2api

    config = dataclasses.replace(proxy_config, ping_interval=0.01)
    server = await aiohttp_server(kiro2api.make_app(config))
    gate = asyncio.Event()
    frames = fakes.text("first", " second") + fakes.tail()
    fake_upstream.script.append(Stream(frames, split=(len(frames[0]),), gate=gate))
    raw = b""
    async with aiohttp.ClientSession() as session, session.post(
            server.make_url("/v1/messages"), json={**BASIC, "stream": True},
            headers={"x-api-key": API_KEY}) as response:
        assert response.status == 200
        # The upstream sends "first" and then nothing until two pings have gone out.
        while raw.count(b"event: ping\n") < 3:
            raw += await response.content.readany()
        gate.set()
        raw += await response.read()
    names = [name for name, _ in parse_sse(raw)]
    first_delta = names.index("content_block_delta")
    assert names[:first_delta] == ["message_start", "ping", "content_block_start"]
    assert names[first_delta + 1:first_delta + 3] == ["ping", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    for block in raw.decode().split("\n\n"):
        if block.startswith("event: ping"):
            assert block == 'event: ping\ndata: {"type":"ping"}'
    fake_upstream.script.append(Stream(frames, split=(len(frames[0]),)))
    client = anthropic.AsyncAnthropic(base_url=str(server.make_url("")).rstrip("/"),
                                      api_key=API_KEY, max_retries=0)
    async with client.messages.stream(**BASIC) as stream:
        assert await stream.get_final_text() == "first second"


@pytest.mark.parametrize("frame", [
    fakes.event("assistantResponseEvent", b"[" * 100_000 + b"]" * 100_000),
    fakes.event("assistantResponseEvent", b"not json"),
    fakes.event("assistantResponseEvent", b'{"content": "\xff"}'),
], ids=["deep-nesting", "not-json", "not-utf8"])
async def test_a_frame_the_decoder_cannot_read_ends_the_stream_with_an_error(proxy, frame):
    proxy.fake.script.append(Stream(fakes.text("Hello") + [frame] + fakes.tail()))
    events = await raw_sse(proxy, BASIC)
    names = [name for name, _ in events]
    assert names[-1] == "error" and "message_stop" not in names
    assert "payload is not JSON" in events[-1][1]["error"]["message"]
    check_block_order(events[:-1])


async def test_a_tool_input_nested_too_deeply_is_never_emitted(proxy):
    deep = "[" * 100_000 + "]" * 100_000
    proxy.fake.script.append(Stream(fakes.text("Hello") + fakes.tool("t1", "f", deep)
                                    + fakes.tail()))
    events = await raw_sse(proxy, BASIC)
    check_block_order(events)
    assert [d["content_block"]["type"] for n, d in events if n == "content_block_start"] == [
        "text"]
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"


async def test_a_failure_of_ours_mid_stream_still_ends_with_an_error_event(
        proxy, monkeypatch, caplog):
    import convert

    render = convert.AnthropicStream.render

    def render_then_fail(self, events):
        if any(type(e) is convert.Text and e.text == "boom" for e in events):
            raise RuntimeError("a bug")
        return render(self, events)

    monkeypatch.setattr(convert.AnthropicStream, "render", render_then_fail)
    proxy.fake.script.append(Stream(fakes.text("Hello") + fakes.text("boom") + fakes.tail(),
                                    split=(len(fakes.text("Hello")[0]),)))
    events = await raw_sse(proxy, BASIC)
    assert [name for name, _ in events][-1] == "error"
    assert events[-1][1]["error"] == {"type": "api_error",
                                      "message": "internal error in kiro2api; see its log"}
    check_block_order(events[:-1])
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records)


async def test_numbers_that_are_not_finite_do_not_break_usage(proxy):
    infinite = b'{"tokenUsage": {"uncachedInputTokens": 1e999, "outputTokens": -1e999}}'
    frames = fakes.text("ok") + [fakes.event("metadataEvent", infinite),
                                 fakes.event("contextUsageEvent",
                                             b'{"contextUsagePercentage": NaN}')]
    proxy.fake.script.append(Stream(frames))
    events = await raw_sse(proxy, BASIC)
    assert events[-1][0] == "message_stop"
    usage = events[-2][1]["usage"]
    assert usage["output_tokens"] == 1 and 0 < usage["input_tokens"] < 100


async def test_models_are_fetched_again_once_the_cache_expires(
        aiohttp_server, fake_upstream, proxy_config):
    clock = fakes.FakeClock()
    server = await aiohttp_server(kiro2api.make_app(dataclasses.replace(proxy_config,
                                                                        clock=clock)))
    proxy = Proxy(str(server.make_url("")).rstrip("/"), fake_upstream, proxy_config)
    client = proxy.anthropic()

    async def ids():
        return [m.id for m in (await client.models.list()).data]

    proxy.fake.models_reply = Status(500, {"message": "boom"})
    assert "claude-haiku-4-5" in await ids()  # the built-in table ...
    proxy.fake.models_reply = None
    assert "claude-haiku-4-5" in await ids()  # ... until the failure's retry time
    assert len(proxy.fake.calls("/ListAvailableModels")) == 1
    clock.advance(kiro2api.MODELS_RETRY_SECONDS)
    assert "claude-haiku-4-5" not in await ids()  # the account's list now
    assert len(proxy.fake.calls("/ListAvailableModels")) == 2
    clock.advance(kiro2api.MODELS_TTL_SECONDS - 1)
    await ids()
    assert len(proxy.fake.calls("/ListAvailableModels")) == 2  # still fresh
    clock.advance(1)
    await ids()
    assert len(proxy.fake.calls("/ListAvailableModels")) == 3


# Found in review: odd text and shapes from either side ####################


async def test_an_upstream_error_with_half_a_character_still_ends_in_an_error_event(proxy):
    # A lone surrogate cannot be UTF-8; it goes out as its JSON escape.
    proxy.fake.script.append(Stream(fakes.text("Hello") + [
        fakes.exception("ValidationException", "bad \ud800 input")]))
    events = await raw_sse(proxy, BASIC)
    assert [name for name, _ in events][-1] == "error"
    assert "bad \ud800 input" in events[-1][1]["error"]["message"]
    assert any(d.get("delta", {}).get("text") == "Hello" for _, d in events)


@pytest.mark.parametrize(("data", "needle"), [
    # Half an emoji encoded as UTF-8 bytes (ED A0 BD), which json.loads would take.
    ('{"model": "m", "messages": [{"role": "user", "content": "x'.encode() + b"\xed\xa0\xbd"
     + b'"}]}', "not valid JSON in UTF-8"),
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                 "metadata": {"user_id": "\ud800"}}).replace(
        '"metadata"', '"deep": ' + "[" * 900 + "]" * 900 + ', "metadata"').encode(),
     "nests JSON too deeply"),
], ids=["utf8-surrogate", "escaped-surrogate-deep"])
async def test_text_no_upstream_request_can_carry_is_a_400(proxy, data, needle):
    status, body = await post(proxy, "/v1/messages", data)
    assert status == 400 and needle in body["error"]["message"]
    assert proxy.fake.calls("/generateAssistantResponse") == []


@pytest.mark.slow  # over a second
async def test_a_stream_that_never_goes_quiet_gets_no_keepalives(
        aiohttp_server, fake_upstream, proxy_config):

    import kiro2api

    config = dataclasses.replace(proxy_config, ping_interval=1.0)
    server = await aiohttp_server(kiro2api.make_app(config))
    frames = fakes.text(*["word "] * 60) + fakes.tail()  # one frame every 30 ms: 1.8 s
    fake_upstream.script.append(Stream(frames, split=(len(frames[0]),), delay=0.03))
    async with aiohttp.ClientSession() as session, session.post(
            server.make_url("/v1/messages"), json={**BASIC, "stream": True},
            headers={"x-api-key": API_KEY}) as response:
        raw = await response.read()
    assert raw.count(b"event: ping\n") == 1  # the one after message_start, as Anthropic


@pytest.mark.parametrize("reply", [{"models": 5}, {"models": [], "nextToken": 7}, [1]],
                         ids=["models-not-a-list", "empty", "not-an-object"])
async def test_a_malformed_model_list_falls_back_to_the_built_in_one(proxy, reply):
    proxy.fake.models_reply = Status(200, reply)
    ids = [model.id for model in (await proxy.anthropic().models.list()).data]
    assert "claude-sonnet-4-5" in ids
