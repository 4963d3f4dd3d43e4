"""ringattn.mixers.causal_conv1d against torch's depthwise conv1d (left padding k - 1) over the whole
sequence, each document on its own, float64, forward and gradients of x, weight and bias: every layout,
odd lengths, documents, batch 2, k in {2, 4, 7} (k > W: striped halos span several ranks)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from ringattn import mixers
from tests.test_state_passing import B, _rank_world, case_positions, cases, per_row

C = 3
KS = (2, 4, 7)


def reference(x, w, bias, rows_bounds):
    out = []
    for b, bounds in enumerate(rows_bounds):
        ys = []
        for s, e in zip(bounds, bounds[1:]):
            seg = x[b:b + 1, s:e].transpose(1, 2)
            ys.append(F.conv1d(F.pad(seg, (w.shape[-1] - 1, 0)), w[:, None], bias, groups=C).transpose(1, 2))
        out.append(torch.cat(ys, 1))
    return torch.cat(out, 0)


@functools.cache
def expected():
    out = []
    for i, (_, _, n, cu) in enumerate(cases()):
        for k in KS:
            g = torch.Generator().manual_seed(10 * i + k)
            x = torch.randn(B, n, C, generator=g, dtype=torch.float64, requires_grad=True)
            w = torch.randn(C, k, generator=g, dtype=torch.float64, requires_grad=True)
            bias = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
            bounds = [list(r) + ([n] if r[-1] < n else []) if r is not None else [0, n] for r in per_row(cu)]
            ref = reference(x, w, bias, bounds)
            gy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
            grads = torch.autograd.grad((ref * gy).sum(), (x, w, bias))
            out.append((i, k, x.detach(), w.detach(), bias.detach(), gy, ref.detach(), grads))
    return out


def rank_check(expect):
    import torch.distributed as dist

    rank, world = _rank_world()
    worst = 0.0
    for i, k, x, w, bias, gy, ref, (gx, gw, gb) in expect:
        layout, uneven, n, cu = cases()[i]
        _, pos = case_positions(layout, uneven, n, cu, world, rank)

        def mine(t, pos=pos):
            return torch.stack([t[b].index_select(0, pos[b]) for b in range(B)])

        xl = mine(x).requires_grad_()
        wl, bl = w.clone().requires_grad_(), bias.clone().requires_grad_()
        plan = mixers.fragments(pos.shape[1], layout=layout, cu_seqlens=cu, uneven=uneven,
                                seq_len=n if uneven else None, batch=B)
        y = mixers.causal_conv1d(xl, wl, bl, plan=plan)
        err = (y - mine(ref)).abs().max().item()
        dx, dw, db = torch.autograd.grad((y * mine(gy)).sum(), (xl, wl, bl))
        if world > 1:  # each rank holds its tokens' part of the weight gradient
            dist.all_reduce(dw)
            dist.all_reduce(db)
        err = max(err, (dx - mine(gx)).abs().max().item(), (dw - gw).abs().max().item(),
                  (db - gb).abs().max().item())
        assert err < 1e-11, f"{layout} uneven={uneven} n={n} cu={cu} k={k} W={world}: max error {err}"
        worst = max(worst, err)
    return worst


def test_one_process():
    assert rank_check(expected()) < 1e-11


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks(ranks, world):
    assert max(ranks.run(world, rank_check, expected())) < 1e-11
