"""A fake Kiro backend for the tests: a real aiohttp server, no mocks.

One ``FakeUpstream`` answers every URL kiro2api calls, so a test points
``--upstream``, ``--social-auth-url`` and ``--oidc-url`` at the same place:

- ``POST /generateAssistantResponse``: replies from ``script`` (a queue of
  ``Stream`` or ``Status`` objects); an empty queue answers a short greeting.
- ``POST /refreshToken`` (social) and ``POST /token`` (IdC): replies from
  ``auth_script`` if anything is queued, else a fresh token pair numbered by
  how many refreshes there have been.

Every request is recorded in ``requests`` (path, headers, parsed JSON body).
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

import eventstream

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
    without finishing the chunked body.
    """

    frames: list[bytes]
    split: tuple[int, ...] = (7, 64, 1, 300)
    delay: float = 0.0
    first_byte_delay: float = 0.0
    hang_up: bool = False
    corrupt_at: int | None = None  # flip one bit of the byte at this offset

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
        self.auth_script: deque[Status] = deque()
        self.auth_delay = 0.0
        self.refreshes = 0

    def calls(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/generateAssistantResponse", self._generate)
        app.router.add_post("/refreshToken", self._social_refresh)
        app.router.add_post("/token", self._idc_refresh)
        return app

    async def _record(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        self.requests.append(Recorded(request.path, dict(request.headers), body))
        return body

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        reply = self.script.popleft() if self.script else Stream(text("Hello") + tail())
        if isinstance(reply, Status):
            return await self._status(reply)
        if reply.first_byte_delay:
            await asyncio.sleep(reply.first_byte_delay)
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
        await self._record(request)
        return await self._refresh("social", profile_arn=True)

    async def _idc_refresh(self, request: web.Request) -> web.Response:
        await self._record(request)
        return await self._refresh("idc", profile_arn=False)

    async def _refresh(self, kind: str, *, profile_arn: bool) -> web.Response:
        if self.auth_delay:
            await asyncio.sleep(self.auth_delay)
        if self.auth_script:
            return await self._status(self.auth_script.popleft())
        self.refreshes += 1
        n = self.refreshes
        body: dict[str, Any] = {
            "accessToken": f"aoa-{kind}-access-{n}",
            "refreshToken": f"aor-{kind}-refresh-{n}",
            "expiresIn": 3600,
        }
        if profile_arn:
            body["profileArn"] = "arn:aws:codewhisperer:us-east-1:111122223333:profile/FAKE"
        else:
            body["tokenType"] = "Bearer"
        return web.json_response(body)
