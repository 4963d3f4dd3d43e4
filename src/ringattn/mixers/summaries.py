"""The algebra of the mixers' summaries, shared by both combines (``state.scan_states``' all-gather and fold,
``scan.py``'s log-depth scan): a span's summary ``(M, S)`` maps the state entering it to the state leaving it,
``h_out = M h_in + S``, and two spans compose. ``kind`` says what ``M`` is: elementwise (``"diagonal"``), a K x K
matrix on a ``(..., K, V)`` state (``"dense"``), or the log of an elementwise decay on a stabilised state that
travels with its log scale (``"log"``; ``state.py``'s docstring says why).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .fragments import Fragments, Piece, RowPlan

KINDS = ("diagonal", "dense", "log")
WHAT = "ringattn.mixers.run_fragments"
# The log scale of an empty state under kind="log": exp of it (less any finite log scale) is 0, with no
# infinities whose differences would be NaN.
EMPTY_LOG_SCALE = -1e30


def summary_dtype(dtype: torch.dtype) -> torch.dtype:
    """Summaries and passed states: float64 for float64 inputs, float32 otherwise (half-precision chains
    of transitions lose the state)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def transition_shape_of(kind: str, state_shape: tuple[int, ...], transition_shape=None) -> tuple[int, ...]:
    if kind == "dense":
        if len(state_shape) < 2:
            raise ValueError(f"{WHAT}: kind='dense' needs a state of shape (..., K, V), got {state_shape}")
        return (*state_shape[:-1], state_shape[-2])
    if kind == "log":
        if len(state_shape) < 2 or state_shape[0] != 2:
            raise ValueError(f"{WHAT}: kind='log' needs a state of shape (2, ...): its value and its log scale, "
                             f"got {state_shape}")
        shape = tuple(transition_shape) if transition_shape is not None else tuple(state_shape[1:])
        if len(shape) != len(state_shape) - 1:
            # (rows, *shape) must broadcast against the (rows, *state_shape[1:]) halves dim for dim
            raise ValueError(f"{WHAT}: kind='log' takes a transition_shape with one dim fewer than the state "
                             f"{state_shape} (it applies to the value and the log scale alike), got {shape}")
        return shape
    return tuple(transition_shape) if transition_shape is not None else tuple(state_shape)


def apply(kind: str, m: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``M`` applied to a state: elementwise (diagonal, broadcast) or as a K x K matrix on (..., K, V); for
    ``kind="log"``, ``log M`` added to the log scale (dim 1 of a ``(rows, 2, ...)`` state)."""
    if kind == "log":
        return torch.stack([h[:, 0], m + h[:, 1]], 1)
    return m @ h if kind == "dense" else m * h


def fold(kind: str, m: torch.Tensor, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The state after a span with summary ``(M, S)`` entered with state ``h``: ``M h + S``."""
    if kind != "log":
        return apply(kind, m, h) + s
    a = m + h[:, 1]
    top = torch.maximum(a, s[:, 1])
    return torch.stack([torch.exp(a - top) * h[:, 0] + torch.exp(s[:, 1] - top) * s[:, 0], top], 1)


def empty_state(kind: str, rows: int, state_shape: Sequence[int], dtype: torch.dtype,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The state a span adds nothing to: zeros, and for ``kind="log"`` the log scale ``EMPTY_LOG_SCALE``."""
    h = torch.zeros(rows, *state_shape, dtype=dtype, device=device)
    if kind == "log":
        h[:, 1] = EMPTY_LOG_SCALE
    return h


def compose(kind: str, later: tuple[torch.Tensor, torch.Tensor],
            earlier: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The summary of two consecutive spans: ``(M2, S2) o (M1, S1) = (M2 M1, M2 S1 + S2)`` (associative; for
    ``kind="log"`` the transitions are logs, so ``M2 M1`` is their sum)."""
    (m2, s2), (m1, s1) = later, earlier
    return (m2 + m1 if kind == "log" else apply(kind, m2, m1)), fold(kind, m2, s2, s1)


def local_pieces(plan: Fragments) -> list[tuple[RowPlan, Piece]]:
    """This rank's pieces, row plan by row plan, each in local order: the order ``scan_states`` takes
    summaries in and returns initial states in."""
    return [(rp, p) for rp in plan.plans for p in rp.local_pieces(plan.rank)]
