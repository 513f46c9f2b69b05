"""Run kiro2api with its garbage collections timed, for ``bench_scale.py``.

``python bench/probe.py OUT [--gc-tuning default|THRESHOLDS] KIRO2API_PY ARGS...``
imports ``KIRO2API_PY`` (this checkout's or another's) and runs its command
line with ``ARGS``. Every collection is timed from ``gc.callbacks``' start
to its stop; on SIGUSR1 all of them so far go to ``OUT`` as JSON lines
(``[start ns on CLOCK_MONOTONIC, duration ns, CPU ns, generation]``: the
CPU time is the main thread's, the work itself; the duration also holds
any time another process had the CPU), written to a
temporary file and renamed. ``--gc-tuning default`` leaves the collector as
Python sets it (no freeze, no thresholds: kiro2api before issue 23);
``--gc-tuning 50000,20,100`` sets other thresholds in place of
kiro2api's ``GC_THRESHOLDS``.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


def timed_collections() -> list[tuple[int, int, int, int]]:
    """Record every collection from now on into the list returned."""
    done: list[tuple[int, int, int, int]] = []
    started = [0, 0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        now, cpu = time.monotonic_ns(), time.thread_time_ns()
        if phase == "start":
            started[:] = now, cpu
        else:
            done.append((started[0], now - started[0], cpu - started[1], info["generation"]))

    gc.callbacks.append(callback)
    return done


def dump_on_signal(out: Path, done: list[tuple[int, int, int, int]]) -> None:
    def dump(signum: int, frame: Any) -> None:
        part = out.with_suffix(".part")
        part.write_text("".join(json.dumps(item) + "\n" for item in list(done)))
        os.replace(part, out)

    signal.signal(signal.SIGUSR1, dump)


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    tuning = None
    if args[0] == "--gc-tuning":
        tuning, args = args[1], args[2:]
    script = Path(args[0]).resolve()
    sys.path.insert(0, str(script.parent))
    sys.argv = [str(script), *args[1:]]
    kiro2api = importlib.import_module(script.stem)
    if tuning == "default":
        async def untuned(app: Any) -> None:
            pass

        kiro2api.tune_gc = untuned
    elif tuning:
        kiro2api.GC_THRESHOLDS = tuple(int(part) for part in tuning.split(","))
    dump_on_signal(out, timed_collections())
    kiro2api.cli()


if __name__ == "__main__":
    main()
