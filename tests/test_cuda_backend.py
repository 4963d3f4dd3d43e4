"""The CUDA backend's lowering, call convention and lse conventions, checked on CPU.

The four aten ops it calls are replaced by stand-ins (tests/fake_cuda.py) that compute with the reference
kernel, return what the real ops return (layouts, lse shapes, empty-row values) and assert what they
require (the op schemas, BSHD, no GQA for efficient attention, bias alignment): every task kind, dtype and
head-dim combination the backend serves goes through them and is compared with float64.
"""

from __future__ import annotations

import collections
import math
import random
import zlib

import pytest
import torch

from ringattn.kernels import BACKENDS, acc_dtype, retiled
from ringattn.kernels import cuda as cuda_mod
from ringattn.kernels.block import GradAccumulator, OutLseAccumulator, run_backward, run_forward
from ringattn.kernels.cuda import CudaFlashBackend
from ringattn.kernels.lse import LseKernel, from_kernel, to_kernel
from ringattn.masks import Kind, MaskSpec, Segment, Task
from ringattn.tasks import block_tasks

from .cases import Case, assert_close, run_case
from .fake_cuda import FakeCudaOps, check_against_schema
from .reference import TOL, rel_err

F64 = torch.float64


def _cuda_vs_reference(cuda, dtype, spec: MaskSpec, qsegs, ksegs, q, k, v, dout) -> dict[str, float]:
    """One block pair planned for each backend and run by it (out/lse merged over its tasks, grads summed),
    compared with the reference backend's result on the same inputs in float64."""
    def run(backend, dtype):
        xs = [t.to(dtype) for t in (q, k, v, dout)]
        tasks = block_tasks(spec, qsegs, ksegs, backend.caps)
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
        kinds.update(t.kind for t in block_tasks(spec, qsegs, ksegs, cuda.caps))
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
