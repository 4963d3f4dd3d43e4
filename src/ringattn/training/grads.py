"""Gradients of a context-parallel step: each rank holds a part, their sum over the group is the gradient."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import comm


def sum_gradients(model: torch.nn.Module, *, group=None, with_value: torch.Tensor | None = None
                  ) -> torch.Tensor | None:
    """Sum every parameter's ``.grad`` over the ranks of ``group``: the ranks hold partial gradients.

    A parameter without a gradient counts as zero (and gets one), so every rank ends with the same
    gradients. One all-reduce per parameter dtype; ``with_value`` (a scalar such as the loss) rides
    along in the first and its sum is returned.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    _, world = comm.group_rank_world(group)
    value = None if with_value is None else with_value.detach().reshape(1)
    for i, dtype in enumerate(sorted({p.dtype for p in params}, key=str)):
        ps = [p for p in params if p.dtype == dtype]
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
        if i == 0 and value is not None:
            parts.append(value.to(dtype))
        flat = torch.cat(parts)
        if world > 1:
            try:
                dist.all_reduce(flat, group=group)
            except RuntimeError as e:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
                raise comm.PeerError(f"ringattn: the gradient all-reduce failed; a peer rank probably died or "
                                     f"timed out: {comm.first_line(e)}") from e
        off = 0
        for p in ps:
            g = flat[off:off + p.numel()].view_as(p)
            off += p.numel()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        if i == 0 and value is not None:
            value = flat[-1]
    if value is not None and not params:
        if world > 1:
            dist.all_reduce(value, group=group)
        value = value[0]
    return value
