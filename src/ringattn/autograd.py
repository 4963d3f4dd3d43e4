"""The one autograd Function every strategy's attention runs under.

Only q, k, v, out and lse (O(local_len)) are saved; the backward recomputes block by block. ``dlse`` is
None unless a gradient really flows into the returned lse (most callers drop lse), so backends that cannot
take one are used whenever possible.
"""

from __future__ import annotations

import torch


class SavedAttention(torch.autograd.Function):
    """``(out, lse) = fwd(q, k, v, call)``; backward calls ``bwd(dout, q, k, v, out, lse, call, dlse)``."""

    @staticmethod
    def forward(ctx, q, k, v, fwd, bwd, call):
        out, lse = fwd(q, k, v, call)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bwd, ctx.call = bwd, call
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None and not bool((dlse != 0).any()):
            dlse = None
        dq, dk, dv = ctx.bwd(dout, q, k, v, out, lse, ctx.call, dlse)
        return dq, dk, dv, None, None, None
