"""Which global positions each rank holds: one ``LayoutRule`` per layout, registered by name.

``contiguous``: rank r holds ``[r*c, (r+1)*c)``. ``zigzag``: the padded sequence is cut into 2W chunks
and rank r holds chunks r and 2W-1-r, so every rank has the same causal work. ``striped``: rank r holds
``r, r+W, r+2W, ...`` (Striped Attention), balanced as well. ``balanced``: the same causal balance for
packed documents, where zigzag over the whole stream is not (a long document's work sits in its last
tokens): the sequence is cut into 2mW equal units (m <= BALANCE_UNITS) and each rank gets 2m of them,
chosen greedily, heaviest first, by the (query, key) pairs the kernels compute for their queries under
causal attention within documents (``balanced_units``). Which units those are follows from the document
boundaries alone, so ``shard``, ``unshard`` and the attention call all take ``cu_seqlens`` with it; without
documents it is refused (a shard and a call that disagreed on them would be silently wrong). Every rank
holds the same number of tokens, in increasing position order.

With a 2-D device mesh (``mesh=``, for the hybrid strategy) the layout applies to the *ring* dimension
of R ranks, each holding a block of ``U * local_len`` positions, and the U ranks of the *ulysses*
dimension split that block's rows contiguously in order (see ``hybrid_segments``). Mesh dimensions are
found by name (``mesh_dim_names`` containing "ring" and "ulysses"), else dim 0 is the ring and dim 1
the Ulysses dimension.

Queries fewer than the keys (``q_seq_len``) are the last positions of the key sequence; they follow
the same layout over their own rows, moved on by the offset of their first row (``query_segments``),
so a rank's query and key blocks differ in length and ``shard`` makes both.

Moving full tensors to shards and back (``shard``, ``unshard``, ``Sharding``) lives in ``ringattn.sharding``;
its names stay importable from here.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .masks import Segment
from .modes import Layout

LAYOUTS = tuple(str(m) for m in Layout)


@dataclass(frozen=True)
class Uneven:
    """A layout without padding: ``seq_len`` tokens split as evenly as ``base`` allows, so that ranks hold
    different numbers of them (``uneven_lengths``).

    Inside a call every rank's block is padded to the longest with rows at positions past ``seq_len``,
    which no query sees, numbered so that all the blocks together hold ``0 .. W * longest - 1`` once each;
    every strategy then runs on equal blocks, unchanged, and the padding rows are cut off again.
    """

    base: Layout
    seq_len: int

    def __str__(self) -> str:
        return f"{self.base}(uneven, seq_len={self.seq_len})"


def effective_layout(layout, world: int):
    """The layout a group of ``world`` ranks really has: on one rank every layout is contiguous."""
    if isinstance(layout, Uneven):
        return layout if world > 1 else Layout.CONTIGUOUS
    return Layout(layout) if world > 1 else Layout.CONTIGUOUS


Bounds = tuple[int, ...] | None  # document boundaries (cu_seqlens as ints), for the balanced layout
# cu_seqlens as callers pass it: one 1-D int tensor (or ints), or a list of them, one per batch row
CuSeqlens = torch.Tensor | Sequence[int] | Sequence[torch.Tensor] | None

BALANCED_NEEDS_DOCUMENTS = ("layout='balanced' places the tokens by the documents: pass the same cu_seqlens to shard, "
                            "unshard and the attention call (for one unpacked sequence use layout='zigzag')")

BALANCE_UNITS = 8  # at most 2 * BALANCE_UNITS units per rank in the balanced layout
MIN_UNIT = 16  # ... each of at least this many tokens where the length allows (a kernel call per unit pair)


class LayoutRule:
    """A layout: which global positions each rank holds, and every rule that follows from it. The one place
    a layout lives: the rest of the library asks ``layout_of(name)`` and never branches on a name.

    A subclass sets ``name`` (what users type: ``layout="zigzag"``) and ``positions``, and overrides what
    differs from the defaults; ``register(rule)`` adds it (and its member of ``ringattn.Layout``).
    ``in_halves``: a rank's block is two halves at different places (zigzag, balanced), so local lengths
    are even on more than one rank and ``shard`` pads to a multiple of 2W. ``needs_documents``: the
    documents (``cu_seqlens``) place the tokens (balanced), so a shard, the call and unshard take the same
    ones. ``strided``: a rank's positions are one strided run (striped). ``ordered``: rank order is position
    order on any number of ranks (contiguous). ``takes_uneven``: ``shard(..., uneven=True)`` splits it
    without padding (``uneven_positions``).
    """

    name: str = ""
    in_halves: bool = False
    needs_documents: bool = False
    strided: bool = False
    ordered: bool = False
    takes_uneven: bool = False

    @property
    def layout(self) -> Layout | Uneven:
        return Layout(self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # -- what a layout defines ------------------------------------------------------------------------

    def positions(self, rank: int, world: int, local_len: int, bounds: Bounds) -> tuple[Segment, ...]:
        """The global positions of rank ``rank``'s ``local_len`` tokens (``world > 1``), in local order;
        ``bounds``: the documents, for a layout that ``needs_documents``."""
        raise NotImplementedError

    def pad_multiple(self, world: int, seq_len: int = 1) -> int:
        """The multiple ``shard`` pads a ``seq_len``-token sequence to: W, 2W for layouts in halves."""
        return 2 * world if self.in_halves else world

    def uneven_positions(self, seq_len: int, rank: int, world: int) -> tuple[Segment, ...]:
        """A rank's real tokens when ``seq_len`` is split without padding (``takes_uneven`` layouts)."""
        takers = [repr(r.name) for r in RULES.values() if r.takes_uneven]
        names = ", ".join(takers[:-1]) + f" or {takers[-1]}" if len(takers) > 1 else "".join(takers)
        raise ValueError(f"uneven shards take layout {names}, got {self.name!r}{self.uneven_hint}")

    uneven_hint = ""  # what an uneven split of this layout should be instead, for its error

    def check_query_offset(self, offset: int, bounds: Bounds) -> None:
        """Whether queries fewer than the keys (moved on by ``offset``) can follow this layout."""

    # -- what follows from it -------------------------------------------------------------------------

    def segments(self, rank: int, world: int, local_len: int, bounds: Bounds = None) -> tuple[Segment, ...]:
        """The global positions of a rank's ``local_len`` tokens, in local order (one rank: all of them)."""
        if world == 1:
            return (Segment(rank * local_len, local_len),)
        self.check_local_len(world, local_len, "local length")
        # Placed by the documents: without them a shard and a call could silently disagree.
        self.check_documents(world, bounds)
        return self.positions(rank, world, local_len, bounds)

    def in_order(self, world: int) -> bool:
        return world == 1 or self.ordered

    def check_local_len(self, world: int, local_len: int, what: str = "local_len") -> None:
        """The even-length rule of layouts in halves: a ``ValueError`` naming the layout and ``what``."""
        if self.in_halves and world > 1 and local_len % 2:
            raise ValueError(f"layout={self.name!r} needs an even {what}, got {local_len} "
                             "(ringattn.shard pads to a multiple of 2 * world)")

    def padded_len(self, seq_len: int, world: int) -> int:
        """The length ``shard`` pads ``seq_len`` to."""
        m = self.pad_multiple(world, seq_len)
        return -(-seq_len // m) * m

    def check_documents(self, world: int, documents) -> None:
        """A layout placed by documents, on more than one rank, takes them (``BALANCED_NEEDS_DOCUMENTS``)."""
        if self.needs_documents and world > 1 and documents is None:
            raise ValueError(BALANCED_NEEDS_DOCUMENTS)

    def uneven_lengths(self, seq_len: int, world: int) -> tuple[int, ...]:
        """Each rank's number of tokens when ``seq_len`` is split without padding."""
        return tuple(sum(s.length for s in self.uneven_positions(seq_len, r, world)) for r in range(world))

    def rank_order(self, world: int, local_len: int, device=None, bounds: Bounds = None) -> torch.Tensor | None:
        """The global position of each row of every rank's block, in rank order (what a gather or an
        all-to-all over the sequence holds); None where that is ``0, 1, 2, ...``."""
        if self.in_order(world):
            return None
        return torch.cat([torch.cat([s.positions(device) for s in self.segments(r, world, local_len, bounds)])
                          for r in range(world)])


def _even_split(n: int, parts: int) -> list[int]:
    """``n`` split into ``parts`` as evenly as possible, the first ``n % parts`` one longer."""
    return [n // parts + (i < n % parts) for i in range(parts)]


class Contiguous(LayoutRule):
    """Rank r holds ``[r*c, (r+1)*c)``."""

    name, ordered, takes_uneven = "contiguous", True, True

    def positions(self, rank, world, local_len, bounds):
        return (Segment(rank * local_len, local_len),)

    def uneven_positions(self, seq_len, rank, world):
        lens = _even_split(seq_len, world)
        return (Segment(sum(lens[:rank]), lens[rank]),)


class Zigzag(LayoutRule):
    """The padded sequence cut into 2W chunks; rank r holds chunks r and 2W-1-r (equal causal work)."""

    name, in_halves, takes_uneven = "zigzag", True, True

    def positions(self, rank, world, local_len, bounds):
        h = local_len // 2
        return (Segment(rank * h, h), Segment((2 * world - 1 - rank) * h, h))

    def uneven_positions(self, seq_len, rank, world):
        sizes = _even_split(seq_len, 2 * world)
        starts = [sum(sizes[:i]) for i in range(2 * world)]
        return tuple(Segment(starts[i], sizes[i]) for i in (rank, 2 * world - 1 - rank))


class Striped(LayoutRule):
    """Rank r holds ``r, r+W, r+2W, ...`` (Striped Attention)."""

    name, strided, takes_uneven = "striped", True, True

    def positions(self, rank, world, local_len, bounds):
        return (Segment(rank, local_len, world),)

    def uneven_positions(self, seq_len, rank, world):
        return (Segment(rank, _even_split(seq_len, world)[rank], world),)


class Balanced(LayoutRule):
    """Zigzag's causal balance for packed documents: 2mW units, assigned greedily by their work
    (``balanced_units``)."""

    name, in_halves, needs_documents = "balanced", True, True
    uneven_hint = " (the balanced layout pads: pass seq_len instead)"

    def positions(self, rank, world, local_len, bounds):
        return balanced_units(bounds, world, local_len)[rank]

    def pad_multiple(self, world: int, seq_len: int = 1) -> int:
        if world == 1:
            return 1
        return 2 * world * next((u for u in (BALANCE_UNITS, 4, 2) if seq_len >= 2 * world * u * MIN_UNIT), 1)

    def check_query_offset(self, offset, bounds):
        if offset and bounds is not None:
            raise ValueError("layout='balanced' with documents takes as many queries as keys (q_seq_len = seq_len); "
                             "use layout='zigzag' for fewer queries")


class UnevenRule(LayoutRule):
    """The rules of an uneven split of a layout (``Uneven``): its base's positions without padding, every
    rank's block padded to the longest with rows past ``seq_len``."""

    def __init__(self, uneven: Uneven):
        self.uneven, self.base = uneven, layout_of(uneven.base)
        self.name, self.strided = self.base.name, self.base.strided

    @property
    def layout(self) -> Uneven:
        return self.uneven

    def segments(self, rank, world, local_len=0, bounds=None):
        return uneven_segments(self.uneven, rank, world)


RULES: dict[str, LayoutRule] = {}


def register(rule: LayoutRule) -> LayoutRule:
    """Add a layout: ``layout=rule.name`` then works on every call, ``shard`` and ``unshard``, and
    ``ringattn.Layout`` gains its member. A name taken already is an error."""
    if not rule.name or rule.name in RULES:
        raise ValueError(f"a layout needs a new name, got {rule.name!r} (taken: {tuple(RULES)})")
    RULES[rule.name] = rule
    Layout.add(rule.name)
    return rule


def unregister(name: str) -> None:
    """Remove a layout added by ``register`` (a test's, or a plugin's); the built-in layouts stay."""
    if name in RULES and name not in LAYOUTS:
        del RULES[name]
        Layout.remove(name)


for _rule in (Contiguous(), Zigzag(), Striped(), Balanced()):
    register(_rule)
assert tuple(RULES) == LAYOUTS, "every member of modes.Layout has its rule here"


def layout_of(layout: Layout | Uneven | str) -> LayoutRule:
    """The rules of ``layout`` (a name, a ``ringattn.Layout`` or an uneven layout); a ``ValueError`` naming
    the choices for an unknown name."""
    if isinstance(layout, Uneven):
        return UnevenRule(layout)
    check_layout(layout)
    return RULES[str(layout)]


def check_layout(layout: str) -> None:
    if isinstance(layout, Uneven):
        return
    if not isinstance(layout, str) or str(layout) not in RULES:
        raise ValueError(f"layout must be one of {tuple(RULES)}, got {layout!r}")


def uneven_lengths(seq_len: int, world: int, layout: str) -> tuple[int, ...]:
    """Each rank's number of tokens when ``seq_len`` is split without padding (``shard(..., uneven=True)``):
    contiguous and striped as evenly as possible (the first ``seq_len % W`` ranks one more), zigzag from 2W
    chunks split that way (rank r holds chunks r and 2W-1-r)."""
    return layout_of(layout).uneven_lengths(seq_len, world)


def uneven_segments(layout: Uneven, rank: int, world: int, with_padding: bool = True) -> tuple[Segment, ...]:
    """A rank's positions in an uneven layout: its real tokens, then (``with_padding``) its padding rows up
    to the longest rank's length, at positions past ``seq_len`` (see ``Uneven``)."""
    n, rule = layout.seq_len, layout_of(layout.base)
    lens = rule.uneven_lengths(n, world)
    real = list(rule.uneven_positions(n, rank, world))
    longest = max(lens)
    if with_padding:
        real.append(Segment(n + sum(longest - x for x in lens[:rank]), longest - lens[rank]))
    return tuple(s for s in real if s.length > 0)


def segments(layout: str, rank: int, world: int, local_len: int, bounds: Bounds = None) -> tuple[Segment, ...]:
    """The global positions of a rank's ``local_len`` tokens, in local order (``bounds``: the documents,
    which only the balanced layout reads)."""
    return layout_of(layout).segments(rank, world, local_len, bounds)


def units_per_rank(local_len: int) -> int:
    """2m: the most units (m <= BALANCE_UNITS) of at least MIN_UNIT tokens that ``local_len`` splits into
    evenly, else 2."""
    return next((2 * m for m in (BALANCE_UNITS, 4, 2) if local_len % (2 * m) == 0 and local_len // (2 * m) >= MIN_UNIT),
                2)


def unit_work(bounds: tuple[int, ...], a: int, b: int) -> int:
    """The (query, key) pairs the kernels compute for queries ``[a, b)`` under causal attention within
    documents, as the planner cuts them: visible pairs, plus the masked part of dense tiles over
    documents too short for a kernel call each (padding past ``bounds[-1]``: none)."""
    from .masks import MaskSpec
    from .tasks import block_tasks, task_flops

    b = min(b, bounds[-1])
    if a >= b:
        return 0
    first = bounds[bisect.bisect_right(bounds, a) - 1]  # keys before the first query's document: unseen
    spec = MaskSpec(bounds[-1], causal=True, doc_bounds=bounds)
    tasks = block_tasks(spec, (Segment(a, b - a),), (Segment(first, b - first),))
    return int(sum(task_flops(t, 1, 1, 1, 0) for t in tasks) // 2)


@functools.lru_cache(maxsize=64)
def balanced_units(bounds: tuple[int, ...], world: int, local_len: int) -> tuple[tuple[Segment, ...], ...]:
    """Every rank's segments in the balanced layout: units assigned heaviest first to the least-loaded rank
    that still has room (longest-processing-time with equal counts). Integer loads and ties broken by rank
    make it the same on every rank. One document is the zigzag pairing, cut finer."""
    per = units_per_rank(local_len)
    u = local_len // per
    work = [unit_work(bounds, t * u, (t + 1) * u) for t in range(per * world)]
    load, held = [0] * world, [[] for _ in range(world)]
    for t in sorted(range(len(work)), key=lambda t: (-work[t], t)):
        r = min((r for r in range(world) if len(held[r]) < per), key=lambda r: (load[r], r))
        load[r] += work[t]
        held[r].append(t)
    out = []
    for units in held:
        runs: list[list[int]] = []
        for t in sorted(units):  # adjacent units make one segment
            if runs and runs[-1][1] == t * u:
                runs[-1][1] += u
            else:
                runs.append([t * u, (t + 1) * u])
        out.append(tuple(Segment(a, b - a) for a, b in runs))
    return tuple(out)


def query_segments(layout: str, rank: int, world: int, local_len: int, offset: int = 0,
                   bounds: Bounds = None) -> tuple[Segment, ...]:
    """The global positions of a rank's ``local_len`` queries: the layout of the query rows, moved on by
    ``offset``, the position of query row 0 (the queries are the last rows of the key sequence)."""
    layout_of(layout).check_query_offset(offset, bounds)
    return tuple(Segment(s.start + offset, s.length, s.stride)
                 for s in segments(layout, rank, world, local_len, bounds))


def mesh_dims(mesh) -> tuple[int | str, int | str]:
    """(ring dim, ulysses dim) of a 2-D DeviceMesh: by name if named "ring"/"ulysses", else (0, 1)."""
    if getattr(mesh, "ndim", None) != 2 or not hasattr(mesh, "get_group"):
        raise ValueError(f"mesh must be a 2-D torch.distributed.device_mesh.DeviceMesh, got {mesh!r}")
    names = mesh.mesh_dim_names or ()
    if "ring" in names and "ulysses" in names:
        return "ring", "ulysses"
    return 0, 1


def mesh_coords(mesh) -> tuple[int, int, int, int]:
    """(ring rank, ring size, ulysses rank, ulysses size) of this process in a 2-D mesh."""
    rd, ud = mesh_dims(mesh)
    sizes = dict(zip(mesh.mesh_dim_names or (0, 1), mesh.mesh.shape))
    ring_world = sizes[rd] if isinstance(rd, str) else mesh.mesh.shape[rd]
    uly_world = sizes[ud] if isinstance(ud, str) else mesh.mesh.shape[ud]
    return mesh.get_local_rank(rd), int(ring_world), mesh.get_local_rank(ud), int(uly_world)


def hybrid_segments(layout: str, ring_rank: int, ring_world: int, uly_rank: int, uly_world: int,
                    local_len: int, bounds: Bounds = None) -> tuple[Segment, ...]:
    """Positions of one mesh rank: rows ``[u*c, (u+1)*c)`` of ring block ``ring_rank`` (of U*c rows)."""
    lo, hi = uly_rank * local_len, (uly_rank + 1) * local_len
    out, row = [], 0
    for s in segments(layout, ring_rank, ring_world, uly_world * local_len, bounds):
        a, b = max(lo, row), min(hi, row + s.length)
        if a < b:
            out.append(s.sub(a - row, b - row))
        row += s.length
    return tuple(out)


def mesh_positions(layout: str, mesh, local_len: int, device: torch.device | str | None = None,
                   bounds: Bounds = None) -> torch.Tensor:
    """Global position of each local token of this process under ``mesh`` (hybrid strategy)."""
    segs = hybrid_segments(layout, *mesh_coords(mesh), local_len, bounds)
    return torch.cat([s.positions(device) for s in segs])


def global_positions(layout: str, rank: int, world: int, local_len: int,
                     device: torch.device | str | None = None, cu_seqlens: CuSeqlens = None) -> torch.Tensor:
    """Global position of each local token (e.g. for rotary embeddings or position_ids); the balanced
    layout needs the documents' ``cu_seqlens`` (a 1-D tensor or sequence of ints)."""
    segs = segments(layout, rank, world, local_len, as_bounds(cu_seqlens))
    return torch.cat([s.positions(device) for s in segs])


def as_bounds(cu_seqlens: torch.Tensor | Sequence[int] | None) -> Bounds:
    """``cu_seqlens`` as a tuple of ints (None stays None)."""
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, torch.Tensor):
        return tuple(int(x) for x in cu_seqlens.tolist())
    return tuple(int(x) for x in cu_seqlens)


def padded_len(seq_len: int, world: int, layout: str) -> int:
    """The length ``shard`` pads to: a multiple of W, of 2W for zigzag, and for balanced of 2mW with units
    of at least MIN_UNIT tokens (m up to BALANCE_UNITS)."""
    return layout_of(layout).padded_len(seq_len, world)


def pad_multiple(seq_len: int, world: int, layout: str) -> int:
    """What ``padded_len`` pads to a multiple of."""
    return layout_of(layout).pad_multiple(world, seq_len)


def cut_at(keys: Segment, qsegs: tuple[Segment, ...]) -> tuple[Segment, ...]:
    """A stride-1 key run cut where this rank's (stride-1) query runs start and end.

    Then every (query run, key piece) pair is empty, full or an aligned causal square, instead of a
    wide pair the kernels can only do tile by tile with dense masks.
    """
    cuts = sorted({keys.start, keys.start + keys.length}
                  | {p for q in qsegs for p in (q.start, q.start + q.length)
                     if keys.start < p < keys.start + keys.length})
    return tuple(Segment(a, b - a) for a, b in zip(cuts, cuts[1:]))


def kv_replication(kv_heads: int, ranks: int) -> int:
    """How many copies of each K/V head a head split over ``ranks`` needs.

    Query heads are split into ``ranks`` contiguous groups. With ``kv_heads`` a multiple of ``ranks``
    the K/V heads split the same way; otherwise each K/V head is repeated ``f = ranks / gcd`` times
    (``kv_heads * f = lcm(kv_heads, ranks)``, which divides ``heads``), so that every rank's query heads
    find their K/V heads locally and the contiguous GQA grouping is kept.
    """
    return ranks // math.gcd(kv_heads, ranks)
