"""kiro2api under many concurrent streams: one setting against another, in one run.

Each comparison starts the fake upstream (``upstream.py``) and two
``kiro2api.py server`` processes in front of it that differ in one setting
(A, the baseline, and B), and loads them in turn, A B B A (``--rounds 2``
does it twice): a drift in the machine's other load falls on both alike.
This process is the client (``loadgen.py``). Every figure is printed for A
and B with B / A; on this shared machine only the ratios of one run are
worth comparing, and the load average is printed with them.

- ``backlog``: ``--backlog 128`` (aiohttp's own default, kiro2api's until
  issue 23) against kiro2api's default. ``--burst`` short streams (2,000)
  are opened evenly within ``--burst-seconds`` (2), each on a connection of
  its own. Counted: the connections the kernel's listen queues could not
  hold (``ListenOverflows`` in ``/proc/net/netstat``, over the whole
  machine: another program's overflow would count too), the client
  connects that took a SYN retransmission (1 s or more) or failed, and the
  streams that did not complete.

Run ``python bench/bench_scale.py`` for every comparison (``make bench``
runs it), or name some: ``python bench/bench_scale.py backlog``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import aiohttp
import bench_proxy
import loadgen

HEADERS = {"Content-Type": "application/json", "x-api-key": bench_proxy.API_KEY}
# A SYN the listen queue dropped is sent again after the initial RTO, 1 s.
SYN_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class Variant:
    name: str
    extra: tuple[str, ...] = ()  # server options


@dataclass
class Comparison:
    title: str
    a: Variant
    b: Variant
    measure: Callable[[bench_proxy.Proc, argparse.Namespace], Any]
    report: Callable[[str, list[dict], list[dict]], None]


# Measurements #############################################################


def listen_overflows() -> int:
    """The machine's count of connections a full listen queue could not hold."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            fields = dict(zip(names.split()[1:], values.split()[1:]))
            return int(fields["ListenOverflows"])
    return 0


def connect_timer(times: list[float]) -> aiohttp.TraceConfig:
    """A trace that appends the seconds each new connection took to ``times``."""
    trace = aiohttp.TraceConfig()

    async def started(session: Any, context: Any, params: Any) -> None:
        context.started = time.monotonic()

    async def ended(session: Any, context: Any, params: Any) -> None:
        times.append(time.monotonic() - context.started)

    trace.on_connection_create_start.append(started)
    trace.on_connection_create_end.append(ended)
    return trace


async def burst(proc: bench_proxy.Proc, args: argparse.Namespace) -> dict[str, float]:
    """``args.burst`` streams opened evenly within ``args.burst_seconds``."""
    connects: list[float] = []
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=60),
        trace_configs=[connect_timer(connects)])
    body = loadgen.request_body("anthropic", f"slow:{args.burst_frames}:{args.burst_interval}")
    before = listen_overflows()
    cpu = bench_proxy.cpu_seconds(proc.pid)
    async with session:
        result, done = await loadgen.run_stamped(
            session, proc.url + "/v1/messages", body, HEADERS, args.burst,
            spread=args.burst_seconds)
        await done
    expected = args.burst * args.burst_frames
    return {
        "overflows": listen_overflows() - before,
        "slow_connects": sum(t >= SYN_RETRY_SECONDS for t in connects),
        "failed": len(result.errors),
        "lost_events": expected - len(result.delays_ns),
        "max_open": result.max_open,
        "connect_max": max(connects, default=float("nan")) * 1000,
        "fb99": loadgen.percentile(result.first_byte, 99) * 1000,
        "fb_max": max(result.first_byte, default=float("nan")) * 1000,
        "cpu_s": bench_proxy.cpu_seconds(proc.pid) - cpu,
    }


# Report ##################################################################


def ratio(b: float, a: float) -> str:
    return f"{b / a:.2f}x" if a else ("-" if not b else "inf")


def print_rows(names: tuple[str, str], runs: tuple[list[dict], list[dict]],
               columns: tuple[tuple[str, str, int, Callable], ...]) -> None:
    """One line per run of each variant, then each column summed up over the runs (its
    ``sum``, ``max`` or ``median``), and B / A of those."""
    print(bench_proxy.row("", [c[0] for c in columns]))
    summary = []
    for name, results in zip(names, runs):
        for result in results:
            print(bench_proxy.row(f"  {name}", [f"{result[k]:.{d}f}" for _, k, d, _ in columns]))
        summary.append({k: how([r[k] for r in results]) for _, k, _, how in columns})
    for name, result in zip(names, summary):
        print(bench_proxy.row(f"  {name.partition(':')[0]}, all runs",
                              [f"{result[k]:.{d}f}" for _, k, d, _ in columns]))
    print(bench_proxy.row("  B / A", [ratio(summary[1][k], summary[0][k])
                                      for _, k, _, _ in columns]))


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def report_burst(names: tuple[str, str], a: list[dict], b: list[dict]) -> None:
    print("overflows: connections the listen queues dropped (the machine's ListenOverflows); "
          "slow: client\nconnects of 1 s or more (a SYN sent again); failed: streams that "
          "did not complete;\nconnect max, TTFB p99 and max in ms")
    print_rows(names, (a, b), (
        ("overflows", "overflows", 0, sum), ("slow", "slow_connects", 0, sum),
        ("failed", "failed", 0, sum), ("lost ev", "lost_events", 0, sum),
        ("max open", "max_open", 0, max), ("conn max", "connect_max", 0, max),
        ("TTFB p99", "fb99", 0, max), ("TTFB max", "fb_max", 0, max),
        ("CPU s", "cpu_s", 2, sum)))
    print("  (counts and CPU summed over the runs; the rest: the highest run)")


# Main ####################################################################

COMPARISONS = {
    "backlog": Comparison(
        "listen backlog: a burst of connects", Variant("--backlog 128", ("--backlog", "128")),
        Variant("the default"), burst, report_burst),
}


async def compare(comparison: Comparison, args: argparse.Namespace, workdir: Path,
                  upstream: bench_proxy.Proc) -> None:
    procs = []
    try:
        for letter, variant in zip("AB", (comparison.a, comparison.b)):
            where = workdir / letter
            where.mkdir(exist_ok=True)
            procs.append(bench_proxy.start_kiro2api(upstream.url, where, extra=variant.extra))
        async with loadgen.client_session() as session:
            for proc in procs:
                await bench_proxy.wait_ready(proc, session)
        print(f"\n{comparison.title}: A = {comparison.a.name}, B = {comparison.b.name} "
              f"(load avg {os.getloadavg()[0]:.2f})", flush=True)
        results: tuple[list[dict], list[dict]] = ([], [])
        for _ in range(args.rounds):
            for index in (0, 1, 1, 0):
                results[index].append(await comparison.measure(procs[index], args))
                await asyncio.sleep(1)  # let the connections of the last run close
        comparison.report((f"A: {comparison.a.name}", f"B: {comparison.b.name}"), *results)
    finally:
        for proc in procs:
            proc.stop()


async def bench(args: argparse.Namespace, workdir: Path) -> None:
    started = time.monotonic()
    print(f"kiro2api at scale: {bench_proxy.machine()}")
    upstream = bench_proxy.start_printing_port("upstream", ["upstream.py"], workdir)
    try:
        for name in args.comparisons or list(COMPARISONS):
            await compare(COMPARISONS[name], args, workdir, upstream)
    finally:
        upstream.stop()
    print(bench_proxy.took(started))


def main(argv: list[str] | None = None) -> None:
    """Run the comparisons (``make bench`` calls this with no arguments)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comparisons", nargs="*", metavar="NAME",
                        help=f"which to run: {', '.join(COMPARISONS)} (default: all)")
    parser.add_argument("--rounds", type=int, default=1, help="A B B A, this many times")
    parser.add_argument("--burst", type=int, default=2000, help="backlog: streams opened")
    parser.add_argument("--burst-seconds", type=float, default=2.0,
                        help="backlog: within this many seconds")
    parser.add_argument("--burst-frames", type=int, default=10,
                        help="backlog: frames of each stream")
    parser.add_argument("--burst-interval", type=int, default=300, metavar="MS",
                        help="backlog: milliseconds between them")
    args = parser.parse_args(argv)
    for name in args.comparisons:
        if name not in COMPARISONS:
            parser.error(f"no comparison {name!r}: choose from {', '.join(COMPARISONS)}")
    with tempfile.TemporaryDirectory(prefix="kiro2api-scale-") as workdir:
        asyncio.run(bench(args, Path(workdir)))


if __name__ == "__main__":
    main()
