"""Soak: 200 streams held open for a minute, clients hanging up at random.

Two processes on 127.0.0.1: the fake upstream (``upstream.py``) and
``kiro2api.py server``; this process runs ``--streams`` workers. Each worker
opens a slow stream (one stamped frame every ``--interval-ms``), and either
reads it to its end, checking that it ended cleanly, or (``--hang-up``
of the time) hangs up after a random number of events; then it opens the
next, until ``--seconds`` are over. Reported:

- errors: answers that were not 200, ended without their normal ending, or
  failed in transit (target 0);
- added latency: for every frame, the upstream's write (the ``@ns@`` stamp on
  CLOCK_MONOTONIC) to the client's receipt, through kiro2api (p50/p99/max);
- kiro2api's RSS and open descriptors every ``--seconds / 10``, the growth
  over the second half (target: none), and the streams ``/metrics`` still
  counts once every client is gone (target 0), and kiro2api's descriptors
  once its idle upstream connections have expired (back to the start).

Run ``python bench/bench_soak.py`` (about 95 s); ``--seconds 10`` for a
smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import bench_proxy
import loadgen

# aiohttp's client closes a connection idle for 15 s (keepalive_timeout) in a
# sweep that runs every 15 s: an idle connection is gone within 30 s.
KEEPALIVE_SECONDS = 31.0
ENDINGS = {"anthropic": b"event: message_stop", "openai": b"data: [DONE]"}


@dataclass
class Soak:
    delays_ns: list[int] = field(default_factory=list)
    completed: int = 0
    hung_up: int = 0
    errors: list[str] = field(default_factory=list)
    open: int = 0
    open_samples: list[int] = field(default_factory=list)


async def one_stream(session: aiohttp.ClientSession, url: str, body: bytes, ending: bytes,
                     hang_up_after: int | None, soak: Soak) -> None:
    """One stream: read it all and check its ending, or hang up after some events."""
    headers = {"Content-Type": "application/json", "x-api-key": bench_proxy.API_KEY}
    buffer = tail = b""
    stamps = 0
    soak.open += 1
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                soak.errors.append(f"status {response.status}: {(await response.read())[:200]!r}")
                return
            async for chunk in response.content.iter_any():
                now = time.monotonic_ns()
                buffer += chunk
                end = 0
                for match in loadgen.STAMP.finditer(buffer):
                    soak.delays_ns.append(now - int(match.group(1)))
                    stamps += 1
                    end = match.end()
                buffer = buffer[max(end, len(buffer) - 64):]
                tail = (tail + chunk)[-loadgen.TAIL_BYTES:]
                if hang_up_after is not None and stamps >= hang_up_after:
                    response.close()  # drop the connection mid-answer
                    soak.hung_up += 1
                    return
        if ending not in tail or b"error" in tail[-300:]:
            soak.errors.append(f"answer did not end cleanly: {tail[-200:]!r}")
        else:
            soak.completed += 1
    except (TimeoutError, aiohttp.ClientError) as exc:
        soak.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        soak.open -= 1


async def worker(session: aiohttp.ClientSession, base: str, frames: int, interval_ms: int,
                 hang_up: float, deadline: float, rng: random.Random, soak: Soak) -> None:
    bodies = {api: loadgen.request_body(api, f"slow:{frames}:{interval_ms}")
              for api in ENDINGS}
    while time.monotonic() < deadline:
        api = rng.choice(("anthropic", "openai"))
        after = rng.randrange(0, frames) if rng.random() < hang_up else None
        await one_stream(session, base + loadgen.route(api), bodies[api], ENDINGS[api], after,
                         soak)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def streams_open(session: aiohttp.ClientSession, base: str) -> int:
    async with session.get(base + "/metrics",
                           headers={"x-api-key": bench_proxy.API_KEY}) as response:
        for line in (await response.text()).splitlines():
            if line.startswith("kiro2api_streams_open "):
                return int(line.split()[1])
    return -1


async def soak_run(args: argparse.Namespace, workdir: Path) -> None:
    up = bench_proxy.start_printing_port("upstream", ["upstream.py"], workdir)
    procs = [up]
    try:
        kiro = bench_proxy.start_kiro2api(up.url, workdir)
        procs.append(kiro)
        async with loadgen.client_session() as session:
            await bench_proxy.wait_ready(kiro, session)
            print(f"soak: {args.streams} streams for {args.seconds:.0f} s, {args.frames} frames "
                  f"each, one every {args.interval_ms} ms; {args.hang_up:.0%} of the clients "
                  f"hang up at a random event\n{bench_proxy.machine()}\n")
            soak = Soak()
            start = time.monotonic()
            deadline = start + args.seconds
            rng = random.Random(args.seed)
            workers = asyncio.gather(*(
                worker(session, kiro.url, args.frames, args.interval_ms, args.hang_up, deadline,
                       random.Random(rng.random()), soak) for _ in range(args.streams)))
            cpu_start = bench_proxy.cpu_seconds(kiro.pid)
            samples = [(0.0, bench_proxy.rss_kb(kiro.pid) / 1024, open_fds(kiro.pid), 0)]
            step = args.seconds / 10
            while not workers.done():
                await asyncio.wait([workers], timeout=1.0)
                soak.open_samples.append(soak.open)
                elapsed = time.monotonic() - start
                if elapsed >= len(samples) * step and elapsed <= args.seconds + 1:
                    samples.append((elapsed, bench_proxy.rss_kb(kiro.pid) / 1024,
                                    open_fds(kiro.pid), soak.open))
            await workers
            cpu = (bench_proxy.cpu_seconds(kiro.pid) - cpu_start) / (time.monotonic() - start)
        # The clients' keep-alive connections are closed with their session;
        # kiro2api's idle upstream connections when aiohttp's keep-alive ends.
        async with aiohttp.ClientSession() as session:
            await asyncio.sleep(1.0)
            left = await streams_open(session, kiro.url)
        after = [open_fds(kiro.pid)]
        await asyncio.sleep(KEEPALIVE_SECONDS)
        after.append(open_fds(kiro.pid))
        samples.append((time.monotonic() - start, bench_proxy.rss_kb(kiro.pid) / 1024,
                        after[-1], 0))
        report(args, soak, samples, left, after, cpu)
    finally:
        for proc in reversed(procs):
            proc.stop()


def report(args: argparse.Namespace, soak: Soak, samples: list[tuple], left: int,
           after: list[int], cpu: float) -> None:
    delays = [d / 1e6 for d in soak.delays_ns]
    held = soak.open_samples[1:-2] or [0]  # leave out the ramp up and the drain
    print(f"streams: {soak.completed} read to the end, {soak.hung_up} hung up by the client; "
          f"open at once: min {min(held)}, mean {sum(held) / len(held):.0f}")
    print(f"errors: {len(soak.errors)}   (target 0)")
    for error in sorted(set(soak.errors))[:5]:
        print(f"  {error}")
    print(f"added latency, upstream write -> client, {len(delays)} frames: "
          f"p50 {loadgen.percentile(delays, 50):.2f} ms, p99 {loadgen.percentile(delays, 99):.2f} "
          f"ms, max {max(delays, default=float('nan')):.1f} ms")
    print(f"kiro2api's CPU over the run: {cpu:.0%} of one core (the load generator and the "
          f"upstream share the machine with it)")
    print("kiro2api over time:")
    print(f"  {'seconds':>8}{'RSS MB':>9}{'fds':>6}{'open':>6}")
    for elapsed, mb, fds, open_now in samples:
        print(f"  {elapsed:8.1f}{mb:9.1f}{fds:6d}{open_now:6d}")
    in_run = [s for s in samples if s[0] <= args.seconds + 1]
    middle = min(in_run, key=lambda s: abs(s[0] - args.seconds / 2))
    growth = in_run[-1][1] - middle[1]
    print(f"RSS growth over the second half ({middle[0]:.0f} s -> {in_run[-1][0]:.0f} s): "
          f"{growth:+.1f} MB   (target: none)")
    print(f"streams /metrics still counts after the clients left: {left}   (target 0)")
    print(f"kiro2api's descriptors: {samples[0][2]} at start, {after[0]} once the clients "
          f"left, {after[1]} after the idle upstream connections' keep-alive "
          f"({KEEPALIVE_SECONDS:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--frames", type=int, default=100, help="frames per answer")
    parser.add_argument("--interval-ms", type=int, default=20, help="between frames")
    parser.add_argument("--hang-up", type=float, default=0.3,
                        help="share of the clients that hang up mid-answer")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kiro2api-soak-") as workdir:
        asyncio.run(soak_run(args, Path(workdir)))


if __name__ == "__main__":
    main()
