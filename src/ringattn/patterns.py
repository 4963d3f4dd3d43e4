"""Ready masks for ``ring_attention(slices=...)`` and ``ring_attention(mask_mod=...)``, on global positions.

Slices (MagiAttention's rectangles, ``masks.Slice``) are classified exactly and cheaply against every block
pair, so prefer them for long sequences; a ``mask_mod`` is evaluated on the pairs planning cannot decide
from their ranges (once per distinct call; plans are cached while it is the same function object).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SliceSpec = tuple[tuple[int, int], tuple[int, int], str]


def prefix_lm(prefix_len: int, seq_len: int) -> list[SliceSpec]:
    """Bidirectional attention inside the first ``prefix_len`` positions, causal after them."""
    if not 0 <= prefix_len <= seq_len:
        raise ValueError(f"prefix_len must be in [0, seq_len = {seq_len}], got {prefix_len}")
    return [((0, prefix_len), (0, prefix_len), "full"), ((prefix_len, seq_len), (0, seq_len), "causal")]


def block_causal(blocks: int | Sequence[int], seq_len: int) -> list[SliceSpec]:
    """Bidirectional inside each block, causal across blocks (a block sees itself and every earlier one):
    image tiles, chunks of a stream. ``blocks``: a block size, or the block boundaries ``[0, ..., seq_len]``."""
    if isinstance(blocks, int):
        if blocks < 1:
            raise ValueError(f"block size must be positive, got {blocks}")
        bounds = [*range(0, seq_len, blocks), seq_len]
    else:
        bounds = [int(b) for b in blocks]
        if bounds[0] != 0 or bounds[-1] != seq_len or any(a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"block boundaries must rise from 0 to seq_len = {seq_len}, got {bounds}")
    return [((a, b), (0, b), "full") for a, b in zip(bounds, bounds[1:]) if b > a]


def documents(cu_seqlens: Sequence[int] | torch.Tensor, causal: bool = True) -> list[SliceSpec]:
    """One slice per packed document (what ``cu_seqlens=`` does), for composing with other slices."""
    b = [int(x) for x in cu_seqlens]
    kind = "causal" if causal else "full"
    return [((s, e), (s, e), kind) for s, e in zip(b, b[1:]) if e > s]


@dataclass(frozen=True)
class Longformer:
    """Longformer's pattern: a symmetric window of ``window`` positions each side, plus global tokens that
    see and are seen by every position. A ``mask_mod``; equal instances share cached plans."""

    window: int
    global_tokens: tuple[int, ...] = ()

    def __call__(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        keep = (q_idx - kv_idx).abs() <= self.window
        if self.global_tokens:
            g = torch.tensor(self.global_tokens, device=q_idx.device)
            keep = keep | torch.isin(q_idx, g) | torch.isin(kv_idx, g)
        return keep

    def __repr__(self) -> str:
        data = ",".join(map(str, self.global_tokens)).encode()
        return f"Longformer(window={self.window}, global={len(self.global_tokens)}:{zlib.crc32(data):08x})"


def longformer(window: int, global_tokens: Sequence[int] | torch.Tensor = ()) -> Longformer:
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    return Longformer(int(window), tuple(sorted({int(t) for t in global_tokens})))
