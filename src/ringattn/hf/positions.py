"""Global views of per-rank inputs: position_ids, packed-document boundaries, RoPE and temperature positions.

Each rank sees only its shard of position_ids. Whatever transformers derives from the whole sequence (where
packed documents start, the largest position for dynamic RoPE, the token index for Llama 4's temperature
tuning) is recomputed here from the global sequence, so every rank uses the single-process value.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from .. import comm
from ..layouts import RULES, global_positions, layout_of, padded_len
from ..sharding import unshard


class _Cache:
    """One gathered result per position_ids tensor: every layer of a forward gets the same tensor object."""

    def __init__(self):
        self.ref = None
        self.version = -1
        self.value = None

    def get(self, t: torch.Tensor):
        if self.ref is not None and self.ref() is t and t._version == self.version:
            return self.value
        return None

    def put(self, t: torch.Tensor, value) -> None:
        self.ref, self.version, self.value = weakref.ref(t), t._version, value


_DOCS = _Cache()


def _starts(row: torch.Tensor) -> torch.Tensor:
    """Where a document starts: wherever a position is not the previous one plus 1 (transformers'
    ``find_packed_sequence_indices``, what sdpa and eager apply)."""
    starts = torch.ones_like(row, dtype=torch.bool)
    starts[1:] = row[1:] != row[:-1] + 1
    return starts


def restarts(row: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` (int32) of one full row of position_ids, without padding."""
    idx = torch.nonzero(_starts(row)).flatten()
    return torch.cat([idx, idx.new_tensor([row.numel()])]).to(torch.int32)


def documents(position_ids: torch.Tensor, batch: int, group, layout: str) -> tuple[list, int]:
    """Per batch row, the global ``cu_seqlens`` of the packed documents that ``position_ids`` (this rank's
    shard) marks by restarting, or None for a row that is one sequence; and the real length (the padded
    length less the longest trailing run of repeated positions common to every row, but its first token).

    transformers' rule (``find_packed_sequence_indices``, what sdpa and eager apply): a document starts wherever
    a position is not the previous one plus 1. A trailing run of repeated positions is padding (``shard_batch``
    pads that way) and stays in the last document: causal attention keeps every real token from seeing it.
    """
    hit = _DOCS.get(position_ids)
    if hit is not None:
        return hit
    _, world = comm.group_rank_world(group)
    local = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    if world > 1:
        # Left out, position_ids default to 0..local_len-1 on every rank: the RoPE of every shard but one is
        # wrong and the gathered ids look like one document per rank. Refused when every rank shows it.
        numbered = torch.tensor([int(bool((local == torch.arange(local.shape[1], device=local.device)).all()))],
                                device=local.device)
        dist.all_reduce(numbered, op=dist.ReduceOp.MIN, group=group)
        if int(numbered[0]):
            raise ValueError("ring attention got position_ids 0..local_len-1 on every rank: pass each rank's shard "
                             "of the global position_ids to the model (ringattn.hf.shard_batch returns them); "
                             "left out, the model numbers every shard from 0")
        full = unshard(local.contiguous(), group=group, layout=layout, dim=1)
    else:
        full = local
    out, real = [], 0
    for row in full:
        starts, tail = _doc_starts(row)
        real = max(real, tail + 1)
        idx = torch.nonzero(starts).flatten()
        if idx.numel() <= 1:
            out.append(None)
            continue
        out.append(torch.cat([idx, idx.new_tensor([row.numel()])]).to(torch.int32))
    if world > 1 and any(r is not None for r in out):
        _check_layout(full, world, layout)
    _DOCS.put(position_ids, (out, real))
    return out, real


def packed_documents(cu_seq_lens, position_ids, batch: int, group, layout) -> tuple[list, int | None]:
    """The packed documents a layer of a prepared model sees, as ``documents`` gives them: ``cu_seq_lens_q``
    where the model was given it (one per row, or one for all), else where ``position_ids`` restart (and the
    real length), else none (``[None]``). A layout that places tokens by document needs ``cu_seq_lens_q``."""
    if cu_seq_lens is not None:
        return (list(cu_seq_lens) if isinstance(cu_seq_lens, (list, tuple)) else [cu_seq_lens]), None
    if layout_of(layout).needs_documents:
        raise ValueError(f"layout={str(layout)!r} places the tokens by document: pass the model the "
                         "cu_seq_lens_q that ringattn.hf.shard_batch returns with them")
    if position_ids is None:
        return [None], None
    rows, real = documents(position_ids, batch, group, layout)
    return (rows if any(r is not None for r in rows) else [None]), real


def _doc_starts(row: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Where documents start in one full row, and the first index of its trailing run of the last value (the
    padding, which stays in the last document)."""
    starts = _starts(row)
    same = torch.nonzero(row != row[-1]).flatten()
    tail = int(same[-1]) + 1 if same.numel() else 0
    starts[tail + 1:] = False
    return starts, tail


def _readable() -> list[str]:
    """The layouts that place tokens without knowing the documents."""
    return [name for name, rule in RULES.items() if not rule.needs_documents]


def _check_layout(full: torch.Tensor, world: int, layout: str) -> None:
    """Refuse position_ids that read as fewer documents under another layout than the registered one: the batch
    was sharded with that layout (the shards, put together the registered way, restart where no document does).
    Sharded the registered way, a row's documents start at their first positions: no other order of the same
    positions has fewer starts where the documents start at 0, the usual packing."""
    total = full.shape[-1]
    local = total // world
    readable = _readable()
    if layout not in readable or padded_len(total, world, layout) != total:
        return
    counts = {}
    for other in readable:
        if padded_len(total, world, other) != total:
            continue
        if other == layout:
            read = full
        else:
            read = torch.empty_like(full)
            for r in range(world):
                read[:, global_positions(other, r, world, local, full.device)] = \
                    full[:, global_positions(layout, r, world, local, full.device)]
        counts[other] = sum(int(_doc_starts(row)[0].sum()) for row in read)
    best = min(counts, key=counts.get)
    if counts[best] < counts[layout]:
        raise ValueError(f"ring attention was registered with layout={layout!r}, but the position_ids look sharded "
                         f"with layout={best!r} (put together as {layout!r} the batch has {counts[layout]} "
                         f"documents, as {best!r} {counts[best]}): pass the same layout to ringattn.hf.register and "
                         "ringattn.hf.shard_batch (or ringattn.shard)")


def global_token_index(group, layout: str, local_len: int, device, cu_seqlens=None) -> torch.Tensor:
    """Each local token's index in the global (padded) sequence: ``(local_len,)``, or ``(batch, local_len)``
    for a list of one ``cu_seqlens`` per row (the balanced layout places each row by its documents)."""
    rank, world = comm.group_rank_world(group)
    if isinstance(cu_seqlens, (list, tuple)):
        return torch.stack([global_positions(layout, rank, world, local_len, device, c) for c in cu_seqlens])
    return global_positions(layout, rank, world, local_len, device=device, cu_seqlens=cu_seqlens)


def temperature_rescale(query: torch.Tensor, floor_scale: float, attn_scale: float, group, layout: str,
                        cu_seqlens=None) -> torch.Tensor:
    """Llama 4's attention temperature tuning on global token indices instead of the shard's ``arange``.

    The module already multiplied query by ``s(arange(local_len))``; this multiplies by
    ``s(global) / s(local)`` (``s >= 1``, so the division is safe and differentiable).
    """
    n = query.shape[2]

    def s(pos: torch.Tensor) -> torch.Tensor:
        return torch.log1p(torch.floor((pos.float() + 1.0) / floor_scale)) * attn_scale + 1.0

    local = torch.arange(n, device=query.device)
    glob = global_token_index(group, layout, n, query.device, cu_seqlens)
    ratio = (s(glob).to(torch.float64) / s(local).to(torch.float64)).to(query.dtype)
    return query * ratio.reshape(-1, 1, n, 1)


def patch_dynamic_rope(module: torch.nn.Module, group) -> bool:
    """Make a dynamic / LongRoPE rotary embedding choose its frequencies from the global largest position.

    transformers' ``dynamic_rope_update`` reads ``max(position_ids)`` of the call; the patched forward first
    runs that update on the group's largest position, then the undecorated forward on this rank's positions.
    Returns whether ``module`` was patched.
    """
    forward = type(module).forward
    inner = getattr(forward, "__wrapped__", None)
    if inner is None or getattr(module, "_ringattn_rope", False):
        return False
    rope = getattr(module, "rope_type", None)
    kinds = rope.values() if isinstance(rope, dict) else [rope]
    if not any(isinstance(k, str) and ("dynamic" in k or k == "longrope") for k in kinds):
        return False
    bound = forward.__get__(module)

    def global_max_forward(x, position_ids, *args, **kwargs):
        top = position_ids.max().reshape(1).to(torch.int64)
        _, world = comm.group_rank_world(group)
        if world > 1:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        bound(x[..., :1, :] if x.dim() >= 2 else x, top.view(1, 1).to(position_ids.device), *args, **kwargs)
        return inner(module, x, position_ids, *args, **kwargs)

    module.forward = global_max_forward
    module._ringattn_rope = True
    return True
