"""Decoder throughput: ``eventstream.Decoder`` against botocore's ``EventStreamBuffer``.

The stream is 100,000 ``assistantResponseEvent`` frames of 140 bytes, the
shape Kiro sends for streamed text: three string headers and a small JSON
payload. Both decoders get the same bytes, pre-cut into reads of a fixed
size, in the same run; the timed part is feeding each read and draining
every message. Each figure is the best of 3 runs, with the garbage collector
paused while timing, and every run must produce every message.

botocore keeps its buffer as ``bytes`` and re-slices it after each message,
so one read of N bytes costs O(N) per message in it: it is not run on reads
over 1 MiB.

Run ``python bench/bench_eventstream.py``, or ``make bench`` for every benchmark.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run directly, not through bench/run.py
    sys.path.insert(0, str(ROOT))

import eventstream  # noqa: E402

try:
    from botocore.eventstream import EventStreamBuffer
except ImportError:  # botocore is a test extra, not a dependency
    EventStreamBuffer = None

FRAMES = 100_000
BLOB_BYTES = 50_000_000  # the single-read case: about 357,000 frames
READ_SIZES = (1024, 16 * 1024, 256 * 1024)
HEADLINE_READ = 16 * 1024  # about what aiohttp's iter_any() hands over
BOTOCORE_MAX_READ = 1024 * 1024  # past this botocore's per-message re-slicing dominates
REPEATS = 3
HEADERS = {
    ":event-type": "assistantResponseEvent",
    ":content-type": "application/json",
    ":message-type": "event",
}


def make_frames(count: int) -> list[bytes]:
    """``count`` distinct 140-byte text frames."""
    return [
        eventstream.encode(HEADERS, b'{"content":"chunk %07d text"}' % i) for i in range(count)
    ]


def cut(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def decode_ours(reads: list[bytes]) -> int:
    decoder = eventstream.Decoder()
    count = 0
    for read in reads:
        decoder.feed(read)
        for _ in decoder:
            count += 1
    decoder.close()
    return count


def decode_botocore(reads: list[bytes]) -> int:
    buffer = EventStreamBuffer()
    count = 0
    for read in reads:
        buffer.add_data(read)
        for _ in buffer:
            count += 1
    return count


def best_seconds(decode: Callable[[list[bytes]], int], reads: list[bytes], frames: int) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            decoded = decode(reads)
            elapsed = time.perf_counter() - start
        finally:
            gc.enable()
        if decoded != frames:
            raise AssertionError(f"{decode.__name__} decoded {decoded} of {frames} frames")
        best = min(best, elapsed)
    return best


def main() -> None:
    """Print the decoder table."""
    frames = make_frames(FRAMES)
    stream = b"".join(frames)
    blob_frames = BLOB_BYTES // (len(stream) // FRAMES)
    blob = stream * (blob_frames // FRAMES) + b"".join(frames[: blob_frames % FRAMES])

    runs = [(f"{read // 1024} KiB", read, cut(stream, read), FRAMES) for read in READ_SIZES]
    runs.append((f"{len(blob) / 1e6:.0f} MB, 1 read", len(blob), [blob], blob_frames))

    print(
        f"eventstream decoder: {FRAMES:,} frames of {len(frames[0])} bytes "
        f"({len(stream) / 1e6:.1f} MB); single read: {blob_frames:,} frames "
        f"({len(blob) / 1e6:.1f} MB)"
    )
    print(f"best of {REPEATS}; MB = 10^6 bytes\n")
    print(f"{'read size':<18}{'decoder':<10}{'MB/s':>9}{'ns/byte':>9}{'frames':>10}")
    results: dict[tuple[int, str], float] = {}
    for label, read, reads, count in runs:
        size = sum(map(len, reads))
        seconds = best_seconds(decode_ours, reads, count)
        results[read, "ours"] = size / seconds / 1e6
        print(
            f"{label:<18}{'ours':<10}{size / seconds / 1e6:>9.1f}"
            f"{seconds / size * 1e9:>9.2f}{count:>10,}"
        )
        if EventStreamBuffer is None:
            print(f"{'':<18}{'botocore':<10}  not installed")
        elif read > BOTOCORE_MAX_READ:
            print(f"{'':<18}{'botocore':<10}  skipped: quadratic on reads over 1 MiB")
        else:
            seconds = best_seconds(decode_botocore, reads, count)
            results[read, "botocore"] = size / seconds / 1e6
            print(
                f"{'':<18}{'botocore':<10}{size / seconds / 1e6:>9.1f}"
                f"{seconds / size * 1e9:>9.2f}{count:>10,}"
            )

    if (HEADLINE_READ, "botocore") in results:
        ours = results[HEADLINE_READ, "ours"]
        theirs = results[HEADLINE_READ, "botocore"]
        print(
            f"\n{HEADLINE_READ // 1024} KiB reads: ours {ours:.1f} MB/s, "
            f"botocore {theirs:.1f} MB/s, ratio ours/botocore {ours / theirs:.2f}x"
        )
        ratios = [results[read, "ours"] / results[read, "botocore"] for read in READ_SIZES
                  if (read, "botocore") in results]
        mark = "ok  " if min(ratios) >= 3 else "MISS"
        print(f"\ntargets (issue 8)\n  {mark} decoder >= 3x botocore at every read size"
              f"{'':<20}{min(ratios):>9.2f}x (lowest)")


if __name__ == "__main__":
    main()
