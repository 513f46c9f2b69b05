"""Where a paced stream's CPU goes: ``python bench/cost_split.py [--streams 500]``.

Runs the fake upstream (``upstream.py``), the forwarding floor (``floor.py``)
and kiro2api in one process each, and loads each with paced streams of 2 and
of 100 frames (40 ms apart), floor kiro2api kiro2api floor, twice. From the
median CPU per stream at the two lengths it splits each server's cost into
what a stream costs whatever its length (the request, the conversion, the
upstream call) and what each frame adds (decoding, converting, writing):

    per frame = (CPU at 100 frames - CPU at 2) / 98;  fixed = CPU at 2 - 2 x per frame

The figures are CPU of the server process (utime + stime). Ratios between
the two servers are what to read; the machine's other load moves both.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import bench_proxy
import loadgen

LENGTHS = (2, 100)  # frames a stream
INTERVAL_MS = 40
HEADERS = {"Content-Type": "application/json", "x-api-key": bench_proxy.API_KEY}


async def cpu_per_stream(proc: bench_proxy.Proc, frames: int, streams: int) -> float:
    """CPU ms per stream of ``streams`` paced streams started evenly over a second."""
    body = loadgen.request_body("anthropic", f"slow:{frames}:{INTERVAL_MS}")
    result = loadgen.Stamped(streams=streams)
    async with loadgen.client_session(limit=0) as session:
        before = bench_proxy.cpu_seconds(proc.pid)

        async def client(k: int) -> None:
            await asyncio.sleep(k / streams)
            await loadgen.stamped_stream(session, proc.url + "/v1/messages", body, HEADERS,
                                         result)
        await asyncio.gather(*(client(k) for k in range(streams)))
        spent = bench_proxy.cpu_seconds(proc.pid) - before
    if result.errors:
        raise SystemExit(f"{proc.name}: {len(result.errors)} streams failed: {result.errors[0]}")
    return spent * 1000 / streams


async def main(args: argparse.Namespace, workdir: Path) -> None:
    started = time.monotonic()
    print(f"cost split: {bench_proxy.machine()}")
    upstream = bench_proxy.start_printing_port("upstream", ["upstream.py"], workdir)
    floor = bench_proxy.start_printing_port("floor", ["floor.py", "--upstream", upstream.url],
                                            workdir)
    (workdir / "kiro2api").mkdir()
    kiro = bench_proxy.start_kiro2api(upstream.url, workdir / "kiro2api")
    try:
        async with loadgen.client_session() as session:
            await bench_proxy.wait_ready(kiro, session)
        runs: dict[tuple[str, int], list[float]] = {}
        for _ in range(2):
            for proc in (floor, kiro, kiro, floor):
                for frames in LENGTHS:
                    runs.setdefault((proc.name, frames), []).append(
                        await cpu_per_stream(proc, frames, args.streams))
        split = {}
        for name in (floor.name, kiro.name):
            short, long = (statistics.median(runs[name, n]) for n in LENGTHS)
            per_frame = (long - short) / (LENGTHS[1] - LENGTHS[0])
            split[name] = (short - LENGTHS[0] * per_frame, per_frame, long)
            print(f"  {name:9} fixed {split[name][0]:.3f} ms a stream, {per_frame * 1000:.1f} µs "
                  f"a frame; {long:.2f} ms a stream of {LENGTHS[1]} frames")
        (f_fixed, f_frame, f_long), (k_fixed, k_frame, k_long) = split.values()
        print(f"  kiro2api / floor: fixed {k_fixed / f_fixed:.2f}x (+{k_fixed - f_fixed:.3f} ms), "
              f"a frame {k_frame / f_frame:.2f}x (+{(k_frame - f_frame) * 1000:.1f} µs), a stream "
              f"of {LENGTHS[1]} frames {k_long / f_long:.2f}x")
    finally:
        for proc in (kiro, floor, upstream):
            proc.stop()
    print(bench_proxy.took(started))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=500, help="paced streams a run")
    with tempfile.TemporaryDirectory(prefix="kiro2api-split-") as place:
        asyncio.run(main(parser.parse_args(), Path(place)))
