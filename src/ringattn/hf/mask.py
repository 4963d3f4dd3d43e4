"""The mask interface's function: no dense mask (the ring masks on global positions), and the
model-wide checks that come first, from the config transformers passes."""

from __future__ import annotations

import sys

from ..validate import agree
from . import features, generation
from .prepared import first_forward
from .registry import SETTINGS


def make_mask(name: str):
    def ring_mask(batch_size: int = 1, q_length: int = 0, kv_length: int = 0, q_offset: int = 0,
                  kv_offset: int = 0, mask_function=None, attention_mask=None, **kwargs):
        """No dense mask: ring attention masks on global positions. A 2-D padding mask must be all ones.

        Models build their masks before their first layer, so this is where model-wide refusals (layers that
        are not attention, dynamic RoPE not prepared) come first, from the config transformers passes."""
        if generation.active() is None:
            generation.refuse_generate(SETTINGS[name])
        config = kwargs.get("config")
        if config is not None:
            if not features.is_prepared(config) and not features.is_checked(config):
                _check_caller(config)
            features.check_config(config)
            features.saw_mask(config, kwargs.get("local_size"))
        if attention_mask is None:
            return None
        error = None
        if not bool(attention_mask.all()):
            error = ValueError("ring attention does not take a padding attention_mask with zeros; put "
                               "padding at the end of the sequence (shard_batch does) and give it "
                               "label -100, or pass attention_mask=None")
        s = SETTINGS[name]
        agree(f"mask {tuple(attention_mask.shape)}", error, s.group, attention_mask.device)
        return None

    return ring_mask


def _check_caller(config) -> None:
    """The first-forward check for a model the construction hook missed (its config switched to a ring
    implementation by hand): the model that asks for the mask is on the call stack, with this config."""
    from transformers import PreTrainedModel

    f = sys._getframe(2)
    while f is not None:
        owner = f.f_locals.get("self")
        if isinstance(owner, PreTrainedModel) and owner.config is config:
            first_forward(owner, ())
            return
        f = f.f_back
