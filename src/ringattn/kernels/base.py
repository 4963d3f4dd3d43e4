"""The contract every per-block attention backend implements.

Tensors use the flash-attn layout: ``q`` ``(batch, nq, heads, d)``, ``k`` ``(batch, nk, kv_heads, d)``,
``v`` ``(batch, nk, kv_heads, dv)``; query head ``i`` reads key/value head ``i // (heads // kv_heads)``.
``causal`` is aligned top-left (query row ``i`` sees keys ``j <= i``) whatever ``nq`` and ``nk`` are.
``mask`` is an optional boolean ``(nq, nk)`` tensor, True = visible; rows with nothing visible must come
back with ``out = 0`` and ``lse = -inf``.

``forward`` returns ``(out, lse)``: ``out`` ``(batch, nq, heads, dv)`` in any floating dtype (the ring
accumulates it in float32/float64), ``lse`` ``(batch, heads, nq)`` float32 (float64 for float64 input).
``backward`` takes the *final* out and lse of the whole rows (not this block's) and returns this block
pair's share of ``(dq, dk, dv)`` (FlashAttention-2: D = rowsum(dO * O), P = exp(S * scale - lse)).
``lse`` may hold ``-inf`` for rows that see no key anywhere; their gradients are zero.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Backend(Protocol):
    name: str

    def supports(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool: ...

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(
        self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor, *, scale: float, causal: bool, mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a unit stride on its last dim. The fused ops assume one: the CPU op silently reads
    wrong elements otherwise (e.g. for ``x[..., ::2]`` or an expanded last dim); other strides are fine."""
    return x if x.stride(-1) == 1 else x.contiguous()


def heads_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(batch, n, heads, d)`` stored as ``(batch, heads, n, d)`` (the fused ops' native order);
    a copy only if it is not stored that way already.

    The ring keeps every block, accumulator and buffer on the wire in this storage: the kernels then read
    and write whole rows per head (about 5% faster than the strided ``(batch, n, heads, d)`` views on CPU)
    and the gradients they return are adopted or added without a strided pass.
    """
    if x.dim() == 4 and x.transpose(1, 2).is_contiguous():
        return x
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def new_heads_major(shape, dtype: torch.dtype, device, zero: bool = False) -> torch.Tensor:
    """A new ``(batch, n, heads, d)`` tensor in heads-major storage, uninitialised unless ``zero``."""
    b, n, h, d = shape
    return (torch.zeros if zero else torch.empty)(b, h, n, d, dtype=dtype, device=device).transpose(1, 2)


def new_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised buffer as the ring keeps one: heads-major if 4-D, row-major otherwise."""
    if len(shape) == 4:
        return new_heads_major(shape, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_result(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, nq, h, _ = q.shape
    out = q.new_zeros(b, nq, h, v.shape[-1])
    lse = torch.full((b, h, nq), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    return out, lse
