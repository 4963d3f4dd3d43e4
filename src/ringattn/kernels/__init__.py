"""Per-block attention backends, chosen by device and dtype.

``select(q, k, v)`` returns the fastest backend that supports the tensors: torch's fused CPU flash op
on CPU, torch's fused CUDA ops on CUDA for float16/bfloat16/float32 (once it passed its self-check on
that device, dtype and head dims), and the pure-torch tiled reference otherwise (float64 on CUDA).
``RINGATTN_BACKEND=reference|cpu-flash|cuda-flash`` forces one (for debugging and tests).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import warnings

import torch

from ..masks import Kind, MaskSpec, Segment, Task
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
from .cuda import HALF, CudaFlashBackend, step_down, warn_step_down
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
        if b.supports(q, k, v) and (q.device.type == "cpu" or _self_check(
                name, str(q.device), q.dtype, q.shape[-1], v.shape[-1])):
            return b
    return BACKENDS["reference"]


def _check_problem(device: str, dtype: torch.dtype, d: int, dv: int):
    """A tiny problem with a task of every kind: full (non-square), causal (square), and a partial
    window band with holes and rows that see nothing; GQA 4/2."""
    g = torch.Generator(device=device).manual_seed(0)
    nq, nk = 40, 56

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float32, generator=g).to(dtype)

    q, k, v, do = rand(1, nq, 4, d), rand(1, nk, 2, d), rand(1, nk, 2, dv), rand(1, nq, 4, dv)
    spec = MaskSpec(seq_len=1 << 20, window=(4, 4))
    tasks = [(Task(0, nq, 0, nk, Kind.FULL), nk), (Task(0, nq, 0, nq, Kind.CAUSAL), nq),
             (Task(0, nq, 0, nk, Kind.PARTIAL, qseg=Segment(0, nq), kseg=Segment(20, nk)), nk)]
    return q, k, v, do, spec, tasks


def _disagreement(b: Backend, device: str, dtype: torch.dtype, d: int, dv: int) -> str | None:
    """Where ``b`` disagrees with the reference backend on the check problem (None: nowhere)."""
    ref = BACKENDS["reference"]
    q, k, v, do, spec, tasks = _check_problem(device, dtype, d, dv)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2}.get(dtype, 3e-2)
    for task, n in tasks:
        kk, vv = k[:, :n], v[:, :n]
        o, l_ = b.forward(q, kk, vv, task, spec, scale=0.125)
        ro, rl = ref.forward(q, kk, vv, task, spec, scale=0.125)
        grads = b.backward(do, q, kk, vv, ro, rl, task, spec, scale=0.125)
        rgrads = ref.backward(do, q, kk, vv, ro, rl, task, spec, scale=0.125)
        if not torch.equal(torch.isneginf(l_), torch.isneginf(rl)):
            return f"{task.kind.name}: empty rows differ"
        for what, x, y in (("out", o, ro), ("lse", l_, rl), *zip(("dq", "dk", "dv"), grads, rgrads)):
            x, y = x.float(), y.float()
            fin = torch.isfinite(y)
            if x.shape != y.shape or not torch.isfinite(x[fin]).all():
                return f"{task.kind.name} {what}: wrong shape or not finite"
            err = float((x[fin] - y[fin]).abs().max() / y[fin].abs().max().clamp_min(1e-6))
            if not err <= tol:
                return f"{task.kind.name} {what}: error {err:.2e} relative to the largest value"
    return None


@functools.cache
def _self_check(name: str, device: str, dtype: torch.dtype, d: int = 64, dv: int = 64) -> bool:
    """Run a backend our CI cannot run once against the reference, on every task kind; fall back on any
    disagreement: the CUDA backend first steps down (FA3/FA4 to FA2, then flash off) and checks again."""
    b, dev = BACKENDS[name], torch.device(device)
    while True:
        try:
            reason = _disagreement(b, device, dtype, d, dv)
        except Exception as e:  # noqa: BLE001 - any failure means: do not use it as it is
            reason = f"{type(e).__name__}: {e}"
        if reason is None:
            return True
        dropped = step_down(dev) if name == "cuda-flash" and dtype in HALF else None
        if dropped is None:
            break
        warn_step_down(dev, dropped, reason)
    warnings.warn(f"ringattn: backend {name} failed its self-check on {device}/{dtype} ({reason}); "
                  "using the reference backend", stacklevel=3)
    return False


def retiled(backend: Backend, **sizes: int | None) -> Backend:
    """``backend`` with other planning sizes (``max_dense_tile``, ``backward_tile``, ``min_document_piece``;
    None keeps its own): a shallow copy, for tuning and for tests on small inputs."""
    b = copy.copy(backend)
    b.caps = dataclasses.replace(backend.caps, **{k: v for k, v in sizes.items() if v is not None})
    return b
