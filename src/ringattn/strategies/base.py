"""What a strategy is to the front door: one :class:`StrategyKind` per file, registered by name.

A strategy owns where it runs (``topology``: its groups from ``group=`` / ``mesh=``), the keywords that
tune it (``tunes``: any other strategy refuses them), which kernel tasks this rank computes (``tasks``:
planned before the agreement where a user's ``mask_mod`` makes the plan), how it runs (``run``) and what
the cost model predicts for it (``estimate``, which ``"auto"`` compares). Adding
a strategy is a file in this package that calls :func:`register`, plus a ``modes.Strategy`` member.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import comm
from ..callspec import AttentionCall, Topology
from ..cost_model import Estimate, Hardware, Problem
from ..masks import Task
from ..modes import Strategy

# The keywords that tune one kind of strategy: their default, and what another strategy says of them.
TUNING: dict[str, tuple[object, str]] = {
    "kv_head_chunk": (None, "kv_heads_per_gather / kv_head_chunk is an allgather setting; strategy={strategy!r} "
                            "gathers no K/V"),
    "backward_exchange": ("ring", "backward_exchange='direct' is a ring setting; strategy={strategy!r} has no ring"),
}


@dataclass(frozen=True)
class StrategyKind:
    name: Strategy
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionCall], tuple[torch.Tensor, torch.Tensor]]
    topology: Callable[[object, object], Topology]
    tasks: Callable[[AttentionCall, int, int], tuple[Task, ...]] | None = None  # None: every rank plans alike
    tunes: frozenset[str] = frozenset()
    estimate: Callable[[Problem, Hardware], Estimate] | None = None  # the cost model's view of it
    auto: bool = True  # "auto" may choose it for a call over one group

    def check_tuning(self, values: dict[str, object]) -> None:
        """A keyword that tunes another strategy, at a value other than its default, is an error."""
        for name, (default, message) in TUNING.items():
            if name not in self.tunes and values.get(name, default) not in (None, default):
                raise ValueError(message.format(strategy=str(self.name)))


REGISTRY: dict[Strategy, StrategyKind] = {}


def register(kind: StrategyKind) -> StrategyKind:
    REGISTRY[kind.name] = kind
    return kind


def group_topology(strategy: Strategy, group, mesh, *, split_heads: bool = False) -> Topology:
    """A strategy over one process group (``group=``); with ``split_heads`` the same group splits the
    heads. ``mesh=`` is an error at once (nothing to agree on)."""
    if mesh is not None:
        raise ValueError(f"mesh is only used by strategy='hybrid' (got strategy={strategy!r}); "
                         "pass group= for the others")
    rank, world = comm.group_rank_world(group)
    heads = (group, world, rank) if split_heads else (None, 1, 0)
    return Topology(group, rank, world, 1, *heads, agree_over=(group,))
