"""kiro2api against the forwarding floor: CPU, latency and memory per request.

Three processes on 127.0.0.1, each on a free port: the fake upstream
(``upstream.py``), the floor (``floor.py``, a proxy that forwards the bytes
unchanged) and ``kiro2api.py server``; this process generates the load
(``loadgen.py``). Each figure is measured for the floor and for kiro2api in
the same run, one right after the other, and printed side by side with
their ratio (kiro2api / floor):

- CPU per request: the proxy's utime + stime from ``/proc/PID/stat`` over a
  run, divided by its requests; with req/s, time to first byte, to the first
  text and to the last byte (p50/p99) and peak RSS, at concurrency 20 and 100.
- Streaming latency: 200 concurrent slow streams (one frame every 20 ms);
  the delay from the upstream's write of each frame to the client's receipt.
  Twice: streams started over one interval, so that their frames interleave
  as independent clients' do (the target's row), and all started at once,
  so that every 20 ms all 200 frames arrive together (a worst case). The
  target's p99 is over the events written once all 200 streams are open;
  the start-up, while the proxy is also starting the other streams, is shown
  apart ("all"). Each proxy's best p99 of three runs, taken in turn, counts:
  on a shared machine one burst of someone else's work decides a single
  run's p99.
- Memory: RSS growth per open stream with 500 concurrent slow streams.
- Soak: RSS while streaming at c=20 for 60 s, for both.

Run ``python bench/bench_proxy.py`` (about 4 minutes), ``--quick`` for a
smoke run (no soak), ``--profile`` to run kiro2api under cProfile and print
its hot spots instead, ``--soak SECONDS`` to change the soak (0: none).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for path in (ROOT, BENCH):  # run directly, not through bench/run.py
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import aiohttp  # noqa: E402

import loadgen  # noqa: E402

API_KEY = "bench-client-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SLOW_INTERVAL_MS = 20


@dataclass(frozen=True)
class Scenario:
    label: str
    api: str  # a key of loadgen.ROUTES
    stream: bool
    upstream: str  # the upstream answer: "text" | "tool"
    expect: tuple[bytes, ...]  # what the end of kiro2api's answer must hold


SCENARIOS = (
    Scenario("stream /v1/messages", "anthropic", True, "text", (b"message_stop",)),
    Scenario("stream /v1/chat/completions", "openai", True, "text", (b"[DONE]",)),
    Scenario("stream /v1/responses", "responses", True, "text", (b'"status":"completed","usage"',)),
    Scenario("non-stream /v1/messages", "anthropic", False, "text", (b'"end_turn"',)),
    Scenario("tool call, stream /v1/messages", "anthropic", True, "tool",
             (b'"tool_use"', b"message_stop")),
)
FLOOR_EXPECT = (b"metadataEvent",)  # the floor passes the upstream's last frame through


@dataclass(frozen=True)
class Settings:
    requests: int  # per row and proxy
    warmup: int
    concurrency: tuple[int, ...]
    latency_streams: int
    latency_frames: int
    memory_streams: int
    memory_frames: int
    rate: float  # open-loop rows: requests started per second ...
    rate_requests: int  # ... and how many
    soak: float  # seconds of streaming at c=20 for the RSS soak, per proxy (0: none)
    latency_rounds: int  # streaming-latency runs per proxy; the best p99 counts


FULL = Settings(requests=1000, warmup=100, concurrency=(20, 100), latency_streams=200,
                latency_frames=150, memory_streams=500, memory_frames=300, rate=100,
                rate_requests=400, soak=60, latency_rounds=3)
QUICK = Settings(requests=200, warmup=40, concurrency=(20, 100), latency_streams=200,
                 latency_frames=50, memory_streams=500, memory_frames=150, rate=100,
                 rate_requests=100, soak=0, latency_rounds=1)


# Processes ###############################################################


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def parents() -> dict[int, int]:
    """The parent of every live process on the machine, from ``/proc/*/stat``."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:  # it ended since the listing
                continue
            found[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (a supervisor and its workers, say)."""
    children: dict[int, list[int]] = {}
    for child, parent in parents().items():
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], ()))
    return tree


def tree_sum(members: list[int], measure: Callable[[int], float]) -> float:
    """``measure`` summed over the processes ``members`` (a ``process_tree``); one
    that has ended counts for nothing (its CPU time is then its parent's to collect)."""
    total = 0.0
    for member in members:
        try:
            total += measure(member)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live descendants, in seconds."""
    return tree_sum(process_tree(pid), cpu_seconds)


def tree_rss_kb(pid: int) -> int:
    """RSS of ``pid`` and its live descendants, summed: a page two of them share
    counts twice, so the sum is for growth (one sum less another), not size."""
    return int(tree_sum(process_tree(pid), rss_kb))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_printing_port(name: str, argv: list[str], workdir: Path) -> Proc:
    """Start one of our helper servers; it prints its port on its first line."""
    log = workdir / f"{name}.log"
    popen = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                             stderr=log.open("w"), cwd=BENCH, text=True)
    line = popen.stdout.readline()
    if not line.strip().isdigit():
        popen.kill()
        raise RuntimeError(f"{name} did not start: {log.read_text()[-2000:]}")
    return Proc(name, popen, f"http://127.0.0.1:{line.strip()}", log)


def write_token_file(path: Path) -> Path:
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=6)
    path.write_text(json.dumps({
        "accessToken": "aoa-bench-access", "refreshToken": "aor-bench-refresh",
        "expiresAt": expires.strftime("%Y-%m-%dT%H:%M:%S.000Z"), "authMethod": "social",
        "provider": "Github",
        "profileArn": "arn:aws:codewhisperer:us-east-1:111122223333:profile/BENCH"}))
    path.chmod(0o600)
    return path


def start_kiro2api(upstream: str, workdir: Path, profile: Path | None = None,
                   script: Path = ROOT / "kiro2api.py", extra: tuple[str, ...] = ()) -> Proc:
    """kiro2api in front of ``upstream``, with a token file in ``workdir``;
    ``extra``: more server options (e.g. ``--state URL``)."""
    port = free_port()
    log = workdir / "kiro2api.log"
    token_file = write_token_file(workdir / "kiro-auth-token.json")
    runner = ["-m", "cProfile", "-o", str(profile)] if profile else []
    argv = [sys.executable, *runner, str(script), "server", "--port", str(port),
            "--api-key", API_KEY, "--token-file", str(token_file), "--upstream", upstream,
            "--social-auth-url", upstream, "--oidc-url", upstream, "--log-level", "WARNING",
            *extra]
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
    return Proc("kiro2api", popen, f"http://127.0.0.1:{port}", log)


async def wait_ready(proc: Proc, session: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            break
        try:
            async with session.get(proc.url + "/") as response:
                await response.read()
                return
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{proc.name} is not answering: {proc.log.read_text()[-2000:]}")


# Measurements #############################################################


class PeakRss:
    """Sample a process's RSS every 50 ms while in the ``async with``."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kb = pid, 0

    async def _sample(self) -> None:
        while True:
            self.peak_kb = max(self.peak_kb, rss_kb(self.pid))
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> PeakRss:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._task.cancel()
        self.peak_kb = max(self.peak_kb, rss_kb(self.pid))


def target(proc: Proc, scenario: Scenario) -> tuple[str, bytes, dict, tuple]:
    """URL, body, headers and expected ending of one scenario on one proxy."""
    body = loadgen.request_body(scenario.api, scenario.upstream, stream=scenario.stream)
    headers = {"Content-Type": "application/json", "x-api-key": API_KEY}
    if proc.name == "floor":
        return proc.url + loadgen.route(scenario.api), body, headers, FLOOR_EXPECT
    return proc.url + loadgen.route(scenario.api), body, headers, scenario.expect


async def measure(session: aiohttp.ClientSession, proc: Proc, scenario: Scenario,
                  concurrency: int, settings: Settings, rate: float | None = None,
                  ) -> dict[str, float]:
    """One row for one proxy: closed loop at ``concurrency``, or open loop at ``rate``."""
    url, body, headers, expect = target(proc, scenario)
    warm = await loadgen.run_load(session, url, body, headers, concurrency=concurrency,
                                  requests=max(settings.warmup, concurrency), expect=expect)
    if warm.errors:
        raise RuntimeError(f"{proc.name}, {scenario.label}: {warm.errors[0]}")
    before = cpu_seconds(proc.pid)
    async with PeakRss(proc.pid) as rss:
        load = await loadgen.run_load(
            session, url, body, headers, concurrency=concurrency, rate=rate,
            requests=settings.rate_requests if rate else settings.requests, expect=expect)
    cpu = cpu_seconds(proc.pid) - before
    if load.errors:
        raise RuntimeError(f"{proc.name}, {scenario.label}: {len(load.errors)} errors, "
                           f"first: {load.errors[0]}")
    return {
        "cpu_ms": cpu * 1000 / len(load.samples), "rps": load.rps,
        "fb50": load.percentile("first_byte", 50), "fb99": load.percentile("first_byte", 99),
        "ft50": load.percentile("first_text", 50), "ft99": load.percentile("first_text", 99),
        "tot50": load.percentile("total", 50), "tot99": load.percentile("total", 99),
        "rss_mb": rss.peak_kb / 1024,
    }


async def latency(session: aiohttp.ClientSession, proc: Proc, api: str,
                  settings: Settings, spread: bool) -> dict[str, float]:
    """Per-event delays of ``latency_streams`` slow streams; with ``spread``, the
    streams start evenly over one frame interval, else all at once."""
    scenario = f"slow:{settings.latency_frames}:{SLOW_INTERVAL_MS}"
    body = loadgen.request_body(api, scenario)
    headers = {"Content-Type": "application/json", "x-api-key": API_KEY}
    before = cpu_seconds(proc.pid)
    result, done = await loadgen.run_stamped(
        session, proc.url + loadgen.route(api), body, headers, settings.latency_streams,
        spread=SLOW_INTERVAL_MS / 1000 if spread else 0.0)
    await done
    cpu = cpu_seconds(proc.pid) - before
    delays = [d / 1e6 for d in result.delays_ns]
    steady = [d / 1e6 for d in result.steady_delays_ns()]
    expected = settings.latency_streams * settings.latency_frames
    return {
        "p50": loadgen.percentile(steady, 50), "p99": loadgen.percentile(steady, 99),
        "all50": loadgen.percentile(delays, 50), "all99": loadgen.percentile(delays, 99),
        "max": max(delays, default=float("nan")), "events": len(delays),
        "lost": expected - len(delays), "errors": len(result.errors),
        "fb99": loadgen.percentile(result.first_byte, 99) * 1000,
        "max_open": result.max_open, "cpu_ms": cpu * 1000 / settings.latency_streams,
    }


async def memory(session: aiohttp.ClientSession, proc: Proc,
                 settings: Settings) -> dict[str, float]:
    """RSS before and while ``memory_streams`` slow streams are open at once."""
    scenario = f"slow:{settings.memory_frames}:{SLOW_INTERVAL_MS}"
    body = loadgen.request_body("anthropic", scenario)
    headers = {"Content-Type": "application/json", "x-api-key": API_KEY}
    streams = settings.memory_streams
    await asyncio.sleep(0.5)
    before = rss_kb(proc.pid)
    result, done = await loadgen.run_stamped(session, proc.url + "/v1/messages", body, headers,
                                             streams)
    # Wait for every stream to start, for at most half their length; then
    # sample while (nearly) all are open.
    deadline = time.monotonic() + settings.memory_frames * SLOW_INTERVAL_MS / 2000
    while result.open < streams and time.monotonic() < deadline and not done.done():
        await asyncio.sleep(0.05)
    open_now, during = result.open, 0
    for _ in range(5):
        during = max(during, rss_kb(proc.pid))
        await asyncio.sleep(0.1)
    await done
    await asyncio.sleep(0.5)
    after = rss_kb(proc.pid)
    return {"before_mb": before / 1024, "during_mb": during / 1024, "after_mb": after / 1024,
            "open": open_now, "max_open": result.max_open, "errors": len(result.errors),
            "kb_per_stream": (during - before) / max(open_now, 1),
            "kb_per_request": (during - before) / streams}


async def soak(session: aiohttp.ClientSession, proc: Proc,
               seconds: float) -> list[tuple[float, float]]:
    """Stream /v1/messages at c=20 for ``seconds``; RSS (MB) every tenth of the way.

    The first tenth is the warm-up: growth is read from its end to the end.
    """
    url, body, headers, expect = target(proc, SCENARIOS[0])
    samples = [(0.0, rss_kb(proc.pid) / 1024)]
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        await loadgen.run_load(session, url, body, headers, concurrency=20, requests=200,
                               expect=expect)
        if elapsed >= len(samples) * seconds / 10:
            samples.append((elapsed, rss_kb(proc.pid) / 1024))
    samples.append((time.monotonic() - start, rss_kb(proc.pid) / 1024))
    return samples


# Report ##################################################################

COLUMNS = (("CPU ms", "cpu_ms", 2), ("req/s", "rps", 0), ("TTFB p50", "fb50", 2),
           ("TTFB p99", "fb99", 2), ("text p50", "ft50", 2), ("text p99", "ft99", 2),
           ("end p50", "tot50", 2), ("end p99", "tot99", 2), ("RSS MB", "rss_mb", 1))
LEGEND = """\
CPU ms: the proxy's CPU time per request; TTFB: first body byte; text: first
chunk holding the first text; end: last byte; all in ms from sending the
request, at the client. RSS MB: the proxy's peak during the row."""


def ratio(kiro: float, floor: float) -> str:
    return f"{kiro / floor:.2f}x" if floor else "-"


def row(label: str, values: list[str]) -> str:
    return f"{label:<34}" + "".join(f"{v:>10}" for v in values)


def load_name(load: int | str) -> str:
    return f"c={load}" if isinstance(load, int) else load


def print_table(results: dict[tuple[str, int | str], dict[str, dict[str, float]]]) -> None:
    print(LEGEND)
    print(row("scenario, load / proxy", [c[0] for c in COLUMNS]))
    for (label, load), pair in results.items():
        floor, kiro = pair["floor"], pair.get("kiro2api")
        print(row(f"{label}, {load_name(load)}", []))
        print(row("  floor", [f"{floor[k]:.{d}f}" for _, k, d in COLUMNS]))
        if kiro is None:
            print(row(f"  kiro2api: {pair['error']}"[:200], []))
            continue
        print(row("  kiro2api", [f"{kiro[k]:.{d}f}" for _, k, d in COLUMNS]))
        print(row("  ratio", [ratio(kiro[k], floor[k]) for _, k, _ in COLUMNS]))


def soak_growth(samples: list[tuple[float, float]]) -> float:
    """RSS growth in MB from the end of the warm-up (the first tenth) to the end."""
    return samples[-1][1] - samples[1][1] if len(samples) > 2 else float("nan")


SOAK_GROWTH_MB = 1.0  # "no growth": within the noise of the allocator


def print_targets(results: dict, lat: dict, mem: dict, soaks: dict) -> None:
    print("\ntargets (issue 8)")
    checks = []
    for (label, load), pair in results.items():
        kiro = pair.get("kiro2api")
        if kiro and isinstance(load, int):  # the target names streams; all rows shown
            r = kiro["cpu_ms"] / pair["floor"]["cpu_ms"]
            checks.append((f"CPU/req, {label} c={load} <= 2.5x floor", f"{r:.2f}x", r <= 2.5))
    for (label, load), pair in results.items():
        kiro = pair.get("kiro2api")
        if kiro and load in (20, results_rate_label(results)) and label.startswith("stream "):
            for key, what in (("fb99", "first byte"), ("ft99", "first text")):
                added = kiro[key] - pair["floor"][key]
                checks.append((f"added {what} p99, {label} {load_name(load)} <= 2 ms",
                               f"{added:+.2f} ms", added <= 2))
    floor = lat["floor"]
    for api, result in lat.items():
        if api != "floor":
            checks.append((f"streaming latency p99, {api}, {floor['max_open']:.0f} slow streams "
                           f"<= 5 ms", f"{result['p99']:.2f} ms",
                           None if result["max_open"] < floor["max_open"] else result["p99"] <= 5))
            added = result["p99"] - floor["p99"]
            checks.append((f"  of which added to the floor's {floor['p99']:.2f} ms p99",
                           f"{added:+.2f} ms", "info"))
    kiro, floor = mem["kiro2api"], mem["floor"]
    checks.append((f"RSS growth per open stream, {floor['open']:.0f} streams <= 100 KB",
                   f"{kiro['kb_per_stream']:.1f} KB",
                   None if kiro["open"] < floor["open"] else kiro["kb_per_stream"] <= 100))
    if "kiro2api" in soaks:
        growth = soak_growth(soaks["kiro2api"])
        what = (f"RSS growth over the soak after warm-up <= {SOAK_GROWTH_MB:g} MB "
                f"(floor {soak_growth(soaks['floor']):+.1f} MB)")
        checks.append((what, f"{growth:+.1f} MB", growth <= SOAK_GROWTH_MB))
    for what, value, ok in checks:
        mark = "    " if ok == "info" else "n/a " if ok is None else "ok  " if ok else "MISS"
        print(f"  {mark} {what:<72}{value:>10}")
    if any(ok is None for _, _, ok in checks):
        print("  n/a: kiro2api did not have every stream open at once (see the notes above)")
    print("  The closed-loop c=20 rows keep the proxy busy all the time: their first byte\n"
          "  waits behind the other requests' work, so their added first byte follows the\n"
          "  CPU ratio. The open-loop rows (the proxy mostly idle) give the added time itself.")


def results_rate_label(results: dict) -> str | None:
    return next((load for _, load in results if isinstance(load, str)), None)


def print_latency(rows: dict[str, dict[str, float]]) -> None:
    keys = (("p50", "p50", 2), ("p99", "p99", 2), ("all p50", "all50", 2),
            ("all p99", "all99", 2), ("max", "max", 1), ("TTFB p99", "fb99", 1),
            ("max open", "max_open", 0), ("CPU/strm", "cpu_ms", 1), ("lost", "lost", 0),
            ("errors", "errors", 0))
    print(row("proxy", [k[0] for k in keys]))
    for name, result in rows.items():
        print(row(f"  {name}", [f"{result[k]:.{d}f}" for _, k, d in keys]))
        if name != "floor":
            print(row("  ratio", [ratio(result[k], rows["floor"][k]) for _, k, _ in keys[:6]]))


def note_waiting(results: dict[str, dict[str, float]], streams: int) -> None:
    for name, result in results.items():
        if result["max_open"] < streams:
            print(f"  note: {name} never had more than {result['max_open']:.0f} of the "
                  f"{streams} streams open at once; the others waited for it")


# Profile ##################################################################


def print_profile(path: Path, top: int = 30) -> None:
    """Functions by own time, as a share of the time not spent waiting in epoll."""
    stats = pstats.Stats(str(path)).stats
    idle = sum(v[2] for k, v in stats.items() if k[2].startswith("<method 'poll' of 'select"))
    busy = sum(v[2] for v in stats.values()) - idle
    print(f"\nkiro2api under cProfile: {busy:.2f} s busy (epoll wait of {idle:.2f} s left out)")
    print(f"{'own %':>7}{'cum %':>8}{'calls':>10}  function")
    rows = sorted(((v[2], v[3], v[1], k) for k, v in stats.items()
                   if not k[2].startswith("<method 'poll' of 'select")), reverse=True)
    for own, cum, calls, (file, line, func) in rows[:top]:
        where = f"{Path(file).name}:{line}" if line else "~"
        print(f"{own / busy * 100:7.1f}{min(cum / busy, 9.99) * 100:8.1f}{calls:>10}  "
              f"{func} ({where})")
    print("\nby cumulative time (kiro2api, convert, eventstream only)")
    ours = sorted(((v[3], v[2], v[1], k) for k, v in stats.items()
                   if Path(k[0]).name in ("kiro2api.py", "convert.py", "eventstream.py")),
                  reverse=True)
    for cum, own, calls, (file, line, func) in ours[:top]:
        print(f"{own / busy * 100:7.1f}{min(cum / busy, 9.99) * 100:8.1f}{calls:>10}  "
              f"{func} ({Path(file).name}:{line})")


# Main ####################################################################


def took(started: float) -> str:
    """The closing line of a bench: how long it took since ``started`` (monotonic), and
    the machine's load then."""
    return (f"\n(bench took {time.monotonic() - started:.0f} s; load avg now "
            f"{os.getloadavg()[0]:.2f})")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    load = os.getloadavg()[0]
    return (f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, Python "
            f"{platform.python_version()}, aiohttp {aiohttp.__version__}, load avg {load:.2f}")


async def bench(args: argparse.Namespace, workdir: Path) -> None:
    settings = QUICK if args.quick else FULL
    if args.requests:
        settings = Settings(**{**settings.__dict__, "requests": args.requests})
    if args.soak is not None:
        settings = Settings(**{**settings.__dict__, "soak": args.soak})
    started = time.monotonic()
    up = start_printing_port("upstream", ["upstream.py", "--frames-per-write",
                                          str(args.frames_per_write)], workdir)
    procs = [up]
    try:
        floor = start_printing_port("floor", ["floor.py", "--upstream", up.url], workdir)
        procs.append(floor)
        profile = workdir / "kiro2api.prof" if args.profile else None
        kiro = start_kiro2api(up.url, workdir, profile, args.kiro2api)
        procs.append(kiro)
        async with loadgen.client_session() as session:
            await wait_ready(kiro, session)
            print(f"kiro2api vs forwarding floor: {machine()}")
            print(f"{settings.requests} requests per row and proxy after "
                  f"{settings.warmup} warm-up; upstream: {args.frames_per_write} frame(s) "
                  f"per write; times in ms, CPU = utime+stime of the proxy process\n")
            if args.profile:
                for scenario in SCENARIOS[:2]:
                    for concurrency in settings.concurrency:
                        print(f"profiling {scenario.label}, c={concurrency}", flush=True)
                        url, body, headers, expect = target(kiro, scenario)
                        await loadgen.run_load(session, url, body, headers,
                                               concurrency=concurrency,
                                               requests=settings.requests, expect=expect)
                kiro.stop()
                print_profile(profile)
                return
            results: dict[tuple[str, int | str], dict[str, Any]] = {}
            rows = [(s, c, None) for s in SCENARIOS for c in settings.concurrency]
            streamed = [s for s in SCENARIOS if s.stream and s.upstream == "text"]
            at = len(streamed) * len(settings.concurrency)  # before the non-stream rows
            rows[at:at] = [(s, 20, settings.rate) for s in streamed]
            for scenario, concurrency, rate in rows:
                load = f"open loop {rate:.0f}/s" if rate else concurrency
                pair = results[scenario.label, load] = {}
                pair["floor"] = await measure(session, floor, scenario, concurrency, settings,
                                              rate)
                try:
                    pair["kiro2api"] = await measure(session, kiro, scenario, concurrency,
                                                     settings, rate)
                except RuntimeError as exc:
                    pair["error"] = str(exc)
            print_table(results)

            lat = {}
            for spread, how in ((True, "started over one interval, frames interleaved"),
                                (False, "started at once, frames in lockstep bursts")):
                print(f"\nstreaming latency: {settings.latency_streams} concurrent streams of "
                      f"{settings.latency_frames} frames, one every {SLOW_INTERVAL_MS} ms, "
                      f"{how};\nupstream write -> client receipt, ms "
                      f"(load avg {os.getloadavg()[0]:.2f}); p50, p99: the events written once "
                      f"every stream was open;\nall: every event, those of the start-up too, "
                      f"when the proxy is also starting the other streams")
                runs = [("floor", floor, "anthropic"), ("kiro2api /v1/messages", kiro, "anthropic")]
                if spread:
                    runs += [("kiro2api /v1/chat/completions", kiro, "openai"),
                             ("kiro2api /v1/responses", kiro, "responses")]
                rows: dict[str, dict[str, float]] = {}
                # One stray burst of other work on the machine decides a p99:
                # each proxy's best of ``latency_rounds`` runs, taken in turn.
                for _ in range(settings.latency_rounds):
                    for name, proc, api in runs:
                        result = await latency(session, proc, api, settings, spread)
                        if name not in rows or result["p99"] < rows[name]["p99"]:
                            rows[name] = result
                if settings.latency_rounds > 1:
                    print(f"each proxy's best of {settings.latency_rounds} runs by p99, "
                          f"the runs taken in turn")
                print_latency(rows)
                note_waiting(rows, settings.latency_streams)
                lat = lat or rows  # the interleaved rows are the target's

            print(f"\nmemory: {settings.memory_streams} concurrent slow streams "
                  f"({settings.memory_frames} frames, one every {SLOW_INTERVAL_MS} ms), "
                  f"/v1/messages")
            mem = {"floor": await memory(session, floor, settings),
                   "kiro2api": await memory(session, kiro, settings)}
            print("RSS in MB; open: streams that had their first byte when RSS was read; "
                  "KB/open and KB/req: RSS growth per open stream and per request sent")
            keys = (("RSS start", "before_mb", 1), ("RSS open", "during_mb", 1),
                    ("RSS after", "after_mb", 1), ("open", "open", 0),
                    ("KB/open", "kb_per_stream", 1), ("KB/req", "kb_per_request", 1),
                    ("errors", "errors", 0))
            print(row("proxy", [k[0] for k in keys]))
            for name, result in mem.items():
                print(row(f"  {name}", [f"{result[k]:.{d}f}" for _, k, d in keys]))
            print(row("  ratio", ["", "", "", "", ratio(mem["kiro2api"]["kb_per_stream"],
                                                        mem["floor"]["kb_per_stream"])]))
            note_waiting(mem, settings.memory_streams)

            soaks = {}
            if settings.soak:
                print(f"\nsoak: stream /v1/messages at c=20 for {settings.soak:.0f} s; RSS in MB "
                      f"every tenth of the way; growth: from the first tenth to the end")
                for proc in (floor, kiro):
                    soaks[proc.name] = await soak(session, proc, settings.soak)
                for name, samples in soaks.items():
                    print(f"  {name:<10}" + " ".join(f"{mb:.1f}" for _, mb in samples)
                          + f"  (growth {soak_growth(samples):+.1f} MB, "
                          f"{len(samples) - 1} samples over {samples[-1][0]:.0f} s)")

            print_targets(results, lat, mem, soaks)
            print(took(started))
    finally:
        for proc in reversed(procs):
            proc.stop()


def main(argv: list[str] | None = None) -> None:
    """Print the proxy tables (``make bench`` calls this with no arguments)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of about 30 s")
    parser.add_argument("--requests", type=int, default=0, help="requests per row and proxy")
    parser.add_argument("--frames-per-write", type=int, default=1,
                        help="frames per upstream write (default 1: one write per frame)")
    parser.add_argument("--profile", action="store_true",
                        help="run kiro2api under cProfile on the streaming rows; print hot spots")
    parser.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                        help="stream for SECONDS per proxy and print RSS over time "
                             "(default 60, 0 with --quick; 0: no soak)")
    parser.add_argument("--kiro2api", type=Path, default=ROOT / "kiro2api.py", metavar="PATH",
                        help="the kiro2api.py to run (e.g. another checkout's)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kiro2api-bench-") as workdir:
        asyncio.run(bench(args, Path(workdir)))


if __name__ == "__main__":
    main()
