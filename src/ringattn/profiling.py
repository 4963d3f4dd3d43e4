"""Per-rank profiling counters: compute time, time blocked on communication, FLOPs, bytes, steps, calls.

``ringattn.profile()`` installs a :class:`Stats` for the calls inside it; the library adds to the active
one through the few functions here (all no-ops when none is active, so unprofiled calls pay nothing but
a ``None`` check).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .tasks import task_flops


@dataclass
class Stats:
    """What the profiled calls did on this rank (see ``ringattn.profile``)."""

    compute_s: float = 0.0
    wait_s: float = 0.0
    flops: float = 0.0
    bytes_sent: int = 0
    steps: int = 0
    calls: int = 0
    # Ring steps the masks made unnecessary (of world per call) and the K/V bytes the forward therefore
    # did not send.
    steps_skipped: int = 0
    bytes_saved: int = 0

    def __iadd__(self, other: Stats) -> Stats:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


_ACTIVE: Stats | None = None


def active() -> Stats | None:
    return _ACTIVE


@contextlib.contextmanager
def profile() -> Iterator[Stats]:
    """Collect per-rank compute time, communication wait, FLOPs and bytes sent of the calls inside.

    >>> with ringattn.profile() as st:
    ...     out = ringattn.ring_attention(q, k, v, causal=True)
    >>> st.compute_s, st.wait_s, st.flops, st.bytes_sent
    """
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, Stats()
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = prev


@contextlib.contextmanager
def timed() -> Iterator[None]:
    """Count the block's wall time as compute."""
    if _ACTIVE is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _ACTIVE.compute_s += time.perf_counter() - t0


def count_call() -> None:
    if _ACTIVE is not None:
        _ACTIVE.calls += 1


def count_steps(n: int) -> None:
    if _ACTIVE is not None:
        _ACTIVE.steps += n


def count_skipped(steps: int, block_bytes: int) -> None:
    if _ACTIVE is not None and steps > 0:
        _ACTIVE.steps_skipped += steps
        _ACTIVE.bytes_saved += steps * int(block_bytes)


def count_bytes(n: int) -> None:
    if _ACTIVE is not None:
        _ACTIVE.bytes_sent += int(n)


def count_wait(seconds: float) -> None:
    if _ACTIVE is not None:
        _ACTIVE.wait_s += seconds


def count_flops(tasks, q: torch.Tensor, v: torch.Tensor, backward: bool) -> None:
    """Add the FLOPs of these kernel tasks (backward = 2.5 x forward)."""
    if _ACTIVE is not None:
        f = sum(task_flops(t, q.shape[0], q.shape[2], q.shape[3], v.shape[3]) for t in tasks)
        _ACTIVE.flops += 2.5 * f if backward else f
