"""The balanced layout (per-document causal balance) and batches whose rows pack different documents."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ringattn
from ringattn.layouts import balanced_units, padded_len, segments, unit_work, units_per_rank
from ringattn.masks import MaskSpec, Segment
from ringattn.schedule import make_schedule
from ringattn.tasks import task_flops

from .cases import Case, assert_close, raised, run_case


def lognormal_docs(n: int, seed: int, mu: float = 4.0, sigma: float = 1.2) -> list[int]:
    """cu_seqlens of documents with long-tailed (lognormal) lengths filling ``n`` tokens."""
    rnd, cuts = random.Random(seed), [0]
    while cuts[-1] < n:
        cuts.append(min(n, cuts[-1] + max(1, int(rnd.lognormvariate(mu, sigma)))))
    return cuts


def imbalance(layout: str, bounds: tuple[int, ...], world: int) -> float:
    """max / mean over ranks of the (query, key) pairs the ring's kernels compute (what the profile counts)
    under causal attention within documents."""
    local = padded_len(bounds[-1], world, layout) // world
    spec = MaskSpec(bounds[-1], causal=True, doc_bounds=bounds)
    work = []
    for r in range(world):
        plan = make_schedule(spec, layout, r, world, local)
        work.append(sum(task_flops(t, 1, 1, 1, 0) for ts in plan.tasks.values() for t in ts))
    return max(work) / (sum(work) / world)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 300), st.data())
def test_balanced_units_are_a_partition(world, n, data):
    """Every position is held by exactly one rank, each rank holds the same number, in increasing order."""
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=8)) if n > 1 else []))
    bounds = (0, *cuts, n)
    local = padded_len(n, world, "balanced") // world
    held = [torch.cat([s.positions() for s in segments("balanced", r, world, local, bounds)]) for r in range(world)]
    assert all(len(h) == local for h in held)
    assert all(bool((h[1:] > h[:-1]).all()) for h in held)
    assert sorted(torch.cat(held).tolist()) == list(range(world * local))


def test_unit_work_counts_what_the_kernels_compute():
    """Long documents: the visible pairs; documents too short for a call each: the dense tile."""
    bounds = (0, 300, 700, 701, 1000)
    spec = MaskSpec(1000, causal=True, doc_bounds=bounds)
    for a, b in ((0, 300), (350, 700), (300, 1000)):
        q = torch.arange(a, b)
        visible = int(spec.visible(q[:, None], torch.arange(1000)[None, :]).sum())
        assert unit_work(bounds, a, b) == visible
    assert unit_work(bounds, 1000, 1024) == 0  # padding
    tiny = tuple(range(0, 65, 2))  # 32 documents of 2 tokens: one masked 64 x 64 tile
    assert unit_work(tiny, 0, 64) == 64 * 64


def test_one_document_is_zigzag_cut_finer():
    """One document: the greedy pairing is the zigzag pairing of 2mW units (exactly equal work)."""
    world, local = 4, 256
    assert units_per_rank(local) == 16
    per_rank = [sum(unit_work((0, world * local), s.start, s.start + s.length)
                    for s in balanced_units((0, world * local), world, local)[r]) for r in range(world)]
    assert len(set(per_rank)) == 1
    # Without documents it is refused: a shard and a call could silently disagree on them.
    with pytest.raises(ValueError, match="places the tokens by the documents"):
        segments("balanced", 1, world, local)


@pytest.mark.parametrize("world", [4, 8])
def test_balanced_beats_zigzag_on_long_tailed_documents(world):
    """The FLOPs goal of the layout (max / mean <= 1.05) where zigzag over the stream is 1.1 or worse."""
    worst_zigzag, worst_balanced = 0.0, 0.0
    for seed in range(4):
        bounds = tuple(lognormal_docs(16384, seed, mu=6.0, sigma=1.5))
        worst_zigzag = max(worst_zigzag, imbalance("zigzag", bounds, world))
        worst_balanced = max(worst_balanced, imbalance("balanced", bounds, world))
    assert worst_balanced <= 1.05 < worst_zigzag, (worst_balanced, worst_zigzag)


def test_shard_unshard_round_trip_per_row(ranks):
    assert all(ranks.run(3, _round_trip))


def _round_trip():
    rank, world = ringattn.comm.group_rank_world()
    n = 50
    x = torch.arange(2 * n * 3, dtype=torch.float64).reshape(2, n, 3)
    rows = [torch.tensor([0, 7, 40, n]), torch.tensor([0, 30, 31, n])]
    for cu in (rows, rows[0]):
        xb = x if isinstance(cu, list) else x[:1]
        part = ringattn.shard(xb, layout="balanced", cu_seqlens=cu)
        assert part.shape[1] == padded_len(n, world, "balanced") // world
        back = ringattn.unshard(part, layout="balanced", cu_seqlens=cu, seq_len=n)
        assert torch.equal(back, xb)
    # Without the documents every place that positions tokens refuses: nothing can silently disagree.
    for fn in (lambda: ringattn.shard(x, layout="balanced"),
               lambda: ringattn.unshard(x[:, :30], layout="balanced", seq_len=n),
               lambda: ringattn.ring_attention(torch.randn(1, 30, 2, 4), torch.randn(1, 30, 2, 4),
                                               torch.randn(1, 30, 2, 4), layout="balanced", causal=True)):
        assert "places the tokens by the documents" in raised(fn)
    return True


def balanced_cases(world: int) -> list[Case]:
    n = 64 * world + 5  # long enough for 4 units per rank (MIN_UNIT)
    docs = [[0, n], [0, 1, 2, 3, n], sorted({0, n, *range(0, n, 7)}), lognormal_docs(n, world, mu=2.5, sigma=1.0)]
    cases = []
    for i, cu in enumerate(docs):
        cases.append(Case(seq_len=n, layout="balanced", causal=True, cu_seqlens=cu, batch=1, seed=i,
                          kv_heads=(1, 2)[i % 2]))
    cases.append(Case(seq_len=n, layout="balanced", causal=False, cu_seqlens=docs[2], batch=1, seed=7))
    cases.append(Case(seq_len=n, layout="balanced", causal=True, window=(5, -1), cu_seqlens=docs[3], batch=1,
                      seed=8))
    # Two rows with different documents, every layout.
    rows = [docs[3], [0, n // 3, n // 3 + 1, n]]
    for j, lay in enumerate(("balanced", "zigzag", "contiguous", "striped")):
        cases.append(Case(seq_len=n, layout=lay, causal=True, cu_seqlens=rows, batch=2, seed=10 + j))
    cases.append(Case(seq_len=n, layout="balanced", causal=True, cu_seqlens=rows, batch=2, seed=20,
                      dtype="float32", lse_grad=True))
    return cases


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_balanced_ring_exact(ranks, world):
    for case in balanced_cases(world):
        assert_close(ranks.run(world, run_case, case), case)


@pytest.mark.parametrize("strategy,world,extra", [("allgather", 3, {}), ("ulysses", 2, {}),
                                                  ("hybrid", 4, {"mesh_shape": (2, 2)})])
def test_balanced_other_strategies_exact(ranks, strategy, world, extra):
    n = 16 * world + 3
    cu = lognormal_docs(n, 5, mu=2.5, sigma=1.0)
    cases = [Case(seq_len=n, layout="balanced", causal=True, cu_seqlens=cu, batch=1, strategy=strategy,
                  extra=dict(extra)),
             Case(seq_len=n, layout="balanced", causal=True, cu_seqlens=[cu, [0, 5, n]], batch=2, strategy=strategy,
                  extra=dict(extra), seed=3)]
    for case in cases:
        assert_close(ranks.run(world, run_case, case), case)


def test_per_row_documents_refused_clearly(ranks):
    q = torch.randn(2, 8, 2, 4)
    msgs = ranks.run(2, raised, ringattn.ring_attention, q, q, q, causal=True, seq_len=16,
                     cu_seqlens=[torch.tensor([0, 16])])
    assert all("one tensor per batch row" in m for m in msgs), msgs


def test_segments_of_units_merge():
    """Adjacent units of one rank are one segment (fewer kernel calls)."""
    segs = balanced_units((0, 256), 2, 128)
    assert all(isinstance(s, Segment) for r in segs for s in r)
    assert all(a.start + a.length < b.start for r in segs for a, b in zip(r, r[1:]))
