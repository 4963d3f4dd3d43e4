"""Context-parallel strategies behind ``ringattn.attention``."""

from __future__ import annotations


def dispatch(q, k, v, *, strategy, group=None, mesh=None, **kwargs):
    from ..ring import ring_attention

    if strategy == "ring":
        return ring_attention(q, k, v, group=group, **kwargs)
    raise ValueError(f"strategy must be one of ('ring',), got {strategy!r}")
