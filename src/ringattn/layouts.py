"""Which global positions each rank holds, and moving full tensors to shards and back.

``contiguous``: rank r holds ``[r*c, (r+1)*c)``. ``zigzag``: the padded sequence is cut into 2W chunks
and rank r holds chunks r and 2W-1-r, so every rank has the same causal work. ``striped``: rank r holds
``r, r+W, r+2W, ...`` (Striped Attention), balanced as well.

With a 2-D device mesh (``mesh=``, for the hybrid strategy) the layout applies to the *ring* dimension
of R ranks, each holding a block of ``U * local_len`` positions, and the U ranks of the *ulysses*
dimension split that block's rows contiguously in order (see ``hybrid_segments``). Mesh dimensions are
found by name (``mesh_dim_names`` containing "ring" and "ulysses"), else dim 0 is the ring and dim 1
the Ulysses dimension.

Queries fewer than the keys (``q_seq_len``) are the last positions of the key sequence; they follow
the same layout over their own rows, moved on by the offset of their first row (``query_segments``),
so a rank's query and key blocks differ in length and ``shard`` makes both.
"""

from __future__ import annotations

import math

import torch

from .comm import gather_op, group_rank_world
from .masks import Segment
from .modes import Layout

LAYOUTS = tuple(str(m) for m in Layout)


def effective_layout(layout: str, world: int) -> Layout:
    """The layout a group of ``world`` ranks really has: on one rank every layout is contiguous."""
    return Layout(layout) if world > 1 else Layout.CONTIGUOUS


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def segments(layout: str, rank: int, world: int, local_len: int) -> tuple[Segment, ...]:
    """The global positions of a rank's ``local_len`` tokens, in local order."""
    check_layout(layout)
    c = local_len
    if layout == "contiguous" or world == 1:
        return (Segment(rank * c, c),)
    if layout == "zigzag":
        if c % 2:
            raise ValueError(f"layout='zigzag' needs an even local length, got {c}")
        h = c // 2
        return (Segment(rank * h, h), Segment((2 * world - 1 - rank) * h, h))
    return (Segment(rank, c, world),)


def query_segments(layout: str, rank: int, world: int, local_len: int, offset: int = 0) -> tuple[Segment, ...]:
    """The global positions of a rank's ``local_len`` queries: the layout of the query rows, moved on by
    ``offset``, the position of query row 0 (the queries are the last rows of the key sequence)."""
    return tuple(Segment(s.start + offset, s.length, s.stride) for s in segments(layout, rank, world, local_len))


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
                    local_len: int) -> tuple[Segment, ...]:
    """Positions of one mesh rank: rows ``[u*c, (u+1)*c)`` of ring block ``ring_rank`` (of U*c rows)."""
    lo, hi = uly_rank * local_len, (uly_rank + 1) * local_len
    out, row = [], 0
    for s in segments(layout, ring_rank, ring_world, uly_world * local_len):
        a, b = max(lo, row), min(hi, row + s.length)
        if a < b:
            out.append(s.sub(a - row, b - row))
        row += s.length
    return tuple(out)


def mesh_positions(layout: str, mesh, local_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Global position of each local token of this process under ``mesh`` (hybrid strategy)."""
    segs = hybrid_segments(layout, *mesh_coords(mesh), local_len)
    return torch.cat([s.positions(device) for s in segs])


def global_positions(layout: str, rank: int, world: int, local_len: int,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Global position of each local token (e.g. for rotary embeddings or position_ids)."""
    return torch.cat([s.positions(device) for s in segments(layout, rank, world, local_len)])


def padded_len(seq_len: int, world: int, layout: str) -> int:
    m = 2 * world if layout == "zigzag" else world
    return -(-seq_len // m) * m


def _pad(x: torch.Tensor, dim: int, total: int) -> torch.Tensor:
    if total == x.shape[dim]:
        return x
    pad = list(x.shape)
    pad[dim] = total - x.shape[dim]
    return torch.cat([x, x.new_zeros(pad)], dim=dim)


def shard(x: torch.Tensor, *, group=None, layout: str = "contiguous", dim: int = 1, mesh=None) -> torch.Tensor:
    """This rank's part of a full tensor (same on every rank), zero-padded along ``dim`` first up to a
    multiple of W (2W for zigzag). With ``mesh`` (a 2-D DeviceMesh, hybrid strategy) W is the mesh
    size and positions follow ``hybrid_segments``."""
    check_layout(layout)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if mesh is not None:
        rr, rw, ur, uw = mesh_coords(mesh)
        dim = dim % x.dim()
        total = padded_len(x.shape[dim], rw * uw, layout)
        x = _pad(x, dim, total)
        idx = mesh_positions(layout, mesh, total // (rw * uw), x.device)
        return x.index_select(dim, idx)
    rank, world = group_rank_world(group)
    dim = dim % x.dim()
    n = x.shape[dim]
    total = padded_len(n, world, layout)
    x = _pad(x, dim, total)
    idx = global_positions(layout, rank, world, total // world, x.device)
    return x.index_select(dim, idx)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, layout, dim, seq_len, mesh=None):
        c = x.shape[dim]
        moved = x.movedim(dim, 0).contiguous()
        if mesh is None:
            rank, world = group_rank_world(group)
            ctx.info = (rank, world, layout, dim, c)
            gathered = _gather(moved, group, world)
            order = torch.cat([global_positions(layout, r, world, c, x.device) for r in range(world)])
        else:
            rr, rw, ur, uw = mesh_coords(mesh)
            ctx.info = (None, rw * uw, layout, dim, c)
            ctx.own = mesh_positions(layout, mesh, c, x.device)
            rd, ud = mesh_dims(mesh)
            # Ulysses dim first (a ring block in row order), then the ring blocks: (ring, ulysses) order.
            gathered = _gather(_gather(moved, mesh.get_group(ud), uw), mesh.get_group(rd), rw)
            order = torch.cat([s.positions(x.device) for r in range(rw) for u in range(uw)
                               for s in hybrid_segments(layout, r, rw, u, uw, c)])
        full = torch.empty_like(gathered)
        full[order] = gathered
        return full[:seq_len].movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        # Every rank holds the same full tensor and (by contract) the same loss on it: the gradient
        # of a shard is the matching slice of the full gradient, no communication needed.
        rank, world, layout, dim, c = ctx.info
        g = grad.movedim(dim, 0)
        if g.shape[0] < world * c:
            g = torch.cat([g, g.new_zeros((world * c - g.shape[0], *g.shape[1:]))])
        idx = ctx.own if rank is None else global_positions(layout, rank, world, c, grad.device)
        return g.index_select(0, idx).movedim(0, dim), None, None, None, None, None


def _gather(moved: torch.Tensor, group, world: int) -> torch.Tensor:
    if world == 1:
        return moved
    gathered = moved.new_empty((world * moved.shape[0], *moved.shape[1:]))
    gather_op()(gathered, moved, group=group)
    return gathered


def unshard(x: torch.Tensor, *, group=None, layout: str = "contiguous", dim: int = 1,
            seq_len: int | None = None, mesh=None) -> torch.Tensor:
    """The full tensor on every rank, in global order, cut to ``seq_len``; differentiable.

    With ``mesh`` (the 2-D DeviceMesh of the hybrid strategy) the inverse of ``shard(..., mesh=mesh)``.

    Backward assumes every rank computes the same loss from the full tensor (the usual pattern): each
    rank's shard receives its slice of that gradient.
    """
    check_layout(layout)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if mesh is not None:
        _, rw, _, uw = mesh_coords(mesh)
        world = rw * uw
    else:
        _, world = group_rank_world(group)
    dim = dim % x.dim()
    total = world * x.shape[dim]
    seq_len = total if seq_len is None else seq_len
    if not 0 <= seq_len <= total:
        raise ValueError(f"seq_len must be in [0, {total}] (world * local length), got {seq_len}")
    if layout == "zigzag" and world > 1 and x.shape[dim] % 2:
        raise ValueError(f"layout='zigzag' needs an even local length, got {x.shape[dim]}")
    return _Unshard.apply(x, group, layout, dim, seq_len, mesh)


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
