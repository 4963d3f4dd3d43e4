"""The mixers benchmark's code path at tiny sizes (``python -m benchmarks mixers``): its layers, with
transformers' own steps, give the one-process outputs on 2 ranks by correction and by rerun, and its
quick variant runs end to end with the same bytes per layer at two lengths. No timing assertions."""

from __future__ import annotations

import functools

import pytest
import torch
from benchmarks.suites import mixers as bm

import ringattn
from ringattn import mixers as mx

S = 24  # zigzag on 2 ranks: chunks of 6, cut across the steps' own chunks (4 and 8)


@functools.cache
def expected():
    out = {}
    for name in bm.NAMES:
        size = bm.TINY[name]
        xs = bm.inputs(name, S, size)
        out[name] = bm.layer(name, xs, mx.fragments(S, layout="zigzag", batch=1), size, bm.weights(name, size))
    return out


def rank_layers(expect):
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    pos = ringattn.global_positions("zigzag", rank, world, S // world)
    plan = mx.fragments(S // world, layout="zigzag", batch=1)
    errs = {}
    for name in bm.NAMES:
        size = bm.TINY[name]
        xs = [x.index_select(1, pos) for x in bm.inputs(name, S, size)]
        for mode in ("correct", "rerun") if name in ("mamba2", "gdn") else ("correct",):
            y = bm.layer(name, xs, plan, size, bm.weights(name, size), mode)
            ref = expect[name].index_select(1, pos)
            errs[(name, mode)] = ((y - ref).abs().max() / ref.abs().max()).item()
    return errs


def test_layers_match_one_process(ranks):
    for errs in ranks.run(2, rank_layers, expected()):
        for (name, mode), err in errs.items():
            assert err < 1e-5, f"{name} ({mode}): relative error {err}"  # the steps compute in float32


@pytest.mark.slow
def test_quick_variant(tmp_path):
    res = bm.run(tmp_path, True, sizes=bm.TINY, lengths=[16, 32])
    for name, rows in res["mixers"].items():
        short, long = (rows[s]["ranks"][2]["per_rank"] for s in (16, 32))
        for a, b in zip(short, long):
            assert a["bytes"] == b["bytes"], f"{name}: bytes per layer depend on the length"
            assert a["bytes"]["forward"] > 0
    # the planner's bytes are the measured ones (zigzag on 2 ranks, float32)
    from ringattn.cost_model import mixer_cost

    t = bm.TINY
    model = {"mamba2": dict(kind="scalar", heads=t["mamba2"]["H"], state=(t["mamba2"]["P"], t["mamba2"]["N"])),
             "gdn": dict(kind="dense", heads=t["gdn"]["H"], state=(t["gdn"]["K"], t["gdn"]["K"])),
             "mamba1": dict(kind="diagonal", state=(t["mamba1"]["D"], t["mamba1"]["N"])),
             "conv": dict(kind="conv", channels=t["conv"]["C"], kernel=t["conv"]["k"])}
    for name, kw in model.items():
        c = mixer_cost(seq_len=32, world=2, dtype_bytes=4, **kw)
        measured = res["mixers"][name][32]["ranks"][2]["per_rank"][0]["bytes"]
        assert measured["forward"] == c.bytes_sent, name
        if name != "mamba1":  # forward only
            assert measured["backward"] == c.backward_bytes, name
    assert (tmp_path / "mixers.png").exists()
    assert "| Mamba2 / SSD | 32 |" in bm.summary(res)


@pytest.mark.slow
def test_hybrid_model_step_variant(tmp_path):
    """``python -m benchmarks hybrid``'s step at a tiny size: the ranks' loss is the one process's (float32), and
    the report renders."""
    from benchmarks.suites import hybrid

    res = hybrid.run(tmp_path, True, lengths=[96], worlds=[2], reps=1)
    (row,) = res["rows"]
    assert row["loss_diff"] < 1e-5 * abs(row["single_loss"]), row
    assert row["single_s"] > 0 and row["ranks_s"] > 0
    assert (tmp_path / "hybrid.png").exists()
    assert "| 96 | 2 |" in hybrid.summary(res)
