"""The demo model's next-token loss over a sequence split across ranks.

The labels are shifted on the whole sequence and sharded like the inputs, and the loss is each rank's
token losses over the global count of labels: ``ringattn.training`` holds those framework-neutral
pieces (re-exported here), this module applies them to the model's hidden states and head, with the
blockwise (``chunk``) head that never holds the whole ``(tokens x vocab)`` logits at once.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint as ckpt

from ...training.batch import IGNORE_INDEX, count_labels, shard_batch, sharded_labels, shift_labels
from ...training.grads import sum_gradients
from ...training.loss import local_loss_sum

__all__ = ["IGNORE_INDEX", "count_labels", "loss_sum", "shard_batch", "sharded_labels", "sharded_loss",
           "shift_labels", "sum_gradients"]


def _loss_sum(head, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return local_loss_sum(head(h), labels)


def loss_sum(head, h: torch.Tensor, labels: torch.Tensor, *, chunk: int = 0) -> torch.Tensor:
    """Sum of token cross-entropies of ``head(h)`` against ``labels`` (``IGNORE_INDEX`` skipped).

    ``chunk`` > 0 computes logits ``chunk`` tokens at a time and recomputes them in backward, so the
    ``(tokens x vocab)`` logits of the whole local sequence never exist at once (blockwise loss).
    """
    if not chunk or h.shape[1] <= chunk or not torch.is_grad_enabled():
        return _loss_sum(head, h, labels)
    total = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    for hc, lc in zip(h.split(chunk, dim=1), labels.split(chunk, dim=1)):
        total = total + ckpt.checkpoint(_loss_sum, head, hc, lc, use_reentrant=False)
    return total


def sharded_loss(model, tokens: torch.Tensor, labels: torch.Tensor, *, n_labels: int, group=None, mesh=None,
                 seq_len: int | None = None, chunk: int = 0) -> torch.Tensor:
    """This rank's share of the global mean next-token loss: ``sum of local token losses / n_labels``.

    ``tokens`` and ``labels`` are this rank's shards (``shard_batch``); ``n_labels`` the valid labels
    over all ranks (``count_labels``). Summing the result, and the parameter gradients, over every rank
    gives the single-process loss and gradient.
    """
    if n_labels < 1:
        raise ValueError(f"n_labels must be >= 1 (valid labels over all ranks), got {n_labels}")
    h = model.hidden(tokens, group=group, mesh=mesh, seq_len=seq_len)
    return loss_sum(model.logits, h, labels, chunk=chunk) / n_labels
