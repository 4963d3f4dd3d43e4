"""The settings each registered attention-implementation name runs with (``register``, ``settings``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RingSettings:
    """What ``attn_implementation="ring"`` uses: the sequence-parallel group, layout and strategy."""

    group: object = None
    layout: str = "contiguous"
    strategy: str = "ring"
    backward_exchange: str = "ring"


SETTINGS: dict[str, RingSettings] = {}


def settings(name: str = "ring") -> RingSettings:
    """The settings registered under ``name`` (raises ``KeyError`` if ``register`` was not called)."""
    return SETTINGS[name]
