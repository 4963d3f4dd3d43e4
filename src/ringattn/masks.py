"""Masks on global positions, and the classification of block pairs.

Every mask ringattn supports is a predicate on the global position ``i`` of a query and ``j`` of a key
(see ``docs/api.md``): keys at ``j >= seq_len`` are padding, ``causal`` keeps ``j <= i``,
``window=(left, right)`` keeps ``i - left <= j <= i + right`` (``-1`` = unbounded), ``cu_seqlens``
keeps pairs inside one document and ``chunk_size=c`` pairs inside one chunk (``i // c == j // c``).
A rank's tokens are a few arithmetic runs of positions (:class:`Segment`), so whether a block pair is
empty, fully visible, a (shifted) causal triangle or genuinely partial is decided from a handful of
integers, without building any mask (``tasks.py`` turns that into kernel calls); ``MaskSpec.visible`` is
the same mask as a vectorised predicate.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass

import torch


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
    chunk: int | None = None  # chunked attention (Llama 4): keys only in the query's chunk
    # Scores depend on positions (ALiBi): every visible pair is planned as a PARTIAL tile, which carries
    # its positions to the kernel. The visibility itself is unchanged.
    positional: bool = False

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
        if self.positional:
            return Pair(Kind.PARTIAL, k_len)
        if not (docs_cut or lo_cuts or hi_cuts):
            return Pair(Kind.FULL, k_len)
        if not docs_cut and not hi_cuts and qs.stride == ks.stride:
            # Only the lower bound cuts: i - j >= lo  <=>  j - i <= (qs.start - ks.start - lo) / stride.
            shift = (qs.start - ks.start - lo) // qs.stride
            if shift <= 0:
                return Pair(Kind.CAUSAL, k_len, shift)
        return Pair(Kind.PARTIAL, k_len)

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
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
        return keep.expand(torch.broadcast_shapes(q_pos.shape, k_pos.shape))


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
