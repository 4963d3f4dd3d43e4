"""Kernel calls with unusual inputs: tensors of any strides through every backend and the ring, and the
CUDA backend's call convention to torch's fused flash op (checked on CPU with stand-in ops)."""

from __future__ import annotations

import pytest
import torch

import ringattn
from ringattn.kernels import BACKENDS

from .reference import rel_err

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
