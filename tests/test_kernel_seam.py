"""The kernel seam: planning for what a backend takes natively, and the predicate every path shares.

The exactness cases run through test-only backends (tests/backends.py) that take the paths CPU kernels
never take: whole PARTIAL pairs (as FlexAttention would) and bottom-right causal alignment (as the
FlashAttention family does), and through the per-document planning of packed documents.
"""

from __future__ import annotations

import random

import pytest
import torch

from ringattn.kernels import Alignment, Capabilities
from ringattn.masks import Kind, MaskSpec, Segment
from ringattn.tasks import block_tasks, tile_tasks

from .cases import Case, assert_close, run_case
from .test_masks_on_ring import doc_cases

LAYOUTS = ["contiguous", "zigzag", "striped"]


def seam_cases(world, layout, backend):
    n = 16 * world + 5
    cases = []
    for exchange in ("ring", "direct"):
        x = {"backward_exchange": exchange}
        cases += [
            Case(seq_len=n, kv_heads=1, layout=layout, causal=True, backend=backend, seed=1, chunk=6, extra=x),
            Case(seq_len=n, kv_heads=2, layout=layout, causal=False, window=(7, 3), backend=backend, seed=2, extra=x),
            Case(seq_len=n, kv_heads=4, layout=layout, causal=True, window=(9, -1), backend=backend, seed=3,
                 chunk=5, batch=1, extra=x),
            Case(seq_len=n, kv_heads=2, layout=layout, causal=True, cu_seqlens=[0, 3, 3 + n // 2, n], batch=1,
                 backend=backend, seed=4, chunk=7, extra=x),
        ]
    return cases


@pytest.mark.parametrize("backend", ["test-native-partial", "test-bottom-right"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_seam_backends_match_dense(ranks, world, layout, backend):
    for case in seam_cases(world, layout, backend):
        assert_close(ranks.run(world, run_case, case), case)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_documents_planned_by_piece(ranks, world, layout):
    """Every document case again, planned one piece per document (no dense mask at all)."""
    for case in doc_cases(world, layout):
        case.doc_piece = 1
        assert_close(ranks.run(world, run_case, case), case)


@pytest.mark.parametrize("strategy", ["allgather", "ulysses"])
def test_strategies_through_seam_backends(ranks, strategy):
    for backend in ("test-native-partial", "test-bottom-right"):
        for case in seam_cases(2, "zigzag", backend)[:4]:
            case.strategy = strategy
            case.extra = {}
            assert_close(ranks.run(2, run_case, case), case)


def _segments(rnd: random.Random) -> tuple[Segment, ...]:
    return tuple(Segment(rnd.randrange(0, 60), rnd.randrange(1, 40), rnd.choice([1, 1, 2, 3]))
                 for _ in range(rnd.randrange(1, 3)))


def _cover(tasks, nq, nk, spec, qpos, kpos, alignment):
    covered = torch.zeros(nq, nk, dtype=torch.bool)
    for t in tasks:
        rows, cols = torch.arange(t.q0, t.q1)[:, None], torch.arange(t.k0, t.k1)[None, :]
        if t.kind is Kind.FULL:
            keep = torch.ones(t.q1 - t.q0, t.k1 - t.k0, dtype=torch.bool)
        elif t.kind is Kind.CAUSAL:
            if alignment is Alignment.BOTTOM_RIGHT:
                assert t.q1 - t.q0 == t.k1 - t.k0, "a bottom-right backend got a non-square causal task"
            keep = (cols - t.k0) <= (rows - t.q0)
        else:
            keep = spec.visible(qpos[t.q0:t.q1][:, None], kpos[t.k0:t.k1][None, :])
        want = spec.visible(qpos[t.q0:t.q1][:, None], kpos[t.k0:t.k1][None, :])
        assert torch.equal(keep & want, keep), f"task {t} shows a hidden pair"
        assert not (covered[t.q0:t.q1, t.k0:t.k1] & keep).any(), "tasks overlap"
        covered[t.q0:t.q1, t.k0:t.k1] |= keep
    return covered


@pytest.mark.parametrize("alignment", list(Alignment))
@pytest.mark.parametrize("native_partial", [False, True])
def test_random_plans_cover_exactly_the_visible_pairs(alignment, native_partial):
    """Random segments, masks and capabilities: the tasks (and their backward key tiles) show every
    visible pair once and no hidden one; PARTIAL only where the backend cannot be spared a mask."""
    rnd = random.Random(7)
    native = frozenset(Kind) if native_partial else Capabilities().native
    for _ in range(150):
        bounds = sorted({0, 100, *rnd.sample(range(1, 100), rnd.randrange(0, 6))})
        spec = MaskSpec(seq_len=rnd.randrange(40, 101), causal=rnd.random() < 0.6,
                        window=rnd.choice([None, (rnd.randrange(0, 20), rnd.choice([-1, 0, 5]))]),
                        doc_bounds=tuple(b for b in bounds if b < 100) + (100,) if rnd.random() < 0.5 else None)
        if spec.doc_bounds is not None:
            spec = MaskSpec(seq_len=100, causal=spec.causal, window=spec.window, doc_bounds=spec.doc_bounds)
        caps = Capabilities(native=native, causal_alignment=alignment, max_dense_tile=rnd.choice([3, 8, 512]),
                            backward_tile=rnd.choice([4, 7, 1024]), min_document_piece=rnd.choice([1, 64]))
        qsegs, ksegs = _segments(rnd), _segments(rnd)
        qpos = torch.cat([s.positions() for s in qsegs])
        kpos = torch.cat([s.positions() for s in ksegs])
        want = spec.visible(qpos[:, None], kpos[None, :])
        tasks = block_tasks(spec, qsegs, ksegs, caps)
        assert torch.equal(_cover(tasks, len(qpos), len(kpos), spec, qpos, kpos, alignment), want)
        tiled = [t for tile in tile_tasks(tasks, len(kpos), caps) for t in tile.tasks]
        assert torch.equal(_cover(tiled, len(qpos), len(kpos), spec, qpos, kpos, alignment), want)


def test_documents_need_no_dense_mask():
    """Packed documents of useful length plan to full and causal calls only (the fast CPU path)."""
    spec = MaskSpec(seq_len=4096, causal=True, doc_bounds=(0, 700, 1900, 2500, 4096))
    tasks = block_tasks(spec, (Segment(0, 4096),), (Segment(0, 4096),), Capabilities())
    assert {t.kind for t in tasks} == {Kind.CAUSAL}
    assert len(tasks) == 4


def test_visible_broadcasts():
    spec = MaskSpec(seq_len=10, causal=True, window=(2, -1), doc_bounds=(0, 4, 10))
    q, k = torch.arange(10)[:, None], torch.arange(12)[None, :]
    m = spec.visible(q, k)
    assert m.shape == (10, 12)
    i, j = q.expand(10, 12), k.expand(10, 12)
    want = (j <= i) & (j >= i - 2) & (j < 10) & ((i < 4) == (j < 4))
    assert torch.equal(m, want)
    assert spec.visible(torch.tensor(5), torch.tensor(4)).item() and not spec.visible(torch.tensor(4), torch.tensor(3))
