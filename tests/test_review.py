"""Regression tests from a review of the core (masks, kernels, ring, comm, validate).

Each test pins a corner that the main suites did not reach: odd tensor strides, the CUDA backend's call
convention (checked on CPU with stand-in ops), partial ``requires_grad``, no-grad calls, gradients
through the returned lse, both ring directions with their gradient return, plan consistency across
ranks, and ranks that disagree on whether autograd records the call.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

import ringattn
from ringattn import comm
from ringattn.kernels import BACKENDS, Capabilities
from ringattn.kernels.cuda import CudaFlashBackend
from ringattn.layouts import segments
from ringattn.masks import Kind, MaskSpec, Segment
from ringattn.schedule import make_plan
from ringattn.tasks import plan_block

from .cases import Case, assert_close, run_case
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

def _fake_flash_forward(q, k, v, dropout_p, is_causal, return_debug_mask, *, scale=None):
    o, lse = BACKENDS["reference"].forward_dense(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           scale=scale, causal=is_causal, mask=None)
    # As the real op: cum_seq_q/k are undefined (None) for a dense (non-varlen) call.
    return o.transpose(1, 2), lse, None, None, q.shape[2], k.shape[2], None, None, None


def _fake_flash_backward(dout, q, k, v, out, lse, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                         philox_seed, philox_offset, *, scale=None):
    if cum_seq_q is not None or cum_seq_k is not None:
        raise RuntimeError("a defined cum_seq_q selects the varlen backward (q must be (total, h, d))")
    for x in (dout, q, k, v, out):
        assert x.stride(-1) == 1, "the fused op needs a unit last stride"
    t = [x.transpose(1, 2) for x in (dout, q, k, v, out)]
    grads = BACKENDS["reference"].backward_dense(t[0], t[1], t[2], t[3], t[4], lse, scale=scale, causal=is_causal,
                                           mask=None)
    return tuple(x.transpose(1, 2) for x in grads)


def test_cuda_backend_call_convention(monkeypatch):
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention", _fake_flash_forward)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_backward", _fake_flash_backward)
    cuda, ref = CudaFlashBackend(), BACKENDS["reference"]
    g = torch.Generator().manual_seed(1)
    q = _last_stride_2(torch.randn(1, 16, 4, 8, generator=g, dtype=F64))
    k, v = (torch.randn(1, 16, 2, 8, generator=g, dtype=F64) for _ in range(2))
    dout = torch.randn(1, 16, 4, 8, generator=g, dtype=F64)
    for causal in (False, True):
        o, lse = cuda.forward_dense(q, k, v, scale=0.25, causal=causal, mask=None)
        ro, rl = ref.forward_dense(q, k, v, scale=0.25, causal=causal, mask=None)
        grads = cuda.backward_dense(dout, q, k, v, ro, rl, scale=0.25, causal=causal, mask=None)
        rgrads = ref.backward_dense(dout, q, k, v, ro, rl, scale=0.25, causal=causal, mask=None)
        for x, y in zip((o, lse, *grads), (ro, rl, *rgrads)):
            assert rel_err(x, y) <= 1e-6  # the backend hands back lse in float32


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
