"""Sliding windows and packed documents across the ring, vs. the dense reference."""

from __future__ import annotations

import math

import pytest
import torch

import ringattn
from ringattn.masks import MaskSpec
from ringattn.schedule import make_schedule

from .cases import Case, assert_close, run_case

LAYOUTS = ["contiguous", "zigzag", "striped"]


def run_all(ranks, world, cases):
    for case in cases:
        assert_close(ranks.run(world, run_case, case), case)


def window_cases(world, layout, dtype):
    n = 16 * world + 5
    local = -(-n // (2 * world)) * 2  # a generous bound on the block length, for "less than a block"
    windows = [(0, 0), (0, -1), (local // 2, -1), (local // 2, 3), (2, local + 3), (n + 10, n + 10),
               (-1, 1), (3 * local, 0)]
    out = []
    for i, w in enumerate(windows):
        for causal in (False, True):
            if causal and w[1] not in (-1, 0) and i % 2:
                continue
            out.append(Case(seq_len=n, layout=layout, causal=causal, window=w, dtype=dtype, seed=i,
                            kv_heads=1 + (i % 2)))
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_window(ranks, world, layout, dtype):
    run_all(ranks, world, window_cases(world, layout, dtype))


def doc_cases(world, layout):
    n = 12 * world + 3
    c = -(-n // (2 * world)) * 2  # contiguous shard length after padding (zigzag-safe)
    docs = [
        [0, n],  # one document
        [0, 1, 2, 3, n],  # documents of length 1
        [0, c, n] if c < n else [0, n],  # a boundary exactly on a shard boundary
        [0, 5, 5 + 2 * c, n] if 5 + 2 * c < n else [0, 5, n],  # a document spanning several ranks
        sorted({0, n, *range(0, n, 7)}),  # many documents of 7
    ]
    cases = []
    for i, cu in enumerate(docs):
        for causal in (False, True):
            cases.append(Case(seq_len=n, layout=layout, causal=causal, cu_seqlens=cu, batch=1, seed=i))
        cases.append(Case(seq_len=n, layout=layout, causal=True, window=(4, -1), cu_seqlens=cu, batch=1, seed=9))
    return cases


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_documents(ranks, world, layout):
    run_all(ranks, world, doc_cases(world, layout))


@pytest.mark.parametrize("world", [2, 4])
def test_documents_float32_tiled(ranks, world):
    cases = [Case(seq_len=97, layout=lay, causal=True, cu_seqlens=[0, 1, 30, 31, 64, 97], batch=1, dtype="float32",
                  tile=8, seed=4) for lay in LAYOUTS]
    run_all(ranks, world, cases)


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("left,local", [(1, 64), (64, 64), (65, 64), (200, 64), (0, 16)])
def test_contiguous_window_stops_early(world, left, local):
    """The ring takes ceil(left / local_len) + 1 steps on the contiguous layout (causal), not W."""
    spec = MaskSpec(seq_len=world * local, causal=True, window=(left, -1))
    plan = make_schedule(spec, "contiguous", 0, world, local)
    assert len(plan.steps) == min(world, math.ceil(left / local) + 1)
    # Non-causal: the right side adds its own steps, walked the other way round the ring.
    spec = MaskSpec(seq_len=world * local, window=(left, left))
    steps = make_schedule(spec, "contiguous", 0, world, local).steps
    need = math.ceil(left / local)
    assert len(steps) == min(world, 2 * need + 1)


def test_documents_skip_steps():
    # Documents that each fit in one rank's shard: no rank needs any other rank's block.
    spec = MaskSpec(seq_len=64, causal=True, doc_bounds=(0, 16, 32, 48, 64))
    assert make_schedule(spec, "contiguous", 1, 4, 16).steps == (0,)


def bytes_for(window):
    torch.manual_seed(0)
    q = torch.randn(1, 64, 2, 8)
    with ringattn.profile() as st:
        out = ringattn.ring_attention(q, q, q, causal=True, window=window)
        out.sum().backward() if out.requires_grad else None
    return st.bytes_sent, st.steps


def test_window_sends_less(ranks):
    full = ranks.run(4, bytes_for, None)
    win = ranks.run(4, bytes_for, (10, -1))
    for (bf, sf), (bw, sw) in zip(full, win):
        assert sf == 4 and sw == 2 and bw * 3 == bf


def test_schedule_prefers_no_travelling_step():
    """Among equally short schedules, 3 ranks causal walk one step each way (both blocks used for one step
    only, so they stream) rather than two steps one way; 4 ranks keep the single long direction."""
    spec3, spec4 = MaskSpec(seq_len=3 * 8, causal=True), MaskSpec(seq_len=4 * 8, causal=True)
    assert all(make_schedule(spec3, "zigzag", r, 3, 8).steps == (0, 1, -1) for r in range(3))
    assert all(make_schedule(spec4, "zigzag", r, 4, 8).steps == (0, -1, -2, -3) for r in range(4))
