"""A new kind of mask is one declaration: registered from this file alone (no package file edited), it runs
through ``Mask(...)`` on the ring, the other strategies, decoding and the planner, exact against the dense
float64 reference."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

import ringattn
from ringattn import Mask, comm
from ringattn.cost_model import Problem
from ringattn.decode import decode_attention
from ringattn.masks import KINDS, MaskContext, MaskKind, MaskTerm, register, unregister

from .cases import ref_with_grads
from .reference import dense_mask, rel_err


@dataclass(frozen=True)
class Dilated(MaskTerm):
    """Dilated attention: query ``i`` sees key ``j`` iff ``i - j`` is a multiple of ``step``."""

    step: int

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return torch.remainder(q_pos - k_pos, self.step) == 0


def check_dilation(value, ctx: MaskContext) -> Dilated:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max(ctx.total, 1):
        raise ValueError(f"dilation must be an int in [1, {ctx.total}], got {value!r}")
    return Dilated(value)


@contextlib.contextmanager
def dilation_kind():
    """The toy kind, registered for the block only (the pool's ranks outlive one test)."""
    register(MaskKind("dilation", check_dilation))
    try:
        yield
    finally:
        unregister("dilation")


def dilated_keep(n: int, step: int, causal: bool, seq_len: int | None = None) -> torch.Tensor:
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return dense_mask(n, causal=causal, seq_len=seq_len) & ((i - j) % step == 0)


def _dilated_on_ranks(layout: str, n: int, step: int, causal: bool, strategy: str) -> list[float]:
    rank, world = comm.group_rank_world()
    g = torch.Generator().manual_seed(7)
    q, k, v, dout = (torch.randn(1, n, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4))
    want = ref_with_grads(q, k, v, dout, dilated_keep(n, step, causal))
    with dilation_kind():
        qs, ks, vs = (ringattn.shard(t, layout=layout).requires_grad_() for t in (q, k, v))
        out = ringattn.attention(qs, ks, vs, strategy=strategy, mask=Mask(causal=causal, dilation=step))
        (out * ringattn.shard(dout, layout=layout)).sum().backward()
        sharding = ringattn.sharding_of(qs)
        got = [ringattn.unshard(out), *(sharding.unshard(t.grad) for t in (qs, ks, vs))]
    return [rel_err(x, ref) for x, ref in zip(got, (want[0], *want[2:]))]


@pytest.mark.parametrize("layout,causal,strategy", [("zigzag", True, "ring"), ("striped", False, "ring"),
                                                    ("contiguous", True, "allgather")])
def test_a_registered_kind_is_exact_on_two_ranks(ranks, layout, causal, strategy):
    for errs in ranks.run(2, _dilated_on_ranks, layout, 29, 3, causal, strategy):
        assert max(errs) < 1e-9, errs


def test_a_registered_kind_on_one_process_decoding_and_the_planner():
    g = torch.Generator().manual_seed(3)
    n = 20
    q, k, v = (torch.randn(1, n, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    with pytest.raises(TypeError, match="unexpected keyword 'dilation'"):
        Mask(dilation=2)
    with dilation_kind():
        assert "dilation" in KINDS and Mask(dilation=2).dilation == 2 and Mask().dilation is None
        out = ringattn.ring_attention(q, k, v, mask=Mask(causal=True, dilation=4, seq_len=18))
        want = ref_with_grads(q, k, v, torch.zeros_like(q), dilated_keep(n, 4, True, 18))[0]
        assert rel_err(out[:, :18], want[:, :18]) < 1e-12
        with pytest.raises(ValueError, match=r"dilation must be an int in \[1, 20\], got 0"):
            ringattn.ring_attention(q, k, v, mask=Mask(dilation=0))
        # Decoding: the last two tokens over the cache, as the square call computes their rows.
        pos = torch.arange(n)
        dec = decode_attention(q[:, -2:], k, v, pos[-2:], pos, mask=Mask(causal=True, dilation=4))
        full = ringattn.ring_attention(q, k, v, mask=Mask(causal=True, dilation=4))
        assert rel_err(dec, full[:, -2:]) < 1e-12
        # The planner plans with the same term: a dilated mask is not the plain causal one.
        kw = dict(seq_len=4096, world=4, heads=8, kv_heads=8)
        dilated = Problem(**kw, mask=Mask(causal=True, dilation=2))
        assert dilated.kinds == (("dilation", 2),) and dilated.spec().terms == (Dilated(2),)
        assert dilated != Problem(**kw, mask=Mask(causal=True))
    assert "dilation" not in KINDS


def _disagree_on_dilation() -> str:
    rank, _ = comm.group_rank_world()
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    with dilation_kind():
        try:
            ringattn.ring_attention(q, q, q, mask=Mask(dilation=2 + rank))
        except ValueError as e:
            return str(e)
    return "no error"


def test_ranks_that_pass_different_terms_disagree_before_any_exchange(ranks):
    for msg in ranks.run(2, _disagree_on_dilation):
        assert "ranks disagree" in msg and "Dilated(step=2)" in msg and "Dilated(step=3)" in msg, msg


def test_registering_a_taken_name_or_a_flat_keyword_is_refused():
    with pytest.raises(ValueError, match="registered already"):
        register(MaskKind("window", check_dilation))
    with pytest.raises(ValueError, match="reached through Mask"):
        register(MaskKind("dilation", check_dilation, keyword="dilation"))
    unregister("causal")  # a built-in kind stays
    assert "causal" in KINDS
