"""Single-process exactness of the per-block kernels, the merge, and ring_attention with world size 1."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ringattn.kernels import BACKENDS, Capabilities, heads_major
from ringattn.kernels.block import GradAccumulator, OutLseAccumulator, merge_into, run_forward
from ringattn.masks import Kind, MaskSpec, Segment, Task
from ringattn.tasks import block_tasks, tile_tasks

from .cases import Case, assert_close, run_case
from .reference import TOL, attention_ref, rel_err

CPU_BACKENDS = ["cpu-flash", "reference"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal,use_mask", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("kv_heads,dv", [(1, 16), (2, 8), (4, 24)])
def test_backend_forward_backward(backend, dtype, causal, use_mask, kv_heads, dv):
    g = torch.Generator().manual_seed(kv_heads * 7 + dv)
    nq, nk, h, d = 37, 53, 4, 16  # nq != nk: the causal diagonal is top-left aligned
    q = torch.randn(2, nq, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(2, nk, kv_heads, d, generator=g, dtype=torch.float64)
    v = torch.randn(2, nk, kv_heads, dv, generator=g, dtype=torch.float64)
    do = torch.randn(2, nq, h, dv, generator=g, dtype=torch.float64)
    keep = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        keep = torch.ones(nq, nk, dtype=torch.bool).tril()
    mask = None
    if use_mask:
        mask = torch.rand(nq, nk, generator=g) > 0.5
        mask[3] = False  # a row that sees nothing in this block
        keep = mask
    ro, rl = attention_ref(q, k, v, keep)
    b = BACKENDS[backend]
    x = [t.to(dtype) for t in (q, k, v, do)]
    out, lse = b.forward_dense(*x[:3], scale=d ** -0.5, causal=causal, mask=mask)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = TOL[dtype]
    assert rel_err(out, ro) <= tol and rel_err(lse, rl) <= tol
    if use_mask:
        assert torch.isneginf(lse[:, :, 3]).all() and (out[:, 3] == 0).all()
    # Backward against autograd through the reference, given the reference's final out/lse.
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    o2, _ = attention_ref(qq, kk, vv, keep.logical_or(~keep.any(-1, keepdim=True)) if use_mask else keep)
    o2 = torch.where(keep.any(-1)[None, :, None, None], o2, torch.zeros_like(o2))
    (o2 * do).sum().backward()
    dq, dk, dvv = b.backward_dense(x[3], *x[:3], ro.to(dtype), rl, scale=d ** -0.5, causal=causal, mask=mask)
    for got, ref in ((dq, qq.grad), (dk, kk.grad), (dvv, vv.grad)):
        assert rel_err(got, ref) <= tol


def test_merge_handles_empty_sides():
    out_a = torch.zeros(1, 3, 2, 4, dtype=torch.float64)
    lse_a = torch.full((1, 2, 3), float("-inf"), dtype=torch.float64)
    out_b = torch.randn(1, 3, 2, 4, dtype=torch.float64)
    lse_b = torch.randn(1, 2, 3, dtype=torch.float64)
    lse_b[:, :, 1] = float("-inf")
    out_b[:, 1] = 0
    merge_into(out_a, lse_a, out_b, lse_b)
    assert torch.equal(lse_a, lse_b) and torch.allclose(out_a, out_b)
    assert not torch.isnan(out_a).any()
    # Two genuine halves merge to the whole: softmax over [s1, s2] from softmax over each.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 5, 2, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 9, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 9, 2, 8, generator=g, dtype=torch.float64)
    o1, l1 = attention_ref(q, k[:, :4], v[:, :4], torch.ones(5, 4, dtype=torch.bool))
    o2, l2 = attention_ref(q, k[:, 4:], v[:, 4:], torch.ones(5, 5, dtype=torch.bool))
    ro, rl = attention_ref(q, k, v, torch.ones(5, 9, dtype=torch.bool))
    merge_into(o1, l1, o2, l2)
    assert rel_err(o1, ro) <= 1e-12 and rel_err(l1, rl) <= 1e-12


def _brute_kind(spec: MaskSpec, qs: Segment, ks: Segment) -> torch.Tensor:
    return spec.visible(qs.positions()[:, None], ks.positions()[None, :])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, (0, 0), (3, -1), (5, 2), (-1, 4)])
@pytest.mark.parametrize("docs", [None, (0, 5, 6, 20, 40)])
def test_classification_is_exact(causal, window, docs):
    """Every classification agrees with the dense mask it stands for."""
    spec = MaskSpec(seq_len=40, causal=causal, window=window, doc_bounds=docs)
    segs = [Segment(s, n, st) for s, n, st in itertools.product((0, 3, 17, 30), (1, 4, 9), (1, 3))]
    for qs, ks in itertools.product(segs, segs):
        keep = _brute_kind(spec, qs, ks)
        pair = spec.classify(qs, ks)
        kvalid = ks.positions() < 40
        if pair.kind is Kind.EMPTY:
            assert not keep.any(), (qs, ks)
            continue
        assert pair.k_len == int(kvalid.sum()) and not keep[:, pair.k_len:].any()
        kk = keep[:, :pair.k_len]
        if pair.kind is Kind.FULL:
            assert kk.all(), (qs, ks, spec)
        elif pair.kind is Kind.CAUSAL or pair.shift > 0:  # a PARTIAL pair with shift > 0 follows the same rule
            i = torch.arange(qs.length)[:, None]
            j = torch.arange(pair.k_len)[None, :]
            assert torch.equal(kk, j <= i + pair.shift), (qs, ks, spec, pair)


@pytest.mark.parametrize("tile", [4, 512])
def test_plan_block_covers_mask(tile):
    spec = MaskSpec(seq_len=45, causal=True, window=(7, -1), doc_bounds=(0, 1, 13, 45))
    qsegs = (Segment(0, 12), Segment(36, 12))
    ksegs = (Segment(12, 12), Segment(24, 12))
    tasks = block_tasks(spec, qsegs, ksegs, Capabilities(max_dense_tile=tile))
    covered = torch.zeros(24, 24, dtype=torch.bool)
    qpos = torch.cat([s.positions() for s in qsegs])
    kpos = torch.cat([s.positions() for s in ksegs])
    for t in tasks:
        keep = spec.visible(qpos[t.q0:t.q1][:, None], kpos[t.k0:t.k1][None, :])
        if t.kind is Kind.FULL:
            assert keep.all()
        assert not covered[t.q0:t.q1, t.k0:t.k1].any(), "tasks overlap"
        covered[t.q0:t.q1, t.k0:t.k1] = True
    visible = spec.visible(qpos[:, None], kpos[None, :])
    assert torch.equal(covered | ~visible, torch.ones_like(covered)), "a visible pair is missed"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_block_attention_api(backend):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 10, 2, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 10, 1, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 10, 1, 8, generator=g, dtype=torch.float64)
    spec = MaskSpec(seq_len=20, causal=True)
    b = BACKENDS[backend]
    acc = OutLseAccumulator(q, v.shape[-1])
    run_forward(b, q, k, v, block_tasks(spec, (Segment(10, 10),), (Segment(5, 10),), b.caps), spec, 0.125 ** 0.5, acc)
    out, lse = acc.out, acc.lse
    keep = spec.visible(Segment(10, 10).positions()[:, None], Segment(5, 10).positions()[None, :])
    ro, rl = attention_ref(q, k, v, keep)
    assert rel_err(out, ro) <= 1e-12 and rel_err(lse, rl) <= 1e-12


MASKS = [
    dict(causal=False), dict(causal=True), dict(window=(3, 2)), dict(causal=True, window=(5, -1)),
    dict(cu_seqlens=[0, 1, 8, 20]), dict(causal=True, cu_seqlens=[0, 6, 7]),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n", [1, 7, 37, 131])
@pytest.mark.parametrize("mask", range(len(MASKS)))
def test_single_process_ring_attention(monkeypatch, backend, dtype, n, mask):
    monkeypatch.setenv("RINGATTN_BACKEND", backend)
    kw = dict(MASKS[mask])
    if "cu_seqlens" in kw:
        kw["cu_seqlens"] = [x for x in kw["cu_seqlens"] if x < n] + [n]
    for kvh, dv in ((1, 16), (2, 8), (4, 16)):
        case = Case(seq_len=n, kv_heads=kvh, v_head_dim=dv, dtype=dtype, batch=1 if "cu_seqlens" in kw else 2,
                    tile=16, seed=n + kvh, **kw)
        assert_close([run_case(case)], case)


def _pairs(ts) -> torch.Tensor:
    m = torch.zeros(64, 64, dtype=torch.int32)
    for t in ts:
        i = torch.arange(t.q1 - t.q0)[:, None]
        j = torch.arange(t.k1 - t.k0)[None, :]
        keep = (j <= i) if t.kind is Kind.CAUSAL else torch.ones(t.q1 - t.q0, t.k1 - t.k0, dtype=torch.bool)
        m[t.q0:t.q1, t.k0:t.k1] += keep.int()
    return m


@pytest.mark.parametrize("size", [1, 5, 8, 64])
@pytest.mark.parametrize("task", [Task(3, 40, 0, 37, Kind.CAUSAL), Task(0, 37, 5, 30, Kind.CAUSAL),
                                  Task(2, 50, 1, 20, Kind.FULL), Task(0, 1, 0, 1, Kind.CAUSAL),
                                  Task(10, 20, 0, 60, Kind.CAUSAL)])
def test_tile_tasks_cover_the_same_pairs_once(task, size):
    """The backward's key tiles of a block see exactly the pairs the whole task sees, each once, and no
    call is bigger than a tile."""
    tiles = tile_tasks((task,), 64, Capabilities(backward_tile=size))
    assert [(u, w) for u, w, _ in tiles] == [(u, min(u + size, 64)) for u in range(0, 64, size)]
    pieces = [t for u, w, col in tiles for t in col]
    assert all(u <= t.k0 and t.k1 <= w for u, w, col in tiles for t in col)
    assert all(t.q1 - t.q0 <= size and t.k1 - t.k0 <= size for t in pieces)
    assert torch.equal(_pairs(pieces), _pairs((task,)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12), st.booleans(), st.booleans()), max_size=6),
       st.booleans())
def test_sum_equals_dense_accumulation(adds, initial):
    """The lazy gradient accumulator equals plain zeros-and-add whatever the order, overlap and storage of
    the contributions, and never writes into a piece it was given until it adopts one as its buffer."""
    shape = (2, 12, 3, 4)
    g = torch.Generator().manual_seed(len(adds))
    start = torch.randn(shape, dtype=torch.float64, generator=g) if initial else None
    acc = GradAccumulator(shape, torch.float64, "cpu", initial=None if start is None else start.clone())
    dense = torch.zeros(shape, dtype=torch.float64) if start is None else start.clone()
    for a, b, heads_major_storage, half in adds:
        a, b = min(a, b), max(a, b)
        x = torch.randn(2, b - a, 3, 4, dtype=torch.float64, generator=g)
        if heads_major_storage:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        if half:
            x = x.float()
        dense[:, a:b] += x
        acc.add(a, b, x)
    torch.testing.assert_close(acc.get(), dense, rtol=1e-6, atol=1e-6)


def test_sum_adopts_a_full_contribution_and_folds_pieces_into_it():
    acc = GradAccumulator((1, 6, 2, 3), torch.float32, "cpu")
    p1, p2, full = torch.ones(1, 2, 2, 3), 2 * torch.ones(1, 3, 2, 3), torch.zeros(1, 6, 2, 3)
    acc.add(0, 2, p1)
    acc.add(3, 6, p2)
    acc.add(0, 6, full)
    assert acc.get() is full  # no new buffer
    assert torch.equal(full[0, :, 0, 0], torch.tensor([1.0, 1, 0, 2, 2, 2]))
    assert torch.equal(p1, torch.ones(1, 2, 2, 3))  # the pieces themselves are untouched


def test_heads_major_storage():
    x = torch.randn(2, 5, 3, 4)
    y = heads_major(x)
    assert torch.equal(x, y) and y.transpose(1, 2).is_contiguous()
    assert heads_major(y) is y
