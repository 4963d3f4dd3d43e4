"""CUDA backend: torch's fused attention ops, one per task kind and dtype.

Which op serves what (the planner hands this backend FULL tasks, square CAUSAL tasks, since it declares
bottom-right causal alignment, and PARTIAL tiles of at most ``caps.max_dense_tile``):

- **float16 / bfloat16, FULL and CAUSAL**: ``aten._flash_attention_forward`` / ``_flash_attention_backward``
  on our ``(batch, n, heads, d)`` layout as it is, GQA native, ``is_causal`` (bottom-right, equal to ours on
  a square task), the backward taking the rows' final out and lse. Needs ``head_dim == v_head_dim``,
  ``head_dim % 8 == 0``, ``head_dim <= 256`` and an sm80+ device with torch's flash kernels built; other
  shapes go to efficient attention. These op calls run whatever flash implementation torch has active:
  an FA3 (``flash_attn_interface``) or FA4 (``flash_attn.cute``) the caller activated with
  ``torch.nn.attention.activate_flash_attention_impl`` is used as it is. Activation is process-wide (it
  changes every SDPA call of the program too), so ringattn does it only when asked:
  ``RINGATTN_FLASH_IMPL=auto`` (FA3 then FA4 on sm90, FA4 on sm100, whichever is installed), ``FA3`` or
  ``FA4``; the default, ``FA2``, activates nothing.
- **float16 / bfloat16 PARTIAL tiles, and float32 for every kind**: ``aten._efficient_attention_forward``
  / ``_efficient_attention_backward``, with an additive bias built from ``MaskSpec.visible`` (``-inf`` where
  hidden) for PARTIAL tiles and ``custom_mask_type=1`` (top-left causal) for CAUSAL ones. It has no GQA:
  K/V are expanded to the query heads for the call and dK/dV summed back over each group in float32.
- **float64**: the reference backend (no fused CUDA op takes it); ``kernels.select`` does not pick this
  backend for it.

Each kernel's lse convention (empty rows, padding) is converted in ``lse.py``. ``kernels.select`` runs
this backend once per (device, dtype, head dims) on a tiny problem of every task kind against the
reference backend; if FA3/FA4 or FA2 disagree it steps down (to FA2, then to efficient attention only),
and if that still fails it uses the reference backend, with a warning each time.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from .base import Alignment, Capabilities, DenseMaskKernel, empty_result, register, unit_last_stride, zero_grads
from .lse import LseKernel, from_kernel, to_kernel
from .reference import ReferenceBackend

_ref = ReferenceBackend()
HALF = (torch.float16, torch.bfloat16)
FUSED = (torch.float16, torch.bfloat16, torch.float32)
# The efficient kernel checks the bias row stride against its load alignment (at most 8 elements for
# half, 4 for float32); 16 satisfies every variant.
BIAS_ROW_ALIGN = 16

# Per device index: whether flash is used at all (False after a failed self-check), and the FA3/FA4
# impl this module activated (restored on a failed self-check).
_flash_off: set[int] = set()
_activated: dict[int, str] = {}
_tried_activation: set[int] = set()


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else 0


@functools.cache
def _flash_built_for(index: int) -> bool:
    return torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(index) >= (8, 0)


def _flash_hardware(device: torch.device) -> bool:
    """torch's flash kernels exist for this device (sm80+, built in) and its self-check kept them."""
    return device.type == "cuda" and _index(device) not in _flash_off and _flash_built_for(_index(device))


def _current_impl() -> str:
    try:
        from torch.nn.attention import current_flash_attention_impl
    except ImportError:
        return "FA2"
    return current_flash_attention_impl() or "FA2"


def _maybe_activate(device: torch.device) -> None:
    """Activate FA3/FA4 once per device if installed and wanted; any failure leaves torch's FA2."""
    idx = _index(device)
    if idx in _tried_activation or device.type != "cuda":
        return
    _tried_activation.add(idx)
    choice = os.environ.get("RINGATTN_FLASH_IMPL", "FA2").upper()
    if choice == "FA2" or _current_impl() != "FA2":
        return
    try:
        from torch.nn.attention import activate_flash_attention_impl
    except ImportError:
        return
    major = torch.cuda.get_device_capability(device)[0]
    order = {"AUTO": {9: ("FA3", "FA4"), 10: ("FA4",)}.get(major, ()), "FA3": ("FA3",), "FA4": ("FA4",)}
    for impl in order.get(choice, ()):
        try:
            activate_flash_attention_impl(impl)
        except Exception:  # noqa: BLE001 - not installed, or refused by the registry: try the next
            continue
        _activated[idx] = impl
        return


def step_down(device: torch.device) -> str | None:
    """After a failed self-check: drop the activated FA3/FA4, else stop using flash on this device.
    Returns what was dropped, or None when there is nothing left to drop."""
    idx = _index(device)
    if idx in _activated:
        impl = _activated.pop(idx)
        from torch.nn.attention import restore_flash_attention_impl

        restore_flash_attention_impl()
        return impl
    if idx not in _flash_off and device.type == "cuda":
        _flash_off.add(idx)
        return "flash"
    return None


def _lse_kernel() -> LseKernel:
    return LseKernel(_current_impl())


def flash_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    d = q.shape[-1]
    return (q.dtype in HALF and d == v.shape[-1] and d % 8 == 0 and d <= 256
            and (not causal or q.shape[1] == k.shape[1]) and _flash_hardware(q.device))


def _rng_placeholders(device) -> tuple[torch.Tensor, torch.Tensor]:
    # Only read with dropout; shaped as the flash forward returns them.
    return (torch.zeros(2, dtype=torch.uint64, device=device), torch.zeros((), dtype=torch.uint64, device=device))


def _philox_placeholders(device) -> tuple[torch.Tensor, torch.Tensor]:
    # Only read with dropout; shaped as the efficient forward returns them.
    return (torch.zeros((), dtype=torch.int64, device=device), torch.zeros((), dtype=torch.int64, device=device))


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    g = heads // x.shape[2]
    return unit_last_stride(x) if g == 1 else x.repeat_interleave(g, dim=2)


def _fold(dx: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, n, h, d = dx.shape
    if h == kv_heads:
        return dx
    return dx.reshape(b, n, kv_heads, h // kv_heads, d).sum(3, dtype=torch.float32)


def _bias(mask: torch.Tensor | None, dtype: torch.dtype, batch: int, heads: int) -> torch.Tensor | None:
    """The additive ``(batch, heads, nq, nk)`` bias of a boolean mask, broadcast (stride 0) over batch and
    heads, its rows padded in storage to the kernel's alignment."""
    if mask is None:
        return None
    nq, nk = mask.shape
    width = -(-nk // BIAS_ROW_ALIGN) * BIAS_ROW_ALIGN
    bias = torch.zeros(nq, width, dtype=dtype, device=mask.device)[:, :nk]
    bias.masked_fill_(~mask, -math.inf)
    return bias[None, None].expand(batch, heads, nq, nk)


def _flash_forward(q, k, v, scale, causal):
    q, k, v = (unit_last_stride(x) for x in (q, k, v))
    res = torch.ops.aten._flash_attention_forward(q, k, v, None, None, q.shape[1], k.shape[1], 0.0, causal, False,
                                                  scale=scale)
    return res[0], from_kernel(res[1], _lse_kernel(), q.shape[1])


def _flash_backward(dout, q, k, v, out, lse, scale, causal):
    dt = q.dtype
    dout, q, k, v, out = (unit_last_stride(x.to(dt)) for x in (dout, q, k, v, out))
    seed, offset = _rng_placeholders(q.device)
    # cum_seq_q/k undefined (None): a defined tensor, even an empty one, selects the varlen kernel.
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, to_kernel(lse, _lse_kernel()), None, None, q.shape[1], k.shape[1], 0.0, causal,
        seed, offset, scale=scale)
    return dq, dk, dv


def _efficient_forward(q, k, v, scale, causal, mask):
    b, nq, h, _ = q.shape
    res = torch.ops.aten._efficient_attention_forward(
        unit_last_stride(q), _expand(k, h), _expand(v, h), _bias(mask, q.dtype, b, h), None, None, None, None,
        0.0, 1 if causal else 0, True, scale=scale)
    out, lse = res[0], res[1]
    empty = None
    if mask is not None:
        empty = ~mask.any(-1)
        out = out.masked_fill(empty[None, :, None, None], 0)
    return out, from_kernel(lse, LseKernel.EFFICIENT, nq, empty_rows=empty)


def _efficient_backward(dout, q, k, v, out, lse, scale, causal, mask):
    b, nq, h, _ = q.shape
    kvh, dt = k.shape[2], q.dtype
    # The kernel reads out with a row stride of heads * v_head_dim whatever its strides (o_strideM is
    # not taken from the tensor), and copies a non-contiguous dout: hand both over contiguous.
    # (``to`` returns a same-dtype tensor as it is, whatever memory_format says.)
    out, dout = (x.to(dt, memory_format=torch.contiguous_format).contiguous() for x in (out, dout))
    seed, offset = _philox_placeholders(q.device)
    dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
        dout, unit_last_stride(q), _expand(k, h), _expand(v, h), _bias(mask, dt, b, h), out, None, None, nq,
        k.shape[1], to_kernel(lse, LseKernel.EFFICIENT), 0.0, seed, offset, 1 if causal else 0, False,
        scale=scale)
    return dq, _fold(dk, kvh), _fold(dv, kvh)


class CudaFlashBackend(DenseMaskKernel):
    """See the module docstring for which op serves which task."""

    name = "cuda-flash"
    # Bottom-right: the flash kernels' causal; the planner then sends only square causal tasks, where
    # efficient attention's top-left causal is the same triangle.
    caps = Capabilities(causal_alignment=Alignment.BOTTOM_RIGHT)
    priority = 10
    self_check = True

    def supports(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        return q.device.type == "cuda" and q.dtype in FUSED

    def step_down(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """After a failed self-check: what half precision gives up next (FA3/FA4, then flash)."""
        return step_down(device) if dtype in HALF else None

    def kernel_for(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   mask: torch.Tensor | None, scale: float = 1.0) -> str:
        """``"flash"``, ``"efficient"`` or ``"reference"``: the op a call with these arguments runs."""
        # A scale <= 0 is left to the reference: fused kernels may mask before scaling (nan on CPU's op).
        if q.dtype not in FUSED or scale <= 0:
            return "reference"
        if mask is None and flash_ok(q, k, v, causal):
            return "flash"
        return "efficient"

    def forward_dense(self, q, k, v, *, scale, causal, mask):
        if q.shape[1] == 0 or k.shape[1] == 0:
            return empty_result(q, v)
        kernel = self.kernel_for(q, k, v, causal, mask, scale)
        if kernel == "flash":
            _maybe_activate(q.device)
            return _flash_forward(q, k, v, scale, causal)
        if kernel == "efficient":
            return _efficient_forward(q, k, v, scale, causal, mask)
        return _ref.forward_dense(q, k, v, scale=scale, causal=causal, mask=mask)

    def backward_dense(self, dout, q, k, v, out, lse, *, scale, causal, mask):
        if q.shape[1] == 0 or k.shape[1] == 0:
            return zero_grads(q, k, v)
        kernel = self.kernel_for(q, k, v, causal, mask, scale)
        if kernel == "flash":
            _maybe_activate(q.device)
            return _flash_backward(dout, q, k, v, out, lse, scale, causal)
        if kernel == "efficient":
            return _efficient_backward(dout, q, k, v, out, lse, scale, causal, mask)
        return _ref.backward_dense(dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask)


register(CudaFlashBackend())
