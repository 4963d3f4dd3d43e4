"""Per-block attention backends, chosen by device and dtype.

``select(q, k, v)`` returns the registered backend of highest ``priority`` that supports the tensors (and,
for one that declares ``self_check``, passed its check against the reference on that device, dtype and head
dims): torch's fused CPU flash op on CPU, torch's fused CUDA ops on CUDA for float16/bfloat16/float32, and
the pure-torch tiled reference otherwise (float64 on CUDA). ``RINGATTN_BACKEND=<name>`` forces one (for
debugging and tests). A new backend is one module in this package: its class, and a ``register`` call at its end.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import os
import pkgutil
import warnings

import torch

from ..masks import Band, Kind, MaskSpec, Segment, Task
from ..scores import ALIBI, ScoreMod
from .base import (
    BACKENDS,
    Alignment,
    Backend,
    Capabilities,
    DenseMaskKernel,
    acc_dtype,
    check_backend,
    empty_result,
    heads_major,
    new_heads_major,
)
from .block import backward_each, forward_each

# Every module of this package that defines a backend registers it at import (``base.register``): a new
# backend is one file here, and nothing else names it.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f".{_module.name}", __name__)


def register(backend: Backend) -> Backend:
    """Make ``backend`` selectable and nameable after import (a backend defined outside this package, or a
    test's), with ``base.register``'s checks, into the registry ``select`` reads (this module's
    ``BACKENDS``, which tests may swap for a copy)."""
    check_backend(backend)
    BACKENDS[backend.name] = backend
    return backend

__all__ = ["BACKENDS", "Alignment", "Backend", "Capabilities", "DenseMaskKernel", "acc_dtype", "empty_result",
           "heads_major", "new_heads_major", "register", "retiled", "select"]


def select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Backend:
    forced = os.environ.get("RINGATTN_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"RINGATTN_BACKEND must be one of {sorted(BACKENDS)}, got {forced!r}")
        return BACKENDS[forced]
    # Highest priority first; the name breaks ties, so every rank picks alike.
    for b in sorted(BACKENDS.values(), key=lambda b: (-b.priority, b.name)):
        if b.supports(q, k, v) and (not b.self_check or _self_check(
                b.name, str(q.device), q.dtype, q.shape[-1], v.shape[-1])):
            return b
    raise ValueError(f"no registered backend supports {q.dtype} tensors on {q.device.type} "
                     f"(registered: {sorted(BACKENDS)})")


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
    """Where ``b`` disagrees with the reference backend on the check problem (None: nowhere), including
    the seam's paths it declares: a BAND task, ALiBi on a FULL task, all tasks in one call."""
    ref = BACKENDS["reference"]
    q, k, v, do, spec, tasks = _check_problem(device, dtype, d, dv)
    nq, nk = q.shape[1], k.shape[1]
    if Kind.BAND in b.caps.native:  # the PARTIAL task's band, cut into runs
        tasks.append((Task(0, nq, 0, nk, Kind.BAND, band=Band(-20, (4, 4), (0, 30, 30, nq), (0, 12, 20, nk))), nk))
    tol = {torch.float32: 1e-4, torch.float16: 1e-2}.get(dtype, 3e-2)
    calls = []
    for task, n in tasks:
        kk, vv = k[:, :n], v[:, :n]
        calls.append((task.kind.name, lambda x, t=task, kk=kk, vv=vv, s=None: _one_task(x, q, kk, vv, do, t, spec, s)))
    if ALIBI in b.caps.native_score_mods:
        slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device, dtype=torch.float64)
        full = Task(0, nq, 0, nk, Kind.FULL, qseg=Segment(100, nq), kseg=Segment(60, nk))
        calls.append(("ALiBi FULL", lambda x: _one_task(x, q, k, v, do, full, spec, ScoreMod(alibi_slopes=slopes))))
    if b.caps.takes_task_lists:
        listed = tuple(t for t, _ in tasks)
        calls.append(("task list", lambda x: _task_list(x, q, k, v, do, listed, spec)))
    for label, run in calls:
        (o, l_, grads), (ro, rl, rgrads) = run(b), run(ref)
        if not torch.equal(torch.isneginf(l_), torch.isneginf(rl)):
            return f"{label}: empty rows differ"
        for what, x, y in (("out", o, ro), ("lse", l_, rl), *zip(("dq", "dk", "dv"), grads, rgrads)):
            x, y = x.float(), y.float()
            fin = torch.isfinite(y)
            if x.shape != y.shape or not torch.isfinite(x[fin]).all():
                return f"{label} {what}: wrong shape or not finite"
            err = float((x[fin] - y[fin]).abs().max() / y[fin].abs().max().clamp_min(1e-6))
            if not err <= tol:
                return f"{label} {what}: error {err:.2e} relative to the largest value"
    return None


def _one_task(b: Backend, q, k, v, do, task: Task, spec: MaskSpec, scores: ScoreMod | None):
    """One task's forward, then its backward from the reference's own (out, lse), on ``b``."""
    extra = {} if scores is None else {"scores": scores}
    ro, rl = BACKENDS["reference"].forward(q, k, v, task, spec, scale=0.125, **extra)
    o, l_ = b.forward(q, k, v, task, spec, scale=0.125, **extra)
    return o, l_, b.backward(do, q, k, v, ro, rl, task, spec, scale=0.125, **extra)


def _task_list(b: Backend, q, k, v, do, tasks: tuple[Task, ...], spec: MaskSpec):
    """All tasks in one call (``forward_tasks``; the reference: one by one), then the backward from the
    reference's merged (out, lse)."""
    ro, rl = forward_each(BACKENDS["reference"], q, k, v, tasks, spec, scale=0.125)
    if b is BACKENDS["reference"]:
        return ro, rl, backward_each(b, do, q, k, v, ro, rl, tasks, spec, scale=0.125)
    o, l_ = b.forward_tasks(q, k, v, tasks, spec, scale=0.125)
    return o, l_, b.backward_tasks(do, q, k, v, ro, rl, tasks, spec, scale=0.125)


@functools.cache
def _self_check(name: str, device: str, dtype: torch.dtype, d: int = 64, dv: int = 64) -> bool:
    """Run a backend our CI cannot run once against the reference, on every task kind; fall back on any
    disagreement: a backend with ``step_down`` first gives something up (the CUDA backend: FA3/FA4 to FA2,
    then flash) and is checked again."""
    b, dev = BACKENDS[name], torch.device(device)
    while True:
        try:
            reason = _disagreement(b, device, dtype, d, dv)
        except Exception as e:  # noqa: BLE001 - any failure means: do not use it as it is
            reason = f"{type(e).__name__}: {e}"
        if reason is None:
            return True
        dropped = b.step_down(dev, dtype) if hasattr(b, "step_down") else None
        if dropped is None:
            break
        warnings.warn(f"ringattn: {name} failed its self-check on {dev} ({reason}); no longer using {dropped} there",
                      stacklevel=3)
    warnings.warn(f"ringattn: backend {name} failed its self-check on {device}/{dtype} ({reason}); "
                  "using the reference backend", stacklevel=3)
    return False


def retiled(backend: Backend, **sizes: int | None) -> Backend:
    """``backend`` with other planning sizes (``max_dense_tile``, ``backward_tile``, ``min_document_piece``;
    None keeps its own): a shallow copy, for tuning and for tests on small inputs."""
    b = copy.copy(backend)
    b.caps = dataclasses.replace(backend.caps, **{k: v for k, v in sizes.items() if v is not None})
    return b
