"""Load generator: an aiohttp client for kiro2api, the floor, or any proxy.

``run_load`` sends one request body ``requests`` times, from ``concurrency``
workers (closed loop) or at ``rate`` starts per second (open loop, at most
``concurrency`` in flight), and times each answer: first body byte, first
chunk holding the first text (``chunk 000``), and the whole body.
``run_stamped`` opens streams of ``slow`` answers and measures, for every
event, the delay from the upstream's write (the ``@ns@`` stamp, on
CLOCK_MONOTONIC, which every process on the machine shares) to its arrival.

Run it alone against a running proxy::

    python bench/loadgen.py http://127.0.0.1:8080 --api-key K -c 20 -n 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

MODEL = "claude-sonnet-4-5"
FIRST_TEXT = b"chunk 000"  # the upstream's first text (see upstream.py)
STAMP = re.compile(rb"@(\d{10,})@")
TAIL_BYTES = 1024  # how much of the end of a body the completeness check looks at

TOOL = {"name": "write_file", "description": "Write a file.",
        "schema": {"type": "object", "required": ["path", "content"],
                   "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}}


def request_body(api: str, scenario: str, *, stream: bool = True) -> bytes:
    """A small request whose prompt names the upstream scenario (see ``upstream.py``)."""
    prompt = f"[bench:{scenario}] Write the benchmark answer."
    if api == "responses":  # Codex's shape: input items, flat function tools
        return json.dumps({"model": MODEL, "stream": stream, "store": False,
                           "input": [{"type": "message", "role": "user", "content": [
                               {"type": "input_text", "text": prompt}]}],
                           "tools": [{"type": "function", "name": TOOL["name"],
                                      "description": TOOL["description"],
                                      "parameters": TOOL["schema"]}]}).encode()
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 8192, "stream": stream,
                            "messages": [{"role": "user", "content": prompt}]}
    if api == "anthropic":
        body["tools"] = [{"name": TOOL["name"], "description": TOOL["description"],
                          "input_schema": TOOL["schema"]}]
    else:
        body["tools"] = [{"type": "function", "function": {
            "name": TOOL["name"], "description": TOOL["description"],
            "parameters": TOOL["schema"]}}]
    return json.dumps(body).encode()


ROUTES = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions",
          "responses": "/v1/responses"}


def route(api: str) -> str:
    return ROUTES[api]


def client_session(limit: int = 2000) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=60))


@dataclass
class Sample:
    """One request's timings, in seconds from sending it."""

    first_byte: float
    first_text: float
    total: float


@dataclass
class Load:
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.samples) / self.elapsed if self.elapsed else 0.0

    def percentile(self, name: str, q: float) -> float:
        """The ``q`` percentile (0-100) of one timing, in milliseconds."""
        return percentile([getattr(s, name) for s in self.samples], q) * 1000


def percentile(values: list[float], q: float) -> float:
    """The ``q`` percentile (0-100) of ``values``, interpolated between ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def one_request(session: aiohttp.ClientSession, url: str, body: bytes,
                      headers: dict[str, str], expect: tuple[bytes, ...]) -> Sample:
    """Send one request and read the whole answer; raise if it is not complete."""
    start = time.perf_counter()
    first_byte = first_text = 0.0
    tail = b""
    async with session.post(url, data=body, headers=headers) as response:
        async for chunk in response.content.iter_any():
            if not first_byte:
                first_byte = time.perf_counter()
            tail = (tail + chunk)[-TAIL_BYTES:]
            if not first_text and FIRST_TEXT in tail:
                first_text = time.perf_counter()
        total = time.perf_counter()
        if response.status != 200:
            raise ValueError(f"status {response.status}: {tail[:300]!r}")
    missing = [m for m in expect if m not in tail]
    if missing:
        raise ValueError(f"answer incomplete, no {missing[0]!r} near the end: {tail[-300:]!r}")
    return Sample(first_byte - start, (first_text or total) - start, total - start)


async def run_load(session: aiohttp.ClientSession, url: str, body: bytes,
                   headers: dict[str, str], *, concurrency: int, requests: int,
                   rate: float | None = None, expect: tuple[bytes, ...] = ()) -> Load:
    """Send ``requests`` requests, closed loop or (with ``rate``) open loop."""
    load = Load()
    gate = asyncio.Semaphore(concurrency)

    async def send() -> None:
        try:
            load.samples.append(await one_request(session, url, body, headers, expect))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            load.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            gate.release()

    start = time.perf_counter()
    tasks = []
    for i in range(requests):
        if rate:
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await gate.acquire()
        tasks.append(asyncio.create_task(send()))
    await asyncio.gather(*tasks)
    load.elapsed = time.perf_counter() - start
    return load


@dataclass
class Stamped:
    """Per-event delays (upstream write -> client receipt) of concurrent slow streams."""

    streams: int = 0  # how many the run starts
    delays_ns: list[int] = field(default_factory=list)
    stamps_ns: list[int] = field(default_factory=list)  # each event's upstream write
    first_byte: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    open: int = 0  # streams that have started and not ended
    max_open: int = 0
    all_open_ns: int | None = None  # when every stream of the run had started

    def steady_delays_ns(self) -> list[int]:
        """Delays of the events written once every stream was open: the
        streaming itself, without the other streams' start-up work."""
        if self.all_open_ns is None:
            return []
        return [d for d, stamp in zip(self.delays_ns, self.stamps_ns)
                if stamp >= self.all_open_ns]


async def stamped_stream(session: aiohttp.ClientSession, url: str, body: bytes,
                         headers: dict[str, str], result: Stamped) -> None:
    start = time.perf_counter()
    started = False
    buffer = b""
    last = 0  # the stamps of one stream only grow; a repeat (a Responses done event) is no event
    try:
        async with session.post(url, data=body, headers=headers) as response:
            async for chunk in response.content.iter_any():
                now = time.monotonic_ns()
                if not started:
                    started = True
                    result.first_byte.append(time.perf_counter() - start)
                    result.open += 1
                    result.max_open = max(result.max_open, result.open)
                    if result.max_open == result.streams and result.all_open_ns is None:
                        result.all_open_ns = now
                buffer += chunk
                end = 0
                for match in STAMP.finditer(buffer):
                    stamp = int(match.group(1))
                    end = match.end()
                    if stamp <= last:
                        continue
                    last = stamp
                    result.delays_ns.append(now - stamp)
                    result.stamps_ns.append(stamp)
                buffer = buffer[max(end, len(buffer) - 64):]
            if response.status != 200:
                result.errors.append(f"status {response.status}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        if started:
            result.open -= 1


async def run_stamped(session: aiohttp.ClientSession, url: str, body: bytes,
                      headers: dict[str, str], streams: int, spread: float = 0.0,
                      ) -> tuple[Stamped, asyncio.Future]:
    """Start ``streams`` slow streams, evenly over ``spread`` seconds (0: all at
    once); return the live result and their future.

    Streams started together get their frames in lockstep: every interval,
    all of them at once, a burst the proxy works through one frame after the
    other. Spread over one interval, their frames interleave, as those of
    independent clients do.
    """
    result = Stamped(streams=streams)

    async def start(k: int) -> None:
        if spread:
            await asyncio.sleep(k * spread / streams)
        await stamped_stream(session, url, body, headers, result)

    done = asyncio.gather(*(start(k) for k in range(streams)))
    return result, done


def main() -> None:
    parser = argparse.ArgumentParser(description="Load a kiro2api-like proxy.")
    parser.add_argument("url", help="base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--api", choices=sorted(ROUTES), default="anthropic")
    parser.add_argument("--scenario", default="text", help="text, tool or slow:FRAMES:MS")
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--api-key", default="")
    parser.add_argument("-c", "--concurrency", type=int, default=20)
    parser.add_argument("-n", "--requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=None, help="open loop: starts per second")
    args = parser.parse_args()

    async def go() -> None:
        body = request_body(args.api, args.scenario, stream=not args.no_stream)
        headers = {"x-api-key": args.api_key, "Content-Type": "application/json"}
        async with client_session() as session:
            load = await run_load(session, args.url.rstrip("/") + route(args.api), body,
                                  headers, concurrency=args.concurrency,
                                  requests=args.requests, rate=args.rate)
        print(f"{len(load.samples)} ok, {len(load.errors)} errors in {load.elapsed:.2f}s, "
              f"{load.rps:.0f} req/s")
        for name in ("first_byte", "first_text", "total"):
            print(f"{name:<11} p50 {load.percentile(name, 50):7.2f} ms"
                  f"  p99 {load.percentile(name, 99):7.2f} ms")
        for error in sorted(set(load.errors))[:5]:
            print("error:", error)

    asyncio.run(go())


if __name__ == "__main__":
    main()
