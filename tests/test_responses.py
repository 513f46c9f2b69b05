"""/v1/responses: OpenAI Responses requests -> CodeWhisperer, neutral events -> Responses events.

The first half is pure (convert.py, no loop); the second runs the openai SDK
and raw HTTP against kiro2api in front of the fake upstream, with the
request shapes Codex 0.171 sends (PROTOCOL-2026.md 10.15).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import aiohttp
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

import convert
import fakes
from fakes import BROKEN_STREAMS, A, Status, Stream, U, state, user
from helpers import API_KEY, parse_sse

MODEL = "claude-sonnet-4-5"
EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
# What the Responses API may send last; exactly one of them ends every stream.
TERMINAL = {"response.completed", "response.incomplete", "response.failed"}

EXEC = {"type": "function", "name": "exec_command", "description": "Run a command",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}},
                       "required": ["cmd"]}}
EXEC_SPEC = {"toolSpecification": {
    "name": "exec_command", "description": "Run a command",
    "inputSchema": {"json": {"type": "object", "properties": {"cmd": {"type": "string"}},
                             "required": ["cmd"]}}}}
PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}
# Codex's "Responses Lite" shape: no top-level tools, namespaces in an input item.
LITE_TOOLS = {"type": "additional_tools", "role": "developer", "tools": [
    {"type": "namespace", "name": "functions", "description": "", "tools": [
        {"type": "custom", "name": "exec", "description": "Run JavaScript"},
        {"type": "function", "name": "wait", "parameters": {"type": "object"}}]},
    {"type": "namespace", "name": "collaboration", "description": "Agents", "tools": [
        {"type": "function", "name": "spawn_agent", "description": "Start an agent",
         "parameters": {"type": "object", "properties": {"task": {"type": "string"}}}}]}]}


def payload(body):
    """The CodeWhisperer payload of a Responses request (conversation id conv-1)."""
    normalised = convert.responses_to_anthropic({"model": MODEL, **body})
    return convert.anthropic_to_codewhisperer(normalised, conversation_id="conv-1").payload


def specs(body):
    message = payload(body)["conversationState"]["currentMessage"]["userInputMessage"]
    return {spec["toolSpecification"]["name"]: spec["toolSpecification"]
            for spec in message["userInputMessageContext"]["tools"]}


# Requests #################################################################

CASES = [
    ("a-string", {"input": "Hi"}, state(user("Hi"))),
    ("instructions-and-leading-developer-messages-are-the-prompt", {
        "instructions": "Be brief.",
        "input": [{"type": "message", "role": "developer",
                   "content": [{"type": "input_text", "text": "You are Codex."}]},
                  {"role": "system", "content": "Use metric."},
                  {"role": "user", "content": [{"type": "input_text", "text": "a"}]},
                  {"role": "assistant", "content": [
                      {"type": "output_text", "text": "b", "annotations": []}]},
                  {"role": "developer", "content": "Now in plan mode."},
                  {"role": "user", "content": "c"}]},
     state(user("Now in plan mode.\n\nc"),
           [U("Be brief.\n\nYou are Codex.\n\nUse metric.\n\na"), A("b")])),
    ("an-inline-image", {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "What is it?"},
        {"type": "input_image", "image_url": "data:image/png;base64,iVBO", "detail": "auto"}]}]},
     state(user("What is it?", images=[{"format": "png", "source": {"bytes": "iVBO"}}]))),
    ("a-function-call-and-its-output", {"tools": [EXEC], "input": [
        {"role": "user", "content": "list"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "x"},
        {"type": "function_call", "call_id": "call_1", "name": "exec_command",
         "arguments": '{"cmd": "ls"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "a.txt"}]},
     state(user("Tool results provided.", tools=[EXEC_SPEC], toolResults=[
         {"toolUseId": "call_1", "content": [{"text": "a.txt"}], "status": "success"}]),
         [U("list"), A(" ", [{"toolUseId": "call_1", "name": "exec_command",
                              "input": {"cmd": "ls"}}])])),
    ("outputs-as-parts-and-a-repeated-custom-output-joins-the-first", {"tools": [PATCH], "input": [
        {"role": "user", "content": "edit"},
        {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** x"},
        {"type": "custom_tool_call_output", "call_id": "c1",
         "output": [{"type": "input_text", "text": "done"}]},
        {"type": "custom_tool_call_output", "call_id": "c1", "output": "really"}]},
     None),
    ("unknown-items-are-skipped", {"input": [
        {"type": "compaction", "encrypted_content": "zzz"},
        {"type": "web_search_call", "id": "ws_1", "status": "completed"},
        {"type": "agent_reasoning", "text": "..."},
        {"role": "user", "content": "Hi"}]},
     state(user("Hi"))),
]


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_responses_request_to_codewhisperer(body, expected):
    got = payload(body)
    if expected is not None:
        assert got == expected
    else:  # the custom call: its text travels in the one string field
        state_ = got["conversationState"]
        assert state_["history"][1] == A(" ", [
            {"toolUseId": "c1", "name": "apply_patch", "input": {"input": "*** x"}}])
        context = state_["currentMessage"]["userInputMessage"]["userInputMessageContext"]
        assert context["toolResults"] == [{"toolUseId": "c1", "status": "success",
                                          "content": [{"text": "done"}, {"text": "really"}]}]


def test_freeform_tools_are_offered_with_one_string_field_and_their_grammar():
    spec = specs({"tools": [PATCH], "input": "x"})["apply_patch"]
    assert spec["inputSchema"]["json"] == convert.FREEFORM_SCHEMA
    assert spec["description"].startswith("Edit files\n\n")
    assert "raw text" in spec["description"] and "lark grammar:\nstart: /.+/" in \
        spec["description"]


def test_namespaces_are_flattened_and_hosted_tools_dropped_but_the_search():
    body = {"tools": [EXEC, {"type": "web_search", "external_web_access": True},
                      {"type": "file_search", "vector_store_ids": ["vs_1"]},
                      {"type": "namespace", "name": "multi_agent_v1", "description": "",
                       "tools": [{"type": "function", "name": "send", "parameters": {}}]}],
            "input": [LITE_TOOLS, {"role": "user", "content": "Hi"}]}
    assert sorted(specs(body)) == ["collaboration__spawn_agent", "exec", "exec_command",
                                   "multi_agent_v1__send", "wait", "web_search"]
    tools = convert.responses_tools(body)
    assert tools["collaboration__spawn_agent"][0] == convert.DeclaredTool(
        "function", "spawn_agent", "collaboration")
    assert tools["exec"][0] == convert.DeclaredTool("custom", "exec")
    # A past call names its namespace: it is flattened the same way.
    history = payload({**body, "input": [LITE_TOOLS, {"role": "user", "content": "go"}, {
        "type": "function_call", "call_id": "c", "name": "spawn_agent",
        "namespace": "collaboration", "arguments": "{}"}, {
        "type": "function_call_output", "call_id": "c", "output": "ok"}]})
    uses = history["conversationState"]["history"][1]["assistantResponseMessage"]["toolUses"]
    assert uses[0]["name"] == "collaboration__spawn_agent"


@pytest.mark.parametrize(("body", "param", "needle"), [
    ({"store": True}, "store", "keeps no responses"),
    ({"previous_response_id": "resp_1"}, "previous_response_id", "whole conversation"),
    ({"background": True}, "background", "background false"),
    ({"conversation": "conv_1"}, "conversation", "whole conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "templates"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "keeps no responses"),
    ({"input": 3}, "input", "string or a list"),
    ({"input": []}, "input", "at least one"),
    ({"input": [{"role": "developer", "content": "only instructions"}]}, "input",
     "at least one"),
    ({"input": ["Hi"]}, "input[0]", "expected an object"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "expected developer"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0]", "'input_file' is not supported"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id",
     "id of the call"),
    ({"tools": [{"type": "function"}]}, "tools[0].name", "needs a name"),
    ({"tools": [{"type": "function", "name": "f", "parameters": "x"}]},
     "tools[0].parameters", "JSON Schema"),
    ({"max_output_tokens": "many"}, "max_output_tokens", "whole number"),
    ({"stream": "yes"}, "stream", "true or false"),
    ({"tool_choice": 5}, "tool_choice", "expected 'auto'"),
    ({"instructions": ["x"]}, "instructions", "expected a string"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_requests_are_refused_with_the_param(body, param, needle):
    with pytest.raises(convert.ConversionError) as caught:
        convert.responses_to_anthropic({"model": MODEL, "input": "Hi", **body})
    assert caught.value.param == param
    assert needle in str(caught.value)


def test_settings_reach_the_anthropic_body():
    body = convert.responses_to_anthropic({
        "model": MODEL, "input": "Hi", "max_output_tokens": 100, "temperature": 0.5,
        "reasoning": {"effort": "high", "summary": "auto"}, "tool_choice": "required",
        "parallel_tool_calls": False, "prompt_cache_key": "k", "store": False,
        "include": ["reasoning.encrypted_content"], "client_metadata": {"a": "b"}})
    assert body["max_tokens"] == 100 and body["temperature"] == 0.5
    assert body["thinking"] == {"type": "adaptive"} and body["output_config"] == {
        "effort": "high"}
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert "thinking" not in convert.responses_to_anthropic(
        {"model": MODEL, "input": "Hi", "reasoning": {"effort": "minimal"}})
    none = convert.responses_to_anthropic({"model": MODEL, "input": "Hi", "tools": [EXEC],
                                           "tool_choice": "none"})
    assert none["tool_choice"] == {"type": "none"}


# Rendering ################################################################


def render(events, stop_reason="end_turn", request=None, usage=None):
    """Every event a whole stream sends (start, the events one by one, finish), checked."""
    stream = convert.ResponsesStream(response_id="resp_abc", model="m", created=7,
                                     request=request or {})
    raw = stream.start() + b"".join(stream.render([e]) for e in events)
    raw += stream.finish(stop_reason, usage or convert.Usage(10, 4))
    return checked(raw)


def checked(raw):
    """The events of a raw stream, each validated, numbered 0, 1, 2... and named twice."""
    out = []
    for number, (name, data) in enumerate(parse_sse(raw)):
        assert name == data["type"] and data["sequence_number"] == number, data
        if name != "response.failed":  # its codes run ahead of the SDK's Literal
            EVENT.validate_python(data)
        out.append(data)
    assert [e["type"] for e in out if e["type"] in TERMINAL] == [out[-1]["type"]]
    return out


def test_text_opens_its_item_and_part_before_any_delta_and_closes_them_whole():
    events = render([convert.Text("Hel"), convert.Text("lo")])
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    item = events[-2]["item"]
    assert item["content"] == [{"type": "output_text", "text": "Hello", "annotations": [],
                                "logprobs": []}]
    assert item["status"] == "completed" and item["id"] == events[2]["item"]["id"]
    assert events[6]["text"] == "Hello"
    final = events[-1]["response"]
    Response.model_validate(final)
    assert final["output"] == [item] and final["status"] == "completed"
    assert final["usage"] == {"input_tokens": 10, "output_tokens": 4, "total_tokens": 14,
                              "input_tokens_details": {"cached_tokens": 0,
                                                       "cache_write_tokens": 0},
                              "output_tokens_details": {"reasoning_tokens": 0}}


def test_thinking_tool_calls_and_redacted_reasoning_are_items_of_their_own():
    request = {"tools": [EXEC, PATCH], "input": [LITE_TOOLS]}
    events = render([convert.Thinking("Let me "), convert.Thinking("see."),
                     convert.ThinkingSignature("sig"), convert.Text("Running."),
                     convert.ToolCall("t1", "exec_command", '{"cmd":"ls"}'),
                     convert.ToolCall("t2", "apply_patch", '{"input":"*** Begin"}'),
                     convert.ToolCall("t3", "collaboration__spawn_agent", '{"task":"x"}'),
                     convert.ToolCall("t4", "exec", '{"code":"1+1"}'),
                     convert.RedactedThinking("blob")],
                    stop_reason="tool_use", request=request,
                    usage=convert.Usage(10, 40, cache_read_input_tokens=5,
                                        cache_creation_input_tokens=2))
    output = events[-1]["response"]["output"]
    assert [e["item"] for e in events if e["type"] == "response.output_item.done"] == output
    assert [(i["type"], i["id"]) for i in output] == [
        ("reasoning", "rs_abc_0"), ("message", "msg_abc_1"), ("function_call", "fc_abc_2"),
        ("custom_tool_call", "ctc_abc_3"), ("function_call", "fc_abc_4"),
        ("custom_tool_call", "ctc_abc_5"), ("reasoning", "rs_abc_6")]
    assert output[0]["summary"] == [{"type": "summary_text", "text": "Let me see."}]
    assert output[0]["encrypted_content"] == "sig"
    assert output[2] == {"id": "fc_abc_2", "type": "function_call", "status": "completed",
                         "call_id": "t1", "name": "exec_command", "arguments": '{"cmd":"ls"}'}
    assert output[3]["input"] == "*** Begin" and output[3]["name"] == "apply_patch"
    assert output[4]["name"] == "spawn_agent" and output[4]["namespace"] == "collaboration"
    assert output[5]["input"] == "1+1" and "namespace" not in output[5]  # one string field
    assert output[6]["encrypted_content"] == "blob"
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [e["output_index"] for e in added] == list(range(7))
    for event in events:  # every delta and done event points at the item open then
        if "item_id" in event:
            assert output[event["output_index"]]["id"] == event["item_id"]
    kinds = [e["type"] for e in events]
    assert kinds.index("response.reasoning_summary_part.added") < kinds.index(
        "response.reasoning_summary_text.delta")
    assert "response.function_call_arguments.done" in kinds
    assert "response.custom_tool_call_input.done" in kinds
    Response.model_validate(events[-1]["response"])
    assert events[-1]["response"]["usage"]["input_tokens"] == 17
    assert events[-1]["response"]["usage"]["input_tokens_details"] == {
        "cached_tokens": 5, "cache_write_tokens": 2}
    assert events[-1]["response"]["usage"]["output_tokens_details"]["reasoning_tokens"] == 3


@pytest.mark.parametrize(("stop_reason", "reason"), [
    ("max_tokens", "max_output_tokens"), ("model_context_window_exceeded",
                                          "max_output_tokens"), ("refusal", "content_filter")])
def test_a_cut_answer_is_incomplete(stop_reason, reason):
    events = render([convert.Text("par")], stop_reason=stop_reason)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": reason}
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "par"


@pytest.mark.parametrize(("failure", "code"), [
    (convert.failure(400, "prompt is too long", code="context_length_exceeded"),
     "context_length_exceeded"),
    (convert.failure(402, "out of credits"), "insufficient_quota"),
    (convert.failure(403, "suspended"), "invalid_prompt"),  # Codex shows our words
    (convert.failure(401, "log in again"), "invalid_prompt"),
    (convert.failure(404, "no such model"), "invalid_prompt"),
    (convert.failure(400, "malformed"), "invalid_prompt"),
    (convert.failure(413, "too large"), "context_length_exceeded"),
    (convert.failure(429, "slow down"), "rate_limit_exceeded"),
    (convert.failure(529, "no capacity"), "server_error"),
    (convert.failure(503, "unavailable"), "server_error"),
    (convert.failure(502, "corrupt"), "server_error"),
    (convert.failure(504, "timed out"), "server_error"),
])
def test_a_failure_ends_the_stream_with_a_code_that_costs_the_fewest_calls(failure, code):
    stream = convert.ResponsesStream(response_id="resp_1", model="m", created=1, request={})
    events = checked(stream.start() + stream.render([convert.Text("Hi")])
                     + stream.error(failure))
    assert events[-1]["type"] == "response.failed"
    response = events[-1]["response"]
    assert response["error"] == {"code": code, "message": failure.message}
    assert response["status"] == "failed"
    # The item open when it broke is closed, marked incomplete.
    assert events[-2]["type"] == "response.output_item.done"
    assert events[-2]["item"]["status"] == "incomplete"


def test_keepalives_are_numbered_in_progress_events():
    stream = convert.ResponsesStream(response_id="resp_1", model="m", created=1, request={})
    raw = stream.start() + stream.keepalive() + stream.render([convert.Text("x")])
    raw += stream.keepalive() + stream.finish("end_turn", convert.Usage(1, 1))
    kinds = [e["type"] for e in checked(raw)]
    assert kinds.count("response.in_progress") == 3


def test_collect_is_the_completed_response():
    stream = convert.ResponsesStream(response_id="resp_1", model="m", created=1,
                                     request={"tools": [EXEC], "tool_choice": "auto"})
    body = stream.collect([convert.Text("Hi"), convert.ToolCall("t", "exec_command", "{}")],
                          "tool_use", convert.Usage(3, 2))
    Response.model_validate(body)
    assert [item["type"] for item in body["output"]] == ["message", "function_call"]
    assert body["status"] == "completed" and body["tools"] == [EXEC]


# End to end ###############################################################


async def post(url, body, *, path="/v1/responses", headers=None):
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, json=body, headers={
                "Authorization": f"Bearer {API_KEY}", **(headers or {})}) as response:
            return response.status, response.headers, await response.read()


async def raw_events(url, body, **options):
    status, headers, raw = await post(url, {"model": MODEL, **body, "stream": True}, **options)
    assert status == 200, raw
    assert headers["Content-Type"].startswith("text/event-stream")
    return checked(raw)


async def test_create_and_stream_through_the_sdk(proxy):
    proxy.fake.script.append(Stream(fakes.text("Hel", "lo") + fakes.tail()))
    client = proxy.openai()
    response = await client.responses.create(model=MODEL, input="Hi", instructions="Be kind.")
    assert response.output_text == "Hello" and response.status == "completed"
    assert response.id.startswith("resp_") and response.instructions == "Be kind."
    Response.model_validate(response.model_dump(exclude_unset=True))
    sent = proxy.fake.calls("/generateAssistantResponse")[-1].body["conversationState"]
    assert sent["currentMessage"]["userInputMessage"]["content"] == "Be kind.\n\nHi"

    pieces = ["hé", "llo, 世", "界 🎉"]
    proxy.fake.script.append(Stream(fakes.text(*pieces) + fakes.tail(), split=(1, 2, 3)))
    async with client.responses.stream(model=MODEL, input="Hi") as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert deltas == pieces and final.output_text == "".join(pieces)


async def test_a_two_turn_function_tool_loop(proxy):
    client = proxy.openai()
    proxy.fake.script.append(Stream(fakes.text("Looking.")
                                    + fakes.tool("tooluse_1", "exec_command", '{"cm', 'd":"ls"}')
                                    + fakes.tail(), split=(5, 1, 17)))
    history = [{"role": "user", "content": "What is here?"}]
    async with client.responses.stream(model=MODEL, input=history, tools=[EXEC]) as stream:
        first = await stream.get_final_response()
    call = first.output[-1]
    assert (call.type, call.call_id, call.name, json.loads(call.arguments)) == (
        "function_call", "tooluse_1", "exec_command", {"cmd": "ls"})
    history += [item.model_dump(exclude_none=True) for item in first.output]
    history.append({"type": "function_call_output", "call_id": call.call_id,
                    "output": "a.txt\nb.txt"})
    proxy.fake.script.append(Stream(fakes.text("Two files.") + fakes.tail()))
    second = await client.responses.create(model=MODEL, input=history, tools=[EXEC])
    assert second.output_text == "Two files."
    sent = proxy.fake.calls("/generateAssistantResponse")[-1].body["conversationState"]
    context = sent["currentMessage"]["userInputMessage"]["userInputMessageContext"]
    assert context["toolResults"] == [{"toolUseId": "tooluse_1", "status": "success",
                                      "content": [{"text": "a.txt\nb.txt"}]}]
    assert sent["history"][-1]["assistantResponseMessage"]["toolUses"] == [
        {"toolUseId": "tooluse_1", "name": "exec_command", "input": {"cmd": "ls"}}]


async def test_a_freeform_tool_round_trip(proxy):
    patch = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch"
    proxy.fake.script.append(Stream(fakes.tool("tooluse_p", "apply_patch",
                                               json.dumps({"input": patch})) + fakes.tail()))
    events = await raw_events(proxy.url, {"input": "Add a.txt", "tools": [PATCH]})
    (item,) = events[-1]["response"]["output"]
    assert item["type"] == "custom_tool_call" and item["input"] == patch
    assert [e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"
            ] == [patch]
    proxy.fake.script.append(Stream(fakes.text("Added.") + fakes.tail()))
    response = await proxy.openai().responses.create(model=MODEL, tools=[PATCH], input=[
        {"role": "user", "content": "Add a.txt"}, item,
        {"type": "custom_tool_call_output", "call_id": item["call_id"], "output": "Done!"}])
    assert response.output_text == "Added."
    sent = proxy.fake.calls("/generateAssistantResponse")[-1].body["conversationState"]
    assert sent["history"][-1]["assistantResponseMessage"]["toolUses"][0]["input"] == {
        "input": patch}


async def test_namespaced_tools_from_additional_tools_come_back_with_their_namespace(proxy):
    proxy.fake.script.append(Stream(
        fakes.tool("tooluse_a", "collaboration__spawn_agent", '{"task":"t"}')
        + fakes.tool("tooluse_b", "exec", '{"input":"await wait()"}') + fakes.tail()))
    events = await raw_events(proxy.url, {"input": [LITE_TOOLS, {"role": "user",
                                                                 "content": "go"}]},
                              headers={"x-openai-internal-codex-responses-lite": "true"})
    first, second = events[-1]["response"]["output"]
    assert (first["type"], first["name"], first["namespace"]) == (
        "function_call", "spawn_agent", "collaboration")
    assert (second["type"], second["name"], second["input"]) == (
        "custom_tool_call", "exec", "await wait()")
    sent = proxy.fake.calls("/generateAssistantResponse")[-1].body["conversationState"]
    offered = sent["currentMessage"]["userInputMessage"]["userInputMessageContext"]["tools"]
    assert sorted(t["toolSpecification"]["name"] for t in offered) == [
        "collaboration__spawn_agent", "exec", "wait"]


async def test_the_short_route_and_the_models_query_codex_sends(proxy):
    proxy.fake.script.append(Stream(fakes.text("ok") + fakes.tail()))
    events = await raw_events(proxy.url, {"input": "Hi"}, path="/responses")
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "ok"
    async with aiohttp.ClientSession() as session, session.get(
            proxy.url + "/v1/models?client_version=0.171.0",
            headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.status == 200
        assert (await response.json())["data"]


async def test_bad_input_and_a_wrong_key_get_the_openai_envelope(proxy):
    client = proxy.openai()
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_1")
    assert caught.value.body["param"] == "previous_response_id"
    assert caught.value.body["type"] == "invalid_request_error"
    status, _, raw = await post(proxy.url, {"model": MODEL, "input": "Hi", "stream": True},
                                headers={"Authorization": "Bearer wrong"})
    assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"
    status, _, raw = await post(proxy.url, {"model": MODEL, "input": 3}, path="/responses")
    assert status == 400 and json.loads(raw)["error"]["param"] == "input"
    assert proxy.fake.calls("/generateAssistantResponse") == []


@pytest.mark.parametrize("name", sorted(BROKEN_STREAMS))
async def test_a_broken_stream_ends_failed_never_completed(proxy, name):
    proxy.fake.script.append(BROKEN_STREAMS[name]())
    events = await raw_events(proxy.url, {"input": "Hi"})
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["code"] in ("server_error", "rate_limit_exceeded")
    assert not any(e["type"] == "response.completed" for e in events)


async def test_an_answer_kiro_cut_short_is_incomplete(proxy):
    proxy.fake.script.append(Stream(fakes.text("Part") + [
        fakes.exception("ContentLengthExceededException", "output too long")]))
    events = await raw_events(proxy.url, {"input": "Hi"})
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


# (Kiro's refusal, the code of response.failed, a word of its message)
REFUSALS = [
    (Status(400, {"message": "Input is too long.", "reason": "CONTENT_LENGTH_EXCEEDS_THRESHOLD"}),
     "context_length_exceeded", "prompt is too long"),
    (Status(402, {"message": "quota", "reason": "MONTHLY_REQUEST_COUNT"}),
     "insufficient_quota", "out of quota"),
    (Status(403, {"message": "Account suspended", "reason": "TEMPORARILY_SUSPENDED"}),
     "invalid_prompt", "TEMPORARILY_SUSPENDED"),
    (Status(400, {"message": "Improperly formed request.", "reason": None}),
     "invalid_prompt", "Improperly formed"),
    (Status(400, {"message": "Invalid model.", "reason": "INVALID_MODEL_ID"}),
     "invalid_prompt", "no such model"),
    (Status(429, {"message": "Too many requests"}, {"Retry-After": "7"}),
     "rate_limit_exceeded", "Too many requests"),
    (Status(500, {"message": "boom"}), "server_error", "boom"),
    (Status(503, "unavailable"), "server_error", "unavailable"),
]


@pytest.mark.parametrize(("reply", "code", "needle"), REFUSALS, ids=[
    "too-long", "quota", "suspended", "malformed", "model", "throttled", "5xx", "503"])
async def test_kiro_refusing_a_streamed_request_is_response_failed_in_a_200(proxy, reply, code,
                                                                            needle):
    # Codex calls again after an HTTP 5xx up to thirty times, and six after a
    # 401-404: in-band, a refusal no retry can fix costs one call.
    proxy.fake.script.append(reply)
    events = await raw_events(proxy.url, {"input": "Hi"})
    assert [e["type"] for e in events] == ["response.created", "response.in_progress",
                                           "response.failed"]
    error = events[-1]["response"]["error"]
    assert error["code"] == code and needle in error["message"]
    assert len(proxy.fake.calls("/generateAssistantResponse")) == 1


async def test_kiro_refusing_a_request_that_is_not_streamed_is_an_http_error(proxy):
    proxy.fake.script.append(Status(403, {"message": "Account suspended",
                                          "reason": "TEMPORARILY_SUSPENDED"}))
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await proxy.openai().responses.create(model=MODEL, input="Hi")
    assert "TEMPORARILY_SUSPENDED" in caught.value.body["message"]


@pytest.mark.slow  # over a second
async def test_keepalives_are_in_progress_events_the_sdk_accepts(aiohttp_server, fake_upstream,
                                                                 proxy_config):
    import kiro2api

    config = dataclasses.replace(proxy_config, ping_interval=0.05)
    server = await aiohttp_server(kiro2api.make_app(config))
    url = str(server.make_url("")).rstrip("/")
    frames = fakes.text("slow", " answer") + fakes.tail()
    gate = asyncio.Event()
    fake_upstream.script.append(Stream(frames, split=(len(frames[0]),), gate=gate))
    raw = b""
    async with aiohttp.ClientSession() as session, session.post(
            url + "/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True},
            headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        while raw.count(b"event: response.in_progress\n") < 4:
            raw += await response.content.readany()
        gate.set()
        raw += await response.read()
    events = checked(raw)  # numbered in order, keep-alives included
    assert events[-1]["type"] == "response.completed"
    assert b": keep-alive" not in raw

    fake_upstream.script.append(Stream(frames, split=(len(frames[0]),), delay=0.3))
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    async with client.responses.stream(model=MODEL, input="Hi") as stream:
        final = await stream.get_final_response()
    assert final.output_text == "slow answer"


async def test_the_short_route_is_behind_the_key_too(proxy):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        async with aiohttp.ClientSession() as session, session.post(
                proxy.url + "/responses", json={"model": MODEL, "input": "Hi"},
                headers=headers) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "invalid_api_key"
    assert proxy.fake.calls("/generateAssistantResponse") == []


async def test_input_tokens_are_counted_and_stored_responses_are_not_found(proxy):
    client = proxy.openai()
    short = await client.responses.input_tokens.count(model=MODEL, input="Hi")
    long = await client.responses.input_tokens.count(model=MODEL, input="Hi " * 400,
                                                     tools=[EXEC])
    assert short.object == "response.input_tokens" and 0 < short.input_tokens < 20
    assert long.input_tokens > short.input_tokens + 200
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.input_tokens.count(model=MODEL, input=[{"type": "nonsense"}])
    assert caught.value.body["param"] == "input"
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.retrieve("resp_123")
    assert "keeps no responses" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete("resp_123")
    with pytest.raises(openai.NotFoundError):
        await client.responses.cancel("resp_123")
    assert proxy.fake.calls("/generateAssistantResponse") == []


# Codex's own requests (tests/data, captured from codex-cli 0.171.0) ######

DATA = Path(__file__).parent / "data"


def codex_request(model, turn):
    return json.loads((DATA / f"codex-0.171.0-{model}-turn{turn}.json").read_text())


@pytest.mark.parametrize(("model", "offered", "result"), [
    ("claude-sonnet-4.5", ["exec_command", "multi_agent_v1__spawn_agent"], "kiro2api-capture"),
    ("gpt-5.6-sol", ["exec", "wait", "collaboration__spawn_agent"], "kiro2api-capture"),
], ids=["plain-tools", "responses-lite"])
def test_codex_requests_convert_whole(model, offered, result):
    first = payload(codex_request(model, 1))["conversationState"]
    tools = first["currentMessage"]["userInputMessage"]["userInputMessageContext"]["tools"]
    names = [t["toolSpecification"]["name"] for t in tools]
    assert set(offered) <= set(names) and "web_search" not in names
    assert len(names) == len(set(names))
    # The developer messages are the prompt, in front of the first user turn.
    assert "Codex" in first["currentMessage"]["userInputMessage"]["content"][:2000]
    second = payload(codex_request(model, 2))["conversationState"]
    (use,) = second["history"][-1]["assistantResponseMessage"]["toolUses"]
    assert use["name"] in names
    context = second["currentMessage"]["userInputMessage"]["userInputMessageContext"]
    (answer,) = context["toolResults"]
    assert answer["toolUseId"] == use["toolUseId"]
    assert result in json.dumps(answer["content"])


async def test_codex_requests_are_answered_through_the_server(proxy):
    proxy.fake.script.append(Stream(fakes.tool("tooluse_x", "multi_agent_v1__wait_agent",
                                               '{"agent_id":"a"}') + fakes.tail()))
    events = await raw_events(proxy.url, codex_request("claude-sonnet-4.5", 2))
    (call,) = events[-1]["response"]["output"]
    assert (call["name"], call["namespace"]) == ("wait_agent", "multi_agent_v1")
    Response.model_validate(events[-1]["response"])


async def test_a_codex_thread_keeps_one_conversation_and_reports_cached_tokens(proxy):
    proxy.fake.caching = True
    cached = []
    for _ in range(2):
        proxy.fake.script.append(Stream(fakes.text("ok")))
        events = await raw_events(proxy.url, {"input": "Hi", "prompt_cache_key": "thread-7"})
        cached.append(events[-1]["response"]["usage"]["input_tokens_details"]["cached_tokens"])
    assert cached == [0, fakes.FakeUpstream.CACHED_TOKENS]


async def test_a_refusal_in_band_is_logged_with_the_bytes_it_sent(proxy, caplog):
    import logging

    from test_observability import request_line

    caplog.set_level(logging.INFO, logger="kiro2api")
    proxy.fake.script.append(Status(500, {"message": "boom"}))
    status, headers, raw = await post(proxy.url, {"model": MODEL, "input": "Hi",
                                                  "stream": True})
    assert status == 200 and b"response.failed" in raw
    assert request_line(caplog, headers["request-id"])["bytes_out"] == len(raw)
