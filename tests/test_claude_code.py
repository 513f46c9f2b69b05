"""Agent-client fidelity: requests shaped like Claude Code 2.x sends them.

The requests are built here, field for field as Claude Code sends them (a
first turn near 80 KB with 25 tools using JSON Schema 2020-12, a tool loop
with parallel calls and errors, thinking, a mid-conversation system message,
images). Each is converted, checked against the CodeWhisperer service schema
in shared/, and sent through the running server with the anthropic SDK.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import anthropic
import pydantic
import pytest
from anthropic.types import Message, RawMessageStreamEvent

import convert
import eventstream
import fakes
from fakes import A, Status, Stream, U, state, user
from helpers import parse_sse

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


LONG_NAME = "mcp__" + "x" * 70  # over the upstream's 64 characters
# What it is sent as: a prefix, "_" and 8 hex digits of its SHA-256 (PROTOCOL.md 3.4).
SENT_LONG_NAME = "mcp__" + "x" * 50 + "_" + hashlib.sha256(LONG_NAME.encode()).hexdigest()[:8]
LONG_DESCRIPTION = "Does thing 3. " * 1300  # 18,200 characters, like Claude Code's Bash


def schema_tool(i):
    """A Claude Code-style tool using JSON Schema 2020-12 features."""
    return {
        "name": f"Tool{i}" if i else LONG_NAME,
        "description": LONG_DESCRIPTION if i == 3 else f"Does thing {i}. " * 20,
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


def expected_spec(i):
    """What ``schema_tool(i)`` must become: every constraint kept, ``$schema`` gone."""
    name = f"Tool{i}" if i else SENT_LONG_NAME
    description = ("The full description of the tool Tool3 is in the system prompt, "
                   'under "## Tool: Tool3".') if i == 3 else f"Does thing {i}. " * 20
    return {"toolSpecification": {"name": name, "description": description, "inputSchema": {
        "json": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "path": {"type": "string", "pattern": "^/", "format": "uri-reference"},
                "mode": {"anyOf": [{"const": "read"}, {"const": "write"}]},
                "limit": {"type": "number", "exclusiveMinimum": 0},
                "tags": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}},
            },
            "required": ["path"],
        }}}}


PNG = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                   "data": "iVBORw0KGgo="}}
PNG_BLOCK = {"format": "png", "source": {"bytes": "iVBORw0KGgo="}}
INSTRUCTIONS = "Instructions. " * 3000
SYSTEM = [
    {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
     "cache_control": {"type": "ephemeral"}},
    {"type": "text", "text": INSTRUCTIONS, "cache_control": {"type": "ephemeral"}},
    {"type": "text", "text": "gitStatus: clean", "cache_control": {"type": "ephemeral"}},
]
ENABLED_TAGS = ("<thinking_mode>enabled</thinking_mode>"
                "<max_thinking_length>24576</max_thinking_length>")
ADAPTIVE_TAGS = "<thinking_mode>adaptive</thinking_mode><thinking_effort>high</thinking_effort>"
# The system prompt as the first user turn begins: thinking tags, the three
# system blocks, then the long tool description moved out of its spec.
SYSTEM_TEXT = ("You are Claude Code, Anthropic's official CLI for Claude.\n\n" + INSTRUCTIONS
               + "\n\ngitStatus: clean\n\n## Tool: Tool3\n\n" + LONG_DESCRIPTION)
FIRST_USER = "<system-reminder>context</system-reminder>\n\nFix the bug"


def first_turn():
    return {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 32000,
        "stream": True,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>context</system-reminder>"},
            {"type": "text", "text": "Fix the bug", "cache_control": {"type": "ephemeral"}}]}],
        "tools": [schema_tool(i) for i in range(25)] + [
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "output_config": {"effort": "high", "format": {
            "type": "json_schema", "schema": {"type": "object", "properties": {
                "answer": {"type": "string"}}, "additionalProperties": False}}},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "metadata": {"user_id": json.dumps({"device_id": "d", "account_uuid": "",
                                            "session_id": "3f0c-5e"})},
    }


def tool_loop_turn():
    body = first_turn()
    body["thinking"] = {"type": "adaptive"}
    body["messages"] += [
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Look at both.", "signature": "sig"},
            {"type": "text", "text": "Reading both."},
            {"type": "tool_use", "id": "toolu_01", "name": "Tool1", "input": {"path": "/a"}},
            {"type": "tool_use", "id": "toolu_02", "name": LONG_NAME,
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


def with_(body, **changes):
    return {**body, **changes}


# The first turn offers the hosted search as well: kiro2api runs it, Kiro sees a tool.
ALL_SPECS = [expected_spec(i) for i in range(25)] + [convert.SEARCH_SPEC]
READ = {"name": "Read", "description": "Reads a file.", "input_schema": {
    "type": "object", "properties": {"file_path": {"type": "string"}},
    "required": ["file_path"], "additionalProperties": False,
    "$schema": "http://json-schema.org/draft-07/schema#"}}
READ_SPEC = {"toolSpecification": {"name": "Read", "description": "Reads a file.",
                                   "inputSchema": {"json": {
                                       "type": "object",
                                       "properties": {"file_path": {"type": "string"}},
                                       "required": ["file_path"],
                                       "additionalProperties": False}}}}


def short(messages, **fields):
    """A small Claude Code turn: its system prompt, the Read tool, ``messages``."""
    return {"model": "claude-sonnet-4-5-20250929", "max_tokens": 32000, "stream": True,
            "system": [{"type": "text", "text": "You are Claude Code.",
                        "cache_control": {"type": "ephemeral"}}],
            "tools": [READ], "messages": messages,
            "metadata": {"user_id": '{"session_id": "s"}'}, **fields}


def use(tool_id, path):
    return {"type": "tool_use", "id": tool_id, "name": "Read", "input": {"file_path": path}}


def result(tool_id, content, **extra):
    return {"type": "tool_result", "tool_use_id": tool_id, "content": content, **extra}


def ok(tool_id, text):
    return {"toolUseId": tool_id, "content": [{"text": text}], "status": "success"}


def cw_use(tool_id, path):
    return {"toolUseId": tool_id, "name": "Read", "input": {"file_path": path}}


# (id, Claude Code request, exact CodeWhisperer payload; conversation id "conv-1")
CLAUDE_CODE_REQUESTS = [
    ("first-turn-80kb", first_turn(),
     state(user(f"{ENABLED_TAGS}\n\n{SYSTEM_TEXT}\n\n{FIRST_USER}", tools=ALL_SPECS))),
    ("tool-loop-parallel-calls-errors-images-mid-system", tool_loop_turn(),
     state(user("and this screenshot", images=[PNG_BLOCK, PNG_BLOCK], toolResults=[
         ok("toolu_01", "contents of a"),
         {"toolUseId": "toolu_02", "content": [{"text": "EACCES"}], "status": "error"}],
         tools=ALL_SPECS),
         [U(f"{ADAPTIVE_TAGS}\n\n{SYSTEM_TEXT}\n\nThe user changed the working directory."
            f"\n\n{FIRST_USER}"),
          A("<thinking>Look at both.</thinking>\n\nReading both.", [
              {"toolUseId": "toolu_01", "name": "Tool1", "input": {"path": "/a"}},
              {"toolUseId": "toolu_02", "name": SENT_LONG_NAME, "input": {"path": "/b"}}])])),
    ("no-tools-first-turn", with_(first_turn(), tools=[], thinking={"type": "disabled"}),
     state(user(f"{SYSTEM_TEXT.partition(chr(10) * 2 + '## Tool')[0]}\n\n{FIRST_USER}"))),
    ("tools-empty-but-tool-history", short([
        {"role": "user", "content": "read a"},
        {"role": "assistant", "content": [use("toolu_1", "/a")]},
        {"role": "user", "content": [result("toolu_1", [{"type": "text", "text": "A"}])]},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "thanks"}], tools=[]),
     state(user("thanks", tools=[{"toolSpecification": {
         "name": "Read", "description": "Tool: Read",
         "inputSchema": {"json": {"type": "object", "properties": {}}}}}]),
         [U("You are Claude Code.\n\nread a"), A(" ", [cw_use("toolu_1", "/a")]),
          U("Tool results provided.", toolResults=[ok("toolu_1", "A")]), A("Done.")])),
    ("three-parallel-results-one-message-string-and-blocks", short([
        {"role": "user", "content": "read three"},
        {"role": "assistant", "content": [use("toolu_1", "/a"), use("toolu_2", "/b"),
                                          use("toolu_3", "/c")]},
        {"role": "user", "content": [
            result("toolu_1", "A", cache_control={"type": "ephemeral"}),
            result("toolu_2", [{"type": "text", "text": "B1"}, {"type": "text", "text": "B2"}],
                   is_error=False),
            result("toolu_3", [], is_error=True)]}],
        thinking={"type": "enabled", "budget_tokens": 2048}),
     state(user("Tool results provided.", toolResults=[
         ok("toolu_1", "A"),
         {"toolUseId": "toolu_2", "content": [{"text": "B1"}, {"text": "B2"}],
          "status": "success"},
         {"toolUseId": "toolu_3", "content": [{"text": "(empty result)"}], "status": "error"}],
         tools=[READ_SPEC]),
         [U("<thinking_mode>enabled</thinking_mode><max_thinking_length>2048"
            "</max_thinking_length>\n\nYou are Claude Code.\n\nread three"),
          A(" ", [cw_use("toolu_1", "/a"), cw_use("toolu_2", "/b"), cw_use("toolu_3", "/c")])])),
    ("interleaved-thinking-replayed-in-order", short([
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "First, look.", "signature": ""},
            {"type": "text", "text": "Looking."},
            {"type": "redacted_thinking", "data": "ZW5j"},
            {"type": "thinking", "thinking": "Then read.", "signature": "c2ln"},
            use("toolu_1", "/a")]},
        {"role": "user", "content": [result("toolu_1", "A")]}],
        thinking={"type": "adaptive"}, output_config={"effort": "low"}),
     state(user("Tool results provided.", toolResults=[ok("toolu_1", "A")], tools=[READ_SPEC]),
           [U("<thinking_mode>adaptive</thinking_mode><thinking_effort>low</thinking_effort>"
              "\n\nYou are Claude Code.\n\ngo"),
            A("<thinking>First, look.</thinking>\n\nLooking.\n\n"
              "<thinking>Then read.</thinking>", [cw_use("toolu_1", "/a")])])),
    ("orphans-and-repeats-repaired", short([
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [use("toolu_1", "/a"), use("toolu_2", "/b"),
                                          use("toolu_1", "/a")]},
        {"role": "user", "content": [result("toolu_1", "A"), result("toolu_1", "A again"),
                                     result("toolu_9", "stray")]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "[Request interrupted by user]"}]),
     state(user("[Request interrupted by user]", tools=[READ_SPEC]),
           [U("You are Claude Code.\n\ngo"),
            A('[Called Read with input {"file_path": "/b"}]', [cw_use("toolu_1", "/a")]),
            U("[Tool result for toolu_9]\nstray", toolResults=[ok("toolu_1", "A")]),
            A("ok")])),
    ("images-of-every-format-on-their-messages", short([
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/gif",
                                         "data": "R0lG"}},
            {"type": "text", "text": "first"}]},
        {"role": "assistant", "content": "seen"},
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                         "data": "/9j/"}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/webp",
                                         "data": "UklG"}},
            {"type": "text", "text": "these"}]}], tools=[]),
     state(user("these", images=[{"format": "jpeg", "source": {"bytes": "/9j/"}},
                                 {"format": "webp", "source": {"bytes": "UklG"}}]),
           [U("You are Claude Code.\n\nfirst",
              images=[{"format": "gif", "source": {"bytes": "R0lG"}}]),
            A("seen")])),
    ("tool-definitions-repaired", short([{"role": "user", "content": "hi"}], tools=[
        READ,
        {**READ, "description": "a second Read: the first wins"},
        {"name": "Blank", "description": "  ", "input_schema": {"type": "object"}},
        {"name": "NoSchema"},
        {"name": "Nested", "description": "d", "input_schema": {
            "type": "object", "required": [], "properties": {
                "$schema": {"type": "string"},
                "required": {"type": "boolean"},
                "opts": {"$schema": "https://json-schema.org/draft/2020-12/schema",
                         "type": "object", "required": [], "properties": None,
                         "default": {"required": []}},
                "items": {"type": "array", "items": {"type": "object", "required": [],
                                                     "properties": {"k": {"const": 1}}}}}}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 8},
        {"type": "custom", "name": "Custom", "description": "c",
         "input_schema": {"type": "object", "properties": {}}}]),
     state(user("You are Claude Code.\n\nhi", tools=[
         READ_SPEC,
         {"toolSpecification": {"name": "Blank", "description": "Tool: Blank",
                                "inputSchema": {"json": {"type": "object", "properties": {}}}}},
         {"toolSpecification": {"name": "NoSchema", "description": "Tool: NoSchema",
                                "inputSchema": {"json": {"type": "object", "properties": {}}}}},
         {"toolSpecification": {"name": "Nested", "description": "d", "inputSchema": {"json": {
             "type": "object", "properties": {
                 "$schema": {"type": "string"},
                 "required": {"type": "boolean"},
                 "opts": {"type": "object", "default": {"required": []}},
                 "items": {"type": "array", "items": {
                     "type": "object", "properties": {"k": {"const": 1}}}}}}}}},
         {"toolSpecification": {"name": "Custom", "description": "c", "inputSchema": {
             "json": {"type": "object", "properties": {}}}}},
         convert.SEARCH_SPEC]))),  # the hosted search, run by kiro2api
]


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in CLAUDE_CODE_REQUESTS],
                         ids=[c[0] for c in CLAUDE_CODE_REQUESTS])
def test_claude_code_request_becomes_exact_schema_valid_payload(body, expected):
    prepared = convert.anthropic_to_codewhisperer(body, conversation_id="conv-1")
    assert prepared.payload == expected
    check(load_schema(), "<GenerateAssistantResponseRequest>", prepared.payload)
    # What the upstream limits demand, whatever the request held.
    tools = prepared.payload["conversationState"]["currentMessage"]["userInputMessage"].get(
        "userInputMessageContext", {}).get("tools", [])
    names = [t["toolSpecification"]["name"] for t in tools]
    assert len(names) == len(set(names)) and all(len(n) <= 64 for n in names)
    assert all(0 < len(t["toolSpecification"]["description"].strip()) <= 10_000
               for t in tools)


def test_the_first_turn_is_as_large_as_claude_code_sends():
    size = len(json.dumps(first_turn()))
    assert 75_000 <= size <= 90_000
    assert max(len(t.get("description", "")) for t in first_turn()["tools"]) > 18_000


def test_long_tool_names_map_back_to_the_client_name():
    prepared = convert.anthropic_to_codewhisperer(first_turn(), conversation_id="c")
    assert prepared.tool_names[SENT_LONG_NAME] == LONG_NAME
    assert prepared.thinking and prepared.stop_sequences == ()


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
    assert assistant == {"content": "<thinking>Check both files.</thinking>\n\nReading both.",
                         "toolUses": [
                             {"toolUseId": "toolu_01", "name": "Tool1", "input": {"path": "/a"}},
                             {"toolUseId": "toolu_02", "name": sent_name,
                              "input": {"path": "/b"}}]}
    current = sent["conversationState"]["currentMessage"]["userInputMessage"]
    assert current["content"] == "Tool results provided."
    assert current["userInputMessageContext"]["toolResults"] == [ok("toolu_01", "A"),
                                                                 ok("toolu_02", "B")]


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


async def test_stop_sequence_closes_the_upstream_request(proxy):
    """The rest of the answer is never read: kiro2api hangs up on Kiro."""
    rest = fakes.text(*(["more text "] * 40)) + fakes.tail()
    proxy.fake.script.append(Stream(fakes.text("one STOP") + rest, split=(120, 60), delay=0.05))
    async with proxy.anthropic().messages.stream(
            model="claude-sonnet-4-5", max_tokens=100, stop_sequences=["STOP"],
            messages=[{"role": "user", "content": "count"}]) as stream:
        message = await stream.get_final_message()
    assert (message.content[0].text, message.stop_sequence) == ("one ", "STOP")
    deadline = asyncio.get_running_loop().time() + 10
    while not proxy.fake.interrupted:  # it finds out at its next write
        assert asyncio.get_running_loop().time() < deadline, "Kiro's reply was read to the end"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(("image", "status", "needle"), [
    ({"type": "base64", "media_type": "image/bmp", "data": "Qk0="}, 400, "image/bmp"),
    ({"type": "url", "url": "https://example.com/a.png"}, 400, "'url' is not supported"),
    ({"type": "base64", "media_type": "image/png", "data": "A" * (7 * 1024 * 1024)}, 413,
     "larger than 5 MiB"),
    ({"type": "base64", "media_type": "image/png", "data": "!!!notbase64"}, 400,
     "not valid base64"),
    ({"type": "base64", "media_type": "image/jpeg", "data": "iVBORw0KGgoAAAANSUhEUg=="}, 400,
     "the image data is PNG, not image/jpeg"),
], ids=["unsupported-type", "url-source", "oversize", "not-base64", "png-called-jpeg"])
async def test_image_refusals_name_the_block(proxy, image, status, needle):
    content = [{"type": "text", "text": "see"}, {"type": "tool_result", "tool_use_id": "t",
                                                 "content": [{"type": "image", "source": image}]}]
    with pytest.raises(anthropic.APIStatusError) as caught:
        await proxy.anthropic().messages.create(
            model="claude-sonnet-4-5", max_tokens=10,
            messages=[{"role": "user", "content": "go"}, {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t", "name": "Read", "input": {}}]},
                {"role": "user", "content": content}])
    assert caught.value.status_code == status
    message = caught.value.body["error"]["message"]
    assert message.startswith("messages.2.content.1.content.0") and needle in message
    assert proxy.fake.calls("/generateAssistantResponse") == []


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


# Scripted upstream streams -> exact Anthropic SSE ##########################
#
# Each stream is rendered the way the server does (one render per upstream
# read), parsed, every event validated with the anthropic SDK's types, and
# compared with the exact expected events. Deltas of one block that differ
# only in how the upstream happened to cut them are joined first, so one
# expectation holds for every way of splitting the same answer.

STREAM_EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
ESTIMATE = 10  # the prompt estimate message_start carries
# Kiro's own figures, which every stream below that ends normally reports.
METADATA = fakes.event("metadataEvent", {"tokenUsage": {
    "uncachedInputTokens": 900, "cacheReadInputTokens": 100, "cacheWriteInputTokens": 20,
    "outputTokens": 42, "totalTokens": 1062}})
KIRO_USAGE = {"input_tokens": 900, "output_tokens": 42, "cache_read_input_tokens": 100,
              "cache_creation_input_tokens": 20}
DELTA_KEYS = {"text_delta": "text", "thinking_delta": "thinking",
              "input_json_delta": "partial_json", "signature_delta": "signature"}


def render_reads(reads, **options):
    """SSE bytes for upstream ``reads`` (raw event-stream bytes), as ``stream_sse`` makes them."""
    assembler = convert.Assembler(input_tokens=ESTIMATE, **options)
    stream = convert.AnthropicStream(message_id="msg_1", model="claude-sonnet-4-5",
                                     input_tokens=ESTIMATE)
    decoder = eventstream.Decoder()
    out = stream.start()
    for read in reads:
        decoder.feed(read)
        events = []
        for frame in decoder:
            assembler.feed_into(events, frame.headers, frame.payload)
        out += stream.render(events)
        if assembler.stop_reason is not None:
            break
    out += stream.render(assembler.finish())
    return out + stream.finish(assembler.stop_reason, assembler.usage, assembler.stop_sequence)


def sse_events(raw):
    """Parse, validate with the SDK's types, and join same-kind deltas of a block."""
    events = []
    for name, event in parse_sse(raw):
        assert name == event["type"]
        if event["type"] != "ping":  # the SDK skips pings; they are not in its union
            STREAM_EVENT.validate_python(event)
        last = events[-1] if events else None
        if (event["type"] == "content_block_delta" and last is not None
                and last["type"] == "content_block_delta" and last["index"] == event["index"]
                and last["delta"]["type"] == event["delta"]["type"]):
            key = DELTA_KEYS[event["delta"]["type"]]
            last["delta"][key] += event["delta"][key]
        else:
            events.append(event)
    assert raw.endswith(b"\n\n")
    return events


def final_message(events):
    """The answer a client assembles from ``events``, validated as an SDK ``Message``.

    Fails if a tool_use block's input is not a complete JSON object.
    """
    message = dict(events[0]["message"], content=[])
    for event in events[1:]:
        if event["type"] == "content_block_start":
            message["content"].append(dict(event["content_block"]))
        elif event["type"] == "content_block_delta":
            block, delta = message["content"][event["index"]], event["delta"]
            if delta["type"] == "input_json_delta":
                block["input"] = json.loads(delta["partial_json"])
                assert isinstance(block["input"], dict)
            else:
                key = DELTA_KEYS[delta["type"]]
                block[key] += delta[key]
        elif event["type"] == "message_delta":
            message.update(event["delta"], usage=event["usage"])
    return Message.model_validate(message)


def start_events():
    return [{"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [],
        "model": "claude-sonnet-4-5", "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": ESTIMATE, "output_tokens": 0}}}, {"type": "ping"}]


def block(index, content_block, *deltas):
    """A block's start, its deltas (``(type, value)``) and its stop."""
    return ([{"type": "content_block_start", "index": index, "content_block": content_block}]
            + [{"type": "content_block_delta", "index": index,
                "delta": {"type": kind, DELTA_KEYS[kind]: value}} for kind, value in deltas]
            + [{"type": "content_block_stop", "index": index}])


def text_block(index, text):
    return block(index, {"type": "text", "text": ""}, ("text_delta", text))


def thinking_block(index, thinking, signature=None):
    deltas = [("thinking_delta", thinking)]
    if signature:
        deltas.append(("signature_delta", signature))
    return block(index, {"type": "thinking", "thinking": "", "signature": ""}, *deltas)


def tool_block(index, tool_id, name, input_json):
    return block(index, {"type": "tool_use", "id": tool_id, "name": name, "input": {}},
                 ("input_json_delta", input_json))


def end_events(stop_reason, usage=None, stop_sequence=None):
    return [{"type": "message_delta",
             "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
             "usage": KIRO_USAGE if usage is None else usage},
            {"type": "message_stop"}]


def one_read_per_frame(frames):
    return list(frames)


THINKING_ANSWER = ("\n<thinking>Plan: the tag </thinking> is only mentioned; "
                   "世界 🎉.</thinking>\n\nAnswer ✓")
THINKING_SSE = (start_events() + thinking_block(
    0, "Plan: the tag </thinking> is only mentioned; 世界 🎉.")
    + text_block(1, "Answer ✓") + end_events("end_turn"))


def test_thinking_tags_split_at_every_position_give_the_same_sse():
    """Every cut of the text between two events, and one event per character."""
    cuts = [[THINKING_ANSWER[:at], THINKING_ANSWER[at:]] for at in range(1, len(THINKING_ANSWER))]
    for chunks in cuts + [list(THINKING_ANSWER)]:
        frames = fakes.text(*chunks) + [METADATA] + fakes.tail()
        events = sse_events(render_reads(one_read_per_frame(frames), thinking=True))
        assert events == THINKING_SSE, chunks
        assert final_message(events).content[0].thinking.endswith("🎉.")


# One newline after the closing tag ends the thinking too; a mention of the
# tag mid-line or quoted does not. (A peer waits for a blank line: then this
# whole answer would be thinking, and the client would get no text at all.)
ONE_NEWLINE_ANSWER = ('<thinking>Say "</thinking>" and `</thinking>` later.\n'
                      'Let me add.</thinking>\nIt is 4.')
ONE_NEWLINE_SSE = (start_events() + thinking_block(
    0, 'Say "</thinking>" and `</thinking>` later.\nLet me add.')
    + text_block(1, "It is 4.") + end_events("end_turn"))


def test_a_closing_tag_at_the_end_of_a_line_ends_the_thinking_at_every_split():
    cuts = [[ONE_NEWLINE_ANSWER[:at], ONE_NEWLINE_ANSWER[at:]]
            for at in range(1, len(ONE_NEWLINE_ANSWER))]
    for chunks in cuts + [list(ONE_NEWLINE_ANSWER)]:
        frames = fakes.text(*chunks) + [METADATA] + fakes.tail()
        events = sse_events(render_reads(one_read_per_frame(frames), thinking=True))
        assert events == ONE_NEWLINE_SSE, chunks


def test_thinking_stream_cut_at_every_byte_gives_the_same_sse():
    """The same answer, its event-stream bytes split into two reads at every byte."""
    data = b"".join(fakes.text(THINKING_ANSWER[:9], THINKING_ANSWER[9:40], THINKING_ANSWER[40:])
                    + [METADATA] + fakes.tail())
    for at in range(1, len(data)):
        events = sse_events(render_reads([data[:at], data[at:]], thinking=True))
        assert events == THINKING_SSE, at


WRITE_INPUT = '{"file_path": "/tmp/a.py", "content": "print(\\"hé\\")\\n", "n": [1, {}]}'


def test_tool_call_cut_at_every_fragment_boundary_never_reaches_the_client():
    """A Write call streamed one character a fragment, cut after each fragment:
    by the end of the stream, or by Kiro's output limit."""
    head = fakes.text("Writing.") + fakes.tool("toolu_1", "Read", '{"file_path": "/a"}')
    fragments = fakes.tool("toolu_2", "Write", *WRITE_INPUT, stop=False)
    limit = fakes.exception("ContentLengthExceededException", "Output is too long.")
    cut_sse = start_events() + text_block(0, "Writing.") + tool_block(
        1, "toolu_1", "Read", '{"file_path": "/a"}')
    for count in range(len(fragments) + 1):
        for ending in ([], [limit]) if count else ([limit],):  # no fragment: nothing was cut
            events = sse_events(render_reads(head + fragments[:count] + ending))
            usage = events[-2]["usage"]
            assert set(usage) == {"input_tokens", "output_tokens"}  # no figures from Kiro
            assert usage["input_tokens"] == ESTIMATE and usage["output_tokens"] > 0
            assert events == cut_sse + end_events("max_tokens", usage), (count, ending)
            assert [b.type for b in final_message(events).content] == ["text", "tool_use"]
    whole = head + fragments + fakes.tool("toolu_2", "Write", stop=True)[-1:] + [METADATA]
    events = sse_events(render_reads(whole + fakes.tail()))
    assert events == cut_sse + tool_block(2, "toolu_2", "Write", WRITE_INPUT) \
        + end_events("tool_use")
    assert final_message(events).content[2].input == json.loads(WRITE_INPUT)


REFUSAL = fakes.event("metadataEvent", {"stopReason": "CONTENT_FILTERED",
                                        "stopDetails": {"refusal": {"category": "cyber"}}})

# (id, upstream frames, Assembler options, exact SSE events after the ping)
SCRIPTED = [
    ("refusal-without-text", [REFUSAL, METADATA] + fakes.tail(), {},
     end_events("refusal", {"input_tokens": ESTIMATE, "output_tokens": 0})),
    ("refusal-after-text", fakes.text("I can help with th") + [REFUSAL, METADATA], {},
     text_block(0, "I can help with th")
     + end_events("refusal", {"input_tokens": ESTIMATE, "output_tokens": 5})),
    ("context-window-full", fakes.text("Long answer") + [METADATA] + fakes.tail(100.0), {},
     text_block(0, "Long answer") + end_events("model_context_window_exceeded")),
    ("output-limit-after-text", fakes.text("Partial") + [
        fakes.exception("ContentLengthExceededException", "too long")], {},
     text_block(0, "Partial") + end_events("max_tokens",
                                           {"input_tokens": ESTIMATE, "output_tokens": 2})),
    ("stop-sequence", fakes.text("one two TH", "REE four") + [METADATA],
     {"stop_sequences": ("THREE", "\nHuman:")},
     text_block(0, "one two ") + end_events("stop_sequence", {
         "input_tokens": ESTIMATE, "output_tokens": 5}, "THREE")),
    ("native-reasoning-with-signature-and-redacted", [
        fakes.event("reasoningContentEvent", {"text": "Deep "}),
        fakes.event("reasoningContentEvent", {"text": "thought."}),
        fakes.event("reasoningContentEvent", {"signature": "c2lnbmF0dXJl"}),
        fakes.event("reasoningContentEvent", {"redactedContent": "ZW5jcnlwdGVk"}),
    ] + fakes.text("Done.") + [METADATA] + fakes.tail(), {},
     thinking_block(0, "Deep thought.", "c2lnbmF0dXJl")
     + block(1, {"type": "redacted_thinking", "data": "ZW5jcnlwdGVk"})
     + text_block(2, "Done.") + end_events("end_turn")),
    ("thinking-open-at-a-tool-call", fakes.text("<thinking>Need the file")
     + fakes.tool("toolu_1", SENT_LONG_NAME, '{"path": "/a"}') + fakes.text("after")
     + [METADATA] + fakes.tail(), {"thinking": True,
                                   "tool_names": {SENT_LONG_NAME: LONG_NAME}},
     thinking_block(0, "Need the file") + tool_block(1, "toolu_1", LONG_NAME, '{"path": "/a"}')
     + text_block(2, "after") + end_events("tool_use")),
    ("thinking-only", fakes.text("<thinking>", "just thoughts", "</thinking>") + [METADATA],
     {"thinking": True}, thinking_block(0, "just thoughts") + end_events("end_turn")),
    ("thinking-not-requested-passes-tags-through",
     fakes.text("<thinking>x</thinking>\n\ny") + [METADATA], {},
     text_block(0, "<thinking>x</thinking>\n\ny") + end_events("end_turn")),
]


@pytest.mark.parametrize(("frames", "options", "expected"), [c[1:] for c in SCRIPTED],
                         ids=[c[0] for c in SCRIPTED])
def test_scripted_stream_gives_exact_sse(frames, options, expected):
    events = sse_events(render_reads(frames, **options))
    assert events == start_events() + expected
    final_message(events)
    # Byte by byte, as a slow network delivers it: the same answer.
    data = b"".join(frames)
    assert sse_events(render_reads([data[i:i + 1] for i in range(len(data))],
                                   **options)) == events


# Claude Code 2.1.332 (PROTOCOL-2026.md 10.17) #############################

CRON_LIST = {"name": "CronList", "description": "List all cron jobs",
             "input_schema": {"type": "object", "properties": {}}, "defer_loading": True}
TOOL_SEARCH = {"name": "ToolSearch", "description": "Find deferred tools",
               "input_schema": {"type": "object", "properties": {
                   "query": {"type": "string"}, "max_results": {"type": "number"}},
                   "required": ["query"]}}
PLACEHOLDER = {"name": "DeferredToolPlaceholder",
               "description": "Reserved placeholder that keeps deferred tool loading active; "
                              "never call this tool.",
               "input_schema": {"type": "object", "properties": {}}, "defer_loading": True}
SAFEGUARDS = [{"type": "dangerous_tool_use", "classifier_context": {
    "v": 1, "permission_mode": "auto", "platform": "linux", "live_cwd": "/w",
    "rules": {"allow": [], "deny": [], "ask": []}, "refused_calls": []}}]
BETAS = ["claude-code-20250219", "interleaved-thinking-2025-05-14",
         "per-turn-control-2026-07-01", "advanced-tool-use-2025-11-20",
         "dangerous-tool-use-2026-09-03", "thinking-display-updates-2026-08-18"]


def tool_search_turn():
    """The turn after the model called ToolSearch for CronList: the tool arrives
    deferred, and the result references it."""
    return {"model": "claude-opus-5-5", "max_tokens": 128000, "stream": True,
            "tools": [TOOL_SEARCH, PLACEHOLDER, CRON_LIST],
            "messages": [
                {"role": "user", "content": "List my cron jobs"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_s",
                                                   "name": "ToolSearch",
                                                   "input": {"query": "select:CronList"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_s",
                     "content": [{"type": "tool_reference", "tool_name": "CronList"}]},
                    {"type": "text", "text": "Tool loaded.",
                     "cache_control": {"type": "ephemeral"}}]}]}


def test_a_tool_reference_loads_the_tool_and_the_placeholder_stays_home():
    payload = convert.anthropic_to_codewhisperer(tool_search_turn(),
                                                 conversation_id="c").payload
    check(load_schema(), "<GenerateAssistantResponseRequest>", payload)
    current = payload["conversationState"]["currentMessage"]["userInputMessage"]
    context = current["userInputMessageContext"]
    assert [t["toolSpecification"]["name"] for t in context["tools"]] == [
        "ToolSearch", "CronList"]
    assert context["toolResults"] == [ok("toolu_s", "Tool CronList loaded: call it directly.")]
    assert current["content"] == "Tool loaded."


async def test_the_tool_search_turn_is_one_200_through_the_server(proxy):
    proxy.fake.script.append(Stream(fakes.tool("toolu_c", "CronList", "{}") + fakes.tail()))
    body = {k: v for k, v in tool_search_turn().items() if k != "stream"}
    async with proxy.anthropic().beta.messages.stream(**body, betas=BETAS) as stream:
        message = await stream.get_final_message()
    assert [(b.type, b.name) for b in message.content] == [("tool_use", "CronList")]
    assert len(proxy.fake.calls("/generateAssistantResponse")) == 1
    with pytest.raises(anthropic.BadRequestError) as caught:  # a reference must name its tool
        broken = tool_search_turn()
        broken["messages"][2]["content"][0]["content"] = [{"type": "tool_reference"}]
        await proxy.anthropic().messages.create(**{**broken, "stream": False,
                                                   "max_tokens": 4096})
    assert "tool_name" in caught.value.message


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_safeguards_are_answered_not_judged_for_each_call(proxy, stream):
    frames = fakes.text("Deleting.") + fakes.tool("toolu_r", "Bash", '{"command":"rm -r x"}')
    proxy.fake.script.append(Stream(frames + fakes.tail()))
    body = {"model": "claude-opus-5-5", "max_tokens": 128000, "stream": stream,
            "safeguards": SAFEGUARDS, "tools": [{"name": "Bash", "input_schema": {
                "type": "object", "properties": {"command": {"type": "string"}}}}],
            "messages": [{"role": "user", "content": "clean up"}]}
    status, raw = await post_messages(proxy, body)
    assert status == 200, raw
    expected = [{"type": "dangerous_tool_use", "status": {"type": "available", "tool_uses": {
        "toolu_r": {"type": "unavailable", "reason": "not_judged_as_run"}}}}]
    if stream:
        events = [data for _, data in parse_sse(raw) if data["type"] != "ping"]
        for event in events:
            pydantic.TypeAdapter(RawMessageStreamEvent).validate_python(event)
        (delta,) = [e for e in events if e["type"] == "message_delta"]
        assert delta["delta"]["safeguard_results"] == expected
    else:
        answer = json.loads(raw)
        Message.model_validate(answer)
        assert answer["safeguard_results"] == expected
    # Without safeguards asked for, no such field; with no call, no verdicts.
    proxy.fake.script.append(Stream(fakes.text("Hi") + fakes.tail()))
    status, raw = await post_messages(proxy, {**body, "stream": False, "safeguards": None})
    assert "safeguard_results" not in json.loads(raw)
    proxy.fake.script.append(Stream(fakes.text("Hi") + fakes.tail()))
    status, raw = await post_messages(proxy, {**body, "stream": False})
    assert json.loads(raw)["safeguard_results"][0]["status"]["tool_uses"] == {}


async def post_messages(proxy, body):
    import aiohttp

    from helpers import API_KEY

    async with aiohttp.ClientSession() as session, session.post(
            proxy.url + "/v1/messages", json=body,
            headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}) as response:
        return response.status, await response.read()


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_thinking_display_omitted_sends_signed_blocks_without_text(proxy, stream):
    signed = [fakes.event("reasoningContentEvent", {"text": "secret plan"}),
              fakes.event("reasoningContentEvent", {"signature": "sig-1"})]
    body = {"model": "claude-opus-5-5", "max_tokens": 128000, "stream": stream,
            "thinking": {"type": "adaptive", "display": "omitted"},
            "messages": [{"role": "user", "content": "think"}]}
    proxy.fake.script.append(Stream(signed + fakes.text("Done.") + fakes.tail()))
    status, raw = await post_messages(proxy, body)
    assert status == 200 and b"secret plan" not in raw
    if stream:
        events = [data for _, data in parse_sse(raw)]
        kinds = [(e["type"], e.get("delta", {}).get("type")) for e in events
                 if e["type"].startswith("content_block")]
        assert kinds[:3] == [("content_block_start", None),
                             ("content_block_delta", "signature_delta"),
                             ("content_block_stop", None)]
        assert events[2]["content_block"] == {"type": "thinking", "thinking": "",
                                              "signature": ""}
    else:
        assert json.loads(raw)["content"][0] == {"type": "thinking", "thinking": "",
                                                 "signature": "sig-1"}
    # Unsigned thinking (the tag emulation) sends no block at all; "updates" passes it on.
    proxy.fake.script.append(Stream(fakes.text("<thinking>plan</thinking>\n\nDone.")
                                    + fakes.tail()))
    status, raw = await post_messages(proxy, {**body, "stream": False,
                                              "model": "claude-sonnet-4-5"})
    assert [b["type"] for b in json.loads(raw)["content"]] == ["text"]
    proxy.fake.script.append(Stream(signed + fakes.text("Done.") + fakes.tail()))
    status, raw = await post_messages(proxy, {**body, "stream": False, "thinking": {
        "type": "adaptive", "display": "updates"}})
    assert json.loads(raw)["content"][0]["thinking"] == "secret plan"


def test_the_last_per_turn_effort_outranks_the_top_level():
    body = {"model": "claude-opus-5-5", "max_tokens": 1, "thinking": {"type": "adaptive"},
            "output_config": {"effort": "medium"}, "messages": [
                {"role": "system", "content": "env", "output_config": {"effort": "low"}},
                {"role": "user", "content": "a"},
                {"role": "system", "content": [], "output_config": {"effort": "xhigh"}},
                {"role": "user", "content": "b"}]}
    assert "<thinking_effort>xhigh</thinking_effort>" in convert.thinking_prefix(body)
    body["messages"] = body["messages"][1:2]
    assert "<thinking_effort>medium</thinking_effort>" in convert.thinking_prefix(body)


@pytest.mark.parametrize(("model_id", "listed", "expected"), [
    ("claude-opus-5.5", ["claude-opus-4.6", "claude-opus-4.8", "claude-opus-5",
                         "claude-sonnet-5.5"], "claude-opus-5"),
    ("claude-opus-5.5", ["claude-opus-5.5", "claude-opus-5"], None),  # listed: as it is
    ("claude-haiku-5.5", ["claude-opus-5", "claude-sonnet-4.5"], None),  # no haiku at all
    ("claude-fable-5.2", ["claude-fable-5", "claude-fable-4.10", "claude-fable-4.9"],
     "claude-fable-5"),
    ("claude-sonnet-4.10", ["claude-sonnet-4.9", "claude-sonnet-4.10.1"], "claude-sonnet-4.10.1"),
    ("gpt-5.6-sol", ["gpt-5.6"], None),  # not a Claude family
])
def test_an_unlisted_claude_model_is_served_by_the_newest_of_its_family(model_id, listed,
                                                                         expected):
    assert convert.stand_in_model(model_id, listed) == expected


async def test_the_new_default_model_is_served_by_the_account_s_newest_opus(
        aiohttp_server, fake_upstream, proxy_config, caplog):
    import dataclasses

    import kiro2api

    fake_upstream.models_reply = Status(200, {"models": [
        {"modelId": "claude-opus-4.8"}, {"modelId": "claude-opus-5"},
        {"modelId": "claude-sonnet-4.5"}]})
    config = dataclasses.replace(proxy_config, model_map={"big": "claude-sonnet-4-5"})
    server = await aiohttp_server(kiro2api.make_app(config))
    client = anthropic.AsyncAnthropic(base_url=str(server.make_url("")).rstrip("/"),
                                      api_key=proxy_config.api_key, max_retries=0)
    for _ in range(2):
        fake_upstream.script.append(Stream(fakes.text("Hi") + fakes.tail()))
        message = await client.messages.create(model="claude-opus-5-5", max_tokens=100,
                                               messages=[{"role": "user", "content": "Hi"}])
        assert message.model == "claude-opus-5"  # named honestly
        sent = fake_upstream.calls("/generateAssistantResponse")[-1].body
        assert sent["conversationState"]["currentMessage"]["userInputMessage"][
            "modelId"] == "claude-opus-5"
        after_first = model_lists(fake_upstream)
    assert sum("serving it with claude-opus-5" in r.message for r in caplog.records) == 1
    # A model the account lists, an id of no family, and --model-map go as they are.
    for asked, sent_id in (("claude-sonnet-4-5", "claude-sonnet-4.5"),
                           ("kimi-k3", "kimi-k3"), ("big", "claude-sonnet-4.5")):
        fake_upstream.script.append(Stream(fakes.text("Hi") + fakes.tail()))
        await client.messages.create(model=asked, max_tokens=100,
                                     messages=[{"role": "user", "content": "Hi"}])
        sent = fake_upstream.calls("/generateAssistantResponse")[-1].body
        assert sent["conversationState"]["currentMessage"]["userInputMessage"][
            "modelId"] == sent_id
    assert model_lists(fake_upstream) == after_first  # the list is cached


def model_lists(fake):
    return len([c for c in fake.requests if "ListAvailableModels" in (
        c.path + c.headers.get("x-amz-target", ""))])


def rm_request(stream):
    return {"model": "claude-opus-5", "max_tokens": 128000, "stream": stream,
            "safeguards": SAFEGUARDS, "tools": [{"name": "Bash", "input_schema": {
                "type": "object", "properties": {"command": {"type": "string"}}}}],
            "messages": [{"role": "user", "content": "clean up the build"}]}


JUDGED = [
    ('{"outcome": "flagged", "explanation": "deletes the home directory"}',
     {"type": "evaluated", "outcome": "flagged", "explanation": "deletes the home directory"}),
    ('Sure: {"outcome":"not_flagged"}', {"type": "evaluated", "outcome": "not_flagged"}),
    ("I cannot tell.", {"type": "unavailable", "reason": "error"}),
    ('{"outcome": "maybe"}', {"type": "unavailable", "reason": "error"}),
]


@pytest.mark.parametrize(("answer", "verdict"), JUDGED, ids=["flag", "allow", "prose", "odd"])
def test_a_judgement_is_a_verdict_only_when_it_holds_one(answer, verdict):
    assert convert.safeguard_verdict(answer) == verdict


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("judge", ["flag", "allow", "fails", "slow"])
async def test_safeguards_kiro_judges_each_call_with_a_small_model(
        aiohttp_server, fake_upstream, proxy_config, monkeypatch, stream, judge):
    import dataclasses

    import kiro2api

    monkeypatch.setattr(kiro2api, "SAFEGUARD_SECONDS", 0.5)
    config = dataclasses.replace(proxy_config, safeguards="kiro")
    server = await aiohttp_server(kiro2api.make_app(config))
    fake_upstream.script.append(Stream(
        fakes.text("Cleaning.") + fakes.tool("toolu_r", "Bash", '{"command":"rm -rf ~"}')
        + fakes.tail()))
    fake_upstream.script.append({
        "flag": Stream(fakes.text(JUDGED[0][0]) + fakes.tail()),
        "allow": Stream(fakes.text(JUDGED[1][0]) + fakes.tail()),
        "fails": Status(500, {"message": "boom"}),
        "slow": Stream(fakes.text(JUDGED[1][0]) + fakes.tail(), first_byte_delay=2),
    }[judge])
    proxy = type("P", (), {"url": str(server.make_url("")).rstrip("/")})()
    status, raw = await post_messages(proxy, rm_request(stream))
    assert status == 200, raw
    if stream:
        (delta,) = [d for _, d in parse_sse(raw) if d["type"] == "message_delta"]
        results = delta["delta"]["safeguard_results"]
        assert raw.index(b"Cleaning.") < raw.index(b"message_delta")
    else:
        results = json.loads(raw)["safeguard_results"]
    verdict = results[0]["status"]["tool_uses"]["toolu_r"]
    assert verdict == {"flag": JUDGED[0][1], "allow": JUDGED[1][1],
                       "fails": {"type": "unavailable", "reason": "error"},
                       "slow": {"type": "unavailable", "reason": "timeout"}}[judge]
    # The judge's call: the small model, no tools, the context and the call in its prompt.
    question = fake_upstream.calls("/generateAssistantResponse")[1].body["conversationState"]
    message = question["currentMessage"]["userInputMessage"]
    assert message["modelId"] == kiro2api.SAFEGUARD_MODEL and "history" not in question
    assert "userInputMessageContext" not in message
    assert '"permission_mode": "auto"' in message["content"]
    assert '{"name": "Bash", "input": {"command": "rm -rf ~"}}' in message["content"]
    assert "clean up the build" in message["content"]


# Sessions keep one conversationId, so that Kiro's cache serves their later turns.

SESSION = "8c1a3b0e-55f2-4a61-9f0e-2f8e1d7c9a10"


@pytest.mark.parametrize(("body", "headers", "key"), [
    ({"metadata": {"user_id": json.dumps({"device_id": "d", "account_uuid": "",
                                          "session_id": SESSION})}}, {}, SESSION),
    ({}, {"x-claude-code-session-id": SESSION}, SESSION),
    ({"metadata": {"user_id": f"user_abc_account__session_{SESSION}"}}, {}, SESSION),
    ({"prompt_cache_key": "thread-1"}, {"session-id": "thread-2"}, "thread-1"),
    ({}, {"x-session-affinity": "s-9"}, "s-9"),
    ({"metadata": {"user_id": "alice"}}, {}, None),  # a user is not a session
    ({}, {}, None),
], ids=["claude-code", "claude-code-header", "claude-code-older", "codex", "header",
        "user-only", "none"])
def test_the_session_key_of_each_client(body, headers, key):
    assert convert.session_key(body, body, headers) == key


async def test_a_session_s_turns_share_a_conversation_and_hit_kiro_s_cache(proxy):
    proxy.fake.caching = True
    client = proxy.anthropic()

    async def turn(session, **headers):
        proxy.fake.script.append(Stream(fakes.text("ok")))
        metadata = {"user_id": json.dumps({"device_id": "d", "session_id": session})}
        message = await client.messages.create(
            model="claude-sonnet-4-5", max_tokens=100, metadata=metadata,
            messages=[{"role": "user", "content": "Hi"}], extra_headers=headers)
        return message.usage.cache_read_input_tokens or 0

    assert await turn(SESSION) == 0  # the first turn writes the cache
    assert await turn(SESSION) == fakes.FakeUpstream.CACHED_TOKENS
    assert await turn("another-session") == 0
    # Two requests without a session never share a conversation.
    for _ in range(2):
        proxy.fake.script.append(Stream(fakes.text("ok")))
        await client.messages.create(model="claude-sonnet-4-5", max_tokens=10,
                                     messages=[{"role": "user", "content": "Hi"}])
    ids = [c.body["conversationState"]["conversationId"]
           for c in proxy.fake.calls("/generateAssistantResponse")]
    assert ids[0] == ids[1] and len(set(ids)) == 4
    # The same session under another client key is another conversation.
    assert convert.session_conversation_id("key-a", SESSION) != \
        convert.session_conversation_id("key-b", SESSION)


# Native reasoning (PROTOCOL-2026.md 10.10-10.12) ##########################

def wire(model, thinking=None, effort=None, messages=None):
    body = {"model": model, "max_tokens": 128000,
            "messages": messages or [{"role": "user", "content": "Hi"}]}
    if thinking:
        body["thinking"] = thinking
    if effort:
        body["output_config"] = {"effort": effort}
    return convert.anthropic_to_codewhisperer(body, conversation_id="c").payload


ADAPTIVE = {"type": "adaptive"}


@pytest.mark.parametrize(("model", "thinking", "effort", "fields"), [
    ("claude-sonnet-4-5", ADAPTIVE, "high", None),  # no native reasoning: the tags
    ("claude-sonnet-4-6", ADAPTIVE, "xhigh", {  # no xhigh: one step down
        "thinking": {"type": "adaptive", "display": "summarized"},
        "output_config": {"effort": "high"}}),
    ("claude-opus-4-7", {"type": "enabled", "budget_tokens": 9000}, None,  # effort only
     {"output_config": {"effort": "high"}}),
    ("claude-opus-5", {"type": "adaptive", "display": "omitted"}, "max", {
        "thinking": {"type": "adaptive", "display": "omitted"},
        "output_config": {"effort": "max"}}),
    ("claude-opus-5-5", ADAPTIVE, "medium", {  # newer than the table: as the newest
        "thinking": {"type": "adaptive", "display": "summarized"},
        "output_config": {"effort": "medium"}}),
    ("gpt-5.6-sol", ADAPTIVE, "minimal", {"reasoning": {"effort": "low"}}),
    ("claude-opus-5", None, "high", None),  # no thinking asked for: nothing
])
def test_each_family_is_asked_for_reasoning_its_own_way(model, thinking, effort, fields):
    payload = wire(model, thinking, effort)
    check(load_schema(), "<GenerateAssistantResponseRequest>", payload)
    assert payload.get("additionalModelRequestFields") == fields
    content = payload["conversationState"]["currentMessage"]["userInputMessage"]["content"]
    tags = model == "claude-sonnet-4-5"
    assert ("<thinking_mode>" in content) is tags  # never both


def test_earlier_thinking_is_replayed_nested_for_native_models_and_as_tags_otherwise():
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "unsigned", "signature": ""},
                    {"type": "thinking", "thinking": "Plan.", "signature": "sig-1"},
                    {"type": "text", "text": "Answer."}]},
                {"role": "user", "content": "b"}]
    native = wire("claude-opus-5", ADAPTIVE, None, messages)
    check(load_schema(), "<GenerateAssistantResponseRequest>", native)
    assert native["conversationState"]["history"][1]["assistantResponseMessage"] == {
        "content": "Answer.", "reasoningContent": {
            "reasoningText": {"text": "Plan.", "signature": "sig-1"}}}
    tags = wire("claude-sonnet-4-5", ADAPTIVE, None, messages)
    assert tags["conversationState"]["history"][1]["assistantResponseMessage"] == {
        "content": "<thinking>unsigned</thinking>\n\n<thinking>Plan.</thinking>\n\nAnswer."}
    redacted = wire("gpt-5.6-sol", ADAPTIVE, None, [
        messages[0], {"role": "assistant", "content": [
            {"type": "text", "text": "Answer."},
            {"type": "redacted_thinking", "data": "QkxPQg=="}]}, messages[2]])
    assert redacted["conversationState"]["history"][1]["assistantResponseMessage"][
        "reasoningContent"] == {"redactedContent": "QkxPQg=="}


async def test_a_tool_loop_with_native_thinking_through_the_sdk(proxy):
    proxy.fake.script.append(Stream(
        [fakes.event("reasoningContentEvent", {"text": "I should list "}),
         fakes.event("reasoningContentEvent", {"text": "the files.", "signature": "sig-9"})]
        + fakes.tool("toolu_l", "Bash", '{"command":"ls"}') + fakes.tail(), split=(9, 2)))
    client = proxy.anthropic()
    body = {"model": "claude-opus-4-7", "max_tokens": 128000, "thinking": ADAPTIVE,
            "output_config": {"effort": "xhigh"},
            "tools": [{"name": "Bash", "input_schema": {
                "type": "object", "properties": {"command": {"type": "string"}}}}],
            "messages": [{"role": "user", "content": "What is here?"}]}
    async with client.beta.messages.stream(**body, betas=BETAS) as stream:
        first = await stream.get_final_message()
    assert [(b.type, getattr(b, "thinking", None), getattr(b, "signature", None))
            for b in first.content[:1]] == [("thinking", "I should list the files.", "sig-9")]
    sent = proxy.fake.calls("/generateAssistantResponse")[-1].body
    assert sent["additionalModelRequestFields"] == {"output_config": {"effort": "xhigh"}}
    assert "<thinking_mode>" not in json.dumps(sent)

    proxy.fake.script.append(Stream(fakes.text("Two files.") + fakes.tail()))
    body["messages"] += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                          for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_l",
                                      "content": "a b"}]}]
    async with client.beta.messages.stream(**body, betas=BETAS) as stream:
        second = await stream.get_final_message()
    assert second.content[-1].text == "Two files."
    sent = proxy.fake.calls("/generateAssistantResponse")[-1].body
    check(load_schema(), "<GenerateAssistantResponseRequest>", sent)
    replayed = sent["conversationState"]["history"][-1]["assistantResponseMessage"]
    assert replayed["reasoningContent"] == {"reasoningText": {
        "text": "I should list the files.", "signature": "sig-9"}}
    assert "I should list" not in replayed["content"]


async def test_input_tokens_from_the_context_percentage_use_the_listed_window(proxy):
    client = proxy.anthropic()
    await client.models.list()  # the service's list: qwen3-coder-next has 256K
    proxy.fake.script.append(Stream(fakes.text("abcd") + fakes.tail(percentage=10.0)))
    message = await client.messages.create(model="qwen3-coder-next", max_tokens=10,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert message.usage.input_tokens == 25_600 - message.usage.output_tokens
    proxy.fake.script.append(Stream(fakes.text("abcd") + fakes.tail(percentage=10.0)))
    message = await client.messages.create(model="glm-5", max_tokens=10,  # not listed
                                           messages=[{"role": "user", "content": "Hi"}])
    assert message.usage.input_tokens == 20_000 - message.usage.output_tokens


async def test_a_model_kiro_does_not_have_is_a_404_naming_the_account_s_models(proxy):
    proxy.fake.script.append(Status(400, {"message": "Invalid model.",
                                          "reason": "INVALID_MODEL_ID"}))
    with pytest.raises(anthropic.NotFoundError) as caught:
        await proxy.anthropic().messages.create(model="kimi-k3", max_tokens=10, messages=[
            {"role": "user", "content": "Hi"}])
    assert caught.value.body["error"]["message"].endswith(
        "this account has: claude-opus-4.7, claude-sonnet-4.5, qwen3-coder-next")


SIGNATURE_REFUSED = Status(400, {"message": "Invalid signature in thinking block.",
                                 "reason": "THINKING_SIGNATURE_INVALID"})


def signed_history(signature: str | None) -> list[dict]:
    """A second turn whose history holds an answer with its signed thinking (None:
    the answer alone)."""
    thinking = [{"type": "thinking", "thinking": "Plan.", "signature": signature}]
    return [{"role": "user", "content": "a"},
            {"role": "assistant", "content": (thinking if signature else []) + [
                {"type": "text", "text": "Answer."}]},
            {"role": "user", "content": "b"}]


async def test_a_signature_kiro_refuses_sends_the_history_once_more_without_thinking(proxy):
    # A signature of another model (the client switched), or one altered: Kiro
    # refuses the whole request, and the conversation would be stuck for good.
    proxy.fake.script.extend([SIGNATURE_REFUSED,
                              Stream(fakes.text("Still here.") + fakes.tail())])
    message = await proxy.anthropic().messages.create(
        model="claude-opus-5", max_tokens=1000, thinking=ADAPTIVE,
        messages=signed_history("sig-of-another"))
    assert message.content[-1].text == "Still here."
    first, second = [c.body for c in proxy.fake.calls("/generateAssistantResponse")]
    assert first["conversationState"]["history"][1]["assistantResponseMessage"][
        "reasoningContent"]["reasoningText"]["signature"] == "sig-of-another"
    assert second["conversationState"]["history"][1]["assistantResponseMessage"] == {
        "content": "Answer."}
    check(load_schema(), "<GenerateAssistantResponseRequest>", second)
    assert first["conversationState"]["currentMessage"] == second["conversationState"][
        "currentMessage"]


@pytest.mark.parametrize("signature, calls", [("sig-x", 2), (None, 1)],
                         ids=["refused again", "no thinking to leave out"])
async def test_a_signature_refused_again_or_with_none_to_leave_out_is_the_client_s_400(
        proxy, signature, calls):
    proxy.fake.script.extend([SIGNATURE_REFUSED, SIGNATURE_REFUSED])
    with pytest.raises(anthropic.BadRequestError) as caught:
        await proxy.anthropic().messages.create(
            model="claude-opus-5", max_tokens=1000, thinking=ADAPTIVE,
            messages=signed_history(signature))
    assert "THINKING_SIGNATURE_INVALID" in caught.value.body["error"]["message"]
    assert len(proxy.fake.calls("/generateAssistantResponse")) == calls
