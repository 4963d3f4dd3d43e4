"""``shard_batch``: this rank's shard of a causal-LM batch, and the stamp that lets the attention check
it was sharded as the ring is registered."""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from .. import comm
from ..layouts import check_layout, layout_of, padded_len
from ..sharding import shard
from ..training.batch import IGNORE_INDEX
from ..training.batch import shard_batch as _shard_tokens
from ..training.batch import shift_labels as _shift_labels
from . import positions
from .registry import SETTINGS, RingSettings

# id(position_ids) -> (the tensor, the layout and world size shard_batch made it for): a model hands its layers
# the position_ids it was given, so the attention can tell a batch sharded one way from a ring registered another.
_SHARDED_AS: dict[int, tuple[weakref.ref, str, int]] = {}


def stamp(position_ids: torch.Tensor, layout: str, world: int) -> None:
    key = id(position_ids)
    _SHARDED_AS[key] = (weakref.ref(position_ids, lambda _, key=key: _SHARDED_AS.pop(key, None)), layout, world)


def needs_ring(model, args, kwargs) -> None:
    """A prepared model given a sharded batch while its attention is not a ring (built with sdpa, and
    ``set_attn_implementation("ring")`` forgotten): each rank would attend within its own shard only."""
    impl = getattr(model.config, "_attn_implementation", None)
    if isinstance(impl, str) and impl in SETTINGS:
        return
    for t in (*args, *kwargs.values()):
        entry = _SHARDED_AS.get(id(t)) if isinstance(t, torch.Tensor) else None
        if entry is not None and entry[0]() is t and entry[2] > 1:
            raise ValueError(f"{type(model).__name__} was given this rank's shard of a batch (ringattn.hf.shard_batch "
                             f"over {entry[2]} ranks) but runs with attn_implementation={impl!r}, which would attend "
                             "within each rank's shard alone: build it with attn_implementation='ring' or call "
                             "model.set_attn_implementation('ring') after ringattn.hf.register (a model transformers "
                             "does not let switch, e.g. RWKV, only by building it so)")


def check_sharded_as(position_ids: torch.Tensor, settings: RingSettings) -> None:
    # Every rank sharded its batch with the same call, so every rank raises here alike, before a collective.
    entry = _SHARDED_AS.get(id(position_ids))
    if entry is None or entry[0]() is not position_ids:
        return
    world = comm.group_rank_world(settings.group)[1]
    if entry[2] != world or (entry[1] != settings.layout and world > 1):  # on one rank every layout is the same
        raise ValueError(f"the batch was sharded by ringattn.hf.shard_batch with layout={entry[1]!r} over {entry[2]} "
                         f"ranks, but the ring attention was registered with layout={settings.layout!r} over {world} "
                         "ranks: each rank would take its tokens for other positions; pass the same layout and group "
                         "to ringattn.hf.register and ringattn.hf.shard_batch")


def shard_batch(input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, group=None,
                layout: str = "contiguous", position_ids: torch.Tensor | None = None,
                ignore_index: int = IGNORE_INDEX) -> dict:
    """This rank's shard of a causal-LM batch, with labels shifted on the full sequence first.

    Args:
        input_ids: ``(batch, seq_len)`` full token ids, identical on every rank (checked: a batch that differs
            between the ranks, as from a data loader sharded over them, raises ``ValueError`` on every rank).
        labels: ``(batch, seq_len)`` targets aligned with ``input_ids`` (the usual HF convention: the
            model shifts them); None = ``input_ids``. ``ignore_index`` entries are not scored.
        group, layout: the sequence-parallel group and layout (as passed to ``register``).
        position_ids: ``(batch, seq_len)`` or ``(seq_len,)``; None = ``0 .. seq_len-1``.

    Returns:
        ``{"input_ids", "position_ids", "shift_labels", "num_items_in_batch", "seq_len"}``:
        ``(batch, local_len)`` shards (the tail padded up to a multiple of W, 2W for zigzag; padding has
        id 0, the last position repeated and label ``ignore_index``), ``shift_labels[i]`` = the label of token
        ``i + 1``, and the global count of scored tokens. With ``layout="balanced"`` also ``cu_seq_lens_q``,
        the documents (where ``position_ids`` restart) that placed the tokens: pass it to the model too.
    """
    check_layout(layout)
    labels = _checked_labels(input_ids, labels)
    b, n = input_ids.shape
    _, world = comm.group_rank_world(group)
    if world > 1:
        _check_same_batch(input_ids, labels, position_ids, group)
    position_ids = _padded_positions(position_ids, b, n, padded_len(n, world, layout) - n, input_ids.device)
    shifted = _shift_labels(labels, ignore_index)
    cu = None
    if layout_of(layout).needs_documents:  # the documents place the tokens, and the attention needs the same ones
        rows = [positions.restarts(row[:n]) for row in position_ids]
        cu = rows[0] if all(torch.equal(r, rows[0]) for r in rows) else rows
    ids, shift_labels, _ = _shard_tokens(input_ids, shifted, group=group, layout=layout, ignore_index=ignore_index,
                                         cu_seqlens=cu)
    sharded_positions = shard(position_ids, group=group, layout=layout, cu_seqlens=cu)
    stamp(sharded_positions, layout, world)
    stamp(ids, layout, world)
    out = {
        "input_ids": ids,
        "position_ids": sharded_positions,
        "shift_labels": shift_labels,
        "num_items_in_batch": int((shifted != ignore_index).sum()),
        "seq_len": n,
    }
    if cu is not None:
        out["cu_seq_lens_q"] = cu
    return out


def _checked_labels(input_ids, labels) -> torch.Tensor:
    """``labels`` (None: ``input_ids``) once both are ``(batch, seq_len)`` tensors of one shape."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a 2-D (batch, seq_len) tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    labels = input_ids if labels is None else labels
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    return labels


def _padded_positions(position_ids, b: int, n: int, pad: int, device) -> torch.Tensor:
    """``(b, n + pad)`` positions: the given ones (None: ``0 .. n-1``) with the last repeated over the padding.

    Repeating the last position keeps the largest one (which dynamic RoPE and LongRoPE read) the real
    sequence's, and the padding joins the last document, which no real token sees under a causal mask."""
    if position_ids is None:
        position_ids = torch.arange(n, device=device).expand(b, n)
    position_ids = position_ids.unsqueeze(0) if position_ids.dim() == 1 else position_ids
    if position_ids.shape[-1] != n:
        raise ValueError(f"position_ids must have seq_len {n} entries, got {tuple(position_ids.shape)}")
    position_ids = position_ids.expand(b, n)
    if pad:
        position_ids = torch.cat([position_ids, position_ids[:, -1:].expand(b, pad)], 1)
    return position_ids


def _fingerprint(t: torch.Tensor | None) -> list[torch.Tensor]:
    """Shape and a position-weighted sum of an integer tensor (int64 sums wrap alike on every rank)."""
    if t is None:
        return [torch.tensor(-1)]
    flat = t.reshape(-1).to(torch.int64)
    weights = torch.arange(12345, 12345 + flat.numel(), device=flat.device, dtype=torch.int64)
    shape = torch.tensor([t.dim(), *t.shape, *[0] * (3 - t.dim())][:4])
    return [shape, flat.sum().cpu()[None], (flat * weights).sum().cpu()[None]]


def _check_same_batch(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None,
                      group) -> None:
    """Every rank must pass the same whole batch (each keeps its shard of it): a per-rank batch (a data loader
    sharded over these ranks, as for data parallelism) would make each rank's shard a piece of another
    sequence. One all-reduce of a fingerprint; every rank sees the result and raises alike."""
    fp = torch.cat([x.reshape(-1) for t in (input_ids, labels, position_ids) for x in _fingerprint(t)])
    device = input_ids.device
    if dist.get_backend(group) == "nccl" and device.type != "cuda":  # a batch still on the CPU, as loaders give it
        device = torch.device("cuda", torch.cuda.current_device())
    both = torch.cat([fp, -fp]).to(device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(both[:fp.numel()], -both[fp.numel():]):
        raise ValueError("ringattn.hf.shard_batch got a different batch on each rank of the group: every rank passes "
                         "the same whole input_ids (and labels, position_ids) and keeps its own shard of it; a data "
                         "loader sharded over these ranks (DistributedSampler, as for data parallelism) gives each "
                         "rank its own batch instead. Shard the data over the data-parallel ranks only (RingTrainer "
                         "does), or load the same batch on every rank of the context-parallel group")
