"""Agent-client fidelity: requests shaped like Claude Code 2.x sends them.

The requests are built here, field for field as Claude Code sends them (a
first turn near 80 KB with 25 tools using JSON Schema 2020-12, a tool loop
with parallel calls and errors, thinking, a mid-conversation system message,
images). Each is converted, checked against the CodeWhisperer service schema
in shared/, and sent through the running server with the anthropic SDK.
"""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import pytest

import convert
import fakes
from fakes import Status, Stream

# A copy of shared/codewhisperer-schema.json (the AWS service model as data).
SCHEMA_FILE = Path(__file__).parent / "data" / "codewhisperer-schema.json"
# The schema file lists structures and unions; these are its list and
# scalar aliases (from the AWS SDK model), and the enum values we send.
LISTS = {"ChatHistory": "ChatMessage", "Tools": "Tool", "ToolResults": "ToolResult",
         "ToolResultContent": "ToolResultContentBlock", "ToolUses": "ToolUse",
         "ImageBlocks": "ImageBlock"}
STRINGS = {"SensitiveString", "ToolName", "ToolDescription"}
ENUMS = {"chatTriggerType": {"MANUAL", "DIAGNOSTIC", "INLINE_CHAT"},
         "agentTaskType": {"vibe", "spectask"},
         "origin": {"AI_EDITOR", "CHATBOT", "IDE", "CLI", "KIRO_CLI"},
         "status": {"success", "error"},
         "format": {"png", "jpeg", "gif", "webp"}}


def load_schema():
    return json.loads(SCHEMA_FILE.read_text())


def check(schema, shape, value, where="$"):
    """Raise AssertionError if ``value`` does not fit ``shape`` of the service schema."""
    if shape.startswith("<") and shape.endswith(">"):
        name = shape[1:-1]
        if name in LISTS:
            assert isinstance(value, list), f"{where}: expected a list"
            for i, item in enumerate(value):
                check(schema, f"<{LISTS[name]}>", item, f"{where}[{i}]")
            return
        if name in STRINGS:
            assert isinstance(value, str), f"{where}: expected a string"
            return
        if name == "SensitiveDocument":
            json.dumps(value)
            return
        definition = schema[name]
        assert isinstance(value, dict), f"{where}: expected an object for {name}"
        members = definition["members"]
        unknown = set(value) - set(members)
        assert not unknown, f"{where}: {name} has no members {sorted(unknown)}"
        if definition["kind"] == "union":
            assert len(value) == 1, f"{where}: a {name} union holds exactly one member"
        for required in list(members)[: definition.get("required_first_n", 0)]:
            assert required in value, f"{where}: {name}.{required} is required"
        for key, item in value.items():
            check(schema, members[key].split(" ")[0], item, f"{where}.{key}")
            if key in ENUMS and isinstance(item, str):
                assert item in ENUMS[key], f"{where}.{key}: {item!r} is not an enum value"
        return
    if shape.startswith("string"):
        assert isinstance(value, str), f"{where}: expected a string"
    elif shape == "blob":
        assert isinstance(value, str), f"{where}: expected base64 text"
    elif shape == "document":
        json.dumps(value)
    else:
        raise AssertionError(f"{where}: no rule for shape {shape!r}")


def schema_tool(i):
    """A Claude Code-style tool using JSON Schema 2020-12 features."""
    return {
        "name": f"Tool{i}" if i else "mcp__" + "x" * 70,
        "description": ("Does thing %d. " % i) * (1300 if i == 3 else 20),
        "input_schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "path": {"type": "string", "pattern": "^/", "format": "uri-reference"},
                "mode": {"anyOf": [{"const": "read"}, {"const": "write"}]},
                "limit": {"type": "number", "exclusiveMinimum": 0},
                "tags": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}},
            },
            "required": ["path"],
        },
    }


PNG = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                   "data": "iVBORw0KGgo="}}


def first_turn():
    return {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Instructions. " * 2000,
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "gitStatus: clean", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>context</system-reminder>"},
            {"type": "text", "text": "Fix the bug", "cache_control": {"type": "ephemeral"}}]}],
        "tools": [schema_tool(i) for i in range(25)] + [
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "output_config": {"effort": "high"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "metadata": {"user_id": json.dumps({"device_id": "d", "session_id": "s"})},
    }


def tool_loop_turn():
    body = first_turn()
    body["thinking"] = {"type": "adaptive"}
    body["messages"] += [
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Look at both.", "signature": "sig"},
            {"type": "text", "text": "Reading both."},
            {"type": "tool_use", "id": "toolu_01", "name": "Tool1", "input": {"path": "/a"}},
            {"type": "tool_use", "id": "toolu_02", "name": "mcp__" + "x" * 70,
             "input": {"path": "/b"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "contents of a",
             "cache_control": {"type": "ephemeral"}},
            {"type": "tool_result", "tool_use_id": "toolu_02", "is_error": True,
             "content": [{"type": "text", "text": "EACCES"}, PNG]}]},
        {"role": "system", "content": "The user changed the working directory."},
        {"role": "user", "content": [PNG, {"type": "text", "text": "and this screenshot"}]},
    ]
    return body


@pytest.mark.parametrize("body", [first_turn(), tool_loop_turn(),
                                  {**first_turn(), "tools": []}],
                         ids=["first-turn", "tool-loop", "no-tools"])
def test_claude_code_request_converts_to_a_schema_valid_payload(body):
    schema = load_schema()
    prepared = convert.anthropic_to_codewhisperer(body, conversation_id="conv")
    check(schema, "<GenerateAssistantResponseRequest>", prepared.payload)
    state = prepared.payload["conversationState"]
    history = state.get("history", [])
    roles = [next(iter(m)) for m in history]
    assert roles == ["userInputMessage", "assistantResponseMessage"] * (len(roles) // 2)
    current = state["currentMessage"]["userInputMessage"]
    tools = current.get("userInputMessageContext", {}).get("tools", [])
    names = [t["toolSpecification"]["name"] for t in tools]
    assert "web_search" not in names
    assert len(names) == len(set(names)) and all(len(n) <= 64 for n in names)
    assert all(0 < len(t["toolSpecification"]["description"]) <= 10_000 for t in tools)
    for tool in tools:
        schema_json = tool["toolSpecification"]["inputSchema"]["json"]
        assert "$schema" not in schema_json
        if body["tools"]:
            assert schema_json["properties"]["mode"]["anyOf"][0] == {"const": "read"}
    first_user = (history[0]["userInputMessage"] if history else current)["content"]
    assert first_user.startswith("<thinking_mode>")
    assert "You are Claude Code" in first_user


def test_tool_loop_pairs_results_with_calls_and_keeps_images():
    prepared = convert.anthropic_to_codewhisperer(tool_loop_turn(), conversation_id="c")
    state = prepared.payload["conversationState"]
    assistant = state["history"][-1]["assistantResponseMessage"]
    results_turn = state["currentMessage"]["userInputMessage"]
    used = [u["toolUseId"] for u in assistant["toolUses"]]
    answered = [r["toolUseId"] for r in results_turn["userInputMessageContext"]["toolResults"]]
    assert used == answered == ["toolu_01", "toolu_02"]
    assert [r["status"] for r in results_turn["userInputMessageContext"]["toolResults"]] == [
        "success", "error"]
    assert len(results_turn["images"]) == 2  # one from the tool result, one from the text
    assert assistant["content"].startswith("<thinking>Look at both.</thinking>\n\nReading both.")
    assert "The user changed the working directory." in state["history"][0][
        "userInputMessage"]["content"]


async def test_claude_code_tool_loop_through_the_server(proxy):
    """Two turns with the SDK: a thinking + parallel tool call answer, then the results."""
    long_name = "mcp__" + "x" * 70
    prepared = convert.anthropic_to_codewhisperer(first_turn(), conversation_id="c")
    sent_name = next(k for k, v in prepared.tool_names.items() if v == long_name)
    proxy.fake.script.append(Stream(
        fakes.text("<thin", "king>Check both files.</thinking>", "\n\nReading both.")
        + fakes.tool("toolu_01", "Tool1", '{"path": ', '"/a"}')
        + fakes.tool("toolu_02", sent_name, '{"path": "/b"}')
        + fakes.tail(), split=(3, 11)))
    client = proxy.anthropic()
    body = {k: v for k, v in first_turn().items() if k not in ("stream", "output_config",
                                                               "context_management")}
    async with client.beta.messages.stream(
            **body, betas=["claude-code-20250219", "interleaved-thinking-2025-05-14"]) as stream:
        message = await stream.get_final_message()
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert message.content[0].thinking == "Check both files."
    assert message.content[1].text == "Reading both."
    assert [(b.name, b.input) for b in message.content[2:]] == [
        ("Tool1", {"path": "/a"}), (long_name, {"path": "/b"})]
    assert message.stop_reason == "tool_use"

    proxy.fake.script.append(Stream(fakes.text("Both read.") + fakes.tail()))
    follow_up = {**body, "messages": body["messages"] + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                          for b in message.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "A"},
            {"type": "tool_result", "tool_use_id": "toolu_02", "content": "B"}]}]}
    answer = await client.beta.messages.create(**{**follow_up, "max_tokens": 4096})
    assert answer.content[0].text == "Both read."
    sent = proxy.fake.calls("/generateAssistantResponse")[-1].body
    check(load_schema(), "<GenerateAssistantResponseRequest>", sent)
    assistant = sent["conversationState"]["history"][-1]["assistantResponseMessage"]
    assert [u["name"] for u in assistant["toolUses"]] == ["Tool1", sent_name]


async def test_prompt_over_the_input_limit_is_refused_locally(aiohttp_server, fake_upstream,
                                                               proxy_config):
    import dataclasses

    import kiro2api

    config = dataclasses.replace(proxy_config, max_input_bytes=50_000)
    server = await aiohttp_server(kiro2api.make_app(config))
    client = anthropic.AsyncAnthropic(base_url=str(server.make_url("")).rstrip("/"),
                                      api_key=config.api_key, max_retries=0)
    body = {k: v for k, v in first_turn().items() if k not in ("output_config",
                                                               "context_management", "stream")}
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(**{**body, "max_tokens": 4096})
    assert caught.value.body["error"]["message"].startswith("prompt is too long")
    assert fake_upstream.calls("/generateAssistantResponse") == []


async def test_upstream_input_too_long_tells_claude_code_to_compact(proxy):
    proxy.fake.script.append(Status(400, {"message": "Input is too long.",
                                          "reason": "CONTENT_LENGTH_EXCEEDS_THRESHOLD"}))
    with pytest.raises(anthropic.BadRequestError) as caught:
        await proxy.anthropic().messages.create(
            model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert caught.value.body["error"]["message"].startswith("prompt is too long")


async def test_stop_sequence_ends_the_answer_and_closes_the_upstream(proxy):
    proxy.fake.script.append(Stream(fakes.text("one two ", "TH", "REE four five")
                                    + fakes.tail(), split=(9,)))
    message = await proxy.anthropic().messages.create(
        model="claude-sonnet-4-5", max_tokens=100, stop_sequences=["THREE"],
        messages=[{"role": "user", "content": "count"}])
    assert message.content[0].text == "one two "
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == "THREE"


async def test_refusal_and_context_window_stop_reasons_reach_the_client(proxy):
    refusal = fakes.event("metadataEvent", {"stopReason": "CONTENT_FILTERED",
                                            "stopDetails": {"refusal": {"category": "x"}}})
    proxy.fake.script.append(Stream([refusal] + fakes.tail()))
    client = proxy.anthropic()
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10,
            "messages": [{"role": "user", "content": "x"}]}
    assert (await client.messages.create(**body)).stop_reason == "refusal"
    proxy.fake.script.append(Stream(fakes.text("a") + fakes.tail(percentage=100.0)))
    assert (await client.messages.create(**body)).stop_reason == "model_context_window_exceeded"
