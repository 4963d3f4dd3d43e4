"""The kernel seam for GPU kernels: BAND tasks (windows, chunks, documents as task parameters), ALiBi on
FULL/CAUSAL/BAND tasks, all of a block pair's tasks in one call, and selection by declared priority.

The test-only backends of tests/backends.py declare each of these and compute with the reference kernel:
they must receive what they declare (counted) and match the float64 reference; backends that declare
none of it must be planned exactly as before.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

import ringattn
from ringattn import kernels
from ringattn.kernels import Alignment, Capabilities, acc_dtype
from ringattn.kernels.block import GradAccumulator, OutLseAccumulator, run_backward, run_forward
from ringattn.kernels.reference import ReferenceBackend
from ringattn.masks import Band, Kind, MaskSpec, Segment
from ringattn.scores import ALIBI, ScoreMod
from ringattn.tasks import block_tasks, task_flops, tile_tasks

from .backends import BandBackend, VarlenBackend, backend_for
from .cases import Case, assert_close, run_case
from .reference import attention_ref, rel_err
from .test_kernel_seam import seam_cases

BAND_NATIVE = frozenset({Kind.EMPTY, Kind.FULL, Kind.CAUSAL, Kind.BAND})
SEAM_BACKENDS = ["test-band", "test-varlen"]


def _segments(rnd: random.Random, stride=None) -> tuple[Segment, ...]:
    st = stride or rnd.choice([1, 1, 2, 3])
    return tuple(Segment(rnd.randrange(0, 60), rnd.randrange(1, 40), st) for _ in range(rnd.randrange(1, 3)))


def _random_spec(rnd: random.Random) -> MaskSpec:
    docs = None
    if rnd.random() < 0.5:
        docs = tuple(sorted({0, 100, *rnd.sample(range(1, 100), rnd.randrange(0, 6))}))
    return MaskSpec(seq_len=100 if docs else rnd.randrange(40, 101), causal=rnd.random() < 0.6,
                    window=rnd.choice([None, (rnd.randrange(0, 20), rnd.choice([-1, 0, 5]))]), doc_bounds=docs,
                    chunk=rnd.choice([None, None, rnd.randrange(3, 30)]))


def _task_visible(t, spec, qpos, kpos) -> torch.Tensor:
    nq, nk = t.q1 - t.q0, t.k1 - t.k0
    if t.kind is Kind.FULL:
        return torch.ones(nq, nk, dtype=torch.bool)
    if t.kind is Kind.CAUSAL:
        return torch.arange(nk)[None, :] <= torch.arange(nq)[:, None]
    if t.kind is Kind.BAND:
        return t.band.visible(nq, nk)
    return spec.visible(qpos[t.q0:t.q1][:, None], kpos[t.k0:t.k1][None, :])


def _cover(tasks, spec, qpos, kpos, alignment) -> torch.Tensor:
    covered = torch.zeros(len(qpos), len(kpos), dtype=torch.bool)
    for t in tasks:
        if t.kind is Kind.CAUSAL and alignment is Alignment.BOTTOM_RIGHT:
            assert t.q1 - t.q0 == t.k1 - t.k0, t
        keep = _task_visible(t, spec, qpos, kpos)
        want = spec.visible(qpos[t.q0:t.q1][:, None], kpos[t.k0:t.k1][None, :])
        assert torch.equal(keep & want, keep), f"task {t} shows a hidden pair"
        assert not (covered[t.q0:t.q1, t.k0:t.k1] & keep).any(), f"tasks overlap at {t}"
        covered[t.q0:t.q1, t.k0:t.k1] |= keep
    return covered


@pytest.mark.parametrize("alignment", list(Alignment))
def test_band_plans_cover_exactly_the_visible_pairs(alignment):
    """Random segments, windows, chunks and documents, planned for a BAND-native backend: the tasks (and
    their backward key tiles, whose bands are restrictions) show every visible pair once and no hidden one,
    from the bands' own parameters; equal strides need no dense mask at all."""
    rnd = random.Random(11)
    bands = 0
    for n in range(200):
        spec = _random_spec(rnd)
        caps = Capabilities(native=BAND_NATIVE, causal_alignment=alignment, max_dense_tile=rnd.choice([3, 8, 512]),
                            backward_tile=rnd.choice([4, 7, 1024]))
        stride = rnd.choice([None, 1, 2]) if n % 2 else None
        qsegs, ksegs = _segments(rnd, stride), _segments(rnd, stride)
        qpos = torch.cat([s.positions() for s in qsegs])
        kpos = torch.cat([s.positions() for s in ksegs])
        want = spec.visible(qpos[:, None], kpos[None, :])
        tasks = block_tasks(spec, qsegs, ksegs, caps)
        assert torch.equal(_cover(tasks, spec, qpos, kpos, alignment), want), (spec, qsegs, ksegs)
        tiled = [t for tile in tile_tasks(tasks, len(kpos), caps) for t in tile.tasks]
        assert torch.equal(_cover(tiled, spec, qpos, kpos, alignment), want), (spec, qsegs, ksegs)
        assert all(t.band.pairs(t.q1 - t.q0, t.k1 - t.k0) for t in tiled if t.kind is Kind.BAND), tiled
        if all(s.stride == qsegs[0].stride for s in qsegs + ksegs):
            assert all(t.kind is not Kind.PARTIAL for t in tasks), tasks
        bands += sum(t.kind is Kind.BAND for t in tasks)
        for t in tasks:
            if t.kind is Kind.BAND:
                want_pairs = int(t.band.visible(t.q1 - t.q0, t.k1 - t.k0).sum())
                assert task_flops(t, 1, 1, 1, 0) == 2 * want_pairs
    assert bands > 100


def test_backends_without_band_plan_as_before():
    """Windows, chunks and documents for the library's backends: no BAND task, the same tasks as a
    backend whose capabilities are the defaults."""
    rnd = random.Random(3)
    for _ in range(60):
        spec = _random_spec(rnd)
        qsegs, ksegs = _segments(rnd), _segments(rnd)
        for b in (kernels.BACKENDS["cpu-flash"], kernels.BACKENDS["cuda-flash"], kernels.BACKENDS["reference"]):
            tasks = block_tasks(spec, qsegs, ksegs, b.caps)
            assert all(t.kind is not Kind.BAND and t.band is None for t in tasks)
        alibi = dataclasses.replace(spec, positional=True)
        tasks = block_tasks(alibi, qsegs, ksegs, kernels.BACKENDS["cpu-flash"].caps)
        assert all(t.kind is Kind.PARTIAL for t in tasks)


def test_band_of_documents_is_varlen():
    """A diagonal block of packed causal documents is one BAND task: runs = the documents (FlashAttention's
    cu_seqlens), window (-1, 0) = causal; its FlashAttention windows are causal in every run."""
    spec = MaskSpec(seq_len=4096, causal=True, doc_bounds=(0, 700, 1900, 2500, 4096))
    caps = Capabilities(native=BAND_NATIVE)
    (t,) = block_tasks(spec, (Segment(0, 4096),), (Segment(0, 4096),), caps)
    assert t.kind is Kind.BAND and t.band == Band(0, (-1, 0), (0, 700, 1900, 2500, 4096), (0, 700, 1900, 2500, 4096))
    assert t.band.flash_windows(4096, 4096) == [(-1, 0)] * 4 and t.band.flash_window(4096, 4096) == (-1, 0)
    # A window of 512 keys to the left on an off-diagonal block: one call, the window as it is.
    (t,) = block_tasks(MaskSpec(seq_len=8192, causal=True, window=(512, -1)), (Segment(2048, 2048),),
                      (Segment(0, 2048),), caps)
    assert t.kind is Kind.BAND and t.band.window == (512, 0) and t.band.diag == 2048
    # Chunks of 1000 over a block of 2048 starting at 1500: runs cut at 2000 and 3000.
    (t,) = block_tasks(MaskSpec(seq_len=8192, causal=True, chunk=1000), (Segment(1500, 2048),),
                      (Segment(1500, 2048),), caps)
    assert t.band.cu_q == t.band.cu_k == (0, 500, 1500, 2048)


def _flash_mask(nq, nk, runs, windows):
    """FlashAttention's visibility for varlen runs, each with its bottom-right aligned window_size."""
    keep = torch.zeros(nq, nk, dtype=torch.bool)
    for (r0, r1, c0, c1), (left, right) in zip(runs, windows):
        sq, sk = r1 - r0, c1 - c0
        r, c = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
        m = torch.ones(sq, sk, dtype=torch.bool)
        if left >= 0:
            m &= c >= r + sk - sq - left
        if right >= 0:
            m &= c <= r + sk - sq + right
        keep[r0:r1, c0:c1] = m
    return keep


def test_flash_windows_reproduce_the_band():
    """Where ``flash_windows`` gives every run a window, FlashAttention's varlen mask with those windows is
    the band; it gives None only where a bound falls beyond the run's bottom-right diagonal."""
    rnd = random.Random(5)
    mapped = 0
    for _ in range(400):
        nq, nk = rnd.randrange(1, 30), rnd.randrange(1, 30)
        runs = None
        if rnd.random() < 0.5:
            cq = sorted(rnd.choices(range(nq + 1), k=3))
            ck = sorted(rnd.choices(range(nk + 1), k=3))
            runs = (0, *cq, nq), (0, *ck, nk)
        window = (rnd.choice([-1, rnd.randrange(0, 8)]), rnd.choice([-1, rnd.randrange(0, 8)]))
        band = Band(rnd.randrange(-10, 10), window, *(runs or (None, None)))
        windows = band.flash_windows(nq, nk)
        if None in windows:
            continue
        mapped += 1
        assert torch.equal(_flash_mask(nq, nk, band.runs(nq, nk), windows), band.visible(nq, nk)), band
        one = band.flash_window(nq, nk)
        if one is not None:  # a single varlen call with one window_size
            assert torch.equal(_flash_mask(nq, nk, band.runs(nq, nk), [one] * len(windows)), band.visible(nq, nk))
    assert mapped > 100


def test_flash_alibi_is_ours_up_to_the_lse():
    """FlashAttention's ALiBi (``-slope' |r + nk - nq - c|``) with ``flash_alibi``'s slopes, plus its lse
    shift, is ours (``-slope (i - j)`` on global positions) on a causal task, strided positions included."""
    slopes = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)
    mods = ScoreMod(alibi_slopes=slopes)
    for qseg, kseg in ((Segment(900, 7), Segment(880, 12)), (Segment(1003, 9, 4), Segment(962, 20, 4))):
        nq, nk = qseg.length, kseg.length
        fa_slopes, shift = mods.flash_alibi(qseg, kseg, nq, nk)
        r, c = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
        keep = c <= r + nk - nq
        ours = -slopes[:, None, None] * (qseg.positions()[:, None] - kseg.positions()[None, :]).double()
        fa = -fa_slopes[:, None, None] * (r + nk - nq - c).abs().double() + shift[:, None, None]
        assert torch.allclose(ours[:, keep], fa[:, keep], atol=1e-9)


def _block(name, spec, qsegs, ksegs, scores=None, seed=0):
    """One block pair through a seam backend (run_forward / run_backward) against the float64 reference."""
    backend = backend_for(name, tile=8, chunk=16)
    g = torch.Generator().manual_seed(seed)
    nq, nk = sum(s.length for s in qsegs), sum(s.length for s in ksegs)
    q, dout = (torch.randn(2, nq, 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, nk, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    qpos = torch.cat([s.positions() for s in qsegs])
    kpos = torch.cat([s.positions() for s in ksegs])
    keep = spec.visible(qpos[:, None], kpos[None, :])
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    bias = None
    if scores is not None:  # attention_ref's ALiBi counts i - j on its own rows: give it ours
        bias = -scores.alibi_slopes[:, None, None] * (qpos[:, None] - kpos[None, :]).double()
    s = torch.einsum("bihd,bjhd->bhij", leaves[0], leaves[1].repeat_interleave(2, 2)) * 8 ** -0.5
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~keep, float("-inf"))
    lse_ref = torch.logsumexp(s, -1)
    p = torch.exp(s - lse_ref.masked_fill(torch.isneginf(lse_ref), 0)[..., None])
    out_ref = torch.einsum("bhij,bjhd->bihd", p, leaves[2].repeat_interleave(2, 2))
    (out_ref * dout).sum().backward()
    tasks = block_tasks(spec, qsegs, ksegs, backend.caps)
    acc = OutLseAccumulator(q, 8)
    run_forward(backend, q, k, v, tasks, spec, 8 ** -0.5, acc, scores)
    grads = [GradAccumulator(x.shape, acc_dtype(x.dtype), "cpu") for x in (q, k, v)]
    for tile in tile_tasks(tasks, nk, backend.caps):
        run_backward(backend, dout, q, k, v, acc.out, acc.lse, tile.tasks, spec, 8 ** -0.5, *grads, None, scores)
    got = (acc.out, acc.lse, *(x.get() for x in grads))
    want = (out_ref, lse_ref, *(x.grad for x in leaves))
    for what, x, y in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert rel_err(x, y.detach()) < 1e-12, (name, what, spec)
    return tasks


PAIRS = [
    (MaskSpec(200, window=(9, 4)), (Segment(40, 30),), (Segment(25, 40),)),
    (MaskSpec(200, causal=True, chunk=7), (Segment(0, 37),), (Segment(0, 37),)),
    (MaskSpec(200, causal=True, doc_bounds=(0, 5, 6, 30, 200)), (Segment(0, 40),), (Segment(0, 40),)),
    (MaskSpec(150, causal=True, window=(20, -1), doc_bounds=(0, 50, 150)), (Segment(3, 30, 4),), (Segment(1, 30, 4),)),
]


@pytest.mark.parametrize("name", SEAM_BACKENDS)
def test_seam_backends_receive_bands_and_match_the_reference(name):
    backend = backend_for(name)
    backend.seen.clear()
    for spec, qsegs, ksegs in PAIRS:
        tasks = _block(name, spec, qsegs, ksegs)
        assert any(t.kind is Kind.BAND for t in tasks) and all(t.kind is not Kind.PARTIAL for t in tasks), tasks
    assert backend.seen[Kind.BAND] >= 2 * len(PAIRS) and not backend.seen[Kind.PARTIAL]
    if name == "test-varlen":
        assert backend.seen["forward_tasks"] == len(PAIRS) and backend.seen["backward_tasks"] >= len(PAIRS)
        assert not backend.seen["per_task"]


@pytest.mark.parametrize("name", SEAM_BACKENDS)
def test_seam_backends_apply_alibi_on_full_causal_and_band_tasks(name):
    """ALiBi for a backend that applies it natively: no PARTIAL tiles, every task with its positions."""
    backend = backend_for(name)
    backend.seen.clear()
    slopes = torch.tensor([0.3, 0.1, 0.05, 0.01], dtype=torch.float64)
    scores = ScoreMod(alibi_slopes=slopes)
    pairs = [(MaskSpec(300, causal=True, positional=True), (Segment(100, 50),), (Segment(0, 150),)),
             (MaskSpec(300, positional=True), (Segment(0, 30), Segment(200, 10)), (Segment(50, 40),)),
             *((dataclasses.replace(s, positional=True), qs, ks) for s, qs, ks in PAIRS)]
    for spec, qsegs, ksegs in pairs:
        tasks = _block(name, spec, qsegs, ksegs, scores)
        assert all(t.kind is not Kind.PARTIAL and t.qseg is not None for t in tasks), tasks
    seen = backend.seen
    assert seen["alibi", Kind.FULL] and seen["alibi", Kind.CAUSAL] and seen["alibi", Kind.BAND], seen
    assert not seen[Kind.PARTIAL]


def test_alibi_not_native_stays_in_tiles():
    """A backend that lists ALiBi in score_mods only (cpu-flash) keeps every visible pair a PARTIAL tile."""
    caps = kernels.BACKENDS["cpu-flash"].caps
    assert ALIBI in caps.score_mods and ALIBI not in caps.native_score_mods
    tasks = block_tasks(MaskSpec(300, causal=True, positional=True), (Segment(100, 50),), (Segment(0, 150),), caps)
    assert tasks and all(t.kind is Kind.PARTIAL for t in tasks)
    # Nor does a native backend get other kinds where the strides differ: the bias is then no function of
    # row minus key (not FlashAttention's).
    native = backend_for("test-band").caps
    tasks = block_tasks(MaskSpec(300, causal=True, positional=True), (Segment(101, 20, 4),), (Segment(0, 60),), native)
    assert tasks and all(t.kind is Kind.PARTIAL and t.qseg is not None for t in tasks)


def test_single_process_call_through_seam_backends():
    """``ringattn.attention`` with no process group, given the backend object: the same as the reference."""
    g = torch.Generator().manual_seed(4)
    S = 61
    q, k, v = (torch.randn(1, S, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    slopes = torch.tensor([0.2, 0.1, 0.05, 0.02], dtype=torch.float64)
    cu = torch.tensor([0, 20, 45, S], dtype=torch.int32)
    want = ringattn.attention(q, k, v, causal=True, window=(9, -1), cu_seqlens=cu, alibi_slopes=slopes,
                              backend="reference")
    for name in SEAM_BACKENDS:
        b = backend_for(name)
        b.seen.clear()
        got = ringattn.attention(q, k, v, causal=True, window=(9, -1), cu_seqlens=cu, alibi_slopes=slopes, backend=b)
        assert rel_err(got, want) < 1e-12
        assert b.seen["alibi", Kind.BAND]
    ref, _ = attention_ref(q, k, v, _dense(S, cu), alibi_slopes=slopes)
    assert rel_err(want, ref) < 1e-12


def _dense(S, cu):
    from .reference import dense_mask

    return dense_mask(S, causal=True, window=(9, -1), cu_seqlens=cu)


@pytest.mark.parametrize("backend", SEAM_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("world", [2, 3])
def test_seam_band_backends_on_the_ring(ranks, world, layout, backend):
    cases = seam_cases(world, layout, backend)[:4]
    n = 12 * world + 5
    cases += [Case(seq_len=n, kv_heads=2, layout=layout, causal=True, alibi=True, chunk_size=5, backend=backend,
                   seed=9, chunk=6),
              Case(seq_len=n, kv_heads=1, layout=layout, causal=False, alibi=True, window=(6, 2), backend=backend,
                   seed=10, sinks=True, lse_grad=True)]
    for case in cases:
        assert_close(ranks.run(world, run_case, case), case)


# --- selection -----------------------------------------------------------------------------------------

class _Fast(ReferenceBackend):
    name = "test-fast"
    priority = 50

    def supports(self, q, k, v):
        return q.dtype == torch.float64


class _Checked(_Fast):
    name = "test-checked"
    priority = 60
    self_check = True
    steps = 0

    def forward_dense(self, q, k, v, **kw):  # wrong everywhere: fails its self-check
        out, lse = super().forward_dense(q, k, v, **kw)
        return out * 2, lse

    def step_down(self, device, dtype):
        self.steps += 1
        return "the fast path" if self.steps == 1 else None


def test_select_follows_priority_and_self_check(monkeypatch):
    monkeypatch.setattr(kernels, "BACKENDS", dict(kernels.BACKENDS))
    monkeypatch.delenv("RINGATTN_BACKEND", raising=False)
    x = torch.zeros(1, 4, 2, 8)
    assert kernels.select(x, x, x).name == "cpu-flash"
    kernels.register(_Fast())
    assert kernels.select(x.double(), x.double(), x.double()).name == "test-fast"
    assert kernels.select(x, x, x).name == "cpu-flash"  # it does not support float32
    checked = kernels.register(_Checked())
    with pytest.warns(UserWarning, match="test-checked failed its self-check"):
        assert kernels.select(x.double(), x.double(), x.double()).name == "test-fast"
    assert checked.steps == 2  # stepped down once, checked again, then given up


def test_register_refuses_an_incomplete_backend(monkeypatch):
    monkeypatch.setattr(kernels, "BACKENDS", dict(kernels.BACKENDS))

    class NoPriority:
        name, caps = "x", Capabilities()

    with pytest.raises(TypeError, match="a backend needs 'priority'"):
        kernels.register(NoPriority())

    class NoLists(_Fast):
        name = "test-no-lists"
        caps = Capabilities(takes_task_lists=True)

    with pytest.raises(TypeError, match="declares takes_task_lists: it needs forward_tasks and backward_tasks"):
        kernels.register(NoLists())


def test_gpu_check_seam_paths_on_cpu():
    """benchmarks/gpu_check.py's seam and ALiBi rows, run on CPU around the reference kernel: the planning,
    the task-list entry and the script's own reference agree, and the pairs reach BAND tasks."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seam = mod.seam_backend(kernels.retiled(kernels.BACKENDS["reference"], max_dense_tile=8))
    assert {"windows", "chunks", "window-docs", "documents"} <= {p[0] for p in mod.direct_pairs()}
    for n, (spec, qsegs, ksegs) in enumerate(PAIRS):  # the script's pairs, smaller
        for backend, alibi in ((seam, False), (mod.alibi_backend(), True)):
            errs = mod.check_direct(torch.float32, 2, f"pair{n}", spec, qsegs, ksegs, "cpu", backend, alibi)
            kinds = errs.pop("kinds")
            assert "BAND" in kinds and "PARTIAL" not in kinds, (n, kinds)
            assert all(e <= mod.TOL[torch.float32] for e in errs.values()), (n, alibi, errs)


def test_self_check_covers_the_declared_seam_paths():
    """The self-check of a backend that declares BAND, ALiBi on any task or task lists runs those too, and
    names the one that disagrees."""
    for name in SEAM_BACKENDS:
        assert kernels._disagreement(backend_for(name), "cpu", torch.float32, 16, 8) is None

    class WrongBand(BandBackend):
        def forward(self, q, k, v, task, mask, *, scale, scores=None):
            if task.kind is Kind.BAND:
                task = dataclasses.replace(task, band=dataclasses.replace(task.band, cu_q=None, cu_k=None))
            return super().forward(q, k, v, task, mask, scale=scale, scores=scores)

    class WrongAlibi(BandBackend):
        def forward(self, q, k, v, task, mask, *, scale, scores=None):
            return super().forward(q, k, v, task, mask, scale=scale, scores=None)

    class WrongList(VarlenBackend):
        def forward_tasks(self, q, k, v, tasks, mask, *, scale, scores=None):
            return super().forward_tasks(q, k, v, tasks[:1], mask, scale=scale, scores=scores)

    assert kernels._disagreement(WrongBand(), "cpu", torch.float32, 16, 8).startswith("BAND")
    assert kernels._disagreement(WrongAlibi(), "cpu", torch.float32, 16, 8).startswith("ALiBi FULL")
    assert kernels._disagreement(WrongList(), "cpu", torch.float32, 16, 8).startswith("task list")
