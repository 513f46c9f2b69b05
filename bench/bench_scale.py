"""kiro2api under many concurrent streams: one setting against another, in one run.

Each comparison starts the fake upstream (``upstream.py``) and servers in
front of it that differ in one setting: two ``kiro2api.py server``
processes (A, the baseline, and B), or, for ``workers``, four servers (A to
D); it loads them in turn and back again, A B B A or A B C D D C B A
(``--rounds 2`` does it twice): a drift in the machine's other load falls
on all alike. This process is the client (``loadgen.py``). Every figure is
printed for each variant, with B / A (and so on); on this shared machine
only the ratios of one run are worth comparing, and the load average is
printed with them. CPU and RSS are summed over each server's process tree.

- ``backlog``: ``--backlog 128`` (aiohttp's own default, kiro2api's until
  issue 23) against kiro2api's default. ``--burst`` short streams (2,000)
  are opened evenly within ``--burst-seconds`` (2), each on a connection of
  its own. Counted: the connections the kernel's listen queues could not
  hold (``ListenOverflows`` in ``/proc/net/netstat``, over the whole
  machine: another program's overflow would count too), the client
  connects that took a SYN retransmission (1 s or more) or failed, and the
  streams that did not complete.

- ``gc``: the collector as Python sets it (no freeze, default thresholds:
  kiro2api before issue 23) against kiro2api's tuning (``tune_gc``).
  ``--streams`` clients (1,000) each open ``--waves`` (2) paced streams one
  after the other (``--frames`` 100 frames ``--interval`` 80 ms apart; the
  clients start evenly over ``--spread`` 1 s), against servers run by
  ``probe.py``, which times every collection with ``gc.callbacks``.
  Printed: the pauses during the run (count, p50, p99, max; full
  collections apart), the per-event latency (the upstream's
  stamp in each frame to its receipt here: p50 and p99 of the events
  written once every stream was open, and the max), the streams that did
  not complete, kiro2api's CPU per stream and its highest RSS.
  ``--gc-thresholds T0,T1,T2`` tries other thresholds in B.

- ``timers``: kiro2api before the watchdog (``--baseline REV``, by default
  the commit before ``class Watchdog`` came into kiro2api.py: aiohttp's
  sock_read, a timer re-armed on every upstream read) against this
  checkout's. CPU per request of ``--requests`` (2,000) streamed
  ``/v1/messages`` at c=20 (200 frames each, no delay), then the paced
  streams as for ``gc``: CPU per stream and the per-event latency
  (``--streams 0``: none).

- ``loop``: ``--loop asyncio`` against ``--loop uvloop``, measured as
  ``timers`` is; skipped when uvloop is not installed (``pip install -e
  '.[speed]'``).

- ``workers``: ``kiro2api server --workers N`` (C; ``--workers``, 2: a
  supervisor and N processes on one port, SO_REUSEPORT) against the
  forwarding floor (``floor.py``) in one process (A) and in N (B, ``floor.py
  --processes N``), and kiro2api in one process (D) for reference; kiro2api
  runs directly, not under ``probe.py`` (no collection timing). Each
  server is warmed up with ``--streams`` short streams; then the paced
  streams as for ``gc``, A B C D D C B A, with the RSS per open stream (the
  tree's highest RSS less its RSS idle after starting, over the most
  streams open at once); then, in the same order, a burst each as for
  ``backlog``. Printed with C / A, C / B and C / D, and issue 23's targets
  for C, PASS or MISS: every stream complete;
  latency p99 at most A's and at most 5 ms above B's; CPU per stream at
  most 1.3x B's; at most 50 KB per open stream; in the burst nothing
  refused (no overflow, no slow connect) and every stream complete.

Run ``python bench/bench_scale.py`` for every comparison (``make bench``
runs it), or name some: ``python bench/bench_scale.py backlog``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import bench_proxy
import loadgen

BENCH = Path(__file__).resolve().parent

HEADERS = {"Content-Type": "application/json", "x-api-key": bench_proxy.API_KEY}
LETTERS = "ABCDEFGH"  # the variants' names in the tables
# A SYN the listen queue dropped is sent again after the initial RTO, 1 s.
SYN_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class Variant:
    name: str
    extra: tuple[str, ...] = ()  # server options
    gc_tuning: str | None = None  # probe.py's --gc-tuning
    script: Path = bench_proxy.ROOT / "kiro2api.py"
    # "probe": kiro2api under probe.py (its collections timed); "direct": kiro2api.py
    # itself, whose worker processes are then its own children; "floor": floor.py.
    runner: str = "probe"


@dataclass
class Server:
    """One variant's server; under probe.py, which writes its collections to ``gc_log``."""

    proc: bench_proxy.Proc
    gc_log: Path | None = None  # None: not under probe.py
    idle_kb: int = 0  # its process tree's RSS once started, before any load

    def collections(self, since_ns: int) -> list[tuple[int, int, int, int]]:
        """(start ns, duration ns, CPU ns, generation) of each collection since
        ``since_ns``; none when not under probe.py."""
        if self.gc_log is None:
            return []
        self.gc_log.unlink(missing_ok=True)
        self.proc.popen.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not self.gc_log.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.proc.name} wrote no {self.gc_log.name}")
            time.sleep(0.05)
        rows = [json.loads(line) for line in self.gc_log.read_text().splitlines()]
        return [tuple(r) for r in rows if r[0] >= since_ns]


def start_server(variant: Variant, upstream: str, workdir: Path) -> Server:
    """The variant's server in front of ``upstream``: the floor, or kiro2api with a
    token file in ``workdir``."""
    if variant.runner == "floor":
        return Server(bench_proxy.start_printing_port(
            "floor", ["floor.py", "--upstream", upstream, *variant.extra], workdir))
    port = bench_proxy.free_port()
    log, gc_log = workdir / "kiro2api.log", workdir / "gc.jsonl"
    token_file = bench_proxy.write_token_file(workdir / "kiro-auth-token.json")
    tuning = ("--gc-tuning", variant.gc_tuning) if variant.gc_tuning else ()
    probe = [str(BENCH / "probe.py"), str(gc_log), *tuning] if variant.runner == "probe" else []
    argv = [sys.executable, *probe, str(variant.script), "server", "--port", str(port),
            "--api-key", bench_proxy.API_KEY, "--token-file", str(token_file),
            "--upstream", upstream, "--social-auth-url", upstream, "--oidc-url", upstream,
            "--log-level", "WARNING", *variant.extra]
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
    proc = bench_proxy.Proc("kiro2api", popen, f"http://127.0.0.1:{port}", log)
    return Server(proc, gc_log if probe else None)


@dataclass
class Comparison:
    title: str
    variants: tuple[Variant, ...]  # A (the baseline), B, ...
    # Phases, each a round order over all variants in turn: one variant's j-th
    # figures from every phase make its j-th row.
    measures: tuple[Callable[[Server, argparse.Namespace], Any], ...]
    # The variants' names and each one's results, in order; the command line.
    report: Callable[[list[str], list[list[dict]], argparse.Namespace], None]
    warm_up: Callable[[Server, argparse.Namespace], Awaitable[None]] | None = None


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


async def burst(server: Server, args: argparse.Namespace) -> dict[str, float]:
    """``args.burst`` streams opened evenly within ``args.burst_seconds``."""
    proc = server.proc
    connects: list[float] = []
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=60),
        trace_configs=[connect_timer(connects)])
    body = loadgen.request_body("anthropic", f"slow:{args.burst_frames}:{args.burst_interval}")
    before = listen_overflows()
    cpu = bench_proxy.tree_cpu_seconds(proc.pid)
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
        "cpu_s": bench_proxy.tree_cpu_seconds(proc.pid) - cpu,
    }


def pause_figures(collections: list[tuple[int, int, int, int]]) -> dict[str, float]:
    """How many collections of each generation; p50, p99 and max of their pauses and the
    max of their CPU time (ms); the pauses' total and the full collections' longest."""
    pauses = [duration / 1e6 for _, duration, _, _ in collections]
    full = [duration / 1e6 for _, duration, _, generation in collections if generation == 2]
    return {**{f"gen{g}": sum(c[3] == g for c in collections) for g in range(3)},
            "gc50": loadgen.percentile(pauses, 50), "gc99": loadgen.percentile(pauses, 99),
            "gc_max": max(pauses, default=0.0),
            "gc_cpu_max": max((cpu / 1e6 for _, _, cpu, _ in collections), default=0.0),
            "gc_ms": sum(pauses), "full_max": max(full, default=0.0)}


async def paced(server: Server, args: argparse.Namespace) -> dict[str, float]:
    """``args.streams`` paced streams, started evenly over ``args.spread`` seconds.

    CPU and RSS are the server's process tree's (a supervisor and its workers),
    the tree as it is at the start. ``kb_open``: the tree's highest RSS less its
    RSS when idle after starting (``Server.idle_kb``), over the most streams
    open at once; ``kb_run``: the same less its RSS just before the run, which
    from the second run on holds what the runs before left (pooled upstream
    connections, the allocator's arenas): it comes out lower, down to nothing.
    """
    proc = server.proc
    body = loadgen.request_body("anthropic", f"slow:{args.frames}:{args.interval}")
    since = time.monotonic_ns()
    tree = bench_proxy.process_tree(proc.pid)
    before = rss = bench_proxy.tree_sum(tree, bench_proxy.rss_kb)
    cpu = bench_proxy.tree_sum(tree, bench_proxy.cpu_seconds)
    result = loadgen.Stamped(streams=args.streams)

    async def client(k: int) -> None:  # one client's streams, one after the other
        await asyncio.sleep(k * args.spread / args.streams)
        for _ in range(args.waves):
            await loadgen.stamped_stream(session, proc.url + "/v1/messages", body, HEADERS,
                                         result)

    async with loadgen.client_session(limit=0) as session:
        done = asyncio.gather(*(client(k) for k in range(args.streams)))
        while not done.done():
            rss = max(rss, bench_proxy.tree_sum(tree, bench_proxy.rss_kb))
            await asyncio.sleep(0.1)
        await done
    cpu = bench_proxy.tree_sum(tree, bench_proxy.cpu_seconds) - cpu
    steady = [d / 1e6 for d in result.steady_delays_ns()]
    delays = [d / 1e6 for d in result.delays_ns]
    return {
        "failed": len(result.errors),
        "lost": args.streams * args.waves * args.frames - len(delays),
        "max_open": result.max_open,
        "p50": loadgen.percentile(steady, 50), "p99": loadgen.percentile(steady, 99),
        "max": max(delays, default=float("nan")),
        "cpu_ms": cpu * 1000 / (args.streams * args.waves),
        "rss_mb": rss / 1024, "idle_mb": server.idle_kb / 1024,
        "kb_open": (rss - server.idle_kb) / max(result.max_open, 1),
        "kb_run": (rss - before) / max(result.max_open, 1),
        **pause_figures(server.collections(since)),
    }


async def closed_loop(server: Server, args: argparse.Namespace) -> dict[str, float]:
    """CPU per request of streamed /v1/messages at c=20 (after a warm-up)."""
    proc = server.proc
    url, body = proc.url + "/v1/messages", loadgen.request_body("anthropic", "text")
    expect = (b"message_stop",)
    async with loadgen.client_session() as session:
        await loadgen.run_load(session, url, body, HEADERS, concurrency=20, requests=200,
                               expect=expect)
        cpu = bench_proxy.tree_cpu_seconds(proc.pid)
        load = await loadgen.run_load(session, url, body, HEADERS, concurrency=20,
                                      requests=args.requests, expect=expect)
    cpu = bench_proxy.tree_cpu_seconds(proc.pid) - cpu
    return {"req_cpu": cpu * 1000 / max(len(load.samples), 1), "rps": load.rps,
            "req_errors": len(load.errors)}


async def closed_and_paced(server: Server, args: argparse.Namespace) -> dict[str, float]:
    closed = await closed_loop(server, args)
    return {**closed, **await paced(server, args)} if args.streams else closed


async def warm_up(server: Server, args: argparse.Namespace) -> None:
    """``args.streams`` short paced streams (10 frames): the server's connection
    pools and code paths are then as a run leaves them, so that its first run
    counts as its others do (in a trial without, three of the four servers' cold
    first runs had 3 to 20 times the p99 of their second)."""
    body = loadgen.request_body("anthropic", f"slow:10:{args.interval}")
    async with loadgen.client_session(limit=0) as session:
        _, done = await loadgen.run_stamped(session, server.proc.url + "/v1/messages", body,
                                            HEADERS, args.streams, spread=args.spread)
        await done


async def named_burst(server: Server, args: argparse.Namespace) -> dict[str, float]:
    """The burst, its figures named ``burst_...`` to sit beside the paced streams'.

    A phase of its own, after every paced run: the RSS that 2,000 streams leave
    behind would otherwise be counted in the next paced run's highest RSS.
    """
    return {f"burst_{k}": v for k, v in (await burst(server, args)).items()}


def baseline_script(rev: str | None, workdir: Path) -> tuple[str, Path]:
    """kiro2api.py (and the modules it imports) at ``rev``, or, without one, at the
    commit before kiro2api.py had ``class Watchdog``; (short hash, its kiro2api.py)."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=bench_proxy.ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()

    if rev is None:
        added = git("log", "--format=%H", "-S", "class Watchdog", "--", "kiro2api.py")
        if not added:
            raise SystemExit("kiro2api.py has no Watchdog in this history: give --baseline")
        rev = added.split()[-1] + "~1"
    where = workdir / "baseline"
    where.mkdir(exist_ok=True)
    for module in ("kiro2api.py", "convert.py", "eventstream.py"):
        (where / module).write_text(git("show", f"{rev}:{module}") + "\n")
    return git("rev-parse", "--short", rev), where / "kiro2api.py"


# Report ##################################################################

Columns = tuple[tuple[str, str, int, Callable], ...]  # (heading, key, decimals, summed up by)


def ratio(b: float, a: float) -> str:
    return f"{b / a:.2f}x" if a else ("-" if not b else "inf")


def print_rows(names: list[str], runs: list[list[dict]], columns: Columns,
               ratios: tuple[tuple[int, int], ...] = ()) -> list[dict]:
    """One line per run of each variant, then each column summed up over the runs (its
    ``sum``, ``max`` or ``median``), and ratios of those: each later variant's to A's
    (B / A, ...), or the pairs of indexes into ``names`` that ``ratios`` lists.
    Columns the results do not have are left out. Returns the summed-up figures,
    one dict per variant."""
    columns = tuple(c for c in columns if all(c[1] in r for results in runs for r in results))
    print(bench_proxy.row("", [c[0] for c in columns]))
    summary = []
    for name, results in zip(names, runs):
        for result in results:
            print(bench_proxy.row(f"  {name}", [f"{result[k]:.{d}f}" for _, k, d, _ in columns]))
        summary.append({k: how([r[k] for r in results]) for _, k, _, how in columns})
    letters = [name.partition(":")[0] for name in names]
    for letter, result in zip(letters, summary):
        print(bench_proxy.row(f"  {letter}, all runs",
                              [f"{result[k]:.{d}f}" for _, k, d, _ in columns]))
    for top, bottom in ratios or tuple((k, 0) for k in range(1, len(names))):
        print(bench_proxy.row(f"  {letters[top]} / {letters[bottom]}",
                              [ratio(summary[top][k], summary[bottom][k])
                               for _, k, _, _ in columns]))
    return summary


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


BURST_LEGEND = (
    "overflows: connections the listen queues dropped (the machine's ListenOverflows); "
    "slow: client\nconnects of 1 s or more (a SYN sent again); failed: streams that did "
    "not complete;\nconnect max, TTFB p99 and max in ms")


def burst_columns(prefix: str = "") -> Columns:
    """The burst's columns; ``prefix``: that of its keys among other figures."""
    return tuple((heading, prefix + key, decimals, how) for heading, key, decimals, how in (
        ("overflows", "overflows", 0, sum), ("slow", "slow_connects", 0, sum),
        ("failed", "failed", 0, sum), ("lost ev", "lost_events", 0, sum),
        ("max open", "max_open", 0, max), ("conn max", "connect_max", 0, max),
        ("TTFB p99", "fb99", 0, max), ("TTFB max", "fb_max", 0, max),
        ("CPU s", "cpu_s", 2, sum)))


def report_burst(names: list[str], runs: list[list[dict]], args: argparse.Namespace) -> None:
    print(BURST_LEGEND)
    print_rows(names, runs, burst_columns())
    print("  (counts and CPU summed over the runs; the rest: the highest run)")


def report_paced(names: list[str], runs: list[list[dict]], args: argparse.Namespace) -> None:
    print("GC: collections during the run by generation (full: 2), their pauses in ms, the "
          "most CPU one\ntook (its pause less the time other processes had the CPU) and the "
          "longest full one; GC ms:\nall pauses; latency: upstream write -> client, ms (p50, "
          "p99: once every stream was open;\nmax: every event); CPU ms per stream; RSS MB: "
          "the highest while the streams were open;\nfailed streams, lost events; medians "
          "over the runs")
    print_rows(names, runs, (
        ("gen0 n", "gen0", 0, median), ("gen1 n", "gen1", 0, median),
        ("full n", "gen2", 0, median), ("GC p50", "gc50", 2, median),
        ("GC p99", "gc99", 1, median), ("GC max", "gc_max", 1, median),
        ("CPU max", "gc_cpu_max", 1, median), ("full max", "full_max", 1, median),
        ("GC ms", "gc_ms", 0, median),
        ("lat p50", "p50", 1, median), ("lat p99", "p99", 1, median),
        ("lat max", "max", 0, median), ("CPU/strm", "cpu_ms", 2, median),
        ("RSS MB", "rss_mb", 0, median), ("failed", "failed", 0, sum),
        ("lost", "lost", 0, sum)))


def report_timers(names: list[str], runs: list[list[dict]], args: argparse.Namespace) -> None:
    print("req CPU: CPU ms per streamed request at c=20, and req/s; then the paced streams: "
          "CPU ms per\nstream, latency p50 and p99 in ms, collections by generation; "
          "failed requests and streams; medians")
    print_rows(names, runs, (
        ("req CPU", "req_cpu", 3, median), ("req/s", "rps", 0, median),
        ("CPU/strm", "cpu_ms", 3, median), ("lat p50", "p50", 1, median),
        ("lat p99", "p99", 1, median), ("gen0 n", "gen0", 0, median),
        ("gen1 n", "gen1", 0, median), ("full n", "gen2", 0, median),
        ("failed", "req_errors", 0, sum), ("str fail", "failed", 0, sum),
        ("lost", "lost", 0, sum)))


# The workers comparison's variants, in this order (see workers_variants).
FLOOR_ONE, FLOOR_N, WORKERS, SINGLE = range(4)
WORKERS_RATIOS = ((WORKERS, FLOOR_ONE), (WORKERS, FLOOR_N), (WORKERS, SINGLE))
# Issue 23's targets for --workers N against the floor.
ADDED_P99_MS = 5.0  # above the floor in N processes
CPU_RATIO = 1.3  # CPU per stream, to the floor in N processes
KB_PER_STREAM = 50.0


def report_workers(names: list[str], runs: list[list[dict]], args: argparse.Namespace) -> None:
    print("latency: upstream write -> client, ms (p50, p99: once every stream was open; max: "
          "every event);\nof the process tree: CPU ms per stream, RSS MB idle after starting "
          "and at its highest;\nKB/open: the highest less the idle RSS, over the most streams "
          "open at once (KB/o run: less\nthe RSS just before the run); failed streams, lost "
          f"events; medians over the runs; each\nserver had {args.streams} streams of 10 "
          "frames to warm up first")
    paced_rows = print_rows(names, runs, (
        ("lat p50", "p50", 1, median), ("lat p99", "p99", 1, median),
        ("lat max", "max", 0, median), ("CPU/strm", "cpu_ms", 2, median),
        ("idle MB", "idle_mb", 0, median), ("RSS MB", "rss_mb", 0, median),
        ("KB/open", "kb_open", 1, median), ("KB/o run", "kb_run", 1, median),
        ("max open", "max_open", 0, min), ("failed", "failed", 0, sum),
        ("lost", "lost", 0, sum)), WORKERS_RATIOS)
    print(f"\nthen, once every paced run was done, a burst: {args.burst} streams of "
          f"{args.burst_frames} frames opened within {args.burst_seconds:g} s\n{BURST_LEGEND}")
    burst_rows = print_rows(names, runs, burst_columns("burst_"), WORKERS_RATIOS)
    print("  (counts and CPU summed over the runs; the rest: the highest run)")
    print_workers_targets(names, paced_rows, burst_rows)


def print_workers_targets(names: list[str], paced_rows: list[dict],
                          burst_rows: list[dict]) -> None:
    """Issue 23's targets for C (kiro2api --workers N), PASS or MISS."""
    floor_one, floor_n, workers = (paced_rows[k] for k in (FLOOR_ONE, FLOOR_N, WORKERS))
    cpu = workers["cpu_ms"] / floor_n["cpu_ms"]
    added = workers["p99"] - floor_n["p99"]
    burst = burst_rows[WORKERS]
    refused = burst["burst_overflows"] + burst["burst_slow_connects"]
    incomplete = burst["burst_failed"] + burst["burst_lost_events"]
    checks = (
        ("paced: every stream complete (failed, lost events)",
         f"{workers['failed']:.0f}, {workers['lost']:.0f}",
         workers["failed"] == workers["lost"] == 0),
        ("latency p99 <= A's (the floor, one process)",
         f"{workers['p99']:.1f} / {floor_one['p99']:.1f} ms", workers["p99"] <= floor_one["p99"]),
        (f"latency p99 <= B's (the floor, N processes) + {ADDED_P99_MS:g} ms",
         f"{added:+.1f} ms", added <= ADDED_P99_MS),
        (f"CPU per stream <= {CPU_RATIO:g}x B's", f"{cpu:.2f}x", cpu <= CPU_RATIO),
        (f"RSS growth per open stream <= {KB_PER_STREAM:g} KB", f"{workers['kb_open']:.1f} KB",
         workers["kb_open"] <= KB_PER_STREAM),
        ("burst: nothing refused (overflows, slow connects)",
         f"{burst['burst_overflows']:.0f}, {burst['burst_slow_connects']:.0f}", refused == 0),
        ("burst: every stream complete (failed, lost events)",
         f"{burst['burst_failed']:.0f}, {burst['burst_lost_events']:.0f}", incomplete == 0),
    )
    print(f"\ntargets (issue 23), C = {names[WORKERS].partition(': ')[2]}")
    for what, value, ok in checks:
        print(f"  {'PASS' if ok else 'MISS'} {what:<56}{value:>18}")


# Main ####################################################################

def workers_variants(workers: int) -> tuple[Variant, ...]:
    """The floor in one process and in ``workers``, kiro2api ``--workers`` and, for
    reference, kiro2api in one process: FLOOR_ONE, FLOOR_N, WORKERS, SINGLE."""
    return (Variant("floor, one process", runner="floor"),
            Variant(f"floor, {workers} processes", ("--processes", str(workers)),
                    runner="floor"),
            Variant(f"kiro2api --workers {workers}", ("--workers", str(workers)),
                    runner="direct"),
            Variant("kiro2api, one process", runner="direct"))


COMPARISONS = {
    "backlog": Comparison(
        "listen backlog: a burst of connects",
        (Variant("--backlog 128", ("--backlog", "128")), Variant("the default")),
        (burst,), report_burst),
    "gc": Comparison(
        "garbage collection",
        (Variant("Python's defaults", gc_tuning="default"), Variant("tune_gc")),
        (paced,), report_paced),
    "timers": Comparison(
        "upstream timeouts: a timer per read, or the watchdog",
        (Variant("before the watchdog"), Variant("the watchdog")), (closed_and_paced,),
        report_timers),
    "loop": Comparison(
        "event loop",
        (Variant("--loop asyncio", ("--loop", "asyncio")),
         Variant("--loop uvloop", ("--loop", "uvloop"))), (closed_and_paced,),
        report_timers),
    "workers": Comparison(
        "worker processes: kiro2api --workers against the floor in as many processes",
        workers_variants(2), (paced, named_burst), report_workers, warm_up),
}


def with_thresholds(comparison: Comparison, thresholds: str) -> Comparison:
    """The gc comparison with B's thresholds ``T0,T1,T2`` in place of GC_THRESHOLDS."""
    b = Variant(f"tune_gc at {thresholds}", gc_tuning=thresholds)
    return dataclasses.replace(comparison, variants=(comparison.variants[0], b))


def round_order(variants: int) -> list[int]:
    """One round's order: each variant in turn, then back (A B B A, A B C D D C B A),
    so that a steady drift in the machine's other load falls on all alike."""
    there = list(range(variants))
    return there + there[::-1]  # each variant twice: a round is two runs of each


async def start_servers(comparison: Comparison, upstream: str, workdir: Path,
                        servers: list[Server]) -> None:
    """Start the comparison's servers into ``servers`` (so that the caller can stop
    those already running when one fails) and wait until each answers."""
    for letter, variant in zip(LETTERS, comparison.variants):
        where = workdir / letter
        where.mkdir(exist_ok=True)
        servers.append(start_server(variant, upstream, where))
    async with loadgen.client_session() as session:
        for server in servers:
            await bench_proxy.wait_ready(server.proc, session)
    await asyncio.sleep(1)  # for the workers that the first answer did not come from
    for server in servers:
        server.idle_kb = bench_proxy.tree_rss_kb(server.proc.pid)


async def compare(comparison: Comparison, args: argparse.Namespace, workdir: Path,
                  upstream: bench_proxy.Proc) -> None:
    names = [f"{letter}: {variant.name}"
             for letter, variant in zip(LETTERS, comparison.variants)]
    servers: list[Server] = []
    try:
        await start_servers(comparison, upstream.url, workdir, servers)
        for server in servers if comparison.warm_up else ():
            await comparison.warm_up(server, args)
            await asyncio.sleep(1)
        print(f"\n{comparison.title}: {', '.join(n.replace(':', ' =', 1) for n in names)} "
              f"(load avg {os.getloadavg()[0]:.2f})", flush=True)
        results = [[{} for _ in range(2 * args.rounds)] for _ in servers]
        for measure in comparison.measures:
            done = [0 for _ in servers]  # each variant's runs so far in this phase
            for index in round_order(len(servers)) * args.rounds:
                results[index][done[index]].update(await measure(servers[index], args))
                done[index] += 1
                await asyncio.sleep(1)  # let the connections of the last run close
        comparison.report(names, results, args)
    finally:
        for server in servers:
            server.proc.stop()


async def bench(args: argparse.Namespace, workdir: Path) -> None:
    started = time.monotonic()
    print(f"kiro2api at scale: {bench_proxy.machine()}")
    upstream = bench_proxy.start_printing_port("upstream", ["upstream.py"], workdir)
    try:
        for name in args.comparisons or list(COMPARISONS):
            comparison = COMPARISONS[name]
            if name == "gc" and args.gc_thresholds:
                comparison = with_thresholds(comparison, args.gc_thresholds)
            if name == "loop" and importlib.util.find_spec("uvloop") is None:
                print("\nevent loop: skipped, uvloop is not installed (pip install -e "
                      "'.[speed]')")
                continue
            if name == "timers":
                rev, script = baseline_script(args.baseline, workdir)
                comparison = dataclasses.replace(comparison, variants=(
                    Variant(f"{rev}, before the watchdog" if args.baseline is None
                            else f"{rev} (--baseline)", script=script),
                    *comparison.variants[1:]))
            if name == "workers":
                comparison = dataclasses.replace(comparison,
                                                 variants=workers_variants(args.workers))
            await compare(comparison, args, workdir, upstream)
    finally:
        upstream.stop()
    print(bench_proxy.took(started))


def main(argv: list[str] | None = None) -> None:
    """Run the comparisons (``make bench`` calls this with no arguments)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comparisons", nargs="*", metavar="NAME",
                        help=f"which to run: {', '.join(COMPARISONS)} (default: all)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="A B B A (A B C D D C B A), this many times")
    parser.add_argument("--burst", type=int, default=2000, help="backlog: streams opened")
    parser.add_argument("--burst-seconds", type=float, default=2.0,
                        help="backlog: within this many seconds")
    parser.add_argument("--burst-frames", type=int, default=10,
                        help="backlog: frames of each stream")
    parser.add_argument("--burst-interval", type=int, default=300, metavar="MS",
                        help="backlog: milliseconds between them")
    parser.add_argument("--streams", type=int, default=1000, help="paced streams at once")
    parser.add_argument("--frames", type=int, default=100, help="frames of each paced stream")
    parser.add_argument("--interval", type=int, default=80, metavar="MS",
                        help="milliseconds between them")
    parser.add_argument("--spread", type=float, default=1.0,
                        help="seconds over which the paced streams start")
    parser.add_argument("--waves", type=int, default=2,
                        help="paced streams each client opens, one after the other")
    parser.add_argument("--requests", type=int, default=2000,
                        help="timers: requests at c=20 per run")
    parser.add_argument("--baseline", metavar="REV",
                        help="timers: the kiro2api to compare with (default: the commit "
                             "before the watchdog)")
    parser.add_argument("--gc-thresholds", metavar="T0,T1,T2",
                        help="gc: B's thresholds, in place of kiro2api's GC_THRESHOLDS")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="workers: kiro2api's --workers, and the floor's processes")
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error("--workers: 2 or more (one process is the comparison's baseline)")
    for name in args.comparisons:
        if name not in COMPARISONS:
            parser.error(f"no comparison {name!r}: choose from {', '.join(COMPARISONS)}")
    with tempfile.TemporaryDirectory(prefix="kiro2api-scale-") as workdir:
        asyncio.run(bench(args, Path(workdir)))


if __name__ == "__main__":
    main()
