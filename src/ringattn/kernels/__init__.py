"""Per-block attention backends, chosen by device and dtype.

``select(q, k, v)`` returns the fastest backend that supports the tensors: torch's fused CPU flash op
on CPU, torch's fused flash op on CUDA (half precision), and the pure-torch tiled reference otherwise.
``RINGATTN_BACKEND=reference|cpu-flash|cuda-flash`` forces one (for debugging and tests).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import warnings

import torch

from .base import (
    Alignment,
    Backend,
    Capabilities,
    DenseMaskKernel,
    acc_dtype,
    empty_result,
    heads_major,
    new_heads_major,
)
from .cpu import CpuFlashBackend
from .cuda import CudaFlashBackend
from .reference import ReferenceBackend

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (CpuFlashBackend(), CudaFlashBackend(), ReferenceBackend())
}

__all__ = ["BACKENDS", "Alignment", "Backend", "Capabilities", "DenseMaskKernel", "acc_dtype", "empty_result",
           "heads_major", "new_heads_major", "retiled", "select"]


def select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Backend:
    forced = os.environ.get("RINGATTN_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"RINGATTN_BACKEND must be one of {sorted(BACKENDS)}, got {forced!r}")
        return BACKENDS[forced]
    for name in ("cpu-flash", "cuda-flash"):
        b = BACKENDS[name]
        if b.supports(q, k, v) and (q.device.type == "cpu" or _self_check(name, str(q.device), q.dtype)):
            return b
    return BACKENDS["reference"]


@functools.cache
def _self_check(name: str, device: str, dtype: torch.dtype) -> bool:
    """Run an untested-in-CI backend once against the reference; fall back on any disagreement."""
    b, ref = BACKENDS[name], BACKENDS["reference"]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 96, 4, 64, device=device, dtype=dtype, generator=g) for _ in range(3))
    do = torch.randn(1, 96, 4, 64, device=device, dtype=dtype, generator=g)
    try:
        for causal in (False, True):
            o, l_ = b.forward_dense(q, k, v, scale=0.125, causal=causal, mask=None)
            ro, rl = ref.forward_dense(q, k, v, scale=0.125, causal=causal, mask=None)
            grads = b.backward_dense(do, q, k, v, ro, rl, scale=0.125, causal=causal, mask=None)
            rgrads = ref.backward_dense(do, q, k, v, ro, rl, scale=0.125, causal=causal, mask=None)
            pairs = [(o, ro), (l_, rl), *zip(grads, rgrads)]
            for x, y in pairs:
                if not torch.allclose(x.float(), y.float(), atol=2e-2, rtol=2e-2):
                    raise AssertionError("mismatch against the reference backend")
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        warnings.warn(f"ringattn: backend {name} failed its self-check on {device}/{dtype} ({e}); "
                      "using the reference backend", stacklevel=3)
        return False
    return True


def retiled(backend: Backend, **sizes: int | None) -> Backend:
    """``backend`` with other planning sizes (``max_dense_tile``, ``backward_tile``, ``min_document_piece``;
    None keeps its own): a shallow copy, for tuning and for tests on small inputs."""
    b = copy.copy(backend)
    b.caps = dataclasses.replace(backend.caps, **{k: v for k, v in sizes.items() if v is not None})
    return b
