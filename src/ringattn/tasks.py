"""Kernel tasks: how one local query block against one key block becomes a few kernel calls.

``MaskSpec.classify`` (masks.py) says what a pair of position runs is; this module turns that into
:class:`~ringattn.masks.Task` records a backend runs, lowering only what the backend cannot take
natively (its :class:`~ringattn.kernels.base.Capabilities`):

- a PARTIAL pair becomes tiles of at most ``caps.max_dense_tile`` (each tile classified again: most
  window and document tiles are empty or full), unless the backend runs PARTIAL natively;
- packed documents are planned one piece per document first (every piece is full, causal or a window
  band, so no dense mask is needed: measured 2.1-2.4x faster on the CPU op than masked tiles);
- a pair only the causal bound cuts whose diagonal starts right of its first key (queries later than
  the keys they share a run with: bottom-right causal, or a window reaching right) becomes a full
  rectangle plus a top-left triangle;
- a causal task for a bottom-right aligned kernel becomes a square triangle plus a full rectangle;
- for a backend with BAND in ``caps.native``, a pair that windows, chunks or documents cut is one BAND
  task carrying its band and runs (FlashAttention's ``window_size`` and varlen ``cu_seqlens``);
- for a backend that applies ALiBi itself (``caps.native_score_mods``), an ALiBi call is planned like any
  other and every task carries its positions; the others get every visible pair as PARTIAL tiles.

The same tasks feed the FLOP model (``task_flops``) of the profiler and of the planner.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

from .kernels.base import Alignment, Capabilities
from .masks import Band, Kind, MaskSpec, Segment, Task
from .scores import ALIBI

DEFAULT_CAPS = Capabilities()


@functools.lru_cache(maxsize=4096)
def block_tasks(spec: MaskSpec, qsegs: tuple[Segment, ...], ksegs: tuple[Segment, ...],
               caps: Capabilities = DEFAULT_CAPS) -> tuple[Task, ...]:
    """The kernel calls that compute local query block ``qsegs`` against key block ``ksegs``.

    Segments are consecutive in local row order. Cached: every layer asks for the same plans.
    """
    if qsegs == ksegs and len(qsegs) > 1 and spec.lo == 0 and spec.hi is None and not spec.grouped \
            and not spec.positional and not spec.custom and all(a.last < b.start for a, b in zip(qsegs, qsegs[1:])):
        # A rank's own block whose positions increase along the local rows (zigzag): plain causal on
        # the global positions is causal on the local rows, so one kernel call does all of it. Padding
        # keys are a suffix of the local rows, since positions increase.
        k_len = sum(s.count_below(spec.seq_len) for s in ksegs)
        tasks = [Task(0, sum(s.length for s in qsegs), 0, k_len, Kind.CAUSAL)] if k_len else []
        return tuple(lower(tasks, caps))
    tasks: list[Task] = []
    native_alibi = spec.positional and ALIBI in caps.native_score_mods
    qoff = 0
    for qs in qsegs:
        koff = 0
        for ks in ksegs:
            if native_alibi and qs.stride == ks.stride:
                tasks += _planned_with_positions(spec, qs, ks, qoff, koff, caps)
            else:
                _plan_pair(spec, qs, ks, qoff, koff, caps, tasks)
            koff += ks.length
        qoff += qs.length
    # Joined tasks would span segments, whose positions are no longer one run: not for positional calls.
    return tuple(lower(tasks if native_alibi else _merge_full(tasks), caps))


def _planned_with_positions(spec: MaskSpec, qs: Segment, ks: Segment, qoff: int, koff: int,
                            caps: Capabilities) -> list[Task]:
    """A pair of an ALiBi call for a backend that applies ALiBi on any task: planned by visibility alone,
    every task carrying its positions (equal strides: the bias is then a function of row minus key)."""
    out: list[Task] = []
    _plan_pair(dataclasses.replace(spec, positional=False), qs, ks, qoff, koff, caps, out)
    return [t if t.qseg is not None else dataclasses.replace(
        t, qseg=qs.sub(t.q0 - qoff, t.q1 - qoff), kseg=ks.sub(t.k0 - koff, t.k1 - koff)) for t in out]


def cut(t: Task, q0: int, q1: int, k0: int, k1: int, kind: Kind | None = None) -> Task:
    """Rows ``[q0, q1)`` and keys ``[k0, k1)`` (block rows, inside ``t``) of task ``t`` as a task of ``kind``
    (default: ``t``'s), its positions and band cut alike."""
    def sub(seg, a, lo, hi):
        return None if seg is None else seg.sub(lo - a, hi - a)

    band = None if t.band is None else t.band.restrict(q0 - t.q0, q1 - t.q0, k0 - t.k0, k1 - t.k0)
    return Task(q0, q1, k0, k1, t.kind if kind is None else kind, qseg=sub(t.qseg, t.q0, q0, q1),
                kseg=sub(t.kseg, t.k0, k0, k1), band=band)


def lower(tasks, caps: Capabilities) -> list[Task]:
    """Tasks in the backend's causal alignment: unchanged for top-left; for bottom-right every causal
    task becomes square (the two alignments agree there) plus a full rectangle of the rows below it."""
    if caps.causal_alignment is Alignment.TOP_LEFT:
        return list(tasks)
    out = []
    for t in tasks:
        nq, nk = t.q1 - t.q0, t.k1 - t.k0
        if t.kind is not Kind.CAUSAL or nq == nk:
            out.append(t)
        elif nq < nk:  # keys right of the last row's diagonal are seen by nobody
            out.append(cut(t, t.q0, t.q1, t.k0, t.k0 + nq))
        else:  # rows below the square see every key
            out.append(cut(t, t.q0, t.q0 + nk, t.k0, t.k1))
            out.append(cut(t, t.q0 + nk, t.q1, t.k0, t.k1, Kind.FULL))
    return out


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


def _plan_pair(spec: MaskSpec, qs: Segment, ks: Segment, qoff: int, koff: int, caps: Capabilities,
               out: list[Task]) -> None:
    pair = spec.classify(qs, ks)
    if pair.kind is Kind.EMPTY:
        return
    if pair.kind is Kind.FULL or pair.kind is Kind.CAUSAL:
        q0 = qoff + max(0, -pair.shift) if pair.kind is Kind.CAUSAL else qoff
        out.append(Task(q0, qoff + qs.length, koff, koff + pair.k_len, pair.kind))
        return
    ks = Segment(ks.start, pair.k_len, ks.stride)
    if pair.shift > 0:
        # Keys before ``shift`` are seen by every row, the rest form a top-left triangle: two mask-free
        # calls in place of dense tiles along the whole diagonal.
        _plan_pair(spec, qs, ks.sub(0, pair.shift), qoff, koff, caps, out)
        _plan_pair(spec, qs, ks.sub(pair.shift, ks.length), qoff, koff + pair.shift, caps, out)
        return
    if Kind.PARTIAL in caps.native:
        out.append(Task(qoff, qoff + qs.length, koff, koff + ks.length, Kind.PARTIAL, qseg=qs, kseg=ks))
        return
    if Kind.BAND in caps.native and not spec.custom and not spec.positional and qs.stride == ks.stride:
        band = band_of(spec, qs, ks)
        if band is not None:
            out.append(Task(qoff, qoff + qs.length, koff, koff + ks.length, Kind.BAND, band=band))
        return
    if spec.grouped and not spec.positional and _plan_by_document(spec, qs, ks, qoff, koff, caps, out):
        return
    tile = caps.max_dense_tile
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
                _plan_pair(spec, qa, kb, qoff + a, koff + b, caps, out)


def band_of(spec: MaskSpec, qs: Segment, ks: Segment) -> Band | None:
    """The visibility of query run ``qs`` against key run ``ks`` (equal strides, real keys only, no user
    mask) as a :class:`Band`: the diagonal bounds of causal and window, and a run per group; None if the
    bounds leave no diagonal (a window narrower than the stride)."""
    w = qs.stride
    off = qs.start - ks.start  # i - j = off + (r - c) * w
    # lo <= i - j  <=>  c - r <= (off - lo) / w;  i - j <= hi  <=>  c - r >= (off - hi) / w.
    upper = None if spec.lo is None else (off - spec.lo) // w
    lower_ = None if spec.hi is None else -((spec.hi - off) // w)
    if lower_ is not None and upper is not None and lower_ > upper:
        return None
    diag = off // w
    if lower_ is not None:
        diag = max(diag, lower_)
    if upper is not None:
        diag = min(diag, upper)
    window = (-1 if lower_ is None else diag - lower_, -1 if upper is None else upper - diag)
    if not spec.grouped:
        return Band(diag, window)
    qp, kp = document_pieces(spec, qs), document_pieces(spec, ks)
    groups = sorted({spec.group_of(p.start) for _, p in qp} | {spec.group_of(p.start) for _, p in kp})
    qn = {spec.group_of(p.start): p.length for _, p in qp}
    kn = {spec.group_of(p.start): p.length for _, p in kp}
    cu_q, cu_k = [0], [0]
    for g in groups:
        cu_q.append(cu_q[-1] + qn.get(g, 0))
        cu_k.append(cu_k[-1] + kn.get(g, 0))
    return Band(diag, window, tuple(cu_q), tuple(cu_k))


def document_pieces(spec: MaskSpec, seg: Segment) -> list[tuple[int, Segment]]:
    """``seg`` cut where documents (or chunks) begin: ``(local row offset, piece)``, each piece inside one
    group (a group is a range of positions, so its part of an arithmetic run is again one)."""
    cuts = sorted({0, seg.length} | {seg.count_below(b) for b in spec.group_starts(seg.start, seg.last)})
    return [(a, seg.sub(a, b)) for a, b in zip(cuts, cuts[1:])]


def _plan_by_document(spec, qs, ks, qoff, koff, caps, out) -> bool:
    """Plan a pair that documents cut as one pair per shared document; False if the pieces are too small
    for that to pay (the caller tiles instead)."""
    qp, kp = document_pieces(spec, qs), document_pieces(spec, ks)
    if min(qs.length / len(qp), ks.length / len(kp)) < caps.min_document_piece:
        return False
    within = dataclasses.replace(spec, doc_bounds=None, chunk=None)  # each pair below lies in one group
    j = 0
    for a, qa in qp:
        doc = spec.group_of(qa.start)
        while j < len(kp) and spec.group_of(kp[j][1].last) < doc:
            j += 1
        for b, kb in kp[j:]:
            kdoc = spec.group_of(kb.start)
            if kdoc > doc:
                break
            if kdoc == doc:
                _plan_pair(within, qa, kb, qoff + a, koff + b, caps, out)
    return True


def task_flops(task: Task, batch: int, heads: int, head_dim: int, v_head_dim: int, key_block: int = 1) -> float:
    """Forward FLOPs of one task: 2 (d + dv) per visible (query, key) pair (a causal call counts the
    pairs of its top-left triangle, row i seeing min(i + 1, nk) keys). With ``key_block`` > 1, the
    FLOPs a kernel executes that computes a causal row's keys up to the end of its diagonal's key block
    (``Capabilities.causal_key_block``)."""
    nq, nk = task.q1 - task.q0, task.k1 - task.k0
    if task.kind is Kind.BAND:
        return 2.0 * batch * heads * task.band.pairs(nq, nk) * (head_dim + v_head_dim)
    if task.kind is Kind.CAUSAL:
        m, kb = min(nq, nk), key_block
        blocks, rest = divmod(m, kb)  # rows of block j compute min(nk, (j + 1) kb) keys
        pairs = kb * kb * blocks * (blocks + 1) // 2 + rest * min(nk, (blocks + 1) * kb) + (nq - m) * nk
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
    if t.kind is not Kind.CAUSAL:
        part = cut(t, q0, q1, k0, k1)
        # A band's tiles away from its diagonal (or between its runs) see nothing: no call for them.
        return [] if part.kind is Kind.BAND and not part.band.pairs(q1 - q0, k1 - k0) else [part]
    # Causal, in the task's own coordinates: row i sees keys [0, i]; rows [a, b), keys [u, w).
    a, b, u, w = q0 - t.q0, q1 - t.q0, k0 - t.k0, k1 - t.k0
    a = max(a, u)  # rows above the key range see none of it
    out = []
    if a >= b:
        return out
    if a > u:
        out.append(cut(t, t.q0 + a, t.q0 + b, t.k0 + u, t.k0 + min(a, w), Kind.FULL))
    if a < w:
        out.append(cut(t, t.q0 + a, t.q0 + b, t.k0 + a, t.k0 + w, Kind.CAUSAL))
    return out


class KeyTile(NamedTuple):
    """Key rows ``[start, stop)`` of a block and the tasks that touch them (keys in block rows)."""

    start: int
    stop: int
    tasks: tuple[Task, ...]


@functools.lru_cache(maxsize=1024)
def tile_tasks(tasks: tuple[Task, ...], n_keys: int, caps: Capabilities = DEFAULT_CAPS) -> tuple[KeyTile, ...]:
    """Cut tasks into calls of at most ``caps.backward_tile`` query rows and keys, grouped by key tile.

    One :class:`KeyTile` per key tile, in order, empty ones included. The ring's backward runs visiting
    blocks this way: every call's dQ/dK/dV output, added into an accumulator and dropped, stays a tile in
    size, and a finished key tile's dK/dV can leave before the block is done. Cached: every layer's
    backward asks for the same tiles of the same plan.
    """
    size = caps.backward_tile
    rows = max((t.q1 for t in tasks), default=0)
    return tuple(
        KeyTile(u, min(u + size, n_keys), tuple(lower(
            [p for t in tasks for r in range(0, rows, size)
             for p in restrict(t, r, r + size, u, min(u + size, n_keys))], caps)))
        for u in range(0, n_keys, size))
