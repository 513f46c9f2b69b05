"""Web search: the hosted search tool of Claude Code (and Codex, and chat's
web_search_options) run by kiro2api on Kiro's MCP endpoint, within one client
request (PROTOCOL-2026.md 10.14), against the fake upstream's /mcp.
"""

from __future__ import annotations

import json

import aiohttp
import pydantic
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

import convert
import fakes
from fakes import Status, Stream
from helpers import API_KEY, parse_sse

SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 8}
READ = {"name": "Read", "input_schema": {"type": "object", "properties": {
    "path": {"type": "string"}}}}
EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)


def claude_code_search(**tool):
    """Claude Code's WebSearch request (2.1.332): the hosted tool alone, auto choice."""
    return {"model": "claude-sonnet-4-5", "max_tokens": 128000,
            "tools": [{**SEARCH, **tool}], "tool_choice": {"type": "auto"},
            "system": "You run a web search for another Claude model, which is waiting on "
                      "the result and can search again. Search once, then reply with a "
                      "brief summary of the results.",
            "messages": [{"role": "user", "content": "Perform a web search for the query: "
                                                     "kiro changelog"}]}


def searching(query, call_id="tooluse_s1"):
    return fakes.tool(call_id, "web_search", json.dumps({"query": query}))


async def post(proxy, body, path="/v1/messages"):
    async with aiohttp.ClientSession() as session, session.post(
            proxy.url + path, json=body,
            headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01",
                     "Authorization": f"Bearer {API_KEY}"}) as response:
        return response.status, await response.read()


def searches(proxy):
    return [c.body for c in proxy.fake.requests if c.path.endswith("/mcp")]


def generates(proxy):
    return proxy.fake.calls("/generateAssistantResponse")


# Pure parts ###############################################################


def test_the_hosted_tool_becomes_a_tool_kiro_can_call():
    payload = convert.anthropic_to_codewhisperer(
        {**claude_code_search(), "tools": [READ, SEARCH]}, conversation_id="c")
    tools = payload.payload["conversationState"]["currentMessage"]["userInputMessage"][
        "userInputMessageContext"]["tools"]
    assert [t["toolSpecification"]["name"] for t in tools] == ["Read", "web_search"]
    assert payload.web_search == convert.WebSearch(max_uses=8)
    # A client tool of that name is the client's; tool_choice none offers none.
    own = {"name": "web_search", "input_schema": {"type": "object"}}
    assert convert.anthropic_to_codewhisperer(
        {**claude_code_search(), "tools": [own, SEARCH]}, conversation_id="c").web_search is None
    assert convert.anthropic_to_codewhisperer(
        {**claude_code_search(), "tool_choice": {"type": "none"}},
        conversation_id="c").web_search is None


def test_domain_filters_go_in_the_query_and_sift_the_results():
    search = convert.WebSearch(allowed_domains=("kiro.dev", "github.com"),
                               blocked_domains=("example.com",))
    assert convert.search_query("kiro", search) == \
        "kiro (site:kiro.dev OR site:github.com) -site:example.com"
    answer = {"result": {"content": [{"type": "text", "text": json.dumps({"results": [
        {"title": "a", "url": "https://docs.kiro.dev/x"},
        {"title": "b", "url": "https://www.github.com/y"},
        {"title": "c", "url": "https://example.com/z"},
        {"title": "d", "url": "https://notkiro.dev/"}]})}]}}
    assert [r["title"] for r in convert.mcp_search_results(answer, search)] == ["a", "b"]


@pytest.mark.parametrize("answer", [
    {"error": {"code": -32000, "message": "boom"}},
    {"result": {"isError": True, "content": []}},
    {"result": {"content": [{"type": "text", "text": '{"error": "quota"}'}]}},
    {"result": {"content": [{"type": "text", "text": '{"totalResults": 0}'}]}},
    "not json",
], ids=["error", "is-error", "inner-error", "no-results-list", "garbage"])
def test_a_failed_search_answer_is_no_result(answer):
    assert convert.mcp_search_results(answer, convert.WebSearch()) is None


def test_an_explicitly_empty_search_is_a_success():
    answer = {"result": {"content": [{"type": "text", "text": '{"results": []}'}]}}
    assert convert.mcp_search_results(answer, convert.WebSearch()) == ()


def test_earlier_searches_in_history_are_replayed_as_text():
    body = {**claude_code_search(), "messages": [
        {"role": "user", "content": "search"},
        {"role": "assistant", "content": [
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
             "input": {"query": "kiro"}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [
                {"type": "web_search_result", "title": "Kiro", "url": "https://kiro.dev",
                 "encrypted_content": "x", "page_age": None}]},
            {"type": "text", "text": "Found it."}]},
        {"role": "user", "content": "thanks"}]}
    payload = convert.anthropic_to_codewhisperer(body, conversation_id="c").payload
    assistant = payload["conversationState"]["history"][1]["assistantResponseMessage"]
    assert assistant == {"content": "(I searched the web for: kiro)\n\n(Search results: "
                                    "Kiro <https://kiro.dev>)\n\nFound it."}


# Through the server #######################################################


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_one_search_in_one_answer(proxy, stream):
    proxy.fake.script.append(Stream(fakes.text("I'll search for that.")
                                    + searching("kiro changelog") + fakes.tail()))
    proxy.fake.script.append(Stream(fakes.text("Kiro added new models in December.")
                                    + fakes.tail()))
    status, raw = await post(proxy, {**claude_code_search(), "stream": stream})
    assert status == 200, raw
    if stream:
        events = [data for _, data in parse_sse(raw) if data["type"] != "ping"]
        for event in events:
            EVENT.validate_python(event)
        blocks = [e["content_block"] for e in events if e["type"] == "content_block_start"]
        assert [e["index"] for e in events if e["type"] == "content_block_start"] == [0, 1, 2, 3]
        (delta,) = [e for e in events if e["type"] == "message_delta"]
        usage, stop = delta["usage"], delta["delta"]["stop_reason"]
        query = [e["delta"]["partial_json"] for e in events
                 if e.get("delta", {}).get("type") == "input_json_delta"]
        assert query == ['{"query": "kiro changelog"}']
    else:
        message = json.loads(raw)
        Message.model_validate(message)
        blocks, usage, stop = message["content"], message["usage"], message["stop_reason"]
    assert [b["type"] for b in blocks] == ["text", "server_tool_use", "web_search_tool_result",
                                           "text"]
    use, result = blocks[1], blocks[2]
    assert use["id"].startswith("srvtoolu_") and use["name"] == "web_search"
    assert result["tool_use_id"] == use["id"]
    assert result["content"] == [
        {"type": "web_search_result", "title": "Kiro changelog",
         "url": "https://kiro.dev/changelog/", "encrypted_content": "December 2026: new models.",
         "page_age": "December 2, 2025"},
        {"type": "web_search_result", "title": "Kiro on GitHub",
         "url": "https://github.com/kirodotdev/Kiro", "encrypted_content": "Issues and releases.",
         "page_age": None}]
    assert stop == "end_turn"
    assert usage["server_tool_use"] == {"web_search_requests": 1, "web_fetch_requests": 0}
    # On the wire: the search, with the profile ARN; then the model, with its results.
    (search,) = searches(proxy)
    assert search["params"] == {"name": "web_search", "arguments": {"query": "kiro changelog"}}
    first, second = generates(proxy)
    (call,) = [c for c in proxy.fake.requests if c.path.endswith("/mcp")]
    assert search["profileArn"] == first.body["profileArn"] == \
        call.headers["x-amzn-kiro-profile-arn"]
    assert call.headers["Authorization"] == first.headers["Authorization"]
    assert first.body["conversationState"]["conversationId"] == \
        second.body["conversationState"]["conversationId"]
    state = second.body["conversationState"]
    assert state["history"][-1]["assistantResponseMessage"]["toolUses"][0]["name"] == \
        "web_search"
    (answer,) = state["currentMessage"]["userInputMessage"]["userInputMessageContext"][
        "toolResults"]
    assert "https://kiro.dev/changelog/" in answer["content"][0]["text"]


async def test_two_searches_then_max_uses_reached(proxy):
    for query, call in (("kiro", "tooluse_a"), ("kiro models", "tooluse_b"),
                        ("kiro prices", "tooluse_c")):
        proxy.fake.script.append(Stream(fakes.text(f"Looking up {query}.")
                                        + searching(query, call) + fakes.tail()))
    proxy.fake.script.append(Stream(fakes.text("Here is what I found.") + fakes.tail()))
    status, raw = await post(proxy, {**claude_code_search(max_uses=2), "stream": False})
    message = json.loads(raw)
    Message.model_validate(message)
    results = [b["content"] for b in message["content"] if b["type"] == "web_search_tool_result"]
    assert isinstance(results[0], list) and isinstance(results[1], list)
    assert results[2] == {"type": "web_search_tool_result_error",
                          "error_code": "max_uses_exceeded"}
    assert message["usage"]["server_tool_use"]["web_search_requests"] == 2
    assert len(searches(proxy)) == 2 and len(generates(proxy)) == 4
    assert message["content"][-1]["text"] == "Here is what I found."
    # Each round's own words go back once: the last call's history holds three rounds.
    history = generates(proxy)[-1].body["conversationState"]["history"]
    said = [h["assistantResponseMessage"]["toolUses"][0]["input"]["query"]
            for h in history if "assistantResponseMessage" in h]
    assert said == ["kiro", "kiro models", "kiro prices"]
    assert json.dumps(history).count("Looking up kiro.") == 1


async def test_domain_filters_reach_the_wire(proxy):
    proxy.fake.script.append(Stream(searching("kiro") + fakes.tail()))
    proxy.fake.script.append(Stream(fakes.text("Done.") + fakes.tail()))
    status, raw = await post(proxy, {**claude_code_search(
        allowed_domains=["kiro.dev"], blocked_domains=["github.com"]), "stream": False})
    (search,) = searches(proxy)
    assert search["params"]["arguments"]["query"] == "kiro (site:kiro.dev) -site:github.com"
    (result,) = [b for b in json.loads(raw)["content"] if b["type"] == "web_search_tool_result"]
    assert [r["url"] for r in result["content"]] == ["https://kiro.dev/changelog/"]


@pytest.mark.parametrize(("reply", "code"), [
    (Status(500, {"message": "boom"}), "unavailable"),
    (Status(429, {"message": "slow down"}), "too_many_requests"),
    ({"jsonrpc": "2.0", "id": "x", "error": {"code": -1, "message": "no"}}, "unavailable"),
])
async def test_a_failed_search_is_an_error_block_and_the_answer_goes_on(proxy, reply, code):
    proxy.fake.search_script.append(reply)
    proxy.fake.script.append(Stream(searching("kiro") + fakes.tail()))
    proxy.fake.script.append(Stream(fakes.text("The search failed; from memory: ...")
                                    + fakes.tail()))
    status, raw = await post(proxy, {**claude_code_search(), "stream": True})
    assert status == 200
    events = [data for _, data in parse_sse(raw) if data["type"] != "ping"]
    assert events[-1]["type"] == "message_stop"
    (result,) = [e["content_block"] for e in events if e["type"] == "content_block_start"
                 and e["content_block"]["type"] == "web_search_tool_result"]
    assert result["content"] == {"type": "web_search_tool_result_error", "error_code": code}
    told = generates(proxy)[1].body["conversationState"]["currentMessage"]["userInputMessage"]
    assert "The web search failed" in json.dumps(told)


async def test_a_client_tool_called_beside_the_search_goes_to_the_client(proxy):
    proxy.fake.script.append(Stream(searching("kiro") + fakes.tool("toolu_r", "Read",
                                                                   '{"path": "a"}')
                                    + fakes.tail()))
    status, raw = await post(proxy, {**claude_code_search(), "tools": [READ, SEARCH],
                                     "stream": False})
    message = json.loads(raw)
    assert [b["type"] for b in message["content"]] == [
        "server_tool_use", "tool_use", "web_search_tool_result"]
    assert message["stop_reason"] == "tool_use" and len(generates(proxy)) == 1


async def test_codex_s_hosted_search_is_a_web_search_call_item(proxy):
    proxy.fake.script.append(Stream(searching("kiro") + fakes.tail()))
    proxy.fake.script.append(Stream(fakes.text("Kiro has new models.") + fakes.tail()))
    status, raw = await post(proxy, {"model": "claude-sonnet-4-5", "input": "news?",
                                     "stream": True, "tools": [
                                         {"type": "web_search", "external_web_access": True}]},
                             path="/v1/responses")
    events = [data for _, data in parse_sse(raw)]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    Response.model_validate(final)
    search, message = final["output"]
    assert search["type"] == "web_search_call" and search["status"] == "completed"
    assert search["action"]["query"] == "kiro"
    assert {"type": "url", "url": "https://kiro.dev/changelog/"} in search["action"]["sources"]
    assert message["content"][0]["text"] == "Kiro has new models."
    kinds = [e["type"] for e in events]
    assert kinds.index("response.web_search_call.searching") < kinds.index(
        "response.web_search_call.completed")


async def test_chat_web_search_options_give_url_citations(proxy):
    proxy.fake.script.append(Stream(searching("kiro") + fakes.tail()))
    proxy.fake.script.append(Stream(fakes.text("See https://kiro.dev/changelog/ for more.")
                                    + fakes.tail()))
    status, raw = await post(proxy, {"model": "claude-sonnet-4-5", "web_search_options": {},
                                     "messages": [{"role": "user", "content": "news?"}]},
                             path="/v1/chat/completions")
    completion = json.loads(raw)
    ChatCompletion.model_validate(completion)
    first = completion["choices"][0]["message"]["annotations"][0]
    assert first == {"type": "url_citation", "url_citation": {
        "url": "https://kiro.dev/changelog/", "title": "Kiro changelog",
        "start_index": 4, "end_index": 31}}
