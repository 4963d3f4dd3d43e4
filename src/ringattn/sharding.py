"""Moving full tensors to shards and back, and what a shard remembers of how it was cut.

``shard`` gives a rank its positions of a full tensor in a layout (``ringattn.layouts``), padded as the
layout's rule says; ``unshard`` gathers them back in global order (differentiably). Each shard, and each
attention call's output, remembers its ``Sharding`` (``sharding_of``): the call and ``unshard`` take their
layout, length and documents from it and refuse an argument that contradicts it.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

from .comm import gather_op, group_rank_world
from .layouts import (
    Bounds,
    CuSeqlens,
    Uneven,
    as_bounds,
    check_layout,
    global_positions,
    hybrid_segments,
    layout_of,
    mesh_coords,
    mesh_dims,
    mesh_positions,
    padded_len,
    uneven_lengths,
    uneven_segments,
)
from .modes import Layout


def _pad(x: torch.Tensor, dim: int, total: int) -> torch.Tensor:
    if total == x.shape[dim]:
        return x
    pad = list(x.shape)
    pad[dim] = total - x.shape[dim]
    return torch.cat([x, x.new_zeros(pad)], dim=dim)


def _row_bounds(cu_seqlens, batch: int, n: int, what: str) -> list[Bounds] | None:
    """The documents of ``cu_seqlens`` (one tensor for batch 1, or one per row), checked to end at ``n`` at most
    (the rest is padding): one entry per row, or a single entry when every row has the same (it then
    applies to all); None without documents."""
    if cu_seqlens is None:
        return None
    rows = list(cu_seqlens) if isinstance(cu_seqlens, (list, tuple)) else [cu_seqlens]
    if len(rows) != batch:
        raise ValueError(f"{what}: cu_seqlens must hold one tensor per batch row ({batch}), got {len(rows)}")
    out = []
    for b in rows:
        bounds = as_bounds(b)
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] > n or any(y <= x for x, y in zip(bounds, bounds[1:])):
            raise ValueError(f"{what}: cu_seqlens must rise strictly from 0 to at most the length {n}, got "
                             f"{list(bounds)[:8]}{' ...' if len(bounds) > 8 else ''}")
        out.append(bounds)
    return out[:1] if len(set(out)) == 1 else out


def _by_row(x: torch.Tensor, dim: int, rows: list[Bounds] | None, index) -> torch.Tensor:
    """``x`` indexed along ``dim`` by ``index(bounds)``, row by row when the rows' documents differ."""
    if rows is None or len(rows) == 1:
        return x.index_select(dim, index(None if rows is None else rows[0]))
    if dim == 0:
        raise ValueError("per-row cu_seqlens need the batch in dim 0 and the sequence in another dim")
    return torch.stack([x[b].index_select(dim - 1, index(r)) for b, r in enumerate(rows)])


def check_distributed(what: str = "") -> None:
    """Refuse to work as a single process where the environment says this is one of several (torchrun sets
    ``WORLD_SIZE``) but ``torch.distributed`` is not initialised: each process would take itself for the
    whole group and shard, attend and unshard on its own, a wrong number on every rank without an error."""
    if dist.is_available() and dist.is_initialized():
        return
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return
    if world > 1:
        raise RuntimeError(f"ringattn{'.' + what if what else ''}: torch.distributed is not initialised but "
                           f"WORLD_SIZE={world}: call dist.init_process_group(...) first (or "
                           f"ringattn.launch.init_from_env()); without it each of the {world} processes takes "
                           "itself for the whole group and attends over its own part alone")


@dataclass(frozen=True)
class Sharding:
    """What ``shard`` did to a tensor; the tensor remembers it (``sharding_of``), and so does the output (and
    lse) of an attention call. The call and ``unshard`` take their defaults from it and refuse an argument
    that contradicts it.

    ``seq_len``: the real length (what was sharded, before padding; for a call's output its real queries);
    ``dim``: the sequence dimension; ``documents``: the balanced layout's document boundaries, one tuple per
    batch row or a single one for every row (None for the other layouts); ``place``: this process's (rank,
    world) in ``group``, or (ring rank, ring size, ulysses rank, ulysses size) in ``mesh`` (None: not
    checked, for one made by hand).
    """

    layout: str
    seq_len: int
    dim: int = 1
    uneven: bool = False
    documents: tuple[tuple[int, ...], ...] | None = None
    place: tuple[int, ...] | None = None
    group: object = dataclasses.field(default=None, compare=False, repr=False)
    mesh: object = dataclasses.field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        """The sharding as the arguments that make it, for messages."""
        text = f"layout={str(self.layout)!r}, seq_len={self.seq_len}"
        if self.uneven:
            text += ", uneven=True"
        if self.documents is not None:
            text += f", cu_seqlens={documents_text(self.documents)}"
        if self.dim != 1:
            text += f", dim={self.dim}"
        if self.place is None:
            return text
        where = "mesh (ring rank, ring size, ulysses rank, ulysses size)" if self.mesh is not None else "group"
        return text + f", {where} {self.place}"

    @property
    def cu_seqlens(self) -> torch.Tensor | list[torch.Tensor] | None:
        """The documents as ``shard`` and ``unshard`` take them: one tensor, or a list of one per row."""
        if self.documents is None:
            return None
        rows = [torch.tensor(b, dtype=torch.int64) for b in self.documents]
        return rows[0] if len(rows) == 1 else rows

    def unshard(self, x: torch.Tensor, *, dim: int | None = None) -> torch.Tensor:
        """``unshard`` with this sharding's arguments, for a tensor that does not remember it (a copy, a
        ``detach()``, a gradient); ``dim`` if its sequence is elsewhere."""
        return unshard(x, group=self.group, layout=self.layout, dim=self.dim if dim is None else dim,
                       seq_len=self.seq_len, mesh=self.mesh, cu_seqlens=self.cu_seqlens, uneven=self.uneven)


def documents_text(documents: tuple[tuple[int, ...], ...]) -> str:
    rows = [f"[{', '.join(map(str, b[:6]))}{', ...' if len(b) > 6 else ''}]" for b in documents[:3]]
    return rows[0] if len(documents) == 1 else f"[{', '.join(rows)}{', ...' if len(documents) > 3 else ''}]"


def document_rows(cu_seqlens) -> tuple[tuple[int, ...], ...] | None:
    """``cu_seqlens`` (one tensor or a list of one per row) as bounds per row, a single entry when every
    row has the same; None without documents (or when they are not integers: validation names that)."""
    if cu_seqlens is None:
        return None
    rows = list(cu_seqlens) if isinstance(cu_seqlens, (list, tuple)) else [cu_seqlens]
    try:
        out = tuple(as_bounds(r) for r in rows)
    except (TypeError, ValueError, RuntimeError):
        return None
    return out[:1] if len(set(out)) == 1 else out


# What each tensor made by shard (or output by a call) remembers; weak, so a tensor's entry goes with it.
_REMEMBERED = WeakIdKeyDictionary()


def remember(x: torch.Tensor, sharding: Sharding) -> torch.Tensor:
    """Record on ``x`` (the same object, returned) how it is sharded."""
    _REMEMBERED[x] = sharding
    return x


def sharding_of(x) -> Sharding | None:
    """How ``x`` is sharded, if it remembers: a result of ``shard``, an attention call's output or lse, or a
    view of one (``.view`` splitting the heads, a transpose, a slice of the batch or heads), whose sequence
    dimension is then the one of the same size and stride. None for anything else: copies (``.to``,
    ``.contiguous()`` of a transpose, ``.clone()``), ``detach()``, results of arithmetic, gradients."""
    if not isinstance(x, torch.Tensor):
        return None
    s = _REMEMBERED.get(x)
    base = x._base
    if s is not None or base is None:
        return s
    s = _REMEMBERED.get(base)
    if s is None or s.dim >= base.dim():
        return None
    size, stride = base.shape[s.dim], base.stride(s.dim)
    same = [d for d in range(x.dim()) if x.shape[d] == size and x.stride(d) == stride]
    if not same:
        return None
    return dataclasses.replace(s, dim=s.dim if s.dim in same else same[0])


def settle(name: str, given, remembered, whose: str, who: str):
    """``given`` where it agrees with what the tensors remember, ``remembered`` where nothing was given;
    a ``ValueError`` naming both where they differ (a shard and a call that disagree give wrong numbers)."""
    if given is None:
        return remembered
    if given == remembered:
        return given
    show = (lambda v: repr(str(v))) if name == "layout" else repr
    raise ValueError(f"{who}: {name}={show(given)} was passed, but {whose} ringattn.shard with "
                     f"{name}={show(remembered)}: leave {name} out (what the shards remember is used) or pass "
                     "the same")


def settle_len(name: str, given, remembered: int, whose: str, who: str):
    """A length: at most the remembered one (a smaller one marks more of the end as the caller's own
    padding); past it would take ``shard``'s padding rows for tokens."""
    if given is None:
        return remembered
    if isinstance(given, bool) or not isinstance(given, numbers.Integral):
        return given  # not a length: validation names it
    if int(given) > remembered:
        raise ValueError(f"{who}: {name}={int(given)} was passed, but {whose} ringattn.shard of {remembered} "
                         f"tokens (the rows past {remembered} are the padding shard added): leave {name} out "
                         "(what the shards remember is used) or pass at most that")
    return given


def place_of(group=None, mesh=None) -> tuple[int, ...]:
    """This process's place in ``group`` (rank, world), or in ``mesh`` (``mesh_coords``)."""
    return mesh_coords(mesh) if mesh is not None else group_rank_world(group)


def shard(x: torch.Tensor, *, group=None, layout: str = "contiguous", dim: int = 1, mesh=None,
          cu_seqlens: CuSeqlens = None, uneven: bool = False) -> torch.Tensor:
    """This rank's part of a full tensor (same on every rank), zero-padded along ``dim`` first up to a
    multiple of W (2W for zigzag; see ``padded_len``). With ``mesh`` (a 2-D DeviceMesh, hybrid strategy) W
    is the mesh size and positions follow ``hybrid_segments``. ``cu_seqlens`` (the documents, one 1-D
    tensor, or a list of one per batch row in dim 0) places the balanced layout's tokens; other layouts
    ignore it. ``uneven=True``: no padding, each rank gets its share of ``uneven_lengths`` (the call then
    takes ``uneven=True`` and ``seq_len``).

    The result remembers how it was made (``sharding_of``, a ``Sharding``): an attention call on it and
    ``unshard`` take their layout, length and documents from it, and refuse ones that differ."""
    check_distributed("shard")
    check_layout(layout)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim = dim % x.dim()
    n = x.shape[dim]

    def made(part: torch.Tensor, rows=None) -> torch.Tensor:
        docs = tuple(rows) if rows is not None and layout_of(layout).needs_documents else None
        return remember(part, Sharding(str(Layout(layout)), n, dim, bool(uneven), docs, place_of(group, mesh), group,
                                       mesh))

    if uneven:
        if mesh is not None:
            raise ValueError("uneven=True is not supported with a mesh (the hybrid strategy); pad instead")
        rank, world = group_rank_world(group)
        segs = uneven_segments(Uneven(Layout(layout), n), rank, world, with_padding=False)
        idx = torch.cat([s.positions(x.device) for s in segs]) if segs else torch.zeros(0, dtype=torch.long)
        return made(x.index_select(dim, idx.to(x.device)))
    rows = _row_bounds(cu_seqlens, x.shape[0] if isinstance(cu_seqlens, (list, tuple)) else 1, n, "shard")
    # One tensor: the same documents in every row.
    if mesh is not None:
        rr, rw, ur, uw = mesh_coords(mesh)
        total = padded_len(n, rw * uw, layout)
        x = _pad(x, dim, total)
        return made(_by_row(x, dim, rows, lambda b: mesh_positions(layout, mesh, total // (rw * uw), x.device, b)),
                    rows)
    rank, world = group_rank_world(group)
    total = padded_len(n, world, layout)
    x = _pad(x, dim, total)
    return made(_by_row(x, dim, rows, lambda b: global_positions(layout, rank, world, total // world, x.device, b)),
                rows)


def _rank_order(layout: str, world: int, c: int, device, bounds: Bounds, mesh=None) -> torch.Tensor:
    """Global position of each row of the gathered shards, in rank order."""
    if mesh is None:
        return torch.cat([global_positions(layout, r, world, c, device, bounds) for r in range(world)])
    _, rw, _, uw = mesh_coords(mesh)
    return torch.cat([s.positions(device) for r in range(rw) for u in range(uw)
                      for s in hybrid_segments(layout, r, rw, u, uw, c, bounds)])


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, layout, dim, seq_len, mesh=None, rows=None):
        c = x.shape[dim]
        moved = x.movedim(dim, 0).contiguous()
        if mesh is None:
            rank, world = group_rank_world(group)
            ctx.info = (rank, world, layout, dim, c, rows)
            gathered = _gather(moved, group, world)
        else:
            rr, rw, ur, uw = mesh_coords(mesh)
            world = rw * uw
            ctx.info = (None, world, layout, dim, c, rows)
            ctx.mesh = mesh
            rd, ud = mesh_dims(mesh)
            # Ulysses dim first (a ring block in row order), then the ring blocks: (ring, ulysses) order.
            gathered = _gather(_gather(moved, mesh.get_group(ud), uw), mesh.get_group(rd), rw)
        full = torch.empty_like(gathered)
        if rows is None or len(rows) == 1:
            full[_rank_order(layout, world, c, x.device, rows and rows[0], mesh)] = gathered
        else:  # the batch is dim 1 of the moved tensor
            for b, bounds in enumerate(rows):
                full[:, b][_rank_order(layout, world, c, x.device, bounds, mesh)] = gathered[:, b]
        return full[:seq_len].movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        # Every rank holds the same full tensor and (by contract) the same loss on it: the gradient
        # of a shard is the matching slice of the full gradient, no communication needed.
        rank, world, layout, dim, c, rows = ctx.info
        g = grad.movedim(dim, 0)
        if g.shape[0] < world * c:
            g = torch.cat([g, g.new_zeros((world * c - g.shape[0], *g.shape[1:]))])

        def own(bounds):
            if rank is None:
                return mesh_positions(layout, ctx.mesh, c, grad.device, bounds)
            return global_positions(layout, rank, world, c, grad.device, bounds)

        if rows is None or len(rows) == 1:
            out = g.index_select(0, own(rows and rows[0]))
        else:
            out = torch.stack([g[:, b].index_select(0, own(bounds)) for b, bounds in enumerate(rows)], 1)
        return out.movedim(0, dim), None, None, None, None, None, None


def _gather(moved: torch.Tensor, group, world: int) -> torch.Tensor:
    if world == 1:
        return moved
    gathered = moved.new_empty((world * moved.shape[0], *moved.shape[1:]))
    gather_op()(gathered, moved, group=group)
    return gathered


def unshard(x: torch.Tensor, *, group=None, layout: str | None = None, dim: int | None = None,
            seq_len: int | None = None, mesh=None, cu_seqlens: CuSeqlens = None,
            uneven: bool | None = None) -> torch.Tensor:
    """The full tensor on every rank, in global order, cut to ``seq_len``; differentiable.

    Arguments left out (None) are what ``x`` remembers (``sharding_of``: a result of ``shard``, an attention
    call's output or lse), else ``layout="contiguous"``, ``dim=1``, ``seq_len`` = every row, ``uneven=False``;
    one that contradicts what ``x`` remembers is an error. With ``mesh`` (the 2-D DeviceMesh of the hybrid
    strategy) the inverse of ``shard(..., mesh=mesh)``; ``cu_seqlens`` as given to ``shard`` (ending at
    ``seq_len``); ``uneven=True`` (with ``seq_len``) undoes ``shard(..., uneven=True)``.

    Backward assumes every rank computes the same loss from the full tensor (the usual pattern): each
    rank's shard receives its slice of that gradient.
    """
    check_distributed("unshard")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    s = sharding_of(x)
    if s is not None:
        whose, who = "x was sharded by", "unshard"
        layout = settle("layout", layout, s.layout, whose, who)
        dim = settle("dim", None if dim is None else dim % x.dim(), s.dim, whose, who)
        uneven = settle("uneven", uneven, s.uneven, whose, who)
        seq_len = settle_len("seq_len", seq_len, s.seq_len, whose, who)
        if group is None and mesh is None:
            group, mesh = s.group, s.mesh
        elif s.place is not None and place_of(group, mesh) != s.place:
            raise ValueError(f"unshard: x was sharded over a group where this process is {s.place} (rank, world), "
                             f"but the group or mesh passed here makes it {place_of(group, mesh)}: leave group / "
                             "mesh out (what the shard remembers is used) or pass the same")
        if s.documents is not None:
            if cu_seqlens is None:
                cu_seqlens = s.cu_seqlens
            elif document_rows(cu_seqlens) != s.documents:
                raise ValueError(f"unshard: x was sharded by ringattn.shard with the documents cu_seqlens="
                                 f"{documents_text(s.documents)}, not the ones passed here: leave cu_seqlens out "
                                 "(what the shard remembers is used) or pass the same")
    layout = "contiguous" if layout is None else str(layout) if isinstance(layout, Layout) else layout
    dim = 1 if dim is None else dim
    check_layout(layout)
    if mesh is not None:
        _, rw, _, uw = mesh_coords(mesh)
        world = rw * uw
    else:
        _, world = group_rank_world(group)
    dim = dim % x.dim()
    if uneven:
        return _unshard_uneven(x, group, Layout(layout), dim, seq_len, mesh)
    total = world * x.shape[dim]
    seq_len = total if seq_len is None else seq_len
    if not 0 <= seq_len <= total:
        raise ValueError(f"seq_len must be in [0, {total}] (world * local length), got {seq_len}")
    layout_of(layout).check_local_len(world, x.shape[dim], "local length")
    rows = _row_bounds(cu_seqlens, x.shape[0] if isinstance(cu_seqlens, (list, tuple)) else 1, seq_len, "unshard")
    if rows is not None and len(rows) > 1 and dim == 0:
        raise ValueError("per-row cu_seqlens need the batch in dim 0 and the sequence in another dim")
    # The rank order of a balanced layout is the same for the padded stream: padding is a zero-work tail.
    return _Unshard.apply(x, group, layout, dim, seq_len, mesh, None if rows is None else tuple(rows))


def _unshard_uneven(x: torch.Tensor, group, layout: Layout, dim: int, seq_len, mesh) -> torch.Tensor:
    if mesh is not None:
        raise ValueError("uneven=True is not supported with a mesh (the hybrid strategy); pad instead")
    if seq_len is None:
        raise ValueError("unshard(..., uneven=True) needs seq_len, the total number of tokens")
    rank, world = group_rank_world(group)
    lens = uneven_lengths(seq_len, world, layout)
    if x.shape[dim] != lens[rank]:
        raise ValueError(f"unshard(..., uneven=True): rank {rank} holds {x.shape[dim]} rows; layout {str(layout)!r} "
                         f"over {world} ranks of seq_len {seq_len} gives it {lens[rank]}")
    # Pad to the longest block: the padding rows sit at positions past seq_len, cut off by the gather.
    return _Unshard.apply(_pad(x, dim, max(lens)), group, Uneven(layout, seq_len), dim, seq_len, None, None)


# These names lived in ringattn.layouts and stay importable from there (ringattn.layouts.shard, ...); set from
# here, so that layouts, which this module builds on, imports nothing back.
def _alias_in_layouts() -> None:
    from . import layouts

    for name in ("Sharding", "shard", "unshard", "sharding_of", "remember", "settle", "settle_len", "place_of",
                 "check_distributed", "documents_text", "document_rows"):
        setattr(layouts, name, globals()[name])


_alias_in_layouts()
