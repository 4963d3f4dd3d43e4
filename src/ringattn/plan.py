"""``ringattn.plan``: the name ``docs/api.md`` and the ``ringattn plan`` command use for the cost model
(``ringattn.cost_model``) with each strategy's estimate and the choice among them
(``ringattn.strategies.auto``)."""

import types

from .cost_model import *  # noqa: F403
from .strategies.allgather import estimate_allgather
from .strategies.auto import STRATEGY_ORDER, choose_strategy, estimate_all, recommend, report
from .strategies.hybrid import estimate_hybrid, hybrid_mesh
from .strategies.ring import estimate_ring
from .strategies.ulysses import estimate_ulysses

__all__ = ["STRATEGY_ORDER", "choose_strategy", "estimate_all", "estimate_allgather", "estimate_hybrid",  # noqa: F405
           "estimate_ring", "estimate_ulysses", "hybrid_mesh", "recommend", "report",
           *(name for name, value in dict(globals()).items()
             if not name.startswith("_") and not isinstance(value, types.ModuleType))]
