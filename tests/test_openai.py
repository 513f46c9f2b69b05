"""/v1/chat/completions: OpenAI requests -> CodeWhisperer, neutral events -> OpenAI chunks.

The first half is pure (convert.py, no loop); the second runs the openai SDK
and raw HTTP against kiro2api in front of the fake upstream.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

import convert
import fakes
from fakes import A, U, state, user
from fakes import Status, Stream
from helpers import API_KEY, parse_sse

MODEL = fakes.MODEL_ID
BASIC = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "Hi"}]}




READ_TOOL = {"type": "function", "function": {
    "name": "read_file", "description": "Read a file", "strict": True,
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                   "required": ["path"], "additionalProperties": False}}}
READ_SPEC = {"toolSpecification": {
    "name": "read_file", "description": "Read a file",
    "inputSchema": {"json": {"type": "object", "properties": {"path": {"type": "string"}},
                             "required": ["path"], "additionalProperties": False}}}}


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


TOOL_LOOP = [
    {"role": "user", "content": "Read a and b"},
    {"role": "assistant", "content": None, "tool_calls": [
        call("call_1", "read_file", '{"path": "a"}'),
        call("call_2", "read_file", '{"path": "b"}')]},
    {"role": "tool", "tool_call_id": "call_1", "content": "AAA"},
    {"role": "tool", "tool_call_id": "call_2",
     "content": [{"type": "text", "text": "no such"}, {"type": "text", "text": " file"}]},
]
TOOL_USES = [{"toolUseId": "call_1", "name": "read_file", "input": {"path": "a"}},
             {"toolUseId": "call_2", "name": "read_file", "input": {"path": "b"}}]
TOOL_RESULTS = [
    {"toolUseId": "call_1", "content": [{"text": "AAA"}], "status": "success"},
    {"toolUseId": "call_2", "content": [{"text": "no such"}, {"text": " file"}],
     "status": "success"},
]

# (id, OpenAI request fields, expected CodeWhisperer payload)
CASES = [
    ("plain", {"messages": [{"role": "user", "content": "Hi"}]}, state(user("Hi"))),
    ("system-and-developer-become-the-prompt", {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
        {"role": "user", "content": "c"}]},
     state(user("c"), [U("Be brief.\n\nUse metric.\n\na"), A("b")])),
    ("user-parts-with-data-url-image", {"messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "What is it?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO",
                                                "detail": "high"}}]}]},
     state(user("What is it?", images=[{"format": "png", "source": {"bytes": "iVBO"}}]))),
    ("jpg-alias-and-string-image-url", {"messages": [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": "data:image/jpg;base64,/9j/"}]}]},
     state(user("Continue", images=[{"format": "jpeg", "source": {"bytes": "/9j/"}}]))),
    ("tool-loop-consecutive-tool-messages-merge", {"tools": [READ_TOOL], "messages": TOOL_LOOP},
     state(user("Tool results provided.", toolResults=TOOL_RESULTS, tools=[READ_SPEC]),
           [U("Read a and b"), A(" ", TOOL_USES)])),
    ("tool-results-then-user-text-share-a-turn", {"tools": [READ_TOOL], "messages": [
        *TOOL_LOOP, {"role": "user", "content": "Now compare them."}]},
     state(user("Now compare them.", toolResults=TOOL_RESULTS, tools=[READ_SPEC]),
           [U("Read a and b"), A(" ", TOOL_USES)])),
    ("assistant-text-with-tool-call-and-empty-arguments", {"messages": [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call("c9", "now", "")]},
        {"role": "tool", "tool_call_id": "c9", "content": ""}]},
     state(user("Tool results provided.",
                toolResults=[{"toolUseId": "c9", "content": [{"text": "(empty result)"}],
                              "status": "success"}],
                tools=[{"toolSpecification": {
                    "name": "now", "description": "Tool: now",
                    "inputSchema": {"json": {"type": "object", "properties": {}}}}}]),
           [U("Time?"), A("Checking.", [{"toolUseId": "c9", "name": "now", "input": {}}])])),
    ("assistant-content-null-without-calls", {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
        {"role": "user", "content": "Again"}]},
     state(user("Again"), [U("Hi"), A(" ")])),
    ("tool-without-parameters", {"tools": [{"type": "function", "function": {"name": "ping"}}],
                                 "messages": [{"role": "user", "content": "Hi"}]},
     state(user("Hi", tools=[{"toolSpecification": {
         "name": "ping", "description": "Tool: ping",
         "inputSchema": {"json": {"type": "object", "properties": {}}}}}]))),
    ("accepted-fields-are-dropped", {
        "temperature": 0.3, "top_p": 0.9, "n": 1, "user": "u-1", "seed": 7,
        "response_format": {"type": "json_object"}, "tool_choice": "auto",
        "parallel_tool_calls": True, "max_completion_tokens": 100, "frequency_penalty": 0,
        "presence_penalty": 0, "logprobs": False, "store": False, "stream": False,
        "stream_options": {"include_usage": True}, "metadata": {"k": "v"},
        "messages": [{"role": "user", "content": "Hi"}]},
     state(user("Hi"))),
    ("reasoning-effort-asks-for-thinking", {"reasoning_effort": "medium",
                                            "messages": [{"role": "user", "content": "Hi"}]},
     state(user("<thinking_mode>adaptive</thinking_mode><thinking_effort>medium"
                "</thinking_effort>\n\nHi"))),
]


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_openai_request_becomes_exact_codewhisperer_payload(body, expected):
    original = copy.deepcopy(body)
    normalised = convert.openai_to_anthropic({"model": "claude-sonnet-4-5", **body})
    prepared = convert.anthropic_to_codewhisperer(normalised, conversation_id="conv-1")
    assert prepared.payload == expected
    assert prepared.model_id == MODEL
    assert body == original  # the client's body is not modified


def test_openai_fields_map_to_their_anthropic_counterparts():
    body = {"model": "m", "messages": [{"role": "system", "content": "S"},
                                       {"role": "user", "content": "Hi"}],
            "stop": "END", "user": "u-1", "max_tokens": 50, "temperature": 0.2, "top_p": 0.5,
            "tools": [READ_TOOL], "tool_choice": "required", "parallel_tool_calls": False,
            "reasoning_effort": "low", "stream": True, "seed": 3}
    assert convert.openai_to_anthropic(body) == {
        "model": "m", "system": "S", "messages": [{"role": "user", "content": "Hi"}],
        "stop_sequences": ["END"], "metadata": {"user_id": "u-1"}, "max_tokens": 50,
        "temperature": 0.2, "top_p": 0.5,
        "tools": [{"name": "read_file", "description": "Read a file",
                   "input_schema": READ_TOOL["function"]["parameters"]}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "thinking": {"type": "adaptive"}, "output_config": {"effort": "low"},
        "stream": True,
    }
    prepared = convert.anthropic_to_codewhisperer(convert.openai_to_anthropic(body),
                                                  conversation_id="c")
    assert prepared.stop_sequences == ("END",)
    assert prepared.thinking


def test_tool_messages_become_one_user_message_of_tool_results():
    out = convert.openai_to_anthropic({"model": "m", "messages": [
        *TOOL_LOOP, {"role": "user", "content": "Next."},
        {"role": "tool", "tool_call_id": "late", "content": "x"}]})
    assert out["messages"] == [
        {"role": "user", "content": "Read a and b"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_1", "name": "read_file", "input": {"path": "a"}},
            {"type": "tool_use", "id": "call_2", "name": "read_file", "input": {"path": "b"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1",
             "content": [{"type": "text", "text": "AAA"}]},
            {"type": "tool_result", "tool_use_id": "call_2",
             "content": [{"type": "text", "text": "no such"}, {"type": "text", "text": " file"}]}]},
        {"role": "user", "content": "Next."},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "late",
                                      "content": [{"type": "text", "text": "x"}]}]},
    ]


@pytest.mark.parametrize(("tool_choice", "parallel", "expected"), [
    (None, None, None),
    ("auto", None, None),
    ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", None, {"type": "any"}),
    ("none", False, {"type": "none"}),
    ({"type": "function", "function": {"name": "read_file"}}, None,
     {"type": "tool", "name": "read_file"}),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}, None, None),
])
def test_tool_choice_maps_to_anthropic(tool_choice, parallel, expected):
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [READ_TOOL]}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert convert.openai_to_anthropic(body).get("tool_choice") == expected


def test_max_completion_tokens_wins_over_max_tokens_and_minimal_effort_means_no_thinking():
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 10, "max_completion_tokens": 20, "reasoning_effort": "minimal"}
    out = convert.openai_to_anthropic(body)
    assert out["max_tokens"] == 20
    assert "thinking" not in out


def with_messages(*messages, **fields):
    return {"model": "m", "messages": list(messages), **fields}


HI = {"role": "user", "content": "Hi"}
BAD_REQUESTS = [
    ("arguments-not-json", with_messages(
        HI, {"role": "assistant", "content": None,
             "tool_calls": [call("call_ok", "f", "{}"), call("call_7", "write", '{"a": ')]}),
     "messages[1].tool_calls[1].function.arguments", "'call_7' (write) are not valid JSON"),
    ("arguments-not-an-object", with_messages(
        HI, {"role": "assistant", "tool_calls": [call("c", "f", "[1]")]}),
     "messages[1].tool_calls[0].function.arguments", "must be a JSON object"),
    ("tool-call-without-id", with_messages(
        HI, {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
     "messages[1].tool_calls[0].id", "expected a string"),
    ("remote-image", with_messages({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}),
     "messages[0].content[0].image_url.url", "remote image URLs are not supported"),
    ("data-url-not-base64", with_messages({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}]}),
     "messages[0].content[0].image_url.url", "base64"),
    ("image-not-base64", with_messages({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!notbase64"}}]}),
     "messages[0].content[0].image_url.url", "not valid base64"),
    ("image-of-another-type", with_messages({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/webp;base64,R0lGODlhAQABAAAAACw="}}
    ]}), "messages[0].content[0].image_url.url", "the image data is GIF, not image/webp"),
    ("image-too-large", with_messages({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 7_000_000}}
    ]}), "messages[0].content[0].image_url.url", "larger than 5 MiB"),
    ("image-type", with_messages({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}]}),
     "messages[0].content[0].image_url.url", "'image/tiff' is not supported"),
    ("audio-part", with_messages({"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}),
     "messages[0].content[0]", "'input_audio' is not supported"),
    ("user-content-null", with_messages({"role": "user", "content": None}),
     "messages[0].content", "expected a string or a list"),
    ("tool-without-call-id", with_messages(HI, {"role": "tool", "content": "x"}),
     "messages[1].tool_call_id", "tool_call_id"),
    ("tool-content-image", with_messages(HI, {"role": "tool", "tool_call_id": "c", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}),
     "messages[1].content[0]", "expected a text part"),
    ("function-role", with_messages(HI, {"role": "function", "name": "f", "content": "x"}),
     "messages[1].role", "use tools and tool messages"),
    ("unknown-role", with_messages({"role": "robot", "content": "x"}),
     "messages[0].role", "'robot'"),
    ("n-above-1", with_messages(HI, n=2), "n", "only n=1"),
    ("stream-type", with_messages(HI, stream="yes"), "stream", "expected true or false"),
    ("max-completion-tokens-type", with_messages(HI, max_completion_tokens=1.5),
     "max_completion_tokens", "expected a whole number"),
    ("top-p-type", with_messages(HI, top_p=[1]), "top_p", "expected a number"),
    ("messages-missing", {"model": "m"}, "messages", "messages"),
    ("model-missing", {"messages": [HI]}, "model", "model"),
    ("tools-not-a-list", with_messages(HI, tools={"a": 1}), "tools", "expected a list"),
    ("tool-not-function", with_messages(HI, tools=[{"type": "custom", "custom": {"name": "x"}}]),
     "tools[0]", "only function tools"),
    ("tool-without-name", with_messages(HI, tools=[{"type": "function", "function": {}}]),
     "tools[0].function.name", "needs a name"),
    ("tool-choice-type", with_messages(HI, tool_choice=7), "tool_choice", "tool_choice"),
    ("stop-type", with_messages(HI, stop=[1]), "stop", "list of strings"),
    ("stream-options-type", with_messages(HI, stream_options="yes"), "stream_options",
     "expected an object"),
]


@pytest.mark.parametrize(("body", "param", "needle"), [c[1:] for c in BAD_REQUESTS],
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_openai_request_raises_with_param(body, param, needle):
    with pytest.raises(convert.ConversionError) as caught:
        convert.anthropic_to_codewhisperer(convert.openai_to_anthropic(body),
                                           conversation_id="c")
    assert caught.value.status == 400
    assert caught.value.param == param
    assert needle in str(caught.value)


# Rendering ################################################################


def chunks_of(raw: bytes) -> list:
    """Split rendered bytes into parsed ``data:`` payloads ("[DONE]" kept as text)."""
    assert raw.endswith(b"\n\n")
    events = parse_sse(raw)
    assert all(name is None for name, _ in events), events
    return [data for _, data in events]


def test_openai_renderer_exact_bytes():
    stream = convert.OpenAIStream(completion_id="chatcmpl-1", model="m", created=7)
    out = stream.start() + stream.render([convert.Text('say "hi"\n'),
                                          convert.ToolCall("t", "n", '{"a":1}')])
    out += stream.finish("tool_use", convert.Usage(3, 2))
    head = 'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m",'
    assert out.decode() == (
        head + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
        '"finish_reason":null}]}\n\n'
        + head + '"choices":[{"index":0,"delta":{"content":"say \\"hi\\"\\n"},'
        '"finish_reason":null}]}\n\n'
        + head + '"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"t",'
        '"type":"function","function":{"name":"n","arguments":""}}]},"finish_reason":null}]}\n\n'
        + head + '"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":'
        '{"arguments":"{\\"a\\":1}"}}]},"finish_reason":null}]}\n\n'
        + head + '"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}\n\n'
        'data: [DONE]\n\n')


def test_openai_renderer_numbers_tool_calls_and_sets_usage_null_until_the_end():
    stream = convert.OpenAIStream(completion_id="chatcmpl-2", model="claude-sonnet-4-5",
                                  created=1_767_225_600, include_usage=True)
    events = [convert.Thinking("hmm"), convert.ThinkingSignature("sig"), convert.Text("Reading."),
              convert.ToolCall("tooluse_a", "read_file", '{"path": "a"}'),
              convert.Text(" and "),
              convert.ToolCall("tooluse_b", "list_dir", "{}")]
    out = stream.start() + stream.render(events[:3]) + stream.render(events[3:])
    out += stream.finish("tool_use", convert.Usage(60, 20, cache_read_input_tokens=40))
    chunks = chunks_of(out)
    assert chunks[-1] == "[DONE]"
    for chunk in chunks[:-1]:
        ChatCompletionChunk.model_validate(chunk)
        assert chunk["id"] == "chatcmpl-2" and chunk["created"] == 1_767_225_600
    *body, final = chunks[:-1]
    assert all(c["usage"] is None for c in body)
    assert final["choices"] == []
    assert final["usage"] == {"prompt_tokens": 100, "completion_tokens": 20,
                              "total_tokens": 120, "prompt_tokens_details": {"cached_tokens": 40}}
    deltas = [c["choices"][0]["delta"] for c in body]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "hmm"},
        {"content": "Reading."},
        {"tool_calls": [{"index": 0, "id": "tooluse_a", "type": "function",
                         "function": {"name": "read_file", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"path": "a"}'}}]},
        {"content": " and "},
        {"tool_calls": [{"index": 1, "id": "tooluse_b", "type": "function",
                         "function": {"name": "list_dir", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in body] == [None] * 8 + ["tool_calls"]


@pytest.mark.parametrize(("stop_reason", "expected"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("tool_use", "tool_calls"),
    ("max_tokens", "length"), ("model_context_window_exceeded", "length"),
    ("refusal", "content_filter"), ("something_new", "stop"),
])
def test_finish_reason_mapping(stop_reason, expected):
    stream = convert.OpenAIStream(completion_id="c", model="m", created=1)
    chunks = chunks_of(stream.finish(stop_reason, convert.Usage(1, 1), None))
    assert chunks[0]["choices"][0]["finish_reason"] == expected
    assert chunks[1:] == ["[DONE]"]
    body = convert.collect_openai([], completion_id="c", model="m", created=1,
                                  stop_reason=stop_reason, usage=convert.Usage(1, 1))
    assert body["choices"][0]["finish_reason"] == expected


def test_openai_renderer_error_is_an_error_chunk_without_done():
    stream = convert.OpenAIStream(completion_id="c", model="m", created=1, include_usage=True)
    failure = convert.Failure("rate_limit", 429, "Kiro ended the answer: slow down",
                              code="rate_limit_exceeded")
    assert chunks_of(stream.error(failure)) == [{"error": {
        "message": "Kiro ended the answer: slow down", "type": "rate_limit_exceeded",
        "param": None, "code": "rate_limit_exceeded"}}]
    assert stream.keepalive().startswith(b":") and stream.keepalive().endswith(b"\n\n")


def test_openai_renderer_output_is_valid_json_for_odd_text_and_model_names():
    stream = convert.OpenAIStream(completion_id="c", model='m"\u00e9\ud800', created=1)
    lone = json.loads('"a\\ud800b \\u2028 \\u0000 \\u4e16"')
    (chunk,) = chunks_of(stream.render([convert.Text(lone)]))
    assert chunk["choices"][0]["delta"]["content"] == lone
    assert chunk["model"] == 'm"\u00e9\ud800'


def test_collect_openai_folds_events():
    events = [convert.Thinking("a"), convert.Thinking("b"), convert.Text("Hel"),
              convert.Text("lo"), convert.ToolCall("t1", "read_file", '{"path":"x"}')]
    body = convert.collect_openai(events, completion_id="chatcmpl-9", model="m", created=5,
                                  stop_reason="tool_use", usage=convert.Usage(10, 4))
    ChatCompletion.model_validate(body)
    assert body == {
        "id": "chatcmpl-9", "object": "chat.completion", "created": 5, "model": "m",
        "choices": [{"index": 0, "logprobs": None, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Hello", "refusal": None, "reasoning_content": "ab",
            "tool_calls": [{"id": "t1", "type": "function",
                            "function": {"name": "read_file", "arguments": '{"path":"x"}'}}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
    }


@pytest.mark.parametrize(("events", "content"), [
    ([convert.ToolCall("t1", "f", "{}")], None),
    ([], ""),
], ids=["only-tool-calls", "empty-answer"])
def test_collect_openai_content_null_only_with_tool_calls(events, content):
    body = convert.collect_openai(events, completion_id="c", model="m", created=1,
                                  stop_reason="end_turn", usage=convert.Usage(1, 0))
    assert body["choices"][0]["message"]["content"] == content
    assert ("tool_calls" in body["choices"][0]["message"]) == bool(events)


# End to end ###############################################################


async def post_raw(url, body, headers=None):
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {API_KEY}",
                                         **(headers or {})}) as response:
            return response.status, response.headers, await response.read()


async def raw_stream(proxy_url, body):
    """POST a streaming request; return the parsed data lines (all chunks validated)."""
    status, headers, raw = await post_raw(proxy_url, {**body, "stream": True})
    assert status == 200, raw
    assert headers["Content-Type"].startswith("text/event-stream")
    assert b"event:" not in raw
    chunks = [data for _, data in parse_sse(raw, comments=True)]
    for chunk in chunks:
        if isinstance(chunk, dict) and "error" not in chunk:
            ChatCompletionChunk.model_validate(chunk)
    return chunks


def deltas(chunks, key):
    return [c["choices"][0]["delta"][key] for c in chunks
            if isinstance(c, dict) and c.get("choices") and key in c["choices"][0]["delta"]]


async def test_streaming_text_raw_and_with_the_sdk(proxy):
    pieces = ["hé", "llo, 世", "界 🎉", " ok"]
    proxy.fake.script.append(Stream(fakes.text(*pieces) + fakes.tail(), split=(1, 2, 3)))
    chunks = await raw_stream(proxy.url, BASIC)
    assert chunks[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert deltas(chunks, "content") == [""] + pieces
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert {c["id"] for c in chunks[:-1]} == {chunks[0]["id"]}
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["model"] == "claude-sonnet-4-5" and "usage" not in c for c in chunks[:-1])
    assert all(isinstance(c["created"], int) for c in chunks[:-1])

    proxy.fake.script.append(Stream(fakes.text(*pieces) + fakes.tail(), split=(1,)))
    stream = await proxy.openai().chat.completions.create(**BASIC, stream=True)
    received = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in received) == "".join(pieces)
    assert received[-1].choices[0].finish_reason == "stop"


async def test_streaming_tool_calls_accumulate_in_the_sdk(proxy):
    frames = (fakes.text("Let me look.")
              + fakes.tool("tooluse_1", "read_file", '{"pa', 'th": "a.', 'txt"}')
              + fakes.tool("tooluse_2", "list_dir", '{"dir": "."}')
              + fakes.tail())
    proxy.fake.script.append(Stream(frames, split=(5, 1, 17)))
    tools = [READ_TOOL, {"type": "function", "function": {"name": "list_dir"}}]
    async with proxy.openai().chat.completions.stream(**BASIC, tools=tools) as stream:
        completion = await stream.get_final_completion()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    assert [(c.id, c.type, c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls] == [
        ("tooluse_1", "function", "read_file", {"path": "a.txt"}),
        ("tooluse_2", "function", "list_dir", {"dir": "."})]
    assert choice.message.tool_calls[0].function.parsed_arguments == {"path": "a.txt"}

    proxy.fake.script.append(Stream(frames, split=(3,)))
    chunks = await raw_stream(proxy.url, {**BASIC, "tools": tools})
    calls = [call for d in deltas(chunks, "tool_calls") for call in d]
    assert [c["index"] for c in calls] == [0, 0, 1, 1]
    assert [("id" in c, "type" in c, "name" in c["function"]) for c in calls] == [
        (True, True, True), (False, False, False)] * 2
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_include_usage_adds_a_final_usage_chunk(proxy):
    usage = {"tokenUsage": {"uncachedInputTokens": 120, "cacheReadInputTokens": 30,
                            "outputTokens": 11, "totalTokens": 161}}
    frames = fakes.text("ok") + [fakes.event("metadataEvent", usage)] + fakes.tail()
    proxy.fake.script.append(Stream(frames))
    body = {**BASIC, "stream_options": {"include_usage": True}}
    chunks = await raw_stream(proxy.url, body)
    assert chunks[-1] == "[DONE]"
    final = chunks[-2]
    assert final["choices"] == []
    assert final["usage"] == {"prompt_tokens": 150, "completion_tokens": 11, "total_tokens": 161,
                              "prompt_tokens_details": {"cached_tokens": 30}}
    assert all("usage" in c and c["usage"] is None for c in chunks[:-2])
    assert chunks[-3]["choices"][0]["finish_reason"] == "stop"

    proxy.fake.script.append(Stream(frames))
    stream = await proxy.openai().chat.completions.create(
        **BASIC, stream=True, stream_options={"include_usage": True})
    received = [chunk async for chunk in stream]
    assert received[-1].usage.total_tokens == 161
    assert all(c.usage is None for c in received[:-1])


async def test_non_streaming_completion(proxy):
    frames = fakes.text("Hel", "lo") + fakes.tool("tooluse_9", "read_file", '{"path":"x"}')
    proxy.fake.script.append(Stream(frames + fakes.tail()))
    status, _, raw = await post_raw(proxy.url, {**BASIC, "tools": [READ_TOOL]})
    assert status == 200
    body = json.loads(raw)
    completion = ChatCompletion.model_validate(body)
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion" and completion.model == "claude-sonnet-4-5"
    message = completion.choices[0].message
    assert message.content == "Hello"
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("tooluse_9", "read_file", '{"path":"x"}')]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.usage.total_tokens == (completion.usage.prompt_tokens
                                             + completion.usage.completion_tokens)
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0

    proxy.fake.script.append(Stream(fakes.tool("tooluse_1", "read_file", "{}") + fakes.tail()))
    completion = await proxy.openai().chat.completions.create(**BASIC, tools=[READ_TOOL])
    assert completion.choices[0].message.content is None
    assert completion.choices[0].message.tool_calls[0].id == "tooluse_1"


async def test_thinking_comes_out_as_reasoning_content(proxy):
    answer = fakes.text("<think", "ing>Let me see.", "</thinking>\n\nThe ", "answer.")
    proxy.fake.script.append(Stream(answer + fakes.tail()))
    body = {**BASIC, "reasoning_effort": "high"}
    chunks = await raw_stream(proxy.url, body)
    assert "".join(deltas(chunks, "reasoning_content")) == "Let me see."
    assert "".join(deltas(chunks, "content")) == "The answer."
    (call,) = proxy.fake.calls("/generateAssistantResponse")
    content = call.body["conversationState"]["currentMessage"]["userInputMessage"]["content"]
    assert content.startswith("<thinking_mode>adaptive</thinking_mode>")

    proxy.fake.script.append(Stream(answer + fakes.tail()))
    status, _, raw = await post_raw(proxy.url, body)
    message = json.loads(raw)["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("Let me see.", "The answer.")


async def test_output_limit_ends_with_finish_reason_length(proxy):
    frames = fakes.text("partial") + [
        fakes.exception("ContentLengthExceededException", "output too long")]
    proxy.fake.script.append(Stream(frames))
    chunks = await raw_stream(proxy.url, BASIC)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1] == "[DONE]"


async def test_stop_sequence_ends_the_answer_with_stop(proxy):
    proxy.fake.script.append(Stream(fakes.text("one two ", "END three") + fakes.tail()))
    completion = await proxy.openai().chat.completions.create(**BASIC, stop=["END"])
    assert completion.choices[0].message.content == "one two "
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("broken", fakes.BROKEN_STREAMS.values(), ids=fakes.BROKEN_STREAMS)
async def test_mid_stream_failure_ends_with_an_error_chunk(proxy, broken):
    proxy.fake.script.append(broken())
    chunks = await raw_stream(proxy.url, {**BASIC, "stream_options": {"include_usage": True}})
    assert "[DONE]" not in chunks
    error = chunks[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])

    proxy.fake.script.append(broken())
    response = await proxy.openai().chat.completions.create(**BASIC, stream=True)
    with pytest.raises(openai.APIError) as caught:
        async for _ in response:
            pass
    assert caught.value.message == error["message"]
    assert caught.value.body == error


@pytest.mark.parametrize(("reply", "status", "error_type", "code", "needle"), [
    (Status(400, {"message": "Improperly formed request.", "reason": None}),
     400, "invalid_request_error", None, "Improperly formed request"),
    (Status(400, {"message": "Input is too long.", "reason": "CONTENT_LENGTH_EXCEEDS_THRESHOLD"}),
     400, "invalid_request_error", "context_length_exceeded", "prompt is too long"),
    (Status(402, {"message": "quota", "reason": "MONTHLY_REQUEST_COUNT"}),
     402, "insufficient_quota", "insufficient_quota", "out of quota"),
    (Status(403, {"message": "Account suspended", "reason": "TEMPORARILY_SUSPENDED"}),
     403, "permission_error", None, "TEMPORARILY_SUSPENDED"),
    (Status(429, {"message": "Too many requests"}, {"Retry-After": "7"}),
     429, "rate_limit_exceeded", "rate_limit_exceeded", "Too many requests"),
    (Status(500, {"message": "boom"}), 502, "server_error", None, "boom"),
    (Status(400, {"message": "Invalid model.", "reason": "INVALID_MODEL_ID"}),
     404, "invalid_request_error", "model_not_found", "Kiro has no such model"),
], ids=["malformed", "too-long", "quota", "suspended", "throttled", "5xx", "model"])
async def test_upstream_refusal_maps_to_openai_error(proxy, reply, status, error_type, code,
                                                     needle):
    proxy.fake.script.append(reply)
    with pytest.raises(openai.APIStatusError) as caught:
        await proxy.openai().chat.completions.create(**BASIC, stream=True)
    error = caught.value
    assert error.status_code == status
    assert error.body == {"message": error.body["message"], "type": error_type,
                          "param": None, "code": code}
    assert needle in error.body["message"]
    assert error.code == code
    if status == 429:
        assert error.response.headers["Retry-After"] == "7"


PROFILE_ARN = "arn:aws:codewhisperer:us-east-1:111122223333:profile/FAKE"


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_the_upstream_receives_the_exact_codewhisperer_request(proxy, body, expected):
    rest = {k: v for k, v in body.items() if k != "messages"}
    await proxy.openai().chat.completions.create(
        model="claude-sonnet-4-5", messages=body["messages"], extra_body=rest)
    (call,) = proxy.fake.calls("/generateAssistantResponse")
    assert call.headers["Authorization"] == "Bearer aoa-initial-access"
    conversation_id = call.body["conversationState"]["conversationId"]
    assert len(conversation_id) == 36 and conversation_id.count("-") == 4
    sent = json.loads(json.dumps(call.body))
    sent["conversationState"]["conversationId"] = "conv-1"
    assert sent == {**expected, "profileArn": PROFILE_ARN}


async def client_with(aiohttp_server, proxy_config, **changes):
    """An SDK client of a kiro2api whose config differs from ``proxy_config`` by ``changes``."""
    import kiro2api

    config = dataclasses.replace(proxy_config, **changes)
    server = await aiohttp_server(kiro2api.make_app(config))
    return openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=API_KEY,
                              max_retries=0)


async def test_a_prompt_over_the_input_limit_is_context_length_exceeded(
        aiohttp_server, fake_upstream, proxy_config):
    client = await client_with(aiohttp_server, proxy_config, max_input_bytes=2_000)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "word " * 1000}])
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.body["message"].startswith("prompt is too long")
    assert fake_upstream.calls("/generateAssistantResponse") == []


@pytest.mark.parametrize(("data", "param", "needle"), [
    (b"{not json", None, "not valid JSON"),
    (json.dumps(with_messages(HI, {"role": "assistant", "tool_calls": [
        call("call_3", "write", "{oops")]})), "messages[1].tool_calls[0].function.arguments",
     "call_3"),
    (json.dumps(with_messages({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]})),
     "messages[0].content[0].image_url.url", "remote image"),
    (json.dumps(with_messages(HI, n=3)), "n", "n=1"),
    (json.dumps({"model": "m", "messages": []}), "messages", "at least one message"),
], ids=["bad-json", "bad-arguments", "remote-image", "n", "empty-messages"])
async def test_bad_request_gets_openai_400_envelope(proxy, data, param, needle):
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/chat/completions", data=data,
                                headers={"Authorization": f"Bearer {API_KEY}",
                                         "Content-Type": "application/json"}) as response:
            status, body = response.status, await response.json()
    assert status == 400
    assert set(body) == {"error"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
    assert needle in body["error"]["message"]
    assert proxy.fake.calls("/generateAssistantResponse") == []


async def test_wrong_key_gets_openai_authentication_error(proxy):
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.chat.completions.create(**BASIC)
    assert caught.value.body["type"] == "authentication_error"
    assert caught.value.code == "invalid_api_key"
    assert proxy.fake.calls("/generateAssistantResponse") == []


@pytest.mark.slow  # over a second
async def test_keepalive_comments_are_ignored_by_the_sdk(aiohttp_server, fake_upstream,
                                                         proxy_config):
    import kiro2api

    config = dataclasses.replace(proxy_config, ping_interval=0.05)
    server = await aiohttp_server(kiro2api.make_app(config))
    url = str(server.make_url("")).rstrip("/")
    frames = fakes.text("slow", " answer") + fakes.tail()
    # The upstream sends "slow" and then nothing until two keep-alives have gone out.
    gate = asyncio.Event()
    fake_upstream.script.append(Stream(frames, split=(len(frames[0]),), gate=gate))
    raw = b""
    async with aiohttp.ClientSession() as session, session.post(
            url + "/v1/chat/completions", json={**BASIC, "stream": True},
            headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.status == 200
        while raw.count(b": keep-alive\n\n") < 2:
            raw += await response.content.readany()
        gate.set()
        raw += await response.read()
    assert b"\n\n: keep-alive\n\n" in raw
    assert raw.endswith(b"data: [DONE]\n\n")

    # The SDK skips the comments (the upstream pauses between frames here).
    fake_upstream.script.append(Stream(frames, split=(len(frames[0]),), delay=0.3))
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    stream = await client.chat.completions.create(**BASIC, stream=True)
    received = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in received) == "slow answer"


async def test_oversized_body_gets_413_in_the_openai_envelope(aiohttp_server, fake_upstream,
                                                             proxy_config):
    client = await client_with(aiohttp_server, proxy_config, max_body_bytes=1000)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "x" * 5000}])
    assert caught.value.status_code == 413
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    assert "larger than 1000 bytes" in caught.value.body["message"]
    assert fake_upstream.calls("/generateAssistantResponse") == []
