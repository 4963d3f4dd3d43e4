"""The next-token loss over ranks: each rank's token losses summed locally, divided by the global count.

The single-process loss is the mean over every scored label of the global batch. Each rank's share is
``sum of its token losses / N`` with ``N`` the scored labels over *all* ranks; the sum over ranks of the
shares is the global loss, and the sum over ranks of the parameter gradients is exactly its gradient
(``training.grads.sum_gradients``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import comm
from .batch import IGNORE_INDEX


def local_loss_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """This rank's summed next-token cross-entropy (in at least float32, as transformers computes it)."""
    flat = logits.flatten(0, 1)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return F.cross_entropy(flat, labels.flatten().to(flat.device), ignore_index=ignore_index, reduction="sum")


class AllReduceValue(torch.autograd.Function):
    """Sum over ranks in forward; identity in backward (each rank's gradient is its own part)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        if comm.group_rank_world(group)[1] > 1:
            dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        return g, None


def mean_over_ranks(local_sum: torch.Tensor, labels: torch.Tensor, n_labels=None, *, group=None,
                    ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The global mean loss, equal on every rank, from this rank's ``local_sum`` over its ``labels``.

    ``n_labels`` is the scored labels over all ranks; None counts them (one extra all-reduce). The
    gradient is this rank's share only: sum parameter gradients over the ranks after ``backward``.
    """
    if n_labels is None:
        n = (labels != ignore_index).sum().to(local_sum)
        n_labels = AllReduceValue.apply(n, group).detach()
    return AllReduceValue.apply(local_sum / n_labels, group)
