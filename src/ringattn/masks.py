"""Masks on global positions, and the classification of block pairs.

Every mask ringattn supports is a predicate on the global position ``i`` of a query and ``j`` of a key
(see ``shared/API.md``): keys at ``j >= seq_len`` are padding, ``causal`` keeps ``j <= i``,
``window=(left, right)`` keeps ``i - left <= j <= i + right`` (``-1`` = unbounded) and ``cu_seqlens``
keeps pairs inside one document. A rank's tokens are a few arithmetic runs of positions
(:class:`Segment`), so whether a block pair is empty, fully visible, a (shifted) causal triangle or
genuinely partial is decided from a handful of integers, without building any mask. Only partial
tiles get a dense boolean mask, and only tile-sized.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass

import torch

# Partial block pairs are cut into tiles of this many queries x keys before a dense mask is built:
# small enough that a mask never costs more than a score tile, big enough for the kernel to run well.
TILE = 512


@dataclass(frozen=True)
class Segment:
    """Global positions ``start, start + stride, ..., start + (length - 1) * stride``."""

    start: int
    length: int
    stride: int = 1

    @property
    def last(self) -> int:
        return self.start + (self.length - 1) * self.stride

    def sub(self, lo: int, hi: int) -> Segment:
        """Local rows ``[lo, hi)`` of this segment."""
        return Segment(self.start + lo * self.stride, hi - lo, self.stride)

    def positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.arange(self.length, device=device, dtype=torch.long) * self.stride + self.start

    def count_below(self, limit: int) -> int:
        """How many leading positions are ``< limit`` (positions increase along a segment)."""
        if limit <= self.start:
            return 0
        return min(self.length, -(-(limit - self.start) // self.stride))


class Kind(enum.Enum):
    EMPTY = 0  # nothing visible: skip, no kernel call
    FULL = 1  # everything visible: mask-free kernel call
    CAUSAL = 2  # key j visible to query i iff j <= i + shift: the kernel's own causal flag
    PARTIAL = 3  # anything else: dense mask, tile by tile


@dataclass(frozen=True)
class Pair:
    """How to compute one query segment against one key segment.

    ``k_len`` keys are used (padding keys at the end are cut off). For ``CAUSAL``, query row ``i``
    sees key ``j`` iff ``j <= i + shift``; ``shift <= 0`` (rows ``< -shift`` see nothing).
    """

    kind: Kind
    k_len: int = 0
    shift: int = 0


@dataclass(frozen=True)
class MaskSpec:
    """The global mask of one attention call. Hashable, so plans can be cached on it."""

    seq_len: int
    causal: bool = False
    window: tuple[int, int] | None = None
    doc_bounds: tuple[int, ...] | None = None  # cu_seqlens as Python ints

    # Visible iff lo <= i - j <= hi; None = unbounded.
    @property
    def lo(self) -> int | None:
        lo = 0 if self.causal else None
        if self.window is not None and self.window[1] >= 0:
            lo = -self.window[1] if lo is None else max(lo, -self.window[1])
        return lo

    @property
    def hi(self) -> int | None:
        if self.window is not None and self.window[0] >= 0:
            return self.window[0]
        return None

    def doc_of(self, pos: int) -> int:
        """Document index of a position; padding positions get an index no key has."""
        assert self.doc_bounds is not None
        return bisect.bisect_right(self.doc_bounds, pos) - 1

    def classify(self, qs: Segment, ks: Segment) -> Pair:
        if qs.length == 0:
            return Pair(Kind.EMPTY)
        k_len = ks.count_below(self.seq_len)
        if k_len == 0:
            return Pair(Kind.EMPTY)
        ks = Segment(ks.start, k_len, ks.stride)
        lo, hi = self.lo, self.hi
        dmin, dmax = qs.start - ks.last, qs.last - ks.start  # range of i - j over the pair
        if (lo is not None and dmax < lo) or (hi is not None and dmin > hi):
            return Pair(Kind.EMPTY)
        docs_cut = False
        if self.doc_bounds is not None:
            q0, q1 = self.doc_of(qs.start), self.doc_of(qs.last)
            k0, k1 = self.doc_of(ks.start), self.doc_of(ks.last)
            if q1 < k0 or k1 < q0:
                return Pair(Kind.EMPTY)
            docs_cut = not (q0 == q1 == k0 == k1)
        lo_cuts = lo is not None and dmin < lo
        hi_cuts = hi is not None and dmax > hi
        if not (docs_cut or lo_cuts or hi_cuts):
            return Pair(Kind.FULL, k_len)
        if not docs_cut and not hi_cuts and qs.stride == ks.stride:
            # Only the lower bound cuts: i - j >= lo  <=>  j - i <= (qs.start - ks.start - lo) / stride.
            shift = (qs.start - ks.start - lo) // qs.stride
            if shift <= 0:
                return Pair(Kind.CAUSAL, k_len, shift)
        return Pair(Kind.PARTIAL, k_len)

    def dense(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """Boolean ``(len(qpos), len(kpos))`` mask, True = visible. For tiles only."""
        d = qpos[:, None] - kpos[None, :]
        keep = (kpos < self.seq_len)[None, :].expand_as(d).clone()
        if self.lo is not None:
            keep &= d >= self.lo
        if self.hi is not None:
            keep &= d <= self.hi
        if self.doc_bounds is not None:
            bounds = torch.tensor(self.doc_bounds, device=qpos.device)
            qd = torch.bucketize(qpos, bounds, right=True)
            kd = torch.bucketize(kpos, bounds, right=True)
            keep &= qd[:, None] == kd[None, :]
        return keep


@dataclass(frozen=True)
class Task:
    """One kernel call: query rows ``[q0, q1)`` and key rows ``[k0, k1)`` of the local blocks."""

    q0: int
    q1: int
    k0: int
    k1: int
    kind: Kind
    shift: int = 0
    qseg: Segment | None = None  # set for PARTIAL: positions needed to build the mask
    kseg: Segment | None = None


def plan_block(
    spec: MaskSpec, qsegs: tuple[Segment, ...], ksegs: tuple[Segment, ...], tile: int | None = None
) -> tuple[Task, ...]:
    """The kernel calls that compute local query block ``qsegs`` against key block ``ksegs``.

    Segments are consecutive in local row order. Partial pairs are split into tiles so that each
    tile again gets the cheapest exact treatment (most window and document tiles are empty or full).
    """
    tile = TILE if tile is None else tile
    if qsegs == ksegs and len(qsegs) > 1 and spec.lo == 0 and spec.hi is None and spec.doc_bounds is None \
            and all(a.last < b.start for a, b in zip(qsegs, qsegs[1:])):
        # A rank's own block whose positions increase along the local rows (zigzag): plain causal on
        # the global positions is causal on the local rows, so one kernel call does all of it. Padding
        # keys are a suffix of the local rows, since positions increase.
        k_len = sum(s.count_below(spec.seq_len) for s in ksegs)
        return (Task(0, sum(s.length for s in qsegs), 0, k_len, Kind.CAUSAL),) if k_len else ()
    tasks: list[Task] = []
    qoff = 0
    for qs in qsegs:
        koff = 0
        for ks in ksegs:
            _plan_pair(spec, qs, ks, qoff, koff, tile, tasks)
            koff += ks.length
        qoff += qs.length
    return tuple(_merge_full(tasks))


def _merge_full(tasks: list[Task]) -> list[Task]:
    """Join fully visible tasks that are adjacent in the local rows (same queries and touching keys, or
    the other way round): one bigger kernel call instead of two, and one merge less (e.g. the two
    zigzag chunks of a key block that a query chunk sees whole)."""
    rest = [t for t in tasks if t.kind is not Kind.FULL]
    full = [(t.q0, t.q1, t.k0, t.k1) for t in tasks if t.kind is Kind.FULL]
    while True:
        n = len(full)
        full = _join_runs(full, key=lambda t: (t[0], t[1]), lo=2, hi=3)  # same queries, touching keys
        full = _join_runs(full, key=lambda t: (t[2], t[3]), lo=0, hi=1)  # same keys, touching queries
        if len(full) == n:
            return rest + [Task(*t, Kind.FULL) for t in full]


def _join_runs(boxes, key, lo, hi):
    groups: dict = {}
    for b in boxes:
        groups.setdefault(key(b), []).append(b)
    out = []
    for same in groups.values():
        same.sort(key=lambda b: b[lo])
        cur = list(same[0])
        for b in same[1:]:
            if b[lo] == cur[hi]:
                cur[hi] = b[hi]
            else:
                out.append(tuple(cur))
                cur = list(b)
        out.append(tuple(cur))
    return out


def _plan_pair(spec, qs, ks, qoff, koff, tile, out) -> None:
    pair = spec.classify(qs, ks)
    if pair.kind is Kind.EMPTY:
        return
    if pair.kind is Kind.FULL or pair.kind is Kind.CAUSAL:
        q0 = qoff + max(0, -pair.shift) if pair.kind is Kind.CAUSAL else qoff
        out.append(Task(q0, qoff + qs.length, koff, koff + pair.k_len, pair.kind))
        return
    ks = Segment(ks.start, pair.k_len, ks.stride)
    if qs.length <= tile and ks.length <= tile:
        out.append(Task(qoff, qoff + qs.length, koff, koff + ks.length, Kind.PARTIAL, qseg=qs, kseg=ks))
        return
    for a in range(0, qs.length, tile):
        qa = qs.sub(a, min(a + tile, qs.length))
        for b in range(0, ks.length, tile):
            kb = ks.sub(b, min(b + tile, ks.length))
            sub = spec.classify(qa, kb)
            if sub.kind is Kind.PARTIAL:
                kb = Segment(kb.start, sub.k_len, kb.stride)
                out.append(Task(qoff + a, qoff + a + qa.length, koff + b, koff + b + kb.length,
                                Kind.PARTIAL, qseg=qa, kseg=kb))
            else:
                _plan_pair(spec, qa, kb, qoff + a, koff + b, tile, out)


def task_flops(task: Task, batch: int, heads: int, head_dim: int, v_head_dim: int) -> float:
    """Forward FLOPs of one task: 2 (d + dv) per visible (query, key) pair (a causal call counts the
    pairs of its top-left triangle, row i seeing min(i + 1, nk) keys)."""
    nq, nk = task.q1 - task.q0, task.k1 - task.k0
    if task.kind is Kind.CAUSAL:
        m = min(nq, nk)
        pairs = m * (m + 1) // 2 + (nq - m) * nk
    else:
        pairs = nq * nk
    return 2.0 * batch * heads * pairs * (head_dim + v_head_dim)


def split_tasks(tasks: tuple[Task, ...]) -> tuple[tuple[Task, ...], tuple[Task, ...]]:
    """Cut a block's tasks into two halves of about equal cost, splitting a lone task by key columns.

    The ring's backward computes the first half of its own block before the ring starts and keeps the
    second to overlap the final return of dK/dV to their owners. A lone task is cut by keys, not
    queries: the first half then covers every query row, so its dQ is adopted as the accumulator (no
    copy), and each half is a single kernel call (a causal triangle cut at key m is rows [0, n) x keys
    [0, m), causal, plus rows [m, n) x keys [m, nk), causal again).
    """
    def cost(t: Task) -> float:
        return task_flops(t, 1, 1, 1, 1)

    if len(tasks) == 1:
        t = tasks[0]
        nk = t.k1 - t.k0
        if nk < 2 or t.q1 == t.q0 or t.kind is Kind.PARTIAL:
            return tasks, ()

        def halves(m: int) -> tuple[Task, Task]:
            if t.kind is Kind.FULL:
                return Task(t.q0, t.q1, t.k0, t.k0 + m, t.kind), Task(t.q0, t.q1, t.k0 + m, t.k1, t.kind)
            return (Task(t.q0, t.q1, t.k0, t.k0 + m, Kind.CAUSAL),
                    Task(t.q0 + min(m, t.q1 - t.q0), t.q1, t.k0 + m, t.k1, Kind.CAUSAL))

        lo, hi, total = 1, nk - 1, cost(t)
        while lo < hi:  # the smallest cut whose first half is worth at least half the whole
            m = (lo + hi) // 2
            if cost(halves(m)[0]) * 2 >= total:
                hi = m
            else:
                lo = m + 1
        early, late = halves(lo)
        return (early,), ((late,) if late.q1 > late.q0 else ())
    total, acc = sum(cost(t) for t in tasks), 0.0
    for i, t in enumerate(tasks):
        acc += cost(t)
        if acc >= total / 2:
            return tasks[: i + 1], tasks[i + 1:]
    return tasks, ()
