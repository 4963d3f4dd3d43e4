"""Test-only kernel backends: they run on CPU the seam's paths that only other hardware takes.

- ``NativePartialBackend`` claims PARTIAL natively (as FlexAttention would): the planner hands it whole
  partial block pairs, unlowered, and it applies ``MaskSpec.visible`` over the whole pair.
- ``BottomRightBackend`` claims bottom-right causal alignment (as the FlashAttention family does): the
  planner must hand it only square causal tasks, which it checks, so the lowering is tested here.

- ``BandBackend`` claims BAND natively and applies ALiBi on every task kind (as FlashAttention does with
  ``window_size``, varlen ``cu_seqlens`` and ``alibi_slopes``): windows, chunks and documents reach it as one
  band per pair, built into a mask from the band's own parameters, and ALiBi calls as FULL/CAUSAL/BAND
  tasks with positions.
- ``VarlenBackend`` is that, bottom-right aligned, taking all of a block pair's tasks in one call
  (``forward_tasks`` / ``backward_tasks``), as one varlen launch would.

All compute with the reference kernel, so results must match the float64 reference exactly as well, and
take every score modification as it does. The last two count what they receive (``seen``), for tests in
one process.
"""

from __future__ import annotations

from collections import Counter

from ringattn.kernels import BACKENDS, Alignment, Capabilities, retiled
from ringattn.kernels.block import backward_each, forward_each
from ringattn.kernels.reference import ReferenceBackend
from ringattn.masks import Kind
from ringattn.scores import ALIBI


class NativePartialBackend(ReferenceBackend):
    name = "test-native-partial"
    caps = Capabilities(native=frozenset(Kind), takes_dlse=True, score_mods=ReferenceBackend.caps.score_mods)


class BottomRightBackend(ReferenceBackend):
    name = "test-bottom-right"
    caps = Capabilities(causal_alignment=Alignment.BOTTOM_RIGHT, takes_dlse=True,
                        score_mods=ReferenceBackend.caps.score_mods)

    def forward(self, q, k, v, task, mask, *, scale, scores=None):
        assert task.kind is not Kind.CAUSAL or q.shape[1] == k.shape[1], f"non-square causal task {task}"
        return super().forward(q, k, v, task, mask, scale=scale, scores=scores)

    def backward(self, dout, q, k, v, out, lse, task, mask, *, scale, dlse=None, scores=None):
        assert task.kind is not Kind.CAUSAL or q.shape[1] == k.shape[1], f"non-square causal task {task}"
        return super().backward(dout, q, k, v, out, lse, task, mask, scale=scale, dlse=dlse, scores=scores)


class BandBackend(ReferenceBackend):
    name = "test-band"
    caps = Capabilities(native=frozenset({Kind.EMPTY, Kind.FULL, Kind.CAUSAL, Kind.BAND}), takes_dlse=True,
                        score_mods=ReferenceBackend.caps.score_mods, native_score_mods=frozenset({ALIBI}))

    def __init__(self):
        self.seen: Counter = Counter()

    def check(self, q, k, task, scores):
        """Count the task; assert it is one this backend declared it takes, as it takes it."""
        nq, nk = q.shape[1], k.shape[1]
        assert (task.q1 - task.q0, task.k1 - task.k0) == (nq, nk), f"tensors do not match task {task}"
        assert task.kind is not Kind.PARTIAL or task.qseg is not None, f"PARTIAL task without positions {task}"
        if task.kind is Kind.BAND:
            b = task.band
            assert b is not None, f"BAND task without a band {task}"
            if b.cu_q is not None:
                assert b.cu_q[0] == b.cu_k[0] == 0 and (b.cu_q[-1], b.cu_k[-1]) == (nq, nk), f"runs of {task}"
                assert len(b.cu_q) == len(b.cu_k) and list(b.cu_q) == sorted(b.cu_q) \
                    and list(b.cu_k) == sorted(b.cu_k), f"runs of {task}"
        if self.caps.causal_alignment is Alignment.BOTTOM_RIGHT:
            assert task.kind is not Kind.CAUSAL or nq == nk, f"non-square causal task {task}"
        self.seen[task.kind] += 1
        if scores is not None and scores.alibi_slopes is not None:
            assert task.qseg is not None and task.kseg is not None, f"ALiBi task without positions {task}"
            assert task.qseg.length == nq and task.kseg.length == nk, f"positions do not match task {task}"
            self.seen["alibi", task.kind] += 1

    def forward(self, q, k, v, task, mask, *, scale, scores=None):
        self.check(q, k, task, scores)
        return super().forward(q, k, v, task, mask, scale=scale, scores=scores)

    def backward(self, dout, q, k, v, out, lse, task, mask, *, scale, dlse=None, scores=None):
        self.check(q, k, task, scores)
        return super().backward(dout, q, k, v, out, lse, task, mask, scale=scale, dlse=dlse, scores=scores)


class VarlenBackend(BandBackend):
    name = "test-varlen"
    caps = Capabilities(native=BandBackend.caps.native, causal_alignment=Alignment.BOTTOM_RIGHT, takes_dlse=True,
                        score_mods=ReferenceBackend.caps.score_mods, native_score_mods=frozenset({ALIBI}),
                        takes_task_lists=True)

    def forward(self, *args, **kwargs):  # the self-check's; the planner's tasks come in lists
        self.seen["per_task"] += 1
        return super().forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        self.seen["per_task"] += 1
        return super().backward(*args, **kwargs)

    def forward_tasks(self, q, k, v, tasks, mask, *, scale, scores=None):
        self.seen["forward_tasks"] += 1
        return forward_each(_PerTaskOf(self), q, k, v, tasks, mask, scale=scale, scores=scores)

    def backward_tasks(self, dout, q, k, v, out, lse, tasks, mask, *, scale, dlse=None, scores=None):
        self.seen["backward_tasks"] += 1
        return backward_each(_PerTaskOf(self), dout, q, k, v, out, lse, tasks, mask, scale=scale, dlse=dlse,
                             scores=scores)


class _PerTaskOf:
    """The per-task reference calls inside a task-list call, checked and counted as ``BandBackend`` does."""

    def __init__(self, outer: VarlenBackend):
        self.outer, self.caps = outer, outer.caps

    def forward(self, q, k, v, task, mask, *, scale, scores=None):
        self.outer.check(q, k, task, scores)
        return ReferenceBackend.forward(self.outer, q, k, v, task, mask, scale=scale, scores=scores)

    def backward(self, dout, q, k, v, out, lse, task, mask, *, scale, dlse=None, scores=None):
        self.outer.check(q, k, task, scores)
        return ReferenceBackend.backward(self.outer, dout, q, k, v, out, lse, task, mask, scale=scale, dlse=dlse,
                                         scores=scores)


TEST_BACKENDS = {b.name: b for b in (NativePartialBackend(), BottomRightBackend(), BandBackend(),
                                     VarlenBackend())}


def backend_for(name: str | None, tile: int | None = None, chunk: int | None = None, doc_piece: int | None = None):
    """The ``backend=`` of a test case: by name (library or test backend), with its planning sizes
    changed; None when nothing is asked (the library chooses)."""
    if name is None and tile is None and chunk is None and doc_piece is None:
        return None
    name = name or "cpu-flash"
    base = TEST_BACKENDS.get(name) or BACKENDS[name]
    return retiled(base, max_dense_tile=tile, backward_tile=chunk, min_document_piece=doc_piece)
