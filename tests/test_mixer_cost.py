"""The planner's per-layer cost of the context-parallel mixers (ringattn.cost_model.mixer_cost)."""

from __future__ import annotations

import pytest

from ringattn.cost_model import PRESETS, mixer_cost

GDN = dict(heads=16, state=(128, 128))
HW = PRESETS["h100-nvlink"]


def test_bytes_do_not_depend_on_the_length():
    for kind, kw in (("scalar", dict(heads=8, state=(64, 128))), ("dense", GDN), ("diagonal", dict(state=(512, 16))),
                     ("conv", dict(channels=1024))):
        a, b = (mixer_cost(kind, seq_len=s, world=4, hw=HW, **kw) for s in (16384, 32768))
        assert (a.bytes_sent, a.bytes_received, a.backward_bytes) == (b.bytes_sent, b.bytes_received, b.backward_bytes)
        assert b.local_flops == 2 * a.local_flops


def test_summary_sizes():
    # Gated DeltaNet: a K x K transition and a K x V state per head, float32, two slots (zigzag, W > 2)
    c = mixer_cost("dense", seq_len=32768, world=4, dtype_bytes=2, hw=HW, **GDN)
    assert c.slots == 2 and c.bytes_sent == 2 * 16 * (128 * 128 + 128 * 128) * 4
    assert c.bytes_received == 3 * c.bytes_sent and c.backward_bytes == 4 * c.bytes_sent
    # Mamba2: a scalar per head; zigzag on 2 ranks holds one feeding piece per rank
    m = mixer_cost("scalar", seq_len=32768, world=2, heads=8, state=(64, 128), hw=HW)
    assert m.slots == 1 and m.bytes_sent == (8 + 8 * 64 * 128) * 4
    # a halo: k - 1 rows of the input dtype per fragment (zigzag: two)
    h = mixer_cost("conv", seq_len=4096, world=2, channels=10, kernel=4, dtype_bytes=2, hw=HW)
    assert h.bytes_sent == 2 * 3 * 10 * 2 and h.extra_flops == 0
    # float64 inputs keep float64 summaries
    assert mixer_cost("scalar", seq_len=64, world=2, heads=1, state=(2, 3), dtype_bytes=8, hw=HW).bytes_sent == 7 * 8


def test_correction_costs_less_than_a_rerun():
    for kind, kw in (("scalar", dict(heads=8, state=(64, 128), chunk=256)), ("diagonal", dict(state=(512, 16)))):
        corr, rerun = (mixer_cost(kind, seq_len=32768, world=2, correct=c, hw=HW, **kw) for c in (True, False))
        assert corr.extra_flops < rerun.extra_flops and rerun.extra_passes == 1.0
        assert corr.extra_passes < 0.7


def test_one_rank_costs_nothing_extra():
    c = mixer_cost("dense", seq_len=1024, world=1, hw=HW, **GDN)
    assert (c.bytes_sent, c.bytes_received, c.extra_flops, c.time) == (0, 0, 0.0, 0.0)


def test_striped_regroups():
    c = mixer_cost("scalar", seq_len=1024, world=4, layout="striped", heads=2, state=(4, 4), token_bytes=100, hw=HW)
    assert c.slots == 1 and c.regroup_bytes == 2 * 256 * 100 * 3 // 4


def test_mistakes():
    kinds = r"\('scalar', 'diagonal', 'dense', 'log', 'conv'\)"
    with pytest.raises(ValueError, match=rf"kind must be one of {kinds}, got 'ssm'"):
        mixer_cost("ssm", seq_len=1024, world=2, hw=HW)
    with pytest.raises(ValueError, match=r"kind='conv' needs channels >= 1"):
        mixer_cost("conv", seq_len=1024, world=2, hw=HW)
    with pytest.raises(ValueError, match=r"need 1 <= world <= seq_len"):
        mixer_cost("dense", seq_len=2, world=4, hw=HW)


def test_log_kind_sends_the_log_scale_and_reruns():
    """A stabilised state (RWKV, xLSTM) travels with its log scale, and has no correction path."""
    lg = mixer_cost("log", seq_len=32768, world=2, heads=4, state=(16, 17), hw=HW, correct=True)
    dg = mixer_cost("diagonal", seq_len=32768, world=2, heads=4, state=(16, 17), hw=HW)
    assert lg.bytes_sent == 3 * 4 * 16 * 17 * 4  # log decay + value + log scale, float32
    assert lg.bytes_sent == dg.bytes_sent * 3 // 2
    assert "rerun" in lg.note and lg.extra_passes == pytest.approx(1.0)
