"""Masks on global positions, and the classification of block pairs.

Every mask ringattn supports is a predicate on the global position ``i`` of a query and ``j`` of a key
(see ``docs/api.md``): keys at ``j >= seq_len`` are padding, ``causal`` keeps ``j <= i``,
``window=(left, right)`` keeps ``i - left <= j <= i + right`` (``-1`` = unbounded), ``cu_seqlens``
keeps pairs inside one document and ``chunk_size=c`` pairs inside one chunk (``i // c == j // c``).
A rank's tokens are a few arithmetic runs of positions (:class:`Segment`), so whether a block pair is
empty, fully visible, a (shifted) causal triangle or genuinely partial is decided from a handful of
integers, without building any mask (``tasks.py`` turns that into kernel calls); ``MaskSpec.visible`` is
the same mask as a vectorised predicate.

Each kind of mask is declared once, in ``KINDS`` (a ``MaskKind``: its ``ringattn.Mask`` field, its flat
keyword, its check and the ``MaskSpec`` field it fills); ``register`` adds one whose value is a
``MaskTerm``, ANDed with the rest and reached through ``Mask(name=...)``.
"""

from __future__ import annotations

import bisect
import enum
import functools
import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Pairs of at most this many (query, key) positions are classified by evaluating a mask_mod on all of
# them; bigger ones are PARTIAL until the planner cuts them into tiles (each then evaluated).
EVAL_PAIRS = 1 << 18


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
    BAND = 4  # a diagonal band cut into runs (windows, chunks, documents): its parameters in ``Task.band``


@dataclass(frozen=True)
class Pair:
    """How to compute one query segment against one key segment.

    ``k_len`` keys are used (padding keys at the end are cut off). For ``CAUSAL``, query row ``i``
    sees key ``j`` iff ``j <= i + shift``; ``shift <= 0`` (rows ``< -shift`` see nothing). A ``PARTIAL``
    pair with ``shift > 0`` obeys the same rule: only the lower bound cuts, and the first ``shift`` keys
    are seen by every row (queries that sit after keys of the same run: bottom-right causal, or a
    window reaching right); the planner cuts it into a full and a causal part instead of masking it.
    """

    kind: Kind
    k_len: int = 0
    shift: int = 0


class SliceKind(enum.Enum):
    FULL = "full"
    CAUSAL = "causal"  # bottom-right aligned, as in MagiAttention: the last query sees the last key
    INV_CAUSAL = "inv-causal"  # top-left aligned: the first query sees every key
    BI_CAUSAL = "bi-causal"  # both


@dataclass(frozen=True)
class Slice:
    """Attention slice: queries ``[q0, q1)`` see keys ``[k0, k1)`` (global positions), restricted by kind.

    With ``r = i - q0``, ``c = j - k0`` and ``L = (k1 - k0) - (q1 - q0)``: causal keeps ``c <= r + L``,
    inverse-causal ``c >= r``, bi-causal both. In global terms every slice is a rectangle with
    ``lo_d <= j - i <= hi_d``, which is what makes classifying a block pair against it exact and cheap.
    """

    q0: int
    q1: int
    k0: int
    k1: int
    kind: SliceKind = SliceKind.FULL

    @property
    def diag(self) -> tuple[float, float]:
        """Bounds on ``j - i`` (infinite where the kind sets none)."""
        lo, hi = float("-inf"), float("inf")
        if self.kind in (SliceKind.CAUSAL, SliceKind.BI_CAUSAL):
            hi = (self.k1 - self.q1)  # c <= r + L  <=>  j - i <= k1 - q1
        if self.kind in (SliceKind.INV_CAUSAL, SliceKind.BI_CAUSAL):
            lo = self.k0 - self.q0
        return lo, hi

    def overlap(self, qa: int, qb: int, ka: int, kb: int, lo: int | None = None,
                hi: int | None = None) -> tuple[bool, bool]:
        """(meets, covers) the position box ``[qa, qb] x [ka, kb]`` (inclusive), where ``meets`` also holds
        the other diagonal bounds ``lo <= i - j <= hi`` (causal, window). Exact for whole boxes; for
        strided runs ``meets`` errs only towards True."""
        i0, i1, j0, j1 = max(qa, self.q0), min(qb, self.q1 - 1), max(ka, self.k0), min(kb, self.k1 - 1)
        own_lo, own_hi = self.diag
        lo_d = own_lo if hi is None else max(own_lo, -hi)
        hi_d = own_hi if lo is None else min(own_hi, -lo)
        meets = i0 <= i1 and j0 <= j1 and lo_d <= hi_d and j1 - i0 >= lo_d and j0 - i1 <= hi_d
        covers = (self.q0 <= qa and qb < self.q1 and self.k0 <= ka and kb < self.k1
                  and kb - qa <= own_hi and ka - qb >= own_lo)
        return meets, covers

    def fill(self, keep: torch.Tensor, qs: Segment, ks: Segment) -> None:
        """OR this slice into ``keep``, the ``(qs.length, ks.length)`` mask of two runs, writing only the
        rectangle of rows and columns it spans: the work is the slice's area inside the tile."""
        r0, r1 = qs.count_below(self.q0), qs.count_below(self.q1)
        c0, c1 = ks.count_below(self.k0), ks.count_below(self.k1)
        if r0 >= r1 or c0 >= c1:
            return
        lo, hi = self.diag
        sub = keep[r0:r1, c0:c1]
        if lo == float("-inf") and hi == float("inf"):
            sub.fill_(True)
            return
        d = ks.sub(c0, c1).positions(keep.device)[None, :] - qs.sub(r0, r1).positions(keep.device)[:, None]
        if lo > float("-inf"):
            sub |= (d >= lo) if hi == float("inf") else (d >= lo) & (d <= hi)
        else:
            sub |= d <= hi

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        lo, hi = self.diag
        keep = (q_pos >= self.q0) & (q_pos < self.q1) & (k_pos >= self.k0) & (k_pos < self.k1)
        d = k_pos - q_pos
        if lo > float("-inf"):
            keep = keep & (d >= lo)
        if hi < float("inf"):
            keep = keep & (d <= hi)
        return keep


class SliceIndex:
    """The slices that may touch a box of positions, found from the boxes' ranges: each slice is listed
    under the coarse buckets its query range and its key range cover, so a lookup costs the slices near
    the box, not all of them (thousands of slices over a long sequence are planned tile by tile)."""

    BUCKETS = 64

    def __init__(self, slices: tuple[Slice, ...]):
        self.slices = slices
        extent = max((max(s.q1, s.k1) for s in slices), default=1)
        self.width = max(1, -(-extent // self.BUCKETS))
        self.by_q: list[list[int]] = [[] for _ in range(self.BUCKETS + 1)]
        self.by_k: list[list[int]] = [[] for _ in range(self.BUCKETS + 1)]
        for n, s in enumerate(slices):
            if s.q0 < s.q1 and s.k0 < s.k1:  # an empty range: the slice shows nothing
                for b in range(s.q0 // self.width, (s.q1 - 1) // self.width + 1):
                    self.by_q[b].append(n)
                for b in range(s.k0 // self.width, (s.k1 - 1) // self.width + 1):
                    self.by_k[b].append(n)

    def _near(self, table: list[list[int]], a: int, b: int) -> list[list[int]]:
        if b < a or a >= len(table) * self.width:
            return []
        return table[max(a, 0) // self.width:min(b // self.width, len(table) - 1) + 1]

    def near(self, qa: int, qb: int, ka: int, kb: int) -> list[Slice]:
        """Slices, in their order, whose ranges may meet queries ``[qa, qb]`` and keys ``[ka, kb]``."""
        by_q, by_k = self._near(self.by_q, qa, qb), self._near(self.by_k, ka, kb)
        lists = by_q if sum(map(len, by_q)) <= sum(map(len, by_k)) else by_k
        found = sorted({n for bucket in lists for n in bucket})
        return [s for s in (self.slices[n] for n in found)
                if s.q0 <= qb and qa < s.q1 and s.k0 <= kb and ka < s.k1]


@dataclass(frozen=True, eq=False)
class MaskMod:
    """A user predicate ``fn(q_idx, kv_idx) -> bool tensor`` on global positions (FlexAttention's, vectorised).

    Equal only to itself: each call wraps the function anew, so plans are cached within a call and never
    across calls, because the function may read a table (documents, prefixes) that changes between calls
    while the function object stays the same. Its description names the function, not its address, so that
    ranks compare equal; that they compute the same mask the agreement checks on probe positions.
    """

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def __repr__(self) -> str:
        if not hasattr(self.fn, "__qualname__"):  # a callable object: its own repr (e.g. its parameters)
            return f"mask_mod={self.fn!r}"
        return f"mask_mod={getattr(self.fn, '__module__', '?')}.{self.fn.__qualname__}"

    def __call__(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        try:
            keep = self.fn(q_pos, k_pos)
        except Exception as e:  # noqa: BLE001 - whatever it raised, it is the user's function that failed
            raise ValueError(f"{self!r} raised when asked about query positions {_span(q_pos)} and key positions "
                             f"{_span(k_pos)}: {type(e).__name__}: {e}") from e
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            raise TypeError(f"{self!r} must return a bool tensor, got "
                            f"{getattr(keep, 'dtype', type(keep).__name__)}")
        return keep


def _span(pos: torch.Tensor) -> str:
    return f"[{int(pos.min())}, {int(pos.max())}]" if pos.numel() else "(none)"


def takes_four(fn) -> bool:
    """Whether ``fn`` is FlexAttention's 4-argument ``mask_mod(b, h, q_idx, kv_idx)``."""
    if fn is None or not callable(fn):
        return False
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional and p.default is p.empty for p in params) == 4


@dataclass(frozen=True)
class RowHeadMask:
    """A 4-argument mask_mod with its batch row and head fixed: the 2-argument predicate of one part."""

    fn: Callable
    b: int
    h: int

    def __call__(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        b, h = (torch.tensor(x, device=q_idx.device) for x in (self.b, self.h))
        return self.fn(b, h, q_idx, kv_idx)

    def __repr__(self) -> str:  # names the function, not its address: every rank describes it alike
        return f"{getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', '?')}(b={self.b}, h={self.h})"


class MaskTerm:
    """The mask of a registered kind (``MaskKind``) on global positions, ANDed with the rest of the call's mask.

    A subclass is hashable and equal by value (a frozen dataclass), and its ``repr`` says what it computes:
    plans are cached on the ``MaskSpec`` that holds it, and the ranks compare that repr before any exchange.
    ``visible`` is its meaning (broadcasting int64 position tensors -> bool, True = visible); ``classify``
    says what it does on a whole pair of runs (EMPTY, FULL or PARTIAL; PARTIAL when unsure) and by default
    evaluates ``visible`` on pairs of at most ``EVAL_PAIRS`` positions. Padding queries (at or past
    ``seq_len``) see nothing under it, as under a ``mask_mod``.
    """

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def classify(self, qs: Segment, ks: Segment) -> Kind:
        if qs.length * ks.length > EVAL_PAIRS:
            return Kind.PARTIAL
        keep = self.visible(qs.positions()[:, None], ks.positions()[None, :])
        if not bool(keep.any()):
            return Kind.EMPTY
        return Kind.FULL if bool(keep.all()) else Kind.PARTIAL


@dataclass(frozen=True)
class MaskSpec:
    """The global mask of one attention call. Hashable, so plans can be cached on it."""

    seq_len: int
    causal: bool = False
    window: tuple[int, int] | None = None
    doc_bounds: tuple[int, ...] | None = None  # cu_seqlens as Python ints
    chunk: int | None = None  # chunked attention (Llama 4): keys only in the query's chunk
    # Scores depend on positions (ALiBi): every visible pair is planned as a PARTIAL tile, which carries
    # its positions to the kernel. The visibility itself is unchanged.
    positional: bool = False
    mask_mod: MaskMod | None = None  # ANDed with the rest
    slices: tuple[Slice, ...] | None = None  # their union, ANDed with the rest
    terms: tuple[MaskTerm, ...] = ()  # the masks of registered kinds (``MaskKind``), each ANDed with the rest

    @functools.cached_property
    def slice_index(self) -> SliceIndex:
        return SliceIndex(self.slices or ())

    @property
    def custom(self) -> bool:
        """Whether a user mask (mask_mod, slices or a registered kind's term) applies: block pairs are then
        classified from it."""
        return self.mask_mod is not None or self.slices is not None or bool(self.terms)

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

    @property
    def grouped(self) -> bool:
        """Whether pairs must share a group (document, chunk) to be visible."""
        return self.doc_bounds is not None or self.chunk is not None

    def group_of(self, pos: int) -> tuple[int, int]:
        """(document, chunk) of a position; increases with the position (lexicographically)."""
        doc = self.doc_of(pos) if self.doc_bounds is not None else 0
        return doc, (pos // self.chunk if self.chunk is not None else 0)

    def group_starts(self, lo: int, hi: int) -> list[int]:
        """Positions in ``(lo, hi]`` where a new group begins."""
        cuts = [b for b in self.doc_bounds if lo < b <= hi] if self.doc_bounds is not None else []
        if self.chunk is not None:
            c = self.chunk
            cuts += range((lo // c + 1) * c, hi + 1, c)
        return sorted(set(cuts))

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
        if self.grouped:
            q0, q1 = self.group_of(qs.start), self.group_of(qs.last)
            k0, k1 = self.group_of(ks.start), self.group_of(ks.last)
            if q1 < k0 or k1 < q0:
                return Pair(Kind.EMPTY)
            docs_cut = not (q0 == q1 == k0 == k1)
        lo_cuts = lo is not None and dmin < lo
        hi_cuts = hi is not None and dmax > hi
        if self.custom:
            kind = self._classify_custom(qs, ks)
            if kind is Kind.EMPTY:
                return Pair(Kind.EMPTY)
            if kind is Kind.PARTIAL:
                return Pair(Kind.PARTIAL, k_len)
            # The user mask sees the whole pair: the rest decides, as without it.
        if self.positional:
            return Pair(Kind.PARTIAL, k_len)
        if not (docs_cut or lo_cuts or hi_cuts):
            return Pair(Kind.FULL, k_len)
        if not docs_cut and not hi_cuts and qs.stride == ks.stride:
            # Only the lower bound cuts: i - j >= lo  <=>  j - i <= (qs.start - ks.start - lo) / stride.
            shift = (qs.start - ks.start - lo) // qs.stride
            return Pair(Kind.CAUSAL if shift <= 0 else Kind.PARTIAL, k_len, shift)
        return Pair(Kind.PARTIAL, k_len)

    def _classify_custom(self, qs: Segment, ks: Segment) -> Kind:
        """EMPTY, FULL or PARTIAL for the user mask alone on a pair (``ks`` already cut to real keys).

        Padding queries (at or past ``seq_len``) see nothing under a user mask, which is never asked about
        them: a pair holding some is at most PARTIAL, classified from its real rows."""
        real = qs.count_below(self.seq_len)
        if real == 0:
            return Kind.EMPTY
        padded, qs = real < qs.length, Segment(qs.start, real, qs.stride)
        full = True
        if self.slices is not None:
            hits = [s.overlap(qs.start, qs.last, ks.start, ks.last, self.lo, self.hi)
                    for s in self.slice_index.near(qs.start, qs.last, ks.start, ks.last)]
            if not any(m for m, _ in hits):
                return Kind.EMPTY
            full = any(c for _, c in hits)
        for term in self.terms:
            kind = term.classify(qs, ks)
            if kind is Kind.EMPTY:
                return Kind.EMPTY
            full = full and kind is Kind.FULL
        if self.mask_mod is None and full:
            return Kind.PARTIAL if padded else Kind.FULL
        if qs.length * ks.length > EVAL_PAIRS:
            return Kind.PARTIAL
        keep = self._user_visible(qs.positions()[:, None], ks.positions()[None, :], (qs, ks))
        if not bool(keep.any()):
            return Kind.EMPTY
        return Kind.FULL if bool(keep.all()) and not padded else Kind.PARTIAL

    def real_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions clamped into ``[0, seq_len)``: what a mask_mod is asked about. Masks index tables of
        ``seq_len`` entries (a document id per token), so padding positions, masked anyway, must not
        reach it; the answers at clamped positions are discarded by the caller."""
        top = max(self.seq_len, 1) - 1
        return q_pos.clamp(0, top), k_pos.clamp(0, top)

    def _user_visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor,
                      segs: tuple[Segment, Segment] | None = None) -> torch.Tensor:
        """The user mask (slices, mask_mod) at real query positions; False at padding queries.
        ``segs``: the runs the positions come from (a column and a row), for slices filled by range."""
        shape = torch.broadcast_shapes(q_pos.shape, k_pos.shape)
        keep = (q_pos < self.seq_len).expand(shape)
        if self.slices is not None:
            keep = keep & self._slices_visible(q_pos, k_pos, segs)
        if self.mask_mod is not None and self.seq_len > 0:
            keep = keep & self.mask_mod(*self.real_positions(q_pos, k_pos))
        for term in self.terms:
            keep = keep & term.visible(q_pos, k_pos)
        return keep

    def _slices_visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor,
                        segs: tuple[Segment, Segment] | None) -> torch.Tensor:
        shape = torch.broadcast_shapes(q_pos.shape, k_pos.shape)
        if segs is not None:
            qs, ks = segs
            union = torch.zeros(shape, dtype=torch.bool, device=q_pos.device)
            for s in self.slice_index.near(qs.start, qs.last, ks.start, ks.last):
                s.fill(union, qs, ks)
            return union
        union = torch.zeros(shape, dtype=torch.bool, device=q_pos.device)
        if q_pos.numel() == 0 or k_pos.numel() == 0:
            return union
        near = self.slice_index.near(int(q_pos.min()), int(q_pos.max()), int(k_pos.min()), int(k_pos.max()))
        for s in near:
            union |= s.visible(q_pos, k_pos)
        return union

    def any_visible(self, qs: Segment, ks: Segment) -> bool:
        """Whether any pair of the two runs is visible: exact, evaluating a mask_mod tile by tile where
        classification alone cannot tell (the ring skips a step only if no rank needs it)."""
        pair = self.classify(qs, ks)
        exact = (self.mask_mod is None and not self.terms and not self.grouped
                 and qs.stride == ks.stride == 1)  # slices' test
        if pair.kind is not Kind.PARTIAL or not self.custom or exact:
            return pair.kind is not Kind.EMPTY
        ks = Segment(ks.start, pair.k_len, ks.stride)
        step = int(EVAL_PAIRS ** 0.5)
        for a in range(0, qs.length, step):
            qa = qs.sub(a, min(a + step, qs.length))
            for b in range(0, ks.length, step):
                if bool(self.tile(qa, ks.sub(b, min(b + step, ks.length))).any()):
                    return True
        return False

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor,
                segs: tuple[Segment, Segment] | None = None) -> torch.Tensor:
        """Whether query position ``q_pos`` sees key position ``k_pos``; broadcasting integer tensors
        (e.g. a column of queries and a row of keys give the ``(nq, nk)`` mask), True = visible.

        The one statement of the mask's semantics: dense tiles, decoding and any predicate-based kernel
        (a Flex ``mask_mod``) all call it, and ``classify`` must agree with it (tests check both ways).
        """
        keep = k_pos < self.seq_len
        d = q_pos - k_pos
        if self.lo is not None:
            keep = keep & (d >= self.lo)
        if self.hi is not None:
            keep = keep & (d <= self.hi)
        if self.doc_bounds is not None:
            bounds = torch.tensor(self.doc_bounds, device=q_pos.device)
            keep = keep & (torch.bucketize(q_pos, bounds, right=True) == torch.bucketize(k_pos, bounds, right=True))
        if self.chunk is not None:
            keep = keep & (torch.div(q_pos, self.chunk, rounding_mode="floor")
                           == torch.div(k_pos, self.chunk, rounding_mode="floor"))
        if self.custom:
            keep = keep & self._user_visible(q_pos, k_pos, segs)
        return keep.expand(torch.broadcast_shapes(q_pos.shape, k_pos.shape))

    def tile(self, qs: Segment, ks: Segment, device: torch.device | str | None = None) -> torch.Tensor:
        """``visible`` on the ``(qs.length, ks.length)`` tile of two runs (slices filled by range)."""
        return self.visible(qs.positions(device)[:, None], ks.positions(device)[None, :], (qs, ks))


@dataclass(frozen=True)
class Band:
    """Which keys the rows of a BAND task see, in the task's own rows ``r`` and keys ``c`` (from 0).

    ``diag``: key ``r + diag`` is the one aligned with row ``r``. ``window=(left, right)``: row ``r`` sees
    keys ``r + diag - left <= c <= r + diag + right``; ``-1`` leaves that side unbounded (``(-1, 0)`` is
    causal). ``cu_q``/``cu_k`` (None: one run): run ``s`` is rows ``[cu_q[s], cu_q[s+1])`` with keys
    ``[cu_k[s], cu_k[s+1])``, and a row sees only keys of its own run (documents, chunks). Both start at 0
    and end at the task's row and key counts; a run may be empty on one side (rows whose document has
    no key in the task, or the other way round).

    FlashAttention takes this as it is: ``cu_seqlens_q/k`` are ``cu_q``/``cu_k``, and ``window_size`` of a
    run is ``flash_windows()[s]`` (its bottom-right alignment), or ``flash_window()`` where one fits all;
    ALiBi's ``alibi_slopes`` come from the task's positions (``ScoreMod.flash_alibi``).
    """

    diag: int = 0
    window: tuple[int, int] = (-1, -1)
    cu_q: tuple[int, ...] | None = None
    cu_k: tuple[int, ...] | None = None

    def runs(self, nq: int, nk: int) -> list[tuple[int, int, int, int]]:
        """``(r0, r1, c0, c1)`` of every run."""
        if self.cu_q is None:
            return [(0, nq, 0, nk)]
        return [(self.cu_q[s], self.cu_q[s + 1], self.cu_k[s], self.cu_k[s + 1]) for s in range(len(self.cu_q) - 1)]

    def flash_windows(self, nq: int, nk: int) -> list[tuple[int, int] | None]:
        """FlashAttention's ``window_size`` per run (bottom-right aligned in the run: its last row on its
        last key); None for a run whose bound falls on the far side of that diagonal (FlashAttention reads
        a negative size as unbounded: such a run needs its keys trimmed or a call of its own)."""
        out: list[tuple[int, int] | None] = []
        for r0, r1, c0, c1 in self.runs(nq, nk):
            # Row r0 + x is aligned with run key x + (c1 - c0) - (r1 - r0) + delta here, and with
            # x + (c1 - c0) - (r1 - r0) in FlashAttention's terms.
            delta = r0 + self.diag - c0 - ((c1 - c0) - (r1 - r0))
            left, right = self.window
            left, right = (-1 if left < 0 else left - delta), (-1 if right < 0 else right + delta)
            bad = (self.window[0] >= 0 and left < 0) or (self.window[1] >= 0 and right < 0)
            out.append(None if bad else (left, right))
        return out

    def flash_window(self, nq: int, nk: int) -> tuple[int, int] | None:
        """The one ``window_size`` of a single varlen call over every run (runs with rows and keys); None
        if they need different ones (then a call per group of runs alike)."""
        sizes = {w for (r0, r1, c0, c1), w in zip(self.runs(nq, nk), self.flash_windows(nq, nk))
                 if r1 > r0 and c1 > c0}
        return sizes.pop() if len(sizes) == 1 and None not in sizes else None

    def visible(self, nq: int, nk: int, device=None) -> torch.Tensor:
        """The ``(nq, nk)`` boolean visibility, True = visible."""
        r = torch.arange(nq, device=device)[:, None]
        c = torch.arange(nk, device=device)[None, :]
        d = c - r - self.diag
        keep = torch.ones(nq, nk, dtype=torch.bool, device=device)
        if self.window[0] >= 0:
            keep &= d >= -self.window[0]
        if self.window[1] >= 0:
            keep &= d <= self.window[1]
        if self.cu_q is not None:
            cu_q = torch.tensor(self.cu_q, device=device)
            cu_k = torch.tensor(self.cu_k, device=device)
            # The last run starting at or before a row is its own (empty runs start where the next does).
            run_q = torch.searchsorted(cu_q, r, right=True)
            run_k = torch.searchsorted(cu_k, c, right=True)
            keep &= run_q == run_k
        return keep

    def pairs(self, nq: int, nk: int) -> int:
        """How many (row, key) pairs are visible: the FLOP model's count."""
        total = 0
        for r0, r1, c0, c1 in self.runs(nq, nk):
            r = torch.arange(r0, r1, dtype=torch.long)
            a = torch.full_like(r, c0) if self.window[0] < 0 else (r + self.diag - self.window[0]).clamp_min(c0)
            b = torch.full_like(r, c1 - 1) if self.window[1] < 0 else \
                (r + self.diag + self.window[1]).clamp_max(c1 - 1)
            total += int((b - a + 1).clamp_min(0).sum())
        return total

    def restrict(self, r0: int, r1: int, c0: int, c1: int) -> Band:
        """The band of rows ``[r0, r1)`` and keys ``[c0, c1)`` of this one, in their own coordinates."""
        if self.cu_q is None:
            return Band(self.diag + r0 - c0, self.window)
        cu_q = [min(max(x, r0), r1) - r0 for x in self.cu_q]
        cu_k = [min(max(x, c0), c1) - c0 for x in self.cu_k]
        # Runs with neither rows nor keys left go; the first boundary (0) stays.
        keep = [0] + [s for s in range(1, len(cu_q)) if (cu_q[s], cu_k[s]) != (cu_q[s - 1], cu_k[s - 1])]
        return Band(self.diag + r0 - c0, self.window, tuple(cu_q[s] for s in keep), tuple(cu_k[s] for s in keep))


@dataclass(frozen=True)
class Task:
    """One kernel call: query rows ``[q0, q1)`` and key rows ``[k0, k1)`` of the local blocks."""

    q0: int
    q1: int
    k0: int
    k1: int
    kind: Kind
    shift: int = 0
    # Positions of the rows and keys: set for PARTIAL (to build the mask) and, for a backend that applies
    # ALiBi itself (``Capabilities.native_score_mods``), for every task of such a call.
    qseg: Segment | None = None
    kseg: Segment | None = None
    band: Band | None = None  # set for BAND


# ---- mask kinds: each declared once --------------------------------------------------------------------


@dataclass(frozen=True)
class MaskContext:
    """What a kind's check knows of the call: the real length ``seq_len``, the padded one ``total`` (every
    position the ranks hold together) and the batch. A decode call has no padding: both are unbounded."""

    seq_len: int
    total: int
    batch: int = 1


@dataclass(frozen=True)
class MaskKind:
    """One kind of mask, declared once (``register``): ``ringattn.Mask``, the calls' keywords, the checks of
    ``validate.make_spec`` and ``decode_attention``, and the cost model's ``Problem`` read it from ``KINDS``.

    ``name``: its ``Mask`` field (``Mask(name=value)``). ``check(value, MaskContext)``: the checked value, or a
    ``TypeError``/``ValueError`` naming the keyword; called for a value that is set (not None, not False).
    ``keyword``: the flat keyword of the calls (``cu_seqlens`` for ``documents``); a kind without one is
    reached through ``Mask(...)`` only, since the calls' signatures are static. ``spec_field``: the
    ``MaskSpec`` field the checked value fills; None for a kind whose checked value is a ``MaskTerm``
    (``MaskSpec.terms``). ``decode``: whether ``decode_attention`` takes it (a cache has no ``seq_len``).
    """

    name: str
    check: Callable[[Any, MaskContext], Any]
    keyword: str | None = None
    spec_field: str | None = None
    decode: bool = True

    @property
    def key(self) -> str:
        """Its name in the calls' keyword dictionaries: the flat keyword, else the ``Mask`` field."""
        return self.keyword or self.name


KINDS: dict[str, MaskKind] = {}


def register(kind: MaskKind) -> MaskKind:
    """Add a kind of mask: ``Mask(name=...)`` then takes it on every call (``ring_attention``, ``attention``,
    ``decode_attention``, ``cost_model.Problem``). Registering a name twice is an error."""
    if kind.name in KINDS or any(k.key == kind.key for k in KINDS.values()):
        raise ValueError(f"a mask kind named {kind.name!r} is registered already")
    if kind.spec_field is None and kind.keyword is not None:
        raise ValueError(f"mask kind {kind.name!r}: a flat keyword is for the built-in kinds (MaskSpec fields); "
                         "a new kind is reached through Mask(...)")
    KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a kind added by ``register`` (a test's, or a plugin's); the built-in kinds stay."""
    kind = KINDS.get(name)
    if kind is not None and kind.spec_field is None:
        del KINDS[name]


def is_set(value) -> bool:
    """Whether a mask keyword's value sets something (None and False leave it out)."""
    return value is not None and value is not False


def check_causal(causal, ctx: MaskContext | None = None) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return causal


def check_window(window, ctx: MaskContext | None = None) -> tuple[int, int] | None:
    """``(left, right)`` with ints >= -1 (-1 = unbounded); ``(-1, -1)`` is no window."""
    ok = (isinstance(window, (tuple, list)) and len(window) == 2
          and all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1 for w in window))
    if not ok:
        raise ValueError(f"window must be (left, right) with ints >= -1 (-1 = unbounded), got {window!r}")
    window = (int(window[0]), int(window[1]))
    return None if window == (-1, -1) else window


def check_seq_len(seq_len, ctx: MaskContext) -> int:
    """The real length, in ``[0, total]``."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral):
        raise TypeError(f"seq_len must be an int or None, got {type(seq_len).__name__}")
    seq_len = int(seq_len)
    if not 0 <= seq_len <= ctx.total:
        raise ValueError(f"seq_len must be in [0, world * local_len = {ctx.total}], got {seq_len}")
    return seq_len


def check_cu_seqlens(cu_seqlens, seq_len: int, batch: int) -> tuple[int, ...]:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an integer torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool or cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} with shape "
                         f"{tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"one cu_seqlens tensor is the documents of a batch of 1, got batch {batch}: pass a "
                         "list of one cu_seqlens per batch row")
    b = tuple(int(x) for x in cu_seqlens.tolist())
    if len(b) < 2 or b[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and hold at least one document, got {list(b)[:8]}")
    if any(y <= x for x, y in zip(b, b[1:])):
        raise ValueError("cu_seqlens must be strictly increasing (documents of length >= 1)")
    if b[-1] != seq_len:
        raise ValueError(f"cu_seqlens must end at the valid length seq_len = {seq_len}, got {b[-1]}")
    return b


def check_chunk_size(chunk_size, ctx: MaskContext | None = None) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return int(chunk_size)


def check_mask_mod(fn, seq_len: int | None = None) -> MaskMod | None:
    """A callable that maps broadcastable int64 position tensors to a bool tensor of their broadcast shape,
    probed at positions below ``seq_len`` only (a mask may index a table of ``seq_len`` entries)."""
    if fn is None:
        return None
    if not callable(fn):
        raise TypeError(f"mask_mod must be a callable fn(q_idx, kv_idx) -> bool tensor, got {type(fn).__name__}")
    if seq_len is not None and seq_len < 1:
        return MaskMod(fn)  # no position to ask about: it is never called
    top = 2 if seq_len is None else min(2, seq_len - 1)
    probe_q, probe_k = torch.arange(3).clamp(max=top)[:, None], torch.arange(2).clamp(max=top)[None, :]
    try:
        keep = fn(probe_q, probe_k)
    except Exception as e:  # noqa: BLE001 - reported as the user's function failing, whatever it raised
        raise ValueError(f"mask_mod raised on a probe (q_idx (3, 1), kv_idx (1, 2) int64): "
                         f"{type(e).__name__}: {e}") from e
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (3, 2):
        raise ValueError("mask_mod(q_idx, kv_idx) must return a bool tensor of the broadcast shape of its "
                         f"arguments; for (3, 1) and (1, 2) it returned "
                         f"{getattr(keep, 'dtype', type(keep).__name__)} {tuple(getattr(keep, 'shape', ()))}")
    return MaskMod(fn)


def check_slices(slices, total: int) -> tuple[Slice, ...] | None:
    """Attention slices ``(q_range, k_range, kind)`` on global positions in ``[0, total]``."""
    if slices is None:
        return None
    if isinstance(slices, (str, bytes)) or not hasattr(slices, "__iter__"):
        raise TypeError(f"slices must be a list of (q_range, k_range, kind), got {type(slices).__name__}")
    kinds = {k.value: k for k in SliceKind}
    out = []
    for n, item in enumerate(slices):
        try:
            (q0, q1), (k0, k1), kind = item
        except (TypeError, ValueError):
            raise ValueError(f"slices[{n}] must be ((q_start, q_end), (k_start, k_end), kind), got {item!r}") from None
        if isinstance(kind, SliceKind):
            kind = kind.value
        if kind not in kinds:
            raise ValueError(f"slices[{n}]: kind must be one of {sorted(kinds)}, got {kind!r}")
        ends = (q0, q1, k0, k1)
        if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in ends) \
                or not (0 <= q0 <= q1 <= total and 0 <= k0 <= k1 <= total):
            raise ValueError(f"slices[{n}]: ranges must be ints with 0 <= start <= end <= {total} (the padded "
                             f"global length), got q {(q0, q1)}, k {(k0, k1)}")
        out.append(Slice(int(q0), int(q1), int(k0), int(k1), kinds[kind]))
    return tuple(out)


# The built-in kinds, in the order their checks run. ``seq_len`` is the length the others are checked against.
for _kind in (
    MaskKind("seq_len", check_seq_len, "seq_len", "seq_len", decode=False),
    MaskKind("causal", check_causal, "causal", "causal"),
    MaskKind("window", check_window, "window", "window"),
    MaskKind("documents", lambda v, ctx: check_cu_seqlens(v, ctx.seq_len, ctx.batch), "cu_seqlens", "doc_bounds"),
    MaskKind("chunk_size", check_chunk_size, "chunk_size", "chunk"),
    MaskKind("mask_mod", lambda v, ctx: check_mask_mod(v, ctx.seq_len), "mask_mod", "mask_mod"),
    MaskKind("slices", lambda v, ctx: check_slices(v, ctx.total), "slices", "slices"),
):
    register(_kind)
del _kind


def spec_fields(mask: dict[str, Any], ctx: MaskContext, *, decode: bool = False) -> dict[str, Any]:
    """The ``MaskSpec`` fields of the mask keywords ``mask`` (by ``MaskKind.key``), each checked by its kind,
    ``seq_len`` excepted (the caller settles the length ``ctx`` carries). A key no kind has is a
    ``TypeError``; with ``decode``, a kind decoding does not take is one."""
    known = {kind.key: kind for kind in KINDS.values()}
    unknown = [key for key in mask if key not in known or (decode and not known[key].decode)]
    if unknown:
        raise TypeError(f"unknown mask kind {unknown[0]!r}: the kinds are {sorted(KINDS)} (ringattn.masks.register "
                        "adds one)")
    out: dict[str, Any] = {}
    terms = []
    for kind in KINDS.values():
        val = mask.get(kind.key)
        if kind.name == "seq_len" or not is_set(val):
            continue
        checked = kind.check(val, ctx)
        if kind.spec_field is None:
            if not isinstance(checked, MaskTerm):
                raise TypeError(f"mask kind {kind.name!r}: its check must return a ringattn.masks.MaskTerm, got "
                                f"{type(checked).__name__}")
            terms.append(checked)
        else:
            out[kind.spec_field] = checked
    if terms:
        out["terms"] = tuple(terms)
    return out
