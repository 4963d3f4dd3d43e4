"""``strategy="auto"`` and ``ringattn plan``: every registered strategy's estimate for a problem, and the
choice among them (deterministic from the problem and the configured hardware, so every rank chooses
the same)."""

from __future__ import annotations

import dataclasses
import functools

from ..cost_model import Estimate, Hardware, Problem, configured_hardware, min_sequence, overlap_block
from ..modes import Strategy
from .base import REGISTRY

# Every strategy the cost model compares, in the enum's order (ties go to the first).
STRATEGY_ORDER = tuple(str(s) for s in Strategy if s in REGISTRY)


@functools.lru_cache(maxsize=256)
def estimate_all(p: Problem, hw: Hardware) -> tuple[Estimate, ...]:
    """One ``Estimate`` per strategy (``STRATEGY_ORDER``), with ``fits`` set against device memory."""
    out = []
    for name in STRATEGY_ORDER:
        est = REGISTRY[Strategy(name)].estimate(p, hw)
        est.fits = est.memory_bytes <= hw.memory
        out.append(est)
    return tuple(out)


def recommend(estimates, allowed=STRATEGY_ORDER) -> str:
    """Fastest feasible strategy that fits in memory (ties: the order of ``STRATEGY_ORDER``)."""
    cands = [e for e in estimates if e.feasible and e.strategy in allowed]
    fitting = [e for e in cands if e.fits] or cands
    if not fitting:
        return "ring"
    best = min(e.time_s for e in fitting)
    return next(e.strategy for e in fitting if e.time_s <= best * 1.0001)


def choose_strategy(p: Problem, device=None) -> str:
    """The strategy ``ringattn.attention(strategy="auto")`` runs for a checked call (``Problem.from_call``):
    the cost model's choice on the configured hardware among the strategies "auto" may choose."""
    allowed = tuple(name for name in STRATEGY_ORDER if REGISTRY[Strategy(name)].auto)
    return recommend(estimate_all(p, configured_hardware(device)), allowed=allowed)


def report(p: Problem, hw: Hardware) -> dict:
    """Everything ``ringattn plan`` prints, as a JSON-able dict."""
    ests = estimate_all(p, hw)
    c = p.local_len
    need = overlap_block(hw, p.heads, p.kv_heads, p.dtype_bytes)
    return {
        "problem": dataclasses.asdict(p),
        "hardware": dataclasses.asdict(hw),
        "strategies": [dataclasses.asdict(e) for e in ests],
        "recommendation": recommend(ests),
        "overlap": {"block": c, "min_block": need, "ring_hidden_by_condition": c >= need,
                    "paper_min_block": overlap_block(hw), "paper_min_sequence": min_sequence(hw)},
    }
