"""What one forward of a prepared model tells its layers: the position_ids and cu_seq_lens_q the model was given.

Not every decoder layer passes ``position_ids`` on to its attention (Granite-4.0-H's does not; a model without
rotary embeddings need not), and a mixer is never given them; the packed documents they mark are the model's,
so ``prepare`` hooks the model's forward and its layers read them here.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import torch

from .registry import SETTINGS, RingSettings


@dataclass
class Batch:
    """One forward of a prepared model under a registered ring: its settings, the packed-document inputs it was
    given, and what its layers built from them once (``plans``: the mixers' fragments, by length and batch)."""

    settings: RingSettings
    position_ids: torch.Tensor | None
    cu_seq_lens: object
    plans: dict = field(default_factory=dict)


_BATCH: contextvars.ContextVar[Batch | None] = contextvars.ContextVar("ringattn_forward", default=None)


def current() -> Batch | None:
    """The prepared model's forward in progress on this thread (None: outside one, or not under a ring)."""
    return _BATCH.get()


def _settings(model) -> RingSettings | None:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return SETTINGS.get(impl) if isinstance(impl, str) else None


def _pre(model, args, kwargs):
    settings = _settings(model)
    position_ids = kwargs.get("position_ids")
    token = _BATCH.set(None if settings is None else Batch(
        settings, position_ids if isinstance(position_ids, torch.Tensor) else None, kwargs.get("cu_seq_lens_q")))
    model.__dict__.setdefault("_ringattn_forward_tokens", []).append(token)


def _post(model, args, kwargs, output):
    tokens = model.__dict__.get("_ringattn_forward_tokens")
    if tokens:
        _BATCH.reset(tokens.pop())


def install(model: torch.nn.Module) -> None:
    """Hook ``model``'s forward (once) so that its layers see what it was given."""
    if "_ringattn_forward_hooks" not in model.__dict__:
        model.__dict__["_ringattn_forward_hooks"] = (
            model.register_forward_pre_hook(_pre, with_kwargs=True),
            model.register_forward_hook(_post, with_kwargs=True, always_call=True))
