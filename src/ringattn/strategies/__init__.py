"""Context-parallel strategies behind ``ringattn.attention``: one contract, identical results.

- ``"ring"``: pass-KV ring (``ringattn.ring_attention``); K/V blocks travel, overlapped with compute.
- ``"allgather"``: every rank gathers all K/V (kv_heads only, a few heads at a time, the next chunk in
  flight while the current one is computed); dK/dV go home by reduce-scatter (Llama 3's choice).
- ``"ulysses"``: all-to-all from sequence-sharded to head-sharded, exact attention over the whole
  sequence on ``heads / W`` heads, all-to-all back (DeepSpeed-Ulysses).
- ``"hybrid"``: Ulysses inside one dimension of a 2-D ``DeviceMesh``, the ring across the other (USP).
- ``"auto"``: ``ringattn.plan.choose`` picks one of the above from the arguments and the configured
  hardware (deterministic, so every rank picks the same).

Strategy-specific keywords: ``kv_head_chunk`` (allgather: kv heads gathered at a time);
``backward_exchange`` (ring and hybrid: ``"ring"`` or ``"direct"``, see ``ring_attention``; the others
take only ``"ring"``). Under ``"auto"`` a keyword the chosen strategy does not use is dropped: it tunes a
strategy that was not chosen.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import comm
from ..masks import MaskSpec
from ..validate import check_backward_exchange, check_qkv, describe, make_spec, softmax_scale_of

STRATEGIES = ("ring", "allgather", "ulysses", "hybrid", "auto")
# Strategy-specific keywords, and the strategies that use them ("auto" passes each only to those; the
# others accept backward_exchange="ring" only, so a "direct" meant for the ring is dropped).
_TUNING = {"kv_head_chunk": ("allgather",), "backward_exchange": ("ring", "hybrid")}


def dispatch(q, k, v, *, strategy: str = "ring", group=None, mesh=None, **kwargs):
    """Run ``strategy`` (see the module docstring); same contract and results as ``ring_attention``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        from ..plan import choose_for_call

        strategy = choose_for_call(q, k, v, group=group, mesh=mesh, **kwargs)
        kwargs = {key: val for key, val in kwargs.items() if strategy in _TUNING.get(key, (strategy,))}
    if strategy != "hybrid" and mesh is not None:
        raise ValueError(f"mesh is only used by strategy='hybrid' (got strategy={strategy!r}); "
                         "pass group= for the others")
    if strategy == "ring":
        from ..ring import ring_attention

        return ring_attention(q, k, v, group=group, **kwargs)
    if strategy == "allgather":
        from .allgather import allgather_attention

        return allgather_attention(q, k, v, group=group, **kwargs)
    if strategy == "ulysses":
        from .ulysses import ulysses_attention

        return ulysses_attention(q, k, v, group=group, **kwargs)
    from .hybrid import hybrid_attention

    if group is not None:
        raise ValueError("strategy='hybrid' takes its process groups from mesh=; leave group=None")
    return hybrid_attention(q, k, v, mesh=mesh, **kwargs)


def check_call(q, k, v, *, strategy: str, world: int, layout: str, causal, window, seq_len, cu_seqlens,
               softmax_scale, local_world: int | None = None, block_rows: int = 1,
               backward_exchange: str = "ring") -> tuple[MaskSpec, float, str]:
    """Checks shared by the strategies; returns (mask spec, softmax scale, description to agree on).

    ``world`` is the number of sequence blocks the layout is defined over, each of ``block_rows *
    local_len`` rows; ``local_world`` the group that splits the heads (Ulysses), if any.
    ``backward_exchange`` is the ring's; "direct" is an error for a strategy without a ring.
    """
    check_qkv(q, k, v)
    spec = make_spec(world=world, local_len=block_rows * q.shape[1], layout=layout, causal=causal, window=window,
                     seq_len=seq_len, cu_seqlens=cu_seqlens, batch=q.shape[0])
    scale = softmax_scale_of(softmax_scale, q.shape[-1])
    if local_world is not None and q.shape[2] % local_world:
        raise ValueError(f"strategy={strategy!r} splits the heads over {local_world} ranks: heads "
                         f"({q.shape[2]}) must be divisible by {local_world}")
    check_backward_exchange(backward_exchange, strategy)
    return spec, scale, describe(strategy, q, k, v, spec, layout, scale) + f" backward_exchange={backward_exchange}"


def device_of(q) -> torch.device:
    return q.device if isinstance(q, torch.Tensor) else torch.device("cpu")


def kv_replication(kv_heads: int, ranks: int) -> int:
    """How many copies of each K/V head a head split over ``ranks`` needs.

    Query heads are split into ``ranks`` contiguous groups. With ``kv_heads`` a multiple of ``ranks``
    the K/V heads split the same way; otherwise each K/V head is repeated ``f = ranks / gcd`` times
    (``kv_heads * f = lcm(kv_heads, ranks)``, which divides ``heads``), so that every rank's query heads
    find their K/V heads locally and the contiguous GQA grouping is kept.
    """
    return ranks // math.gcd(kv_heads, ranks)


def gather_op():
    """``all_gather_single`` where torch has it, else the older ``all_gather_into_tensor``."""
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def reduce_scatter_op():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into W parts along ``scatter_dim``, send part j to rank j, and concatenate the parts
    received along ``gather_dim`` in rank order."""
    _, world = comm.group_rank_world(group)
    if world == 1:
        return x
    send = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    s = comm.stats()
    if s is not None:
        s.bytes_sent += send.numel() * send.element_size() * (world - 1) // world
    return torch.cat(recv.unbind(0), dim=gather_dim)


class AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all``: the gradient travels back by the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.args = (group, scatter_dim, gather_dim)
        return all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        group, scatter_dim, gather_dim = ctx.args
        return all_to_all(grad.contiguous(), group, gather_dim, scatter_dim), None, None, None
