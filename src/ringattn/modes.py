"""The named modes of a call, one list of choices each, for the API, the validation and every CLI.

Each is a ``StrEnum``: members compare equal to their strings, so ``layout="zigzag"`` and
``layout=Layout.ZIGZAG`` are the same argument, and ``choices=list(Layout)`` lists them for argparse.
A member's ``repr`` is its value's (``'zigzag'``): argparse's "invalid choice" and every ``{x!r}`` in an
error message show what the user can type, not ``<Layout.ZIGZAG: 'zigzag'>``.
"""

from __future__ import annotations

from enum import StrEnum

import torch


class Mode(StrEnum):
    """A ``StrEnum`` shown as its value everywhere (``str``, ``format`` and ``repr``)."""

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def add(cls, value: str) -> Mode:
        """A member for ``value`` added at run time (a layout registered by a plugin or a test): ``cls(value)``,
        ``list(cls)``, argparse's choices and ``cls.NAME`` then see it as they see the members declared here."""
        if value in cls._value2member_map_:
            return cls._value2member_map_[value]
        member = str.__new__(cls, value)
        member._value_ = value
        member._name_ = name = value.upper().replace("-", "_")
        member.__objclass__ = cls
        member._sort_order_ = len(cls._member_names_)
        cls._member_names_.append(name)
        cls._member_map_[name] = member
        cls._value2member_map_[value] = member
        type.__setattr__(cls, name, member)
        return member

    @classmethod
    def remove(cls, value: str) -> None:
        """Take back a member made by ``add``."""
        member = cls._value2member_map_.pop(value, None)
        if member is None:
            return
        cls._member_names_.remove(member._name_)
        del cls._member_map_[member._name_]
        type.__delattr__(cls, member._name_)


class Layout(Mode):
    """Which global positions a rank holds (see ``ringattn.layouts``). Each member has its ``LayoutRule`` there
    (``layouts.layout_of``); a rule registered there (``layouts.register``) adds its member here."""

    CONTIGUOUS = "contiguous"
    ZIGZAG = "zigzag"
    STRIPED = "striped"
    BALANCED = "balanced"


class Strategy(Mode):
    """How the sequence split is turned into exact attention (see ``ringattn.strategies``)."""

    RING = "ring"
    ALLGATHER = "allgather"
    ULYSSES = "ulysses"
    HYBRID = "hybrid"
    AUTO = "auto"


class BackwardExchange(Mode):
    """How the ring's backward moves blocks (see Note [Backward exchange: ring vs direct] in ``schedule.py``)."""

    RING = "ring"
    DIRECT = "direct"


# The strategies that run (or may run) the ring, and so take backward_exchange="direct".
RING_STRATEGIES = frozenset({Strategy.RING, Strategy.HYBRID, Strategy.AUTO})


def choose(enum: type[StrEnum], value, what: str) -> StrEnum:
    """``value`` as a member of ``enum``, or a ``ValueError`` naming ``what`` and the choices."""
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{what} must be one of {tuple(str(m) for m in enum)}, got {value!r}") from None


# The dtypes a command line or a test case names, by torch's own names.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}
