"""Ring Attention (Liu, Zaharia, Abbeel 2023): exact attention with key/value blocks passed around a ring.

Each rank keeps its query block. At every step it posts the exchange that brings the next key/value
block, computes attention against the block it holds, and merges the partial (out, lse) by logsumexp.
The schedule is in Note [Ring schedule and offsets] and the backward's two ways of moving blocks in
Note [Backward exchange: ring vs direct] (both in ``ringattn/schedule.py``).

Memory: every block, accumulator and wire buffer is kept in the kernels' heads-major storage (no
strided passes); q, k, v, out and lse are all the forward saves.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, NamedTuple

import torch

from .. import profiling
from ..autograd import SavedAttention
from ..comm import TAG_GRAD, TAG_KV, TAG_RETURN, Outcome, Pending, Ring
from ..cost_model import Estimate, Hardware, Problem, flop_unit, pair_flops
from ..kernels import acc_dtype, heads_major
from ..kernels.base import Capabilities
from ..kernels.block import GradAccumulator, OutLseAccumulator, run_backward, run_forward
from ..layouts import effective_layout, segments
from ..masks import Task
from ..modes import BackwardExchange, Strategy
from ..schedule import RETURNS_IN_FLIGHT, TILES_AHEAD, RingSchedule, directions, make_schedule
from ..tasks import KeyTile, tile_tasks
from .base import StrategyKind, group_topology, register

if TYPE_CHECKING:
    from ..callspec import AttentionCall


def schedule_for(call: AttentionCall, q_len: int, k_len: int) -> RingSchedule:
    # Always the call's own (agreed) backend's caps, even where the backward computes with another
    # backend: whether a gradient flows into lse is decided per rank, and the key tiles that a rank
    # sends and receives must be cut the same way on every rank.
    topo = call.topo
    return make_schedule(call.spec, call.layout, topo.rank, topo.world, k_len, call.backend.caps,
                     call.backward_exchange is BackwardExchange.DIRECT, q_len, call.q_offset)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall):
    """The ring on ``call.group`` over key blocks of ``k.shape[1]`` rows (queries: ``q.shape[1]`` rows
    from ``call.q_offset`` on); (out, lse), differentiable."""
    # Blocks live in the kernels' heads-major storage for the whole call (one copy each here, if needed).
    q, k, v = heads_major(q), heads_major(k), heads_major(v)
    return SavedAttention.apply(q, k, v, call.sinks, _forward, _backward, call)


def _prefetch(ring: Ring, steps, i: int, cur, own) -> Pending | None:
    """Post the exchange that brings the block of step i + 1."""
    if i + 1 >= len(steps) or ring.world == 1:
        return None
    nxt = steps[i + 1]
    d = 1 if nxt > 0 else -1
    block = own if nxt == -1 else cur  # the reverse ring starts from each rank's own block
    return ring.exchange(block, d, block, -d, TAG_KV)


def _forward(q, k, v, call: AttentionCall):
    ring = Ring(call.group)
    schedule = schedule_for(call, q.shape[1], k.shape[1])
    acc = OutLseAccumulator(q, v.shape[-1])
    cur = (k, v)
    outcome = Outcome(call.topo.agree_over, "ring forward", q.device)  # Note [A failure after the agreement]
    for i, o in enumerate(schedule.steps):
        pending = _prefetch(ring, schedule.steps, i, cur, (k, v))
        tasks = schedule.tasks[o]
        if tasks and outcome.ok:
            profiling.count_flops(tasks, q, v, backward=False)
            with profiling.timed(), outcome:
                run_forward(call.backend, q, cur[0], cur[1], tasks, call.spec, call.scale, acc, call.scores)
        if pending is not None:
            # Drop the finished exchange at once: it still holds the block we sent, and keeping it
            # until the next post would make three blocks live instead of two.
            cur, pending = pending.wait(), None
    outcome.settle()
    profiling.count_steps(len(schedule.steps))
    profiling.count_skipped(ring.world - len(schedule.steps),
                            k.numel() * k.element_size() + v.numel() * v.element_size())
    # Row-major (batch, n, heads, dv) out, as a caller's projection wants it: ``out.flatten(2)`` is then a
    # view, and the projection saves the same storage we do rather than a second copy of it.
    return acc.out.to(q.dtype).contiguous(), acc.lse


def _backward(dout, q, k, v, out, lse, call: AttentionCall, dlse):
    return _RingBackward(dout, q, k, v, out, lse, call, dlse).run()


class _Returned(NamedTuple):
    """A tile of our own block's dK/dV on its way home: key rows ``[start, stop)``."""

    start: int
    stop: int
    pending: Pending


def _keys_from(tasks: tuple[Task, ...], start: int) -> list[Task]:
    return [dataclasses.replace(t, k0=t.k0 - start, k1=t.k1 - start) for t in tasks]


class _RingBackward:
    """One backward pass of the ring (Note [Backward exchange: ring vs direct]).

    Steps are of three kinds: the local step (our own block), a travelling step (the block and its dK/dV
    move on to the next rank) and a returning step (the last of a direction: dK/dV go home tile by tile,
    the block possibly streamed in tile by tile). dQ accumulates here; our own block's dK/dV accumulate
    here too, from the local step and from the tiles other ranks return.
    """

    def __init__(self, dout, q, k, v, out, lse, call: AttentionCall, dlse):
        self.call, self.ring = call, Ring(call.group)
        self.backend = call.backend_for(dlse)
        self.schedule = schedule_for(call, q.shape[1], k.shape[1])
        self.q, self.k, self.v, self.out, self.lse, self.dlse = q, k, v, out, lse, dlse
        self.dout = heads_major(dout)
        self.acc = acc_dtype(q.dtype)
        self.dq = GradAccumulator(q.shape, self.acc, q.device)
        self.dk = GradAccumulator(k.shape, self.acc, q.device)
        self.dv = GradAccumulator(v.shape, self.acc, q.device)
        self.returns: list[_Returned] = []  # posted returns of our own dK/dV tiles, in posting order
        self.outcome = Outcome(call.topo.agree_over, "ring backward", q.device)  # Note [A failure after the agreement]

    def run(self):
        k, v, schedule, steps = self.k, self.v, self.schedule, self.schedule.steps
        cur, grads_in = (k, v), None
        for i, o in enumerate(steps):
            pending = None if i + 1 in schedule.streamed else _prefetch(self.ring, steps, i, cur, (k, v))
            if o == 0:
                self.compute(schedule.tasks[0], k, v, self.dk, self.dv)
            else:
                initial = grads_in.wait() if grads_in is not None else None
                grads_in = None  # frees the gradient buffers we sent a step ago
                if i not in schedule.last:
                    grads_in = self.travelling_step(o, cur, initial)
                else:
                    if i in schedule.streamed:
                        cur = None  # nothing of it is needed: the neighbour's block streams in instead
                    self.returning_step(i, o, cur, initial)
                initial = None
            if pending is not None:
                # Drop the finished exchange at once (see _forward).
                cur, pending = pending.wait(), None
        cur = None
        for r in self.returns:
            self.land(r)
        self.outcome.settle()
        dq, dk, dv = self.dq.get(), self.dk.get(), self.dv.get()
        dt = self.q.dtype
        return dq.to(dt), dk.to(dt), dv.to(dt)

    def compute(self, tasks, kk, vv, gk: GradAccumulator, gv: GradAccumulator) -> None:
        if tasks and self.outcome.ok:
            profiling.count_flops(tasks, self.q, self.v, backward=True)
            with profiling.timed(), self.outcome:
                run_backward(self.backend, self.dout, self.q, kk, vv, self.out, self.lse, tuple(tasks),
                             self.call.spec, self.call.scale, self.dq, gk, gv, self.dlse, self.call.scores)

    def key_tiles(self, tasks: tuple[Task, ...]) -> tuple[KeyTile, ...]:
        return tile_tasks(tasks, self.k.shape[1], self.call.backend.caps)

    def travelling_step(self, o: int, cur, initial) -> Pending:
        """Our share of the visiting block's dK/dV, added to what travelled with it; both move on."""
        d = 1 if o > 0 else -1
        gk, gv = (GradAccumulator(t.shape, self.acc, t.device, initial=None if initial is None else initial[x])
                  for x, t in enumerate((self.k, self.v)))
        self.compute([t for tile in self.key_tiles(self.schedule.tasks[o]) for t in tile.tasks], cur[0], cur[1], gk, gv)
        grads = (gk.get(), gv.get())
        # The exchange keeps what it sends alive only as long as it needs it.
        return self.ring.exchange(grads, d, grads, -d, TAG_GRAD)

    def returning_step(self, i: int, o: int, cur, initial) -> None:
        """Last step of a direction (every step, if direct): the gradients go straight back to the owner
        (rank - o), key tile by key tile as each is finished, so the transfer overlaps the next tile's
        work and only a few tiles of gradient buffers are ever in flight. A tile nobody touched is neither
        sent nor awaited: both ends know it from the plans (ours, and that of the rank holding our block)
        unless travelling gradients (``initial``) reached it."""
        k, v = self.k, self.v
        mine = self.key_tiles(self.schedule.tasks[o])
        theirs = self.key_tiles(self.schedule.tasks_of_holder[o]) if initial is None else mine
        live = {j for j, (a, b) in enumerate(zip(mine, theirs)) if a.tasks or b.tasks or initial is not None}
        source = self.streamed_tiles(o, mine, theirs) if i in self.schedule.streamed else \
            ((cur[0][:, t.start:t.stop], cur[1][:, t.start:t.stop]) for t in mine)
        for j, kv_tile in enumerate(source):
            if j not in live:
                continue
            tile = mine[j]
            grads = self.tile_gradients(tile, kv_tile, initial) if tile.tasks or initial is not None else ()
            kv_tile = None
            u, w = tile.start, tile.stop
            like = (k[:, u:w], v[:, u:w]) if theirs[j].tasks or initial is not None else ()
            self.returns.append(_Returned(u, w, self.ring.exchange(grads, -o, like, o, TAG_RETURN, dtype=self.acc)))
            grads = None
            # Land finished tiles in posting order (a fixed order keeps the sums bitwise reproducible);
            # wait only past a few in flight: ranks finish their tiles at different times, and waiting
            # for each in turn would make every rank as slow as the slowest at every tile.
            while self.returns and (len(self.returns) > RETURNS_IN_FLIGHT or self.returns[0].pending.done()):
                self.land(self.returns.pop(0))

    def tile_gradients(self, tile: KeyTile, kv_tile, initial) -> tuple[torch.Tensor, torch.Tensor]:
        u, w = tile.start, tile.stop
        b, _, kvh, _ = self.k.shape
        gk, gv = (GradAccumulator((b, w - u, kvh, t.shape[-1]), self.acc, t.device,
                                  initial=None if initial is None else initial[x][:, u:w])
                  for x, t in enumerate((self.k, self.v)))
        if tile.tasks:
            self.compute(_keys_from(tile.tasks, u), kv_tile[0], kv_tile[1], gk, gv)
        return gk.get(), gv.get()

    def streamed_tiles(self, o: int, mine: tuple[KeyTile, ...], theirs: tuple[KeyTile, ...]):
        """For every key tile j in order: tile j of the block of rank - o, or None where we have no work in
        it; ours goes to rank + o where that rank has work (one message per head on CPU: a tile of our
        heads-major block is then sent from where it lies)."""
        k, v = self.k, self.v

        def post(j: int) -> Pending | None:
            u, w = mine[j].start, mine[j].stop
            send = (k[:, u:w], v[:, u:w]) if theirs[j].tasks else ()
            recv = (k[:, u:w], v[:, u:w]) if mine[j].tasks else ()
            return self.ring.exchange(send, o, recv, -o, TAG_KV, by_head=True) if send or recv else None

        # Several tiles ahead: ranks reach a given tile at different times (their work per key tile
        # differs), and asking one tile ahead would tie each to the slowest. "Ahead" counts tile indices,
        # which every rank shares, not the tiles this rank has work in: NCCL runs each rank's exchanges in
        # posting order, so all ranks must post them in one global order (key/value tile j + TILES_AHEAD,
        # then the return of tile j), or two ranks can each wait for an exchange the other has queued
        # behind one that waits for them (tests/test_exchange_order.py).
        ahead = [post(j) for j in range(min(TILES_AHEAD, len(mine)))]
        for j in range(len(mine)):
            if j + TILES_AHEAD < len(mine):
                ahead.append(post(j + TILES_AHEAD))
            pending = ahead.pop(0)
            yield None if pending is None else pending.wait()

    def land(self, ret: _Returned) -> None:
        """Add a returned tile of our own block's dK/dV (nothing if its holder had no work there)."""
        got = ret.pending.wait()
        if got:
            self.dk.add(ret.start, ret.stop, got[0])
            self.dv.add(ret.start, ret.stop, got[1])


def tasks_for(call: AttentionCall, q_len: int, k_len: int) -> tuple[Task, ...]:
    """This rank's kernel tasks over every step of its schedule (what ``run`` computes)."""
    schedule = schedule_for(call, q_len, k_len)
    return tuple(t for o in schedule.steps for t in schedule.tasks[o])



BACKWARD_TILE = Capabilities().backward_tile  # the key tiles a direct backward exchanges


# ---- the cost model's estimate ------------------------------------------------------------

def _ring_step_flops(p: Problem, world: int, local: int, heads: int,
                     key_block: int = 1) -> tuple[list[float], list[float], int]:
    """Forward FLOPs per ring step on the busiest rank (steps as ``ring.make_schedule`` schedules them), visible
    and executed (``key_block``), and the longest direction's number of steps."""
    spec = p.spec()
    lay = effective_layout(p.layout, world)
    segs = [segments(lay, r, world, local, spec.doc_bounds) for r in range(world)]
    unit = flop_unit(p, heads)
    per = [[pair_flops(spec, segs[r], segs[(r - o) % world], unit, key_block) for o in range(world)]
           for r in range(world)]
    a, b = directions([o for o in range(1, world) if any(per[r][o][0] > 0 for r in range(world))], world)
    steps = [0, *range(1, a + 1), *(world - i for i in range(1, b + 1))]
    return ([max(per[r][o][0] for r in range(world)) for o in steps],
            [max(per[r][o][1] for r in range(world)) for o in steps], max(a, b))


def _pipelined(compute: list[float], transfer: float) -> tuple[float, float]:
    """(time, exposed transfer) of steps whose next transfer runs during the current compute."""
    total, exposed = 0.0, 0.0
    for i, c in enumerate(compute):
        x = transfer if i + 1 < len(compute) else 0.0
        total += max(c, x)
        exposed += max(0.0, x - c)
    return total, exposed


def ring_cost(p: Problem, hw: Hardware, world: int, local: int, heads: int, kv_heads: int,
          bw: float) -> Estimate:
    f_rank = hw.rank_flops(p.world)
    e = p.dtype_bytes
    step_f, step_x, longest = _ring_step_flops(p, world, local, heads, hw.key_block)
    kv_bytes = p.batch * local * kv_heads * (p.head_dim + p.dv) * e
    x_fwd = hw.latency + kv_bytes / bw if world > 1 else 0.0
    t, exposed = _pipelined([f / f_rank for f in step_x], x_fwd)
    flops, sent = sum(step_f), kv_bytes * (len(step_f) - 1)
    hidden = all(f / f_rank >= x_fwd for f in step_x[:-1] if f > 0)
    # The backward streams every block in key tiles from its owner and returns dK/dV tile by tile when the
    # exchange is direct, and also with the ring exchange where no direction is longer than one step
    # (2 ranks, short windows); otherwise dK/dV travel with their block, the next block in flight.
    direct = world > 1 and (p.backward_exchange == "direct" or longest <= 1)
    if p.backward:
        grad_bytes = p.batch * local * kv_heads * (p.head_dim + p.dv) * 4  # float32 dK/dV
        if direct:  # two exchanges per key tile (a group's messages go together: one latency each)
            tiles = -(-local // BACKWARD_TILE)
            x_bwd = 2 * tiles * hw.latency + (kv_bytes + grad_bytes) / bw
            ret = hw.latency + grad_bytes / tiles / bw  # the last tile home
        else:  # dK/dV travel with their block, then go home in one hop
            x_bwd = 2 * hw.latency + (kv_bytes + grad_bytes) / bw if world > 1 else 0.0
            ret = hw.latency + grad_bytes / bw if world > 1 else 0.0
        tb, eb = _pipelined([hw.backward_time * f / f_rank for f in step_x], x_bwd)
        t, exposed = t + tb + ret, exposed + eb + ret
        flops += 2.5 * sum(step_f)
        sent += (kv_bytes + grad_bytes) * (len(step_f) - 1)  # each step's dK/dV leave once, either way
        hidden = hidden and all(hw.backward_time * f / f_rank >= x_bwd for f in step_x[:-1] if f > 0)
    steps = len(step_f)
    kv_row, rows = kv_heads * (p.head_dim + p.dv), p.batch * local
    # q, out, own K/V, the float32 out accumulator and lse; in flight: the current and next K/V block.
    mem = rows * (heads * (p.head_dim + p.dv) * e + kv_row * e + heads * p.dv * 4 + heads * 4 * 2)
    in_flight = 2 * rows * kv_row * e
    if p.backward:  # float32 dq, dk, dv of our own block
        mem += rows * (heads * p.head_dim + kv_row) * 4
        if direct:  # a few key tiles of K/V coming in and of dK/dV going home, instead of whole blocks
            tile_rows = p.batch * min(BACKWARD_TILE, local)
            tiles_live = tile_rows * kv_row * (e * (TILES_AHEAD + 1) + 4 * 2 * (RETURNS_IN_FLIGHT + 1))
            in_flight = max(in_flight, tiles_live)
        else:  # the travelling dK/dV and the ones coming in
            in_flight += 2 * rows * kv_row * 4
    mem += in_flight
    comm_s = (steps - 1) * x_fwd + ((steps - 1) * x_bwd + ret if p.backward else 0.0)
    how = ", direct backward" if p.backward_exchange == "direct" and world > 1 and p.backward else ""
    compute_s = sum(step_x) * (1.0 + hw.backward_time if p.backward else 1.0) / f_rank
    return Estimate("ring", True, f"{steps} steps of {local} tokens{how}", flops, compute_s, sent, comm_s,
                    exposed, t, mem, hidden)


def estimate_ring(p: Problem, hw: Hardware) -> Estimate:
    return ring_cost(p, hw, p.world, p.local_len, p.heads, p.kv_heads, hw.link(p.world))


STRATEGY = register(StrategyKind(Strategy.RING, run, functools.partial(group_topology, Strategy.RING), tasks_for,
                                 frozenset({"backward_exchange"}), estimate_ring))
