"""kiro2api with ``--state`` (Redis shared state) against without: CPU per request.

Four processes on 127.0.0.1, each on a free port: the fake upstream
(``upstream.py``), a ``redis-server`` of this run's own (nothing saved, its
files in a temporary directory) and two ``kiro2api.py server``s in front of
the same upstream, each with its own token file: one plain, one with
``--state redis://127.0.0.1:PORT/0``. This process generates the load
(``loadgen.py``). For "stream /v1/messages" and "stream /v1/chat/completions"
at concurrency 20:

- CPU per request: each server's utime + stime from ``/proc/PID/stat`` over a
  round, divided by its requests, and its req/s. The two servers take turns,
  round after round, the one that goes first alternating, so that both see
  the same machine (a shared one, whose load drifts). Printed: each server's
  median over the rounds and the median of the rounds' ratios, --state /
  plain, which the target holds within 5%. The kernel counts CPU in 10 ms
  ticks: a round of 3000 requests of about 1 ms each is some 300 of them.
- Redis calls: ``INFO commandstats`` before and after the load; the calls
  made meanwhile, per request to the --state server. The request path makes
  none: what shows is the background work, the resync every 30 s and the
  one write that tells the fleet which way Kiro answers at (after the first
  answer). And the --state server's ``/health`` "state_store" after the load.

Run ``python bench/bench_state.py`` (a minute or two: 5 rounds of 3000
requests), ``--quick`` for a smoke run (2 rounds of 200, too few ticks for a
figure within 5%); ``--rounds`` and ``--requests`` change either.
Needs ``redis-server`` on the PATH and the redis package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
import bench_proxy
import loadgen
import redis
from bench_proxy import Proc, Scenario

SCENARIOS = bench_proxy.SCENARIOS[:2]  # the two streaming rows: the target names streams
CONCURRENCY = 20
TARGET_RATIO = 1.05


def start_redis(workdir: Path) -> Proc:
    """A throwaway redis-server on a free loopback port; nothing is written to disk."""
    port = bench_proxy.free_port()
    log = workdir / "redis.log"
    argv = [shutil.which("redis-server") or "redis-server", "--port", str(port),
            "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    popen = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return Proc("redis", popen, f"redis://127.0.0.1:{port}/0", log)


def wait_redis(proc: Proc) -> redis.Redis:
    """A client of ``proc`` once it answers PING."""
    client = redis.Redis.from_url(proc.url, socket_timeout=5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.popen.poll() is None:
        try:
            client.ping()
            return client
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server is not answering: {proc.log.read_text()[-2000:]}")


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls so far by command, the INFO that reads them left out (it is ours)."""
    stats = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): s["calls"] for name, s in stats.items()}
    calls.pop("info", None)
    return calls


def start_server(name: str, upstream: str, workdir: Path, script: Path,
                 extra: tuple[str, ...] = ()) -> Proc:
    """One kiro2api server with its own directory (token file and log)."""
    home = workdir / name
    home.mkdir()
    proc = bench_proxy.start_kiro2api(upstream, home, script=script, extra=extra)
    proc.name = name
    return proc


async def one_round(session: aiohttp.ClientSession, proc: Proc, scenario: Scenario,
                    requests: int) -> dict:
    """``requests`` requests at c=20; the server's CPU ms per answered one."""
    url, body, headers, expect = bench_proxy.target(proc, scenario)
    before = bench_proxy.cpu_seconds(proc.pid)
    load = await loadgen.run_load(session, url, body, headers, concurrency=CONCURRENCY,
                                  requests=requests, expect=expect)
    cpu = bench_proxy.cpu_seconds(proc.pid) - before
    return {"cpu_ms": cpu * 1000 / max(len(load.samples), 1), "rps": load.rps,
            "errors": load.errors}


async def compare(session: aiohttp.ClientSession, servers: list[Proc], scenario: Scenario,
                  args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every server's rounds of one scenario, the servers taking turns."""
    for proc in servers:  # connections opened, code paths warm
        warm = await one_round(session, proc, scenario, args.warmup)
        if warm["errors"]:
            raise RuntimeError(f"{proc.name}, {scenario.label}: {warm['errors'][0]}")
    rounds: dict[str, list[dict]] = {proc.name: [] for proc in servers}
    for index in range(args.rounds):
        # Who goes first alternates: a drift in the machine's load favours neither.
        for proc in servers if index % 2 == 0 else servers[::-1]:
            rounds[proc.name].append(await one_round(session, proc, scenario, args.requests))
    return rounds


async def state_store_health(session: aiohttp.ClientSession, proc: Proc) -> dict:
    async with session.get(proc.url + "/health",
                           headers={"x-api-key": bench_proxy.API_KEY}) as response:
        return (await response.json()).get("state_store", {})


# Report ##################################################################


def row(label: str, values: list[str], rounds: str = "") -> str:
    return f"{label:<30}" + "".join(f"{v:>10}" for v in values) + f"   {rounds}"


def print_scenario(scenario: Scenario, rounds: dict[str, list[dict]]) -> float:
    """The scenario's rows; returns the median of the rounds' ratios."""
    print(scenario.label)
    for name, results in rounds.items():
        cpu = [r["cpu_ms"] for r in results]
        print(row(f"  {name}", [f"{statistics.median(cpu):.3f}",
                                f"{statistics.median(r['rps'] for r in results):.0f}",
                                f"{sum(len(r['errors']) for r in results)}"],
                  " ".join(f"{c:.3f}" for c in cpu)))
    ratios = [s["cpu_ms"] / p["cpu_ms"] for p, s in zip(rounds["plain"], rounds["--state"])]
    rps = [s["rps"] / p["rps"] for p, s in zip(rounds["plain"], rounds["--state"])]
    print(row("  --state / plain", [f"{statistics.median(ratios):.3f}x",
                                    f"{statistics.median(rps):.3f}x", ""],
              " ".join(f"{r:.3f}" for r in ratios)))
    for name, results in rounds.items():
        errors = [e for r in results for e in r["errors"]]
        if errors:
            print(f"  {name}: {len(errors)} errors, first: {errors[0]}")
    return statistics.median(ratios)


def print_redis(before: dict[str, int], after: dict[str, int], requests: int,
                seconds: float) -> float:
    """The Redis calls made during the load; returns them per request."""
    made = {name: n - before.get(name, 0) for name, n in after.items()
            if n > before.get(name, 0)}
    total = sum(made.values())
    print(f"\nRedis during the load ({seconds:.0f} s, {requests} requests to the --state "
          f"server): {total} calls, {total / requests:.4f} per request")
    if made:
        print("  by command: " + ", ".join(f"{name} {n}" for name, n in sorted(made.items())))
    return total / requests


# Main ####################################################################


async def bench(args: argparse.Namespace, workdir: Path) -> None:
    started = time.monotonic()
    procs = [bench_proxy.start_printing_port("upstream", ["upstream.py"], workdir)]
    try:
        upstream = procs[0].url
        procs.append(store := start_redis(workdir))
        client = wait_redis(store)
        procs.append(start_server("plain", upstream, workdir, args.kiro2api))
        procs.append(start_server("--state", upstream, workdir, args.kiro2api,
                                  ("--state", store.url)))
        servers = procs[2:]
        async with loadgen.client_session() as session:
            for proc in servers:
                await bench_proxy.wait_ready(proc, session)
            print(f"kiro2api with --state (Redis) vs without: {bench_proxy.machine()}")
            print(f"{args.rounds} rounds of {args.requests} requests per scenario and server "
                  f"after {args.warmup} warm-up, c={CONCURRENCY}; the servers take turns, the "
                  f"first alternating.\nCPU ms: utime+stime of the server per request, the "
                  f"median of the rounds (each listed after it); --state / plain: the median "
                  f"of the rounds' ratios\n")
            print(row("", ["CPU ms", "req/s", "errors"], "per round"))
            calls_before, load_started = command_calls(client), time.monotonic()
            ratios = {}
            for scenario in SCENARIOS:
                ratios[scenario.label] = print_scenario(
                    scenario, await compare(session, servers, scenario, args))
            requests = len(SCENARIOS) * (args.warmup + args.rounds * args.requests)
            per_request = print_redis(calls_before, command_calls(client), requests,
                                      time.monotonic() - load_started)
            health = await state_store_health(session, servers[1])
            print(f"--state server's /health state_store: {json.dumps(health)}")

        print("\ntargets")
        for label, value in ratios.items():
            mark = "ok  " if value <= TARGET_RATIO else "MISS"
            what = f"CPU/req --state / plain <= {TARGET_RATIO}, {label} c={CONCURRENCY}"
            print(f"  {mark} {what:<68}{value:.3f}x")
        what = "Redis calls per request to the --state server (request path: none)"
        print(f"       {what:<68}{per_request:.4f}")
        print(bench_proxy.took(started))
    finally:
        for proc in reversed(procs):
            proc.stop()


def main(argv: list[str] | None = None) -> None:
    """Print the --state table (``make bench`` calls this with no arguments)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 200 requests")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per scenario (default 5)")
    parser.add_argument("--requests", type=int, default=0,
                        help="requests per round and server (default 3000)")
    parser.add_argument("--kiro2api", type=Path, default=bench_proxy.ROOT / "kiro2api.py",
                        metavar="PATH", help="the kiro2api.py to run (e.g. another checkout's)")
    args = parser.parse_args(argv)
    quick_or_full = (2, 200, 40) if args.quick else (5, 3000, 200)
    args.rounds = args.rounds or quick_or_full[0]
    args.requests = args.requests or quick_or_full[1]
    args.warmup = quick_or_full[2]
    # The plain server must not find a state store in the environment either.
    os.environ.pop("KIRO2API_STATE", None)
    with tempfile.TemporaryDirectory(prefix="kiro2api-bench-state-") as workdir:
        asyncio.run(bench(args, Path(workdir)))


if __name__ == "__main__":
    main()
