"""A new layout is one ``LayoutRule``: registered from this file alone (no package file edited), it shards,
runs ring, all-gather and Ulysses attention exactly against the dense float64 reference, and
unshards."""

from __future__ import annotations

import contextlib

import pytest
import torch

import ringattn
from ringattn import Layout, Mask, comm
from ringattn.layouts import RULES, LayoutRule, layout_of, register, unregister
from ringattn.masks import Segment

from .cases import ref_with_grads
from .reference import dense_mask, rel_err


class Reversed(LayoutRule):
    """Contiguous blocks in reverse rank order: rank r holds ``[(W-1-r)*c, (W-r)*c)``."""

    name = "reversed"

    def positions(self, rank, world, local_len, bounds):
        return (Segment((world - 1 - rank) * local_len, local_len),)


@contextlib.contextmanager
def reversed_layout():
    """The toy layout, registered for the block only (the pool's ranks outlive one test)."""
    register(Reversed())
    try:
        yield
    finally:
        unregister("reversed")


def _reversed_on_ranks(n: int, causal: bool, window, strategy: str) -> list[float]:
    rank, world = comm.group_rank_world()
    g = torch.Generator().manual_seed(11)
    q, k, v, dout = (torch.randn(1, n, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4))
    want = ref_with_grads(q, k, v, dout, dense_mask(n, causal=causal, window=window))
    with reversed_layout():
        qs, ks, vs = (ringattn.shard(t, layout="reversed").requires_grad_() for t in (q, k, v))
        held = ringattn.layouts.global_positions("reversed", rank, world, qs.shape[1])
        assert int(held[0]) == (world - 1 - rank) * qs.shape[1]
        out = ringattn.attention(qs, ks, vs, strategy=strategy, mask=Mask(causal=causal, window=window))
        (out * ringattn.shard(dout, layout=Layout.REVERSED)).sum().backward()
        sharding = ringattn.sharding_of(qs)
        assert sharding.layout == "reversed"
        got = [ringattn.unshard(out), *(sharding.unshard(t.grad) for t in (qs, ks, vs))]
    return [rel_err(x, ref) for x, ref in zip(got, (want[0], *want[2:]))]


@pytest.mark.parametrize("causal,window,strategy", [(True, None, "ring"), (False, (5, 3), "ring"),
                                                    (True, (4, -1), "allgather"), (True, None, "ulysses")])
def test_a_registered_layout_is_exact_on_two_ranks(ranks, causal, window, strategy):
    for errs in ranks.run(2, _reversed_on_ranks, 27, causal, window, strategy):
        assert max(errs) < 1e-9, errs


def test_a_registered_layout_is_a_member_of_layout_while_registered():
    builtin = list(Layout)
    with reversed_layout():
        assert Layout("reversed") is Layout.REVERSED and Layout.REVERSED == "reversed"
        assert list(Layout) == [*builtin, "reversed"] and layout_of("reversed") is RULES["reversed"]
        assert not layout_of("reversed").in_order(2) and layout_of("reversed").rank_order(2, 3).tolist() == \
            [3, 4, 5, 0, 1, 2]
        with pytest.raises(ValueError, match="a layout needs a new name"):
            register(Reversed())
        with pytest.raises(ValueError, match=r"uneven shards take layout 'contiguous', 'zigzag' or 'striped', "
                                             r"got 'reversed'"):
            ringattn.layouts.uneven_lengths(10, 2, "reversed")
    assert list(Layout) == builtin and "reversed" not in RULES and not hasattr(Layout, "REVERSED")
    with pytest.raises(ValueError, match="layout must be one of"):
        layout_of("reversed")
    unregister("zigzag")  # a built-in layout stays
    assert Layout("zigzag") is Layout.ZIGZAG and "zigzag" in RULES
