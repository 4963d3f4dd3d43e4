"""Stand-ins for the four CUDA attention ops the cuda-flash backend calls, for running it on CPU.

Each computes with the reference kernel but takes and returns exactly what the real op does, and asserts
what the real op requires, so the backend's lowering, lse conventions, GQA fold and bias building are
checked on CPU:

- flash (``aten._flash_attention_forward/_backward``, FA2): dense BSHD (``cum_seq_q/k`` undefined),
  GQA native, float16/bfloat16, ``head_dim == v_head_dim``, ``% 8``, ``<= 256``, causal bottom-right
  (asserted square, where it is also ours), unit last strides; lse ``(b, h, nq)`` float32 with ``+inf``
  for an empty row, and the backward must get a contiguous float32 lse with no ``-inf``.
- efficient (``aten._efficient_attention_forward/_backward``): BMHK with equal heads (no GQA), an optional
  4-D bias of q's dtype, unit last stride and a row stride aligned to 8; ``custom_mask_type`` 0 or 1 (top-
  left causal); lse ``(b, h, ceil(nq / 32) * 32)`` with ``0`` for an empty row (whose out is garbage
  here: NaN, so the backend must zero it itself) and ``+inf`` padding; the backward must get that padded
  shape with ``strideH % 8 == 0`` and no ``-inf``, and a contiguous out (the kernel assumes its row stride).
"""

from __future__ import annotations

import collections
import math

import pytest
import torch

from ringattn.kernels import BACKENDS
from ringattn.kernels import cuda as cuda_mod

HALF = (torch.float16, torch.bfloat16)
_ref = BACKENDS["reference"]


def check_against_schema(schema: torch.FunctionSchema, args: tuple, kwargs: dict) -> None:
    """The arguments bind to the real op's schema: count, keyword names, and each value's type."""
    op_name = schema.name
    positional = [a for a in schema.arguments if not a.kwarg_only]
    keywords = {a.name: a for a in schema.arguments if a.kwarg_only}
    assert len(args) <= len(positional), f"{op_name}: {len(args)} positional arguments"
    assert sum(not a.has_default_value() for a in positional) <= len(args), f"{op_name}: missing arguments"
    assert set(kwargs) <= set(keywords), f"{op_name}: unknown keywords {set(kwargs) - set(keywords)}"
    for a, x in [*zip(positional, args), *((keywords[n], x) for n, x in kwargs.items())]:
        t = str(a.type)
        optional = t.startswith("Optional[")
        base = t[len("Optional["):-1] if optional else t
        if x is None:
            # A plain Tensor may be None: it binds as an undefined tensor (the dense flash backward's
            # cum_seq_q/k must be exactly that).
            assert optional or base == "Tensor", f"{op_name}: {a.name} ({t}) got None"
            continue
        want = {"Tensor": torch.Tensor, "SymInt": int, "int": int, "float": (float, int), "bool": bool}[base]
        assert isinstance(x, want) and (base == "bool" or not isinstance(x, bool)), \
            f"{op_name}: {a.name} ({t}) got {type(x).__name__}"


def _schema_checked(schema: torch.FunctionSchema, fake):
    def call(*args, **kwargs):
        check_against_schema(schema, args, kwargs)
        return fake(*args, **kwargs)

    return call


def _pad32(n: int) -> int:
    return -(-n // 32) * 32


class FakeCudaOps:
    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeCudaOps:
        for name in ("_flash_attention_forward", "_flash_attention_backward", "_efficient_attention_forward",
                     "_efficient_attention_backward"):
            schema = getattr(torch.ops.aten, name).default._schema
            monkeypatch.setattr(torch.ops.aten, name, _schema_checked(schema, getattr(self, name)))
        # Pretend the CPU is a device with flash kernels, which ring_attention may pick the backend for.
        monkeypatch.setattr(cuda_mod, "_flash_hardware", lambda device: True)
        monkeypatch.setattr(cuda_mod.CudaFlashBackend, "supports", lambda self, q, k, v: q.dtype in cuda_mod.FUSED)
        return self

    # --- flash ---------------------------------------------------------------------------------------

    @staticmethod
    def _check_flash_inputs(q, k, v, cum_seq_q, cum_seq_k, dropout_p, is_causal):
        assert cum_seq_q is None and cum_seq_k is None, "a defined cum_seq selects the varlen kernel"
        assert dropout_p == 0.0
        assert q.dim() == k.dim() == v.dim() == 4
        assert q.dtype in HALF and k.dtype == v.dtype == q.dtype
        for x in (q, k, v):
            assert x.stride(-1) == 1, "flash needs a unit last stride"
        d = q.shape[-1]
        assert k.shape[-1] == v.shape[-1] == d and d % 8 == 0 and d <= 256
        assert k.shape[2] == v.shape[2] and q.shape[2] % k.shape[2] == 0
        # The kernel's causal is bottom-right: only a square task means ours.
        assert not is_causal or q.shape[1] == k.shape[1], "non-square causal sent to flash"

    def _flash_attention_forward(self, q, k, v, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                                 return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
                                 seqused_k=None, alibi_slopes=None, block_table=None, num_splits=None):
        self.calls["flash_fwd"] += 1
        self._check_flash_inputs(q, k, v, cum_seq_q, cum_seq_k, dropout_p, is_causal)
        assert not return_debug_mask and window_size_left is None and window_size_right is None
        assert (max_q, max_k) == (q.shape[1], k.shape[1])
        out, lse = _ref.forward_dense(q, k, v, scale=scale, causal=is_causal, mask=None)
        lse = lse.float().masked_fill(torch.isneginf(lse), math.inf)  # FA2's empty row
        rng = torch.zeros(2, dtype=torch.uint64)
        return out, lse, rng, torch.zeros((), dtype=torch.uint64), torch.empty(0, dtype=q.dtype)

    def _flash_attention_backward(self, dout, q, k, v, out, lse, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                                  is_causal, rng_state, unused, *, scale=None, window_size_left=None,
                                  window_size_right=None):
        self.calls["flash_bwd"] += 1
        self._check_flash_inputs(q, k, v, cum_seq_q, cum_seq_k, dropout_p, is_causal)
        b, nq, h, _ = q.shape
        assert dout.dtype == out.dtype == q.dtype and dout.shape == out.shape == q.shape
        assert dout.stride(-1) == 1 and out.stride(-1) == 1
        assert lse.dtype == torch.float32 and lse.shape == (b, h, nq) and lse.is_contiguous()
        assert not torch.isneginf(lse).any(), "the backward takes +inf for empty rows"
        assert isinstance(rng_state, torch.Tensor) and isinstance(unused, torch.Tensor)
        dq, dk, dv = _ref.backward_dense(dout, q, k, v, out, lse, scale=scale, causal=is_causal, mask=None)
        return dq, dk, dv

    # --- efficient -----------------------------------------------------------------------------------

    @staticmethod
    def _check_efficient_inputs(q, k, v, bias, cu_q, cu_k, dropout_p, custom_mask_type):
        assert cu_q is None and cu_k is None and dropout_p == 0.0
        assert q.dim() == k.dim() == v.dim() == 4
        assert q.shape[2] == k.shape[2] == v.shape[2], "efficient attention has no GQA"
        assert q.shape[-1] == k.shape[-1] and k.shape[1] == v.shape[1]
        assert q.dtype in (*HALF, torch.float32) and k.dtype == v.dtype == q.dtype
        for x in (q, k, v):
            assert x.stride(-1) == 1
        assert custom_mask_type in (0, 1)
        if bias is None:
            return None
        b, nq, h, _ = q.shape
        assert bias.dtype == q.dtype and bias.shape == (b, h, nq, k.shape[1])
        assert bias.stride(-1) == 1 and bias.stride(2) % 8 == 0, "bias rows must be aligned"
        assert bias.stride(0) % 8 == 0 and bias.stride(1) % 8 == 0
        vals = bias.float()
        assert ((vals == 0) | torch.isneginf(vals)).all()
        assert torch.equal(vals, vals[:1, :1].expand_as(vals))
        return vals[0, 0] == 0

    def _efficient_attention_forward(self, q, k, v, bias, cu_q, cu_k, max_q, max_k, dropout_p, custom_mask_type,
                                     compute_log_sumexp=False, *, scale=None, seqlen_k=None, window_size=None):
        self.calls["efficient_fwd"] += 1
        mask = self._check_efficient_inputs(q, k, v, bias, cu_q, cu_k, dropout_p, custom_mask_type)
        assert compute_log_sumexp and seqlen_k is None and window_size is None
        out, lse = _ref.forward_dense(q, k, v, scale=scale, causal=custom_mask_type == 1, mask=mask)
        empty = torch.isneginf(lse)
        out = out.masked_fill(empty.transpose(1, 2)[..., None], math.nan)
        b, h, nq = lse.shape
        padded = torch.full((b, h, _pad32(nq)), math.inf)
        padded[..., :nq] = lse.float().masked_fill(empty, 0.0)
        seed, offset = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
        return out.contiguous(), padded, seed, offset, nq, k.shape[1]

    def _efficient_attention_backward(self, dout, q, k, v, bias, out, cu_q, cu_k, max_q, max_k, lse, dropout_p,
                                      philox_seed, philox_offset, custom_mask_type, bias_requires_grad, *,
                                      scale=None, num_splits_key=None, window_size=None,
                                      shared_storage_dqdkdv=False):
        self.calls["efficient_bwd"] += 1
        mask = self._check_efficient_inputs(q, k, v, bias, cu_q, cu_k, dropout_p, custom_mask_type)
        b, nq, h, _ = q.shape
        assert (max_q, max_k) == (nq, k.shape[1]) and not bias_requires_grad
        assert dout.dtype == out.dtype == q.dtype
        assert out.is_contiguous(), "the kernel assumes out's row stride is heads * v_head_dim"
        assert lse.dtype == torch.float32 and lse.shape == (b, h, _pad32(nq)) and lse.stride(1) % 8 == 0
        assert lse.stride(-1) == 1 and not torch.isneginf(lse).any()
        dq, dk, dv = _ref.backward_dense(dout, q, k, v, out, lse[..., :nq], scale=scale,
                                         causal=custom_mask_type == 1, mask=mask)
        return dq, dk, dv, torch.empty(0)
