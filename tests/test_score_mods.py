"""Attention sinks, logit softcapping, chunked attention and ALiBi: every strategy, world sizes 1-4, every
layout, causal and not, GQA, odd lengths, vs. the float64 dense reference (out, lse, dq, dk, dv, d sinks),
and the planning facts that make them cheap (chunks skip ring steps; ALiBi stays in tiles)."""

from __future__ import annotations

import pytest
import torch

import ringattn
from ringattn.masks import Kind, MaskSpec, Segment
from ringattn.schedule import make_schedule
from ringattn.tasks import block_tasks

from .cases import Case, assert_close, run_case

LAYOUTS = ["contiguous", "zigzag", "striped"]


def mod_cases(world: int, strategy: str = "ring", extra: dict | None = None) -> list[Case]:
    n = 12 * world + 5
    cases = []
    mods = [dict(sinks=True), dict(softcap=1.5, scale_logits=3.0), dict(chunk_size=7), dict(alibi=True),
            dict(sinks=True, softcap=2.0, chunk_size=5, alibi=True, lse_grad=True)]
    # Each modification alone on a layout that rotates with the world size, all of them together on every
    # layout; causal and not, GQA 4:1 / 4:2 / 4:4, lengths that leave padding.
    picks = [(m, LAYOUTS[(j + world) % 3]) for j, m in enumerate(mods[:-1])] + [(mods[-1], lay) for lay in LAYOUTS]
    for j, (m, lay) in enumerate(picks):
        causal = j % 2 == 0 or "chunk_size" in m
        cases.append(Case(seq_len=n + j % 3, kv_heads=(1, 2, 4)[j % 3], layout=lay, causal=causal,
                          seed=j, strategy=strategy, extra=dict(extra or {}), **m))
    return cases


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_score_mods_match_dense(ranks, world):
    for case in mod_cases(world):
        assert_close(ranks.run(world, run_case, case), case)


@pytest.mark.parametrize("strategy", ["allgather", "ulysses"])
def test_other_strategies_score_mods(ranks, strategy):
    extra = {"kv_head_chunk": 1} if strategy == "allgather" else {}  # per-head slopes cut by head chunk
    for case in mod_cases(4, strategy, extra):
        if strategy == "ulysses":
            case.kv_heads = 4  # heads must split over the ranks; 4 kv heads need no replication
        assert_close(ranks.run(4, run_case, case), case)


def test_hybrid_score_mods(ranks):
    for case in mod_cases(4, "hybrid", {"mesh_shape": (2, 2)})[::2]:
        assert_close(ranks.run(4, run_case, case), case)


def test_float32_and_windows_with_mods(ranks):
    cases = [Case(seq_len=53, layout="zigzag", causal=True, dtype="float32", sinks=True, alibi=True, seed=1),
             Case(seq_len=53, layout="striped", causal=True, window=(9, -1), chunk_size=16, tile=8, seed=2),
             Case(seq_len=52, batch=1, layout="zigzag", causal=True, cu_seqlens=[0, 9, 30, 52], chunk_size=8,
                  doc_piece=4, seed=3),
             Case(seq_len=53, layout="contiguous", causal=True, dtype="bfloat16", softcap=5.0, sinks=True, seed=4),
             Case(seq_len=45, layout="zigzag", causal=True, tile=8, alibi=True, softcap=3.0, seed=5,
                  backend="reference")]
    for case in cases:
        assert_close(ranks.run(2, run_case, case), case)


def test_chunks_skip_ring_steps():
    # 4 ranks x 64 rows, chunks of 64: each query block sees only its own block's keys.
    spec = MaskSpec(seq_len=256, causal=True, chunk=64)
    for rank in range(4):
        plan = make_schedule(spec, "contiguous", rank, 4, 64)
        assert [o for o in plan.tasks if plan.tasks[o]] == [0], plan.tasks
    # Chunks that cut a block: one piece per chunk, each an unmasked causal call.
    tasks = block_tasks(MaskSpec(seq_len=512, causal=True, chunk=64), (Segment(0, 256),), (Segment(0, 256),))
    assert {t.kind for t in tasks} == {Kind.CAUSAL}, tasks
    assert len(tasks) == 4


def test_alibi_tiles_carry_positions():
    spec = MaskSpec(seq_len=4096, causal=True, positional=True)
    tasks = block_tasks(spec, (Segment(0, 2048),), (Segment(0, 2048),))
    assert tasks and all(t.kind is Kind.PARTIAL and t.qseg is not None for t in tasks)
    assert max(t.q1 - t.q0 for t in tasks) <= 512 and max(t.k1 - t.k0 for t in tasks) <= 512
    # Tiles above the diagonal are skipped, as without ALiBi.
    assert len(tasks) == 4 * 5 // 2


def test_alibi_far_positions_exact_in_float32():
    # Positions near 2**20 in float32: the bias is split so that no score rounds at that magnitude.
    g = torch.Generator().manual_seed(0)
    n, off = 96, 1 << 20
    q, k, v = (torch.randn(1, n, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    slopes = torch.tensor([0.5, 0.0625], dtype=torch.float64)
    spec = MaskSpec(seq_len=off + 2 * n, causal=True, positional=True)
    from ringattn.kernels import BACKENDS
    from ringattn.masks import Task
    from ringattn.scores import ScoreMod

    task = Task(0, n, 0, n, Kind.PARTIAL, qseg=Segment(off, n), kseg=Segment(off - 40, n))
    ref_o, ref_l = BACKENDS["reference"].forward(q, k, v, task, spec, scale=0.25, scores=ScoreMod(alibi_slopes=slopes))
    o, l_ = BACKENDS["cpu-flash"].forward(q.float(), k.float(), v.float(), task, spec, scale=0.25,
                                         scores=ScoreMod(alibi_slopes=slopes.float()))
    assert (o.double() - ref_o).abs().max() < 1e-5
    assert (l_.double() - ref_l).abs().max() < 2e-5  # unsplit, the bias alone would round by 0.03


def test_bad_options_refused_on_every_rank(ranks):
    for bad in (dict(softcap=-1.0), dict(softcap=float("inf")), dict(chunk_size=0), dict(sinks="x"),
                dict(sinks=torch.zeros(3)), dict(alibi_slopes=torch.zeros(4, 1)),
                dict(alibi_slopes=torch.rand(4, requires_grad=True)),
                dict(backend="cpu-flash", softcap=2.0)):
        errors = ranks.run(2, _call_with, bad)
        assert all(e is not None for e in errors), (bad, errors)
        names = {k for k in bad if k != "backend"}
        assert all(any(n in e for n in names) for e in errors), (bad, errors)


def _call_with(bad: dict):
    q = torch.randn(1, 8, 4, 8)
    try:
        ringattn.ring_attention(q, q[:, :, :2], q[:, :, :2], causal=True, **bad)
    except (ValueError, TypeError) as e:
        return str(e)
    return None
