"""The strategy registry: every strategy is one module that registers what it owns (topology, tuning
keywords, tasks, run); the front door reads only the registry."""

from __future__ import annotations

import pytest

from ringattn import Strategy
from ringattn.strategies import IMPLEMENTATIONS, REGISTRY
from ringattn.strategies.base import TUNING, group_topology


def test_every_strategy_is_registered():
    assert set(REGISTRY) == set(Strategy) - {Strategy.AUTO}
    assert all(IMPLEMENTATIONS[name] is kind.run for name, kind in REGISTRY.items())
    assert set().union(*(kind.tunes for kind in REGISTRY.values())) == set(TUNING)


def test_tuning_keywords_belong_to_their_strategy():
    assert REGISTRY[Strategy.ALLGATHER].tunes == {"kv_head_chunk"}
    assert REGISTRY[Strategy.RING].tunes == REGISTRY[Strategy.HYBRID].tunes == {"backward_exchange"}
    with pytest.raises(ValueError, match="kv_head_chunk is an allgather setting; strategy='ulysses'"):
        REGISTRY[Strategy.ULYSSES].check_tuning({"kv_head_chunk": 2})
    with pytest.raises(ValueError, match="backward_exchange='direct' is a ring setting; strategy='allgather'"):
        REGISTRY[Strategy.ALLGATHER].check_tuning({"backward_exchange": "direct"})
    REGISTRY[Strategy.ALLGATHER].check_tuning({"kv_head_chunk": 2, "backward_exchange": "ring"})
    REGISTRY[Strategy.RING].check_tuning({"backward_exchange": "direct", "kv_head_chunk": None})


def test_topologies():
    ring, uly = REGISTRY[Strategy.RING].topology(None, None), REGISTRY[Strategy.ULYSSES].topology(None, None)
    assert (ring.world, ring.head_world, uly.world, uly.head_world) == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="mesh is only used by strategy='hybrid'"):
        group_topology(Strategy.RING, None, object())
    with pytest.raises(ValueError, match="strategy='hybrid' needs mesh="):
        REGISTRY[Strategy.HYBRID].topology(None, None)


def test_each_strategy_owns_its_estimate():
    from ringattn.cost_model import PRESETS, Problem
    from ringattn.strategies.auto import STRATEGY_ORDER, estimate_all

    assert STRATEGY_ORDER == tuple(str(s) for s in Strategy if s in REGISTRY)
    p, hw = Problem(seq_len=4 * 4096, world=4, heads=8, kv_heads=2), PRESETS["a100-nvlink"]
    ests = estimate_all(p, hw)
    assert [e.strategy for e in ests] == list(STRATEGY_ORDER)
    for e in ests:
        again = REGISTRY[Strategy(e.strategy)].estimate(p, hw)
        assert (again.strategy, again.time_s, again.flops) == (e.strategy, e.time_s, e.flops)
    assert [REGISTRY[Strategy(n)].auto for n in STRATEGY_ORDER] == [True, True, True, False]


def _auto_with_hardware_per_rank():
    import torch

    import ringattn
    from ringattn import comm, plan

    rank, _ = comm.group_rank_world()
    # Rank 0 plans for a very slow link (the fewest bytes: Ulysses), rank 1 for a balanced one (a ring).
    hw = plan.Hardware("slow", 1e14, 1e8, 1e-6) if rank == 0 else plan.Hardware("balanced", 1e12, 1e10, 1e-6)
    plan.set_hardware(hw)
    q = torch.zeros(1, 1024, 8, 16, requires_grad=True)
    k = v = torch.zeros(1, 1024, 8, 16)
    try:
        ringattn.attention(q, k, v, strategy="auto", causal=True, layout="zigzag")
    except ValueError as e:
        return str(e)
    finally:
        plan.set_hardware(None)
    return "ran"


def test_auto_choice_is_agreed_across_ranks(ranks):
    # The choice is made after the checks and is part of what the ranks agree on: ranks that would run
    # different strategies raise together instead of entering different collectives.
    for got in ranks.run(2, _auto_with_hardware_per_rank):
        assert "ranks disagree on the attention call" in got and "strategy" in got, got
