"""Small measuring helpers the library's commands share: best-of timing, resident memory (Linux) and the
relative error every exactness check reports."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import torch


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


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the reference's largest magnitude (inf where shapes or infinities
    differ)."""
    if x.shape != ref.shape:
        return float("inf")
    x, ref = x.double(), ref.double()
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(x)) or not torch.equal(x[~fin], ref[~fin]):
        return float("inf")
    if not fin.any():
        return 0.0
    scale = ref[fin].abs().max().clamp_min(1e-30)
    return float((x[fin] - ref[fin]).abs().max() / scale)
