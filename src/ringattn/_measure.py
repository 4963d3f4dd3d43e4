"""Small measuring helpers the library's commands share: best-of timing and resident memory (Linux)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Fastest wall time of ``fn()`` over ``repeats`` runs, in seconds (other load only ever adds time)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS; False where the kernel cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb(field: str = "VmRSS") -> float:
    """Current (``VmRSS``) or peak since the last reset (``VmHWM``) resident memory of this process, MiB.

    NaN where ``/proc/self/status`` does not exist (not Linux).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process over its whole life, MiB (``getrusage``; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
