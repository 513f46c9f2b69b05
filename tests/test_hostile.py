"""Hostile input: generated requests and corrupted upstream answers at a running server.

The fake upstream and kiro2api run in a thread of their own (one event loop,
two real ports) for the whole module, so that hypothesis can drive them from
plain synchronous tests, one HTTP request per example. Every example must
get a 2xx or a 4xx in the route's own envelope, never a 5xx, and nothing
may reach the log as an unhandled error; a corrupted upstream answer must
end in an error, never in a clean ``message_stop`` or ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import http.client
import json
import logging
import threading
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fakes
import kiro2api
from fakes import FakeUpstream, Stream
from helpers import API_KEY, parse_sse, write_token_file

ANTHROPIC, OPENAI = "/v1/messages", "/v1/chat/completions"
ROUTES = (ANTHROPIC, OPENAI, "/v1/messages/count_tokens")
MODELS = ("claude-sonnet-4-5", "claude-opus-4-7", "claude-3-5-haiku-latest", "auto", "gpt-4o",
          "")
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")).decode()
HYPOTHESIS = settings(max_examples=120, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow,
                                             HealthCheck.function_scoped_fixture])


class Errors(logging.Handler):
    """Every record at ERROR or above, from any logger (aiohttp's included)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclasses.dataclass
class Live:
    port: int
    fake: FakeUpstream
    errors: Errors

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers={
                "x-api-key": API_KEY, "Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            return response.status, dict(response.headers), response.read()
        finally:
            connection.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    token_file = write_token_file(tmp_path_factory.mktemp("live") / "kiro-auth-token.json")
    fake = FakeUpstream()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runners: list[web.AppRunner] = []

    async def serve(app: web.Application) -> int:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return runner.addresses[0][1]

    async def start() -> int:
        url = f"http://127.0.0.1:{await serve(fake.app())}"
        return await serve(kiro2api.make_app(kiro2api.Config(
            api_key=API_KEY, token_files=(token_file,), upstream=url, social_auth_url=url,
            oidc_url=url, management_url=url + "/management", retries=0,
            environment_proxies={})))

    errors = Errors()
    logging.getLogger().addHandler(errors)
    try:
        port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
        yield Live(port, fake, errors)
    finally:
        for runner in reversed(runners):
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
        logging.getLogger().removeHandler(errors)


# What every answer must look like #########################################


def check_envelope(route: str, status: int, body: bytes) -> dict[str, Any]:
    """``body`` is the error envelope of ``route``'s API, and nothing else."""
    data = json.loads(body)
    if route == OPENAI:
        assert set(data) == {"error"}, data
        error = data["error"]
        assert set(error) == {"message", "type", "param", "code"}, data
        assert isinstance(error["type"], str) and error["type"]
    else:
        assert set(data) == {"type", "error"} and data["type"] == "error", data
        error = data["error"]
        assert set(error) == {"type", "message"}, data
        assert error["type"] == kiro2api.convert.ANTHROPIC_ERROR_TYPES.get(
            kiro2api.convert.KIND_OF_STATUS.get(status), error["type"]) or status in (
                400, 401, 404, 405, 413)
    assert isinstance(error["message"], str) and error["message"]
    return error


def check_answer(live: Live, route: str, status: int, headers: dict[str, str],
                 body: bytes) -> None:
    """No 5xx; a 4xx in the route's envelope; a 200 that is a whole, valid answer."""
    assert status < 500, (status, body[:500])
    assert live.errors.records == [], [r.getMessage() for r in live.errors.records]
    if status >= 400:
        check_envelope(route, status, body)
        return
    assert status == 200, status
    if not headers.get("Content-Type", "").startswith("text/event-stream"):
        json.loads(body)
        return
    events = parse_sse(body, comments=True)
    if route == OPENAI:
        assert events[-1] == (None, "[DONE]"), events[-3:]
    else:
        assert events[-1][0] == "message_stop", events[-3:]


# Generated requests #######################################################

# Text as clients send it, and as they should not: control characters,
# astral characters and (the JSON encoder writes them as \ud800 escapes) lone
# surrogates.
TEXT = st.text(st.characters(codec=None, categories=None), max_size=30) | st.sampled_from(
    ["", "Hi", "\ud83d", "x\udc00y", "😀", "\x00", "</thinking>", "a" * 300])
JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT
JSON_ANY = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(TEXT, inner, max_size=3), max_leaves=12)
IDS = st.sampled_from(["toolu_01", "call_1", "", "x\ud800"])
NAMES = st.sampled_from(["get_weather", "Bash", "a" * 80, "bad name!", ""])
SCHEMA = st.just({"type": "object", "properties": {"q": {"type": "string"}}}) | JSON_ANY

anthropic_block = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
    st.fixed_dictionaries({"type": st.just("image"), "source": st.fixed_dictionaries({
        "type": st.just("base64"), "media_type": st.sampled_from(["image/png", "image/gif"]),
        "data": st.just(PNG)})}),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": IDS, "name": NAMES,
                           "input": st.dictionaries(TEXT, JSON_LEAF, max_size=2)}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": IDS,
                           "content": TEXT | st.lists(st.fixed_dictionaries(
                               {"type": st.just("text"), "text": TEXT}), max_size=2)},
                          optional={"is_error": st.booleans()}),
    st.fixed_dictionaries({"type": st.just("thinking"), "thinking": TEXT, "signature": TEXT}),
)
anthropic_message = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant"]),
    "content": TEXT | st.lists(anthropic_block, min_size=1, max_size=3)})
anthropic_body = st.fixed_dictionaries({
    "model": st.sampled_from(MODELS), "max_tokens": st.integers(1, 64000),
    "messages": st.lists(anthropic_message, min_size=1, max_size=4),
}, optional={
    "stream": st.booleans(),
    "system": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                              max_size=2),
    "temperature": st.floats(0, 1), "top_p": st.floats(0, 1), "top_k": st.integers(0, 500),
    "stop_sequences": st.lists(TEXT, max_size=2),
    "tools": st.lists(st.fixed_dictionaries({"name": NAMES, "description": TEXT,
                                             "input_schema": SCHEMA}), max_size=2),
    "tool_choice": st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"},
                                    {"type": "tool", "name": "get_weather"}]),
    "thinking": st.sampled_from([{"type": "enabled", "budget_tokens": 2048},
                                 {"type": "disabled"}, {"type": "adaptive"}]),
    "metadata": st.fixed_dictionaries({"user_id": TEXT}),
})

openai_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
        {"url": st.just(f"data:image/png;base64,{PNG}")})}),
)
openai_call = st.fixed_dictionaries({
    "id": IDS, "type": st.just("function"), "function": st.fixed_dictionaries({
        "name": NAMES, "arguments": st.sampled_from(['{"q": "x"}', "{}", "not json", ""])})})
openai_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user"]),
                           "content": TEXT | st.lists(openai_part, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none() | TEXT},
                          optional={"tool_calls": st.lists(openai_call, max_size=2)}),
    st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": IDS, "content": TEXT}),
)
openai_body = st.fixed_dictionaries({
    "model": st.sampled_from(MODELS), "messages": st.lists(openai_message, min_size=1, max_size=4),
}, optional={
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "max_tokens": st.integers(1, 64000), "max_completion_tokens": st.integers(1, 64000),
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "n": st.integers(1, 2),
    "stop": TEXT | st.lists(TEXT, max_size=2),
    "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"),
                                             "function": st.fixed_dictionaries({
                                                 "name": NAMES, "parameters": SCHEMA})}),
                      max_size=2),
    "tool_choice": st.sampled_from(["auto", "none", "required",
                                    {"type": "function", "function": {"name": "get_weather"}}]),
    "reasoning_effort": st.sampled_from(["minimal", "low", "medium", "high", "extreme"]),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
})


def paths(value: Any, here: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (keys and list indexes), the root included."""
    found = [here]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, here + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, here + (index,))
    return found


@st.composite
def near_valid(draw: st.DrawFn, valid: st.SearchStrategy) -> Any:
    """A valid body with one to three things wrong: a value of another type, a key
    missing, an unknown key, a list where a value was."""
    body = draw(valid)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths(body)))
        if not path:
            body = draw(JSON_ANY)
            continue
        parent = body
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        action = draw(st.sampled_from(["replace", "delete", "add", "wrap"]))
        if action == "replace":
            parent[last] = draw(JSON_ANY)
        elif action == "delete":
            del parent[last]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(TEXT)] = draw(JSON_ANY)
        else:
            parent[last] = [parent[last]]
    return body


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: lone surrogates go out as escapes


GARBAGE = st.one_of(
    st.binary(max_size=300),
    JSON_ANY.map(encode),
    st.sampled_from([b"", b"{", b"null", b'{"model": "\xff\xfe"}', b"[" * 5000,
                     b'{"messages": ' * 3000,
                     b'{"model": "m", "messages": "' + b"\xc3" * 99 + b'"}',
                     b'\xef\xbb\xbf{"model": "claude-sonnet-4-5"}', b"\x00" * 64]),
)


@pytest.mark.slow  # hypothesis: up to a second per route
@pytest.mark.parametrize("route", ROUTES)
@HYPOTHESIS
@given(data=st.data())
def test_generated_requests_get_an_answer_or_a_4xx_envelope(live, route, data):
    live.errors.records.clear()
    valid = openai_body if route == OPENAI else anthropic_body
    kind = data.draw(st.sampled_from(["valid", "near-valid", "garbage"]))
    if kind == "garbage":
        raw = data.draw(GARBAGE)
    else:
        raw = encode(data.draw(valid if kind == "valid" else near_valid(valid)))
    status, headers, body = live.request("POST", route, raw)
    check_answer(live, route if route != ROUTES[2] else ANTHROPIC, status, headers, body)


@HYPOTHESIS
@given(method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST", "OPTIONS"]),
       path=st.sampled_from(["/v1/nothing", "/v1/chat/nothing", "/v2/messages", "/v1/messages",
                             "/v1/chat/completions", "/v1/models", "/%ff%fe", "/v1/../etc"]))
def test_unknown_routes_and_methods_get_a_4xx_envelope(live, method, path):
    live.errors.records.clear()
    status, headers, body = live.request(method, path, b"{}")
    route = OPENAI if path.startswith("/v1/chat/") else ANTHROPIC
    check_answer(live, route, status, headers, body)
    if path != "/v1/models" or method != "GET":
        assert status != 200 or (method == "POST" and path in (ANTHROPIC, OPENAI))


@pytest.mark.parametrize("route", [ANTHROPIC, OPENAI])
@pytest.mark.parametrize(("name", "raw"), [
    ("huge-string", encode({"model": "claude-sonnet-4-5", "max_tokens": 10,
                            "messages": [{"role": "user", "content": "x" * 3_000_000}]})),
    ("huge-key", b'{"' + b"k" * 1_000_000 + b'": 1}'),
    ("deep-arrays", b"[" * 200_000 + b"]" * 200_000),
    ("deep-objects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
    ("deep-in-a-valid-body", encode({"model": "claude-sonnet-4-5", "max_tokens": 10,
                                     "messages": [{"role": "user", "content": "hi"}]})[:-1]
     + b', "metadata": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ("invalid-utf8-in-a-string", (b'{"model": "claude-sonnet-4-5", "max_tokens": 10, '
                                  b'"messages": [{"role": "user", "content": "\xff\xfe"}]}')),
    ("many-messages", encode({"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "hi"}
        for i in range(20_001)]})),
])
def test_hostile_bodies_get_a_4xx_envelope(live, route, name, raw):
    live.errors.records.clear()
    status, headers, body = live.request("POST", route, raw)
    check_answer(live, route, status, headers, body)
    assert 400 <= status < 500


@pytest.mark.parametrize("route", [ANTHROPIC, OPENAI])
def test_a_body_over_the_limit_gets_413_unread(live, route):
    too_big = b"x" * (kiro2api.Config().max_body_bytes + 1)
    status, _, body = live.request("POST", route, too_big)
    assert status == 413
    check_envelope(route, status, body)


# Corrupted upstream answers ###############################################

EXCEPTIONS = ("ThrottlingException", "InternalServerException", "ValidationException",
              "ServiceUnavailableException", "AccessDeniedException")


@st.composite
def answers(draw: st.DrawFn) -> list[bytes]:
    """A well-formed upstream answer: text, maybe a tool call, the usual tail."""
    frames = fakes.text(*draw(st.lists(st.text(min_size=1, max_size=20), min_size=1,
                                       max_size=6)))
    if draw(st.booleans()):
        frames += fakes.tool("tooluse_1", "get_weather", '{"q": ', '"x"}')
    return frames + fakes.tail()


@st.composite
def corrupted(draw: st.DrawFn) -> tuple[str, Stream]:
    frames = draw(answers())
    data = b"".join(frames)
    split = (draw(st.integers(1, 400)), draw(st.integers(1, 400)))
    how = draw(st.sampled_from(["bit-flip", "truncated", "dropped", "garbage", "exception",
                                "error-event"]))
    if how == "bit-flip":
        at = draw(st.integers(0, len(data) - 1))
        return how, Stream([data], split=split, corrupt_at=at)
    if how in ("truncated", "dropped"):
        # An answer cut inside a frame (the decoder sees the partial frame at its
        # end), or a connection dropped anywhere (the HTTP body never ends).
        ends = {sum(map(len, frames[:i])) for i in range(len(frames) + 1)}
        cut = draw(st.integers(0, len(data) - 1).filter(
            lambda n: how == "dropped" or n not in ends))
        return how, Stream([data[:cut]], split=split, hang_up=how == "dropped")
    at = draw(st.integers(0, len(frames)))
    if how == "garbage":
        insert = draw(st.binary(min_size=1, max_size=64))
    elif how == "exception":
        insert = fakes.exception(draw(st.sampled_from(EXCEPTIONS)), draw(st.text(max_size=30)))
    else:
        insert = fakes.event("invalidStateEvent", {"message": "state", "reason": "INVALID"})
    return how, Stream(frames[:at] + [insert] + frames[at:], split=split)


@pytest.mark.parametrize("route", [ANTHROPIC, OPENAI])
@HYPOTHESIS
@given(case=corrupted(), stream=st.booleans())
def test_a_corrupted_upstream_answer_always_ends_in_an_error(live, route, case, stream):
    _, reply = case
    live.errors.records.clear()
    live.fake.script.append(reply)
    request = {"model": "claude-sonnet-4-5", "max_tokens": 4096, "stream": stream,
               "messages": [{"role": "user", "content": "Hi"}]}
    status, _, body = live.request("POST", route, encode(request))
    assert live.errors.records == [], [r.getMessage() for r in live.errors.records]
    # A stream that breaks before its first bytes reach kiro2api is a failed
    # call (an error status), like any answer that was not streamed.
    if not stream or (status != 200 and (reply.hang_up or not reply.body())):
        assert status >= 500 or status == 429, (status, body[:300])
        check_envelope(route, status, body)
        return
    assert status == 200
    events = parse_sse(body, comments=True)
    if route == OPENAI:
        assert (None, "[DONE]") not in events
        last = events[-1][1]
        assert set(last) == {"error"} and last["error"]["message"], events[-3:]
    else:
        names = [name for name, _ in events]
        assert "message_stop" not in names and "message_delta" not in names
        assert names[-1] == "error", names
        assert events[-1][1]["error"]["message"]


@pytest.mark.parametrize("key", ["\xff\xfe", "test-client-key\x80", "é" * 4000])
def test_a_key_that_is_not_utf8_or_is_long_is_refused_cleanly(live, key):
    live.errors.records.clear()
    raw = encode({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]})
    status, headers, body = live.request("POST", ANTHROPIC, raw, {"x-api-key": key})
    check_answer(live, ANTHROPIC, status, headers, body)
    assert status in (400, 401, 431)
