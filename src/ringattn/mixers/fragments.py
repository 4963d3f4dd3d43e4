"""Which runs of consecutive global positions each rank holds, and the collectives the mixers share.

A *fragment* is a maximal run of consecutive global positions in a rank's local order; cut further at
the document starts it is a *piece*. A piece's state starts from zero at a document start and otherwise
continues the piece that holds the position before it, on whichever rank that is. Every rank computes
every rank's pieces from the layout alone (no communication), so that all of them agree on the buffers
the collectives move.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..layouts import global_positions, layout_of
from ..sharding import check_distributed, sharding_of


def rank_world(group=None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@dataclass(frozen=True)
class Piece:
    """Global positions ``[start, start + length)`` held by ``rank`` at local rows ``[local, local + length)``.

    ``fresh``: starts a document (its state starts from zero). ``feeds``: the position after it continues
    the same document, so its final state is some other piece's initial state (it needs a summary).
    ``fragment``: index of the fragment (maximal run) it belongs to among its rank's fragments."""

    rank: int
    local: int
    start: int
    length: int
    fresh: bool
    feeds: bool
    fragment: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class RowPlan:
    """The pieces of every rank for rows sharing one set of documents, in global order."""

    rows: tuple[int, ...] | None  # batch rows it covers; None: every row
    bounds: tuple[int, ...]  # document starts, ascending, 0 first (the padding past the last document is one more)
    fragments: tuple[tuple[tuple[int, int, int], ...], ...]  # per rank: (local, start, length) of each fragment
    pieces: tuple[Piece, ...]

    def batch_rows(self, batch: int) -> list[int]:
        """The batch rows this plan covers, of a batch of ``batch``."""
        return list(self.rows) if self.rows is not None else list(range(batch))

    def doc_start(self, pos: int) -> int:
        return self.bounds[bisect.bisect_right(self.bounds, pos) - 1]

    def local_pieces(self, rank: int) -> list[Piece]:
        return sorted((p for p in self.pieces if p.rank == rank), key=lambda p: p.local)

    def slots(self, rank: int) -> dict[Piece, int]:
        """Summary slot of each of ``rank``'s pieces that feeds another, in local order."""
        return {p: i for i, p in enumerate(p for p in self.local_pieces(rank) if p.feeds)}


@dataclass(frozen=True)
class Fragments:
    """How a sequence is spread over ranks, for the mixers (``fragments`` builds one)."""

    layout: str
    world: int
    rank: int
    lengths: tuple[int, ...]  # every rank's local length
    total: int  # positions 0 .. total - 1 exist on some rank (padding included)
    plans: tuple[RowPlan, ...]
    group: object = None
    uneven: bool = False

    @property
    def local_len(self) -> int:
        return self.lengths[self.rank]

    def digest(self) -> int:
        """A number every rank computes the same from the same plan (compared before any collective)."""
        text = repr((self.layout, self.world, self.lengths, self.total, self.uneven,
                     [(p.rows, p.bounds) for p in self.plans]))
        return zlib.crc32(text.encode())

    def summary_slots(self) -> int:
        return max((len(p.slots(r)) for p in self.plans for r in range(self.world)), default=0)

    def fragment_slots(self) -> int:
        return max((len(p.fragments[r]) for p in self.plans for r in range(self.world)), default=0)

    @property
    def scattered(self) -> bool:
        """Whether some rank's fragments average under two tokens (striped: one each), too short for a
        summary each to pay: the mixers then regroup the tokens contiguously, one all-to-all each way."""
        return self.world > 1 and any(2 * len(p.fragments[r]) > self.lengths[r]
                                      for p in self.plans for r in range(self.world) if self.lengths[r])

    def describe(self) -> str:
        return f"{self.layout} over {self.world} ranks, local lengths {list(self.lengths)}"


def _uneven_positions(layout: str, seq_len: int, world: int) -> list[list[int]]:
    rule = layout_of(layout)
    return [[p for seg in rule.uneven_positions(seq_len, r, world)
             for p in range(seg.start, seg.start + seg.length * seg.stride, seg.stride)] for r in range(world)]


def _as_bounds(cu) -> tuple[int, ...]:
    if isinstance(cu, torch.Tensor):
        return tuple(int(x) for x in cu.tolist())
    return tuple(int(x) for x in cu)


def _row_plan(rows, positions: list[list[int]], bounds: tuple[int, ...], total: int) -> RowPlan:
    starts = sorted(set(b for b in bounds if b < total) | {0})
    start_set = set(starts)
    frags, pieces = [], []
    for rank, pos in enumerate(positions):
        runs: list[list[int]] = []  # [local, start, length]
        for i, p in enumerate(pos):
            if runs and runs[-1][1] + runs[-1][2] == p:
                runs[-1][2] += 1
            else:
                runs.append([i, p, 1])
        frags.append(tuple(tuple(r) for r in runs))
        for f, (local, start, length) in enumerate(runs):
            cuts = [start] + [b for b in starts if start < b < start + length] + [start + length]
            for a, b in zip(cuts, cuts[1:]):
                pieces.append(Piece(rank, local + a - start, a, b - a, a in start_set,
                                    b < total and b not in start_set, f))
    pieces.sort(key=lambda p: p.start)
    return RowPlan(rows, tuple(starts), tuple(frags), tuple(pieces))


def fragments(local_len: int, *, group=None, layout: str = "contiguous", cu_seqlens=None, uneven: bool = False,
              seq_len: int | None = None, batch: int | None = None) -> Fragments:
    """Every rank's fragments and pieces for ``local_len`` local tokens under ``layout`` (as ``ringattn.shard``
    made them: the same ``layout``, ``cu_seqlens`` and ``uneven``/``seq_len``). ``cu_seqlens``: one 1-D int
    tensor (or ints) for every row, or a list of one per batch row (``batch`` rows). No communication."""
    check_distributed("mixers")
    try:
        rule = layout_of(layout)
    except ValueError as e:
        raise ValueError(f"ringattn.mixers: {e}") from None
    layout = str(layout)
    if not isinstance(local_len, int) or isinstance(local_len, bool) or local_len < 0:
        raise ValueError(f"ringattn.mixers: local_len must be a non-negative int, got {local_len!r}")
    rank, world = rank_world(group)
    if cu_seqlens is None:
        rows_bounds: list[tuple[tuple[int, ...] | None, tuple[int, ...] | None]] = [(None, None)]
    elif isinstance(cu_seqlens, (list, tuple)) and cu_seqlens and not isinstance(cu_seqlens[0], int):
        if batch is not None and len(cu_seqlens) != batch:
            raise ValueError(f"ringattn.mixers: cu_seqlens holds {len(cu_seqlens)} rows of documents but the batch "
                             f"has {batch} rows (pass one tensor for every row, or one per row)")
        groups: dict[tuple[int, ...], list[int]] = {}
        for b, cu in enumerate(cu_seqlens):
            groups.setdefault(_as_bounds(cu), []).append(b)
        rows_bounds = [(tuple(rows), bounds) for bounds, rows in groups.items()]
    else:
        rows_bounds = [(None, _as_bounds(cu_seqlens))]
    for _, bounds in rows_bounds:
        if bounds is not None and (len(bounds) < 2 or bounds[0] != 0
                                   or any(b <= a for a, b in zip(bounds, bounds[1:]))):
            raise ValueError(f"ringattn.mixers: cu_seqlens must rise strictly from 0, got {list(bounds)[:8]}")
    if uneven:
        if not rule.takes_uneven:
            raise ValueError(f"ringattn.mixers: uneven=True takes the layouts ringattn.shard splits unevenly, got "
                             f"{layout!r}")
        if seq_len is None:
            raise ValueError("ringattn.mixers: uneven=True needs seq_len (the unpadded length)")
        positions = _uneven_positions(layout, seq_len, world)
        if len(positions[rank]) != local_len:
            raise ValueError(f"ringattn.mixers: rank {rank} holds {local_len} tokens but uneven {layout} gives it "
                             f"{len(positions[rank])} of seq_len={seq_len} (shard with uneven=True and this seq_len)")
        plans = []
        for rows, bounds in rows_bounds:
            plans.append(_row_plan(rows, positions, bounds or (0, seq_len), seq_len))
        return Fragments(layout, world, rank, tuple(len(p) for p in positions), seq_len, tuple(plans), group, True)
    total = world * local_len
    if seq_len is not None and seq_len > total:
        raise ValueError(f"ringattn.mixers: seq_len={seq_len} is longer than world * local_len = {total}")
    if rule.needs_documents and world > 1 and rows_bounds[0][1] is None:
        raise ValueError(f"ringattn.mixers: layout={layout!r} places tokens by the documents: pass the same "
                         "cu_seqlens as to ringattn.shard")
    plans = []
    for rows, bounds in rows_bounds:
        for b in bounds or ():
            if b > total:
                raise ValueError(f"ringattn.mixers: cu_seqlens reaches {b}, past world * local_len = {total}")
        positions = [global_positions(layout, r, world, local_len, cu_seqlens=list(bounds) if bounds
                                               else None).tolist() for r in range(world)]
        plans.append(_row_plan(rows, positions, bounds or (0, total), total))
    return Fragments(layout, world, rank, (local_len,) * world, total, tuple(plans), group, False)


def as_contiguous(plan: Fragments) -> Fragments:
    """The plan of the same sequence and documents with every rank holding its share contiguously
    (same local lengths), the target of ``Regroup``."""
    starts = [sum(plan.lengths[:r]) for r in range(plan.world)]
    positions = [list(range(starts[r], starts[r] + plan.lengths[r])) for r in range(plan.world)]
    plans = tuple(_row_plan(p.rows, positions, p.bounds, plan.total) for p in plan.plans)
    return Fragments("contiguous", plan.world, plan.rank, plan.lengths, plan.total, plans, plan.group, plan.uneven)


def positions_of(plan: Fragments, rank: int) -> list[int]:
    out = [0] * plan.lengths[rank]
    for local, start, length in plan.plans[0].fragments[rank]:
        out[local:local + length] = range(start, start + length)
    return out


# --- collectives ---------------------------------------------------------------------------------------

def agree(plan: Fragments, error: BaseException | None, what: str, extra: object = None, flag: bool = False) -> bool:
    """Every rank raises if any rank's local check failed or the ranks' plans differ, before anyone
    blocks in a collective that a failed peer would never enter (one 4-int all-reduce). Returns whether
    ``flag`` is set on any rank."""
    if plan.world == 1:
        if error is not None:
            raise error
        return flag
    d = zlib.crc32(repr((plan.digest(), extra)).encode())
    flags = torch.tensor([int(error is not None), d, -d, int(flag)], dtype=torch.int64)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=plan.group)
    if error is not None:
        raise error
    if flags[0]:
        raise ValueError(f"{what}: another rank failed its checks or its mixer raised (that rank's error says "
                         "why); every rank stops here")
    if int(flags[1]) != -int(flags[2]):
        raise ValueError(f"{what}: the ranks disagree on layout, lengths, documents, shapes or which inputs need a "
                         f"gradient ({plan.describe()} here): pass the same on every rank")
    return bool(flags[3])


class AllGather(torch.autograd.Function):
    """``(W, *x.shape)``: every rank's ``x``. Backward: the gradients every rank computed for the gathered
    copies, summed (one all-reduce), and this rank's slice, so that each rank's summary or halo rows get
    the gradient of every use made of them."""

    @staticmethod
    def forward(ctx, x, group, rank, world):
        ctx.args = (group, rank)
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:])) if x.dim() else x.new_empty(world)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, x if x.dim() else x.reshape(1), group=group)
        return out.view(world, *x.shape)

    @staticmethod
    def backward(ctx, grad):
        group, rank = ctx.args
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)
        return grad[rank], None, None, None


class Tie(torch.autograd.Function):
    """``out`` unchanged, with ``other`` made a (zero-gradient) input of it: every rank then runs the
    backward of the collective that made ``other``, also where none of its rows were used."""

    @staticmethod
    def forward(ctx, out, other):
        ctx.other = (other.shape, other.dtype, other.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.other
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def all_gather(x: torch.Tensor, plan: Fragments) -> torch.Tensor:
    if plan.world == 1:
        return x.unsqueeze(0)
    return AllGather.apply(x, plan.group, plan.rank, plan.world)


class Regroup(torch.autograd.Function):
    """Rows of ``x`` (sequence in dim 0) moved from one plan's positions to another's by one all-to-all;
    backward: the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, src: Fragments, dst: Fragments):
        ctx.plans = (src, dst)
        return _regroup(x, src, dst)

    @staticmethod
    def backward(ctx, grad):
        src, dst = ctx.plans
        return _regroup(grad.contiguous(), dst, src), None, None


def _regroup(x: torch.Tensor, src: Fragments, dst: Fragments) -> torch.Tensor:
    world, rank = src.world, src.rank
    owner = {}
    for r in range(world):
        for i, p in enumerate(positions_of(dst, r)):
            owner[p] = (r, i)
    mine = positions_of(src, rank)
    dest = [owner[p][0] for p in mine]
    order = sorted(range(len(mine)), key=lambda i: (dest[i], i))
    send = x[torch.tensor(order, dtype=torch.long, device=x.device)] if order else x
    send_splits = [dest.count(q) for q in range(world)]
    # What arrives: from each source rank in rank order, that rank's rows bound here, in its local order.
    arrive, recv_splits = [], []
    for r in range(world):
        rows = [owner[p][1] for p in positions_of(src, r) if owner[p][0] == rank]
        arrive += rows
        recv_splits.append(len(rows))
    recv = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=src.group)
    out = torch.empty_like(recv)
    out[torch.tensor(arrive, dtype=torch.long, device=x.device)] = recv
    return out


def regroup(xs: Sequence[torch.Tensor], src: Fragments, dst: Fragments) -> list[torch.Tensor]:
    """``xs`` (each ``(batch, local_len, ...)``, one dtype) moved from ``src``'s positions to ``dst``'s with
    one all-to-all for all of them."""
    flat = [x.movedim(1, 0).reshape(x.shape[1], -1) for x in xs]
    widths = [f.shape[1] for f in flat]
    moved = Regroup.apply(torch.cat(flat, 1), src, dst)
    out = []
    for x, part in zip(xs, moved.split(widths, 1)):
        out.append(part.reshape(moved.shape[0], x.shape[0], *x.shape[2:]).movedim(0, 1))
    return out


def check_sharding(plan: Fragments, *tensors: torch.Tensor) -> None:
    """A ``ValueError`` where a tensor remembers a ``ringattn.shard`` other than the plan's (another layout or
    uneven split, or the sequence in another dim): the mixer would run its tokens at the wrong positions."""
    for t in tensors:
        s = sharding_of(t)
        if s is None:
            continue
        if str(s.layout) != plan.layout or bool(s.uneven) != plan.uneven or s.dim != 1:
            raise ValueError(f"ringattn.mixers: the input was sharded with {s.describe()} (dim={s.dim}), but the "
                             f"plan is for layout={plan.layout!r}, uneven={plan.uneven} along dim 1: build the plan "
                             "with ringattn.mixers.fragments(...) from the same layout, documents and uneven as "
                             "the shard")
