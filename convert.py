"""Pure conversions between the client APIs and Kiro's CodeWhisperer backend.

Request side: an Anthropic Messages body (OpenAI bodies are first normalised
to that shape by ``openai_to_anthropic``) becomes one ``generateAssistantResponse``
payload through ``anthropic_to_codewhisperer``, the only payload builder.

Response side, three steps::

    frame --decode_event--> upstream event --Assembler--> neutral events
          --a Renderer (AnthropicStream, OpenAIStream)--> SSE bytes
          (or its collect() for a non-streamed answer)

``decode_event`` maps one event-stream frame to what it says; the
``Assembler`` keeps per-answer state (tool calls under construction, the
stop reason, usage) and yields neutral events that know nothing of either
client format; each renderer is the only place that spells its format.
Errors are one neutral ``Failure`` (a kind and a status hint) that each
client API renders in its own envelope. A ``ClientApi`` bundles one API's
normaliser, renderer and envelope for the relay in kiro2api.py.

Layout: errors and failures, models, requests (Anthropic, then OpenAI),
token estimates, upstream events, upstream errors, neutral events, the
assembler, the renderer contract, Anthropic rendering, OpenAI rendering,
client APIs, Kiro request dialects, hosts and account kinds (what Kiro's
refusals mean), usage limits.

Standard library only: no I/O, no logging, no clock or random ids of its own
(callers pass them in), so every function here is testable without a loop.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from json.encoder import encode_basestring as _json_string  # type: ignore[attr-defined]
from typing import Any, NamedTuple, Protocol, Union

Json = dict[str, Any]


# Errors and failures ######################################################


class ConversionError(ValueError):
    """A client request we cannot turn into an upstream call.

    ``status`` is the HTTP status to answer with (400 unless said otherwise);
    ``code`` and ``param`` feed the OpenAI envelope.
    """

    def __init__(
        self, message: str, status: int = 400, *, code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


class StreamError(Exception):
    """The upstream ended the answer with an error (an exception frame or event).

    ``error_type`` is the upstream's class name (e.g. ``ThrottlingException``).
    """

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}" if message else error_type)
        self.error_type = error_type
        self.message = message


# Failures: one neutral description of every error a client is answered with.
# Each client API renders it in its own envelope, from its own table of
# ``kind`` -> error type (``ANTHROPIC_ERROR_TYPES``, ``OPENAI_ERROR_TYPES``).


class Failure(NamedTuple):
    """Why a request failed, in no client API's words.

    ``kind`` names the failure (a key of ``STATUS_OF_KIND``); ``status`` is the
    HTTP status to answer with, a hint as h11's errors carry
    ``error_status_hint``; ``retry_after`` is a ``Retry-After`` to pass on;
    ``param`` and ``code`` are the details OpenAI's envelope has room for.
    """

    kind: str
    status: int
    message: str
    retry_after: str | None = None
    param: str | None = None
    code: str | None = None


# Every kind, and the status it stands for when nothing more precise is known.
STATUS_OF_KIND = {
    "invalid_request": 400, "authentication": 401, "billing": 402, "permission": 403,
    "not_found": 404, "too_large": 413, "rate_limit": 429, "internal": 500, "upstream": 502,
    "unavailable": 503, "timeout": 504, "overloaded": 529,
}
# The kind of a bare status (an HTTP error of the web layer, a ConversionError's).
KIND_OF_STATUS = {
    **{status: kind for kind, status in STATUS_OF_KIND.items()},
    405: "invalid_request", 408: "timeout",
}


def failure(status: int, message: str, *, kind: str | None = None,
            retry_after: str | None = None, param: str | None = None,
            code: str | None = None) -> Failure:
    """A ``Failure`` answered with ``status``; its kind is the status's unless given."""
    if kind is None:
        kind = KIND_OF_STATUS.get(status, "invalid_request" if status < 500 else "internal")
    return Failure(kind, status, message, retry_after, param, code)


def conversion_failure(exc: ConversionError) -> Failure:
    """What a refused client request answers."""
    return failure(exc.status, str(exc), param=exc.param, code=exc.code)


# Models ###################################################################

# Client model names that do not follow the dashed -> dotted rule below.
MODEL_ALIASES = {
    "auto-kiro": "auto",
    "claude-sonnet-4-20250514": "claude-sonnet-4",
    "claude-3-7-sonnet-20250219": "claude-3.7-sonnet",
}

# Models the server lists on GET /v1/models: (client name, Kiro id, context window).
MODELS = (
    ("claude-sonnet-4-5", "claude-sonnet-4.5", 200_000),
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4.5", 200_000),
    ("claude-sonnet-4-6", "claude-sonnet-4.6", 1_000_000),
    ("claude-sonnet-4", "claude-sonnet-4", 200_000),
    ("claude-sonnet-4-20250514", "claude-sonnet-4", 200_000),
    ("claude-haiku-4-5", "claude-haiku-4.5", 200_000),
    ("claude-haiku-4-5-20251001", "claude-haiku-4.5", 200_000),
    ("claude-opus-4-5", "claude-opus-4.5", 200_000),
    ("claude-opus-4-5-20251101", "claude-opus-4.5", 200_000),
    ("claude-opus-4-6", "claude-opus-4.6", 1_000_000),
    ("claude-opus-4-7", "claude-opus-4.7", 1_000_000),
    ("claude-3-7-sonnet-20250219", "claude-3.7-sonnet", 200_000),
    ("auto", "auto", 200_000),
)
_CONTEXT_WINDOWS = {kiro_id: window for _, kiro_id, window in MODELS}
MODELS_CREATED = 1_767_225_600  # 2026-01-01: the upstream gives no dates


def model_list(upstream: list[Json] | None) -> list[Json]:
    """``GET /v1/models`` entries, in a shape both SDKs read.

    ``upstream`` is ``ListAvailableModels``' ``models`` (None when it could
    not be had): each Kiro id is listed, then each of our Anthropic-style
    names whose Kiro id the account has. Without it, the built-in table.
    """
    def entry(name: str, display: str, window: int | None) -> Json:
        return {"id": name, "object": "model", "created": MODELS_CREATED,
                "owned_by": "anthropic" if name.startswith("claude") else "kiro",
                "type": "model", "display_name": display, "lifecycle": "active",
                "created_at": "2026-01-01T00:00:00Z", "max_input_tokens": window,
                "context_window": window}

    if upstream is None:
        return [entry(name, name, window) for name, _, window in MODELS]
    entries, available = [], set()
    for model in upstream:
        if not isinstance(model, dict) or not isinstance(model.get("modelId"), str):
            continue
        limits = model.get("tokenLimits") if isinstance(model.get("tokenLimits"), dict) else {}
        window = limits.get("maxInputTokens")
        available.add(model["modelId"])
        entries.append(entry(model["modelId"], str(model.get("modelName") or model["modelId"]),
                             window if isinstance(window, int) else None))
    entries += [entry(name, name, window) for name, kiro_id, window in MODELS
                if kiro_id in available and name != kiro_id]
    return entries
DEFAULT_CONTEXT_WINDOW = 200_000

_DATE_SUFFIX = re.compile(r"-(\d{8}|latest)$")
# claude-sonnet-4-5 -> claude-sonnet-4.5 ; claude-3-7-sonnet -> claude-3.7-sonnet
_FAMILY_VERSION = re.compile(r"^(claude-[a-z]+-\d+)-(\d+)$")
_VERSION_FAMILY = re.compile(r"^(claude-\d+)-(\d+)(-[a-z]+)$")


def resolve_model(name: str) -> str:
    """Client model name -> Kiro ``modelId``; names we do not know pass through.

    Dated, ``-latest`` and dashed Anthropic names map to Kiro's dotted ids; the legacy
    upper-case ids (``CLAUDE_SONNET_4_20250514_V1_0``) and Kiro's own ids are
    accepted as they are.
    """
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]
    if not name.startswith("claude-"):
        return name
    base = _DATE_SUFFIX.sub("", name.removesuffix("[1m]"))
    match = _FAMILY_VERSION.match(base)
    if match:  # Kiro names a .0 release without it: claude-sonnet-4-0 -> claude-sonnet-4
        return match[1] if match[2] == "0" else f"{match[1]}.{match[2]}"
    match = _VERSION_FAMILY.match(base)
    if match:
        return f"{match[1]}.{match[2]}{match[3]}"
    return base


# Kiro ids of the Claude families clients name by their newest release.
_FAMILY_ID = re.compile(r"^claude-(opus|sonnet|haiku|fable)-(\d+(?:\.\d+)*)$")


def model_family(model_id: str) -> tuple[str, tuple[int, ...]] | None:
    """``claude-opus-5.5`` -> ("opus", (5, 5)); None for an id of no such family."""
    match = _FAMILY_ID.match(model_id)
    if not match:
        return None
    return match[1], tuple(int(part) for part in match[2].split("."))


def stand_in_model(model_id: str, listed: Iterable[str]) -> str | None:
    """The model to serve ``model_id`` with when the account does not list it: the
    newest listed model of its family (PROTOCOL-2026.md 10.17.1); None when the
    account lists it, or has no model of its family (then Kiro has the last word)."""
    listed = set(listed)
    family = model_family(model_id)
    if model_id in listed or family is None:
        return None
    same = [(version, other) for other in listed
            if (found := model_family(other)) and found[0] == family[0]
            for version in (found[1],)]
    return max(same)[1] if same else None


def context_window(model_id: str, client_model: str = "") -> int:
    if client_model.endswith("[1m]"):
        return 1_000_000
    return _CONTEXT_WINDOWS.get(model_id, DEFAULT_CONTEXT_WINDOW)


# Requests: Anthropic Messages -> CodeWhisperer ############################

ORIGIN = "AI_EDITOR"
# The upstream rejects empty message content; these short texts stand in.
# They are what the model sees, so they are plain and neutral.
EMPTY_USER_TEXT = "Continue"
# After an assistant message at the end (a prefill, such as "{" to get JSON):
# the upstream cannot continue a message, so the model is asked to, in words.
PREFILL_USER_TEXT = ("Continue your last message from exactly where it ends, "
                     "without repeating any of it.")
TOOL_RESULTS_TEXT = "Tool results provided."
TOOL_LOADED_TEXT = "Tool {name} loaded: call it directly."
# Claude Code offers this tool only to keep its deferred loading on; it is never called.
DEFERRED_TOOL_PLACEHOLDER = "DeferredToolPlaceholder"
EMPTY_ASSISTANT_TEXT = " "
EMPTY_TOOL_RESULT_TEXT = "(empty result)"
# Upstream limits (PROTOCOL.md 3.4): tool names up to 64 characters, and
# descriptions that peers cap at 10,000 characters.
MAX_TOOL_NAME = 64
MAX_TOOL_DESCRIPTION = 10_000
# A longer description (Claude Code's reach 19 KB) goes whole into the system
# prompt under this heading, and the tool's spec says where to find it.
TOOL_MANUAL_HEADING = "## Tool: "
TOOL_MANUAL_REFERENCE = ('The full description of the tool {name} is in the system prompt, '
                         'under "## Tool: {name}".')
# Anthropic's own per-image limit; the upstream's is not documented.
MAX_IMAGE_BYTES = 5 * 1024 * 1024
# Emulated thinking (PROTOCOL.md 3.4, 5.6): these tags at the head of the
# system prompt make the model open its answer with <thinking>...</thinking>.
THINKING_BUDGET_DEFAULT = 20_000
THINKING_BUDGET_RANGE = (1_024, 24_576)
IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/gif": "gif",
                 "image/webp": "webp"}
# How each format's data begins, to tell an image sent under another format's
# name (which Anthropic refuses, and Kiro would misread).
IMAGE_SIGNATURES = (("png", b"\x89PNG\r\n\x1a\n"), ("jpeg", b"\xff\xd8\xff"),
                    ("gif", b"GIF87a"), ("gif", b"GIF89a"))


@dataclass
class Prepared:
    """What ``anthropic_to_codewhisperer`` returns besides the payload itself."""

    payload: Json
    model_id: str
    tool_names: dict[str, str] = field(default_factory=dict)  # sent name -> client name
    thinking: bool = False  # thinking tags were injected; parse them back out
    stop_sequences: tuple[str, ...] = ()
    web_search: WebSearch | None = None  # the hosted search tool kiro2api runs, if offered


def without_reasoning(prepared: Prepared) -> Prepared | None:
    """``prepared`` with no ``reasoningContent`` left in its history, for Kiro's
    THINKING_SIGNATURE_INVALID (a signature from another model, or altered): what
    kiro-cli does is send the conversation once more without any (PROTOCOL-2026.md
    10.12.2). None when there was none to leave out."""
    state = prepared.payload["conversationState"]
    history = state.get("history") or []
    if not any("reasoningContent" in item.get("assistantResponseMessage", {})
               for item in history):
        return None
    stripped = [{"assistantResponseMessage": {
                    k: v for k, v in item["assistantResponseMessage"].items()
                    if k != "reasoningContent"}}
                if "assistantResponseMessage" in item else item for item in history]
    payload = {**prepared.payload, "conversationState": {**state, "history": stripped}}
    return dataclasses.replace(prepared, payload=payload)


@dataclass
class _Turn:
    role: str
    text: list[str] = field(default_factory=list)
    images: list[Json] = field(default_factory=list)
    tool_uses: list[Json] = field(default_factory=list)
    tool_results: list[Json] = field(default_factory=list)
    reasoning: Json | None = None  # a native model's signed thinking, replayed nested


def _expect(condition: bool, message: str, param: str | None = None) -> None:
    if not condition:
        raise ConversionError(message, param=param)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


# Settings Kiro has no use for still have their types checked, as the real
# APIs check them: "stream": "yes" is a client's bug that it should hear of.
# Their values are not (some clients send max_tokens -1 for "no limit", and
# kiro2api has no limit to apply).
_SHARED_SETTINGS = (("stream", _is_bool, "true or false"),
                    ("max_tokens", _is_whole, "a whole number"),
                    ("temperature", _is_number, "a number"),
                    ("top_p", _is_number, "a number"))
ANTHROPIC_SETTINGS = _SHARED_SETTINGS + (("top_k", _is_whole, "a whole number"),)
OPENAI_SETTINGS = _SHARED_SETTINGS + (("max_completion_tokens", _is_whole, "a whole number"),)


def _expect_settings(body: Json, settings: tuple) -> None:
    for name, valid, what in settings:
        value = body.get(name)
        _expect(value is None or valid(value), f"{name}: expected {what}, got {value!r:.50}",
                name)


def system_text(system: Any) -> str:
    """The ``system`` field (a string or a list of text blocks) as one string."""
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    _expect(isinstance(system, list), "system: expected a string or a list of text blocks",
            "system")
    parts = []
    for i, block in enumerate(system):
        _expect(isinstance(block, dict) and block.get("type") == "text"
                and isinstance(block.get("text"), str),
                f"system.{i}: expected a text block", "system")
        parts.append(block["text"])
    return "\n\n".join(p for p in parts if p)


def _image(block: Json, where: str) -> Json:
    source = block.get("source")
    _expect(isinstance(source, dict), f"{where}: image block needs a source", where)
    if source.get("type") != "base64":
        raise ConversionError(
            f"{where}: image source type {source.get('type')!r} is not supported; "
            "send the image as base64 data", param=where)
    media_type = source.get("media_type")
    if media_type not in IMAGE_FORMATS:
        raise ConversionError(
            f"{where}: image media_type {media_type!r} is not supported "
            f"(use one of {', '.join(sorted(IMAGE_FORMATS))})", param=where)
    data = source.get("data")
    _expect(isinstance(data, str) and data != "", f"{where}: image data is empty", where)
    _check_image_data(data, media_type, where, too_large_status=413)
    return {"format": IMAGE_FORMATS[media_type], "source": {"bytes": data}}


def _check_image_data(data: str, media_type: str, where: str, *,
                      too_large_status: int) -> None:
    """Refuse image data that is too large, not base64, or another format's."""
    if len(data) * 3 // 4 > MAX_IMAGE_BYTES:
        raise ConversionError(
            f"{where}: image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB",
            status=too_large_status, param=where)
    try:
        head = base64.b64decode(data, validate=True)[:12]
    except (binascii.Error, ValueError):
        raise ConversionError(f"{where}: image data is not valid base64", param=where) from None
    actual = next((name for name, signature in IMAGE_SIGNATURES if head.startswith(signature)),
                  "webp" if head[:4] == b"RIFF" and head[8:12] == b"WEBP" else None)
    if actual is not None and actual != IMAGE_FORMATS[media_type]:
        raise ConversionError(f"{where}: the image data is {actual.upper()}, "
                              f"not {media_type}", param=where)


def _tool_result(block: Json, where: str, images: list[Json]) -> Json:
    tool_use_id = block.get("tool_use_id")
    _expect(isinstance(tool_use_id, str) and tool_use_id != "",
            f"{where}: tool_result needs a tool_use_id", where)
    content = block.get("content", "")
    texts: list[str] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            _expect(isinstance(part, dict), f"{where}.content.{j}: expected an object", where)
            kind = part.get("type")
            if kind == "text":
                _expect(isinstance(part.get("text"), str),
                        f"{where}.content.{j}: text must be a string", where)
                texts.append(part["text"])
            elif kind == "image":
                images.append(_image(part, f"{where}.content.{j}"))
            elif kind == "tool_reference":
                texts.append(_tool_reference(part, f"{where}.content.{j}"))
            else:
                raise ConversionError(
                    f"{where}.content.{j}: unsupported block type {kind!r} in tool_result",
                    param=where)
    else:
        raise ConversionError(f"{where}: tool_result content must be a string or a list",
                              param=where)
    items = [{"text": t} for t in texts if t] or [{"text": EMPTY_TOOL_RESULT_TEXT}]
    return {
        "toolUseId": tool_use_id,
        "content": items,
        "status": "error" if block.get("is_error") else "success",
    }


def _tool_reference(block: Json, where: str) -> str:
    """Claude Code's tool search loads a deferred tool with a ``tool_reference``
    (PROTOCOL-2026.md 10.17.3). Kiro has no deferred tools, every tool is offered
    in full, so the reference becomes what the model needs to hear: the tool is there."""
    name = block.get("tool_name")
    _expect(isinstance(name, str) and name != "", f"{where}.tool_name: expected a tool's name",
            where)
    return TOOL_LOADED_TEXT.format(name=name)


def _turn(message: Any, index: int, native: bool = False) -> _Turn:
    where = f"messages.{index}"
    _expect(isinstance(message, dict), f"{where}: expected an object", where)
    role = message.get("role")
    _expect(role in ("user", "assistant", "system"),
            f"{where}.role: expected 'user' or 'assistant', got {role!r}", where)
    turn = _Turn(role)
    content = message.get("content")
    if isinstance(content, str):
        turn.text.append(content)
        return turn
    _expect(isinstance(content, list),
            f"{where}.content: expected a string or a list of content blocks", where)
    for j, block in enumerate(content):
        here = f"{where}.content.{j}"
        _expect(isinstance(block, dict), f"{here}: expected an object", here)
        kind = block.get("type")
        if kind == "text":
            _expect(isinstance(block.get("text"), str), f"{here}.text: expected a string", here)
            turn.text.append(block["text"])
        elif kind == "image" and role == "user":
            turn.images.append(_image(block, here))
        elif kind == "tool_use" and role == "assistant":
            _expect(isinstance(block.get("id"), str) and isinstance(block.get("name"), str),
                    f"{here}: tool_use needs an id and a name", here)
            tool_input = block.get("input", {})
            _expect(isinstance(tool_input, dict), f"{here}.input: expected an object", here)
            turn.tool_uses.append(
                {"toolUseId": block["id"], "name": block["name"], "input": tool_input})
        elif kind == "tool_result" and role == "user":
            turn.tool_results.append(_tool_result(block, here, turn.images))
        elif kind == "thinking" and role == "assistant":
            _thinking_block(turn, block, native)
        elif kind in ("server_tool_use", "web_search_tool_result") and role == "assistant":
            turn.text.append(_past_search(block))  # searches kiro2api ran: what they said
        elif kind == "redacted_thinking" and role == "assistant":
            if native and isinstance(block.get("data"), str) and block["data"]:
                turn.reasoning = {"redactedContent": block["data"]}
        else:
            raise ConversionError(
                f"{here}: content block type {kind!r} is not supported in a {role} message",
                param=here)
    return turn


def _past_search(block: Json) -> str:
    """A search of an earlier answer (its call, or its results), as text for the model."""
    if block["type"] == "server_tool_use":
        query = block.get("input", {}).get("query") if isinstance(block.get("input"), dict) \
            else None
        return f"(I searched the web for: {query})" if query else ""
    content = block.get("content")
    if not isinstance(content, list):
        return "(The web search failed.)"
    found = [f"{r.get('title')} <{r.get('url')}>" for r in content if isinstance(r, dict)]
    return "(Search results: " + "; ".join(found) + ")" if found else "(Nothing was found.)"


def _thinking_block(turn: _Turn, block: Json, native: bool) -> None:
    """Earlier thinking, as the model that wrote it reads it back: a native model's
    signed block nested in ``reasoningContent`` (the last one counts; unsigned ones
    are dropped, PROTOCOL-2026.md 10.12.2), emulated thinking as its tags, in place."""
    thinking = block.get("thinking")
    if not isinstance(thinking, str):
        return
    if native:
        signature = block.get("signature")
        if isinstance(signature, str) and signature:
            turn.reasoning = {"reasoningText": {"text": thinking, "signature": signature}}
    elif thinking:
        # In place: with interleaved thinking the blocks alternate with text and
        # tool calls, and their order is the story.
        turn.text.append(f"<thinking>{thinking}</thinking>")


def _merge(turns: list[_Turn]) -> list[_Turn]:
    """Join runs of same-role turns: the upstream needs strict alternation."""
    merged: list[_Turn] = []
    for turn in turns:
        if merged and merged[-1].role == turn.role:
            last = merged[-1]
            last.text += turn.text
            last.images += turn.images
            last.tool_uses += turn.tool_uses
            last.tool_results += turn.tool_results
        else:
            merged.append(turn)
    return merged


def _pair_tools(turns: list[_Turn]) -> None:
    """Keep tool uses and results paired turn by turn; the upstream rejects orphans.

    A result whose call is not in the assistant turn just before it becomes
    plain text in its own turn; a call with no result in the next user turn is
    dropped from ``toolUses`` and described in the assistant's text instead.
    """
    for i, turn in enumerate(turns):
        if turn.role != "user" or not turn.tool_results:
            continue
        previous = turns[i - 1] if i else None
        offered = {u["toolUseId"] for u in previous.tool_uses} if previous else set()
        turn.tool_results, orphans = _split_paired(turn.tool_results, offered)
        for result in orphans:
            body = "\n".join(item["text"] for item in result["content"])
            turn.text.insert(0, f"[Tool result for {result['toolUseId']}]\n{body}")
    for i, turn in enumerate(turns):
        if turn.role != "assistant" or not turn.tool_uses:
            continue
        following = turns[i + 1] if i + 1 < len(turns) else None
        answered = {r["toolUseId"] for r in following.tool_results} if following else set()
        turn.tool_uses, orphans = _split_paired(turn.tool_uses, answered)
        for use in orphans:
            turn.text.append(f"[Called {use['name']} with input {json.dumps(use['input'])}]")


def _split_paired(items: list[Json], partners: set[str]) -> tuple[list[Json], list[Json]]:
    """``items`` (tool uses or results) whose ``toolUseId`` is in ``partners``, and
    those whose id is not. Only the first of an id is kept: the upstream refuses a
    repeated one (TOOL_DUPLICATE), so later ones are dropped, not made orphans."""
    kept: list[Json] = []
    orphans: list[Json] = []
    seen: set[str] = set()
    for item in items:
        key = item["toolUseId"]
        if key in seen:
            continue
        if key in partners:
            seen.add(key)
            kept.append(item)
        else:
            orphans.append(item)
    return kept, orphans


def _tool_name(name: str) -> str:
    """Names over the upstream's limit: a prefix plus a hash, stable across calls."""
    if len(name) <= MAX_TOOL_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_TOOL_NAME - 9]}_{digest}"


# JSON Schema keywords whose object maps names (not keywords) to subschemas,
# and those whose values are data: neither has its keys cleaned.
_SCHEMA_NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions",
                               "dependentSchemas"})
_SCHEMA_DATA = frozenset({"const", "enum", "default", "examples"})


def _strip_schema(schema: Any) -> Any:
    """``schema`` less ``$schema``, empty ``required`` and null name maps, at every level.

    The upstream rejects those (TOOL_SCHEMA_INVALID); every constraint the
    model needs (``anyOf``, ``const``, ``pattern``, ``format``, bounds,
    ``additionalProperties``...) is kept as the client wrote it.
    """
    if isinstance(schema, list):
        return [_strip_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$schema" or (key == "required" and value == []):
            continue
        if key in _SCHEMA_DATA:
            out[key] = value
        elif key in _SCHEMA_NAME_MAPS:
            if isinstance(value, dict):  # null or worse is no schema at all
                out[key] = {name: _strip_schema(sub) for name, sub in value.items()}
        else:
            out[key] = _strip_schema(value)
    return out


def _clean_schema(schema: Any, where: str) -> Json:
    """An ``input_schema`` the upstream accepts: an object schema with ``properties``."""
    try:
        cleaned = _strip_schema(schema) if isinstance(schema, dict) else {}
    except RecursionError:
        raise ConversionError(f"{where}.input_schema: nested too deeply", param=where) from None
    cleaned.setdefault("type", "object")
    if cleaned["type"] == "object" and not isinstance(cleaned.get("properties"), dict):
        cleaned["properties"] = {}
    return cleaned


def _tool_specs(tools: Any, names: dict[str, str], manuals: list[str]) -> list[Json]:
    """The client's tools as ``toolSpecification``s; ``names`` maps sent names back.

    Descriptions over the upstream's limit go whole into ``manuals`` (for the
    system prompt) and the spec points there, so the model loses none of it.
    """
    if tools is None:
        return []
    _expect(isinstance(tools, list), "tools: expected a list", "tools")
    specs: list[Json] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        _expect(isinstance(tool, dict), f"tools.{i}: expected an object", "tools")
        name = tool.get("name")
        _expect(isinstance(name, str) and name != "", f"tools.{i}: a tool needs a name", "tools")
        if "input_schema" not in tool and tool.get("type") not in (None, "custom"):
            continue  # a server tool (web_search_..., bash_...): not ours to forward
        if name == DEFERRED_TOOL_PLACEHOLDER and tool.get("defer_loading"):
            continue
        sent = _tool_name(name)
        if sent in seen:
            continue  # the upstream refuses duplicate names; the first one wins
        seen.add(sent)
        names[sent] = name
        description = tool.get("description")
        if not isinstance(description, str):
            description = "" if description is None else str(description)
        if not description.strip():  # the upstream needs a description
            description = f"Tool: {sent}"
        elif len(description) > MAX_TOOL_DESCRIPTION:
            manuals.append(f"{TOOL_MANUAL_HEADING}{sent}\n\n{description}")
            description = TOOL_MANUAL_REFERENCE.format(name=sent)
        specs.append({"toolSpecification": {
            "name": sent,
            "description": description,
            "inputSchema": {"json": _clean_schema(tool.get("input_schema"), f"tools.{i}")},
        }})
    return specs


def _user_message(turn: _Turn, model_id: str) -> Json:
    content = "\n\n".join(t for t in turn.text if t)
    if not content.strip():
        content = TOOL_RESULTS_TEXT if turn.tool_results else EMPTY_USER_TEXT
    message: Json = {"content": content, "modelId": model_id, "origin": ORIGIN}
    if turn.images:
        message["images"] = turn.images
    if turn.tool_results:
        message["userInputMessageContext"] = {"toolResults": turn.tool_results}
    return message


def _assistant_message(turn: _Turn) -> Json:
    content = "\n\n".join(t for t in turn.text if t)
    message: Json = {"content": content if content.strip() else EMPTY_ASSISTANT_TEXT}
    if turn.tool_uses:
        message["toolUses"] = turn.tool_uses
    if turn.reasoning is not None:
        message["reasoningContent"] = turn.reasoning
    return message


def turn_effort(body: Json) -> Any:
    """The effort asked for: a system message's ``output_config`` holds from that message
    on (Claude Code's per-turn control, PROTOCOL-2026.md 10.17.5), the last one
    outranking the top-level ``output_config``."""
    for message in reversed(body.get("messages") or ()):
        if isinstance(message, dict) and message.get("role") == "system" and \
                isinstance(message.get("output_config"), dict) and \
                "effort" in message["output_config"]:
            return message["output_config"]["effort"]
    config = body.get("output_config")
    return config.get("effort") if isinstance(config, dict) else None


# Native reasoning (PROTOCOL-2026.md 10.10, 10.11). Models that reason natively
# are asked in ``additionalModelRequestFields`` with only the fields their
# schema lists; the others (4.5 and older, most non-Claude models) get the tag
# emulation below. Never both: tags make the new models refuse.


class NativeReasoning(NamedTuple):
    kind: str  # "claude" (thinking, output_config) or "gpt" (reasoning)
    thinking: bool  # the schema lists ``thinking`` (else ``output_config`` alone)
    efforts: tuple[str, ...]  # the efforts it takes


_UP_TO_HIGH = ("low", "medium", "high")
_UP_TO_XHIGH = ("low", "medium", "high", "xhigh")
_UP_TO_MAX = ("low", "medium", "high", "xhigh", "max")
NATIVE_REASONING = {
    "claude-sonnet-4.6": NativeReasoning("claude", True, _UP_TO_HIGH),
    "claude-opus-4.6": NativeReasoning("claude", True, _UP_TO_HIGH),  # adaptive only
    "claude-opus-4.7": NativeReasoning("claude", False, _UP_TO_XHIGH),
    "claude-opus-4.8": NativeReasoning("claude", False, _UP_TO_XHIGH),
    "claude-sonnet-5": NativeReasoning("claude", True, _UP_TO_XHIGH),
    "claude-fable-5": NativeReasoning("claude", False, _UP_TO_XHIGH),
    "claude-opus-5": NativeReasoning("claude", True, _UP_TO_MAX),
    "claude-sonnet-5.5": NativeReasoning("claude", True, _UP_TO_MAX),
}
# Newer Claude releases than the table knows reason as the newest it knows do.
NEWEST_CLAUDE = NativeReasoning("claude", True, _UP_TO_MAX)
GPT_REASONING = NativeReasoning("gpt", False, ("none", "low", "medium", "high", "xhigh", "max"))
EFFORT_LADDER = ("max", "xhigh", "high", "medium", "low")


def native_reasoning(model_id: str) -> NativeReasoning | None:
    """How ``model_id`` is asked for its reasoning; None: the tag emulation."""
    if model_id in NATIVE_REASONING:
        return NATIVE_REASONING[model_id]
    if model_id.startswith("gpt-5"):
        return GPT_REASONING
    family = model_family(model_id)
    if family is not None and family[1] >= (5, 1):
        return NEWEST_CLAUDE
    return None


def reasoning_fields(native: NativeReasoning, body: Json) -> Json | None:
    """The ``additionalModelRequestFields`` that ask ``native`` for what ``body`` asks
    (thinking ``enabled`` or ``adaptive``, its effort and display); None if nothing."""
    thinking = body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive"):
        return None
    effort = turn_effort(body)
    effort = "low" if effort == "minimal" else effort if isinstance(effort, str) else "high"
    if effort not in native.efforts:  # a step down, never a refusal
        below = EFFORT_LADDER[EFFORT_LADDER.index(effort) + 1:] if effort in EFFORT_LADDER \
            else EFFORT_LADDER
        effort = next((e for e in below if e in native.efforts), native.efforts[-1])
    if native.kind == "gpt":
        return {"reasoning": {"effort": effort}}
    fields: Json = {}
    if native.thinking:
        display = "omitted" if thinking.get("display") == "omitted" else "summarized"
        fields["thinking"] = {"type": "adaptive", "display": display}
    fields["output_config"] = {"effort": effort}
    return fields


def thinking_prefix(body: Json) -> str:
    """The tags that ask for emulated thinking, or "" when it was not requested."""
    thinking = body.get("thinking")
    if not isinstance(thinking, dict):
        return ""
    kind = thinking.get("type")
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if not _is_whole(budget):
            budget = THINKING_BUDGET_DEFAULT
        low, high = THINKING_BUDGET_RANGE
        budget = min(max(budget, low), high)
        return (f"<thinking_mode>enabled</thinking_mode>"
                f"<max_thinking_length>{budget}</max_thinking_length>")
    if kind == "adaptive":
        effort = turn_effort(body)
        if effort not in ("low", "medium", "high", "xhigh", "max"):
            effort = "high"
        return (f"<thinking_mode>adaptive</thinking_mode>"
                f"<thinking_effort>{effort}</thinking_effort>")
    return ""


def _stop_sequences(body: Json) -> tuple[str, ...]:
    value = body.get("stop_sequences")
    if value is None:
        return ()
    _expect(isinstance(value, list) and all(isinstance(v, str) for v in value),
            "stop_sequences: expected a list of strings", "stop_sequences")
    return tuple(v for v in value if v)


def _offered_tools(body: Json, tool_names: dict[str, str],
                   manuals: list[str]) -> list[Json]:
    """The tool specs the model is offered now (their long manuals go to ``manuals``)."""
    tools = _tool_specs(body.get("tools"), tool_names, manuals)
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "none":
        # The upstream has no tool_choice: not offering the tools is how to
        # keep the model from calling them (history still gets its specs below).
        tools.clear()
        manuals.clear()
    return tools


def _conversation(messages: list[Any], system_parts: list[str],
                  native: bool = False) -> list[_Turn]:
    """The messages as turns in strict user/assistant alternation, starting and ending
    with a user turn, the system prompt (``system_parts``, joined) in front."""
    turns: list[_Turn] = []
    for i, message in enumerate(messages):
        turn = _turn(message, i, native)
        if turn.role == "system":  # mid-conversation system text joins the prompt
            system_parts.append("\n\n".join(turn.text))
        else:
            turns.append(turn)
    _expect(bool(turns), "messages: at least one user or assistant message is required",
            "messages")
    turns = _merge(turns)
    if turns[0].role == "assistant":
        turns.insert(0, _Turn("user", [EMPTY_USER_TEXT]))
    if turns[-1].role == "assistant":  # prefill: the upstream cannot continue it
        turns.append(_Turn("user", [PREFILL_USER_TEXT]))
    for turn in turns:  # names in history must match the shortened specs
        for use in turn.tool_uses:
            use["name"] = _tool_name(use["name"])
    _pair_tools(turns)
    system = "\n\n".join(p for p in system_parts if p)
    if system:
        turns[0].text.insert(0, system)
    return turns


def _history(turns: list[_Turn], model_id: str) -> list[Json]:
    return [{"userInputMessage": _user_message(turn, model_id)} if turn.role == "user"
            else {"assistantResponseMessage": _assistant_message(turn)} for turn in turns]


def _add_history_specs(tools: list[Json], turns: list[_Turn]) -> None:
    """Tools named in history but not offered now still need a spec, or the upstream
    rejects the request: a bare one is added for each."""
    offered = {spec["toolSpecification"]["name"] for spec in tools}
    for turn in turns:
        for use in turn.tool_uses:
            if use["name"] not in offered:
                offered.add(use["name"])
                tools.append({"toolSpecification": {
                    "name": use["name"],
                    "description": f"Tool: {use['name']}",
                    "inputSchema": {"json": {"type": "object", "properties": {}}},
                }})


# Web search (PROTOCOL-2026.md 10.14) ######################################
#
# Claude Code offers Anthropic's hosted search tool (``web_search_20250305``
# and later dated types), Codex the Responses API's ``web_search``. Kiro has
# no hosted tools, so the model is offered an ordinary tool of that name; when
# it calls it, kiro2api runs the search on Kiro's MCP endpoint and asks the
# model again with the results, within the same client request.

SEARCH_TOOL = "web_search"
SEARCH_SPEC = {"toolSpecification": {
    "name": SEARCH_TOOL,
    "description": "Search the web for current information. Returns the title, URL, date and "
                   "an excerpt of each page found. Cite the URLs you use in your answer.",
    "inputSchema": {"json": {"type": "object", "properties": {
        "query": {"type": "string", "description": "What to search for."}},
        "required": ["query"]}}}}
_SEARCH_TYPE = re.compile(r"^web_search_\d{8}$")
# Search rounds one request may take (each is a Kiro call and a search).
SEARCH_ROUNDS = 5


@dataclass(frozen=True)
class WebSearch:
    """The hosted search tool a request offers, and its limits."""

    max_uses: int | None = None
    allowed_domains: tuple[str, ...] = ()
    blocked_domains: tuple[str, ...] = ()


def _domains(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    _expect(isinstance(value, list) and all(isinstance(d, str) and d for d in value),
            f"{where}: expected a list of domains", where)
    return tuple(d.strip().lower() for d in value)


def web_search_tool(body: Json) -> WebSearch | None:
    """The request's hosted search tool, if it offers one (and no tool of its own by
    that name, which would be the client's to run)."""
    tools = body.get("tools") if isinstance(body.get("tools"), list) else ()
    if any(isinstance(t, dict) and t.get("name") == SEARCH_TOOL and "input_schema" in t
           for t in tools):
        return None
    for i, tool in enumerate(tools):
        if isinstance(tool, dict) and _SEARCH_TYPE.match(str(tool.get("type", ""))):
            max_uses = tool.get("max_uses")
            _expect(max_uses is None or (_is_whole(max_uses) and max_uses > 0),
                    f"tools.{i}.max_uses: expected a positive whole number", "tools")
            return WebSearch(max_uses, _domains(tool.get("allowed_domains"), f"tools.{i}"),
                             _domains(tool.get("blocked_domains"), f"tools.{i}"))
    return None


def _choice_is_none(body: Json) -> bool:
    choice = body.get("tool_choice")
    return isinstance(choice, dict) and choice.get("type") == "none"


def search_query(query: str, search: WebSearch) -> str:
    """The query Kiro's search runs: the domain filters as ``site:`` operators."""
    if search.allowed_domains:
        query += " (" + " OR ".join(f"site:{d}" for d in search.allowed_domains) + ")"
    return query + "".join(f" -site:{d}" for d in search.blocked_domains)


def _domain_of(url: str) -> str:
    host = url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()
    return host.removeprefix("www.")


def _within(domain: str, domains: tuple[str, ...]) -> bool:
    return any(domain == d or domain.endswith("." + d) for d in domains)


def mcp_search_request(query: str, request_id: str) -> Json:
    """Kiro's MCP ``tools/call`` of its ``web_search``."""
    return {"id": request_id, "jsonrpc": "2.0", "method": "tools/call",
            "params": {"name": "web_search", "arguments": {"query": query}}}


def mcp_search_results(answer: Any, search: WebSearch) -> tuple[Json, ...] | None:
    """The results of an MCP search answer, filtered by the tool's domains; None for a
    failed search (an error, ``isError``, no ``results`` list)."""
    result = answer.get("result") if isinstance(answer, dict) else None
    if not isinstance(result, dict) or result.get("isError") or answer.get("error"):
        return None
    texts = [c.get("text") for c in result.get("content") or ()
             if isinstance(c, dict) and isinstance(c.get("text"), str)]
    try:
        inner = json.loads(texts[0]) if texts else None
    except (ValueError, RecursionError):
        inner = None
    if not isinstance(inner, dict) or not isinstance(inner.get("results"), list):
        return None
    found = []
    for item in inner["results"]:
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            continue
        domain = _domain_of(item["url"])
        if (search.allowed_domains and not _within(domain, search.allowed_domains)) or \
                _within(domain, search.blocked_domains):
            continue
        found.append({"title": str(item.get("title") or item["url"]), "url": item["url"],
                      "snippet": str(item.get("snippet") or ""),
                      "published": item.get("publishedDate")})
    return tuple(found)


def page_age(published: Any) -> str | None:
    """A result's ``publishedDate`` (milliseconds) as Anthropic's page_age, "June 3, 2026"."""
    if not _is_number(published):
        return None
    try:
        day = datetime.fromtimestamp(published / 1000, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return f"{day:%B} {day.day}, {day.year}"


def search_result_text(result: SearchResult) -> str:
    """A search's outcome as the model reads it in the tool result."""
    if result.error is not None:
        return f"The web search failed: {result.error}."
    if not result.results:
        return "The web search found nothing."
    return json.dumps([{"title": r["title"], "url": r["url"], "date": page_age(r["published"]),
                        "excerpt": r["snippet"]} for r in result.results], ensure_ascii=False)


def search_continuation(body: Json, texts: list[str], calls: list[SearchCall],
                        results: list[SearchResult]) -> Json:
    """``body`` asked again with this round's answer and its searches' results: the
    model goes on from where it asked."""
    said = [{"type": "text", "text": t} for t in ["".join(texts)] if t.strip()]
    uses = [{"type": "tool_use", "id": c.id, "name": SEARCH_TOOL, "input": {"query": c.query}}
            for c in calls]
    answers = [{"type": "tool_result", "tool_use_id": r.tool_use_id,
                "content": search_result_text(r)} for r in results]
    return {**body, "messages": [*body["messages"], {"role": "assistant", "content": said + uses},
                                 {"role": "user", "content": answers}]}


def anthropic_to_codewhisperer(body: Any, *, conversation_id: str) -> Prepared:
    """Anthropic Messages request -> CodeWhisperer ``generateAssistantResponse`` body.

    The last user turn becomes ``currentMessage``; everything before it is
    ``history``, merged into strict user/assistant alternation. The system
    prompt goes in front of the first user turn. Fields the upstream has no
    place for (temperature, top_p, metadata, tool_choice...) are accepted and
    left out, except that ``tool_choice`` ``none`` offers the model no tools;
    ``stop_sequences`` and ``thinking`` are returned in ``Prepared`` for the
    answer's ``Assembler`` to apply. The account's profile ARN is not known
    here: ``Prepared.body`` adds it.
    """
    _expect(isinstance(body, dict), "request body must be a JSON object")
    model = body.get("model")
    _expect(isinstance(model, str) and model != "", "model: a model name is required", "model")
    messages = body.get("messages")
    _expect(isinstance(messages, list), "messages: a list of messages is required", "messages")
    _expect(len(messages) > 0, "messages: at least one message is required", "messages")
    _expect_settings(body, ANTHROPIC_SETTINGS)
    model_id = resolve_model(model)
    tool_names: dict[str, str] = {}
    manuals: list[str] = []
    tools = _offered_tools(body, tool_names, manuals)
    search = web_search_tool(body)
    if search is not None and tools is not None and not _choice_is_none(body):
        tools.append(SEARCH_SPEC)
    else:
        search = None
    native = native_reasoning(model_id)
    fields = reasoning_fields(native, body) if native is not None else None
    prefix = "" if native is not None else thinking_prefix(body)
    stop_sequences = _stop_sequences(body)
    turns = _conversation(messages, [prefix, system_text(body.get("system")), *manuals],
                          native is not None)
    history = _history(turns[:-1], model_id)
    _add_history_specs(tools, turns)

    current = _user_message(turns[-1], model_id)
    if tools:
        current.setdefault("userInputMessageContext", {})["tools"] = tools
    state: Json = {
        "chatTriggerType": "MANUAL",
        "agentTaskType": "vibe",
        "conversationId": conversation_id,
        "currentMessage": {"userInputMessage": current},
    }
    if history:
        state["history"] = history
    payload: Json = {"conversationState": state}
    if fields:
        payload["additionalModelRequestFields"] = fields
    return Prepared(payload, model_id, tool_names, bool(prefix), stop_sequences, search)


# Sessions: one conversationId per client session ##########################
#
# Kiro caches a prompt's prefix by conversationId (PROTOCOL-2026.md 10.13):
# a session that keeps one id pays the cold rate once. The id comes from the
# first session key the request carries, hashed with the client's key (so
# that two clients never share one); a request with none gets a random id.

# Headers that name a client session, in the order they are believed.
SESSION_HEADERS = ("x-claude-code-session-id", "session-id", "x-session-affinity", "session_id")
_LEGACY_SESSION = re.compile(r"_session_([0-9A-Za-z-]+)$")


def session_key(body: Json, normalised: Json, headers: Mapping[str, str]) -> str | None:
    """The client session a request belongs to, if it says: Claude Code's session id
    (header, or ``metadata.user_id``), ``prompt_cache_key`` (Codex, OpenAI), a
    session header."""
    claude_code = headers.get(SESSION_HEADERS[0])
    if claude_code:
        return claude_code
    metadata = normalised.get("metadata") if isinstance(normalised, dict) else None
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if isinstance(user_id, str):
        try:
            parsed = json.loads(user_id) if user_id.startswith("{") else None
        except (ValueError, RecursionError):
            parsed = None
        session = parsed.get("session_id") if isinstance(parsed, dict) else None
        legacy = _LEGACY_SESSION.search(user_id)
        if isinstance(session, str) and session or legacy:
            return session or legacy[1]
    cache_key = body.get("prompt_cache_key") if isinstance(body, dict) else None
    if isinstance(cache_key, str) and cache_key:
        return cache_key
    return next((headers[name] for name in SESSION_HEADERS[1:] if headers.get(name)), None)


def session_conversation_id(scope: str, key: str) -> str:
    """A UUID-shaped conversationId for session ``key`` of the client ``scope``."""
    digest = hashlib.sha256(f"kiro2api\0{scope}\0{key}".encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


# Requests: OpenAI Chat Completions -> Anthropic ###########################
#
# OpenAI bodies become Anthropic Messages bodies, so there is one
# CodeWhisperer builder. Every check that could fail on the result is made
# here first, with the OpenAI path in ``param`` (``messages[3].content[0]``),
# because the builder's own messages would count Anthropic messages instead.
# Fields with an Anthropic counterpart are carried over (the builder drops
# what the upstream has no place for); the rest are accepted and dropped.

IMAGE_MEDIA_ALIASES = {"image/jpg": "image/jpeg"}
# reasoning_effort values that ask for thinking ("minimal" and "none" do not);
# they become Anthropic adaptive thinking with the same effort.
REASONING_EFFORTS = ("low", "medium", "high", "xhigh")


def _openai_texts(content: Any, where: str) -> list[str]:
    """A string, or a list of text parts (system, developer and tool messages)."""
    if isinstance(content, str):
        return [content]
    _expect(isinstance(content, list), f"{where}: expected a string or a list of text parts",
            where)
    texts = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        _expect(isinstance(part, dict) and part.get("type") == "text"
                and isinstance(part.get("text"), str), f"{here}: expected a text part", here)
        texts.append(part["text"])
    return texts


def _openai_image(part: Json, where: str) -> Json:
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    where = f"{where}.image_url.url"
    _expect(isinstance(url, str) and url != "", f"{where}: expected a URL", where)
    if not url.startswith("data:"):
        raise ConversionError(
            f"{where}: remote image URLs are not supported (Kiro cannot fetch them); "
            "send the image inline as a data:image/png;base64,... URL", param=where)
    header, comma, data = url[len("data:"):].partition(",")
    media_type, *options = header.split(";")
    media_type = media_type.strip().lower()
    media_type = IMAGE_MEDIA_ALIASES.get(media_type, media_type)
    _expect(comma == "," and "base64" in options,
            f"{where}: the image data URL must be base64-encoded (data:<type>;base64,<data>)",
            where)
    _expect(media_type in IMAGE_FORMATS, f"{where}: image type {media_type!r} is not "
            f"supported (use one of {', '.join(sorted(IMAGE_FORMATS))})", where)
    _expect(data != "", f"{where}: the image data is empty", where)
    _check_image_data(data, media_type, where, too_large_status=400)  # OpenAI's status
    return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                        "data": data}}


def _openai_user_content(content: Any, where: str) -> str | list[Json]:
    if isinstance(content, str):
        return content
    _expect(isinstance(content, list), f"{where}: expected a string or a list of content parts",
            where)
    blocks: list[Json] = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        _expect(isinstance(part, dict), f"{here}: expected an object", here)
        kind = part.get("type")
        if kind == "text":
            _expect(isinstance(part.get("text"), str), f"{here}.text: expected a string", here)
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_openai_image(part, here))
        else:
            raise ConversionError(f"{here}: content part type {kind!r} is not supported "
                                  "(use text or image_url)", param=here)
    return blocks


def _openai_assistant_content(message: Json, where: str) -> list[Json]:
    content = message.get("content")
    blocks: list[Json] = []
    if isinstance(content, str):
        blocks.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for j, part in enumerate(content):
            here = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            _expect(kind in ("text", "refusal") and isinstance(part.get(kind), str),
                    f"{here}: expected a text or refusal part", here)
            blocks.append({"type": "text", "text": part[kind]})
    else:
        _expect(content is None, f"{where}.content: expected a string, a list of parts or "
                "null", f"{where}.content")
    tool_calls = message.get("tool_calls") or []
    _expect(isinstance(tool_calls, list), f"{where}.tool_calls: expected a list",
            f"{where}.tool_calls")
    for k, call in enumerate(tool_calls):
        here = f"{where}.tool_calls[{k}]"
        function = call.get("function") if isinstance(call, dict) else None
        _expect(isinstance(function, dict) and call.get("type", "function") == "function",
                f"{here}: expected a function tool call", here)
        call_id, name = call.get("id"), function.get("name")
        _expect(isinstance(call_id, str) and call_id != "", f"{here}.id: expected a string",
                f"{here}.id")
        _expect(isinstance(name, str) and name != "", f"{here}.function.name: expected a "
                "string", f"{here}.function.name")
        blocks.append({"type": "tool_use", "id": call_id, "name": name,
                       "input": _openai_arguments(function.get("arguments"), here, call_id,
                                                  name)})
    return blocks


def _openai_arguments(arguments: Any, where: str, call_id: str, name: str) -> Json:
    where = f"{where}.function.arguments"
    if isinstance(arguments, dict):  # not the spec, but some clients send the object
        return arguments
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    _expect(isinstance(arguments, str), f"{where}: expected a JSON string", where)
    try:
        parsed = json.loads(arguments)
    except (ValueError, RecursionError) as exc:
        raise ConversionError(f"{where}: the arguments of tool call {call_id!r} ({name}) are "
                              f"not valid JSON: {exc}", param=where) from None
    _expect(isinstance(parsed, dict), f"{where}: the arguments of tool call {call_id!r} "
            f"({name}) must be a JSON object", where)
    return parsed


def _openai_tools(tools: Any) -> list[Json]:
    if tools is None:
        return []
    _expect(isinstance(tools, list), "tools: expected a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        _expect(isinstance(tool, dict), f"{where}: expected an object", where)
        _expect(tool.get("type", "function") == "function",
                f"{where}: only function tools are supported, not {tool.get('type')!r}", where)
        function = tool.get("function")
        _expect(isinstance(function, dict), f"{where}.function: expected an object",
                f"{where}.function")
        name = function.get("name")
        _expect(isinstance(name, str) and name != "", f"{where}.function.name: a function "
                "needs a name", f"{where}.function.name")
        parameters = function.get("parameters")
        _expect(parameters is None or isinstance(parameters, dict),
                f"{where}.function.parameters: expected a JSON Schema object",
                f"{where}.function.parameters")
        spec: Json = {"name": name, "input_schema": parameters or {"type": "object"}}
        if function.get("description"):
            spec["description"] = function["description"]
        out.append(spec)
    return out


def _openai_tool_choice(choice: Any, parallel: Any) -> Json | None:
    """``tool_choice`` and ``parallel_tool_calls`` -> Anthropic ``tool_choice``."""
    if choice is None or choice == "auto":
        result = {"type": "auto"} if parallel is False else None
    elif choice == "required":
        result = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        _expect(isinstance(name, str) and name != "",
                "tool_choice.function.name: expected a string", "tool_choice")
        result = {"type": "tool", "name": name}
    elif isinstance(choice, dict):  # allowed_tools, custom: no Anthropic equivalent
        result = {"type": "auto"} if parallel is False else None
    else:
        raise ConversionError("tool_choice: expected 'auto', 'none', 'required' or "
                              '{"type": "function", "function": {"name": ...}}',
                              param="tool_choice")
    if result is not None and parallel is False:
        result["disable_parallel_tool_use"] = True
    return result


def _openai_tool_message(message: Json, where: str) -> Json:
    """A ``tool`` message -> its ``tool_result`` block."""
    call_id = message.get("tool_call_id")
    _expect(isinstance(call_id, str) and call_id != "",
            f"{where}.tool_call_id: expected the id of the tool call answered",
            f"{where}.tool_call_id")
    texts = _openai_texts(message.get("content"), f"{where}.content")
    return {"type": "tool_result", "tool_use_id": call_id,
            "content": [{"type": "text", "text": t} for t in texts]}


def _openai_message(message: Json, where: str) -> Json:
    """A user or assistant message -> its Anthropic message."""
    role = message.get("role")
    if role == "user":
        return {"role": "user",
                "content": _openai_user_content(message.get("content"), f"{where}.content")}
    if role == "assistant":
        return {"role": "assistant", "content": _openai_assistant_content(message, where)}
    if role == "function":
        raise ConversionError(f"{where}: role 'function' (the deprecated functions API) is "
                              "not supported; use tools and tool messages",
                              param=f"{where}.role")
    raise ConversionError(f"{where}.role: expected system, developer, user, assistant "
                          f"or tool, got {role!r}", param=f"{where}.role")


def _openai_conversation(messages: list[Any]) -> tuple[list[str], list[Json]]:
    """The system texts, and the other messages as Anthropic messages."""
    system: list[str] = []
    out_messages: list[Json] = []
    results: list[Json] | None = None  # the tool_result blocks of the last tool message
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        _expect(isinstance(message, dict), f"{where}: expected an object", where)
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_openai_texts(message.get("content"), f"{where}.content"))
        elif role == "tool":  # consecutive tool messages answer in one user message
            if results is None:
                results = []
                out_messages.append({"role": "user", "content": results})
            results.append(_openai_tool_message(message, where))
        else:
            results = None
            out_messages.append(_openai_message(message, where))
    return system, out_messages


def _openai_sampling(body: Json, out: Json) -> None:
    """Copy the length and sampling settings (types checked by _expect_settings)."""
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        _expect(isinstance(stop, list) and all(isinstance(s, str) for s in stop),
                "stop: expected a string or a list of strings", "stop")
        out["stop_sequences"] = stop


def _ask_thinking(out: Json, effort: Any) -> None:
    """An OpenAI reasoning effort that asks for thinking -> adaptive thinking at that effort."""
    if effort in REASONING_EFFORTS:
        out["thinking"] = {"type": "adaptive"}
        out["output_config"] = {"effort": effort}


def openai_to_anthropic(body: Any) -> Json:
    """OpenAI Chat Completions request -> the equivalent Anthropic Messages request.

    system and developer messages become the system prompt; ``tool`` messages
    become ``tool_result`` blocks, consecutive ones in one user message;
    assistant ``tool_calls`` become ``tool_use`` blocks with their arguments
    parsed; ``reasoning_effort`` asks for (emulated) thinking. ``n`` other
    than 1 is refused: the upstream gives one answer.
    """
    _expect(isinstance(body, dict), "request body must be a JSON object")
    messages = body.get("messages")
    _expect(isinstance(messages, list), "messages: a list of messages is required", "messages")
    n = body.get("n")
    _expect(n is None or n == 1, "n: only n=1 is supported (Kiro gives one answer a request)",
            "n")
    stream_options = body.get("stream_options")
    _expect(stream_options is None or isinstance(stream_options, dict),
            "stream_options: expected an object", "stream_options")
    _expect_settings(body, OPENAI_SETTINGS)

    system, out_messages = _openai_conversation(messages)
    out: Json = {"model": body.get("model"), "messages": out_messages}
    if system:
        out["system"] = "\n\n".join(t for t in system if t)
    _openai_sampling(body, out)
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    tools = _openai_tools(body.get("tools"))
    if isinstance(body.get("web_search_options"), dict):  # search models' option
        tools.append({"type": "web_search_20250305", "name": SEARCH_TOOL})
    if tools:
        out["tools"] = tools
    tool_choice = _openai_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if tool_choice is not None:
        out["tool_choice"] = tool_choice
    _ask_thinking(out, body.get("reasoning_effort"))
    if isinstance(body.get("stream"), bool):
        out["stream"] = body["stream"]
    return out


# Requests: OpenAI Responses -> Anthropic ##################################
#
# The Responses API is the only one Codex speaks to a custom provider
# (PROTOCOL-2026.md 10.15). Its conversation is a list of ``input`` items:
# messages, the tool calls the model made and their outputs, and items
# kiro2api has no use for (reasoning, compaction, web searches...), which
# are skipped, never refused. Its tools come at the top level and in
# ``additional_tools`` items, some inside namespaces; Kiro sees one flat list,
# and ``responses_tools`` says how each flat name goes back to the client.

# Requests that need what kiro2api does not keep: a stored response.
RESPONSES_NOT_KEPT = "kiro2api keeps no responses: send the whole conversation as input"
RESPONSES_REFUSED = (
    ("previous_response_id", lambda v: v is not None, RESPONSES_NOT_KEPT),
    ("conversation", lambda v: v is not None, RESPONSES_NOT_KEPT),
    ("store", lambda v: v is True, "store: kiro2api keeps no responses; send store false"),
    ("background", lambda v: v is True,
     "background: kiro2api answers while the client waits; send background false"),
    ("prompt", lambda v: v is not None, "prompt: stored prompt templates are not supported; "
     "send the instructions and input themselves"),
)
RESPONSES_SETTINGS = (("stream", _is_bool, "true or false"),
                      ("max_output_tokens", _is_whole, "a whole number"),
                      ("temperature", _is_number, "a number"),
                      ("top_p", _is_number, "a number"),
                      ("parallel_tool_calls", _is_bool, "true or false"))
# Codex's own namespace: its tools are called by their bare names.
PLAIN_NAMESPACE = "functions"
NAMESPACE_SEPARATOR = "__"
# A freeform (``custom``) tool takes raw text; Kiro's tools take JSON objects,
# so it is offered as a tool with one string field, and the text travels in it.
FREEFORM_FIELD = "input"
FREEFORM_SCHEMA = {"type": "object", "properties": {FREEFORM_FIELD: {"type": "string"}},
                   "required": [FREEFORM_FIELD], "additionalProperties": False}
FREEFORM_NOTE = ("This tool takes raw text, not JSON: put the whole text, exactly as the tool "
                 f"should receive it, in the {FREEFORM_FIELD!r} field.")
RESPONSES_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


class DeclaredTool(NamedTuple):
    """A client's tool as the client declared it (the flat name Kiro sees maps to it)."""

    kind: str  # "function" or "custom"
    name: str
    namespace: str | None = None


def _declared_tools(tools: Any, where: str, namespace: str | None,
                    out: dict[str, tuple[DeclaredTool, Json]]) -> None:
    """Add ``tools`` (a list, maybe with namespaces in it) to ``out`` by flat name."""
    _expect(isinstance(tools, list), f"{where}: expected a list of tools", where)
    for i, tool in enumerate(tools):
        here = f"{where}[{i}]"
        _expect(isinstance(tool, dict), f"{here}: expected an object", here)
        kind = tool.get("type")
        if kind == "namespace" and namespace is None:
            name = tool.get("name")
            _expect(isinstance(name, str) and name != "", f"{here}.name: a namespace needs "
                    "a name", f"{here}.name")
            _declared_tools(tool.get("tools"), f"{here}.tools",
                            None if name == PLAIN_NAMESPACE else name, out)
        elif kind in ("function", "custom"):
            name = tool.get("name")
            _expect(isinstance(name, str) and name != "", f"{here}.name: a {kind} tool needs "
                    "a name", f"{here}.name")
            flat = f"{namespace}{NAMESPACE_SEPARATOR}{name}" if namespace else name
            if flat not in out:  # the same tool offered twice: the first one counts
                out[flat] = (DeclaredTool(kind, name, namespace), _anthropic_tool(tool, flat,
                                                                                   here))
        # else: a hosted tool (web_search, file_search...) Kiro cannot run: dropped


def _anthropic_tool(tool: Json, flat: str, where: str) -> Json:
    description = tool.get("description") if isinstance(tool.get("description"), str) else ""
    if tool["type"] == "custom":
        form = tool.get("format") if isinstance(tool.get("format"), dict) else {}
        note = FREEFORM_NOTE
        if form.get("type") == "grammar" and isinstance(form.get("definition"), str):
            note += (f" The text must follow this {form.get('syntax') or ''} grammar:\n"
                     f"{form['definition']}")
        return {"name": flat, "description": f"{description}\n\n{note}".strip(),
                "input_schema": FREEFORM_SCHEMA}
    parameters = tool.get("parameters")
    _expect(parameters is None or isinstance(parameters, dict),
            f"{where}.parameters: expected a JSON Schema object", f"{where}.parameters")
    spec: Json = {"name": flat, "input_schema": parameters or {"type": "object"}}
    if description:
        spec["description"] = description
    return spec


def responses_tools(body: Json) -> dict[str, tuple[DeclaredTool, Json]]:
    """Every tool a Responses request offers, by the flat name Kiro sees: the
    declaration, and the tool as an Anthropic tool. Namespaced tools are
    ``namespace__name``, except Codex's plain ``functions`` namespace."""
    tools: dict[str, tuple[DeclaredTool, Json]] = {}
    if body.get("tools") is not None:
        _declared_tools(body["tools"], "tools", None, tools)
    items = body.get("input")
    for i, item in enumerate(items if isinstance(items, list) else ()):
        if isinstance(item, dict) and item.get("type") == "additional_tools":
            _declared_tools(item.get("tools"), f"input[{i}].tools", None, tools)
    return tools


def _flat_name(item: Json) -> str:
    namespace = item.get("namespace")
    name = item.get("name")
    if isinstance(namespace, str) and namespace and namespace != PLAIN_NAMESPACE:
        return f"{namespace}{NAMESPACE_SEPARATOR}{name}"
    return name


def _responses_parts(content: Any, where: str, *, images: bool) -> list[Json]:
    """A message's or a tool output's content: a string or a list of parts."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    _expect(isinstance(content, list), f"{where}: expected a string or a list of content parts",
            where)
    blocks: list[Json] = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in RESPONSES_TEXT_PARTS and isinstance(part.get(_text_key(kind)), str):
            blocks.append({"type": "text", "text": part[_text_key(kind)]})
        elif kind == "input_image" and images:
            _expect(part.get("file_id") is None, f"{here}.file_id: uploaded files are not "
                    "supported; send the image inline as a data: URL", f"{here}.file_id")
            blocks.append(_openai_image(part, here))
        else:
            raise ConversionError(f"{here}: content part type {kind!r} is not supported here "
                                  f"(use {', '.join(RESPONSES_TEXT_PARTS[:2])}"
                                  f"{' or input_image' if images else ''})", param=here)
    return blocks


def _text_key(kind: str) -> str:
    return "refusal" if kind == "refusal" else "text"


def _responses_arguments(arguments: Any) -> Json:
    """A past call's arguments as an object; what is not one is kept as text, not refused
    (the client is replaying what the model said)."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = json.loads(arguments)
    except (ValueError, RecursionError):
        parsed = None
    return parsed if isinstance(parsed, dict) else {FREEFORM_FIELD: arguments}


class _ResponsesInput:
    """Folds ``input`` items into the system texts and Anthropic messages."""

    def __init__(self) -> None:
        self.system: list[str] = []
        self.messages: list[Json] = []
        self._results: dict[str, Json] = {}  # call id -> its tool_result (outputs may repeat)

    def add(self, item: Json, where: str) -> None:
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            self._message(item, where)
        elif kind in ("function_call", "custom_tool_call"):
            self._call(item, kind, where)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            self._output(item, where)
        elif kind == "item_reference":
            raise ConversionError(f"{where}: {RESPONSES_NOT_KEPT}", param=where)
        # else reasoning, additional_tools, compaction, web_search_call...: nothing to say

    def _message(self, item: Json, where: str) -> None:
        role = item.get("role")
        content = item.get("content")
        if role in ("system", "developer") and not self.messages:
            # The leading instructions are the system prompt; later ones are turns.
            self.system += [b["text"] for b in _responses_parts(content, f"{where}.content",
                                                                 images=False)]
            return
        _expect(role in ("system", "developer", "user", "assistant"),
                f"{where}.role: expected developer, system, user or assistant, got {role!r}",
                f"{where}.role")
        anthropic_role = "assistant" if role == "assistant" else "user"
        blocks = _responses_parts(content, f"{where}.content", images=role == "user")
        self.messages.append({"role": anthropic_role, "content": blocks})

    def _call(self, item: Json, kind: str, where: str) -> None:
        call_id, name = item.get("call_id"), item.get("name")
        _expect(isinstance(call_id, str) and call_id != "", f"{where}.call_id: expected the "
                "call's id", f"{where}.call_id")
        _expect(isinstance(name, str) and name != "", f"{where}.name: expected the tool's name",
                f"{where}.name")
        arguments = ({FREEFORM_FIELD: str(item.get("input") or "")} if kind == "custom_tool_call"
                     else _responses_arguments(item.get("arguments")))
        self.messages.append({"role": "assistant", "content": [
            {"type": "tool_use", "id": call_id, "name": _flat_name(item), "input": arguments}]})

    def _output(self, item: Json, where: str) -> None:
        call_id = item.get("call_id")
        _expect(isinstance(call_id, str) and call_id != "", f"{where}.call_id: expected the id "
                "of the call answered", f"{where}.call_id")
        output = item.get("output")
        parts = _responses_parts("" if output is None else output, f"{where}.output",
                                 images=True)
        result = self._results.get(call_id)
        if result is not None:  # a second output of the same call joins the first
            result["content"] += parts
            return
        result = self._results[call_id] = {"type": "tool_result", "tool_use_id": call_id,
                                           "content": parts}
        self.messages.append({"role": "user", "content": [result]})


def _responses_tool_choice(choice: Any, parallel: Any) -> Json | None:
    """``tool_choice`` and ``parallel_tool_calls`` -> Anthropic ``tool_choice``."""
    if choice == "none":
        return {"type": "none"}
    result: Json | None = None
    if choice == "required":
        result = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") in ("function", "custom"):
        name = _flat_name(choice)
        _expect(isinstance(name, str) and name != "", "tool_choice.name: expected a string",
                "tool_choice")
        result = {"type": "tool", "name": name}
    else:  # "auto", allowed_tools, a hosted tool: no narrower Anthropic equivalent
        _expect(choice is None or choice == "auto" or isinstance(choice, dict),
                "tool_choice: expected 'auto', 'none', 'required' or a tool", "tool_choice")
    if parallel is False:
        result = result or {"type": "auto"}
        result["disable_parallel_tool_use"] = True
    return result


def _responses_search(tools: Any) -> Json | None:
    """The hosted ``web_search`` tool (Codex's) as the search kiro2api runs; none where
    the client said the model may not reach the web."""
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict) and tool.get("type") in ("web_search", "web_search_preview") \
                and tool.get("external_web_access") is not False:
            filters = tool.get("filters") if isinstance(tool.get("filters"), dict) else {}
            search: Json = {"type": "web_search_20250305", "name": SEARCH_TOOL}
            if isinstance(filters.get("allowed_domains"), list):
                search["allowed_domains"] = filters["allowed_domains"]
            return search
    return None


def responses_to_anthropic(body: Any) -> Json:
    """OpenAI Responses request -> the equivalent Anthropic Messages request.

    ``instructions`` and the leading developer or system messages become the
    system prompt; ``function_call`` and ``custom_tool_call`` items become
    ``tool_use`` blocks, their outputs ``tool_result`` blocks;
    ``reasoning.effort`` asks for thinking as ``reasoning_effort`` does on
    the chat route. What needs a stored response is refused (400).
    """
    _expect(isinstance(body, dict), "request body must be a JSON object")
    for name, refused, message in RESPONSES_REFUSED:
        _expect(not refused(body.get(name)), message, name)
    _expect_settings(body, RESPONSES_SETTINGS)
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    _expect(isinstance(items, list), "input: expected a string or a list of items", "input")
    instructions = body.get("instructions")
    _expect(instructions is None or isinstance(instructions, str),
            "instructions: expected a string", "instructions")
    conversation = _ResponsesInput()
    for i, item in enumerate(items):
        _expect(isinstance(item, dict), f"input[{i}]: expected an object", f"input[{i}]")
        conversation.add(item, f"input[{i}]")
    _expect(bool(conversation.messages), "input: at least one user or assistant item is "
            "required", "input")

    out: Json = {"model": body.get("model"), "messages": conversation.messages}
    system = [instructions or "", *conversation.system]
    if any(system):
        out["system"] = "\n\n".join(t for t in system if t)
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "stream"):
        if body.get(name) is not None:
            out[name] = body[name]
    tools = [tool for _, tool in responses_tools(body).values()]
    search = _responses_search(body.get("tools"))
    if search is not None:
        tools.append(search)
    if tools:
        out["tools"] = tools
    tool_choice = _responses_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if tool_choice is not None:
        out["tool_choice"] = tool_choice
    reasoning = body.get("reasoning")
    _ask_thinking(out, reasoning.get("effort") if isinstance(reasoning, dict) else None)
    return out


# Token estimates ##########################################################
#
# The upstream reports no token counts until the end of the answer (if at
# all), so the figures clients see first are estimates: about 4 characters a
# token for ASCII text and about 1.5 for other scripts, which is how Claude's
# tokenizer behaves on English and CJK text to within roughly 15%.


def estimate_text_tokens(text: str) -> int:
    if not text:
        return 0
    ascii_chars = len(text.encode("ascii", "ignore"))
    return math.ceil(ascii_chars / 4 + (len(text) - ascii_chars) / 1.5)


def estimate_input_tokens(body: Json) -> int:
    """Estimate of the prompt tokens of an Anthropic request (for count_tokens too)."""
    total = estimate_text_tokens(system_text(body.get("system")) if not isinstance(
        body.get("system"), (int, float, dict)) else "")
    for message in body.get("messages") or ():
        total += 4  # role and framing
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += estimate_text_tokens(content)
        elif isinstance(content, list):
            for block in content:
                total += estimate_text_tokens(json.dumps(block, ensure_ascii=False)) \
                    if not (isinstance(block, dict) and block.get("type") == "text") \
                    else estimate_text_tokens(str(block.get("text", "")))
    for tool in body.get("tools") or ():
        total += 8 + estimate_text_tokens(json.dumps(tool, ensure_ascii=False))
    return max(total, 1)


# Upstream events: one frame -> what it says ###############################


class Text(NamedTuple):
    """Answer text: an upstream event and, unchanged, a neutral one."""

    text: str


class ToolUseDelta(NamedTuple):
    tool_use_id: str
    name: str
    input: str
    stop: bool


class ReasoningDelta(NamedTuple):
    text: str
    signature: str
    redacted: str


class TokenUsage(NamedTuple):
    # As Anthropic counts them: the prompt is input + cache_read + cache_write.
    input_tokens: int | None  # neither read from nor written to the cache
    output_tokens: int | None
    cache_read: int | None
    cache_write: int | None


class Metering(NamedTuple):
    """``meteringEvent``: the Kiro credits the answer was billed (the last one counts)."""

    credits: float


class ContextUsage(NamedTuple):
    percentage: float


class Refusal(NamedTuple):
    category: str


class UpstreamException(NamedTuple):
    error_type: str
    message: str


UpstreamEvent = Union[Text, ToolUseDelta, ReasoningDelta, TokenUsage, ContextUsage,
                      Metering, Refusal, UpstreamException]


_json_decoder = json.JSONDecoder()
_json_scan = _json_decoder.scan_once  # the C scanner, without decode()'s two regex passes


def _json_payload(text: str) -> Any:
    """``json.loads(text)`` for a frame payload, minus its per-call overhead.

    The scanner parses the value at the start; anything else (leading or
    trailing whitespace, extra data, no value at all) goes to the full
    decoder, which accepts or rejects it exactly as ``json.loads`` would.
    """
    try:
        data, end = _json_scan(text, 0)
    except StopIteration:
        return _json_decoder.decode(text)
    return data if end == len(text) else _json_decoder.decode(text)


def _number_or_none(value: Any) -> float | None:
    """A finite JSON number, else None (Python's json reads ``1e999`` as infinity)."""
    if _is_number(value) and math.isfinite(value):
        return value
    return None


def _int_or_none(value: Any) -> int | None:
    number = _number_or_none(value)
    return None if number is None else int(number)


def decode_event(headers: Mapping[str, Any], payload: bytes) -> UpstreamEvent | None:
    """One decoded frame -> an upstream event, or None for events we ignore.

    Accepts both payload shapes seen in the wild: the bare member object and
    one wrapped under the event's own name.
    """
    message_type = headers.get(":message-type", "event")
    if message_type != "event":
        return _exception(headers, payload)
    event_type = headers.get(":event-type")
    try:
        data = _json_payload(payload.decode()) if payload else {}
    except (ValueError, RecursionError):  # UnicodeDecodeError included; absurd nesting
        return UpstreamException("InvalidEventPayload", f"{event_type} payload is not JSON")
    if not isinstance(data, dict):
        return UpstreamException("InvalidEventPayload", f"{event_type} payload is not an object")
    inner = data.get(event_type)
    if isinstance(inner, dict) and len(data) == 1:
        data = inner
    if event_type == "assistantResponseEvent":  # nearly every frame: no call for it
        content = data.get("content")
        return Text(content) if isinstance(content, str) and content else None
    decode = _EVENT_DECODERS.get(event_type)  # type: ignore[arg-type]
    return None if decode is None else decode(data)


def _text_event(data: Json) -> Text | None:
    content = data.get("content")
    return Text(content) if isinstance(content, str) and content else None


def _tool_use_event(data: Json) -> ToolUseDelta:
    tool_input = data.get("input", "")
    if not isinstance(tool_input, str):  # occasionally a whole object
        tool_input = json.dumps(tool_input, ensure_ascii=False)
    return ToolUseDelta(str(data.get("toolUseId", "")), str(data.get("name", "")),
                        tool_input, data.get("stop") is True)


def _reasoning_event(data: Json) -> ReasoningDelta:
    return ReasoningDelta(str(data.get("text") or ""), str(data.get("signature") or ""),
                          str(data.get("redactedContent") or ""))


def _metadata_event(data: Json) -> TokenUsage | Refusal | None:
    usage = data.get("tokenUsage")
    if isinstance(usage, dict):
        # uncached + cacheRead + cacheWrite + output = totalTokens: the same
        # split as Anthropic's usage, whose clients add the three input
        # figures up (Claude Code sizes its context that way).
        return TokenUsage(_int_or_none(usage.get("uncachedInputTokens")),
                          _int_or_none(usage.get("outputTokens")),
                          _int_or_none(usage.get("cacheReadInputTokens")),
                          _int_or_none(usage.get("cacheWriteInputTokens")))
    if str(data.get("stopReason", "")).upper() == "CONTENT_FILTERED":
        details = data.get("stopDetails") or {}
        refusal = details.get("refusal") if isinstance(details, dict) else None
        category = refusal.get("category", "") if isinstance(refusal, dict) else ""
        return Refusal(str(category))
    return None


def _metering_event(data: Json) -> Metering | None:
    credits = _number_or_none(data.get("usage"))
    return None if credits is None or credits < 0 else Metering(credits)


def _context_usage_event(data: Json) -> ContextUsage | None:
    percentage = _number_or_none(data.get("contextUsagePercentage"))
    return None if percentage is None else ContextUsage(float(percentage))


def _invalid_state_event(data: Json) -> UpstreamException:
    return UpstreamException("InvalidStateEvent",
                             str(data.get("message") or data.get("reason") or ""))


# :event-type -> how its payload reads (assistantResponseEvent is decode_event's own).
_EVENT_DECODERS: dict[str, Callable[[Json], UpstreamEvent | None]] = {
    "codeEvent": _text_event,
    "toolUseEvent": _tool_use_event,
    "reasoningContentEvent": _reasoning_event,
    "metadataEvent": _metadata_event,
    "contextUsageEvent": _context_usage_event,
    "meteringEvent": _metering_event,
    "invalidStateEvent": _invalid_state_event,
}


def _exception(headers: Mapping[str, Any], payload: bytes) -> UpstreamException:
    try:
        data = json.loads(payload) if payload else {}
    except (ValueError, RecursionError):
        data = {"message": payload.decode("utf-8", "replace")}
    if not isinstance(data, dict):
        data = {}
    error_type = (headers.get(":exception-type") or headers.get(":error-code")
                  or str(data.get("__type", "")).rpartition("#")[2] or "UnknownError")
    message = data.get("message") or data.get("Message") or headers.get(":error-message") or ""
    return UpstreamException(str(error_type), str(message))


# Upstream errors ##########################################################


BEARER_INVALID = "bearer token included in the request is invalid"
PROMPT_TOO_LONG = "prompt is too long"


def is_bearer_invalid(status: int, body: str) -> bool:
    """An expired or revoked access token: worth one refresh and one retry."""
    return status in (401, 403) and (status == 401 or BEARER_INVALID in body.lower())


# Kiro's reasons for a model out of capacity, and the Retry-After answered
# when Kiro gives none.
CAPACITY_REASONS = ("INSUFFICIENT_MODEL_CAPACITY", "MODEL_TEMPORARILY_UNAVAILABLE")
OVERLOADED_RETRY_AFTER = "10"


def upstream_failure(status: int, body: str, error_type: str = "", *,
                     retry_after: str | None = None) -> Failure:
    """Map a non-200 CodeWhisperer answer to the failure the client is answered with.

    ``body`` is the upstream's text (JSON ``{"message", "reason"}`` as a
    rule); ``error_type`` its ``x-amzn-errortype`` header; ``retry_after`` its
    ``Retry-After``, passed on.
    """
    message, reason = body.strip(), ""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        nested = data.get("error") if isinstance(data.get("error"), dict) else {}
        message = str(data.get("message") or data.get("Message") or nested.get("message")
                      or message)
        reason = str(data.get("reason") or nested.get("reason") or "")
    error_class = error_type.partition(":")[0]
    detail = f"{message} ({reason})" if reason and reason not in message else message
    detail = detail[:500] or f"HTTP {status}"
    if status == 400 and ("CONTENT_LENGTH_EXCEEDS_THRESHOLD" in reason or
                          "PROMPT_TOO_LONG" in reason or "input is too long" in message.lower()):
        return Failure("invalid_request", 400, f"{PROMPT_TOO_LONG}: the conversation is larger "
                       f"than Kiro accepts; compact or shorten it (upstream: {detail})",
                       retry_after, code="context_length_exceeded")
    if status == 400 and "INVALID_MODEL_ID" in reason:
        # As Anthropic and OpenAI answer a model they do not have.
        return Failure("not_found", 404, f"Kiro has no such model: {detail}; GET /v1/models "
                       f"lists the account's models", retry_after, code="model_not_found")
    if status == 400:
        return Failure("invalid_request", 400, f"Kiro rejected the request: {detail}",
                       retry_after)
    if any(capacity in reason or capacity in message for capacity in CAPACITY_REASONS):
        # Switching model helps more than waiting (PROTOCOL-2026.md 10.9): say both.
        return Failure("overloaded", 529, f"Kiro has no capacity for this model now; try "
                       f"again shortly or use another model ({detail})",
                       retry_after or OVERLOADED_RETRY_AFTER)
    if is_bearer_invalid(status, body):
        return Failure("authentication", 401, f"Kiro did not accept the access token, even "
                       f"after a refresh; log in to Kiro again ({detail})", retry_after,
                       code="invalid_api_key")
    if status == 403:
        return Failure("permission", 403, f"Kiro refused the request: {detail}", retry_after)
    if status == 402 or error_class == "ServiceQuotaExceededException":
        return Failure("billing", 402, f"the Kiro account is out of quota: {detail}",
                       retry_after, code="insufficient_quota")
    if status == 429:
        return Failure("rate_limit", 429, f"Kiro is rate limiting this account: {detail}",
                       retry_after, code="rate_limit_exceeded")
    if status == 503:
        return Failure("unavailable", 503, f"Kiro is unavailable: {detail}", retry_after)
    return Failure("upstream", 502, f"Kiro answered HTTP {status}: {detail}", retry_after)


# Neutral events ###########################################################


class Thinking(NamedTuple):
    text: str


class ThinkingSignature(NamedTuple):
    signature: str


class RedactedThinking(NamedTuple):
    """Native reasoning the upstream sends encrypted: a block of its own."""

    data: str


class ToolCall(NamedTuple):
    """A complete tool call whose ``input_json`` is known to parse as an object."""

    id: str
    name: str
    input_json: str


class SearchCall(NamedTuple):
    """The model asked for a web search (the server tool kiro2api runs itself)."""

    id: str  # srvtoolu_..., the id the client sees
    query: str


class SearchResult(NamedTuple):
    """What a web search found (``results``), or why it found nothing (``error``:
    ``unavailable``, ``max_uses_exceeded``...)."""

    tool_use_id: str
    results: tuple[Json, ...] = ()  # {"title", "url", "snippet", "published"}
    error: str | None = None


Event = Union[Text, Thinking, ThinkingSignature, RedactedThinking, ToolCall, SearchCall,
              SearchResult]


OPEN_TAG = "<thinking>"
CLOSE_TAG = "</thinking>"
# A closing tag ends the thinking only when a line break follows it (the
# model also *mentions* the tag while thinking, mid-sentence or quoted). Peers
# wait for a blank line, but a model that writes one newline would then have
# its whole answer taken for thinking, and the client would see no text. Up
# to a blank line of separator is swallowed.
CLOSE_SEPARATOR = "\n\n"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that could begin ``tag``."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ThinkingTags:
    """Splits emulated thinking out of the text stream.

    The answer may open (after white space) with ``<thinking>``; what follows,
    up to a ``</thinking>`` at the end of a line (not quoted), is thinking.
    Tags split across reads are held back until they can be told apart from
    text.
    """

    def __init__(self) -> None:
        self.state = "start"  # "start" -> "thinking" -> "text", or "start" -> "text"
        self.pending = ""
        self.last = ""  # the last character let out as thinking

    def feed(self, text: str, *, final: bool = False) -> list[Event]:
        self.pending += text
        out: list[Event] = []
        if self.state == "start":
            head = self.pending.lstrip()
            if head.startswith(OPEN_TAG):
                self.pending = head[len(OPEN_TAG):]
                self.state = "thinking"
            elif OPEN_TAG.startswith(head) and not final:
                return out  # white space or a tag still arriving
            else:
                self.state = "text"
        if self.state == "thinking":
            self._thinking(out, final)
            if final:  # the text is over (a tool call or the end): so is the thinking
                self.state = "text"
        if self.state == "text" and self.pending:
            out.append(Text(self.pending))
            self.pending = ""
        return out

    def _thinking(self, out: list[Event], final: bool) -> None:
        pending = self.pending
        start = 0
        while (at := pending.find(CLOSE_TAG, start)) >= 0:
            after = pending[at + len(CLOSE_TAG):]
            quoted = (pending[at - 1] if at else self.last) in ("`", "'", '"')
            if not quoted and final and not after.strip():
                end = len(pending)
            elif not quoted and CLOSE_SEPARATOR.startswith(after):
                # Undecided until the next read: a mention, or the end and how
                # much separator to swallow.
                self._emit(out, pending[:at])
                self.pending = pending[at:]
                return
            elif not quoted and after.startswith("\n"):
                end = at + len(CLOSE_TAG) + (2 if after.startswith(CLOSE_SEPARATOR) else 1)
            else:
                start = at + 1  # a mention of the tag, not the end
                continue
            self._emit(out, pending[:at])
            self.pending = pending[end:]
            self.state = "text"
            return
        keep = 0 if final else _partial_suffix(pending, CLOSE_TAG)
        self._emit(out, pending[: len(pending) - keep])
        self.pending = pending[len(pending) - keep:]

    def _emit(self, out: list[Event], thinking: str) -> None:
        if thinking:
            out.append(Thinking(thinking))
            self.last = thinking[-1]


class StopSequences:
    """Applies the client's stop sequences to the text, which the upstream cannot do."""

    def __init__(self, sequences: tuple[str, ...]) -> None:
        self.sequences = sequences
        self.held = ""
        self.matched: str | None = None

    def feed(self, events: list[Event]) -> list[Event]:
        out: list[Event] = []
        for event in events:
            if type(event) is not Text or self.matched is not None:
                if self.matched is None:
                    out.append(event)
                continue
            text = self.held + event.text
            hits = [(i, s) for s in self.sequences if (i := text.find(s)) >= 0]
            if hits:
                at, self.matched = min(hits)
                self.held = ""
                if at:
                    out.append(Text(text[:at]))
                continue
            keep = max(_partial_suffix(text, s) for s in self.sequences)
            self.held = text[len(text) - keep:]
            if len(text) > keep:
                out.append(Text(text[: len(text) - keep]))
        return out

    def flush(self) -> list[Event]:
        held, self.held = self.held, ""
        return [Text(held)] if held and self.matched is None else []


# Assembling an answer #####################################################


@dataclass
class Usage:
    input_tokens: int
    output_tokens: int = 0
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    web_search_requests: int | None = None  # searches run, when the search tool was offered


class Assembler:
    """Turns one answer's upstream events into neutral events, and keeps its state.

    Tool calls are held until their ``stop`` event and let out only if their
    input parses as a JSON object: a client never receives a tool call it
    could not execute. When the answer is cut short (the upstream's output
    limit, or input that does not parse) the call is dropped and the stop
    reason is ``max_tokens``. With ``thinking``, text runs through
    ``ThinkingTags``; with stop sequences, through ``StopSequences``, and the
    first match ends the answer.
    """

    def __init__(self, *, input_tokens: int, window: int = DEFAULT_CONTEXT_WINDOW,
                 tool_names: Mapping[str, str] | None = None, thinking: bool = False,
                 stop_sequences: tuple[str, ...] = (), search_tool: str | None = None) -> None:
        self.usage = Usage(input_tokens)
        self.search_tool = search_tool  # the name Kiro calls the web search by
        self.searches: list[SearchCall] = []  # asked for in this answer
        self.window = window
        self.tool_names = tool_names or {}
        self.stop_reason: str | None = None  # set once the answer is known to be over
        self.stop_sequence: str | None = None
        self.tool_calls = 0
        self.credits: float | None = None  # what Kiro billed, when it said
        self._thinking = ThinkingTags() if thinking else None
        self._stops = StopSequences(stop_sequences) if stop_sequences else None
        self._tools: dict[str, list[str]] = {}  # id -> [name, fragment, fragment...]
        self._output_chars = 0
        self._reported_output: int | None = None
        self._context_percentage: float | None = None
        self._reported_input = False

    @property
    def usage_source(self) -> str:
        """Where the usage figures come from: "kiro" (tokenUsage), "context" (the
        context percentage, input only), or "estimate" (kiro2api's own count)."""
        if self._reported_input and self._reported_output is not None:
            return "kiro"
        return "context" if self._context_percentage is not None else "estimate"

    @classmethod
    def for_request(cls, prepared: Prepared, *, input_tokens: int, client_model: str,
                    window: int | None = None) -> Assembler:
        """The assembler of ``prepared``'s answer; ``window``: the model's context
        window as the service listed it, else the built-in table's."""
        return cls(input_tokens=input_tokens, tool_names=prepared.tool_names,
                   window=window or context_window(prepared.model_id, client_model),
                   thinking=prepared.thinking, stop_sequences=prepared.stop_sequences,
                   search_tool=SEARCH_TOOL if prepared.web_search else None)

    def feed_into(self, out: list[Event], headers: Mapping[str, Any], payload: bytes) -> None:
        """Append one frame's events to ``out`` (the streaming path: one list a read)."""
        if self.stop_reason is not None:
            return
        event = decode_event(headers, payload)
        kind = type(event)
        if kind is Text:
            self._output_chars += len(event.text)
            if self._thinking is None and self._stops is None:
                out.append(event)
            else:
                out += self._text(event.text)
        elif event is not None:
            out += self._event(event, kind)

    def _event(self, event: UpstreamEvent, kind: type) -> list[Event]:
        if kind is ToolUseDelta:
            return self._tool(event)
        if kind is ReasoningDelta:
            return self._reasoning(event)
        if kind is TokenUsage:
            if event.input_tokens is not None:
                self.usage.input_tokens = event.input_tokens
                self._reported_input = True
            self._reported_output = event.output_tokens
            self.usage.cache_read_input_tokens = event.cache_read
            self.usage.cache_creation_input_tokens = event.cache_write
        elif kind is ContextUsage:
            self._context_percentage = event.percentage
        elif kind is Metering:
            self.credits = event.credits
        elif kind is Refusal:
            self.stop_reason = "refusal"  # finish() lets out the text still held
        elif kind is UpstreamException:
            if event.error_type == "ContentLengthExceededException" or \
                    "CONTENT_LENGTH_EXCEEDS" in event.message:
                self._tools.clear()
                self.stop_reason = "max_tokens"
                return []
            raise StreamError(event.error_type, event.message)
        return []

    def _reasoning(self, event: ReasoningDelta) -> list[Event]:
        out: list[Event] = []
        if event.text:
            self._output_chars += len(event.text)
            out.append(Thinking(event.text))
        if event.signature:
            out.append(ThinkingSignature(event.signature))
        if event.redacted:
            out.append(RedactedThinking(event.redacted))
        return out

    def _text(self, text: str, *, final: bool = False) -> list[Event]:
        events = self._thinking.feed(text, final=final) if self._thinking else [Text(text)]
        if self._stops is not None:
            events = self._stops.feed(events)
            if self._stops.matched is not None:
                self.stop_reason = "stop_sequence"
                self.stop_sequence = self._stops.matched
        return events

    def _flush_text(self) -> list[Event]:
        """Whatever the text stages still hold, as the answer moves past text."""
        events = self._text("", final=True) if self._thinking else []
        if self._stops is not None:  # nothing once a stop sequence has matched
            events += self._stops.flush()
        return events

    def _tool(self, event: ToolUseDelta) -> list[Event]:
        out = self._flush_text() if self._thinking or self._stops else []
        parts = self._tools.get(event.tool_use_id)
        if parts is None:
            parts = self._tools[event.tool_use_id] = [event.name]
        if event.input:
            parts.append(event.input)
            self._output_chars += len(event.input)
        if not event.stop:
            return out
        del self._tools[event.tool_use_id]
        input_json = "".join(parts[1:]) or "{}"
        try:
            parsed = json.loads(input_json)
        except (ValueError, RecursionError):
            parsed = None
        if not isinstance(parsed, dict):
            self.stop_reason = "max_tokens"
            return out
        if parts[0] == self.search_tool:
            call = SearchCall("srvtoolu_" + re.sub(r"\W", "", event.tool_use_id),
                              str(parsed.get("query") or ""))
            self.searches.append(call)
            out.append(call)
            return out
        self.tool_calls += 1
        name = self.tool_names.get(parts[0], parts[0])
        out.append(ToolCall(event.tool_use_id, name, input_json))
        return out

    def finish(self) -> list[Event]:
        """The stream is over: settle ``stop_reason`` and usage; return held-back events."""
        events = self._flush_text()  # whatever ended the answer, held text goes out
        if self._tools and self.stop_reason is None:
            self.stop_reason = "max_tokens"  # cut off inside a tool call
        if self.stop_reason is None:
            if self._context_percentage is not None and self._context_percentage >= 100:
                self.stop_reason = "model_context_window_exceeded"
            elif self.tool_calls:
                self.stop_reason = "tool_use"
            else:
                self.stop_reason = "end_turn"
        self._tools.clear()
        output = self._reported_output
        if output is None:
            output = math.ceil(self._output_chars / 4)
        self.usage.output_tokens = output
        if not self._reported_input and self._context_percentage is not None:
            # The percentage covers the prompt, Kiro's own hidden system
            # prompt, and this answer: the best figure we can get.
            estimate = round(self._context_percentage * self.window / 100) - output
            if estimate > 0:
                self.usage.input_tokens = estimate
        return events


# Rendering: the renderer contract #########################################
#
# A renderer turns one answer's neutral events into its client API's bytes
# (streamed) or JSON (``collect``, for a non-streamed answer); the relay in
# kiro2api.py drives any of them the same way. Each consumer of events has one
# method per kind of neutral event, named in ``EVENT_METHODS``: a new kind of
# event is one entry there, and a consumer without its method fails when it
# is made, not when the event first arrives.


class Answer(NamedTuple):
    """What a renderer is told of the answer it renders (the caller makes ids and times)."""

    id: str
    model: str
    created: int  # Unix seconds
    input_tokens: int


class Renderer(Protocol):
    """One answer in one client API's format."""

    def keepalive(self) -> bytes:
        """What to send when the stream has been quiet; clients skip it."""

    def start(self) -> bytes:
        """The stream's opening bytes, before any event."""

    def render(self, events: Iterable[Event]) -> bytes:
        """The bytes of some events (one upstream read's, on the streaming path)."""

    def finish(self, stop_reason: str, usage: Usage, stop_sequence: str | None = None) -> bytes:
        """The normal ending of a stream whose events have all been rendered."""

    def error(self, failure: Failure) -> bytes:
        """An in-band error that ends the stream instead of ``finish``."""

    def collect(self, events: Iterable[Event], stop_reason: str, usage: Usage,
                stop_sequence: str | None = None) -> Json:
        """The whole answer as one JSON body (the non-streamed answer)."""


EVENT_METHODS = {Text: "on_text", Thinking: "on_thinking", ThinkingSignature: "on_signature",
                 RedactedThinking: "on_redacted", ToolCall: "on_tool_call",
                 SearchCall: "on_search_call", SearchResult: "on_search_result"}


class EventConsumer:
    """Base of renderers and collectors: ``_on`` maps each event type to its method."""

    def __init__(self) -> None:
        self._on: dict[type, Callable[[Any], Any]] = {
            kind: getattr(self, name) for kind, name in EVENT_METHODS.items()}

    def render(self, events: Iterable[Event]) -> bytes:
        on = self._on
        out = []  # a loop, not a comprehension: that would be one more call per read
        for event in events:
            out.append(on[type(event)](event))
        return b"".join(out)

    def consume(self, events: Iterable[Event]) -> None:
        """Hand each event to its method (a collector's way in)."""
        on = self._on
        for event in events:
            on[type(event)](event)


def sse(event_name: str | None, data: Any) -> bytes:
    """One server-sent event; ``event_name`` None gives a data-only event (OpenAI)."""
    body = data if isinstance(data, str) else json.dumps(
        data, ensure_ascii=False, separators=(",", ":"))
    # A lone surrogate (from an upstream message, say) cannot be UTF-8: it
    # goes out as its JSON escape instead, which is what it was on the wire.
    if event_name is None:
        return f"data: {body}\n\n".encode("utf-8", "backslashreplace")
    return f"event: {event_name}\ndata: {body}\n\n".encode("utf-8", "backslashreplace")


# Anthropic rendering ######################################################


ANTHROPIC_ERROR_TYPES = {  # Failure.kind -> Anthropic's error type
    "invalid_request": "invalid_request_error", "authentication": "authentication_error",
    "billing": "billing_error", "permission": "permission_error",
    "not_found": "not_found_error", "too_large": "request_too_large",
    "rate_limit": "rate_limit_error", "internal": "api_error", "upstream": "api_error",
    "unavailable": "overloaded_error", "timeout": "timeout_error",
    "overloaded": "overloaded_error",
}


def anthropic_error(failure: Failure) -> Json:
    """The Anthropic error envelope of ``failure``."""
    error_type = ANTHROPIC_ERROR_TYPES.get(failure.kind, "api_error")
    return {"type": "error", "error": {"type": error_type, "message": failure.message}}


def _usage_json(usage: Usage) -> Json:
    data: Json = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}
    if usage.cache_read_input_tokens is not None:
        data["cache_read_input_tokens"] = usage.cache_read_input_tokens
    if usage.cache_creation_input_tokens is not None:
        data["cache_creation_input_tokens"] = usage.cache_creation_input_tokens
    if usage.web_search_requests is not None:
        data["server_tool_use"] = {"web_search_requests": usage.web_search_requests,
                                   "web_fetch_requests": 0}
    return data


MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_DELTA_END = b"}}\n\n"


# Claude Code's auto mode asks for a safety verdict on each tool call
# (PROTOCOL-2026.md 10.17.4). kiro2api checks nothing: each call is answered
# "not judged", with which the client asks its user, without blaming the gateway.
SAFEGUARD = "dangerous_tool_use"
NOT_JUDGED = {"type": "unavailable", "reason": "not_judged_as_run"}


def wants_safeguards(body: Json) -> bool:
    safeguards = body.get("safeguards")
    return isinstance(safeguards, list) and any(
        isinstance(s, dict) and s.get("type") == SAFEGUARD for s in safeguards)


def safeguard_results(tool_use_ids: Iterable[str],
                      verdicts: Mapping[str, Json] | None = None) -> list[Json]:
    """The answer to ``safeguards``: each call's verdict, "not judged" where there is none."""
    verdicts = verdicts or {}
    return [{"type": SAFEGUARD, "status": {"type": "available", "tool_uses": {
        tool_use_id: verdicts.get(tool_use_id, NOT_JUDGED) for tool_use_id in tool_use_ids}}}]


# With --safeguards kiro, a small Kiro model judges each call: this asks it.
SAFEGUARD_INSTRUCTION = (
    "You check one action an AI coding agent is about to take for its user, against the "
    "rules and context its client gives (classifier_context: permission mode, trusted "
    "directories, the user's allow and deny rules). Flag it if it could cause harm the user "
    "did not ask for: deleting or overwriting data outside the task, leaking secrets, "
    "reaching untrusted hosts, changing the system or other people's work. Do not flag "
    "ordinary work the user asked for. Answer with one JSON object and nothing else: "
    '{"outcome": "flagged" or "not_flagged", "explanation": "one short sentence"}.')
SAFEGUARD_OUTCOMES = ("flagged", "not_flagged")
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def safeguard_request(body: Json, call: ToolCall, model: str) -> Json:
    """The Anthropic body that asks ``model`` to judge ``call`` of the request ``body``."""
    context = next(s.get("classifier_context") for s in body["safeguards"]
                   if isinstance(s, dict) and s.get("type") == SAFEGUARD)
    latest = next((m for m in reversed(body.get("messages") or ()) if isinstance(m, dict)
                   and m.get("role") == "user" and _plain_text(m.get("content"))), None)
    prompt = "\n\n".join([
        SAFEGUARD_INSTRUCTION,
        "classifier_context:\n" + json.dumps(context, ensure_ascii=False),
        "The user's latest request:\n" + (_plain_text(latest["content"]) if latest else "-"),
        "The action:\n" + json.dumps({"name": call.name, "input": json.loads(call.input_json)},
                                      ensure_ascii=False)])
    return {"model": model, "max_tokens": 400, "messages": [{"role": "user", "content": prompt}]}


def _plain_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(b["text"] for b in content or () if isinstance(b, dict)
                     and b.get("type") == "text" and isinstance(b.get("text"), str))


def safeguard_verdict(answer: str) -> Json:
    """The per-call result of a judgement the model wrote as ``answer``: ``evaluated``
    with its outcome, or ``unavailable`` (``error``) when it holds no usable verdict."""
    match = _JSON_OBJECT.search(answer)
    try:
        verdict = json.loads(match.group()) if match else None
    except (ValueError, RecursionError):
        verdict = None
    if not isinstance(verdict, dict) or verdict.get("outcome") not in SAFEGUARD_OUTCOMES:
        return {"type": "unavailable", "reason": "error"}
    result = {"type": "evaluated", "outcome": verdict["outcome"]}
    if isinstance(verdict.get("explanation"), str) and verdict["explanation"].strip():
        result["explanation"] = verdict["explanation"].strip()[:500]
    return result


def omits_thinking(body: Json) -> bool:
    """``thinking.display`` "omitted": the client wants signed blocks, no thinking text."""
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("display") == "omitted"


class _AnthropicContent(EventConsumer):
    """Folds neutral events into the ``content`` list of one Anthropic Message."""

    def __init__(self, *, omit_thinking: bool = False) -> None:
        super().__init__()
        self.content: list[Json] = []
        self.omit_thinking = omit_thinking

    def _last(self, block_type: str) -> Json | None:
        last = self.content[-1] if self.content else None
        return last if last is not None and last["type"] == block_type else None

    def on_text(self, event: Text) -> None:
        last = self._last("text")
        if last is not None:
            last["text"] += event.text
        else:
            self.content.append({"type": "text", "text": event.text})

    def on_thinking(self, event: Thinking) -> None:
        if self.omit_thinking:
            return
        last = self._last("thinking")
        if last is not None:
            last["thinking"] += event.text
        else:
            self.content.append({"type": "thinking", "thinking": event.text, "signature": ""})

    def on_signature(self, event: ThinkingSignature) -> None:
        last = self._last("thinking")
        if last is not None:
            last["signature"] += event.signature
        elif self.omit_thinking:  # the signature carries the reasoning to the next turn
            self.content.append({"type": "thinking", "thinking": "",
                                 "signature": event.signature})

    def on_redacted(self, event: RedactedThinking) -> None:
        self.content.append({"type": "redacted_thinking", "data": event.data})

    def on_tool_call(self, event: ToolCall) -> None:
        self.content.append({"type": "tool_use", "id": event.id, "name": event.name,
                             "input": json.loads(event.input_json)})

    def on_search_call(self, event: SearchCall) -> None:
        self.content.append(search_use_block(event))

    def on_search_result(self, event: SearchResult) -> None:
        self.content.append(search_result_block(event))


def search_use_block(event: SearchCall) -> Json:
    return {"type": "server_tool_use", "id": event.id, "name": SEARCH_TOOL,
            "input": {"query": event.query}}


def search_result_block(event: SearchResult) -> Json:
    """Anthropic's ``web_search_tool_result``: the pages found, or the error."""
    if event.error is not None:
        content: Any = {"type": "web_search_tool_result_error", "error_code": event.error}
    else:
        content = [{"type": "web_search_result", "title": r["title"], "url": r["url"],
                    "encrypted_content": r["snippet"], "page_age": page_age(r["published"])}
                   for r in event.results]
    return {"type": "web_search_tool_result", "tool_use_id": event.tool_use_id,
            "content": content}


def collect_anthropic(events: Iterable[Event], *, message_id: str, model: str,
                      stop_reason: str, usage: Usage, stop_sequence: str | None = None,
                      omit_thinking: bool = False, safeguards: bool = False,
                      verdicts: Mapping[str, Json] | None = None) -> Json:
    """Fold neutral events into one non-streaming Anthropic Message."""
    fold = _AnthropicContent(omit_thinking=omit_thinking)
    fold.consume(events)
    message = {
        "id": message_id, "type": "message", "role": "assistant", "model": model,
        "content": fold.content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
        "usage": _usage_json(usage),
    }
    if safeguards:
        message["safeguard_results"] = safeguard_results(
            (block["id"] for block in fold.content if block["type"] == "tool_use"), verdicts)
    return message


class AnthropicStream(EventConsumer):
    """Renders neutral events as Anthropic Messages SSE.

    Content blocks open lazily (no empty blocks), indexes only grow, and every
    block that opens is closed before ``message_delta``.
    """

    PING = b'event: ping\ndata: {"type":"ping"}\n\n'

    def keepalive(self) -> bytes:
        return self.PING

    def __init__(self, *, message_id: str, model: str, input_tokens: int,
                 omit_thinking: bool = False, safeguards: bool = False) -> None:
        super().__init__()
        self.message_id = message_id
        self.model = model
        self.input_tokens = input_tokens
        self.omit_thinking = omit_thinking
        # With safeguards asked for, the ids of the tool calls sent, and the verdicts
        # a check gave (--safeguards kiro fills them in).
        self.tool_use_ids: list[str] | None = [] if safeguards else None
        self.verdicts: dict[str, Json] = {}
        self._index = -1
        self._open: str | None = None  # "text" | "thinking" | None
        self._delta_head = b""  # the open block's content_block_delta, up to "delta":
        self._text_head = b""  # the same, then a text_delta up to its text

    def start(self) -> bytes:
        message = {
            "id": self.message_id, "type": "message", "role": "assistant", "content": [],
            "model": self.model, "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
        }
        return sse("message_start", {"type": "message_start", "message": message}) + self.PING

    def _begin(self, kind: str, block: str) -> bytes:
        out = self._close()
        self._index += 1
        self._open = kind
        self._delta_head = (b'event: content_block_delta\ndata: {"type":"content_block_delta",'
                            b'"index":%d,"delta":' % self._index)
        self._text_head = self._delta_head + b'{"type":"text_delta","text":'
        return out + (
            b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,'
            b'"content_block":%s}\n\n' % (self._index, block.encode("utf-8", "backslashreplace"))
        )

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return (b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
                % self._index)

    def _delta(self, head: bytes, value: str) -> bytes:
        """A delta of the open block: ``head`` (its type and key), then ``value`` as JSON."""
        # backslashreplace writes a lone surrogate as the JSON escape it came from.
        return (self._delta_head + head + _json_string(value).encode("utf-8", "backslashreplace")
                + _DELTA_END)

    def on_text(self, event: Text) -> bytes:
        if self._open != "text":
            return (self._begin("text", '{"type":"text","text":""}')
                    + self._delta(b'{"type":"text_delta","text":', event.text))
        # The hot path (a frame of text into an open block): no call beyond the escape.
        return (self._text_head + _json_string(event.text).encode("utf-8", "backslashreplace")
                + _DELTA_END)

    def on_thinking(self, event: Thinking) -> bytes:
        if self.omit_thinking:
            return b""
        return self._open_thinking() + self._delta(b'{"type":"thinking_delta","thinking":',
                                                   event.text)

    def _open_thinking(self) -> bytes:
        return b"" if self._open == "thinking" else self._begin(
            "thinking", '{"type":"thinking","thinking":"","signature":""}')

    def on_signature(self, event: ThinkingSignature) -> bytes:
        if self.omit_thinking:  # a block of its own: the signature alone
            begin = self._open_thinking()
        elif self._open != "thinking":
            return b""
        else:
            begin = b""
        return begin + self._delta(b'{"type":"signature_delta","signature":', event.signature)

    def on_redacted(self, event: RedactedThinking) -> bytes:
        return self._begin("redacted_thinking", '{"type":"redacted_thinking","data":'
                           + _json_string(event.data) + "}") + self._close()

    def on_tool_call(self, event: ToolCall) -> bytes:
        if self.tool_use_ids is not None:
            self.tool_use_ids.append(event.id)
        return (self._begin("tool_use", '{"type":"tool_use","id":%s,"name":%s,"input":{}}'
                            % (_json_string(event.id), _json_string(event.name)))
                + self._delta(b'{"type":"input_json_delta","partial_json":', event.input_json)
                + self._close())

    def on_search_call(self, event: SearchCall) -> bytes:
        # As Anthropic streams it: the input, empty at the start, then in a delta.
        block = {**search_use_block(event), "input": {}}
        return (self._begin("server_tool_use", json.dumps(block, ensure_ascii=False))
                + self._delta(b'{"type":"input_json_delta","partial_json":',
                              json.dumps({"query": event.query}, ensure_ascii=False))
                + self._close())

    def on_search_result(self, event: SearchResult) -> bytes:
        return self._begin("web_search_tool_result", json.dumps(
            search_result_block(event), ensure_ascii=False)) + self._close()

    def finish(self, stop_reason: str, usage: Usage, stop_sequence: str | None = None) -> bytes:
        delta = {"type": "message_delta",
                 "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                 "usage": _usage_json(usage)}
        if self.tool_use_ids is not None:
            delta["delta"]["safeguard_results"] = safeguard_results(self.tool_use_ids,
                                                                    self.verdicts)
        return self._close() + sse("message_delta", delta) + MESSAGE_STOP

    def error(self, failure: Failure) -> bytes:
        """An in-band error that ends the stream (no ``message_stop`` follows)."""
        return sse("error", anthropic_error(failure))

    def collect(self, events: Iterable[Event], stop_reason: str, usage: Usage,
                stop_sequence: str | None = None) -> Json:
        return collect_anthropic(events, message_id=self.message_id, model=self.model,
                                 stop_reason=stop_reason, usage=usage,
                                 stop_sequence=stop_sequence, omit_thinking=self.omit_thinking,
                                 safeguards=self.tool_use_ids is not None,
                                 verdicts=self.verdicts)


# OpenAI rendering #########################################################

FINISH_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls",
    "max_tokens": "length", "model_context_window_exceeded": "length",
    "refusal": "content_filter",
}


def finish_reason(stop_reason: str) -> str:
    """Anthropic ``stop_reason`` -> OpenAI ``finish_reason``."""
    return FINISH_REASONS.get(stop_reason, "stop")


def openai_usage(usage: Usage) -> Json:
    # OpenAI's prompt_tokens counts every prompt token, cached ones included.
    prompt = (usage.input_tokens + (usage.cache_read_input_tokens or 0)
              + (usage.cache_creation_input_tokens or 0))
    data: Json = {"prompt_tokens": prompt, "completion_tokens": usage.output_tokens,
                  "total_tokens": prompt + usage.output_tokens}
    if usage.cache_read_input_tokens is not None:
        data["prompt_tokens_details"] = {"cached_tokens": usage.cache_read_input_tokens}
    return data


DONE = b"data: [DONE]\n\n"


# Any 4xx without a kind of its own is an invalid_request_error to OpenAI,
# unknown URLs and models too.
OPENAI_ERROR_TYPES = {  # Failure.kind -> OpenAI's error type
    "invalid_request": "invalid_request_error", "authentication": "authentication_error",
    "billing": "insufficient_quota", "permission": "permission_error",
    "not_found": "invalid_request_error", "too_large": "invalid_request_error",
    "rate_limit": "rate_limit_exceeded", "internal": "server_error", "upstream": "server_error",
    "unavailable": "server_error", "timeout": "server_error", "overloaded": "server_error",
}


def openai_error(failure: Failure) -> Json:
    """The OpenAI error envelope of ``failure``."""
    return {"error": {"message": failure.message,
                      "type": OPENAI_ERROR_TYPES.get(failure.kind, "server_error"),
                      "param": failure.param, "code": failure.code}}


class _OpenAIMessage(EventConsumer):
    """Folds neutral events into the parts of one ``chat.completion`` message."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.thinking: list[str] = []
        self.tool_calls: list[Json] = []
        self.sources: list[Json] = []  # of the web searches run for the answer

    def on_text(self, event: Text) -> None:
        self.texts.append(event.text)

    def on_thinking(self, event: Thinking) -> None:
        self.thinking.append(event.text)

    def on_signature(self, event: ThinkingSignature) -> None:
        pass  # no place for it in this format

    def on_redacted(self, event: RedactedThinking) -> None:
        pass

    def on_tool_call(self, event: ToolCall) -> None:
        self.tool_calls.append({"id": event.id, "type": "function",
                                "function": {"name": event.name,
                                             "arguments": event.input_json}})

    def on_search_call(self, event: SearchCall) -> None:
        pass  # the search is kiro2api's; its sources go in the annotations

    def on_search_result(self, event: SearchResult) -> None:
        self.sources += event.results


def url_citations(sources: list[Json], text: str) -> list[Json]:
    """The pages searches found, as OpenAI ``url_citation`` annotations: where the
    answer names a page's URL, that span; the others over the whole answer."""
    cited = []
    for source in sources:
        start = text.find(source["url"])
        span = (start, start + len(source["url"])) if start >= 0 else (0, len(text))
        cited.append({"type": "url_citation", "url_citation": {
            "url": source["url"], "title": source["title"],
            "start_index": span[0], "end_index": span[1]}})
    return cited


def collect_openai(events: Iterable[Event], *, completion_id: str, model: str, created: int,
                   stop_reason: str, usage: Usage) -> Json:
    """Fold neutral events into one non-streaming ``chat.completion``."""
    fold = _OpenAIMessage()
    fold.consume(events)
    tool_calls = fold.tool_calls
    text = "".join(fold.texts)
    message: Json = {"role": "assistant", "content": text or (None if tool_calls else ""),
                     "refusal": None}
    if fold.thinking:
        message["reasoning_content"] = "".join(fold.thinking)
    if tool_calls:
        message["tool_calls"] = tool_calls
    if fold.sources:
        message["annotations"] = url_citations(fold.sources, text)
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish_reason(stop_reason)}],
        "usage": openai_usage(usage),
    }


_CUT = "\0"  # where a pre-spelled chunk takes its value (no JSON text holds a NUL)


class OpenAIStream(EventConsumer):
    """Renders neutral events as OpenAI Chat Completions chunks (``data:`` lines only).

    Tool calls are numbered among themselves (``index`` 0, 1, ...). A call's
    id, type and name appear only in its first delta: clients rebuild a call
    by concatenating every string field of its deltas. Thinking goes out as
    ``reasoning_content``; its signatures and redacted
    thinking have no place in this format.
    """

    def keepalive(self) -> bytes:
        return b": keep-alive\n\n"  # an SSE comment: clients skip it

    def __init__(self, *, completion_id: str, model: str, created: int,
                 include_usage: bool = False) -> None:
        super().__init__()
        self.completion_id = completion_id
        self.model = model
        self.created = created
        head = json.dumps({"id": completion_id, "object": "chat.completion.chunk",
                           "created": created, "model": model},
                          ensure_ascii=False, separators=(",", ":"))
        self._head = b"data: " + head[:-1].encode("utf-8", "backslashreplace")  # no "}"
        self.include_usage = include_usage
        self._tool_index = -1
        # The text and reasoning chunks, spelled once by _chunk and cut where the
        # value goes: the per-frame path only joins bytes.
        self._content = self._chunk('{"content":%s}' % _CUT).split(_CUT.encode())
        self._reasoning = self._chunk('{"reasoning_content":%s}' % _CUT).split(_CUT.encode())

    def _chunk(self, delta: str | None, finish: str | None = None, usage: Usage | None = None,
               ) -> bytes:
        """The one place a chunk is spelled; ``delta`` None gives the ``choices: []`` one."""
        if delta is None:
            choices = "[]"
        else:
            choices = '[{"index":0,"delta":%s,"finish_reason":%s}]' % (
                delta, f'"{finish}"' if finish else "null")
        tail = ""
        if self.include_usage:  # then every chunk has the key, null but on the last
            tail = ',"usage":' + (json.dumps(openai_usage(usage), separators=(",", ":"))
                                  if usage is not None else "null")
        return b'%s,"choices":%s%s}\n\n' % (
            self._head, choices.encode("utf-8", "backslashreplace"), tail.encode())

    def start(self) -> bytes:
        return self._chunk('{"role":"assistant","content":""}')

    def on_text(self, event: Text) -> bytes:
        head, tail = self._content
        return head + _json_string(event.text).encode("utf-8", "backslashreplace") + tail

    def on_thinking(self, event: Thinking) -> bytes:
        head, tail = self._reasoning
        return head + _json_string(event.text).encode("utf-8", "backslashreplace") + tail

    def on_signature(self, event: ThinkingSignature) -> bytes:
        return b""  # no place for it in this format

    def on_redacted(self, event: RedactedThinking) -> bytes:
        return b""

    def on_search_call(self, event: SearchCall) -> bytes:
        return b""  # the search is kiro2api's; the chunks have no place for it

    def on_search_result(self, event: SearchResult) -> bytes:
        return b""

    def on_tool_call(self, event: ToolCall) -> bytes:
        self._tool_index += 1
        return self._chunk(
            '{"tool_calls":[{"index":%d,"id":%s,"type":"function","function":'
            '{"name":%s,"arguments":""}}]}'
            % (self._tool_index, _json_string(event.id), _json_string(event.name))
        ) + self._chunk('{"tool_calls":[{"index":%d,"function":{"arguments":%s}}]}'
                        % (self._tool_index, _json_string(event.input_json)))

    def finish(self, stop_reason: str, usage: Usage, stop_sequence: str | None = None) -> bytes:
        out = self._chunk("{}", finish_reason(stop_reason))  # which sequence: no field for it
        if self.include_usage:
            out += self._chunk(None, usage=usage)
        return out + DONE

    def error(self, failure: Failure) -> bytes:
        """An in-band error that ends the stream (no ``[DONE]`` follows)."""
        return sse(None, openai_error(failure))

    def collect(self, events: Iterable[Event], stop_reason: str, usage: Usage,
                stop_sequence: str | None = None) -> Json:
        return collect_openai(events, completion_id=self.completion_id, model=self.model,
                              created=self.created, stop_reason=stop_reason, usage=usage)


# OpenAI Responses rendering ###############################################
#
# A Responses stream is a sequence of numbered events around output items
# (PROTOCOL-2026.md 10.15.4): each item (a message, a reasoning summary, a
# function or custom tool call) is opened with ``output_item.added`` before
# any delta and closed with an ``output_item.done`` that carries the whole
# item, because Codex builds its turn from those; the stream ends with one
# terminal event that carries the whole response.

# Assembler stop reasons that end a response as incomplete, and the reason given.
INCOMPLETE_REASONS = {"max_tokens": "max_output_tokens",
                      "model_context_window_exceeded": "max_output_tokens",
                      "refusal": "content_filter"}
# Failure.kind -> the error code of ``response.failed``. Codex sends the whole
# request again after server_error and rate_limit_exceeded (five more Kiro
# calls), and stops at once on the others (10.15.5): only what a retry could
# fix may look retryable. insufficient_quota is for credits alone: Codex shows
# its own "Quota exceeded" for it, while invalid_prompt shows our message (a
# suspended account, a refused login, a model Kiro does not have).
RESPONSES_ERROR_CODES = {
    "invalid_request": "invalid_prompt", "authentication": "invalid_prompt",
    "not_found": "invalid_prompt", "too_large": "context_length_exceeded",
    "billing": "insufficient_quota", "permission": "invalid_prompt",
    "rate_limit": "rate_limit_exceeded",
}
# Codes a failure may carry that say more than its kind.
RESPONSES_FAILURE_CODES = frozenset({"context_length_exceeded", "insufficient_quota",
                                     "rate_limit_exceeded"})


def responses_error_code(failure: Failure) -> str:
    if failure.code in RESPONSES_FAILURE_CODES:
        return failure.code
    return RESPONSES_ERROR_CODES.get(failure.kind, "server_error")


def responses_usage(usage: Usage, reasoning_tokens: int) -> Json:
    # As on the chat route, input_tokens counts every prompt token, cached ones too.
    cached = usage.cache_read_input_tokens or 0
    written = usage.cache_creation_input_tokens or 0
    prompt = usage.input_tokens + cached + written
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
            "output_tokens": usage.output_tokens,
            "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens,
                                                              usage.output_tokens)},
            "total_tokens": prompt + usage.output_tokens}


def _response_echo(request: Json) -> Json:
    """The request's settings as a Response repeats them."""
    tools = [tool for tool in request.get("tools") or ()
             if isinstance(tool, dict) and tool.get("type") in ("function", "custom",
                                                                "namespace")]
    reasoning = request.get("reasoning") if isinstance(request.get("reasoning"), dict) else {}
    return {
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "parallel_tool_calls": request.get("parallel_tool_calls") is not False,
        "previous_response_id": None,
        "prompt_cache_key": request.get("prompt_cache_key"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "store": False,
        "temperature": request.get("temperature"),
        "tool_choice": request.get("tool_choice") or "auto",
        "tools": tools,
        "top_p": request.get("top_p"),
        "truncation": "disabled",
        "metadata": request.get("metadata") if isinstance(request.get("metadata"), dict)
        else {},
    }


class ResponsesStream(EventConsumer):
    """Renders neutral events as OpenAI Responses events (``event:`` and ``data:`` lines).

    One item is open at a time: text goes into a message item, thinking into
    a reasoning item's summary (its signature, or redacted thinking, into
    ``encrypted_content``); a tool call arrives whole and is one item, a
    ``function_call`` or, for a freeform tool, a ``custom_tool_call`` with the
    text as ``input``, under the name and namespace the client declared.
    Every event has the next ``sequence_number``; keep-alives are
    ``response.in_progress`` events, which reset Codex's idle timer.
    """

    def __init__(self, *, response_id: str, model: str, created: int, request: Json) -> None:
        super().__init__()
        self.response_id = response_id
        self._suffix = response_id.partition("_")[2] or response_id
        self._base: Json = {"id": response_id, "object": "response", "created_at": created,
                            "model": model, "background": False, "error": None,
                            "incomplete_details": None, **_response_echo(request)}
        self._tools = {flat: declared for flat, (declared, _) in
                       responses_tools(request).items()}
        self._sequence = -1
        self.output: list[Json] = []  # the items closed so far
        self._open: Json | None = None  # the message or reasoning item open now
        self._texts: list[str] = []  # its text so far
        self._signature = ""  # of the reasoning item open now
        self._in_message = False  # the open item is a message
        self._delta_head = b""  # the open message's output_text.delta, up to its text
        self._reasoning_chars = 0
        self._searches: dict[str, Json] = {}  # search call id -> its web_search_call item

    # The event machinery

    def _event(self, kind: str, fields: Json) -> bytes:
        self._sequence += 1
        return sse(kind, {"type": kind, **fields, "sequence_number": self._sequence})

    def _response(self, status: str, **fields: Any) -> Json:
        # The status after the output: the end of the event says how the response ended.
        return {**self._base, "output": self.output, "status": status, "usage": None, **fields}

    def start(self) -> bytes:
        snapshot = self._response("in_progress", output=[])
        return (self._event("response.created", {"response": snapshot})
                + self._event("response.in_progress", {"response": snapshot}))

    def keepalive(self) -> bytes:
        return self._event("response.in_progress",
                           {"response": self._response("in_progress", output=[])})

    def _item_id(self, prefix: str) -> str:
        return f"{prefix}_{self._suffix}_{len(self.output)}"

    def _begin(self, item: Json) -> bytes:
        """Close the open item, and open ``item`` as the next one."""
        out = self._close()
        item["id"] = self._item_id(item["id"])
        self._open = item
        return out + self._event("response.output_item.added",
                                 {"output_index": len(self.output), "item": item})

    def _done(self, item: Json) -> bytes:
        """Close ``item``: it is the next output item, whole."""
        out = self._event("response.output_item.done",
                          {"output_index": len(self.output), "item": item})
        self.output.append(item)
        return out

    def _close(self, status: str = "completed") -> bytes:
        item, self._open = self._open, None
        self._in_message = False
        if item is None:
            return b""
        if item["type"] not in ("message", "reasoning"):  # a search cut short
            return self._done({**item, "status": "incomplete"})
        text = "".join(self._texts)
        self._texts = []
        where = {"item_id": item["id"], "output_index": len(self.output)}
        if item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out = (self._event("response.output_text.done",
                               {**where, "content_index": 0, "text": text, "logprobs": []})
                   + self._event("response.content_part.done",
                                 {**where, "content_index": 0, "part": part}))
            return out + self._done({**item, "status": status, "content": [part]})
        part = {"type": "summary_text", "text": text}
        out = (self._event("response.reasoning_summary_text.done",
                           {**where, "summary_index": 0, "text": text})
               + self._event("response.reasoning_summary_part.done",
                             {**where, "summary_index": 0, "part": part}))
        return out + self._done({**item, "summary": [part],
                                 "encrypted_content": self._signature or None})

    # One method per neutral event

    def on_text(self, event: Text) -> bytes:
        if not self._in_message:
            return self._open_message() + self.on_text(event)
        # The hot path (a frame of text into an open message): bytes joined, no dict.
        self._texts.append(event.text)
        self._sequence += 1
        return (self._delta_head + _json_string(event.text).encode("utf-8", "backslashreplace")
                + b',"sequence_number":%d}\n\n' % self._sequence)

    def _open_message(self) -> bytes:
        item = {"id": "msg", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}
        out = self._begin(item)
        self._in_message = True
        index = len(self.output)
        self._delta_head = (b'event: response.output_text.delta\ndata: {"type":'
                            b'"response.output_text.delta","item_id":"%s","output_index":%d,'
                            b'"content_index":0,"logprobs":[],"delta":'
                            % (item["id"].encode(), index))
        return out + self._event("response.content_part.added", {
            "item_id": item["id"], "output_index": index, "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})

    def on_thinking(self, event: Thinking) -> bytes:
        self._reasoning_chars += len(event.text)
        out = b""
        if self._open is None or self._open["type"] != "reasoning":
            item = {"id": "rs", "type": "reasoning", "summary": []}
            out = self._begin(item) + self._event("response.reasoning_summary_part.added", {
                "item_id": item["id"], "output_index": len(self.output), "summary_index": 0,
                "part": {"type": "summary_text", "text": ""}})
            self._signature = ""
        self._texts.append(event.text)
        return out + self._event("response.reasoning_summary_text.delta", {
            "item_id": self._open["id"], "output_index": len(self.output), "summary_index": 0,
            "delta": event.text})

    def on_signature(self, event: ThinkingSignature) -> bytes:
        if self._open is not None and self._open["type"] == "reasoning":
            self._signature += event.signature
        return b""

    def on_redacted(self, event: RedactedThinking) -> bytes:
        item = {"id": "rs", "type": "reasoning", "summary": [],
                "encrypted_content": event.data}
        return self._begin(item) + self._close_whole(item)

    def _close_whole(self, item: Json) -> bytes:
        """Close an item whose added event carried it whole already."""
        self._open = None
        self._in_message = False
        return self._done(item)

    def on_tool_call(self, event: ToolCall) -> bytes:
        declared = self._tools.get(event.name) or DeclaredTool("function", event.name)
        named = {"name": declared.name}
        if declared.namespace:
            named["namespace"] = declared.namespace
        if declared.kind == "custom":
            return self._custom_call(event, named)
        item = {"id": "fc", "type": "function_call", "status": "in_progress",
                "call_id": event.id, **named, "arguments": ""}
        out = self._begin(item)
        where = {"item_id": item["id"], "output_index": len(self.output)}
        out += self._event("response.function_call_arguments.delta",
                           {**where, "delta": event.input_json})
        out += self._event("response.function_call_arguments.done",
                           {**where, **named, "arguments": event.input_json})
        return out + self._close_whole({**item, "status": "completed",
                                        "arguments": event.input_json})

    def on_search_call(self, event: SearchCall) -> bytes:
        item = {"id": "ws", "type": "web_search_call", "status": "in_progress",
                "action": {"type": "search", "query": event.query}}
        out = self._begin(item)
        where = {"item_id": item["id"], "output_index": len(self.output)}
        self._searches[event.id] = item
        return (out + self._event("response.web_search_call.in_progress", where)
                + self._event("response.web_search_call.searching", where))

    def on_search_result(self, event: SearchResult) -> bytes:
        item = self._searches.pop(event.tool_use_id, None)
        if item is None or self._open is not item:
            return b""
        where = {"item_id": item["id"], "output_index": len(self.output)}
        done = {**item, "status": "failed" if event.error else "completed",
                "action": {**item["action"], "sources": [
                    {"type": "url", "url": r["url"]} for r in event.results]}}
        return (self._event("response.web_search_call.completed", where)
                + self._close_whole(done))

    def _custom_call(self, event: ToolCall, named: Json) -> bytes:
        text = freeform_input(event.input_json)
        item = {"id": "ctc", "type": "custom_tool_call", "status": "in_progress",
                "call_id": event.id, **named, "input": ""}
        out = self._begin(item)
        where = {"item_id": item["id"], "output_index": len(self.output)}
        out += self._event("response.custom_tool_call_input.delta", {**where, "delta": text})
        out += self._event("response.custom_tool_call_input.done", {**where, "input": text})
        return out + self._close_whole({**item, "status": "completed", "input": text})

    # Endings

    def _final(self, stop_reason: str, usage: Usage) -> tuple[str, Json]:
        reason = INCOMPLETE_REASONS.get(stop_reason)
        fields = {"usage": responses_usage(usage, math.ceil(self._reasoning_chars / 4))}
        if reason is None:
            return "response.completed", self._response("completed", **fields)
        return "response.incomplete", self._response(
            "incomplete", incomplete_details={"reason": reason}, **fields)

    def finish(self, stop_reason: str, usage: Usage, stop_sequence: str | None = None) -> bytes:
        out = self._close()
        kind, response = self._final(stop_reason, usage)
        return out + self._event(kind, {"response": response})

    def error(self, failure: Failure) -> bytes:
        """``response.failed``: the stream's one terminal event when the answer broke."""
        out = self._close("incomplete")
        error = {"code": responses_error_code(failure), "message": failure.message}
        return out + self._event("response.failed",
                                 {"response": self._response("failed", error=error)})

    def collect(self, events: Iterable[Event], stop_reason: str, usage: Usage,
                stop_sequence: str | None = None) -> Json:
        self.render(events)
        self._close()
        return self._final(stop_reason, usage)[1]


def freeform_input(input_json: str) -> str:
    """The raw text of a call to a freeform tool, from the JSON object Kiro's model sent."""
    arguments = json.loads(input_json)
    text = arguments.get(FREEFORM_FIELD)
    if isinstance(text, str):
        return text
    strings = [value for value in arguments.values() if isinstance(value, str)]
    return strings[0] if len(strings) == 1 else input_json


# Client APIs ##############################################################
#
# One object per client API, bundling what the relay needs: how its request
# body becomes an Anthropic Messages body (the one shape the payload builder
# takes), its renderer (which also collects a non-streamed answer), and its
# error envelope. Serving another API is one more object here, and its route.


@dataclass(frozen=True)
class ClientApi:
    """Everything kiro2api's relay needs to serve one client API."""

    name: str
    id_prefix: str  # of the answer's id: msg_..., chatcmpl-...
    normalise: Callable[[Any], Json]  # its request body -> an Anthropic Messages body
    renderer: Callable[[Json, Answer], Renderer]  # (its request body, the answer's facts)
    error_body: Callable[[Failure], Json]  # its error envelope
    # Statuses this API answers instead of a failure's own, by kind: OpenAI
    # has no 529, and says "overloaded" with a 503.
    statuses: Mapping[str, int] = field(default_factory=dict)
    # Whether a streamed answer reports Kiro's refusal in-band, as its first
    # events, rather than as an HTTP error: the HTTP status of a Responses
    # call decides how often Codex calls again (PROTOCOL-2026.md 10.15.5).
    refusals_in_band: bool = False

    def status(self, failure: Failure) -> int:
        return self.statuses.get(failure.kind, failure.status)


def _anthropic_body(body: Any) -> Json:
    return body  # already the shape; anthropic_to_codewhisperer checks it


def _anthropic_renderer(body: Json, answer: Answer) -> Renderer:
    return AnthropicStream(message_id=answer.id, model=answer.model,
                           input_tokens=answer.input_tokens, omit_thinking=omits_thinking(body),
                           safeguards=wants_safeguards(body))


def _openai_renderer(body: Json, answer: Answer) -> Renderer:
    include_usage = (body.get("stream_options") or {}).get("include_usage") is True
    return OpenAIStream(completion_id=answer.id, model=answer.model, created=answer.created,
                        include_usage=include_usage)


def _responses_renderer(body: Json, answer: Answer) -> Renderer:
    return ResponsesStream(response_id=answer.id, model=answer.model, created=answer.created,
                           request=body)


ANTHROPIC_MESSAGES = ClientApi("anthropic-messages", "msg_", _anthropic_body,
                               _anthropic_renderer, anthropic_error)
OPENAI_CHAT = ClientApi("openai-chat-completions", "chatcmpl-", openai_to_anthropic,
                        _openai_renderer, openai_error, {"overloaded": 503})
OPENAI_RESPONSES = ClientApi("openai-responses", "resp_", responses_to_anthropic,
                             _responses_renderer, openai_error, {"overloaded": 503},
                             refusals_in_band=True)


# Kiro request dialects ####################################################
#
# One conversationState travels in three envelopes (PROTOCOL-2026.md 10.1.2):
# the IDE's REST call, kiro-cli's RPC call (v2) and the newer "KAS" RPC call
# (kiro-cli --v3, IDE 1.x). Hosts accept different ones per account kind, so
# each dialect is data; ``kiro_request`` builds the headers and the body of
# one call from it. The web layer picks the dialects to try, in order.


@dataclass(frozen=True)
class Dialect:
    """How one kind of Kiro client shapes a ``GenerateAssistantResponse`` call."""

    name: str
    path: str  # appended to the host's URL
    content_type: str
    target: str | None  # x-amz-target of the RPC envelopes
    origin: str  # every user message's origin
    agent_mode: str  # where "vibe" goes: "header", "state" (agentTaskType only) or "top"
    continuation: bool  # an agentContinuationId per call


IDE = Dialect("ide", "/generateAssistantResponse", "application/json", None, ORIGIN,
              "header", False)
CLI = Dialect("cli", "/", "application/x-amz-json-1.0",
              "AmazonCodeWhispererStreamingService.GenerateAssistantResponse", "KIRO_CLI",
              "state", True)
KAS = Dialect("kas", "/", "application/x-amz-json-1.0",
              "KiroRuntimeService.GenerateAssistantResponse", ORIGIN, "top", True)
DIALECTS = {d.name: d for d in (IDE, CLI, KAS)}


@dataclass(frozen=True)
class ClientVersions:
    """The client versions presented to Kiro (``--kiro-version``).

    The service refuses IDE versions below about 0.12 with 403 "User is not
    authorized to make this call." (PROTOCOL-2026.md 10.2); these defaults
    are the releases seen in September 2026.
    """

    ide: str = "1.1.14"
    cli: str = "2.23.1"
    kas: str = "0.66.8"
    sdk: str = "1.0.34"  # aws-sdk-js of the IDE

    @classmethod
    def parse(cls, text: str) -> ClientVersions:
        """``1.1.14`` (the IDE's) or ``ide=1.1.14,cli=2.23.1,kas=0.66.8,sdk=1.0.34``."""
        values: dict[str, str] = {}
        for item in (part.strip() for part in text.split(",")):
            name, sep, version = item.rpartition("=")
            name = name.strip().lower() if sep else "ide"
            version = version.strip()
            if name not in cls.__dataclass_fields__ or not _VERSION.fullmatch(version):
                raise ValueError(f"not a client version: {item!r} (say e.g. 1.1.14 or "
                                 f"ide=1.1.14,cli=2.23.1)")
            values[name] = version
        return cls(**values)


_VERSION = re.compile(r"\d+(?:\.\d+){1,3}")
# Kiro's name for each credential's kind, sent as TokenType (10.3, 10.6, 10.7).
TOKEN_TYPES = {"external_idp": "EXTERNAL_IDP", "api_key": "API_KEY"}


def user_agents(dialect: Dialect, versions: ClientVersions, machine_id: str,
                os_name: str) -> tuple[str, str]:
    """``User-Agent`` and ``x-amz-user-agent`` as the dialect's client sends them."""
    if dialect is CLI:  # kiro-cli's Rust SDK (10.1.3)
        head = (f"aws-sdk-rust/1.3.15 ua/2.1 api/codewhispererstreaming/0.1.17975 "
                f"os/{os_name} lang/rust/1.92.0")
        tail = f"md/appVersion-{versions.cli} app/AmazonQ-For-CLI"
        return f"{head} {tail}", f"{head} m/F {tail}"
    if dialect is KAS:
        tail = (f"KiroCLI/{versions.cli} KAS/{versions.kas} os/{os_name} "
                f"md/appVersion-{versions.cli} app/AmazonQ-For-CLI")
        return (f"aws-sdk-js/1.0.0 ua/2.1 os/{os_name} lang/js md/nodejs#22.22.2 "
                f"api/kiroruntime#1.0.0 m/N {tail}", f"aws-sdk-js/1.0.0 {tail}")
    agent = f"KiroIDE-{versions.ide}-{machine_id}"
    return (f"aws-sdk-js/{versions.sdk} ua/2.1 os/{os_name} lang/js md/nodejs#20.16.0 "
            f"api/codewhispererstreaming#{versions.sdk} m/E {agent}",
            f"aws-sdk-js/{versions.sdk} {agent}")


def kiro_headers(dialect: Dialect, *, access_token: str, kind: str, machine_id: str,
                 versions: ClientVersions, os_name: str, invocation_id: str,
                 profile_arn: str | None = None) -> dict[str, str]:
    """The headers of one call in ``dialect`` for a credential of ``kind``."""
    user_agent, amz_user_agent = user_agents(dialect, versions, machine_id, os_name)
    headers = {
        "Authorization": f"Bearer {access_token}",
        "Content-Type": dialect.content_type,
        "Accept": "application/json" if dialect is IDE else "*/*",
        "x-amzn-codewhisperer-optout": "true",
        "x-amz-user-agent": amz_user_agent,
        "User-Agent": user_agent,
        "amz-sdk-invocation-id": invocation_id,
        "amz-sdk-request": "attempt=1; max=3",
    }
    if dialect.target:
        headers["x-amz-target"] = dialect.target
    if dialect.agent_mode == "header":
        headers["x-amzn-kiro-agent-mode"] = "vibe"
    if dialect is KAS:
        headers["x-amzn-kiro-client-attribution"] = "unrecognized"
    if kind in TOKEN_TYPES:
        headers["TokenType"] = TOKEN_TYPES[kind]
    if profile_arn:
        headers["x-amzn-kiro-profile-arn"] = profile_arn
    return headers


def kiro_body(payload: Json, dialect: Dialect, *, profile_arn: str | None,
              continuation_id: str) -> Json:
    """``payload`` (from ``anthropic_to_codewhisperer``) as ``dialect`` sends it.

    A new top level and conversationState: the prepared payload is left as it
    is, so every attempt on another host or dialect starts from the same one.
    """
    state = dict(payload["conversationState"])
    if dialect.origin != ORIGIN:
        state["currentMessage"] = _with_origin(state["currentMessage"], dialect.origin)
        if "history" in state:
            state["history"] = [_with_origin(item, dialect.origin) for item in state["history"]]
    if dialect.continuation:
        state["agentContinuationId"] = continuation_id
    body: Json = {"conversationState": state}
    if "additionalModelRequestFields" in payload:
        body["additionalModelRequestFields"] = payload["additionalModelRequestFields"]
    if dialect.agent_mode == "top":
        body["agentMode"] = "vibe"
    if profile_arn:
        body["profileArn"] = profile_arn
    return body


def _with_origin(item: Json, origin: str) -> Json:
    message = item.get("userInputMessage")
    if message is None:
        return item
    return {**item, "userInputMessage": {**message, "origin": origin}}


# Hosts, account kinds and what Kiro's refusals mean #######################
#
# Which dialect works, and whether the call carries a profile ARN, depends on
# the kind of account and on the host (PROTOCOL-2026.md 10.3, 10.5): the
# ``runtime.{region}.kiro.dev`` service wants the RPC envelopes and an ARN;
# the legacy ``q.{region}.amazonaws.com`` takes the IDE's call, and Builder
# ID there only without an ARN. Each (kind, host family) lists its attempts
# in order; a refusal that means "not this way" moves to the next one.

KINDS = ("social", "builder_id", "idc", "external_idp", "api_key")
# The profile ARN a call carries: the account's own (from its file or looked
# up with ListAvailableProfiles), the service's (Builder ID on runtime), or none.
OWN_ARN, SERVICE_ARN, NO_ARN = "own", "service", "none"
SERVICE_PROFILE_ARN = "arn:aws:codewhisperer:us-east-1:638616132270:profile/AAAACCCCXXXX"
ATTEMPTS: dict[tuple[str, str], tuple[tuple[Dialect, str], ...]] = {
    ("runtime", "social"): ((CLI, OWN_ARN), (IDE, OWN_ARN)),
    ("runtime", "builder_id"): ((CLI, SERVICE_ARN),),
    ("runtime", "idc"): ((CLI, OWN_ARN), (KAS, OWN_ARN)),
    ("runtime", "external_idp"): ((CLI, OWN_ARN), (KAS, OWN_ARN)),
    ("runtime", "api_key"): ((CLI, NO_ARN),),
    ("legacy", "social"): ((IDE, OWN_ARN), (CLI, OWN_ARN)),
    ("legacy", "builder_id"): ((IDE, NO_ARN),),
    ("legacy", "idc"): ((IDE, OWN_ARN), (CLI, OWN_ARN)),
    ("legacy", "external_idp"): ((IDE, OWN_ARN), (CLI, OWN_ARN)),
    ("legacy", "api_key"): ((CLI, NO_ARN),),
}
HOST_FAMILIES = ("runtime", "legacy")


def credential_kind(auth_method: str, provider: str | None = None,
                    profile_arn: str | None = None, start_url: str | None = None) -> str:
    """Which of KINDS a login is: IdC logins are Builder ID unless they name an
    organisation (a start URL, an ARN of their own, or a provider other than BuilderId)."""
    if auth_method != "idc":
        return auth_method
    if start_url or profile_arn or (provider or "").lower() not in ("", "builderid"):
        return "idc"
    return "builder_id"


def host_family(url: str) -> str:
    """``runtime`` or ``legacy``: a ``#runtime`` / ``#legacy`` suffix says so, else the
    host's name (``runtime.…`` is the current service, anything else is treated as legacy)."""
    base, _, fragment = url.partition("#")
    if fragment:
        return fragment
    host = base.partition("://")[2].partition("/")[0]
    return "runtime" if host.startswith("runtime.") else "legacy"


def api_region(profile_arn: str | None, fallback: str) -> str:
    """The region of Kiro's API: the profile ARN's (its 4th field), else ``fallback``."""
    if profile_arn and profile_arn.count(":") >= 5:
        return profile_arn.split(":")[3] or fallback
    return fallback


# What a refusal means for the next step (PROTOCOL-2026.md 10.5, 10.9).
NEXT_WAY = "next"  # this host or dialect will not do: try the next attempt
FIND_PROFILE = "profile"  # look the account's profile ARN up, then try again
REFRESH = "refresh"  # the access token may be stale: refresh once
SUSPENDED = "suspended"  # the service locked the account: set it aside for long
EXHAUSTED = "exhausted"  # out of credits until the monthly reset
CAPACITY = "capacity"  # the model is out of capacity: retried, then overloaded
EXHAUSTED_MAYBE = "exhausted?"  # a plain 429: throttled, or out of credits (ask the usage)
EMPTY = "empty"  # a 200 that ended before its first frame: ask again
UNSIGNED = "unsigned"  # a replayed thinking signature refused: once more without any
FINAL = "final"  # anything else: answer the client (after retries where those apply)

_NEXT_WAY_TEXTS = ("profilearn is required", "user is not authorized to make this call",
                   "does not support this application", "not supported for this operation")


def rejection(status: int, body: str) -> str:
    """What a non-200 answer to ``GenerateAssistantResponse`` means (one of the above)."""
    lowered = body.lower()
    if status == 403 and ("temporarily_suspended" in lowered or (
            "suspended" in lowered and "locked" in lowered)):
        return SUSPENDED
    if status == 402 or "monthly_request_count" in lowered:
        return EXHAUSTED
    if any(reason in body for reason in CAPACITY_REASONS):
        return CAPACITY
    if status == 400 and "invalid profilearn" in lowered:
        return FIND_PROFILE
    if status == 400 and "THINKING_SIGNATURE_INVALID" in body:
        return UNSIGNED
    if is_bearer_invalid(status, body):
        return REFRESH
    if status in (401, 403, 404) and (status != 403 or any(
            text in lowered for text in _NEXT_WAY_TEXTS)):
        return NEXT_WAY
    if status == 400 and "profilearn is required" in lowered:
        return NEXT_WAY
    if status == 429:
        return EXHAUSTED_MAYBE
    return FINAL


# Usage limits #############################################################


@dataclass(frozen=True)
class UsageLimits:
    """What ``GetUsageLimits`` says of an account's credits (PROTOCOL-2026.md 10.4.2)."""

    plan: str | None
    used: float | None
    limit: float | None
    overage: bool  # overage billing on: the account goes on past its limit
    reset_at: float | None  # epoch seconds
    days_until_reset: int | None
    trial: Json | None = None  # freeTrialInfo as Kiro wrote it
    overage_used: float | None = None  # credits billed past the limit this month
    # Credits beside the plan's: the free trial and bonuses (``extra_credits``).
    extra: tuple[Json, ...] = ()

    @property
    def exhausted(self) -> bool:
        return (self.used is not None and self.limit is not None and self.used >= self.limit
                and not self.overage)

    @property
    def percent(self) -> float | None:
        """How much of the limit is used, in per cent (None without a limit)."""
        if self.used is None or not self.limit:
            return None
        return 100.0 * self.used / self.limit

    @classmethod
    def from_fields(cls, fields: Json) -> UsageLimits:
        """Made again from ``dataclasses.asdict`` of one sent through JSON (another
        replica's): fields this version does not know are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in fields.items() if k in known}
        if isinstance(kept.get("extra"), list):
            kept["extra"] = tuple(e for e in kept["extra"] if isinstance(e, dict))
        return cls(**kept)


def usage_limits(answer: Any) -> UsageLimits | None:
    """A ``GetUsageLimits`` answer read; None when it is not one."""
    if not isinstance(answer, dict) or not isinstance(answer.get("usageBreakdownList"), list):
        return None
    rows = [r for r in answer["usageBreakdownList"] if isinstance(r, dict)]
    # By resource type, not by position: credits where the plan has them.
    row = next((r for kind in ("CREDIT", "AGENTIC_REQUEST") for r in rows
                if r.get("resourceType") == kind), rows[0] if rows else {})
    overage = answer.get("overageConfiguration")
    subscription = answer.get("subscriptionInfo")
    trial = row.get("freeTrialInfo")
    return UsageLimits(
        plan=subscription.get("subscriptionTitle") if isinstance(subscription, dict) else None,
        used=_first_number(row, "currentUsageWithPrecision", "currentUsage"),
        limit=_first_number(row, "usageLimitWithPrecision", "usageLimit"),
        overage=isinstance(overage, dict) and overage.get("overageStatus") == "ENABLED",
        reset_at=_number_or_none(answer.get("nextDateReset")),
        days_until_reset=_int_or_none(answer.get("daysUntilReset")),
        trial=trial if isinstance(trial, dict) else None,
        overage_used=_first_number(row, "currentOveragesWithPrecision", "currentOverages"),
        extra=extra_credits(row))


def extra_credits(row: Json) -> tuple[Json, ...]:
    """The credits a breakdown row reports beside the plan's, each as ``{"kind",
    "name", "status", "used", "limit", "expires_at"}`` (epoch seconds): its free
    trial (``freeTrialInfo``, PROTOCOL.md 2.7) and its bonuses (``bonuses``, as
    the IDE shows "Bonus credits"; the field names of a bonus are seen in peers,
    not in a capture of ours)."""
    found: list[Json] = []
    trial = row.get("freeTrialInfo")
    if isinstance(trial, dict):
        found.append({
            "kind": "free_trial", "name": "free trial",
            "status": _text_or_none(trial.get("freeTrialStatus")),
            "used": _first_number(trial, "currentUsageWithPrecision", "currentUsage"),
            "limit": _first_number(trial, "usageLimitWithPrecision", "usageLimit"),
            "expires_at": _epoch_or_none(trial.get("freeTrialExpiry"))})
    bonuses = row.get("bonuses")
    for bonus in bonuses if isinstance(bonuses, list) else ():
        if not isinstance(bonus, dict):
            continue
        found.append({
            "kind": "bonus",
            "name": _text_or_none(bonus.get("displayName")) or _text_or_none(
                bonus.get("bonusCode")) or "bonus",
            "status": _text_or_none(bonus.get("status")),
            "used": _first_number(bonus, "currentUsageWithPrecision", "currentUsage"),
            "limit": _first_number(bonus, "usageLimitWithPrecision", "usageLimit"),
            "expires_at": _epoch_or_none(bonus.get("expiresAt"))})
    return tuple(found)


def _first_number(data: Json, *keys: str) -> float | None:
    """The first of ``keys`` whose value in ``data`` is a finite number."""
    for key in keys:
        value = _number_or_none(data.get(key))
        if value is not None:
            return value
    return None


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _epoch_or_none(value: Any) -> float | None:
    """A moment as epoch seconds: a number as it is, an ISO 8601 text read; else None."""
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    return _number_or_none(value)
