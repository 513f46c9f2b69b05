"""convert.py: requests to CodeWhisperer payloads, frames to events to SSE. No loop needed."""

from __future__ import annotations

import json

import pytest

import convert
import eventstream
import fakes
from fakes import A, U, state, user
from helpers import parse_sse

MODEL = fakes.MODEL_ID




READ_SPEC = {"toolSpecification": {
    "name": "read_file", "description": "Read a file",
    "inputSchema": {"json": {"type": "object", "properties": {"path": {"type": "string"}},
                             "required": ["path"]}}}}
READ_TOOL = {"name": "read_file", "description": "Read a file", "input_schema": {
    "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
    "properties": {"path": {"type": "string"}}, "required": ["path"]}}
PNG = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}


CASES = [
    ("plain", {"messages": [{"role": "user", "content": "Hi"}]}, state(user("Hi"))),
    ("system-string", {"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}]},
     state(user("Be brief.\n\nHi"))),
    ("system-blocks-go-to-first-user-turn", {
        "system": [{"type": "text", "text": "One.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Two."}],
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "user", "content": "c"}]},
     state(user("c"), [U("One.\n\nTwo.\n\na"), A("b")])),
    ("consecutive-same-role-merged", {"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": [
            {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"}, {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"}]},
     state(user("e"), [U("a\n\nb"), A("c\n\nd")])),
    ("assistant-last-prefill", {"messages": [
        {"role": "user", "content": "Write JSON"}, {"role": "assistant", "content": "{"}]},
     state(user("Continue your last message from exactly where it ends, without repeating "
                "any of it."), [U("Write JSON"), A("{")])),
    ("assistant-first", {"messages": [
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"}]},
     state(user("Hi"), [U("Continue"), A("Hello")])),
    ("image-on-its-message", {"messages": [
        {"role": "user", "content": [PNG, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}, {
            "type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                        "data": "/9j/"}}]}]},
     state(user("Sure?", images=[{"format": "jpeg", "source": {"bytes": "/9j/"}}]),
           [U("What is it?", images=[{"format": "png", "source": {"bytes": "iVBO"}}]),
            A("A cat.")])),
    ("tool-loop-with-parallel-calls", {"tools": [READ_TOOL], "messages": [
        {"role": "user", "content": "Read a and b"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Reading."},
            {"type": "tool_use", "id": "t1", "name": "read_file", "input": {"path": "a"}},
            {"type": "tool_use", "id": "t2", "name": "read_file", "input": {"path": "b"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "AAA"},
            {"type": "tool_result", "tool_use_id": "t2", "is_error": True,
             "content": [{"type": "text", "text": "no such file"}]}]}]},
     state(user("Tool results provided.",
                toolResults=[
                    {"toolUseId": "t1", "content": [{"text": "AAA"}], "status": "success"},
                    {"toolUseId": "t2", "content": [{"text": "no such file"}],
                     "status": "error"}],
                tools=[READ_SPEC]),
           [U("Read a and b"),
            A("Reading.", [{"toolUseId": "t1", "name": "read_file", "input": {"path": "a"}},
                           {"toolUseId": "t2", "name": "read_file", "input": {"path": "b"}}])])),
    ("tool-history-without-tools-gets-placeholder-spec", {"messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "bash", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": ""}]}], "tools": []},
     state(user("Tool results provided.",
                toolResults=[{"toolUseId": "t1", "content": [{"text": "(empty result)"}],
                              "status": "success"}],
                tools=[{"toolSpecification": {
                    "name": "bash", "description": "Tool: bash",
                    "inputSchema": {"json": {"type": "object", "properties": {}}}}}]),
           [U("go"), A(" ", [{"toolUseId": "t1", "name": "bash", "input": {}}])])),
    ("tool-choice-none-offers-no-tools", {
        "tools": [READ_TOOL], "tool_choice": {"type": "none"}, "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "bash", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": "done"},
                                         {"type": "text", "text": "Now just say it."}]}]},
     state(user("Now just say it.",
                toolResults=[{"toolUseId": "t1", "content": [{"text": "done"}],
                              "status": "success"}],
                tools=[{"toolSpecification": {  # history's tool only, not read_file
                    "name": "bash", "description": "Tool: bash",
                    "inputSchema": {"json": {"type": "object", "properties": {}}}}}]),
           [U("go"), A(" ", [{"toolUseId": "t1", "name": "bash", "input": {}}])])),
    ("orphan-tool-result-becomes-text", {"messages": [
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "gone", "content": "late"},
            {"type": "text", "text": "hello"}]}]},
     state(user("[Tool result for gone]\nlate\n\nhello"))),
    ("ignored-sampling-fields", {"temperature": 0.5, "top_p": 0.9, "top_k": 3,
                                 "stop_sequences": ["x"], "metadata": {"user_id": "u"},
                                 "tool_choice": {"type": "auto"}, "max_tokens": 9,
                                 "messages": [{"role": "user", "content": "Hi"}]},
     state(user("Hi"))),
]


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_anthropic_request_becomes_exact_codewhisperer_payload(body, expected):
    prepared = convert.anthropic_to_codewhisperer(
        {"model": "claude-sonnet-4-5-20250929", **body}, conversation_id="conv-1")
    assert prepared.payload == expected
    assert prepared.model_id == MODEL


def test_long_tool_names_are_shortened_and_mapped_back():
    name = "mcp__a_very_long_server_name__and_an_even_longer_tool_name_that_goes_on"
    body = {"model": "m", "tools": [{"name": name, "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "x"}]}
    prepared = convert.anthropic_to_codewhisperer(body, conversation_id="c")
    sent = prepared.payload["conversationState"]["currentMessage"]["userInputMessage"][
        "userInputMessageContext"]["tools"][0]["toolSpecification"]["name"]
    assert len(sent) <= 64 and sent != name
    assert prepared.tool_names[sent] == name
    again = convert.anthropic_to_codewhisperer(body, conversation_id="c")
    assert again.tool_names == prepared.tool_names  # deterministic

    assembler = convert.Assembler(input_tokens=1, tool_names=prepared.tool_names)
    frames = fakes.tool("t1", sent, "{}")
    events = []
    for f in frames:
        assembler.feed_into(events, *headers_payload(f))
    assert events == [convert.ToolCall("t1", name, "{}")]


@pytest.mark.parametrize(("client", "kiro"), [
    ("claude-sonnet-4-5", "claude-sonnet-4.5"),
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4.5"),
    ("claude-sonnet-4-20250514", "claude-sonnet-4"),
    ("claude-haiku-4-5-20251001", "claude-haiku-4.5"),
    ("claude-opus-4-7", "claude-opus-4.7"),
    ("claude-3-7-sonnet-20250219", "claude-3.7-sonnet"),
    ("claude-sonnet-4-6[1m]", "claude-sonnet-4.6"),
    ("claude-sonnet-4-0", "claude-sonnet-4"),
    ("claude-opus-4-0", "claude-opus-4"),
    ("claude-3-7-sonnet-latest", "claude-3.7-sonnet"),
    ("claude-opus-4-5-latest", "claude-opus-4.5"),
    ("CLAUDE_SONNET_4_20250514_V1_0", "CLAUDE_SONNET_4_20250514_V1_0"),
    ("claude-sonnet-4.5", "claude-sonnet-4.5"),
    ("auto", "auto"),
    ("deepseek-3.2", "deepseek-3.2"),
])
def test_model_names_resolve(client, kiro):
    assert convert.resolve_model(client) == kiro


def headers_payload(frame: bytes):
    decoder = eventstream.Decoder()
    decoder.feed(frame)
    (message,) = list(decoder)
    return message.headers, message.payload


@pytest.mark.parametrize("payload", [
    {"content": "Hi"}, {"assistantResponseEvent": {"content": "Hi"}}])
def test_decode_event_accepts_bare_and_wrapped_payloads(payload):
    headers, body = headers_payload(fakes.event("assistantResponseEvent", payload))
    assert convert.decode_event(headers, body) == convert.Text("Hi")


@pytest.mark.parametrize("payload, expected", [
    (b' {"content": "Hi"}\n', convert.Text("Hi")),  # whitespace around the object
    (b'{"content": "Hi\\u00e9\\n"}', convert.Text("Hi\u00e9\n")),
    (b'{"content": "Hi"} x', None), (b'{"content": "Hi"}{}', None),  # extra data
    (b'{"content": "Hi"', None), (b"nope", None), (b"\xff", None),
    (b'["content"]', convert.UpstreamException(
        "InvalidEventPayload", "assistantResponseEvent payload is not an object")),
])
def test_decode_event_parses_payloads_as_json_loads_does(payload, expected):
    # decode_event skips json.loads's wrapper; what it accepts must not change.
    if expected is None:
        expected = convert.UpstreamException(
            "InvalidEventPayload", "assistantResponseEvent payload is not JSON")
    headers, body = headers_payload(fakes.event("assistantResponseEvent", payload))
    assert convert.decode_event(headers, body) == expected


def test_decode_event_reads_exception_type_from_header_or_payload():
    headers, body = headers_payload(fakes.exception("ThrottlingException", "slow"))
    assert convert.decode_event(headers, body) == convert.UpstreamException(
        "ThrottlingException", "slow")
    frame = eventstream.encode({":message-type": "exception"},
                               b'{"__type": "com.amazon#ValidationException", "message": "m"}')
    assert convert.decode_event(*headers_payload(frame)) == convert.UpstreamException(
        "ValidationException", "m")


def run(frames, **kwargs):
    assembler = convert.Assembler(input_tokens=kwargs.pop("input_tokens", 10), **kwargs)
    events = []
    for frame in frames:
        assembler.feed_into(events, *headers_payload(frame))
    events += assembler.finish()
    return events, assembler.stop_reason, assembler


def test_tool_input_with_invalid_json_is_dropped_as_max_tokens():
    events, stop, _ = run(fakes.text("a") + fakes.tool("t1", "x", '{"a": '))
    assert events == [convert.Text("a")]
    assert stop == "max_tokens"


def test_tool_input_object_form_is_accepted():
    frames = [fakes.event("toolUseEvent", {"toolUseId": "t", "name": "n", "input": {"k": 1}}),
              fakes.event("toolUseEvent", {"toolUseId": "t", "name": "n", "stop": True})]
    events, stop, _ = run(frames)
    assert events == [convert.ToolCall("t", "n", '{"k": 1}')]
    assert stop == "tool_use"


def test_repeated_text_chunks_are_all_kept():
    events, _, _ = run(fakes.text("\n", "\n", "x"))
    assert events == [convert.Text("\n"), convert.Text("\n"), convert.Text("x")]


def test_refusal_and_context_window_stop_reasons():
    refusal = fakes.event("metadataEvent", {"stopReason": "CONTENT_FILTERED",
                                            "stopDetails": {"refusal": {"category": "x"}}})
    assert run([refusal] + fakes.tail())[1] == "refusal"
    assert run(fakes.text("a") + fakes.tail(percentage=100.0))[1] == \
        "model_context_window_exceeded"


def test_input_tokens_back_computed_from_context_usage():
    _, _, assembler = run(fakes.text("abcd" * 10) + fakes.tail(percentage=10.0))
    assert assembler.usage.output_tokens == 10
    assert assembler.usage.input_tokens == 20_000 - 10


def test_upstream_exception_raises_stream_error():
    with pytest.raises(convert.StreamError) as caught:
        run(fakes.text("a") + [fakes.exception("InternalServerException", "boom")])
    assert caught.value.error_type == "InternalServerException"


def test_anthropic_renderer_exact_bytes():
    stream = convert.AnthropicStream(message_id="msg_1", model="m", input_tokens=3)
    out = stream.render([convert.Text('say "hi"\n'), convert.ToolCall("t", "n", '{"a":1}')])
    out += stream.finish("tool_use", convert.Usage(3, 2))
    assert out.decode() == (
        'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        '"content_block":{"type":"text","text":""}}\n\n'
        'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        '"delta":{"type":"text_delta","text":"say \\"hi\\"\\n"}}\n\n'
        'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
        'event: content_block_start\ndata: {"type":"content_block_start","index":1,'
        '"content_block":{"type":"tool_use","id":"t","name":"n","input":{}}}\n\n'
        'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
        '"delta":{"type":"input_json_delta","partial_json":"{\\"a\\":1}"}}\n\n'
        'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n'
        'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"tool_use",'
        '"stop_sequence":null},"usage":{"input_tokens":3,"output_tokens":2}}\n\n'
        'event: message_stop\ndata: {"type":"message_stop"}\n\n')


def test_renderer_output_is_valid_utf8_json_even_for_lone_surrogates():
    stream = convert.AnthropicStream(message_id="m", model="m", input_tokens=1)
    out = stream.render([convert.Text(json.loads('"a\\ud800b"'))])
    assert parse_sse(out)[1][1]["delta"]["text"] == "a\ud800b"


@pytest.mark.parametrize(("status", "body", "expected_status", "code"), [
    (400, '{"message":"Input is too long.","reason":"CONTENT_LENGTH_EXCEEDS_THRESHOLD"}', 400,
     "context_length_exceeded"),
    (400, '{"message":"Improperly formed request.","reason":null}', 400, None),
    (400, '{"message":"Invalid model.","reason":"INVALID_MODEL_ID"}', 404, "model_not_found"),
    (403, '{"message":"The bearer token included in the request is invalid."}', 401,
     "invalid_api_key"),
    (429, "not json", 429, "rate_limit_exceeded"),
    (504, "", 502, None),
])
def test_upstream_failure_mapping(status, body, expected_status, code):
    failure = convert.upstream_failure(status, body)
    assert (failure.status, failure.code) == (expected_status, code)
    assert failure.message


# Emulated thinking, stop sequences, truncation (issue 6) ##################


def split_everywhere(text):
    """Every way to cut ``text`` in two reads, plus one read per character."""
    yield [text]
    for at in range(1, len(text)):
        yield [text[:at], text[at:]]
    yield list(text)


def fold(events):
    """Concatenate adjacent events of one kind: [(kind, text)]."""
    out = []
    for event in events:
        kind = type(event).__name__
        value = event.text if hasattr(event, "text") else event
        if out and out[-1][0] == kind and isinstance(value, str):
            out[-1] = (kind, out[-1][1] + value)
        else:
            out.append((kind, value))
    return out


THINKING_CASES = [
    ("<thinking>plan</thinking>\n\nAnswer", [("Thinking", "plan"), ("Text", "Answer")]),
    ("\n  <thinking>a</thinking>\n\nb", [("Thinking", "a"), ("Text", "b")]),
    ("<thinking>I must not write </thinking> early.\nOk.</thinking>\n\nDone",
     [("Thinking", "I must not write </thinking> early.\nOk."), ("Text", "Done")]),
    ("<thinking>say `</thinking>\n\n` here</thinking>\n\nx",
     [("Thinking", "say `</thinking>\n\n` here"), ("Text", "x")]),
    ("<thinking>only thoughts</thinking>", [("Thinking", "only thoughts")]),
    ("Plain answer <thinking> mentioned", [("Text", "Plain answer <thinking> mentioned")]),
    ("<think", [("Text", "<think")]),
]


@pytest.mark.parametrize(("text", "expected"), THINKING_CASES,
                         ids=[f"case{i}" for i in range(len(THINKING_CASES))])
def test_thinking_tags_parse_however_the_text_is_split(text, expected):
    for chunks in split_everywhere(text):
        events, stop, _ = run(fakes.text(*chunks) + fakes.tail(), thinking=True)
        assert fold(events) == expected, chunks
        assert stop == "end_turn"


def test_thinking_is_rendered_as_thinking_blocks():
    events, _, _ = run(fakes.text("<thinking>hm</thinking>\n\nHi"), thinking=True)
    stream = convert.AnthropicStream(message_id="m", model="m", input_tokens=1)
    lines = [data for _, data in parse_sse(stream.render(events))]
    assert [(d["type"], d.get("content_block", d.get("delta", {})).get("type")) for d in lines] \
        == [("content_block_start", "thinking"), ("content_block_delta", "thinking_delta"),
            ("content_block_stop", None), ("content_block_start", "text"),
            ("content_block_delta", "text_delta")]


def test_native_reasoning_gives_thinking_with_signature():
    frames = [fakes.event("reasoningContentEvent", {"text": "deep"}),
              fakes.event("reasoningContentEvent", {"signature": "sig=="})] + fakes.text("ok")
    events, _, _ = run(frames)
    message = convert.collect_anthropic(events, message_id="m", model="m",
                                        stop_reason="end_turn", usage=convert.Usage(1))
    assert message["content"] == [{"type": "thinking", "thinking": "deep", "signature": "sig=="},
                                  {"type": "text", "text": "ok"}]


@pytest.mark.parametrize(("thinking", "prefix"), [
    ({"type": "enabled", "budget_tokens": 31999},
     "<thinking_mode>enabled</thinking_mode><max_thinking_length>24576</max_thinking_length>"),
    ({"type": "enabled", "budget_tokens": 2048},
     "<thinking_mode>enabled</thinking_mode><max_thinking_length>2048</max_thinking_length>"),
    ({"type": "adaptive"},
     "<thinking_mode>adaptive</thinking_mode><thinking_effort>medium</thinking_effort>"),
    ({"type": "disabled"}, ""),
])
def test_thinking_request_injects_tags_in_front_of_the_system_prompt(thinking, prefix):
    body = {"model": "m", "system": "Sys.", "thinking": thinking,
            "output_config": {"effort": "medium"},
            "messages": [{"role": "user", "content": "Hi"}]}
    prepared = convert.anthropic_to_codewhisperer(body, conversation_id="c")
    content = prepared.payload["conversationState"]["currentMessage"]["userInputMessage"][
        "content"]
    assert content == (f"{prefix}\n\nSys.\n\nHi" if prefix else "Sys.\n\nHi")
    assert prepared.thinking is bool(prefix)


def test_prior_thinking_is_replayed_before_the_answer_text():
    body = {"model": "m", "messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                                          {"type": "text", "text": "b"}]},
        {"role": "user", "content": "c"}]}
    history = convert.anthropic_to_codewhisperer(body, conversation_id="c").payload[
        "conversationState"]["history"]
    assert history[1] == {"assistantResponseMessage": {"content": "<thinking>t</thinking>\n\nb"}}


@pytest.mark.parametrize("text", ["Hello STOP world", "STOP", "abcSTO"])
def test_stop_sequences_cut_the_text_however_it_is_split(text):
    for chunks in split_everywhere(text):
        events, stop, assembler = run(fakes.text(*chunks) + fakes.tail(),
                                      stop_sequences=("STOP", "never"))
        before, hit, _ = text.partition("STOP")
        assert "".join(e.text for e in events) == before
        assert stop == ("stop_sequence" if hit else "end_turn"), chunks
        assert assembler.stop_sequence == ("STOP" if hit else None)


@pytest.mark.parametrize("ending", [
    [fakes.exception("ContentLengthExceededException", "cut")],
    [fakes.event("metadataEvent", {"stopReason": "CONTENT_FILTERED"})],
], ids=["output-limit", "refusal"])
def test_text_held_for_a_stop_sequence_is_kept_when_the_answer_ends_otherwise(ending):
    # "E" might have begun "END"; the answer ending another way lets it out.
    events, stop, _ = run(fakes.text("The answer is 4", "2 and E") + ending,
                          stop_sequences=("END",))
    assert "".join(e.text for e in events) == "The answer is 42 and E"
    assert stop in ("max_tokens", "refusal")


TOOL_INPUT = '{"path": "a.txt", "content": "line 1\\nline 2", "n": [1, 2]}'


@pytest.mark.parametrize("cut", range(1, len(TOOL_INPUT)))
def test_tool_call_cut_at_any_fragment_boundary_is_never_emitted(cut):
    fragments = [TOOL_INPUT[:cut], TOOL_INPUT[cut:]]
    whole, stop, _ = run(fakes.tool("t", "write", *fragments))
    assert whole == [convert.ToolCall("t", "write", TOOL_INPUT)] and stop == "tool_use"
    cut_off, stop, _ = run(fakes.text("x") + fakes.tool("t", "write", fragments[0], stop=False))
    assert cut_off == [convert.Text("x")] and stop == "max_tokens"
    limit = fakes.tool("t", "write", fragments[0], stop=False) + [
        fakes.exception("ContentLengthExceededException", "")]
    cut_off, stop, _ = run(limit)
    assert cut_off == [] and stop == "max_tokens"


def test_oversize_image_is_413_naming_the_block():
    big = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                       "data": "A" * (7 * 1024 * 1024)}}
    with pytest.raises(convert.ConversionError) as caught:
        convert.anthropic_to_codewhisperer(
            {"model": "m", "messages": [{"role": "user", "content": ["x", big][1:]}]},
            conversation_id="c")
    assert caught.value.status == 413
    assert "messages.0.content.0" in str(caught.value)


def test_renderers_escape_lone_surrogates_in_tool_ids_and_names():
    call = convert.ToolCall(json.loads('"t\\udc80"'), json.loads('"n\\ud800"'), "{}")
    anthropic_out = convert.AnthropicStream(message_id="m", model="m",
                                            input_tokens=1).render([call])
    start = parse_sse(anthropic_out)[0][1]
    assert start["content_block"]["id"] == call.id and start["content_block"]["name"] == call.name
    openai_out = convert.OpenAIStream(completion_id="c", model="m", created=1).render([call])
    first = parse_sse(openai_out)[0][1]
    assert first["choices"][0]["delta"]["tool_calls"][0]["id"] == call.id


def test_redacted_thinking_has_no_place_in_openai_answers():
    events = [convert.Thinking("t"), convert.RedactedThinking("ZW5j"), convert.Text("x")]
    stream = convert.OpenAIStream(completion_id="c", model="m", created=1)
    chunks = [data for _, data in parse_sse(stream.render(events))]
    assert [c["choices"][0]["delta"] for c in chunks] == [{"reasoning_content": "t"},
                                                          {"content": "x"}]
    message = convert.collect_openai(events, completion_id="c", model="m", created=1,
                                     stop_reason="end_turn", usage=convert.Usage(1))
    assert message["choices"][0]["message"]["reasoning_content"] == "t"
    anthropic_message = convert.collect_anthropic(events, message_id="m", model="m",
                                                  stop_reason="end_turn", usage=convert.Usage(1))
    assert [b["type"] for b in anthropic_message["content"]] == [
        "thinking", "redacted_thinking", "text"]


def test_tool_schema_nested_too_deeply_is_a_400():
    schema = {"type": "object"}
    for _ in range(5000):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(convert.ConversionError) as caught:
        convert.anthropic_to_codewhisperer(
            {"model": "m", "tools": [{"name": "deep", "input_schema": schema}],
             "messages": [{"role": "user", "content": "x"}]}, conversation_id="c")
    assert "tools.0.input_schema" in str(caught.value)
