"""Score modifications: what changes the scores ``s = scale * q.k`` of a pair before the mask applies.

Two kinds, both pure functions of a score, its head and the pair's global positions:

- ``softcap`` (Gemma 2): ``s -> cap * tanh(s / cap)``; its backward multiplies by ``1 - tanh^2``.
- ``alibi_slopes`` (ALiBi): ``s -> s - slope_h * (i - j)`` for query position ``i``, key position ``j``.

Attention sinks are not a score modification: a sink is one more logit in every row's softmax
denominator, so it merges into the finished ``(out, lse)`` of the row (``merge_sinks``) and every
kernel runs unchanged; see ``autograd.SavedAttention`` for its backward.

A backend lists the kinds it takes in ``Capabilities.score_mods``; the front door picks the reference
backend for a call whose kinds the chosen one lacks. A score that depends on positions (ALiBi) needs
positions for every task: such calls plan every visible pair as a PARTIAL tile (``MaskSpec.positional``),
unless the backend lists ALiBi in ``Capabilities.native_score_mods`` too (FlashAttention's
``alibi_slopes``), in which case they are planned as without it and every task carries its positions.

ALiBi's bias on a tile is split in two for precision: ``-slope (i - j) = slope (j - k0) - slope (i - k0)``
with ``k0`` the tile's first key. The kernel adds only the first part, small (at most slope x tile
width) and the same for every row; the second part is constant per row, so it shifts that row's lse
and nothing else (``row_shift``). Adding ``slope * i`` for positions near a million in the kernel's own
dtype would round away the differences between keys.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from .masks import Segment

SOFTCAP = "softcap"
ALIBI = "alibi"


@dataclass(frozen=True, eq=False)
class ScoreMod:
    """The score modifications of one call (None fields: not used)."""

    softcap: float | None = None
    alibi_slopes: torch.Tensor | None = None  # (heads,), float64 on the call's device

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(k for k, on in ((SOFTCAP, self.softcap is not None),
                                         (ALIBI, self.alibi_slopes is not None)) if on)

    def heads(self, h0: int, h1: int) -> ScoreMod:
        """The modifications of query heads ``[h0, h1)`` (strategies that split the heads)."""
        if self.alibi_slopes is None:
            return self
        return ScoreMod(self.softcap, self.alibi_slopes[h0:h1])

    def key_bias(self, k_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # With a softcap as well, the kernel receives key_bias + row_shift, (heads, nq, nk).
        """ALiBi's per-key part ``slope_h (j - k0)``, ``(heads, 1, nk)``."""
        rel = (k_pos - k_pos[:1]).to(self.alibi_slopes.dtype)
        return (self.alibi_slopes[:, None, None] * rel[None, None, :]).to(dtype)

    def row_shift(self, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """ALiBi's per-row part ``-slope_h (i - k0)``, ``(heads, nq)``: what the tile's lse is off by."""
        rel = (q_pos - k_pos[:1]).to(self.alibi_slopes.dtype)
        return (-self.alibi_slopes[:, None] * rel[None, :]).to(dtype)

    def flash_alibi(self, q_pos: Segment, k_pos: Segment, nq: int, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ALiBi on a task with these positions (equal strides) as FlashAttention applies it:
        ``(alibi_slopes, lse_shift)``, both ``(heads,)``, float64.

        FlashAttention adds ``-slope' |r + nk - nq - c|`` for row ``r`` and key ``c`` of the call (bottom-right
        aligned). Ours is ``-slope (i - j)`` with ``i = q0 + r w``, ``j = k0 + c w``: with ``slope' = slope w``
        the two differ by a constant per row wherever the key is at or left of that diagonal (a causal task,
        or a band that ends on it), so only the lse moves: ours = the kernel's + ``lse_shift``.
        """
        w = q_pos.stride
        slopes = self.alibi_slopes.to(torch.float64)
        return slopes * w, slopes * (w * (nk - nq) - (q_pos.start - k_pos.start))

    def describe(self) -> str:
        """For the cross-rank agreement: the values too, since ranks holding different slopes would
        compute a silently inconsistent attention."""
        parts = [f"softcap={self.softcap!r}"]
        if self.alibi_slopes is not None:
            parts.append(f"alibi={_digest(self.alibi_slopes)}")
        return " ".join(parts)


def _digest(t: torch.Tensor) -> str:
    data = t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return f"{tuple(t.shape)}:{zlib.crc32(data):08x}"


def check_softcap(cap) -> float | None:
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"softcap must be a positive finite float or None, got {cap!r}")
    return float(cap)


def check_per_head(name: str, t, heads: int, like: torch.Tensor) -> torch.Tensor | None:
    """A ``(heads,)`` float tensor on q's device, or None."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (heads,) or None, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != heads:
        raise ValueError(f"{name} must have shape (heads,) = ({heads},), got {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on q's device {like.device}, got {t.device}")
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{name} must be finite")
    return t


def check_alibi_slopes(slopes, heads: int, like: torch.Tensor) -> torch.Tensor | None:
    """ALiBi slopes, which are constants here: a slope that asks for a gradient would silently get none."""
    slopes = check_per_head("alibi_slopes", slopes, heads, like)
    if slopes is not None and slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes get no gradient from ring attention (they are constants); pass "
                         "alibi_slopes.detach() if the slopes are not trained")
    return slopes


def sink_digest(sinks: torch.Tensor | None) -> str:
    return "None" if sinks is None else _digest(sinks)


def merge_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of rows whose softmax has one more logit per head, ``sinks`` ``(heads,)``, that adds
    to the denominator and carries no value. ``out`` ``(b, n, h, dv)``, ``lse`` ``(b, h, n)``; rows that saw
    no key come back with out 0 and lse = the sink."""
    s = sinks.detach().to(lse.dtype)[None, :, None]
    new = torch.logaddexp(lse, s.expand_as(lse))
    keep = torch.exp(lse - new)  # exp(-inf) = 0 for rows with no key
    return out * keep.transpose(1, 2).unsqueeze(-1).to(out.dtype), new
