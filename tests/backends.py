"""Test-only kernel backends: they run on CPU the seam's paths that only other hardware takes.

- ``NativePartialBackend`` claims PARTIAL natively (as FlexAttention would): the planner hands it whole
  partial block pairs, unlowered, and it applies ``MaskSpec.visible`` over the whole pair.
- ``BottomRightBackend`` claims bottom-right causal alignment (as the FlashAttention family does): the
  planner must hand it only square causal tasks, which it checks, so the lowering is tested here.

Both compute with the reference kernel, so results must match the float64 reference exactly as well, and
take every score modification as it does.
"""

from __future__ import annotations

from ringattn.kernels import BACKENDS, Alignment, Capabilities, retiled
from ringattn.kernels.reference import ReferenceBackend
from ringattn.masks import Kind


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


TEST_BACKENDS = {b.name: b for b in (NativePartialBackend(), BottomRightBackend())}


def backend_for(name: str | None, tile: int | None = None, chunk: int | None = None, doc_piece: int | None = None):
    """The ``backend=`` of a test case: by name (library or test backend), with its planning sizes
    changed; None when nothing is asked (the library chooses)."""
    if name is None and tile is None and chunk is None and doc_piece is None:
        return None
    name = name or "cpu-flash"
    base = TEST_BACKENDS.get(name) or BACKENDS[name]
    return retiled(base, max_dense_tile=tile, backward_tile=chunk, min_document_piece=doc_piece)
