"""ringattn: exact Ring Attention and context parallelism for PyTorch, on CPU (gloo) and GPU (NCCL).

The public contract is ``docs/api.md``: ``ring_attention``, ``attention``, ``shard``, ``unshard`` and
``ringattn.hf.register``.
"""

from __future__ import annotations

import contextlib

from .comm import Stats
from .layouts import LAYOUTS, global_positions, shard, unshard
from .ring import ring_attention

__all__ = ["LAYOUTS", "Stats", "attention", "global_positions", "profile", "ring_attention", "shard",
           "unshard"]
__version__ = "0.1.0"


def attention(q, k, v, *, strategy: str = "ring", group=None, mesh=None, **kwargs):
    """Context-parallel attention by any strategy; same contract and results as ``ring_attention``.

    ``strategy``: ``"ring"``, ``"allgather"``, ``"ulysses"``, ``"hybrid"`` (needs a 2-D ``mesh``) or
    ``"auto"`` (the planner chooses).
    """
    from .strategies import dispatch

    return dispatch(q, k, v, strategy=strategy, group=group, mesh=mesh, **kwargs)


@contextlib.contextmanager
def profile():
    """Collect per-rank compute time, communication wait, FLOPs and bytes sent of the calls inside.

    >>> with ringattn.profile() as st:
    ...     out = ringattn.ring_attention(q, k, v, causal=True)
    >>> st.compute_s, st.wait_s, st.flops, st.bytes_sent
    """
    from . import comm

    prev = comm.stats()
    st = Stats()
    comm.set_stats(st)
    try:
        yield st
    finally:
        comm.set_stats(prev)


def __getattr__(name):
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(name)
