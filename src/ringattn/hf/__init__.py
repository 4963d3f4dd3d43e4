"""Hugging Face transformers integration: ``attn_implementation="ring"`` for context-parallel models.

``register(group, layout)`` adds ring attention to transformers' attention interface and a mask function
that builds no mask (ring attention applies causal / sliding-window masks on global positions itself).
Every rank then runs the same model on its shard of the sequence::

    ringattn.hf.register(group=None, layout="zigzag")
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="ring")
    batch = ringattn.hf.shard_batch(input_ids, group=None, layout="zigzag")
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    loss = ringattn.hf.causal_lm_loss(logits, batch["shift_labels"], batch["num_items_in_batch"])
    loss.backward()
    ringattn.hf.sync_gradients(model)          # sum the ranks' partial parameter gradients

Why it is exact: rotary embeddings only need each token's global position (the sharded ``position_ids``),
norms and MLPs are per token, and attention is the only place tokens meet. The loss labels are shifted on
the *full* sequence before sharding, so a shard's last token is scored against the next shard's first.

Padding: ``shard_batch`` pads the tail up to a multiple of the world size (2x for zigzag). Under a causal
mask no real token sees a later one, so tail padding changes nothing; its labels are ignored. A 2-D
``attention_mask`` with zeros (left padding) is rejected; put padding at the end instead.
"""

from __future__ import annotations

from ..training.batch import IGNORE_INDEX
from .attention import attention_forward
from .audit import AuditReport, audit
from .batch import shard_batch
from .features import LayerPlan, UnsupportedModel
from .generation import RingCache
from .interface import register
from .loss import causal_lm_loss, sync_gradients
from .prepared import prepare
from .registry import RingSettings, settings

__all__ = ["IGNORE_INDEX", "AuditReport", "LayerPlan", "RingCache", "RingSettings", "UnsupportedModel",
           "attention_forward",
           "audit", "causal_lm_loss", "prepare", "register", "settings", "shard_batch", "sync_gradients"]

# transformers' Trainer (ringattn.hf.trainer) imports accelerate and Trainer itself: loaded on first use.
_TRAINER_NAMES = ("ContextParallel", "RingTrainer", "setup_context_parallel")
__all__ += list(_TRAINER_NAMES)


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
