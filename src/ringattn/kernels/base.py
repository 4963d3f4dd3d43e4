"""The contract every per-block attention backend implements.

Tensors use the flash-attn layout: ``q`` ``(batch, nq, heads, d)``, ``k`` ``(batch, nk, kv_heads, d)``,
``v`` ``(batch, nk, kv_heads, dv)``; query head ``i`` reads key/value head ``i // (heads // kv_heads)``.

A backend receives one planned :class:`~ringattn.masks.Task` at a time together with the call's
:class:`~ringattn.masks.MaskSpec`, with ``q`` cut to the task's query rows and ``k``/``v`` to its keys:

- ``FULL``: every pair visible.
- ``CAUSAL``: row ``i`` of the task sees key ``j <= i`` (top-left), or ``j <= i + nk - nq``
  (bottom-right); the planner only hands a backend tasks in its own ``causal_alignment``, and a
  bottom-right backend only square ones, where both agree.
- ``BAND``: only to a backend with ``BAND`` in ``caps.native``: a window band cut into runs (documents,
  chunks), described by ``task.band`` (:class:`~ringattn.masks.Band`: FlashAttention's ``window_size`` and
  varlen ``cu_seqlens``). The others get such pairs as PARTIAL tiles or per-document FULL/CAUSAL pieces.
- ``PARTIAL``: anything else; visibility is ``mask.visible`` on the task's positions ``qseg``/``kseg``.
  Only a backend with ``PARTIAL`` in ``caps.native`` receives a whole pair; the others get tiles of at
  most ``caps.max_dense_tile`` and may build a dense mask of that size (:class:`DenseMaskKernel`).

``forward`` returns ``(out, lse)``: ``out`` ``(batch, nq, heads, dv)`` in any floating dtype (the strategies
accumulate it in ``acc_dtype``), ``lse`` ``(batch, heads, nq)`` in ``acc_dtype``, natural log; rows that see
no key come back with ``out = 0`` and ``lse = -inf`` whatever the kernel's own convention (each backend
converts it in one place). ``backward`` takes the *final* out and lse of the whole rows (not this block's)
and returns this block pair's share of ``(dq, dk, dv)`` (FlashAttention-2: D = rowsum(dO * O),
P = exp(S * scale - lse)); ``lse`` may hold ``-inf`` for rows that see no key anywhere, whose gradients are
zero. ``dlse`` (a gradient flowing into the returned lse; it folds into D) is only passed to backends whose
``caps.takes_dlse`` is set. ``scores`` (a :class:`~ringattn.scores.ScoreMod`) is only passed when the call
has score modifications, all of them in ``caps.score_mods``. ALiBi needs positions: it comes with PARTIAL
tasks only, unless ``"alibi"`` is in ``caps.native_score_mods``, in which case every task of such a call
carries its positions (``qseg``/``kseg``, equal strides; ``ScoreMod.flash_alibi`` gives FlashAttention's
``alibi_slopes`` for them).

A backend with ``caps.takes_task_lists`` also has ``forward_tasks`` / ``backward_tasks``, which take all the
tasks of a block pair (of a key tile, in the ring's backward) in one call, ``q``/``k``/``v`` cut to the
tasks' bounding box and the tasks' rows shifted to it: one varlen kernel launch instead of one per task.
``forward_tasks`` returns the merged ``(out, lse)`` of the box's rows (rows no task touches: 0 and
``-inf``), ``backward_tasks`` the box's summed ``(dq, dk, dv)``.

Selection (``kernels.select``) tries the registered backends by ``priority``, highest first, taking the
first whose ``supports`` accepts the tensors and, for a backend with ``self_check``, that agreed with the
reference on a tiny problem of every task kind on that device, dtype and head dims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..masks import Kind, MaskSpec, Task
from ..modes import Mode
from ..scores import ScoreMod


class Alignment(Mode):
    TOP_LEFT = "top-left"  # row i sees keys j <= i (the CPU op, the reference, efficient attention)
    BOTTOM_RIGHT = "bottom-right"  # row i sees keys j <= i + nk - nq (the FlashAttention family)


@dataclass(frozen=True)
class Capabilities:
    """What a backend takes without the planner lowering it (hashable: plans are cached on it)."""

    native: frozenset[Kind] = frozenset({Kind.EMPTY, Kind.FULL, Kind.CAUSAL})
    causal_alignment: Alignment = Alignment.TOP_LEFT
    takes_dlse: bool = False
    # A PARTIAL pair is cut into tiles of at most this many queries x keys before a dense mask is built
    # (for a backend without native PARTIAL): small enough that a mask never costs more than a score tile,
    # big enough for the kernel to run well.
    max_dense_tile: int = 512
    # Largest kernel call (query rows and keys) on a visiting block in the ring's backward: each call's
    # dQ/dK/dV output added into an accumulator stays this size.
    backward_tile: int = 1024
    # Packed documents are planned one piece per document while the pieces are at least this long on
    # average: a kernel call per tiny document costs more than one masked tile over many of them.
    min_document_piece: int = 64
    # Score modifications (``ringattn.scores``: "softcap", "alibi") the backend applies itself; a call
    # with another is run by the reference backend.
    score_mods: frozenset[str] = frozenset()
    # Keys a causal call computes per query row, for the cost model: up to the end of the block of this
    # many keys its diagonal falls in (a kernel walks keys in blocks and computes the diagonal one whole).
    causal_key_block: int = 1
    # Score modifications (of ``score_mods``) the backend applies on any task, given the task's positions
    # (FlashAttention's ``alibi_slopes``): a call with ALiBi is then planned like one without. Those only
    # in ``score_mods`` get every visible pair as PARTIAL tiles.
    native_score_mods: frozenset[str] = frozenset()
    # The backend has ``forward_tasks`` / ``backward_tasks``: all of a block pair's tasks in one call.
    takes_task_lists: bool = False


class Backend(Protocol):
    name: str
    caps: Capabilities
    # ``kernels.select`` tries backends by this, highest first; 0 is the last resort's.
    priority: int
    # Whether ``kernels.select`` checks it against the reference before its first use on a device, dtype
    # and head dims (a backend the project's CI cannot run); ``step_down(device, dtype)``, if it has one,
    # returns what it gave up after a failed check (None: nothing left), and the check runs again.
    self_check: bool

    def supports(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool: ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, task: Task, mask: MaskSpec, *,
                scale: float, scores: ScoreMod | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, task: Task, mask: MaskSpec, *, scale: float,
                 dlse: torch.Tensor | None = None,
                 scores: ScoreMod | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class DenseMaskKernel:
    """A backend whose kernel takes ``causal: bool`` (top-left) plus an optional dense boolean mask.

    Lowers each task to those two arguments: the mask is built from ``MaskSpec.visible`` on the task's
    positions for PARTIAL tasks (tile-sized, by the planner), and from the band's own parameters for BAND
    tasks (whole pairs: only for a subclass that declares BAND native). Score modifications become keyword
    arguments, passed only when present: ``softcap=`` and ``bias=`` (ALiBi's per-key part, ``(heads, 1,
    nk)``, from the task's positions, whatever its kind; its per-row part shifts lse here, see
    ``ringattn.scores``). Subclasses implement
    ``forward_dense`` / ``backward_dense``; tests call those directly too.
    """

    name: str
    caps: Capabilities = Capabilities()
    priority: int = 0
    self_check: bool = False

    def forward(self, q, k, v, task: Task, mask: MaskSpec, *, scale: float, scores: ScoreMod | None = None):
        extra, shift = _score_args(task, scores, q)
        out, lse = self.forward_dense(q, k, v, scale=scale, causal=task.kind is Kind.CAUSAL,
                                      mask=dense_mask(task, mask, q.device), **extra)
        return out, (lse if shift is None else lse + shift)

    def backward(self, dout, q, k, v, out, lse, task: Task, mask: MaskSpec, *, scale: float, dlse=None,
                 scores: ScoreMod | None = None):
        extra, shift = _score_args(task, scores, q)
        if dlse is not None:
            extra["dlse"] = dlse
        return self.backward_dense(dout, q, k, v, out, lse if shift is None else lse - shift, scale=scale,
                                   causal=task.kind is Kind.CAUSAL, mask=dense_mask(task, mask, q.device),
                                   **extra)

    def forward_dense(self, q, k, v, *, scale, causal, mask): ...

    def backward_dense(self, dout, q, k, v, out, lse, *, scale, causal, mask): ...


def _score_args(task: Task, scores: ScoreMod | None, q: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    """The kernel's keyword arguments for the call's score modifications, and the lse shift per row."""
    if scores is None:
        return {}, None
    extra: dict = {}
    shift = None
    if scores.softcap is not None:
        extra["softcap"] = scores.softcap
    if scores.alibi_slopes is not None:
        if task.qseg is None or task.kseg is None:
            raise AssertionError("ALiBi needs positions: the planner hands such calls tasks that carry them")
        k_pos, q_pos = task.kseg.positions(q.device), task.qseg.positions(q.device)
        extra["bias"] = scores.key_bias(k_pos, acc_dtype(q.dtype))
        shift = scores.row_shift(q_pos, k_pos, acc_dtype(q.dtype))
        if scores.softcap is not None:  # the cap is not linear: the whole bias goes in before it
            extra["bias"] = extra["bias"] + shift[:, :, None]
            shift = None
    return extra, shift


def dense_mask(task: Task, mask: MaskSpec, device) -> torch.Tensor | None:
    """The boolean ``(nq, nk)`` visibility of a PARTIAL or BAND task (None for the other kinds); a BAND
    task's comes from its band alone."""
    if task.kind is Kind.BAND:
        return task.band.visible(task.q1 - task.q0, task.k1 - task.k0, device)
    if task.kind is not Kind.PARTIAL:
        return None
    return mask.tile(task.qseg, task.kseg, device)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype partial results, lse and gradients are accumulated in."""
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
    lse = torch.full((b, h, nq), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
    return out, lse


def zero_grads(q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Make ``backend`` selectable (by ``select``, in order of its ``priority``) and nameable (``backend=``,
    ``RINGATTN_BACKEND``): each backend module calls this at its end."""
    check_backend(backend)
    BACKENDS[backend.name] = backend
    return backend


def check_backend(backend: Backend) -> None:
    """A ``TypeError`` naming what ``backend`` lacks of the contract."""
    for attr in ("name", "caps", "priority", "self_check", "supports", "forward", "backward"):
        if not hasattr(backend, attr):
            raise TypeError(f"a backend needs {attr!r} (see ringattn.kernels.base.Backend); "
                            f"{type(backend).__name__} has none")
    lists = hasattr(backend, "forward_tasks") and hasattr(backend, "backward_tasks")
    if backend.caps.takes_task_lists and not lists:
        raise TypeError(f"backend {backend.name!r} declares takes_task_lists: it needs forward_tasks and "
                        "backward_tasks")
