"""Autograd across the ring: partial ``requires_grad``, no-grad and inference-mode calls, gradients
through the returned lse, both ring directions with their gradient return, and ranks that disagree on
whether autograd records the call."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import ringattn
from ringattn import comm
from ringattn.masks import MaskSpec
from ringattn.schedule import make_schedule

from .cases import Case, assert_close, run_case
from .reference import TOL, dense_mask, rel_err

F64 = torch.float64


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
    assert make_schedule(MaskSpec(48, window=(5, 5)), "contiguous", 0, 4, 12).steps == (0, 1, -1)
    assert max(ranks.run(4, partial_grads, which)) <= 1e-12


def no_grad_calls() -> float:
    g = torch.Generator().manual_seed(4)
    q, k, v = (ringattn.shard(torch.randn(2, 30, 2, 8, generator=g, dtype=F64), layout="striped").requires_grad_()
               for _ in range(3))
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
    assert all(make_schedule(spec, "contiguous", r, world, c).steps == steps for r in range(world))
    case = Case(seq_len=world * c, window=window, kv_heads=1, seed=11)
    assert_close(ranks.run(world, run_case, case), case)


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


# --- a gradient into lse on some ranks only ---------------------------------------------------------------

def lse_grad_on_rank0(direct: bool) -> dict:
    """Only rank 0's loss reads lse (so only its backward sees a nonzero dlse), with a backend whose
    backward key tiles are small: every rank must still cut the visiting blocks into the same tiles."""
    from ringattn.kernels import BACKENDS, retiled

    rank, world = comm.group_rank_world()
    g = torch.Generator().manual_seed(6)
    S = 16 * world
    q = torch.randn(1, S, 4, 8, generator=g, dtype=F64)
    k, v = (torch.randn(1, S, 2, 8, generator=g, dtype=F64) for _ in range(2))
    dout = torch.randn(1, S, 4, 8, generator=g, dtype=F64)
    dl = torch.randn(1, 4, S, generator=g, dtype=F64)
    dl[:, :, S // world:] = 0  # the reference's lse gradient lives on rank 0's rows only

    rq, rk, rv = (t.clone().requires_grad_() for t in (q, k, v))
    s = torch.einsum("bihd,bjhd->bhij", rq, rk.repeat_interleave(2, 2)) * 8 ** -0.5
    rlse = torch.logsumexp(s, -1)
    rout = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), rv.repeat_interleave(2, 2))
    ((rout * dout).sum() + (rlse * dl).sum()).backward()

    xs = [ringattn.shard(t).requires_grad_() for t in (q, k, v)]
    out, lse = ringattn.ring_attention(*xs, return_lse=True, backend=retiled(BACKENDS["cpu-flash"], backward_tile=4),
                                       backward_exchange="direct" if direct else "ring")
    loss = (out * ringattn.shard(dout)).sum()
    if rank == 0:
        loss = loss + (lse * ringattn.shard(dl, dim=2)).sum()
    loss.backward()
    return {name: rel_err(x.grad, ringattn.shard(r.grad)) for name, x, r in zip(("dq", "dk", "dv"), xs, (rq, rk, rv))}


@pytest.mark.parametrize("world,direct", [(2, False), (3, True)])
def test_lse_gradient_on_some_ranks_only(ranks, world, direct):
    for errs in ranks.run(world, lse_grad_on_rank0, direct, timeout=90):
        assert max(errs.values()) <= TOL[F64], errs
