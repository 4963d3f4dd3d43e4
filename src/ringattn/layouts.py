"""Which global positions each rank holds, and moving full tensors to shards and back.

``contiguous``: rank r holds ``[r*c, (r+1)*c)``. ``zigzag``: the padded sequence is cut into 2W chunks
and rank r holds chunks r and 2W-1-r, so every rank has the same causal work. ``striped``: rank r holds
``r, r+W, r+2W, ...`` (Striped Attention), balanced as well.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .masks import Segment

LAYOUTS = ("contiguous", "zigzag", "striped")


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


def global_positions(layout: str, rank: int, world: int, local_len: int,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Global position of each local token (e.g. for rotary embeddings or position_ids)."""
    return torch.cat([s.positions(device) for s in segments(layout, rank, world, local_len)])


def padded_len(seq_len: int, world: int, layout: str) -> int:
    m = 2 * world if layout == "zigzag" else world
    return -(-seq_len // m) * m


def _group_info(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard(x: torch.Tensor, *, group=None, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """This rank's part of a full tensor (same on every rank), zero-padded along ``dim`` first up to a
    multiple of W (2W for zigzag)."""
    check_layout(layout)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    rank, world = _group_info(group)
    dim = dim % x.dim()
    n = x.shape[dim]
    total = padded_len(n, world, layout)
    if total != n:
        pad = list(x.shape)
        pad[dim] = total - n
        x = torch.cat([x, x.new_zeros(pad)], dim=dim)
    idx = global_positions(layout, rank, world, total // world, x.device)
    return x.index_select(dim, idx)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, layout, dim, seq_len):
        rank, world = _group_info(group)
        ctx.info = (rank, world, layout, dim, x.shape[dim])
        c = x.shape[dim]
        moved = x.movedim(dim, 0).contiguous()
        if world > 1:
            gathered = moved.new_empty((world * c, *moved.shape[1:]))
            dist.all_gather_into_tensor(gathered, moved, group=group)
        else:
            gathered = moved
        order = torch.cat([global_positions(layout, r, world, c, x.device) for r in range(world)])
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
        idx = global_positions(layout, rank, world, c, grad.device)
        return g.index_select(0, idx).movedim(0, dim), None, None, None, None


def unshard(x: torch.Tensor, *, group=None, layout: str = "contiguous", dim: int = 1,
            seq_len: int | None = None) -> torch.Tensor:
    """The full tensor on every rank, in global order, cut to ``seq_len``; differentiable.

    Backward assumes every rank computes the same loss from the full tensor (the usual pattern): each
    rank's shard receives its slice of that gradient.
    """
    check_layout(layout)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _, world = _group_info(group)
    dim = dim % x.dim()
    total = world * x.shape[dim]
    seq_len = total if seq_len is None else seq_len
    if not 0 <= seq_len <= total:
        raise ValueError(f"seq_len must be in [0, {total}] (world * local length), got {seq_len}")
    if layout == "zigzag" and world > 1 and x.shape[dim] % 2:
        raise ValueError(f"layout='zigzag' needs an even local length, got {x.shape[dim]}")
    return _Unshard.apply(x, group, layout, dim, seq_len)
