"""Every kernel's logsumexp convention, and the two conversions to and from ours, in one table.

Ours: ``(batch, heads, nq)``, float32 (float64 for float64 input), natural log, ``-inf`` for a row that
sees no key, which the merge needs (such a row adds nothing). A backward kernel is handed ``+inf`` for
such rows instead: ``P = exp(s - lse)`` is then exactly 0 with no special case in the kernel.

The kernels differ in the value an empty row comes back with and in how long the row dimension is:

- FA2 and FA3 (``aten._flash_attention_forward``): ``+inf`` (softmax.h: ``Split ? -INFINITY : INFINITY``);
- FA4 (``flash_attn.cute``): ``-inf`` (already ours);
- efficient attention: ``0``, and the rows are padded to ``ceil(nq / 32) * 32`` with ``+inf``; its
  backward needs that padded shape (``lse_strideH % 8``), so it is padded again there;
- the CPU flash op: ``0``.

A kernel that reports empty rows as ``0`` cannot tell them from a genuine ``lse = 0``: the caller passes
the rows it knows are empty (from the mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..modes import Mode


class LseKernel(Mode):
    FA2 = "FA2"
    FA3 = "FA3"
    FA4 = "FA4"
    EFFICIENT = "efficient"
    CPU = "cpu"


@dataclass(frozen=True)
class LseConvention:
    empty: float  # the lse a row that sees no key comes back with
    row_multiple: int = 1  # the row dimension is padded to a multiple of this, forward and backward


CONVENTIONS: dict[LseKernel, LseConvention] = {
    LseKernel.FA2: LseConvention(math.inf),
    LseKernel.FA3: LseConvention(math.inf),
    LseKernel.FA4: LseConvention(-math.inf),
    LseKernel.EFFICIENT: LseConvention(0.0, row_multiple=32),
    LseKernel.CPU: LseConvention(0.0),
}


def from_kernel(lse: torch.Tensor, kernel: LseKernel, nq: int, *, empty_rows: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A forward kernel's lse as ours: ``nq`` rows, ``-inf`` where empty.

    ``empty_rows`` (bool ``(nq,)``) marks rows known to see nothing; it is required to find them for a
    kernel whose empty value is finite, and without it such a kernel is taken to have no empty rows.
    """
    conv = CONVENTIONS[kernel]
    if lse.shape[-1] != nq:
        lse = lse[..., :nq]
    if empty_rows is not None:
        lse = lse.masked_fill(empty_rows, -math.inf)
    elif conv.empty == math.inf:
        lse = lse.masked_fill(lse == math.inf, -math.inf)
    return lse.to(dtype).contiguous()


def to_kernel(lse: torch.Tensor, kernel: LseKernel, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Our final lse ``(b, h, n)`` as a backward kernel takes it: ``+inf`` for rows that see nothing,
    padded to the kernel's row multiple (with ``+inf``), contiguous."""
    b, h, n = lse.shape
    mult = CONVENTIONS[kernel].row_multiple
    fixed = torch.where(torch.isneginf(lse), math.inf, lse).to(dtype)
    if n % mult == 0:
        return fixed.contiguous()
    out = torch.full((b, h, -(-n // mult) * mult), math.inf, dtype=dtype, device=lse.device)
    out[..., :n] = fixed
    return out
