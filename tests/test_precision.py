"""Precision against torch's dense SDPA in the same dtype: ringattn may not be less exact than it.

Both are measured against the float64 dense reference, as the largest error relative to the reference's
largest magnitude. The dense baseline expands kv heads before SDPA (autograd sums a group's gradients
in float32); SDPA's own ``enable_gqa`` is less exact in half precision and would be a weaker bar.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .cases import DTYPES, Case, ref_with_grads, run_case
from .reference import dense_mask

RATIO = 1.25
FLOOR = {torch.float64: 1e-14, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def dense_errors(case: Case) -> dict:
    """Errors of single-process dense SDPA in the case's dtype, with the inputs ``run_case`` builds."""
    dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(case.seed)
    S, b, h, kvh, d = case.seq_len, case.batch, case.heads, case.kv_heads, case.head_dim
    q, k, v, do = (torch.randn(b, S, n, d, generator=g, dtype=torch.float64).to(dtype) for n in (h, kvh, kvh, h))
    r_out, r_lse, r_dq, r_dk, r_dv = ref_with_grads(q, k, v, do, dense_mask(S, causal=case.causal))
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    kr, vr = (t.repeat_interleave(h // kvh, dim=2) for t in (ks, vs))
    out = F.scaled_dot_product_attention(qs.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2),
                                         is_causal=case.causal).transpose(1, 2)
    (out.double() * do.double()).sum().backward()
    # SDPA returns no lse; the fused CPU op it dispatches to does.
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), kr.detach().transpose(1, 2), vr.detach().transpose(1, 2), 0.0, case.causal)[:2]

    def err(x, ref):
        return float((x.detach().double() - ref).abs().max() / ref.abs().max())

    return {"out": err(out, r_out), "lse": err(lse, r_lse), "dq": err(qs.grad, r_dq), "dk": err(ks.grad, r_dk),
            "dv": err(vs.grad, r_dv)}


HEADS = [(8, 8), (8, 4), (8, 2), (8, 1), (16, 2)]
FAST = {("bfloat16", 8, 8), ("bfloat16", 8, 2), ("bfloat16", 8, 1), ("bfloat16", 16, 2), ("float16", 8, 1),
        ("float32", 8, 1)}
GRID = [pytest.param(dt, h, kvh, marks=() if (dt, h, kvh) in FAST else pytest.mark.slow)
        for dt in ("bfloat16", "float16", "float32", "float64") for h, kvh in HEADS]


@pytest.mark.parametrize("dtype,heads,kv_heads", GRID)
def test_not_less_exact_than_dense_sdpa(ranks, dtype, heads, kv_heads):
    case = Case(seq_len=256, heads=heads, kv_heads=kv_heads, head_dim=32, batch=1, dtype=dtype, causal=True,
                layout="zigzag", seed=1)
    dense = dense_errors(case)
    floor = FLOOR[DTYPES[dtype]]
    bad = {}
    for world in (1, 2, 4):
        results = ranks.run(world, run_case, case)
        for name in dense:
            mine = max(r[name] for r in results)
            if mine > RATIO * max(dense[name], floor):
                bad[f"{world} ranks {name}"] = (mine, dense[name])
    assert not bad, f"{heads}/{kv_heads} heads, {dtype}: (ringattn, dense SDPA) errors: {bad}"
