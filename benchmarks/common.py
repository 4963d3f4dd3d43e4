"""Shared helpers for the benchmark suites: machine description, timing and memory, plotting."""

from __future__ import annotations

import datetime
import os
import platform

import torch

from ringattn._measure import best_of, reset_peak_rss, rss_mb

__all__ = ["best_of", "machine", "pyplot", "reset_peak_rss", "rss_mb", "save_figure"]


def machine() -> dict:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


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
