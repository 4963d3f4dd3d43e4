"""CUDA backend: torch's fused flash-attention op (half precision, no mask) with the reference
backend for everything it cannot take (float32/64, masked tiles, v_head_dim != head_dim).

Not yet run on a GPU by our CI: ``kernels.select`` checks it once per (device, dtype) against the
reference backend on a small problem and falls back to the reference backend, with a warning, if it
raises or disagrees. GQA here repeats K/V heads for the kernel call (the torch op needs equal heads)
and sums the head groups of dK/dV back.
"""

from __future__ import annotations

import torch

from .base import empty_result, unit_last_stride
from .reference import ReferenceBackend

_ref = ReferenceBackend()


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    g = heads // x.shape[2]
    return unit_last_stride(x) if g == 1 else x.repeat_interleave(g, dim=2)


def _fold(dx: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, n, h, d = dx.shape
    return dx if h == kv_heads else dx.view(b, n, kv_heads, h // kv_heads, d).sum(3)


class CudaFlashBackend:
    name = "cuda-flash"

    def supports(self, q, k, v) -> bool:
        return (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
                and q.shape[-1] == v.shape[-1] and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)

    def _fused_ok(self, q, k, causal, mask, scale) -> bool:
        # The kernel's causal diagonal is bottom-right aligned; ours is top-left: equal only if square.
        # A scale <= 0 is left to the reference: fused kernels may mask before scaling (nan on CPU).
        return mask is None and (not causal or q.shape[1] == k.shape[1]) and scale > 0

    def forward(self, q, k, v, *, scale, causal, mask):
        if q.shape[1] == 0 or k.shape[1] == 0:
            return empty_result(q, v)
        if not self._fused_ok(q, k, causal, mask, scale):
            return _ref.forward(q, k, v, scale=scale, causal=causal, mask=mask)
        h = q.shape[2]
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            unit_last_stride(q).transpose(1, 2), _expand(k, h).transpose(1, 2), _expand(v, h).transpose(1, 2),
            0.0, causal, False, scale=scale)
        return res[0].transpose(1, 2), res[1].float()

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, mask):
        if q.shape[1] == 0 or k.shape[1] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if not self._fused_ok(q, k, causal, mask, scale):
            return _ref.backward(dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask)
        h, kvh = q.shape[2], k.shape[2]
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).contiguous()
        # cum_seq_q/k must be undefined (None), as the dense forward returns them: a defined tensor, even
        # an empty one, sends the op down its varlen path. The RNG state is unused without dropout.
        empty = torch.empty(0, dtype=torch.long, device=q.device)
        dt = q.dtype
        dout, q, out = (unit_last_stride(x.to(dt)) for x in (dout, q, out))
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout.transpose(1, 2), q.transpose(1, 2), _expand(k, h).transpose(1, 2),
            _expand(v, h).transpose(1, 2), out.transpose(1, 2), lse, None, None,
            q.shape[1], k.shape[1], 0.0, causal, empty, empty, scale=scale)
        return dq.transpose(1, 2), _fold(dk.transpose(1, 2), kvh), _fold(dv.transpose(1, 2), kvh)
