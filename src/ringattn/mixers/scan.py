"""The log-depth combine of the mixers' summaries: a Hillis-Steele scan over every piece in global order.

``scan_states`` all-gathers every rank's summaries and each rank folds those before its pieces: one
collective, but each rank receives ``(W - 1) x slots`` summaries and folds up to ``W x slots`` of them,
which stops paying past about 16 ranks for K x K transitions (numbers in docs/api.md). This scan moves
``ceil(log2 N) + 1`` summaries per piece instead (``N`` pieces in all) by point-to-point messages:

    pieces in global order   e0   e1   e2   e3   e4   e5   e6   e7     (e = (M, S); owners from the layout)
    round d=1                e0  e1e0 e2e1 e3e2 e4e3 e5e4 e6e5 e7e6   (each takes the one d before it)
    round d=2                e0  e1e0 ...  e3..e0 ... e7..e4
    round d=4                      every element: the composition of all before it and itself
    shift                    each piece's initial state = S of the composition ending just before it

A piece that starts a document enters with ``M = 0`` (it ignores what came before); a piece that feeds
nothing enters as zero. Composition is ``summaries.compose``, so every kind (diagonal, dense, log) works alike.

Autograd: each round is one ``Exchange`` (forward: the messages; backward: the same messages reversed,
carrying the gradients of what was received back to its sender). Every rank runs every round, also one
with nothing to send, and each round's result is tied into the next, so that every rank's backward runs
the rounds in the same (reverse) order and no rank waits on a message another never sends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .fragments import Fragments, RowPlan, Tie
from .summaries import EMPTY_LOG_SCALE, compose, local_pieces


@dataclass(frozen=True)
class _Round:
    """What one rank sends and receives in one round: ``sends`` (peer, local element indices) and
    ``recvs`` (peer, how many elements), peers as group ranks, each list in the peers' agreed order."""

    sends: tuple[tuple[int, tuple[int, ...]], ...]
    recvs: tuple[tuple[int, int], ...]


def _global(group, r: int) -> int:
    return r if group is None else dist.get_global_rank(group, r)


def _p2p(group, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]]) -> None:
    ops = [dist.P2POp(dist.isend, t.contiguous(), _global(group, p), group) for p, t in sends]
    ops += [dist.P2POp(dist.irecv, t, _global(group, p), group) for p, t in recvs]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


class Exchange(torch.autograd.Function):
    """``(received elements, rows, width)`` from this rank's ``(elements, rows, width)`` under one round's
    messages; backward: the gradients of the received elements back to their senders, summed into the
    elements sent."""

    @staticmethod
    def forward(ctx, packed, group, rnd: _Round):
        ctx.args = (group, rnd, packed.shape)
        received = packed.new_empty((sum(n for _, n in rnd.recvs), *packed.shape[1:]))
        bufs, at = [], 0
        for p, n in rnd.recvs:
            bufs.append((p, received[at:at + n]))
            at += n
        _p2p(group, [(p, packed[list(idx)]) for p, idx in rnd.sends], bufs)
        return received

    @staticmethod
    def backward(ctx, grad):
        group, rnd, shape = ctx.args
        grad = grad.contiguous()
        sends, at = [], 0
        for p, n in rnd.recvs:
            sends.append((p, grad[at:at + n]))
            at += n
        back = [(p, grad.new_empty((len(idx), *shape[1:]))) for p, idx in rnd.sends]
        _p2p(group, sends, back)
        out = grad.new_zeros(shape)
        for (_, idx), (_, g) in zip(rnd.sends, back):
            out.index_add_(0, torch.tensor(idx, device=out.device), g)
        return out, None, None


def _rounds(rp: RowPlan, rank: int) -> list[tuple[_Round, list[tuple[int, int]]]]:
    """Per round: this rank's messages, and for each of its elements that combines, (its local index, where
    the earlier element comes from: ``('local', index)`` or an index into the received ones). The last round
    is the shift (d = 1, inclusive results to the next piece)."""
    owner = [p.rank for p in rp.pieces]
    n = len(owner)
    local_index = {}
    for i, r in enumerate(owner):
        if r == rank:
            local_index[i] = len(local_index)
    out = []
    ds = [1 << j for j in range(math.ceil(math.log2(n)))] if n > 1 else []
    for d in [*ds, 1]:
        sends: dict[int, list[int]] = {}
        recvs: dict[int, list[int]] = {}
        for i in range(d, n):
            src, dst = owner[i - d], owner[i]
            if src == dst:
                continue
            if src == rank:
                sends.setdefault(dst, []).append(local_index[i - d])
            if dst == rank:
                recvs.setdefault(src, []).append(i)
        rnd = _Round(tuple((p, tuple(v)) for p, v in sorted(sends.items())),
                     tuple((p, len(v)) for p, v in sorted(recvs.items())))
        # where each local element i >= d finds element i - d: local, or its slot among the received
        slot, at = {}, 0
        for _, v in sorted(recvs.items()):
            for i in v:
                slot[i] = at
                at += 1
        links = []
        for i, li in local_index.items():
            if i >= d:
                links.append((li, ("local", local_index[i - d]) if owner[i - d] == rank else ("recv", slot[i])))
        out.append((rnd, links))
    return out


def scan_states_p2p(summaries: Sequence[tuple[torch.Tensor, torch.Tensor] | None], plan: Fragments, *, kind: str,
                    state_shape: Sequence[int], mshape: Sequence[int], batch: int, dtype: torch.dtype,
                    device, anchor: torch.Tensor | None) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """``scan_states``' contract by the log-depth scan: each local piece's initial state (None: a document
    start) and a tensor to ``Tie`` into the outputs."""
    state_shape, mshape = tuple(state_shape), tuple(mshape)
    mn, sn = math.prod(mshape), math.prod(state_shape)
    mine = local_pieces(plan)
    given = {(id(rp), p): s for (rp, p), s in zip(mine, summaries)}
    states: dict[tuple[int, object], torch.Tensor | None] = {}
    ties, last = [], None
    for rp in plan.plans:
        rows = len(rp.rows) if rp.rows is not None else batch
        local = [p for p in rp.pieces if p.rank == plan.rank]

        def element(p, rows=rows, rp=rp):
            s = given.get((id(rp), p))
            m = torch.zeros(rows, mn, dtype=dtype, device=device)
            if kind == "log":
                m = m + EMPTY_LOG_SCALE
            if s is None or not p.feeds:
                st = torch.zeros(rows, *state_shape, dtype=dtype, device=device)
                if kind == "log":
                    st[:, 1] = EMPTY_LOG_SCALE
                return torch.cat([m, st.reshape(rows, sn)], 1)
            mm = m if p.fresh else s[0].reshape(rows, mn).to(dtype)
            return torch.cat([mm, s[1].reshape(rows, sn).to(dtype)], 1)

        packed = torch.stack([element(p) for p in local], 0) if local else \
            torch.zeros(0, rows, mn + sn, dtype=dtype, device=device)
        if anchor is not None and not packed.requires_grad:
            packed = Tie.apply(packed, anchor) if anchor.requires_grad else packed.detach().requires_grad_()
        if last is not None and packed.requires_grad:
            # Row plans one after another in backward too, on every rank alike: their messages have the same shapes
            packed = Tie.apply(packed, last)
        rounds = _rounds(rp, plan.rank)
        for j, (rnd, links) in enumerate(rounds):
            received = Exchange.apply(packed, plan.group, rnd) if plan.world > 1 else packed[:0]
            if j == len(rounds) - 1:  # the shift: each piece's incoming state
                shifted = {li: (packed[src] if where == "local" else received[src]) for li, (where, src) in links}
                for li, p in enumerate(local):
                    if p.fresh or li not in shifted:
                        states[(id(rp), p)] = None
                    else:
                        states[(id(rp), p)] = shifted[li][:, mn:].reshape(rows, *state_shape)
                ties.append(received.sum() * 0 + packed.sum() * 0)
                last = received
                break
            elems = list(packed.unbind(0))
            new = list(elems)
            for li, (where, src) in links:
                earlier = elems[src] if where == "local" else received[src]
                m, s = compose(kind, (elems[li][:, :mn].reshape(rows, *mshape), elems[li][:, mn:].reshape(
                    rows, *state_shape)), (earlier[:, :mn].reshape(rows, *mshape), earlier[:, mn:].reshape(
                        rows, *state_shape)))
                new[li] = torch.cat([m.reshape(rows, mn), s.reshape(rows, sn)], 1)
            nxt = torch.stack(new, 0) if new else packed[:0]
            # The round's messages tied into the next: every rank's backward runs every round, in order.
            packed = Tie.apply(nxt, received)
    tie = torch.stack(ties).sum() if ties else torch.zeros((), dtype=dtype, device=device)
    return [states[(id(rp), p)] for rp, p in mine], tie
