"""Shared helpers for the benchmark suites: machine description, timing, plotting."""

from __future__ import annotations

import datetime
import os
import platform
import time

import torch


def machine() -> dict:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def best_of(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Fastest wall time of ``fn()`` over ``repeats`` runs, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, m: dict) -> None:
    """Stamp the machine and date on a figure, write it as PNG and release it."""
    fig.text(0.01, 0.01, f"{m['date']}, {m['cpu_count']} cores, torch {m['torch']}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak since the last reset (VmHWM) resident memory of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")
