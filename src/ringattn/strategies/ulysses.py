"""DeepSpeed-Ulysses: trade the sequence split for a head split, attend locally, trade back.

Each rank starts with its ``local_len`` tokens of all heads. One all-to-all gives every rank all
``W * local_len`` tokens of ``heads / W`` heads; attention over the whole sequence is then local and
exact; a second all-to-all returns the output (and lse) to the sequence split. Three all-to-alls of
q, k, v and one of the output per forward, and the mirror image in backward; nothing overlaps.

After the all-to-all the tokens sit in *rank order* (rank 0's tokens, then rank 1's, ...), which is
global order only for the contiguous layout. For zigzag and striped they are permuted into global
order first, so the kernels see one contiguous run of positions (one causal call instead of many
partial ones), and the output is permuted back. Queries and keys are permuted each by their own
length (with ``q_seq_len`` there are fewer queries, at the end of the key positions).

GQA: query head ``i`` reads K/V head ``i // (heads // kv_heads)``; ``heads`` must be divisible by W.
When ``kv_heads`` is not a multiple of W, every K/V head is replicated ``W / gcd(kv_heads, W)`` times
before the all-to-all (more bytes on the wire; gradients of the copies are summed), so that each
rank holds the K/V heads its query heads read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import profiling
from ..autograd import SavedAttention
from ..comm import AllToAll, Outcome
from ..cost_model import Estimate, Hardware, Problem, flop_unit, pair_flops
from ..kernels import acc_dtype
from ..kernels.block import GradAccumulator, OutLseAccumulator, run_backward, run_forward
from ..layouts import kv_replication, layout_of
from ..masks import Segment
from ..modes import Strategy
from ..tasks import block_tasks
from .base import StrategyKind, group_topology, register

if TYPE_CHECKING:
    from ..callspec import AttentionCall


@dataclass(frozen=True)
class LocalCall:
    """Attention over the whole gathered sequence on this rank's heads: ``nq`` queries at positions
    ``q_offset, q_offset + 1, ...`` over ``nk`` keys at ``0..nk-1``, both in order."""

    call: AttentionCall
    nq: int
    nk: int

    def tasks(self, backend):
        return block_tasks(self.call.spec, (Segment(self.call.q_offset, self.nq),), (Segment(0, self.nk),),
                          backend.caps)


def local_forward(q, k, v, local: LocalCall):
    acc = OutLseAccumulator(q, v.shape[-1])
    backend = local.call.backend
    tasks = local.tasks(backend)
    profiling.count_flops(tasks, q, v, backward=False)
    # Note [A failure after the agreement]: the all-to-all back must not wait on a rank that failed here.
    outcome = Outcome(local.call.group, "ulysses forward", q.device)
    with profiling.timed(), outcome:
        run_forward(backend, q, k, v, tasks, local.call.spec, local.call.scale, acc, local.call.scores)
    outcome.settle()
    return acc.out.to(q.dtype), acc.lse


def local_backward(dout, q, k, v, out, lse, local: LocalCall, dlse):
    backend = local.call.backend_for(dlse)
    tasks = local.tasks(backend)
    acc = acc_dtype(q.dtype)
    dq, dk, dv = (GradAccumulator(t.shape, acc, t.device) for t in (q, k, v))
    profiling.count_flops(tasks, q, v, backward=True)
    outcome = Outcome(local.call.group, "ulysses backward", q.device)
    with profiling.timed(), outcome:
        run_backward(backend, dout, q, k, v, out, lse, tasks, local.call.spec, local.call.scale, dq, dk, dv, dlse,
                     local.call.scores)
    outcome.settle()
    dq, dk, dv = dq.get(), dk.get(), dv.get()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def rank_order(layout: str, world: int, local_len: int, device, bounds=None) -> torch.Tensor | None:
    """Global position of each row of the all-to-all result (rank order); None if that is 0, 1, 2, ..."""
    return layout_of(layout).rank_order(world, local_len, device, bounds)


def head_parallel_attention(q, k, v, call: AttentionCall, q_order: torch.Tensor | None,
                            k_order: torch.Tensor | None, replicate: int):
    """The Ulysses core on ``call.topo.head_group``: (out, lse) of this rank's tokens, differentiable.

    ``q_order`` / ``k_order`` give the global row of each query / key after the all-to-all (None =
    already in order).
    """
    group = call.topo.head_group
    if replicate > 1:
        k = k.repeat_interleave(replicate, dim=2)
        v = v.repeat_interleave(replicate, dim=2)
    qh, kh, vh = (AllToAll.apply(t, group, 2, 1) for t in (q, k, v))
    if q_order is not None:
        qh = qh.index_select(1, torch.argsort(q_order))
    if k_order is not None:
        to_global = torch.argsort(k_order)
        kh, vh = kh.index_select(1, to_global), vh.index_select(1, to_global)
    local = LocalCall(call.local_heads(q.shape[2]), qh.shape[1], kh.shape[1])
    out, lse = SavedAttention.apply(qh, kh, vh, local.call.sinks, local_forward, local_backward, local)
    if q_order is not None:  # back to rank order: row j of rank order holds global row q_order[j]
        out, lse = out.index_select(1, q_order), lse.index_select(2, q_order)
    return AllToAll.apply(out, group, 1, 2), AllToAll.apply(lse, group, 2, 1)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall):
    """All-to-all to a head split, exact attention over the whole sequence, all-to-all back."""
    world = call.topo.world
    bounds = call.spec.doc_bounds
    if call.q_offset and layout_of(call.layout).needs_documents and bounds is not None:
        raise ValueError("layout='balanced' with documents takes as many queries as keys; use layout='zigzag'")
    q_order = rank_order(call.layout, world, q.shape[1], q.device, bounds)
    k_order = rank_order(call.layout, world, k.shape[1], q.device, bounds)
    return head_parallel_attention(q, k, v, call, q_order, k_order, kv_replication(k.shape[2], world))



# ---- the cost model's estimate ------------------------------------------------------------

def _a2a_time(nbytes_local: float, ranks: int, hw: Hardware, bw: float) -> float:
    """An all-to-all of a rank's ``nbytes_local``: it keeps 1/ranks and sends the rest."""
    if ranks == 1:
        return 0.0
    return (ranks - 1) * hw.latency + nbytes_local * (ranks - 1) / ranks / bw


def ulysses_comm(p: Problem, hw: Hardware, ranks: int, local: int, bw: float) -> tuple[float, float, int]:
    """(seconds, bytes sent, kv heads after replication) of Ulysses' all-to-alls over ``ranks``."""
    kvh = p.kv_heads * kv_replication(p.kv_heads, ranks)
    e, b = p.dtype_bytes, p.batch
    tensors = [b * local * p.heads * p.head_dim * e, b * local * kvh * p.head_dim * e, b * local * kvh * p.dv * e,
               b * local * p.heads * p.dv * e, b * local * p.heads * 4]  # q, k, v, out, lse
    if p.backward:  # dout in; dq, dk, dv out
        tensors += [b * local * p.heads * p.dv * e, tensors[0], tensors[1], tensors[2]]
    t = sum(_a2a_time(x, ranks, hw, bw) for x in tensors)
    return t, sum(tensors) * (ranks - 1) / ranks, kvh


def estimate_ulysses(p: Problem, hw: Hardware) -> Estimate:
    w = p.world
    if p.heads % w:
        return Estimate("ulysses", False, f"heads ({p.heads}) not divisible by world ({w})")
    f_rank, bw = hw.rank_flops(w), hw.link(w)
    n = w * p.local_len
    fwd, ran = pair_flops(p.spec(), (Segment(0, n),), (Segment(0, n),), flop_unit(p, p.heads // w), hw.key_block)
    flops = fwd * (3.5 if p.backward else 1.0)
    compute_s = ran * (1.0 + hw.backward_time if p.backward else 1.0) / f_rank
    comm_s, sent, kvh = ulysses_comm(p, hw, w, p.local_len, bw)
    e = p.dtype_bytes
    hl, kl = p.heads // w, kvh // w
    mem = p.batch * n * (hl * (p.head_dim + p.dv) * e + kl * (p.head_dim + p.dv) * e + hl * p.dv * 4) \
        + 2 * p.batch * p.local_len * (p.heads * p.head_dim + kvh * (p.head_dim + p.dv)) * e
    if p.backward:
        mem += p.batch * n * (hl * p.head_dim + kl * (p.head_dim + p.dv)) * 4
    note = f"{p.heads // w} heads x {n} tokens per rank" + (f"; K/V heads replicated to {kvh}" if kvh > p.kv_heads
                                                            else "")
    return Estimate("ulysses", True, note, flops, compute_s, sent, comm_s, comm_s, compute_s + comm_s, mem, False)


# Ulysses plans the whole sequence alike on every rank: a mask_mod's error there is every rank's.
STRATEGY = register(StrategyKind(Strategy.ULYSSES, run,
                                 functools.partial(group_topology, Strategy.ULYSSES, split_heads=True),
                                 estimate=estimate_ulysses))
