"""Attention of one local query block against one key/value block, as a list of kernel calls.

``tasks.block_tasks`` turns (query positions, key positions, mask) into tasks; this module runs them on
a backend and merges the partial results by logsumexp into a float32 (float64) accumulator: one call per
task, or all of them in one call for a backend with ``caps.takes_task_lists``.
"""

from __future__ import annotations

import dataclasses

import torch

from ..masks import MaskSpec, Task
from ..scores import ScoreMod
from .base import Backend, acc_dtype, new_buffer, new_heads_major


class OutLseAccumulator:
    """Running (out, lse) of a set of query rows; starts empty (out = 0, lse = -inf).

    Storage is allocated on the first merge that does not cover every row at once; a first result
    that covers all rows in the accumulation dtype is adopted as it is (no copy).
    """

    def __init__(self, q: torch.Tensor, v_head_dim: int):
        b, n, h, _ = q.shape
        self.shape, self.dtype, self.device = (b, n, h, v_head_dim), acc_dtype(q.dtype), q.device
        self._out: torch.Tensor | None = None
        self._lse: torch.Tensor | None = None
        self._written: list[tuple[int, int]] = []  # row ranges that hold a result already

    def _alloc(self) -> None:
        b, n, h, dv = self.shape
        self._out = new_heads_major((b, n, h, dv), self.dtype, self.device, zero=True)
        self._lse = torch.full((b, h, n), float("-inf"), dtype=self.dtype, device=self.device)

    @property
    def out(self) -> torch.Tensor:
        if self._out is None:
            self._alloc()
        return self._out

    @property
    def lse(self) -> torch.Tensor:
        if self._lse is None:
            self._alloc()
        return self._lse

    def merge(self, q0: int, q1: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        n = self.shape[1]
        if self._out is None and (q0, q1) == (0, n) and out.dtype == lse.dtype == self.dtype:
            self._out, self._lse = out, lse
        elif all(q1 <= a or b <= q0 for a, b in self._written):
            # First result for these rows: a copy, no exp/log.
            self.out[:, q0:q1] = out
            self.lse[:, :, q0:q1] = lse
        else:
            merge_into(self.out[:, q0:q1], self.lse[:, :, q0:q1], out, lse)
        self._written.append((q0, q1))


class GradAccumulator:
    """A float32/64 gradient accumulator ``(b, n, ...)`` over rows that allocates as little as it can.

    Contributions to disjoint row ranges are kept as they come (the kernel's own outputs, no copy) until
    one covers every row in the accumulation dtype: that one becomes the accumulator and the pieces are
    added into it. Only when pieces overlap, or ``get`` is called without a full one, is a buffer built.
    The pieces never overlap, so together they hold at most one buffer's worth of memory.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device, initial: torch.Tensor | None = None):
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.t = initial
        self._pieces: list[tuple[int, int, torch.Tensor]] = []

    def add(self, a: int, b: int, x: torch.Tensor) -> None:
        if a >= b:
            return
        if self.t is not None:
            self.t[:, a:b] += x
        elif (a, b) == (0, self.shape[1]) and x.dtype == self.dtype:
            self.t = x
            self._fold()
        elif all(b <= lo or hi <= a for lo, hi, _ in self._pieces):
            self._pieces.append((a, b, x))
        else:
            self._build()
            self.t[:, a:b] += x

    def _fold(self) -> None:
        for a, b, x in self._pieces:
            self.t[:, a:b] += x
        self._pieces = []

    def _build(self) -> None:
        n = self.shape[1]
        self.t = new_buffer(self.shape, self.dtype, self.device)
        edge = 0
        for a, b, x in sorted(self._pieces, key=lambda p: p[0]):
            self.t[:, edge:a].zero_()
            self.t[:, a:b] = x
            edge = b
        self.t[:, edge:n].zero_()
        self._pieces = []

    def get(self) -> torch.Tensor:
        if self.t is None:
            self._build()
        return self.t


def merge_into(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """In place: (acc_out, acc_lse) <- merge of itself with (out, lse); an all -inf side adds nothing.

    ``out`` is ``(b, n, h, dv)``, ``lse`` ``(b, h, n)``. new_lse = logaddexp(lse_a, lse_b) and
    out = exp(lse_a - new_lse) out_a + exp(lse_b - new_lse) out_b, computed around the row maximum so
    that two -inf sides give lse -inf and out 0 rather than NaN.
    """
    lse = lse.to(acc_lse.dtype)
    mx = torch.maximum(acc_lse, lse)
    mx = mx.masked_fill(torch.isneginf(mx), 0.0)
    wa = torch.exp(acc_lse - mx)
    wb = torch.exp(lse - mx)
    total = wa + wb
    acc_lse.copy_(mx + torch.log(total))
    inv = torch.where(total > 0, total.reciprocal(), torch.zeros_like(total))
    wa = (wa * inv).transpose(1, 2).unsqueeze(-1)
    wb = (wb * inv).transpose(1, 2).unsqueeze(-1)
    acc_out.mul_(wa).addcmul_(out.to(acc_out.dtype), wb)  # two passes over the rows, no temporary


def _boxed(tasks: tuple[Task, ...]) -> tuple[int, int, int, int, tuple[Task, ...]]:
    """The rows and keys the tasks span, and the tasks with their rows counted from that box."""
    r0, r1 = min(t.q0 for t in tasks), max(t.q1 for t in tasks)
    c0, c1 = min(t.k0 for t in tasks), max(t.k1 for t in tasks)
    if (r0, c0) == (0, 0):
        return r0, r1, c0, c1, tasks
    return r0, r1, c0, c1, tuple(dataclasses.replace(t, q0=t.q0 - r0, q1=t.q1 - r0, k0=t.k0 - c0, k1=t.k1 - c0)
                                 for t in tasks)


def run_forward(backend: Backend, q, k, v, tasks: tuple[Task, ...], spec: MaskSpec, scale: float,
                acc: OutLseAccumulator, scores: ScoreMod | None = None) -> None:
    extra = {} if scores is None else {"scores": scores}
    if backend.caps.takes_task_lists and tasks:
        r0, r1, c0, c1, boxed = _boxed(tasks)
        out, lse = backend.forward_tasks(q[:, r0:r1], k[:, c0:c1], v[:, c0:c1], boxed, spec, scale=scale, **extra)
        acc.merge(r0, r1, out, lse)
        return
    for t in tasks:
        out, lse = backend.forward(q[:, t.q0:t.q1], k[:, t.k0:t.k1], v[:, t.k0:t.k1], t, spec, scale=scale,
                                   **extra)
        acc.merge(t.q0, t.q1, out, lse)


def run_backward(backend: Backend, dout, q, k, v, out, lse, tasks: tuple[Task, ...], spec: MaskSpec,
                 scale: float, dq: GradAccumulator, dk: GradAccumulator, dv: GradAccumulator,
                 dlse: torch.Tensor | None = None, scores: ScoreMod | None = None) -> None:
    """Adds this block pair's gradient shares into the float32/64 accumulators dq, dk, dv.

    ``dlse`` (gradient flowing into the returned lse) only for a backend with ``caps.takes_dlse``.
    """
    if backend.caps.takes_task_lists and tasks:
        r0, r1, c0, c1, boxed = _boxed(tasks)
        extra = {} if dlse is None else {"dlse": dlse[:, :, r0:r1]}
        if scores is not None:
            extra["scores"] = scores
        gq, gk, gv = backend.backward_tasks(
            dout[:, r0:r1], q[:, r0:r1], k[:, c0:c1], v[:, c0:c1], out[:, r0:r1], lse[:, :, r0:r1], boxed, spec,
            scale=scale, **extra)
        dq.add(r0, r1, gq)
        dk.add(c0, c1, gk)
        dv.add(c0, c1, gv)
        return
    for t in tasks:
        extra = {} if dlse is None else {"dlse": dlse[:, :, t.q0:t.q1]}
        if scores is not None:
            extra["scores"] = scores
        gq, gk, gv = backend.backward(
            dout[:, t.q0:t.q1], q[:, t.q0:t.q1], k[:, t.k0:t.k1], v[:, t.k0:t.k1], out[:, t.q0:t.q1],
            lse[:, :, t.q0:t.q1], t, spec, scale=scale, **extra)
        dq.add(t.q0, t.q1, gq)
        dk.add(t.k0, t.k1, gk)
        dv.add(t.k0, t.k1, gv)


def forward_each(backend: Backend, q, k, v, tasks: tuple[Task, ...], spec: MaskSpec, *, scale: float,
                 scores: ScoreMod | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward_tasks`` by one ``forward`` call per task: for a backend whose fused entry falls back, and
    as the specification such an entry must match."""
    acc = OutLseAccumulator(q, v.shape[-1])
    plain = dataclasses.replace(backend.caps, takes_task_lists=False)
    run_forward(_PerTask(backend, plain), q, k, v, tasks, spec, scale, acc, scores)
    return acc.out, acc.lse


def backward_each(backend: Backend, dout, q, k, v, out, lse, tasks: tuple[Task, ...], spec: MaskSpec, *,
                  scale: float, dlse: torch.Tensor | None = None,
                  scores: ScoreMod | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``backward_tasks`` by one ``backward`` call per task (see ``forward_each``)."""
    grads = [GradAccumulator(x.shape, acc_dtype(q.dtype), q.device) for x in (q, k, v)]
    plain = dataclasses.replace(backend.caps, takes_task_lists=False)
    run_backward(_PerTask(backend, plain), dout, q, k, v, out, lse, tasks, spec, scale, *grads, dlse, scores)
    return tuple(g.get() for g in grads)


class _PerTask:
    """``backend`` seen through other capabilities (its per-task entry)."""

    def __init__(self, backend: Backend, caps):
        self.caps, self.forward, self.backward = caps, backend.forward, backend.backward
