"""Ring Attention (Liu, Zaharia, Abbeel 2023): exact attention with key/value blocks passed around a ring.

Each rank keeps its query block. At every step it posts the exchange that brings the next key/value
block, computes attention against the block it holds, and merges the partial (out, lse) by logsumexp.

The schedule is a list of *offsets*: at offset ``o`` a rank holds the block of rank ``rank - o``.
``0, 1, ..., a`` is the forward ring (blocks move to ``rank + 1``) and ``-1, ..., -b`` the reverse ring
(blocks move to ``rank - 1``). Offsets whose block pair is empty on every rank are left out, so a
sliding window on the contiguous layout takes about ``ceil(left / local_len) + 1`` steps instead of W
(plus the right side when non-causal). Backward replays the schedule: dQ accumulates locally, dK/dV
accumulate in float32 buffers that travel with their block and are sent straight back to the owner
at the end of each direction (``backward_exchange="ring"``, the paper's). With
``backward_exchange="direct"`` the backward takes every visiting block straight from its owner, key tile
by key tile, and returns each tile's dK/dV straight to it: the same bytes per step, but between ranks
``o`` apart rather than neighbours, and no block moves on.

Memory: every block, accumulator and wire buffer is kept in the kernels' heads-major storage (no
strided passes). A visiting block is computed in key x query tiles of at most ``masks.CHUNK`` (each
kernel output added into an accumulator is a tile, not a block), and on the last step of a direction
its dK/dV leave tile by tile as each is finished. A neighbour's block that is used for one step only
(any direction one step long: 2 ranks, short windows) is not prefetched whole either but streams in
tile by tile, two tiles ahead. On 2 ranks a rank then needs a few tiles beyond what a single process
needs; on more, the travelling dK/dV and the next block in flight add about two blocks for one layer,
unless the backward exchange is direct (a few tiles at any world size).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass

import torch

from . import comm, masks
from .comm import TAG_GRAD, TAG_KV, TAG_RETURN, Ring
from .kernels import BACKENDS, heads_major, lse_dtype, select
from .kernels.block import Partial, Sum, run_backward, run_forward
from .layouts import segments
from .masks import MaskSpec, plan_block, tile_tasks
from .validate import agree, call_number, check_backward_exchange, check_qkv, describe, make_spec, softmax_scale_of

RETURNS_IN_FLIGHT = 2  # returned dK/dV key tiles a rank may have posted and not yet added
TILES_AHEAD = 2  # key/value tiles of a streamed block asked for ahead of the one being computed


@dataclass(frozen=True)
class RingPlan:
    steps: tuple[int, ...]  # offsets, same on every rank
    tasks: dict  # offset -> this rank's kernel tasks
    held: dict  # offset -> the tasks of the rank that holds *our* block at that offset (rank + o)


def directions(needed: list[int], world: int) -> tuple[int, int]:
    """Steps ``(a, b)`` of the forward run ``1..a`` and the reverse run ``-1..-b`` covering the offsets
    ``needed`` (in ``1..world-1``; the reverse run reaches offset ``world - i`` at step ``-i``)."""
    # Fewest steps total. Among equally short schedules, one where no block moves on if there is one: a
    # direction one step long streams its block, while a longer one has dK/dV travelling and the next
    # block in flight (e.g. 3 ranks causal: 0, 1, -1 rather than 0, -1, -2). Otherwise the first
    # (measured: on 4 ranks, one long direction peaks lower than a short one next to a long one, whose
    # returns overlap it).
    def cost(a: int, b: int) -> tuple[int, bool]:
        return a + b, a > 1 or b > 1

    return min(((a, max((world - o for o in needed if o > a), default=0)) for a in range(world)),
               key=lambda ab: cost(*ab))


@functools.lru_cache(maxsize=256)
def make_plan(spec: MaskSpec, layout: str, rank: int, world: int, local_len: int) -> RingPlan:
    segs = [segments(layout, r, world, local_len) for r in range(world)]

    def busy(r: int, o: int) -> bool:
        qsegs, ksegs = segs[r], segs[(r - o) % world]
        return any(spec.classify(qs, ks).kind.value != 0 for qs in qsegs for ks in ksegs)

    a, b = directions([o for o in range(1, world) if any(busy(r, o) for r in range(world))], world)
    steps = (0, *range(1, a + 1), *(-i for i in range(1, b + 1)))
    tasks = {o: plan_block(spec, segs[rank], segs[(rank - o) % world]) for o in steps}
    held = {o: plan_block(spec, segs[(rank + o) % world], segs[rank]) for o in steps if o}
    return RingPlan(steps, tasks, held)


@dataclass(frozen=True)
class _Call:
    group: object
    plan: RingPlan
    spec: MaskSpec
    scale: float
    direct: bool = False  # backward_exchange="direct"


def _timed(fn, *args):
    s = comm.stats()
    if s is None:
        return fn(*args)
    t0 = time.perf_counter()
    r = fn(*args)
    s.compute_s += time.perf_counter() - t0
    return r


def _prefetch(ring: Ring, steps, i: int, cur, own) -> comm.Pending | None:
    """Post the exchange that brings the block of step i + 1."""
    if i + 1 >= len(steps) or ring.world == 1:
        return None
    nxt = steps[i + 1]
    d = 1 if nxt > 0 else -1
    block = own if nxt == -1 else cur  # the reverse ring starts from each rank's own block
    return ring.exchange(block, d, block, -d, TAG_KV)


def _ring_forward(q, k, v, call: _Call):
    ring = Ring(call.group)
    backend = select(q, k, v)
    acc = Partial(q, v.shape[-1])
    steps = call.plan.steps
    cur = (k, v)
    for i, o in enumerate(steps):
        pending = _prefetch(ring, steps, i, cur, (k, v))
        tasks = call.plan.tasks[o]
        if tasks:
            comm.count_flops(tasks, q, v, False)
            _timed(run_forward, backend, q, cur[0], cur[1], tasks, call.spec, call.scale, acc)
        if pending is not None:
            # Drop the finished exchange at once: it still holds the block we sent, and keeping it
            # until the next post would make three blocks live instead of two.
            cur, pending = pending.wait(), None
    s = comm.stats()
    if s is not None:
        s.steps += len(steps)
    # Row-major (batch, n, heads, dv) out, as a caller's projection wants it: ``out.flatten(2)`` is then a
    # view, and the projection saves the same storage we do rather than a second copy of it.
    return acc.out.to(q.dtype).contiguous(), acc.lse


def _shift_keys(tasks, u: int):
    return [dataclasses.replace(t, k0=t.k0 - u, k1=t.k1 - u) for t in tasks]


def _ring_backward(dout, q, k, v, out, lse, call: _Call, dlse):
    ring = Ring(call.group)
    dout = heads_major(dout)
    backend = select(q, k, v)
    if dlse is not None:
        # Gradient through lse folds into D (D - dlse); only the reference backend takes it.
        backend = BACKENDS["reference"]
    acc = lse_dtype(q.dtype)
    b, n, kvh, _ = k.shape
    dq = Sum(q.shape, acc, q.device)
    dk, dv = Sum(k.shape, acc, q.device), Sum(v.shape, acc, q.device)
    steps = call.plan.steps

    def compute(tasks, kk, vv, gk, gv):
        if tasks:
            comm.count_flops(tasks, q, v, True)
            _timed(run_backward, backend, dout, q, kk, vv, out, lse, tuple(tasks), call.spec, call.scale,
                   dq, gk, gv, dlse)

    def land(ret):  # a returned tile of our own block's dK/dV (none if its holder had no work there)
        u, w, pending = ret
        got = pending.wait()
        if got:
            dk.add(u, w, got[0])
            dv.add(u, w, got[1])

    def last_of_direction(i: int) -> bool:  # the block goes home after this step (always, if direct)
        o = steps[i]
        return o != 0 and (call.direct or i + 1 == len(steps) or steps[i + 1] != o + (1 if o > 0 else -1))

    # A block that is used for one step only (a direction one step long, e.g. 2 ranks; every block if
    # direct) is not prefetched whole: it streams in from its owner key tile by key tile during that
    # step, TILES_AHEAD tiles ahead, each dropped once used, so at no time does a whole extra block sit
    # beside our gradients.
    streamed = {i for i in range(len(steps)) if last_of_direction(i) and (call.direct or abs(steps[i]) == 1)}

    def streamed_tiles(o, tiles, theirs):
        """For every key tile j in order: tile j of the block of rank - o, or None where we have no work in
        it; ours goes to rank + o where that rank has work (one message per head on CPU: a tile of our
        heads-major block is then sent from where it lies)."""
        def post(j):
            u, w, col = tiles[j]
            send = (k[:, u:w], v[:, u:w]) if theirs[j][2] else ()
            recv = (k[:, u:w], v[:, u:w]) if col else ()
            return ring.exchange(send, o, recv, -o, TAG_KV, by_head=True) if send or recv else None

        # Several tiles ahead: ranks reach a given tile at different times (their work per key tile
        # differs), and asking one tile ahead would tie each to the slowest. "Ahead" counts tile indices,
        # which every rank shares, not the tiles this rank has work in: NCCL runs each rank's exchanges in
        # posting order, so all ranks must post them in one global order (key/value tile j + TILES_AHEAD,
        # then the return of tile j), or two ranks can each wait for an exchange the other has queued
        # behind one that waits for them (tests/test_exchange_order.py).
        ahead = [post(j) for j in range(min(TILES_AHEAD, len(tiles)))]
        for j in range(len(tiles)):
            if j + TILES_AHEAD < len(tiles):
                ahead.append(post(j + TILES_AHEAD))
            pending = ahead.pop(0)
            yield None if pending is None else pending.wait()

    def return_step(i, o, cur, initial):
        """Last step of a direction (every step, if direct): the gradients go straight back to the owner
        (rank - o), key tile by key tile as each is finished, so the transfer overlaps the next tile's
        work and only a few tiles of gradient buffers are ever in flight. A tile nobody touched is neither
        sent nor awaited: both ends know it from the plans (ours, and that of the rank holding our block)
        unless travelling gradients (``initial``) reached it."""
        tiles = tile_tasks(call.plan.tasks[o], n, masks.CHUNK)
        theirs = tile_tasks(call.plan.held[o], n, masks.CHUNK) if initial is None else tiles
        live = {j for j, (t, h) in enumerate(zip(tiles, theirs)) if t[2] or h[2] or initial is not None}
        source = streamed_tiles(o, tiles, theirs) if i in streamed else \
            ((cur[0][:, u:w], cur[1][:, u:w]) for u, w, _ in tiles)
        for j, kv_tile in enumerate(source):
            if j not in live:
                continue
            (u, w, col), col_theirs = tiles[j], theirs[j][2]
            bufs = ()
            if col or initial is not None:
                gk, gv = (Sum((b, w - u, kvh, t.shape[-1]), acc, q.device,
                              initial=None if initial is None else initial[x][:, u:w])
                          for x, t in enumerate((k, v)))
                compute(_shift_keys(col, u), kv_tile[0], kv_tile[1], gk, gv)
                bufs = (gk.get(), gv.get())
            kv_tile = gk = gv = None
            like = (k[:, u:w], v[:, u:w]) if col_theirs or initial is not None else ()
            returns.append((u, w, ring.exchange(bufs, -o, like, o, TAG_RETURN, dtype=acc)))
            bufs = None
            # Land finished tiles in posting order (a fixed order keeps the sums bitwise reproducible);
            # wait only past a few in flight: ranks finish their tiles at different times, and waiting
            # for each in turn would make every rank as slow as the slowest at every tile.
            while returns and (len(returns) > RETURNS_IN_FLIGHT or returns[0][2].done()):
                land(returns.pop(0))

    cur, grads_in, returns = (k, v), None, []
    for i, o in enumerate(steps):
        pending = None if i + 1 in streamed else _prefetch(ring, steps, i, cur, (k, v))
        if o == 0:
            compute(call.plan.tasks[0], k, v, dk, dv)
        else:
            initial = grads_in.wait() if grads_in is not None else None
            grads_in = None  # frees the gradient buffers we sent a step ago
            if not last_of_direction(i):  # the block moves on: its gradient accumulators travel with it
                d = 1 if o > 0 else -1
                gk, gv = (Sum(t.shape, acc, q.device, initial=None if initial is None else initial[x])
                          for x, t in enumerate((k, v)))
                compute([t for _, _, col in tile_tasks(call.plan.tasks[o], n, masks.CHUNK) for t in col],
                        cur[0], cur[1], gk, gv)
                bufs = (gk.get(), gv.get())
                grads_in = ring.exchange(bufs, d, bufs, -d, TAG_GRAD)
                gk = gv = bufs = None  # the exchange keeps what it sends alive only as long as it needs it
            else:
                if i in streamed:
                    cur = None  # nothing of it is needed: the neighbour's block streams in instead
                return_step(i, o, cur, initial)
            initial = None
        if pending is not None:
            # Drop the finished exchange at once: it still holds the block we sent, and keeping it
            # until the next post would make three blocks live instead of two.
            cur, pending = pending.wait(), None
    cur = None
    for r in returns:
        land(r)
    dq, dk, dv = dq.get(), dk.get(), dv.get()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class SavedAttention(torch.autograd.Function):
    """``(out, lse) = fwd(q, k, v, call)``; backward calls ``bwd(dout, q, k, v, out, lse, call, dlse)``.

    Shared by the strategies: only q, k, v, out and lse (O(local_len)) are saved, and the backward
    recomputes block by block. ``dlse`` is None unless a gradient really flows into the returned lse.
    """

    @staticmethod
    def forward(ctx, q, k, v, fwd, bwd, call):
        out, lse = fwd(q, k, v, call)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bwd, ctx.call = bwd, call
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None and not bool((dlse != 0).any()):
            dlse = None
        dq, dk, dv = ctx.bwd(dout, q, k, v, out, lse, ctx.call, dlse)
        return dq, dk, dv, None, None, None


def ring_attention(
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
    """Exact attention over a sequence split across the ranks of ``group``.

    Args:
        q: ``(batch, local_len, heads, head_dim)``, this rank's queries.
        k: ``(batch, local_len, kv_heads, head_dim)``; ``heads % kv_heads == 0`` and query head ``i``
            reads key/value head ``i // (heads // kv_heads)``. Only the kv_heads travel.
        v: ``(batch, local_len, kv_heads, v_head_dim)``.
        group: the process group holding the sequence (None = default group; without an
            initialised ``torch.distributed``, exact single-process attention).
        causal: keep key ``j`` for query ``i`` iff ``j <= i`` (global positions).
        window: ``(left, right)``: keep ``i - left <= j <= i + right``; -1 = unbounded on that side.
        layout: ``"contiguous"``, ``"zigzag"`` or ``"striped"``: which global positions each rank holds
            (see ``ringattn.shard``).
        seq_len: the true global length; positions ``>= seq_len`` are padding, never attended to.
            None = ``world * local_len``.
        cu_seqlens: int tensor ``[0, ..., seq_len]`` of packed-document boundaries (batch 1).
        softmax_scale: None = ``1 / sqrt(head_dim)``.
        return_lse: also return the logsumexp ``(batch, heads, local_len)``, float32 (float64 for
            float64 input).
        backward_exchange: how the backward moves blocks. ``"ring"`` (the paper's): K/V pass from
            neighbour to neighbour and dK/dV travel with their block, the next block in flight; on
            more than 2 ranks that holds about two blocks beyond a single process for the layer.
            ``"direct"``: each rank streams the block it needs straight from its owner and returns the
            dK/dV of each key tile straight to it, a few tiles beyond a single process at any world
            size, with traffic between ranks up to W - 1 apart (no cost on a switch or NVLink; more
            on a physical ring of nodes). Results are identical. The forward is the ring either way.

    Returns:
        ``out`` ``(batch, local_len, heads, v_head_dim)`` in q's dtype, or ``(out, lse)``. Rows that see
        no key (padding under a document mask) are 0 with lse ``-inf``. Differentiable in q, k and v.
    """
    call = call_number(group)
    rank, world = comm.group_rank_world(group)
    error, spec, desc = None, None, ""
    try:
        check_qkv(q, k, v)
        spec = make_spec(world=world, local_len=q.shape[1], layout=layout, causal=causal, window=window,
                         seq_len=seq_len, cu_seqlens=cu_seqlens, batch=q.shape[0])
        scale = softmax_scale_of(softmax_scale, q.shape[-1])
        check_backward_exchange(backward_exchange)
        desc = describe("ring", q, k, v, spec, layout, scale) + f" backward_exchange={backward_exchange}"
    except Exception as e:  # noqa: BLE001 - whatever it is, every rank must hear of it
        error = e
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    agree(desc, error, group, device, call)
    plan = make_plan(spec, layout if world > 1 else "contiguous", rank, world, q.shape[1])
    s = comm.stats()
    if s is not None:
        s.calls += 1
    # Blocks live in the kernels' heads-major storage for the whole call (one copy each here, if needed).
    q, k, v = heads_major(q), heads_major(k), heads_major(v)
    call = _Call(group, plan, spec, scale, direct=backward_exchange == "direct")
    out, lse = SavedAttention.apply(q, k, v, _ring_forward, _ring_backward, call)
    return (out, lse) if return_lse else out
