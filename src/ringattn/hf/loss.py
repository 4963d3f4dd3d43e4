"""The loss of a sharded batch (``causal_lm_loss``), the guard on a ring model's own loss, and
``sync_gradients``."""

from __future__ import annotations

import functools
import zlib

import torch

from .. import comm
from ..training.batch import IGNORE_INDEX
from ..training.grads import sum_gradients
from ..training.loss import local_loss_sum, mean_over_ranks
from ..validate import agree
from .registry import SETTINGS, RingSettings


def causal_lm_loss(logits: torch.Tensor, shift_labels: torch.Tensor, num_items_in_batch: int | None = None,
                   *, group=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The global mean next-token loss of a sharded batch, on every rank.

    Args:
        logits: ``(batch, local_len, vocab)`` this rank's logits.
        shift_labels: ``(batch, local_len)`` from ``shard_batch`` (already shifted across shards).
        num_items_in_batch: the global number of scored tokens (``shard_batch`` gives it); None = sum
            over ranks (one extra all-reduce).

    Returns:
        A scalar equal on every rank to the single-process ``CrossEntropy`` mean. Its gradient is this
        rank's share only, so after ``backward`` sum parameter gradients over ranks (``sync_gradients``).
    """
    if logits.dim() != 3 or tuple(shift_labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"logits (batch, local_len, vocab) and shift_labels (batch, local_len) must match, "
                         f"got {tuple(logits.shape)} and {tuple(shift_labels.shape)}")
    local = local_loss_sum(logits, shift_labels, ignore_index)
    return mean_over_ranks(local, shift_labels, num_items_in_batch, group=group, ignore_index=ignore_index)


def guard_model_loss() -> None:
    """Make a ring model's own loss (``model(..., labels=...)``) right or refused: transformers' causal-LM loss
    shifts ``labels`` inside the tensor it is given, which under context parallelism is each rank's shard, so every
    shard's last token would be scored against nothing and the next shard's first token never (and the mean would
    be per shard). With ``shift_labels`` (shifted on the whole sequence, as ``shard_batch`` returns them) the loss is
    ``causal_lm_loss``: the global mean on every rank; without, on more than one rank, it is refused.

    ``PreTrainedModel.loss_function`` is the one place transformers' causal LMs get their loss from; the property
    is wrapped once, and changes nothing for models that do not use a registered ring implementation."""
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING

    prop = PreTrainedModel.__dict__.get("loss_function")
    if isinstance(prop, _GuardedLoss) or not isinstance(prop, property):
        return

    def loss_function(model):
        fn = prop.fget(model)
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        settings = SETTINGS.get(impl) if isinstance(impl, str) else None
        if settings is None or fn is not LOSS_MAPPING.get("ForCausalLM"):
            return fn
        return functools.partial(_model_causal_lm_loss, fn, settings)

    PreTrainedModel.loss_function = _GuardedLoss(loss_function, prop.fset, None, prop.__doc__)


class _GuardedLoss(property):
    """``PreTrainedModel.loss_function`` once ``guard_model_loss`` wrapped it (so it is wrapped once)."""


def _model_causal_lm_loss(original, settings: RingSettings, logits, labels, vocab_size: int,
                          num_items_in_batch=None, ignore_index: int = IGNORE_INDEX, shift_labels=None, **kwargs):
    if shift_labels is None:
        if comm.group_rank_world(settings.group)[1] == 1:
            return original(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                            ignore_index=ignore_index, **kwargs)
        raise ValueError("model(..., labels=...) with attn_implementation='ring' on more than one rank would shift "
                         "the labels inside each rank's shard (every shard's last token scored against nothing, "
                         "the next shard's first token never): pass shift_labels=batch['shift_labels'] and "
                         "num_items_in_batch=batch['num_items_in_batch'] from ringattn.hf.shard_batch along with "
                         "labels, or compute ringattn.hf.causal_lm_loss(logits, batch['shift_labels'], "
                         "batch['num_items_in_batch']) from the logits")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(logits.device)
    return causal_lm_loss(logits, shift_labels, num_items_in_batch, group=settings.group, ignore_index=ignore_index)


def sync_gradients(model: torch.nn.Module, *, group=None) -> None:
    """Sum every parameter's ``.grad`` over the ranks of ``group`` (the ranks hold partial gradients of one
    sequence). Parameters without a gradient on some rank are treated as zero there, so all ranks agree."""
    _, world = comm.group_rank_world(group)
    if world == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    # A description check first, so ranks holding different models raise instead of mis-summing.
    desc = ";".join(f"{tuple(p.shape)}{p.dtype}" for p in params)
    agree(f"sync_gradients {zlib.crc32(desc.encode())}", None, group, params[0].device)
    sum_gradients(model, group=group)
