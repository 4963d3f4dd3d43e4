"""Uneven shards: ranks hold different local lengths (no padding), every strategy but hybrid, vs. the
float64 dense reference."""

from __future__ import annotations

import pytest
import torch

import ringattn
from ringattn.layouts import Uneven, uneven_lengths, uneven_segments

from .cases import Case, assert_close, run_case

LAYOUTS = ["contiguous", "zigzag", "striped"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_uneven_segments_partition_the_sequence(layout, world):
    for n in (1, world, 2 * world + 1, 37, 64):
        lens = uneven_lengths(n, world, layout)
        assert sum(lens) == n and max(lens) - min(lens) <= 2
        lay = Uneven(ringattn.Layout(layout), n)
        real = [torch.cat([s.positions() for s in uneven_segments(lay, r, world, with_padding=False)] or
                          [torch.zeros(0, dtype=torch.long)]) for r in range(world)]
        assert sorted(torch.cat(real).tolist()) == list(range(n))
        padded = [torch.cat([s.positions() for s in uneven_segments(lay, r, world)]) for r in range(world)]
        assert all(len(p) == max(lens) for p in padded)  # every block padded to the longest
        assert sorted(torch.cat(padded).tolist()) == list(range(world * max(lens)))


def uneven_cases(world: int) -> list[Case]:
    n = 12 * world + 3  # not a multiple of W or 2W
    out = []
    for i, lay in enumerate(LAYOUTS):
        out.append(Case(seq_len=n, layout=lay, causal=True, uneven=True, seed=i, kv_heads=(1, 2)[i % 2]))
        out.append(Case(seq_len=n, layout=lay, causal=False, window=(3, 2), uneven=True, seed=10 + i))
    out.append(Case(seq_len=n, layout="zigzag", causal=True, cu_seqlens=[0, 4, n - 5, n], batch=1, uneven=True,
                    seed=20, lse_grad=True))
    out.append(Case(seq_len=n, layout="striped", causal=True, uneven=True, dtype="float32", seed=21))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_uneven_ring_exact(ranks, world):
    for case in uneven_cases(world):
        assert_close(ranks.run(world, run_case, case), case)


@pytest.mark.parametrize("strategy,world", [("allgather", 3), ("ulysses", 2), ("ulysses", 4)])
def test_uneven_other_strategies_exact(ranks, strategy, world):
    n = 8 * world + 1
    for i, lay in enumerate(LAYOUTS):
        case = Case(seq_len=n, layout=lay, causal=True, uneven=True, strategy=strategy, seed=i)
        assert_close(ranks.run(world, run_case, case), case)


def test_uneven_round_trip_and_refusals(ranks):
    assert all(ranks.run(3, _round_trip))


def _round_trip():
    rank, world = ringattn.comm.group_rank_world()
    n = 10
    x = torch.arange(2 * n, dtype=torch.float64).reshape(2, n, 1).requires_grad_()
    for lay in LAYOUTS:
        part = ringattn.shard(x, layout=lay, uneven=True)
        assert part.shape[1] == uneven_lengths(n, world, lay)[rank]
        back = ringattn.unshard(part, layout=lay, seq_len=n, uneven=True)
        assert torch.equal(back, x)
    q = torch.randn(1, uneven_lengths(n, world, "contiguous")[rank] + (rank == 1), 2, 4)
    try:  # rank 1 holds one token too many: every rank refuses, naming it
        ringattn.ring_attention(q, q, q, seq_len=n, uneven=True)
    except ValueError as e:
        assert "rank 1 holds" in str(e) or "another rank rejected" in str(e), e
    else:
        raise AssertionError("no error")
    return True
