"""The one autograd Function every strategy's attention runs under.

Only q, k, v, out and lse (O(local_len)) are saved; the backward recomputes block by block. ``dlse`` is
None unless a gradient really flows into the returned lse (most callers drop lse), so backends that cannot
take one are used whenever possible.

Attention sinks (one extra logit ``sink_h`` per head in every row's denominator) are merged into the
finished rows here, and the merged ``(out, lse)`` are what is saved: the FlashAttention-2 backward with
the final rows' out and lse (D = rowsum(dO * O), P = exp(S - lse)) is then exactly the backward of
attention with sinks, so no kernel knows about them. The sink's own gradient is
``d sink_h = sum over rows of exp(sink_h - lse) * (dlse - D)``.
"""

from __future__ import annotations

import torch

from .comm import exclusive
from .scores import merge_sinks


class SavedAttention(torch.autograd.Function):
    """``(out, lse) = fwd(q, k, v, call)`` (then merged with ``sinks``, ``(heads,)`` or None); backward
    calls ``bwd(dout, q, k, v, out, lse, call, dlse)``."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, fwd, bwd, call):
        out, lse = fwd(q, k, v, call)
        if sinks is not None:
            out, lse = merge_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.bwd, ctx.call = bwd, call
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None and not bool((dlse != 0).any()):
            dlse = None
        # The backward communicates on the call's group too: one thread at a time (comm.exclusive).
        with exclusive(ctx.call.group if hasattr(ctx.call, "group") else ()):
            dq, dk, dv = ctx.bwd(dout, q, k, v, out, lse, ctx.call, dlse)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            dsinks = _sink_grad(dout, out, lse, sinks, dlse)
        return dq, dk, dv, dsinks, None, None, None


def _sink_grad(dout, out, lse, sinks, dlse) -> torch.Tensor:
    acc = lse.dtype
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # (b, h, n)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    p_sink = torch.exp(sinks.detach().to(acc)[None, :, None] - lse)
    return -(p_sink * delta).sum((0, 2)).to(sinks.dtype)
