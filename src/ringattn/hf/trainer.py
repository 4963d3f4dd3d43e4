"""transformers' ``Trainer`` with context parallelism: ``attn_implementation="ring"`` under torchrun.

The ranks form ``dp`` rows of ``cp`` consecutive ranks; the ``cp`` ranks of a row hold the shards of the same
sequences. Trainer and accelerate do everything else as in plain data-parallel training:

- **data**: accelerate's sampler shards the dataset over the ``dp`` rows instead of over every rank (the ranks of
  a row read the same batches), and each batch is sharded by ``ringattn.hf.shard_batch`` in
  ``Trainer._prepare_context_parallel_inputs``, the hook Trainer runs at the start of every training step for
  its own context parallelism: labels shifted on the whole sequence, then split.
- **loss**: each rank's loss is its own tokens' cross-entropy sum divided by Trainer's ``num_items_in_batch``,
  the scored tokens of the whole accumulated batch counted over every rank (``average_tokens_across_devices``)
  and divided by ``get_cp_size()`` as Trainer does for torch's context parallelism, since every rank of a row
  counts the same full rows. Trainer then multiplies the loss by the number of processes.
- **gradients**: accelerate's DDP averages over every rank; with the loss above that average is the sum of
  every rank's part, i.e. the gradient of the global token mean: summed over the context ranks and weighted by
  tokens over the data-parallel rows, as one process with the whole batch would have it. Gradient
  accumulation (DDP's ``no_sync``), clipping and the logged loss and gradient norm are Trainer's own.

Usage, on every rank (``torchrun --nproc-per-node 4 train.py``, or ``ringattn.launch.spawn``)::

    cp = ringattn.hf.setup_context_parallel(cp_size=2, layout="zigzag")   # before TrainingArguments
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="ring")
    trainer = ringattn.hf.RingTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..training.batch import IGNORE_INDEX
from ..training.loss import local_loss_sum

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("ringattn.hf.trainer needs transformers and accelerate: pip install 'ringattn[hf]'") from e

__all__ = ["ContextParallel", "RingTrainer", "setup_context_parallel"]


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in the ``dp x cp`` grid: ``group`` is its context-parallel group (``cp`` consecutive
    ranks), ``dp_rank`` the index of its row."""

    group: object
    cp: int
    dp: int
    dp_rank: int
    layout: str
    name: str


_GROUPS: dict[tuple[int, int], object] = {}


def setup_context_parallel(cp_size: int | None = None, *, layout: str = "zigzag", name: str = "ring",
                           strategy: str = "ring") -> ContextParallel:
    """Split the ranks into ``world // cp_size`` rows of ``cp_size`` consecutive ranks and register
    ``attn_implementation=name`` on this rank's row. Call it on every rank, after ``init_process_group`` (or
    let it call ``ringattn.launch.init_from_env`` under torchrun) and before building ``TrainingArguments``.

    Args:
        cp_size: ranks per context-parallel group; None = every rank (no data parallelism). Must divide the
            world size.
        layout, strategy, name: as for ``ringattn.hf.register``.

    The context-parallel groups are new process groups (also when ``cp_size`` is the world size), so the ring's
    messages never interleave with the gradient all-reduce DDP runs on the default group during backward.
    Where the group was started without torchrun's variables (``ringattn.launch.spawn``), ``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` are set from it, which is how accelerate finds it.
    """
    from .interface import register

    if not dist.is_initialized():
        from ..training import launch

        if not launch.under_torchrun():
            raise RuntimeError("setup_context_parallel needs torch.distributed: run under torchrun, or in "
                               "ringattn.launch.spawn, or call init_process_group first")
        launch.init_from_env()
    world, rank = dist.get_world_size(), dist.get_rank()
    cp = world if cp_size is None else int(cp_size)
    if cp < 1 or world % cp:
        raise ValueError(f"cp_size must divide the number of ranks ({world}), got {cp_size}")
    for key, value in (("WORLD_SIZE", world), ("RANK", rank), ("LOCAL_RANK", rank), ("LOCAL_WORLD_SIZE", world)):
        os.environ.setdefault(key, str(value))
    if int(os.environ["WORLD_SIZE"]) != world or int(os.environ["RANK"]) != rank:
        raise RuntimeError(f"WORLD_SIZE / RANK in the environment ({os.environ['WORLD_SIZE']} / "
                           f"{os.environ['RANK']}) are not the process group's ({world} / {rank})")
    key = (world, cp)
    if key not in _GROUPS:  # every rank asks for the same sizes in the same order, so the cache agrees
        _GROUPS[key] = dist.new_subgroups(group_size=cp)[0]
    group = _GROUPS[key]
    register(group=group, layout=layout, strategy=strategy, name=name)
    return ContextParallel(group, cp, world // cp, rank // cp, layout, name)


def _grid(group) -> tuple[int, int, int]:
    """(cp, dp, dp_rank) of a registered group, which must be ``cp`` consecutive ranks (a row of the grid)."""
    if not dist.is_initialized():
        return 1, 1, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    ranks = sorted(dist.get_process_group_ranks(group)) if group is not None else list(range(world))
    cp = len(ranks)
    if world % cp or ranks != list(range(ranks[0], ranks[0] + cp)) or ranks[0] % cp:
        raise ValueError(f"RingTrainer needs context-parallel groups of consecutive ranks, one row of a dp x cp grid "
                         f"(ringattn.hf.setup_context_parallel makes them); rank {rank}'s group is {ranks}")
    return cp, world // cp, rank // cp


class RingTrainer(Trainer):
    """``transformers.Trainer`` for a model with a registered ring attention (``attn_implementation="ring"``):
    context parallelism over the registered group, data parallelism over the rows of such groups.

    Takes every ``Trainer`` argument. The model's ``config._attn_implementation`` names the ``ringattn.hf.register``
    settings (group and layout) that the batches are sharded by. Batches are what a causal-LM collator gives:
    ``input_ids`` and ``labels`` (unshifted, ``-100`` not scored; ``DataCollatorForLanguageModeling(mlm=False)``),
    optionally ``position_ids`` (packed documents) and a right-padding ``attention_mask``, which is dropped
    (under the causal mask no real token sees the padding; give padding label ``-100``, as that collator does).
    Left padding is refused.

    Needs ``average_tokens_across_devices=True`` (Trainer's default) on more than one rank: the loss is normalised
    by the scored tokens of every rank. The loss is computed from the logits in the logits' dtype (at least
    float32), not by the model's ``loss_function``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from .registry import settings

        impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        try:
            self.ring = settings(impl)
        except (KeyError, TypeError):
            raise ValueError(f"RingTrainer needs a model with a registered ring attention (ringattn.hf.register or "
                             f"setup_context_parallel, then attn_implementation='ring'); the model's is "
                             f"{impl!r}") from None
        for name in ("fsdp", "deepspeed"):
            if getattr(self, f"is_{name}_enabled", False):
                # their gradient reduction and parameter sharding are not the DDP mean the loss is scaled for
                raise ValueError(f"RingTrainer with Trainer's {name} is not supported yet: for FSDP2 x context "
                                 "parallelism use ringattn.fsdp in a training loop of your own")
        self.cp_size, self.dp_size, self.dp_rank = _grid(self.ring.group)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if self.accelerator.num_processes != world:
            raise RuntimeError(f"accelerate sees {self.accelerator.num_processes} processes but the process group has "
                               f"{world}: call ringattn.hf.setup_context_parallel before building TrainingArguments")
        if world > 1 and not self.args.average_tokens_across_devices:
            raise ValueError("RingTrainer needs TrainingArguments(average_tokens_across_devices=True): each rank "
                             "holds part of every sequence, so the loss is normalised by every rank's tokens")
        # The count Trainer makes for num_items_in_batch: labels[..., 1:] of the full rows, for every model, and always
        # made, since compute_loss below uses it whatever the model's forward accepts.
        self._loss_shifts_labels = True
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    def get_cp_size(self) -> int:
        """The context-parallel group's size: Trainer divides its token count and its data-parallel world by it."""
        return self.cp_size

    def _get_dataloader(self, *args, **kwargs):
        return self._by_row(super()._get_dataloader(*args, **kwargs))

    def _by_row(self, loader):
        """Hand out batches per data-parallel row: the ranks of a row must read the same ones."""
        if self.accelerator.num_processes == 1:
            return loader
        from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher, IterableDatasetShard

        if isinstance(loader, DataLoaderDispatcher):
            raise ValueError("RingTrainer does not take accelerate's dispatched batches: pass "
                             "TrainingArguments(accelerator_config={'dispatch_batches': False})")
        shards = [s for s in (getattr(loader, "batch_sampler", None), getattr(loader, "dataset", None))
                  if isinstance(s, (BatchSamplerShard, IterableDatasetShard))]
        if not shards:
            raise ValueError(f"RingTrainer cannot hand out this data loader's batches by data-parallel row "
                             f"({type(loader).__name__})")
        for s in shards:
            s.num_processes, s.process_index = self.dp_size, self.dp_rank
        return loader

    def _prepare_context_parallel_inputs(self, model, inputs):
        """This rank's shard of the batch (``shard_batch``), in the hook Trainer gives its own context parallelism."""
        from .batch import shard_batch

        inputs = dict(inputs)
        if "shift_labels" in inputs:
            raise ValueError("RingTrainer shifts the labels on the whole sequence itself: give it unshifted 'labels', "
                             "not 'shift_labels'")
        ids, labels = inputs.pop("input_ids", None), inputs.pop("labels", None)
        if ids is None or labels is None:
            raise ValueError("RingTrainer needs batches with input_ids and labels (a causal-LM collator, e.g. "
                             "DataCollatorForLanguageModeling(tokenizer, mlm=False))")
        mask = inputs.pop("attention_mask", None)
        if mask is not None and mask.dim() == 2 and bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError("RingTrainer takes right padding only (attention_mask ones then zeros): a real token "
                             "after padding would attend to it under ring attention")
        sb = shard_batch(ids, labels, group=self.ring.group, layout=self.ring.layout,
                         position_ids=inputs.pop("position_ids", None))
        inputs.update(input_ids=sb["input_ids"], position_ids=sb["position_ids"], shift_labels=sb["shift_labels"])
        if "cu_seq_lens_q" in sb:
            inputs["cu_seq_lens_q"] = sb["cu_seq_lens_q"]
        return contextlib.nullcontext, inputs

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """This rank's tokens' loss sum over ``num_items_in_batch``, times the number of processes (Trainer's
        convention for DDP's mean); the model's outputs without a loss of its own."""
        inputs = dict(inputs)
        shift_labels = inputs.pop("shift_labels")
        if num_items_in_batch is None:
            raise ValueError("RingTrainer needs Trainer's num_items_in_batch (batches with 'labels')")
        outputs = model(**inputs, use_cache=False)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]

        loss = local_loss_sum(logits, shift_labels, IGNORE_INDEX)
        loss = loss / (num_items_in_batch.to(loss) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
        loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
