"""CPU backend: torch's fused flash-attention op, which returns the logsumexp we need to merge blocks.

``aten._scaled_dot_product_flash_attention_for_cpu`` takes ``(b, h, s, d)`` (strided views of our
``(b, s, h, d)`` tensors are fine, but the last dim must have unit stride: the op silently reads wrong
elements otherwise), handles GQA natively by head broadcasting, and accepts an additive mask. What it does
not do, and this module covers: a value head dim different from the key head dim (zero-padded here, which
changes no score), empty inputs (it crashes), fully masked rows (it returns lse = 0 for them; we need
-inf), and an exact half-precision backward (run in float32 here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..scores import ALIBI
from .base import Capabilities, DenseMaskKernel, acc_dtype, empty_result, register, unit_last_stride, zero_grads
from .lse import LseKernel, from_kernel, to_kernel
from .reference import ReferenceBackend

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
# The op masks causal scores before scaling them: a scale <= 0 turns the masked -inf into nan (or +inf).
_ref = ReferenceBackend()


def _bias(mask: torch.Tensor | None, dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """The op's additive mask: ``bias`` (ALiBi's ``(heads, 1, nk)``, or none) with -inf where ``mask`` hides."""
    if mask is None:
        return None if bias is None else bias.to(dtype).unsqueeze(0)
    if bias is None:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias.to(dtype).expand(-1, mask.shape[0], -1).masked_fill(~mask, float("-inf")).unsqueeze(0)


def _pad_to(x: torch.Tensor, d: int) -> torch.Tensor:
    return unit_last_stride(x) if x.shape[-1] == d else F.pad(x, (0, d - x.shape[-1]))


class CpuFlashBackend(DenseMaskKernel):
    name = "cpu-flash"
    caps = Capabilities(score_mods=frozenset({ALIBI}), causal_key_block=512)  # the op's key split (KERNELS.md)
    priority = 10

    def supports(self, q, k, v) -> bool:
        return q.device.type == "cpu" and q.dtype in (torch.float64, torch.float32, torch.float16,
                                                       torch.bfloat16)

    def forward_dense(self, q, k, v, *, scale, causal, mask, bias=None):
        if q.shape[1] == 0 or k.shape[1] == 0:
            return empty_result(q, v)
        if scale <= 0:
            return _ref.forward_dense(q, k, v, scale=scale, causal=causal, mask=mask, bias=bias)
        if bias is not None and q.dtype in (torch.float16, torch.bfloat16):
            # A bias rounded to half precision would move scores by up to a unit in its last place.
            out, lse = self.forward_dense(q.float(), k.float(), v.float(), scale=scale, causal=causal,
                                          mask=mask, bias=bias)
            return out, lse
        d, dv = q.shape[-1], v.shape[-1]
        width = max(d, dv)
        qt, kt, vt = (_pad_to(x, width).transpose(1, 2) for x in (q, k, v))
        out, lse = _fwd(qt, kt, vt, 0.0, causal, attn_mask=_bias(mask, q.dtype, bias), scale=scale)
        out = out.transpose(1, 2)[..., :dv]
        empty = None if mask is None else ~mask.any(-1)
        return out, from_kernel(lse, LseKernel.CPU, q.shape[1], empty_rows=empty, dtype=acc_dtype(q.dtype))

    def backward_dense(self, dout, q, k, v, out, lse, *, scale, causal, mask, bias=None):
        if q.shape[1] == 0 or k.shape[1] == 0:
            return zero_grads(q, k, v)
        if scale <= 0:
            return _ref.backward_dense(dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask, bias=bias)
        d, dv = q.shape[-1], v.shape[-1]
        width = max(d, dv)
        if q.dtype in (torch.float16, torch.bfloat16):
            # In half precision the op rounds every block's dQ/dK/dV to the input dtype and adds a GQA
            # group's dK/dV head by head in it (2-3x the error of dense SDPA for dK/dV); it is also up to
            # 10x slower than in float32 on CPUs without native bf16. Float32 inputs (tile-sized copies)
            # give float32 gradients, which the ring accumulates as they are.
            q, k, v, out, dout = (x.float() for x in (q, k, v, out, dout))
        qt, kt, vt, ot, dot = (_pad_to(x, width).transpose(1, 2) for x in (q, k, v, out.to(q.dtype),
                                                                            dout.to(q.dtype)))
        lse = to_kernel(lse, LseKernel.CPU, dtype=acc_dtype(q.dtype))
        dq, dk, dvv = _bwd(dot, qt, kt, vt, ot, lse, 0.0, causal,
                           attn_mask=_bias(mask, q.dtype, bias), scale=scale)
        return (dq.transpose(1, 2)[..., :d], dk.transpose(1, 2)[..., :d], dvv.transpose(1, 2)[..., :dv])


register(CpuFlashBackend())
