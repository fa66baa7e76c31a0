"""Does this machine itself slow down now and then? Time the same small piece of pure CPU work, over and over.

    python bench/host_noise.py [SECONDS]

Each piece is timed on the wall clock and on the thread's CPU clock. A piece that takes several times
its median on both clocks ran on a slower CPU: nothing else in this machine took the CPU from it (that
would show as wall time without CPU time), so it is the host under the machine. The windows found so
are printed, with when they began, how long they lasted and how much slower the work ran in them.
Nothing else needs to run: the relay's benchmarks share the same CPUs, so their tails include these.
"""

from __future__ import annotations

import itertools
import sys
import time

SLOWER = 3.0  # a piece this many times its median CPU time is inside a slow window
JOIN = 0.03  # slow pieces closer than this belong to one window


def piece() -> int:
    total = 0
    for i in range(20_000):
        total += i * i
    return total


def measure(seconds: float) -> list[tuple[float, float, float]]:
    """(began, wall seconds, CPU seconds) per piece, with a short sleep between, as a quiet relay has."""
    pieces = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        wall, cpu = time.perf_counter(), time.thread_time()
        piece()
        pieces.append((wall - start, time.perf_counter() - wall, time.thread_time() - cpu))
        time.sleep(0.002)
    return pieces


def slow_windows(pieces: list, median_cpu: float) -> list[dict]:
    windows: list[dict] = []
    for began, wall, cpu in pieces:
        if cpu <= SLOWER * median_cpu:
            continue
        if windows and began - windows[-1]["end"] < JOIN:
            window = windows[-1]
        else:
            window = {"began": began, "end": began, "slowest": 0.0, "cpu_share": []}
            windows.append(window)
        window["end"] = began + wall
        window["slowest"] = max(window["slowest"], cpu / median_cpu)
        window["cpu_share"].append(cpu / wall)
    return windows


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 15.0
    pieces = measure(seconds)
    cpus = sorted(cpu for _, _, cpu in pieces)
    median_cpu = cpus[len(cpus) // 2]
    windows = slow_windows(pieces, median_cpu)
    print(f"{len(pieces)} pieces over {seconds:.0f} s; median CPU {median_cpu * 1000:.2f} ms a piece")
    print(f"slow windows (a piece over {SLOWER:.0f}x its median CPU time): {len(windows)}")
    for w in windows:
        share = sum(w["cpu_share"]) / len(w["cpu_share"])
        print(
            f"  at {w['began']:6.2f} s for {(w['end'] - w['began']) * 1000:5.0f} ms: "
            f"work up to {w['slowest']:4.1f}x slower, CPU time {share:.0%} of wall time"
        )
    if len(windows) > 1:
        gaps = [b["began"] - a["began"] for a, b in itertools.pairwise(windows)]
        print(f"between windows: {min(gaps):.2f} to {max(gaps):.2f} s")
    inside = sum(w["end"] - w["began"] for w in windows)
    print(f"time inside slow windows: {inside:.2f} s of {seconds:.0f} ({inside / seconds:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
