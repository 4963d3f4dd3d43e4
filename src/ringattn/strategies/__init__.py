"""Context-parallel strategies behind ``ringattn.attention``: one contract, identical results.

- ``"ring"``: pass-KV ring (``ringattn.ring_attention``); K/V blocks travel, overlapped with compute.
- ``"allgather"``: every rank gathers all K/V (kv_heads only, a few heads at a time, the next chunk in
  flight while the current one is computed); dK/dV go home by reduce-scatter (Llama 3's choice).
- ``"ulysses"``: all-to-all from sequence-sharded to head-sharded, exact attention over the whole
  sequence on ``heads / W`` heads, all-to-all back (DeepSpeed-Ulysses).
- ``"hybrid"``: Ulysses inside one dimension of a 2-D ``DeviceMesh``, the ring across the other (USP).
- ``"auto"``: the cost model (``ringattn.cost_model``) picks one of the above from the checked call and the
  configured hardware (deterministic, so every rank picks the same; ``call.resolve_auto``).

Each strategy is one module here that registers a ``base.StrategyKind`` (its topology, the keywords that
tune it, its tasks, its run and its cost estimate); this package imports every module in it, and
``auto.py`` last, which compares them. Strategy-specific keywords:
``kv_heads_per_gather`` (allgather: kv heads gathered at a time; ``Options.kv_head_chunk``);
``backward_exchange`` (ring and hybrid: ``"ring"`` or ``"direct"``, see ``ring_attention``; the others
take only ``"ring"``). Under ``"auto"`` a
keyword the chosen strategy does not use is dropped: it tunes a strategy that was not chosen.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import REGISTRY, StrategyKind

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "auto":  # auto compares the others: imported once they are all registered
        importlib.import_module(f".{_module.name}", __name__)

from . import auto  # noqa: E402  (it compares the strategies imported above)

# strategy -> run(q, k, v, call) -> (out, lse), differentiable; the front door (call.py) validates first.
IMPLEMENTATIONS = {name: kind.run for name, kind in REGISTRY.items()}

__all__ = ["IMPLEMENTATIONS", "REGISTRY", "StrategyKind", "allgather", "auto", "hybrid", "ring", "ulysses"]
