"""Regression tests from a review of the core (masks, kernels, ring, comm, validate).

Each test pins a corner that the main suites did not reach: odd tensor strides, the CUDA backend's call
convention (checked on CPU with stand-in ops), partial ``requires_grad``, no-grad calls, gradients
through the returned lse, both ring directions with their gradient return, plan consistency across
ranks, and ranks that disagree on whether autograd records the call.
"""

from __future__ import annotations

import collections
import math
import random
import zlib

import pytest
import torch
import torch.distributed as dist

import ringattn
from ringattn import comm
from ringattn.kernels import BACKENDS, Capabilities, acc_dtype, retiled
from ringattn.kernels import cuda as cuda_mod
from ringattn.kernels.block import GradAccumulator, OutLseAccumulator, run_backward, run_forward
from ringattn.kernels.cuda import CudaFlashBackend
from ringattn.kernels.lse import LseKernel, from_kernel, to_kernel
from ringattn.layouts import segments
from ringattn.masks import Kind, MaskSpec, Segment, Task
from ringattn.schedule import make_plan
from ringattn.tasks import plan_block

from .cases import Case, assert_close, run_case
from .fake_cuda import FakeCudaOps, check_against_schema
from .reference import TOL, dense_mask, rel_err

F64 = torch.float64


# --- odd strides -----------------------------------------------------------------------------------------

def _last_stride_2(x: torch.Tensor) -> torch.Tensor:
    """Same values, last dim with stride 2 (e.g. every other feature of a wider tensor); differentiable."""
    return torch.stack([x, torch.zeros_like(x)], -1)[..., 0]


def _transposed(x: torch.Tensor) -> torch.Tensor:
    """Same values stored (b, h, s, d) and viewed (b, s, h, d): dense but not contiguous; differentiable."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _expanded_last(x: torch.Tensor) -> torch.Tensor:
    """A last dim of stride 0 (one value broadcast along it)."""
    return x[..., :1].expand(x.shape)


@pytest.mark.parametrize("backend", ["cpu-flash", "reference"])
@pytest.mark.parametrize("odd", [_last_stride_2, _transposed, _expanded_last])
def test_backends_take_any_strides(backend, odd):
    # The CPU fused op silently read wrong elements when the last dim's stride was not 1.
    b, ref = BACKENDS[backend], BACKENDS["reference"]
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(12, 12, generator=g) < 0.7
    for which in range(4):  # q, k, v, dout
        xs = [torch.randn(2, 12, 4, 8, generator=g, dtype=F64) for _ in range(3)]
        xs[2] = xs[2][:, :, :2]  # GQA: 2 kv heads
        xs[1] = xs[1][:, :, :2]
        dout = torch.randn(2, 12, 4, 8, generator=g, dtype=F64)
        if which < 3:
            xs[which] = odd(xs[which])
        else:
            dout = odd(dout)
        dense = [x.contiguous() for x in xs]
        for causal, m in ((False, None), (True, None), (False, mask)):
            o, lse = b.forward_dense(*xs, scale=0.3, causal=causal, mask=m)
            ro, rl = ref.forward_dense(*dense, scale=0.3, causal=causal, mask=m)
            grads = b.backward_dense(dout, *xs, ro, rl, scale=0.3, causal=causal, mask=m)
            rgrads = ref.backward_dense(dout.contiguous(), *dense, ro, rl, scale=0.3, causal=causal, mask=m)
            for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), (o, lse, *grads), (ro, rl, *rgrads)):
                assert rel_err(x, y) <= 1e-12, (backend, odd.__name__, which, causal, m is not None, name)


def strided_ring(layout: str, causal: bool) -> float:
    """Largest relative difference between a ring call on contiguous shards and on oddly strided views."""
    g = torch.Generator().manual_seed(7)
    S = 40
    full = [torch.randn(2, S, h, 8, generator=g, dtype=F64) for h in (4, 2, 2)]
    dout = ringattn.shard(torch.randn(2, S, 4, 8, generator=g, dtype=F64), layout=layout)
    results = []
    for make in ((lambda x: x), _transposed, _last_stride_2):
        leaves = [ringattn.shard(x, layout=layout).requires_grad_() for x in full]
        q, k, v = make(leaves[0]), _transposed(leaves[1]), make(leaves[2])
        out, lse = ringattn.ring_attention(q, k, v, causal=causal, layout=layout, seq_len=S - 3,
                                           return_lse=True)
        (out * dout).sum().backward()
        results.append([out, lse, *(t.grad for t in leaves)])
    return max(rel_err(x, y) for other in results[1:] for x, y in zip(other, results[0]))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_takes_non_contiguous_inputs(ranks, layout):
    # Transposed k/v travel the ring too: the receive buffers must accept them.
    for causal in (False, True):
        assert max(ranks.run(3, strided_ring, layout, causal)) <= 1e-12


# --- the CUDA backend's call convention, on CPU with stand-in ops -------------------------------------

def _cuda_vs_reference(cuda, dtype, spec: MaskSpec, qsegs, ksegs, q, k, v, dout) -> dict[str, float]:
    """One block pair planned for each backend and run by it (out/lse merged over its tasks, grads summed),
    compared with the reference backend's result on the same inputs in float64."""
    def run(backend, dtype):
        xs = [t.to(dtype) for t in (q, k, v, dout)]
        tasks = plan_block(spec, qsegs, ksegs, backend.caps)
        if backend is cuda:
            for t in tasks:  # bottom-right: the planner's promise the fake flash op also checks
                assert t.kind is not Kind.CAUSAL or t.q1 - t.q0 == t.k1 - t.k0, t
        acc = OutLseAccumulator(xs[0], v.shape[-1])
        run_forward(backend, *xs[:3], tasks, spec, 0.3, acc)
        out, lse = acc.out, acc.lse
        grads = [GradAccumulator(x.shape, acc_dtype(dtype), "cpu") for x in xs[:3]]
        run_backward(backend, xs[3], *xs[:3], out, lse, tasks, spec, 0.3, *grads)
        return out, lse, *(g.get() for g in grads)

    got = run(cuda, dtype)
    ref = run(BACKENDS["reference"], F64)
    return {name: _err(x, y) for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), got, ref)}


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``rel_err``, but relative to 0.1 where the reference is smaller (one visible key: dq is exactly 0)."""
    fin = torch.isfinite(ref)
    big = float(ref[fin].abs().max()) if fin.any() else 0.0
    e = rel_err(x, ref)
    return e * max(big, 1e-30) / 0.1 if big < 0.1 and math.isfinite(e) else e


def _random_pair(rng: random.Random):
    """A random mask and block pair: full, causal, window, documents, striped and padded keys."""
    n = rng.randint(1, 70)
    kind = rng.choice(["full", "causal", "window", "docs", "causal-docs", "striped", "padding"])
    stride = 3 if kind == "striped" else 1
    q0, k0 = rng.randint(0, 40), rng.randint(0, 40)
    qsegs = (Segment(q0 * stride + (1 if kind == "striped" else 0), n, stride),)
    ksegs = (Segment(k0 * stride, rng.randint(1, 70), stride),)
    if kind == "striped" and rng.random() < 0.5:
        qsegs, ksegs = ksegs, qsegs  # the other side of the stripe
    last = max(qsegs[0].last, ksegs[0].last) + 1
    seq_len = last
    if kind == "padding":
        seq_len = max(1, last - rng.randint(1, 30))
    cuts = None
    if "docs" in kind:
        cuts = tuple(sorted({0, seq_len, *(rng.randrange(seq_len) for _ in range(rng.randint(1, 5)))}))
    spec = MaskSpec(seq_len, causal=kind in ("causal", "causal-docs", "striped", "padding"),
                    window=(rng.randint(0, 20), rng.randint(-1, 20)) if kind == "window" else None,
                    doc_bounds=cuts)
    return spec, qsegs, ksegs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dims", [(16, 16), (8, 24), (12, 12)])  # flash-eligible; dv != d; d % 8 != 0
def test_cuda_backend_call_convention(monkeypatch, dtype, dims):
    ops = FakeCudaOps().install(monkeypatch)
    d, dv = dims
    cuda = retiled(CudaFlashBackend(), max_dense_tile=16, backward_tile=24)
    rng = random.Random(zlib.crc32(f"{dtype}{dims}".encode()))
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    kinds = collections.Counter()
    tol = TOL[dtype] * 4  # partial results merged in float32, grads of several calls summed
    for _ in range(25):
        spec, qsegs, ksegs = _random_pair(rng)
        h, kvh = rng.choice([(4, 4), (4, 2), (6, 1)])
        b = rng.choice([1, 2])
        nq, nk = qsegs[0].length, ksegs[0].length
        q = torch.randn(b, nq, h, d, generator=g, dtype=F64)
        k = torch.randn(b, nk, kvh, d, generator=g, dtype=F64)
        v = torch.randn(b, nk, kvh, dv, generator=g, dtype=F64)
        dout = torch.randn(b, nq, h, dv, generator=g, dtype=F64)
        q, k, v, dout = (t.to(dtype).to(F64) for t in (q, k, v, dout))  # the same inputs in every dtype
        kinds.update(t.kind for t in plan_block(spec, qsegs, ksegs, cuda.caps))
        errs = _cuda_vs_reference(cuda, dtype, spec, qsegs, ksegs, q, k, v, dout)
        assert all(e <= tol for e in errs.values()), (spec, qsegs, ksegs, h, kvh, errs)
    assert kinds[Kind.FULL] and kinds[Kind.CAUSAL] and kinds[Kind.PARTIAL], kinds
    flash_ok = dtype != torch.float32 and d == dv and d % 8 == 0
    assert (ops.calls["flash_fwd"] > 0) == flash_ok and (ops.calls["flash_bwd"] > 0) == flash_ok, ops.calls
    assert ops.calls["efficient_fwd"] > 0 and ops.calls["efficient_bwd"] > 0, ops.calls
    if flash_ok:  # every mask-free task went to flash
        assert ops.calls["efficient_fwd"] <= kinds[Kind.PARTIAL] * 4, (ops.calls, kinds)


def test_cuda_backend_empty_rows_and_lse_conventions(monkeypatch):
    """A tile whose rows 0-15 see nothing: out 0 and lse -inf whatever the kernel returned (efficient: 0
    and NaN here); their gradients are 0 with the final lse -inf; GQA folded."""
    FakeCudaOps().install(monkeypatch)
    cuda, ref = CudaFlashBackend(), BACKENDS["reference"]
    spec = MaskSpec(1 << 20, window=(4, 4))
    task = Task(0, 40, 0, 56, Kind.PARTIAL, qseg=Segment(0, 40), kseg=Segment(20, 56))
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 40, 4, 16, generator=g).to(dtype)
        k, v = (torch.randn(2, 56, 2, 16, generator=g).to(dtype) for _ in range(2))
        dout = torch.randn(2, 40, 4, 16, generator=g).to(dtype)
        out, lse = cuda.forward(q, k, v, task, spec, scale=0.25)
        ro, rl = ref.forward(q, k, v, task, spec, scale=0.25)
        assert lse.dtype == torch.float32 and lse.shape == (2, 4, 40) and lse.is_contiguous()
        assert torch.isneginf(lse[:, :, :16]).all() and torch.isfinite(lse[:, :, 16:]).all()
        assert (out[:, :16] == 0).all() and torch.isfinite(out).all()
        grads = cuda.backward(dout, q, k, v, ro, rl, task, spec, scale=0.25)
        rgrads = ref.backward(dout, q, k, v, ro, rl, task, spec, scale=0.25)
        assert (grads[0][:, :16] == 0).all()
        for x, y in zip((out, lse, *grads), (ro, rl, *rgrads)):
            assert x.shape == y.shape and rel_err(x, y) <= TOL[dtype]


def test_lse_conventions_table():
    lse = torch.tensor([[[0.5, math.inf, -1.0]]])
    assert torch.equal(from_kernel(lse, LseKernel.FA2, 3), torch.tensor([[[0.5, -math.inf, -1.0]]]))
    assert torch.equal(from_kernel(lse, LseKernel.FA4, 3), lse)  # FA4's empty row is -inf already
    padded = torch.tensor([[[0.5, 0.0, -1.0] + [math.inf] * 29]])
    got = from_kernel(padded, LseKernel.EFFICIENT, 3, empty_rows=torch.tensor([False, True, False]))
    assert torch.equal(got, torch.tensor([[[0.5, -math.inf, -1.0]]])) and got.is_contiguous()
    ours = torch.tensor([[[0.5, -math.inf, -1.0]]])
    assert torch.equal(to_kernel(ours, LseKernel.FA2), torch.tensor([[[0.5, math.inf, -1.0]]]))
    back = to_kernel(ours, LseKernel.EFFICIENT)
    assert back.shape == (1, 1, 32) and back.stride(1) % 8 == 0
    assert torch.equal(back[..., :3], torch.tensor([[[0.5, math.inf, -1.0]]])) and (back[..., 3:] == math.inf).all()


_RING_MASKS = [dict(), dict(causal=True), dict(window=(5, 3)), dict(causal=True, window=(7, -1)),
               dict(cu_seqlens=[0, 9, 10, 30, 37]), dict(causal=True, cu_seqlens=[0, 20, 37])]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mask", range(len(_RING_MASKS)))
def test_cuda_backend_through_ring_attention(monkeypatch, dtype, mask):
    """ring_attention on world size 1 with the cuda backend (stand-in ops), against float64 autograd."""
    ops = FakeCudaOps().install(monkeypatch)
    for kvh, dv, layout in ((2, 16, "contiguous"), (1, 16, "striped"), (4, 8, "zigzag")):
        case = Case(seq_len=37, kv_heads=kvh, v_head_dim=dv, dtype=dtype, layout=layout, backend="cuda-flash",
                    batch=1 if "cu_seqlens" in _RING_MASKS[mask] else 2, tile=16, chunk=24, seed=mask + kvh,
                    **_RING_MASKS[mask])
        assert_close([run_case(case)], case)
    assert sum(ops.calls.values()) > 0


def test_cuda_ops_accept_our_arguments_on_meta(monkeypatch):
    """The real aten ops' schemas (through their meta kernels) take the arguments the backend passes, in
    order and with the types they declare, and give back the shapes it expects: both flash ops and the
    efficient forward."""
    monkeypatch.setattr(cuda_mod, "_flash_hardware", lambda device: True)
    cuda = CudaFlashBackend()
    for dtype, d, dv, causal, masked in ((torch.bfloat16, 64, 64, True, False), (torch.bfloat16, 64, 32, False, True),
                                         (torch.float32, 64, 64, True, False), (torch.float16, 40, 40, False, True)):
        q = torch.empty(2, 40, 8, d, dtype=dtype, device="meta")
        k = torch.empty(2, 40, 2, d, dtype=dtype, device="meta")
        v = torch.empty(2, 40, 2, dv, dtype=dtype, device="meta")
        mask = torch.empty(40, 40, dtype=torch.bool, device="meta") if masked else None
        kernel = cuda.kernel_for(q, k, v, causal, mask)
        assert kernel == ("flash" if dtype != torch.float32 and d == dv and not masked else "efficient")
        out, lse = cuda.forward_dense(q, k, v, scale=0.1, causal=causal, mask=mask)
        assert out.shape == (2, 40, 8, dv) and lse.shape == (2, 8, 40) and lse.dtype == torch.float32
        if kernel == "efficient":
            continue  # torch's meta function for its backward lacks `out` in its signature (positions shift)
        dout = torch.empty(2, 40, 8, dv, dtype=dtype, device="meta")
        grads = cuda.backward_dense(dout, q, k, v, out.float(), lse, scale=0.1, causal=causal, mask=mask)
        assert [x.shape for x in grads] == [q.shape, k.shape, v.shape]


# --- autograd corners across the ring -------------------------------------------------------------------

def partial_grads(which: str) -> float:
    """Only some of q, k, v require grad: their grads equal those of the all-grad call; the rest stay None."""
    g = torch.Generator().manual_seed(3)
    S = 48
    full = [torch.randn(1, S, h, 8, generator=g, dtype=F64) for h in (4, 1, 1)]
    dout = ringattn.shard(torch.randn(1, S, 4, 8, generator=g, dtype=F64))
    kw = dict(window=(5, 5))  # on 4 ranks of 12: a forward and a reverse step, both return gradients

    def grads(req):
        xs = [ringattn.shard(x).requires_grad_(r) for x, r in zip(full, req)]
        (ringattn.ring_attention(*xs, **kw) * dout).sum().backward()
        return [x.grad for x in xs]

    ref = grads((True, True, True))
    req = tuple(n in which for n in "qkv")
    got = grads(req)
    for r, x in zip(req, got):
        assert (x is not None) == r
    return max(rel_err(x, y) for x, y, r in zip(got, ref, req) if r)


@pytest.mark.parametrize("which", ["q", "kv", "v"])
def test_partial_requires_grad(ranks, which):
    assert make_plan(MaskSpec(48, window=(5, 5)), "contiguous", 0, 4, 12).steps == (0, 1, -1)
    assert max(ranks.run(4, partial_grads, which)) <= 1e-12


def no_grad_calls() -> float:
    g = torch.Generator().manual_seed(4)
    q, k, v = (ringattn.shard(torch.randn(2, 30, 2, 8, generator=g, dtype=F64)).requires_grad_() for _ in range(3))
    out = ringattn.ring_attention(q, k, v, causal=True, layout="striped", seq_len=29)
    with torch.no_grad():
        a = ringattn.ring_attention(q, k, v, causal=True, layout="striped", seq_len=29)
    with torch.inference_mode():
        b = ringattn.ring_attention(q.detach(), k.detach(), v.detach(), causal=True, layout="striped", seq_len=29)
    assert not a.requires_grad and not b.requires_grad
    out.sum().backward()  # the recorded call still runs its backward ring after the unrecorded ones
    return max(float((out - a).abs().max()), float((out - b).abs().max()))


def test_no_grad_and_inference_mode(ranks):
    assert max(ranks.run(2, no_grad_calls)) == 0.0


def lse_grads(layout: str, causal: bool, window) -> dict:
    """Loss through out and lse, vs. float64 dense autograd (no padding, so every row's lse is finite)."""
    rank, world = comm.group_rank_world()
    g = torch.Generator().manual_seed(5)
    S = 12 * world
    q = torch.randn(2, S, 4, 8, generator=g, dtype=F64)
    k, v = (torch.randn(2, S, 2, 8, generator=g, dtype=F64) for _ in range(2))
    dout = torch.randn(2, S, 4, 8, generator=g, dtype=F64)
    dl = torch.randn(2, 4, S, generator=g, dtype=F64)

    rq, rk, rv = (t.clone().requires_grad_() for t in (q, k, v))
    keep = dense_mask(S, causal=causal, window=window)
    s = torch.einsum("bihd,bjhd->bhij", rq, rk.repeat_interleave(2, 2)) * 8 ** -0.5
    s = s.masked_fill(~keep, float("-inf"))
    rlse = torch.logsumexp(s, -1)
    rout = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), rv.repeat_interleave(2, 2))
    ((rout * dout).sum() + (rlse * dl).sum()).backward()

    xs = [ringattn.shard(t, layout=layout).requires_grad_() for t in (q, k, v)]
    out, lse = ringattn.ring_attention(*xs, causal=causal, window=window, layout=layout, return_lse=True)
    ((out * ringattn.shard(dout, layout=layout)).sum() + (lse * ringattn.shard(dl, layout=layout, dim=2)).sum()
     ).backward()
    return {name: rel_err(x.grad, ringattn.shard(r.grad, layout=layout))
            for name, x, r in zip(("dq", "dk", "dv"), xs, (rq, rk, rv))}


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_gradient_through_lse(ranks, layout):
    for causal, window in ((True, None), (False, (5, 14))):
        for errs in ranks.run(3, lse_grads, layout, causal, window):
            assert max(errs.values()) <= TOL[F64], (layout, causal, window, errs)


# --- both ring directions and the gradient return -----------------------------------------------------

@pytest.mark.parametrize("world,window,steps", [
    (2, (0, 3), (0, -1)),  # on 2 ranks rank + 1 == rank - 1; ties go to the reverse run
    (2, (3, 0), (0, -1)),
    (4, (9, 0), (0, 1, 2)),  # forward only, gradients return from 2 ranks away
    (4, (5, 5), (0, 1, -1)),
    (5, (9, 1), (0, 1, 2, -1)),  # a forward run of 2 and a reverse run of 1: two returns, different peers
    (5, (1, 9), (0, 1, -1, -2)),
])
def test_both_directions_exact(ranks, world, window, steps):
    c = 8
    spec = MaskSpec(seq_len=world * c, window=window)
    assert all(make_plan(spec, "contiguous", r, world, c).steps == steps for r in range(world))
    case = Case(seq_len=world * c, window=window, kv_heads=1, seed=11)
    assert_close(ranks.run(world, run_case, case), case)


def test_plan_is_the_same_on_every_rank_and_covers_every_block():
    rnd = random.Random(0)
    for _ in range(150):
        world = rnd.randint(2, 6)
        layout = rnd.choice(["contiguous", "zigzag", "striped"])
        c = rnd.choice([2, 4, 6])
        n = world * c
        seq_len = rnd.randint(1, n)
        window = rnd.choice([None, (rnd.randint(-1, n), rnd.randint(-1, n))])
        window = None if window == (-1, -1) else window
        cuts = sorted(rnd.sample(range(1, seq_len), min(seq_len - 1, rnd.randint(0, 3)))) if seq_len > 1 else []
        docs = rnd.choice([None, (0, *cuts, seq_len)])
        spec = MaskSpec(seq_len, rnd.random() < 0.5, window, docs)
        plans = [make_plan(spec, layout, r, world, c) for r in range(world)]
        assert len({p.steps for p in plans}) == 1, (spec, layout, world)
        steps = plans[0].steps
        assert len(set(o % world for o in steps)) == len(steps), "an offset is visited twice"
        segs = [segments(layout, r, world, c) for r in range(world)]
        for r in range(world):
            qpos = torch.cat([s.positions() for s in segs[r]])
            for o in range(world):
                kpos = torch.cat([s.positions() for s in segs[(r - o) % world]])
                if spec.visible(qpos[:, None], kpos[None, :]).any():
                    assert any(s % world == o for s in steps), (spec, layout, world, r, o)


def test_random_plan_blocks_reproduce_the_mask():
    """Random segments (any strides, padding, docs, windows): tasks tile exactly the visible pairs."""
    rnd = random.Random(1)
    for _ in range(200):
        seq_len = rnd.randint(1, 60)
        window = rnd.choice([None, (rnd.randint(-1, 20), rnd.randint(-1, 20))])
        cuts = sorted(rnd.sample(range(1, seq_len), min(seq_len - 1, 3))) if seq_len > 3 else []
        spec = MaskSpec(seq_len, rnd.random() < 0.5, None if window == (-1, -1) else window,
                        rnd.choice([None, (0, *cuts, seq_len)]))

        def segs():
            out = []
            for _ in range(rnd.randint(1, 2)):
                out.append(Segment(rnd.randint(0, 50), rnd.randint(0, 17), rnd.choice([1, 1, 2, 3])))
            return tuple(out)

        qsegs, ksegs = segs(), segs()
        qpos = torch.cat([s.positions() for s in qsegs])
        kpos = torch.cat([s.positions() for s in ksegs])
        want = spec.visible(qpos[:, None], kpos[None, :])
        got = torch.zeros_like(want)
        for t in plan_block(spec, qsegs, ksegs, Capabilities(max_dense_tile=rnd.choice([3, 5, 512]))):
            keep = want[t.q0:t.q1, t.k0:t.k1]
            if t.kind is Kind.FULL:
                assert keep.all()
                tile = torch.ones_like(keep)
            elif t.kind is Kind.CAUSAL:
                i = torch.arange(t.q1 - t.q0)[:, None]
                tile = torch.arange(t.k1 - t.k0)[None, :] <= i
                assert torch.equal(keep, tile), (spec, qsegs, ksegs, t)
            else:
                tile = spec.visible(t.qseg.positions()[:, None], t.kseg.positions()[None, :])
                assert torch.equal(tile, keep)
            assert not (got[t.q0:t.q1, t.k0:t.k1] & tile).any(), "tasks overlap"
            got[t.q0:t.q1, t.k0:t.k1] |= tile
        assert torch.equal(got, want), (spec, qsegs, ksegs)


# --- ranks that disagree on recording the call ----------------------------------------------------------

def grad_mode_differs() -> str | None:
    q = torch.randn(1, 8, 2, 8, dtype=F64, requires_grad=True)
    try:
        with torch.set_grad_enabled(dist.get_rank() == 0):
            ringattn.ring_attention(q, q, q)
    except ValueError as e:
        return str(e)
    return None


def test_grad_mode_disagreement_raises_everywhere(ranks):
    # Otherwise rank 0 would enter the backward ring alone and wait out the group's timeout.
    for msg in ranks.run(2, grad_mode_differs):
        assert msg is not None and "disagree" in msg and "grad=" in msg
    case = Case(seq_len=16)
    assert_close(ranks.run(2, run_case, case), case)


def test_schema_check_catches_a_wrong_argument_order():
    schema = torch.ops.aten._efficient_attention_backward.default._schema
    t = torch.empty(1)
    good = (t, t, t, t, None, t, None, None, 4, 4, t, 0.0, t, t, 0, False)
    check_against_schema(schema, good, {"scale": 0.1})
    swapped = good[:8] + (t, 4) + good[10:]  # max_seqlen_q and ... logsumexp out of place
    with pytest.raises(AssertionError):
        check_against_schema(schema, swapped, {})
    with pytest.raises(AssertionError):
        check_against_schema(schema, good, {"softmax_scale": 0.1})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_self_check_problem(monkeypatch, dtype):
    """The run-time self-check's problem passes with correct ops (every task kind, both kernels) and a
    wrong op fails it, with a warning and the reference backend as the answer."""
    from ringattn import kernels

    ops = FakeCudaOps().install(monkeypatch)
    for d, dv in ((64, 64), (64, 32)):
        assert kernels._disagreement(kernels.BACKENDS["cuda-flash"], "cpu", dtype, d, dv) is None
    assert ops.calls["efficient_fwd"] and (ops.calls["flash_fwd"] > 0) == (dtype != torch.float32)
    op = "_efficient_attention_forward" if dtype == torch.float32 else "_flash_attention_forward"
    real = getattr(torch.ops.aten, op)

    def off_by_a_bit(*args, **kwargs):
        res = real(*args, **kwargs)
        return (res[0] * 1.1, *res[1:])

    monkeypatch.setattr(torch.ops.aten, op, off_by_a_bit)
    with pytest.warns(UserWarning, match="failed its self-check"):
        assert not kernels._self_check.__wrapped__("cuda-flash", "cpu", dtype, 64, 64)
