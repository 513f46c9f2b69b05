"""A fake CodeWhisperer for load: ``python bench/upstream.py`` prints its port.

``POST /generateAssistantResponse`` answers the scenario named by a marker
anywhere in the request body, so the same body works through kiro2api
(which wraps it in a CodeWhisperer payload) and through the floor (which
forwards it untouched):

- ``[bench:text]`` (and no marker): 200 ``assistantResponseEvent`` frames of
  about 20 bytes of text, then the metering / context-usage / metadata tail.
- ``[bench:tool]``: 50 text frames, then one tool call whose JSON input comes
  in 150 fragments, then the tail.
- ``[bench:slow:FRAMES:MS]``: FRAMES text frames, one every MS milliseconds
  (on a fixed schedule from the first).
  Each text is ``@<CLOCK_MONOTONIC ns>@`` stamped just before its write, so a
  client on the same machine can tell how long the frame took to reach it.

Canned answers are encoded once; ``--frames-per-write`` sets how many frames
go into each write (1, the default, is one write per frame). There are no
delays except in ``slow``. ``/refreshToken`` and ``/token`` hand out fresh
tokens in case the proxy refreshes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
import zlib
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from fakes import event, tail, text, tool  # noqa: E402

SCENARIO = re.compile(rb"\[bench:(\w+)(?::(\d+):(\d+))?\]")
TEXT_FRAMES = 200
EVENT_STREAM = {"Content-Type": "application/vnd.amazon.eventstream"}


def answer_tail() -> list[bytes]:
    """Metering, context usage and metadata: how every normal answer ends."""
    usage = {"uncachedInputTokens": 120, "cacheReadInputTokens": 30,
             "cacheWriteInputTokens": 0, "outputTokens": 1000, "totalTokens": 1150}
    return tail() + [event("metadataEvent", {"tokenUsage": usage})]


def text_answer(frames: int = TEXT_FRAMES) -> list[bytes]:
    """``frames`` texts of about 20 bytes; the first one is ``chunk 000 ...``."""
    return text(*(f"chunk {i:03d} lorem ips " for i in range(frames))) + answer_tail()


def tool_answer() -> list[bytes]:
    payload = json.dumps({"path": "/tmp/bench.txt", "content": "x" * 2900})
    step = -(-len(payload) // 150)
    fragments = [payload[i:i + step] for i in range(0, len(payload), step)]
    return (text(*(f"chunk {i:03d} lorem ips " for i in range(50)))
            + tool("tooluse_bench0001", "write_file", *fragments) + answer_tail())


class StampedFrames:
    """Frames of the ``slow`` scenario: a fixed template; only the stamp and CRC change."""

    def __init__(self) -> None:
        template = text("@" + "0" * 19 + "@")[0]
        at = template.index(b"@") + 1
        self.head, self.rest = template[:at], template[at + 19:-4]  # -4: the message CRC

    def frame(self) -> bytes:
        body = b"%s%019d%s" % (self.head, time.monotonic_ns(), self.rest)
        return body + zlib.crc32(body).to_bytes(4, "big")


def chunks(frames: list[bytes], per_write: int) -> list[bytes]:
    return [b"".join(frames[i:i + per_write]) for i in range(0, len(frames), per_write)]


class Upstream:
    def __init__(self, frames_per_write: int = 1) -> None:
        self.canned = {"text": chunks(text_answer(), frames_per_write),
                       "tool": chunks(tool_answer(), frames_per_write)}
        self.tail = b"".join(answer_tail())
        self.stamped = StampedFrames()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/generateAssistantResponse", self.generate)
        app.router.add_post("/refreshToken", self.refresh)
        app.router.add_post("/token", self.refresh)
        return app

    async def generate(self, request: web.Request) -> web.StreamResponse:
        match = SCENARIO.search(await request.read())
        name = match.group(1).decode() if match else "text"
        response = web.StreamResponse(headers=EVENT_STREAM)
        await response.prepare(request)
        if name == "slow":
            # On a fixed schedule from the first frame, so that a late wake-up
            # does not shift the later frames (nor bunch streams together).
            frames, interval = int(match.group(2)), int(match.group(3)) / 1000
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i in range(frames):
                if i:
                    await asyncio.sleep(max(0.0, start + i * interval - loop.time()))
                await response.write(self.stamped.frame())
            await response.write(self.tail)
        else:
            for chunk in self.canned[name]:
                await response.write(chunk)
        await response.write_eof()
        return response

    async def refresh(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({
            "accessToken": "aoa-bench-access", "refreshToken": "aor-bench-refresh",
            "expiresIn": 3600, "tokenType": "Bearer",
            "profileArn": "arn:aws:codewhisperer:us-east-1:111122223333:profile/BENCH"})


async def serve(app: web.Application, port: int, reuse_port: bool = False) -> None:
    """Serve ``app`` on 127.0.0.1, print the port, run until SIGTERM/SIGINT;
    ``reuse_port``: bind with SO_REUSEPORT, beside other processes on ``port``."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # Above kiro2api's default, so that in a burst of connects (bench_scale.py)
    # the helpers' listen queues are never the ones that overflow.
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096, reuse_port=reuse_port)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--frames-per-write", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(serve(Upstream(args.frames_per_write).app(), args.port))


if __name__ == "__main__":
    main()
