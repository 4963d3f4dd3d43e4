"""DeepSpeed-Ulysses: trade the sequence split for a head split, attend locally, trade back.

Each rank starts with its ``local_len`` tokens of all heads. One all-to-all gives every rank all
``W * local_len`` tokens of ``heads / W`` heads; attention over the whole sequence is then local and
exact; a second all-to-all returns the output (and lse) to the sequence split. Three all-to-alls of
q, k, v and one of the output per forward, and the mirror image in backward; nothing overlaps.

After the all-to-all the tokens sit in *rank order* (rank 0's tokens, then rank 1's, ...), which is
global order only for the contiguous layout. For zigzag and striped they are permuted into global
order first, so the kernels see one contiguous run of positions (one causal call instead of many
partial ones), and the output is permuted back.

GQA: query head ``i`` reads K/V head ``i // (heads // kv_heads)``; ``heads`` must be divisible by W.
When ``kv_heads`` is not a multiple of W, every K/V head is replicated ``W / gcd(kv_heads, W)`` times
before the all-to-all (more bytes on the wire; gradients of the copies are summed), so that each
rank holds the K/V heads its query heads read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import comm
from ..kernels import BACKENDS, lse_dtype, select
from ..kernels.block import Partial, Sum, run_backward, run_forward
from ..layouts import global_positions
from ..masks import MaskSpec, Segment, Task, plan_block
from ..ring import SavedAttention
from ..validate import agree, call_number
from . import AllToAll, check_call, device_of, kv_replication


@dataclass(frozen=True)
class LocalCall:
    spec: MaskSpec
    scale: float
    tasks: tuple[Task, ...]


def local_forward(q, k, v, call: LocalCall):
    """Exact attention of local q, k, v at known global positions (the tasks of ``plan_block``)."""
    acc = Partial(q, v.shape[-1])
    comm.count_flops(call.tasks, q, v, False)
    run_forward(select(q, k, v), q, k, v, call.tasks, call.spec, call.scale, acc)
    return acc.out.to(q.dtype), acc.lse


def local_backward(dout, q, k, v, out, lse, call: LocalCall, dlse):
    # A gradient through lse folds into D (D - dlse); only the reference backend takes it.
    backend = select(q, k, v) if dlse is None else BACKENDS["reference"]
    acc = lse_dtype(q.dtype)
    dq, dk, dv = (Sum(t.shape, acc, t.device) for t in (q, k, v))
    comm.count_flops(call.tasks, q, v, True)
    run_backward(backend, dout, q, k, v, out, lse, call.tasks, call.spec, call.scale, dq, dk, dv, dlse)
    dq, dk, dv = dq.get(), dk.get(), dv.get()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def rank_order(layout: str, world: int, local_len: int, device) -> torch.Tensor | None:
    """Global position of each row of the all-to-all result (rank order); None if that is 0, 1, 2, ..."""
    if layout == "contiguous" or world == 1:
        return None
    return torch.cat([global_positions(layout, r, world, local_len, device) for r in range(world)])


def head_parallel_attention(q, k, v, group, spec: MaskSpec, scale: float, order: torch.Tensor | None,
                            replicate: int):
    """The Ulysses core on ``group``: (out, lse) of this rank's tokens, differentiable.

    ``order`` gives the global position of each token after the all-to-all (None = already in order).
    """
    if replicate > 1:
        k = k.repeat_interleave(replicate, dim=2)
        v = v.repeat_interleave(replicate, dim=2)
    qh, kh, vh = (AllToAll.apply(t, group, 2, 1) for t in (q, k, v))
    if order is not None:
        to_global = torch.argsort(order)
        qh, kh, vh = (t.index_select(1, to_global) for t in (qh, kh, vh))
    n = qh.shape[1]
    tasks = plan_block(spec, (Segment(0, n),), (Segment(0, n),))
    out, lse = SavedAttention.apply(qh, kh, vh, local_forward, local_backward, LocalCall(spec, scale, tasks))
    if order is not None:  # back to rank order: row j of rank order holds global position order[j]
        out, lse = out.index_select(1, order), lse.index_select(2, order)
    return AllToAll.apply(out, group, 1, 2), AllToAll.apply(lse, group, 2, 1)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    layout: str = "contiguous",
    seq_len: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backward_exchange: str = "ring",
):
    """Exact attention by all-to-all head parallelism; same arguments and results as ``ring_attention``.

    Needs ``heads`` divisible by the group size; K/V heads are replicated when ``kv_heads`` is not a
    multiple of it (see the module docstring). ``backward_exchange``: only ``"ring"`` (no ring here).
    """
    call = call_number(group)
    _, world = comm.group_rank_world(group)
    error, spec, scale, desc = None, None, None, ""
    try:
        spec, scale, desc = check_call(q, k, v, strategy="ulysses", world=world, layout=layout, causal=causal,
                                       window=window, seq_len=seq_len, cu_seqlens=cu_seqlens,
                                       softmax_scale=softmax_scale, local_world=world,
                                       backward_exchange=backward_exchange)
    except Exception as e:  # noqa: BLE001 - whatever it is, every rank must hear of it
        error = e
    agree(desc, error, group, device_of(q), call)
    s = comm.stats()
    if s is not None:
        s.calls += 1
    order = rank_order(layout, world, q.shape[1], q.device)
    out, lse = head_parallel_attention(q, k, v, group, spec, scale, order, kv_replication(k.shape[2], world))
    return (out, lse) if return_lse else out
