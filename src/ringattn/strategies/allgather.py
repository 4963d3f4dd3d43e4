"""All-gather context parallelism (Llama 3): every rank gathers all keys and values, then attends.

Only the ``kv_heads`` are gathered, ``kv_heads_per_gather`` of them at a time, with the next chunk's gather
in flight while the current chunk is computed, so at most two chunks of the full-length K/V are
alive. Each chunk is one pass of kernel calls over the whole sequence (planned once by
``tasks.block_tasks`` on the real global positions, so masks skip what they hide). Backward gathers
K/V again chunk by chunk and sends the dK/dV partial sums home by reduce-scatter (float32/64), again
overlapped with the next chunk.

The gathered rows arrive in rank order. For the zigzag layout they are permuted into global order (one
contiguous run of positions: one causal kernel call per query chunk); contiguous already is in
order; striped stays in rank order, where every rank's block is a stride-W run and the pair
classifies as a shifted causal triangle.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import comm, profiling
from ..autograd import SavedAttention
from ..comm import gather_op, reduce_scatter_op
from ..cost_model import Estimate, Hardware, Problem, flop_unit, pair_flops
from ..kernels import Backend, acc_dtype
from ..kernels.block import GradAccumulator, OutLseAccumulator, run_backward, run_forward
from ..layouts import cut_at, effective_layout, layout_of, query_segments, segments
from ..masks import Segment, Task
from ..modes import Strategy
from ..tasks import block_tasks
from .base import StrategyKind, group_topology, register

if TYPE_CHECKING:
    from ..callspec import AttentionCall

# Default bound on one gathered chunk of K+V (the next one is in flight too).
CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class GatherCall:
    call: AttentionCall
    qsegs: tuple[Segment, ...]  # this rank's queries
    ksegs: tuple[Segment, ...]  # the gathered keys, in kernel row order
    chunks: tuple[tuple[int, int], ...]  # kv head ranges
    to_global: torch.Tensor | None  # gathered (rank-order) row feeding each kernel row; None = identity

    @property
    def group(self):
        return self.call.group

    @property
    def world(self) -> int:
        return self.call.topo.world

    def tasks(self, backend: Backend) -> tuple[Task, ...]:
        return block_tasks(self.call.spec, self.qsegs, self.ksegs, backend.caps)


def head_chunks(kv_heads: int, per_chunk: int) -> tuple[tuple[int, int], ...]:
    return tuple((g, min(g + per_chunk, kv_heads)) for g in range(0, kv_heads, per_chunk))


def default_chunk(k: torch.Tensor, v: torch.Tensor, world: int) -> int:
    """KV heads per chunk: within ``CHUNK_BYTES``, and at least two chunks when there is a gather to
    overlap."""
    b, n, kvh = k.shape[:3]
    per_head = b * n * world * (k.shape[3] + v.shape[3]) * k.element_size()
    fit = max(1, CHUNK_BYTES // max(per_head, 1))
    if world > 1 and kvh > 1:
        fit = min(fit, math.ceil(kvh / 2))
    return min(fit, kvh)


def _key_layout(layout: str, world: int, local_len: int, device, bounds):
    """(key segments in kernel row order, permutation from rank order or None)."""
    rule = layout_of(layout)
    if rule.in_order(world):
        return (Segment(0, world * local_len),), None
    if rule.in_halves:  # two runs per rank: sorted into one run of positions after the gather
        return (Segment(0, world * local_len),), torch.argsort(rule.rank_order(world, local_len, device, bounds))
    return tuple(s for r in range(world) for s in segments(layout, r, world, local_len, bounds)), None


def _start_gather(k, v, g0: int, g1: int, call: GatherCall):
    """Post the gather of kv heads [g0, g1) of every rank; returns (work, buffer, local sizes)."""
    kc, vc = k[:, :, g0:g1], v[:, :, g0:g1]
    send = torch.cat([kc.reshape(-1), vc.reshape(-1)])
    if call.world == 1:
        return None, send, (kc.shape, vc.shape)
    recv = send.new_empty(call.world * send.numel())
    work = gather_op()(recv, send, group=call.group, async_op=True)
    profiling.count_bytes(send.numel() * send.element_size() * (call.world - 1))  # a ring all-gather forwards W-1
    return work, recv, (kc.shape, vc.shape)


def _finish_gather(pending, call: GatherCall):
    """The gathered (k, v) of one chunk, full length, in kernel row order."""
    work, buf, (kshape, vshape) = pending
    if work is not None:
        comm.Pending([work], None, "all-gather of K/V").wait()
    w = call.world
    parts = buf.view(w, -1)
    nk = math.prod(kshape)
    out = []
    for part, shape in ((parts[:, :nk], kshape), (parts[:, nk:], vshape)):
        b, c, hc, d = shape
        x = part.reshape(w, b, c, hc, d).transpose(0, 1).reshape(b, w * c, hc, d)
        out.append(x if call.to_global is None else x.index_select(1, call.to_global))
    return out


def _gathered(k, v, call: GatherCall):
    """Yield (g0, g1, full k, full v) per K/V head chunk, the next chunk's gather in flight meanwhile."""
    pending = _start_gather(k, v, *call.chunks[0], call)
    for i, (g0, g1) in enumerate(call.chunks):
        kf, vf = _finish_gather(pending, call)
        if i + 1 < len(call.chunks):
            pending = _start_gather(k, v, *call.chunks[i + 1], call)
        yield g0, g1, kf, vf


def _forward(q, k, v, call: GatherCall):
    backend, tasks = call.call.backend, call.tasks(call.call.backend)
    b, n, h, _ = q.shape
    dv = v.shape[-1]
    ratio = h // k.shape[2]
    acc_t = acc_dtype(q.dtype)
    out = torch.empty(b, n, h, dv, dtype=acc_t, device=q.device)
    lse = torch.empty(b, h, n, dtype=acc_t, device=q.device)
    outcome = comm.Outcome(call.group, "all-gather forward", q.device)  # Note [A failure after the agreement]
    for g0, g1, kf, vf in _gathered(k, v, call):
        hs = slice(g0 * ratio, g1 * ratio)
        qc = q[:, :, hs]
        acc = OutLseAccumulator(qc, dv)
        profiling.count_flops(tasks, qc, vf, backward=False)
        if outcome.ok:  # after a failure no more kernels; the gathers go on
            with profiling.timed(), outcome:
                run_forward(backend, qc, kf, vf, tasks, call.call.spec, call.call.scale, acc,
                            call.call.heads(hs.start, hs.stop).scores)
        out[:, :, hs] = acc.out
        lse[:, hs] = acc.lse
    outcome.settle()
    return out.to(q.dtype), lse


def _backward(dout, q, k, v, out, lse, call: GatherCall, dlse):
    backend = call.call.backend_for(dlse)
    tasks = call.tasks(backend)
    ratio = q.shape[2] // k.shape[2]
    acc_t = acc_dtype(q.dtype)
    dq = torch.empty(q.shape, dtype=acc_t, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    w = call.world
    scatters = []
    outcome = comm.Outcome(call.group, "all-gather backward", q.device)  # Note [A failure after the agreement]
    for g0, g1, kf, vf in _gathered(k, v, call):
        hs = slice(g0 * ratio, g1 * ratio)
        qc = q[:, :, hs]
        dqc = GradAccumulator(qc.shape, acc_t, q.device)
        gk, gv = GradAccumulator(kf.shape, acc_t, q.device), GradAccumulator(vf.shape, acc_t, q.device)
        profiling.count_flops(tasks, qc, vf, backward=True)
        if outcome.ok:  # after a failure no more kernels; the gathers and scatters go on
            with profiling.timed(), outcome:
                run_backward(backend, dout[:, :, hs], qc, kf, vf, out[:, :, hs], lse[:, hs], tasks,
                             call.call.spec, call.call.scale, dqc, gk, gv, None if dlse is None else dlse[:, hs],
                             call.call.heads(hs.start, hs.stop).scores)
        dq[:, :, hs] = dqc.get()
        gk, gv = gk.get(), gv.get()
        if call.to_global is not None:  # back to rank order for the scatter
            gk = torch.empty_like(gk).index_copy_(1, call.to_global, gk)
            gv = torch.empty_like(gv).index_copy_(1, call.to_global, gv)
        scatters.append(((g0, g1), _start_scatter(gk, gv, w, call)))
    for (g0, g1), (work, res, kshape) in scatters:
        if work is not None:
            comm.Pending([work], None, "reduce-scatter of dK/dV").wait()
        nk = math.prod(kshape)
        dk[:, :, g0:g1] = res[:nk].view(kshape)
        dv[:, :, g0:g1] = res[nk:].view(*kshape[:3], v.shape[3])
    outcome.settle()
    return dq.to(q.dtype), dk, dv


def _start_scatter(gk, gv, w: int, call: GatherCall):
    """Sum every rank's dK/dV share of each block at the block's owner (reduce-scatter)."""
    b, n, hc, d = gk.shape
    c = n // w

    def by_rank(x):
        return x.reshape(b, w, c, hc, -1).transpose(0, 1).reshape(w, -1)

    send = torch.cat([by_rank(gk), by_rank(gv)], dim=1).reshape(-1)
    kshape = (b, c, hc, d)
    if w == 1:
        return None, send, kshape
    res = send.new_empty(send.numel() // w)
    work = reduce_scatter_op()(res, send, group=call.group, async_op=True)
    profiling.count_bytes(res.numel() * res.element_size() * (w - 1))
    return work, res, kshape


def _segments(call: AttentionCall, q_len: int, k_len: int, device):
    """(this rank's query segments, the gathered keys' segments in kernel row order, their permutation)."""
    topo, bounds = call.topo, call.spec.doc_bounds
    ksegs, to_global = _key_layout(call.layout, topo.world, k_len, device, bounds)
    qsegs = query_segments(call.layout, topo.rank, topo.world, q_len, call.q_offset, bounds)
    if len(ksegs) == 1:
        ksegs = cut_at(ksegs[0], qsegs)
    return qsegs, ksegs, to_global


def tasks_for(call: AttentionCall, q_len: int, k_len: int) -> tuple[Task, ...]:
    """This rank's kernel tasks (what ``run`` computes), without running anything."""
    qsegs, ksegs, _ = _segments(call, q_len, k_len, "cpu")
    return block_tasks(call.spec, qsegs, ksegs, call.backend.caps)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall):
    """Gather K/V chunk by chunk and attend; (out, lse), differentiable."""
    topo = call.topo
    qsegs, ksegs, to_global = _segments(call, q.shape[1], k.shape[1], q.device)
    per = call.options.kv_head_chunk or default_chunk(k, v, topo.world)
    gather = GatherCall(call, qsegs, ksegs, head_chunks(k.shape[2], per), to_global)
    return SavedAttention.apply(q, k, v, call.sinks, _forward, _backward, gather)



# ---- the cost model's estimate ------------------------------------------------------------

def estimate_allgather(p: Problem, hw: Hardware) -> Estimate:
    w, c, e = p.world, p.local_len, p.dtype_bytes
    f_rank, bw = hw.rank_flops(w), hw.link(w)
    spec, unit = p.spec(), flop_unit(p, p.heads)
    lay = effective_layout(p.layout, w)
    rule = layout_of(lay)

    def keys(r):
        if rule.strided:
            return tuple(s for i in range(w) for s in segments(lay, i, w, c))
        return cut_at(Segment(0, w * c), segments(lay, r, w, c, spec.doc_bounds))

    pairs = [pair_flops(spec, segments(lay, r, w, c, spec.doc_bounds), keys(r), unit, hw.key_block)
             for r in range(w)]
    fwd, ran = max(f for f, _ in pairs), max(x for _, x in pairs)
    per_head = p.batch * c * w * (p.head_dim + p.dv) * e
    n = 1 if w == 1 else math.ceil(p.kv_heads / min(max(1, CHUNK_BYTES // per_head), math.ceil(p.kv_heads / 2)))
    kv_local = p.batch * c * p.kv_heads * (p.head_dim + p.dv) * e
    gather = ((w - 1) * (hw.latency * n + kv_local / bw)) if w > 1 else 0.0
    cf = ran / f_rank
    t = gather / n + (n - 1) * max(cf, gather) / n + cf / n
    exposed = gather / n + (n - 1) * max(0.0, gather - cf) / n
    sent, flops, comm_s = kv_local * (w - 1), fwd, gather
    hidden = n > 1 and gather <= cf
    mem = p.batch * c * (p.heads * (p.head_dim + p.dv) * e + p.kv_heads * (p.head_dim + p.dv) * e
                         + p.heads * p.dv * 4) + 2 * per_head * math.ceil(p.kv_heads / n)
    if p.backward:
        rs = (w - 1) * (hw.latency * n + kv_local * 4 / e / bw) if w > 1 else 0.0
        cb = hw.backward_time * cf
        xb = gather + rs
        t += gather / n + (n - 1) * max(cb, xb) / n + cb / n + rs / n
        exposed += gather / n + (n - 1) * max(0.0, xb - cb) / n + rs / n
        sent += kv_local * (w - 1) * (1 + 4 / e)
        flops += 2.5 * fwd
        comm_s += xb
        hidden = hidden and xb <= cb
        mem += per_head * math.ceil(p.kv_heads / n) * 4 / e + p.batch * c * p.heads * p.head_dim * 4
    compute_s = ran * (1.0 + hw.backward_time if p.backward else 1.0) / f_rank
    copy_bw = hw.rank_copy(w)
    if copy_bw is not None and w > 1:
        # Passes over the gathered K/V: regrouped from rank order (and for layouts in halves also permuted
        # into position order) in forward and again in backward; float32 dK/dV zeroed, accumulated, (permuted back,)
        # regrouped by rank and packed for the reduce-scatter.
        full = p.batch * c * w * p.kv_heads * (p.head_dim + p.dv)
        reorder = 1 if rule.in_halves else 0
        passes = (2 + reorder) * e * (2 if p.backward else 1) + ((4 + reorder) * 4 if p.backward else 0)
        copy_s = full * passes / copy_bw
        t, compute_s = t + copy_s, compute_s + copy_s
    return Estimate("allgather", True, f"{n} chunk(s) of {math.ceil(p.kv_heads / n)} kv heads", flops,
                    compute_s, sent, comm_s, exposed, t, mem, hidden)


STRATEGY = register(StrategyKind(Strategy.ALLGATHER, run, functools.partial(group_topology, Strategy.ALLGATHER),
                                 tasks_for, frozenset({"kv_head_chunk"}), estimate_allgather))
