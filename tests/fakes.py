"""A fake Kiro backend for the tests: a real aiohttp server, no mocks.

One ``FakeUpstream`` answers every URL kiro2api calls, so a test points
``--upstream``, ``--social-auth-url`` and ``--oidc-url`` at the same place:

- ``POST /generateAssistantResponse``: replies from ``script`` (a queue of
  ``Stream`` or ``Status`` objects); an empty queue answers ``answer``, by
  default a short greeting.
- ``POST /{tenant}/oauth2/v2.0/token``: an external IdP's token endpoint.
- ``POST /refreshToken`` (social) and ``POST /token`` (IdC), also under a
  ``/{region}/`` prefix for URL templates: replies from ``auth_script`` if
  anything is queued, else a fresh token pair numbered by how many refreshes
  there have been. ``auth_delay`` delays every auth reply; while
  ``auth_gate`` is set to an unset ``asyncio.Event``, auth replies wait for it.
  With ``rotate``, a refresh token works once, as Kiro's do: a used one gets
  400 ``invalid_grant`` (and lands in ``reused``); ``expires_in`` is the new
  tokens' lifetime.

- Today's service under a host prefix (see "Today's service" below):
  ``/runtime/`` and ``/q/`` answer ``GenerateAssistantResponse`` in every
  dialect with the 2026 rules per account kind, ``/management/`` the
  control-plane RPCs.

Every request is recorded in ``requests`` (path, headers, parsed JSON body).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web

import eventstream
from helpers import (  # noqa: F401 -- the token-file writer lives in helpers, re-exported
    CLIENT_ID, CLIENT_ID_HASH, CLIENT_SECRET, IDC_ACCESS, IDC_REFRESH, PROFILE_ARN, SOCIAL_ACCESS,
    SOCIAL_REFRESH, ide_time, write_token,
)

EVENT_HEADERS = {":content-type": "application/json", ":message-type": "event"}


def event(event_type: str, payload: dict[str, Any] | bytes) -> bytes:
    """One encoded ``event`` frame."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return eventstream.encode({":event-type": event_type, **EVENT_HEADERS}, body)


def exception(exception_type: str, message: str) -> bytes:
    """One encoded ``exception`` frame, as CodeWhisperer sends mid-stream."""
    headers = {
        ":exception-type": exception_type,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return eventstream.encode(headers, json.dumps({"message": message}).encode())


def text(*chunks: str) -> list[bytes]:
    return [event("assistantResponseEvent", {"content": c}) for c in chunks]


def tool(tool_use_id: str, name: str, *fragments: str, stop: bool = True) -> list[bytes]:
    """A tool call as CodeWhisperer streams it: name first, input in fragments."""
    frames = [event("toolUseEvent", {"toolUseId": tool_use_id, "name": name, "input": f})
              for f in fragments or ("",)]
    if stop:
        frames.append(event("toolUseEvent", {"toolUseId": tool_use_id, "name": name,
                                             "stop": True}))
    return frames


def tail(percentage: float = 1.5) -> list[bytes]:
    """The bookkeeping events that end a normal answer."""
    return [
        event("meteringEvent", {"unit": "credit", "unitPlural": "credits", "usage": 0.01}),
        event("contextUsageEvent", {"contextUsagePercentage": percentage}),
    ]


@dataclass
class Stream:
    """A 200 reply of event-stream bytes, written in chunks of ``split`` bytes.

    ``split`` cycles through its sizes, so ``(1, 7, 3)`` cuts frames (and
    multi-byte characters) at awkward places. ``delay`` sleeps before each
    write after the first; ``first_byte_delay`` before the first one.
    ``hang_up`` closes the connection abruptly after the bytes are written,
    without finishing the chunked body. ``gate``, if given, holds everything
    after the first write until the test sets it (an idle upstream, without
    timing).
    """

    frames: list[bytes]
    split: tuple[int, ...] = (7, 64, 1, 300)
    delay: float = 0.0
    first_byte_delay: float = 0.0
    hang_up: bool = False
    corrupt_at: int | None = None  # flip one bit of the byte at this offset
    gate: asyncio.Event | None = None

    def body(self) -> bytes:
        data = bytearray(b"".join(self.frames))
        if self.corrupt_at is not None:
            data[self.corrupt_at] ^= 0x01
        return bytes(data)


@dataclass
class Status:
    """A non-200 (or 200 JSON) reply."""

    status: int
    body: dict[str, Any] | str = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.script: deque[Stream | Status] = deque()
        self.models_script: deque[Status] = deque()  # ListAvailableModels failures, in turn
        self.auth_script: deque[Status] = deque()
        self.auth_delay = 0.0
        self.auth_gate: asyncio.Event | None = None
        self.refreshes = 0
        self.rotate = False
        self.spent: list[str] = []  # refresh tokens exchanged, in order (with rotate)
        self.reused: list[str] = []  # spent ones sent again
        self.expires_in = 3600
        # Answers of generateAssistantResponse being written now, and those
        # that kiro2api cut short by closing the connection.
        self.streaming = 0
        self.interrupted = 0
        # Today's service: account kinds by access token, suspended tokens,
        # the (host family, dialect) of each generate call, GetUsageLimits.
        self.kinds: dict[str, str] = {}
        self.suspended: set[str] = set()
        self.dialects: list[tuple[str, str]] = []
        self.usage_reply: Status | None = None
        self.usage_replies: dict[str, Status] = {}  # by access token, before usage_reply
        self.down: dict[str, tuple[int, dict[str, Any]]] = {}  # host family -> its refusal
        self.models_rpc = False  # /management/ answers ListAvailableModels too
        # Kiro's cache: with ``caching``, an answer in a conversation seen before
        # reports its prompt as read from the cache (CACHED_TOKENS of it).
        self.caching = False
        self.conversations: set[str] = set()
        self.search_script: deque[Status | dict[str, Any]] = deque()
        self.answer: Stream | None = None  # what an empty script answers, if not "Hello"

    def calls(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    async def wait_for(self, path: str, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until ``count`` requests to ``path`` have arrived."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.calls(path)) < count:
            assert asyncio.get_running_loop().time() < deadline, f"no request to {path}"
            await asyncio.sleep(0.01)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/generateAssistantResponse", self._generate)
        app.router.add_get("/ListAvailableModels", self._list_models)
        app.router.add_post("/refreshToken", self._social_refresh)
        app.router.add_post("/token", self._idc_refresh)
        app.router.add_post("/{region}/refreshToken", self._social_refresh)
        app.router.add_post("/{region}/token", self._idc_refresh)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._idp_refresh)
        app.router.add_post("/mcp", self._mcp)
        add_service_routes(self, app)
        return app

    # Kiro's web search (InvokeMCP web_search): what it finds for any query, or a
    # Status (or a JSON-RPC body) from ``search_script``, in turn.
    PAGES = [
        {"title": "Kiro changelog", "url": "https://kiro.dev/changelog/", "id": "1",
         "snippet": "December 2026: new models.", "publishedDate": 1764633600000,
         "domain": "kiro.dev"},
        {"title": "Kiro on GitHub", "url": "https://github.com/kirodotdev/Kiro", "id": "2",
         "snippet": "Issues and releases.", "publishedDate": None, "domain": "github.com"},
    ]

    async def _mcp(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if self.search_script:
            reply = self.search_script.popleft()
            if isinstance(reply, Status):
                return await self._status(reply)
            return web.json_response(reply)
        query = body["params"]["arguments"]["query"]
        found = {"results": self.PAGES, "totalResults": len(self.PAGES), "query": query}
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": {
            "isError": False, "content": [{"type": "text", "text": json.dumps(found)}]}})

    # What ListAvailableModels answers: a Status to fail, else this body.
    models_reply: Status | None = None
    MODELS = {"defaultModel": {"modelId": "auto"}, "models": [
        {"modelId": "claude-sonnet-4.5", "modelName": "Claude Sonnet 4.5",
         "tokenLimits": {"maxInputTokens": 200000, "maxOutputTokens": 64000}},
        {"modelId": "claude-opus-4.7", "modelName": "Claude Opus 4.7",
         "tokenLimits": {"maxInputTokens": 1000000, "maxOutputTokens": 64000}},
        {"modelId": "qwen3-coder-next", "modelName": "Qwen3 Coder Next",
         "tokenLimits": {"maxInputTokens": 256000}},
    ]}

    async def _list_models(self, request: web.Request, *, record: bool = True) -> web.Response:
        if record:
            await self._record(request)
        if self.models_script:
            return await self._status(self.models_script.popleft())
        if self.models_reply is not None:
            return await self._status(self.models_reply)
        return web.json_response(self.MODELS)

    async def _record(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        self.requests.append(Recorded(request.path, dict(request.headers), body))
        return body

    async def _generate(self, request: web.Request, *, record: bool = True
                        ) -> web.StreamResponse:
        if record:
            await self._record(request)
        reply = self.script.popleft() if self.script else (
            self.answer or Stream(text("Hello") + tail()))
        if isinstance(reply, Status):
            return await self._status(reply)
        if self.caching and record:
            reply = self._cached(self.requests[-1].body, reply)
        self.streaming += 1
        try:
            if reply.first_byte_delay:
                await asyncio.sleep(reply.first_byte_delay)
            return await self._write_stream(request, reply)
        except (ConnectionError, asyncio.CancelledError):
            self.interrupted += 1
            raise
        finally:
            self.streaming -= 1

    CACHED_TOKENS = 900

    def _cached(self, body: Any, reply: Stream) -> Stream:
        state = body.get("conversationState", {}) if isinstance(body, dict) else {}
        conversation = state.get("conversationId")
        hit = conversation in self.conversations
        self.conversations.add(conversation)
        usage = {"uncachedInputTokens": 100 if hit else 1000,
                 "cacheReadInputTokens": self.CACHED_TOKENS if hit else 0,
                 "cacheWriteInputTokens": 0 if hit else self.CACHED_TOKENS, "outputTokens": 5}
        return replace(reply, frames=reply.frames + [
            event("metadataEvent", {"tokenUsage": usage})])

    async def _write_stream(self, request: web.Request, reply: Stream) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "application/vnd.amazon.eventstream"}
        )
        await response.prepare(request)
        data = reply.body()
        pos = 0
        sizes = reply.split or (len(data) or 1,)
        i = 0
        while pos < len(data):
            if reply.delay and pos:
                await asyncio.sleep(reply.delay)
            if reply.gate is not None and pos:
                await reply.gate.wait()
            size = sizes[i % len(sizes)]
            await response.write(data[pos : pos + size])
            pos += size
            i += 1
        if reply.hang_up:
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write_eof()
        return response

    async def _status(self, reply: Status) -> web.Response:
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if isinstance(reply.body, str):
            return web.Response(status=reply.status, text=reply.body, headers=reply.headers)
        return web.json_response(reply.body, status=reply.status, headers=reply.headers)

    async def _social_refresh(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        return await self._refresh("social", profile_arn=True, body=body)

    async def _idc_refresh(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        return await self._refresh("idc", profile_arn=False, body=body)

    async def _idp_refresh(self, request: web.Request) -> web.Response:
        """An organisation's OAuth 2 token endpoint (Entra ID): a form in, snake_case
        out; the new access token is an external IdP's to the service routes."""
        form = dict(await request.post())
        self.requests.append(Recorded(request.path, dict(request.headers), form))
        if form.get("grant_type") != "refresh_token" or not form.get("client_id"):
            return web.json_response({"error": "invalid_request"}, status=400)
        self.refreshes += 1
        access = f"eyJ-idp-access-{self.refreshes}"
        self.kinds[access] = "external_idp"
        return web.json_response({"access_token": access, "token_type": "Bearer",
                                  "refresh_token": f"idp-refresh-{self.refreshes}",
                                  "expires_in": 3599, "scope": form.get("scope", "")})

    async def _refresh(self, kind: str, *, profile_arn: bool, body: Any = None) -> web.Response:
        if self.auth_delay:
            await asyncio.sleep(self.auth_delay)
        if self.auth_gate is not None:
            await self.auth_gate.wait()
        if self.auth_script:
            return await self._status(self.auth_script.popleft())
        if self.rotate:
            used = body.get("refreshToken") if isinstance(body, dict) else None
            if used in self.spent:
                self.reused.append(used)
                return web.json_response({"error": "invalid_grant",
                                          "error_description": "Invalid refresh token provided"},
                                         status=400)
            self.spent.append(used)
        self.refreshes += 1
        n = self.refreshes
        body = {
            "accessToken": f"aoa-{kind}-access-{n}",
            "refreshToken": f"aor-{kind}-refresh-{n}",
            "expiresIn": self.expires_in,
        }
        if profile_arn:
            body["profileArn"] = "arn:aws:codewhisperer:us-east-1:111122223333:profile/FAKE"
        else:
            body["tokenType"] = "Bearer"
        return web.json_response(body)


# What the tests expect kiro2api to send ##################################

MODEL_ID = "claude-sonnet-4.5"  # what the tests' "claude-sonnet-4-5..." resolves to


def user(content: str, **context: Any) -> dict[str, Any]:
    """An expected ``userInputMessage``; ``images`` and context members as keywords."""
    message: dict[str, Any] = {"content": content, "modelId": MODEL_ID, "origin": "AI_EDITOR"}
    if context.get("images"):
        message["images"] = context.pop("images")
    if context:
        message["userInputMessageContext"] = context
    return message


def state(current: dict[str, Any], history: list[Any] | None = None) -> dict[str, Any]:
    """An expected payload around ``current`` (conversation id "conv-1")."""
    out: dict[str, Any] = {"chatTriggerType": "MANUAL", "agentTaskType": "vibe",
                           "conversationId": "conv-1",
                           "currentMessage": {"userInputMessage": current}}
    if history:
        out["history"] = history
    return {"conversationState": out}


def U(content: str, **context: Any) -> dict[str, Any]:
    return {"userInputMessage": user(content, **context)}


def A(content: str, tool_uses: list[Any] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"content": content}
    if tool_uses:
        message["toolUses"] = tool_uses
    return {"assistantResponseMessage": message}


# Answers that break after they started: each must reach the client as an
# in-band error, never as a clean ending. (A hang-up before the first bytes
# are read is a failed call, asked again: the hang-up waits for them here.)
BROKEN_STREAMS = {
    "bad-crc": lambda: Stream(text("Hello", "world") + tail(), corrupt_at=130),
    "exception-frame": lambda: Stream(text("Hello")
                                      + [exception("ThrottlingException", "slow down")]),
    "hang-up-mid-frame": lambda: Stream(text("Hello", "world") + tail(), hang_up=True,
                                        split=(150,), delay=0.05),
    "truncated-body": lambda: Stream([text("Hello")[0], text("world")[0][:40]]),
}


class FakeClock:
    """A ``kiro2api.Clock`` that stands still until a test moves it with ``advance``."""

    def __init__(self) -> None:
        self.seconds = 1000.0
        self._start = datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return self.seconds

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self.seconds - 1000.0)

    def advance(self, seconds: float) -> None:
        self.seconds += seconds


async def until(condition: Any, timeout: float = 5.0) -> None:
    """Wait (on the real clock, at most ``timeout``) until ``condition()`` is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.005)


# Today's service (PROTOCOL-2026.md 10.1-10.9) #############################
#
# Under ``/runtime`` (runtime.{region}.kiro.dev) and ``/q`` (the legacy
# q.{region}.amazonaws.com), ``GenerateAssistantResponse`` is answered in the
# IDE's REST form (``…/generateAssistantResponse``) and the RPC forms (``…/``
# with an x-amz-target), with the rules the service applies in 2026; only a
# call that passes them takes the next reply from ``script``. The account's
# kind is known by its access token (``kinds``; ``ksk_`` keys are API keys).
# ``/management/`` answers ListAvailableProfiles and GetUsageLimits (each
# account's own from ``usage_replies``, by its access token, else
# ``usage_reply``, else USAGE_LIMITS); ``down`` makes a whole host family
# answer one refusal.

RPC_TARGETS = {"AmazonCodeWhispererStreamingService.GenerateAssistantResponse": "cli",
               "KiroRuntimeService.GenerateAssistantResponse": "kas"}
SERVICE_ARN = "arn:aws:codewhisperer:us-east-1:638616132270:profile/AAAACCCCXXXX"
IDC_PROFILE_ARN = "arn:aws:codewhisperer:eu-central-1:610548660232:profile/VNECVYCYYAWN"
NOT_AUTHORIZED = {"message": "User is not authorized to make this call.", "reason": None}
BEARER_INVALID = {"message": "The bearer token included in the request is invalid."}
ARN_REQUIRED = {"message": "profileArn is required for this request."}
SUSPENDED = {"message": "Your User ID (d-9067c98495.1234) temporarily is suspended. We've "
                        "locked your account as a security precaution.",
             "reason": "TEMPORARILY_SUSPENDED"}
EXHAUSTED = {"message": "You have reached the limit.", "reason": "MONTHLY_REQUEST_COUNT"}
USAGE_LIMITS = {
    "daysUntilReset": 12, "nextDateReset": 1798761600,
    "overageConfiguration": {"overageStatus": "DISABLED"},
    "subscriptionInfo": {"subscriptionTitle": "KIRO PRO", "type": "Q_DEVELOPER_STANDALONE_PRO"},
    "usageBreakdownList": [{"resourceType": "CREDIT", "unit": "INVOCATIONS", "currentUsage": 120,
                            "currentUsageWithPrecision": 120.5, "usageLimitWithPrecision": 1000,
                            "currentOveragesWithPrecision": 0, "freeTrialInfo": None}],
}


def add_service_routes(fake: FakeUpstream, app: web.Application) -> None:
    for family in ("runtime", "q"):
        app.router.add_post(f"/{family}/generateAssistantResponse",
                            functools.partial(service_generate, fake, family=family, dialect="ide"))
        app.router.add_post(f"/{family}/", functools.partial(service_generate, fake, family=family,
                                                            dialect=None))
        app.router.add_get(f"/{family}/ListAvailableModels", fake._list_models)
        app.router.add_post(f"/{family}/mcp", fake._mcp)
    app.router.add_post("/management/", functools.partial(service_management, fake))


def kind_of(fake: FakeUpstream, token: str) -> str:
    if token.startswith("ksk_"):
        return "api_key"
    return fake.kinds.get(token, "social")


def _ide_version(headers: Any) -> tuple[int, ...] | None:
    found = re.search(r"KiroIDE-(\d+)\.(\d+)", headers.get("x-amz-user-agent", ""))
    return tuple(int(n) for n in found.groups()) if found else None


def service_refusal(fake: FakeUpstream, request: web.Request, family: str, dialect: str,
                    body: Any) -> tuple[int, dict[str, Any]] | None:
    """What the 2026 service says to this call before answering it, if anything."""
    headers = request.headers
    token = headers.get("Authorization", "").removeprefix("Bearer ")
    kind = kind_of(fake, token)
    version = _ide_version(headers)
    token_type = headers.get("TokenType", "")
    arn = body.get("profileArn") if isinstance(body, dict) else None
    if family in fake.down:
        return fake.down[family]
    if token in fake.suspended:
        return 403, SUSPENDED
    if version is not None and version < (0, 12):
        return 403, NOT_AUTHORIZED
    if kind == "external_idp" and token_type != "EXTERNAL_IDP":
        return 403, BEARER_INVALID
    if kind == "api_key" and (token_type != "API_KEY" or dialect == "ide"):
        return 403, BEARER_INVALID
    if isinstance(body, dict) and "systemPrompt" in body:
        return 400, {"message": "Improperly formed request.", "reason": "REQUEST_BODY_INVALID"}
    if family == "runtime" and dialect == "ide" and kind in ("idc", "external_idp",
                                                             "builder_id"):
        return 403, BEARER_INVALID
    if kind == "api_key":
        return (403, NOT_AUTHORIZED) if arn else None
    if kind == "builder_id":
        if family == "q":
            return (403, NOT_AUTHORIZED) if arn else None
        return None if arn == SERVICE_ARN else (400, ARN_REQUIRED)
    if kind in ("idc", "external_idp"):
        if not arn:
            return 400, ARN_REQUIRED if family == "runtime" else NOT_AUTHORIZED
        if arn != IDC_PROFILE_ARN:
            return 400, {"message": "Invalid profileArn."}
        return None
    if family == "runtime" and not arn:  # social
        return 400, ARN_REQUIRED
    return None


async def service_generate(fake: FakeUpstream, request: web.Request, *, family: str,
                           dialect: str | None) -> web.StreamResponse:
    if dialect is None and request.headers.get("x-amz-target", "").startswith(
            "AmazonCodeWhispererService."):
        return await service_management(fake, request)  # the legacy hosts' RPC form
    body = await fake._record(request)
    if dialect is None:
        dialect = RPC_TARGETS.get(request.headers.get("x-amz-target", ""))
        if dialect is None or request.headers.get("Content-Type") != "application/x-amz-json-1.0":
            return web.json_response({"message": "UnknownOperationException"}, status=404)
    fake.dialects.append((family, dialect))
    refusal = service_refusal(fake, request, family, dialect, body)
    if refusal is not None:
        return web.json_response(refusal[1], status=refusal[0])
    return await fake._generate(request, record=False)


async def service_management(fake: FakeUpstream, request: web.Request) -> web.Response:
    body = await fake._record(request)
    target = request.headers.get("x-amz-target", "").rpartition(".")[2]
    token = request.headers.get("Authorization", "").removeprefix("Bearer ")
    kind = kind_of(fake, token)
    if kind == "external_idp" and request.headers.get("TokenType") != "EXTERNAL_IDP":
        return web.json_response({"message": "Invalid token"}, status=403)
    if target == "ListAvailableProfiles":
        if kind == "builder_id":
            return web.json_response(
                {"message": "AWS Builder ID is not supported for this operation."}, status=403)
        arn = PROFILE_ARN if kind == "social" else IDC_PROFILE_ARN
        return web.json_response({"profiles": [{
            "arn": arn, "profileName": "KiroProfile",
            "identityDetails": {"ssoIdentityDetails": {"ssoRegion": arn.split(":")[3]}}}],
            "nextToken": None})
    if target == "ListAvailableModels" and fake.models_rpc:
        if not (isinstance(body, dict) and body.get("profileArn")):
            return web.json_response({"message": "profileArn is required"}, status=400)
        return await fake._list_models(request, record=False)
    if target == "GetUsageLimits":
        if token in fake.usage_replies:
            return await fake._status(fake.usage_replies[token])
        if fake.usage_reply is not None:
            return await fake._status(fake.usage_reply)
        return web.json_response(USAGE_LIMITS)
    return web.json_response({"message": f"unknown target {target!r}"}, status=400)
