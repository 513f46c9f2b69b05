"""Run every benchmark in turn: the ``make bench`` entry point.

Each benchmark is a module in this directory with a ``main()`` that prints
its own table. To add one, append its module name to ``BENCHMARKS``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# The flat modules (eventstream.py, ...) live in the repository root, and the
# benchmarks beside this file; make both importable from any working directory.
for path in (BENCH.parent, BENCH):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

BENCHMARKS = [
    "bench_eventstream",
    "bench_proxy",
    "bench_soak",
    "bench_state",
    "bench_scale",
]


def main() -> None:
    for index, name in enumerate(BENCHMARKS):
        if index:
            print()
        print(f"== {name} ==")
        importlib.import_module(name).main()


if __name__ == "__main__":
    main()
