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
import functools
from dataclasses import dataclass

import torch

# Partial block pairs are cut into tiles of this many queries x keys before a dense mask is built:
# small enough that a mask never costs more than a score tile, big enough for the kernel to run well.
TILE = 512
CHUNK = 1024  # largest kernel call (query rows and keys) on a visiting block in the ring's backward


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


def restrict(t: Task, r0: int, r1: int, c0: int, c1: int) -> list[Task]:
    """The part of task ``t`` in local query rows ``[r0, r1)`` and key rows ``[c0, c1)``, as kernel tasks.

    A causal task is top-left aligned (row ``i`` of the task sees key ``j <= i``); its part in a row and
    column range is a fully visible rectangle left of the diagonal plus a smaller top-left triangle.
    """
    q0, q1, k0, k1 = max(t.q0, r0), min(t.q1, r1), max(t.k0, c0), min(t.k1, c1)
    if q0 >= q1 or k0 >= k1:
        return []
    if t.kind is Kind.FULL:
        return [Task(q0, q1, k0, k1, Kind.FULL)]
    if t.kind is Kind.PARTIAL:
        return [Task(q0, q1, k0, k1, Kind.PARTIAL, qseg=t.qseg.sub(q0 - t.q0, q1 - t.q0),
                     kseg=t.kseg.sub(k0 - t.k0, k1 - t.k0))]
    # Causal, in the task's own coordinates: row i sees keys [0, i]; rows [a, b), keys [u, w).
    a, b, u, w = q0 - t.q0, q1 - t.q0, k0 - t.k0, k1 - t.k0
    a = max(a, u)  # rows above the key range see none of it
    out = []
    if a >= b:
        return out
    if a > u:
        out.append(Task(t.q0 + a, t.q0 + b, t.k0 + u, t.k0 + min(a, w), Kind.FULL))
    if a < w:
        out.append(Task(t.q0 + a, t.q0 + b, t.k0 + a, t.k0 + w, Kind.CAUSAL))
    return out


@functools.lru_cache(maxsize=1024)
def tile_tasks(tasks: tuple[Task, ...], n_keys: int, size: int) -> tuple[tuple[int, int, tuple[Task, ...]], ...]:
    """Cut tasks into calls of at most ``size`` query rows and ``size`` keys, grouped by key tile.

    Returns ``(u, w, tasks)`` per key tile ``[u, w)`` (in order, empty tiles included). The ring's
    backward runs visiting blocks this way: every call's dQ/dK/dV output, added into an accumulator
    and dropped, stays a tile in size, and a finished key tile's dK/dV can leave before the block is done.
    Cached: every layer's backward asks for the same tiles of the same plan.
    """
    rows = max((t.q1 for t in tasks), default=0)
    return tuple((u, min(u + size, n_keys),
                  tuple(piece for t in tasks for r in range(0, rows, size)
                        for piece in restrict(t, r, r + size, u, min(u + size, n_keys))))
                 for u in range(0, n_keys, size))
