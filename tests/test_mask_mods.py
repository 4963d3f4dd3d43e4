"""Arbitrary masks on the ring: ``mask_mod`` predicates and attention ``slices``, vs. the float64 dense
reference on world sizes 1-4, every layout and strategy (out, lse, dq, dk, dv); the classification they
plan from (hypothesis: never EMPTY or FULL where the predicate says otherwise); steps they skip."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ringattn
from ringattn import patterns
from ringattn.masks import Kind, MaskSpec, Segment
from ringattn.validate import check_mask_mod, check_slices

from .cases import Case, assert_close, raised, run_case

LAYOUTS = ["contiguous", "zigzag", "striped"]


# Module level, so that cases carrying them pickle to the ranks.
def checker(q, k):
    return (q + k) % 3 != 0


def some_rows_blind(q, k):  # every 5th query sees nothing at all
    return (q % 5 != 0) & (k <= q + 6)


def stripes(q, k):
    return (k % 4 == 0) | (q == k)


def random_slices(n: int, seed: int, count: int = 4) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        q0, q1 = sorted(rng.sample(range(n + 1), 2))
        k0, k1 = sorted(rng.sample(range(n + 1), 2))
        out.append(((q0, q1), (k0, k1), rng.choice(["full", "causal", "inv-causal", "bi-causal"])))
    return out


def mask_cases(world: int, strategy: str = "ring", extra: dict | None = None) -> list[Case]:
    n = 12 * world + 5
    masks = [dict(mask_mod=checker), dict(mask_mod=some_rows_blind, causal=True),
             dict(mask_mod=patterns.longformer(3, [0, n // 2])), dict(mask_mod=stripes, window=(6, 6)),
             dict(slices=random_slices(n, world)), dict(slices=random_slices(n, world + 7, 6), causal=True),
             dict(slices=patterns.prefix_lm(n // 3, n)), dict(slices=patterns.block_causal(5, n), sinks=True),
             dict(slices=[])]
    cases = []
    for j, m in enumerate(masks):
        cases.append(Case(seq_len=n + j % 2, kv_heads=(1, 2, 4)[j % 3], layout=LAYOUTS[(j + world) % 3], seed=j,
                          strategy=strategy, extra=dict(extra or {}), **m))
    return cases


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_masks_match_dense(ranks, world):
    for case in mask_cases(world):
        assert_close(ranks.run(world, run_case, case), case)


@pytest.mark.parametrize("strategy", ["allgather", "ulysses", "hybrid"])
def test_other_strategies_masks(ranks, strategy):
    extra = {"mesh_shape": (2, 2)} if strategy == "hybrid" else {}
    for case in mask_cases(4, strategy, extra)[::2]:
        if strategy != "allgather":
            case.kv_heads = 4
        assert_close(ranks.run(4, run_case, case), case)


def test_masks_with_tiles_and_documents(ranks):
    n = 61
    cases = [Case(seq_len=n, layout="zigzag", mask_mod=checker, causal=True, tile=8, seed=1),
             Case(seq_len=n, layout="striped", slices=random_slices(n, 3, 8), tile=8, chunk=8, seed=2),
             Case(seq_len=n, batch=1, layout="contiguous", cu_seqlens=[0, 20, 41, n], causal=True,
                  slices=patterns.prefix_lm(10, n), seed=3),
             Case(seq_len=n, layout="zigzag", dtype="float32", mask_mod=stripes, seed=4)]
    for case in cases:
        assert_close(ranks.run(2, run_case, case), case)


def _steps(local: int, mask: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    rank, world = ringattn.comm.group_rank_world()
    q = torch.randn(1, local, 2, 8, generator=g).requires_grad_()
    with ringattn.profile() as st:
        ringattn.ring_attention(q, q, q, **mask).sum().backward()
    return {"steps": st.steps, "bytes": st.bytes_sent, "skipped": st.steps_skipped, "saved": st.bytes_saved}


def block_diagonal_64(q, k):
    return q // 64 == k // 64


def test_masks_that_need_no_communication_skip_every_step(ranks):
    # Each rank's queries see only its own keys: one step (its own block), nothing sent.
    for mask in (dict(slices=[((r * 64, r * 64 + 64), (r * 64, r * 64 + 64), "causal") for r in range(4)]),
                 dict(mask_mod=block_diagonal_64)):
        for res in ranks.run(4, _steps, 64, mask):
            assert res == {"steps": 1, "bytes": 0, "skipped": 3, "saved": 3 * 2 * 64 * 2 * 8 * 4}, res


def test_bad_masks_refused():
    with pytest.raises(TypeError, match="mask_mod must be a callable"):
        check_mask_mod(3)
    with pytest.raises(ValueError, match="must return a bool tensor"):
        check_mask_mod(lambda q, k: q - k)
    with pytest.raises(ValueError, match="mask_mod raised"):
        check_mask_mod(lambda q: q)
    with pytest.raises(ValueError, match="kind must be one of"):
        check_slices([((0, 4), (0, 4), "diagonal")], 8)
    with pytest.raises(ValueError, match="ranges must be ints"):
        check_slices([((0, 9), (0, 4), "full")], 8)
    with pytest.raises(ValueError, match="must be"):
        check_slices([(0, 4, "full")], 8)


segments = st.builds(Segment, st.integers(0, 40), st.integers(1, 24), st.sampled_from([1, 1, 2, 3]))
slice_sets = st.lists(st.tuples(st.tuples(st.integers(0, 60), st.integers(0, 60)).map(sorted),
                                st.tuples(st.integers(0, 60), st.integers(0, 60)).map(sorted),
                                st.sampled_from(["full", "causal", "inv-causal", "bi-causal"])), max_size=4)


@settings(max_examples=150, deadline=None)
@given(qs=segments, ks=segments, slices=slice_sets, causal=st.booleans(), use_mod=st.booleans())
def test_classification_agrees_with_the_predicate(qs, ks, slices, causal, use_mod):
    spec = MaskSpec(seq_len=100, causal=causal, slices=check_slices(slices, 100),
                    mask_mod=check_mask_mod(checker) if use_mod else None)
    keep = spec.visible(qs.positions()[:, None], ks.positions()[None, :])
    pair = spec.classify(qs, ks)
    if pair.kind is Kind.EMPTY:
        assert not keep.any()
    elif pair.kind is Kind.FULL:
        assert keep[:, :pair.k_len].all()
    elif pair.kind is Kind.CAUSAL:
        i = torch.arange(qs.length)[:, None]
        assert torch.equal(keep[:, :pair.k_len], torch.arange(pair.k_len)[None, :] <= i + pair.shift)
    assert spec.any_visible(qs, ks) == bool(keep.any())


def per_row_head(b, h, q, k):
    """FlexAttention's 4-argument form: the mask differs per batch row and per head."""
    return (k <= q) & (((q - k) % (h + 2) != 1) | (k == b))


@pytest.mark.parametrize("world,strategy", [(1, "ring"), (2, "ring"), (3, "allgather"), (4, "ring")])
def test_four_argument_mask_mod(ranks, world, strategy):
    n = 12 * world + 5
    cases = [Case(seq_len=n, layout=LAYOUTS[world % 3], mask_mod=per_row_head, strategy=strategy, seed=world),
             Case(seq_len=n, layout="zigzag", mask_mod=per_row_head, sinks=True, alibi=True, heads=4, kv_heads=1,
                  strategy=strategy, seed=7),
             Case(seq_len=n, layout="balanced", mask_mod=per_row_head, cu_seqlens=[[0, 5, n], [0, n - 3, n]],
                  strategy=strategy, seed=8)]
    for case in cases:
        assert_close(ranks.run(world, run_case, case), case)


def test_four_argument_mask_mod_refused_where_heads_are_split(ranks):
    q = torch.randn(1, 8, 2, 4)
    msgs = ranks.run(2, raised, ringattn.attention, q, q, q, strategy="ulysses", mask_mod=per_row_head)
    assert all("runs one call per head" in m for m in msgs), msgs
