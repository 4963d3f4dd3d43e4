"""``prepare``, and the same checks at the first forward of a ring model that was not prepared."""

from __future__ import annotations

import functools

import torch

from . import features, forward, generation, mixers, positions
from .batch import needs_ring
from .features import UnsupportedModel
from .registry import SETTINGS


def prepare(model: torch.nn.Module, *, group=None) -> torch.nn.Module:
    """Check a transformers model for ``attn_implementation="ring"`` and adapt what needs the global sequence.

    Makes the token mixers of hybrid models context-parallel in the same layout (``ringattn.hf.mixers``: Mamba2
    scans, short convolutions, ...). Raises ``ringattn.hf.UnsupportedModel`` (a ``NotImplementedError``) naming
    the model, the layer and the feature for what it cannot compute exactly: token mixing outside attention that
    ringattn does not know (a recurrence in the module's own code, a convolution it does not call through
    transformers' convolution function), attention that is not on
    transformers' attention interface (Bloom, MPT, Falcon, ...), DeepSeek-V3.2's sparse indexer. Patches the
    rotary embeddings whose frequencies depend on the largest position (dynamic NTK, LongRoPE) to use the
    group's. Returns ``model``. Without it the same checks run at the model's first forward (the per-layer ones
    at the first attention call), and dynamic RoPE is refused.

    Also hooks the decoder so that ``model.generate()`` runs context-parallel (``ringattn.hf.generation``).
    """
    features.check_model(model)
    forward.install(model)
    mixers.install(model)
    generation.install(model)
    if not getattr(model, "_ringattn_needs_ring", False):
        model.register_forward_pre_hook(needs_ring, with_kwargs=True)
        model._ringattn_needs_ring = True
    for m in model.modules():
        positions.patch_dynamic_rope(m, group)
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None:
            features.mark_prepared(config)
    return model


def guard_unprepared() -> None:
    """Check at its first forward a model that runs a registered ring implementation without ``prepare``.

    Without ``prepare`` the checks otherwise run only where the model calls the attention interface (its first
    attention call) or the mask interface (its config): a model whose attention is its own code (Bloom, MPT,
    Falcon, ...) never calls the ring and runs each rank's shard as if it were the whole sequence, and a module
    that mixes tokens outside attention (a convolution, a recurrent mixer) is never seen. transformers decides a
    model's attention implementation in ``PreTrainedModel._check_and_adjust_attn_implementation`` (at
    construction, and at ``set_attn_implementation``), the one place that has the model in hand: wrapped once,
    it hooks the model's forward with the same checks ``prepare`` makes."""
    from transformers import PreTrainedModel

    method = PreTrainedModel.__dict__.get("_check_and_adjust_attn_implementation")
    if method is None or getattr(method, "_ringattn_guard", False):
        return

    @functools.wraps(method)
    def check_and_adjust(self, *args, **kwargs):
        impl = method(self, *args, **kwargs)
        if isinstance(impl, str) and impl in SETTINGS:
            # At construction the submodels do not exist yet (each is hooked by its own construction); at
            # set_attn_implementation they do, and a submodel sharing this config is not asked again.
            for m in self.modules():
                if isinstance(m, PreTrainedModel) and m.config is self.config and \
                        "_ringattn_first_forward" not in m.__dict__:
                    m.__dict__["_ringattn_first_forward"] = m.register_forward_pre_hook(first_forward)
        return impl

    check_and_adjust._ringattn_guard = True
    PreTrainedModel._check_and_adjust_attn_implementation = check_and_adjust


def first_forward(model, args) -> None:
    """A ring model's first forward without ``prepare``: ``prepare``'s checks, on every rank alike (each holds the
    same model), before any layer runs. Passed (or prepared), the hook goes."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if not (isinstance(impl, str) and impl in SETTINGS):
        return
    if not features.is_prepared(config) and not features.is_checked(config):
        try:
            features.check_config(config)  # what the mask function would refuse, said first as it would say it
            features.check_model(model, prepared=False)
        except UnsupportedModel as e:
            raise UnsupportedModel(
                f"{type(model).__name__} runs with attn_implementation={impl!r} without ringattn.hf.prepare(model) "
                "(call it once after loading: it checks the model and adapts what needs the whole sequence); "
                f"checked at its first forward instead: {e}", module=e.module, layer=e.layer,
                feature=e.feature) from None
        features.mark_checked(config)
    handle = model.__dict__.pop("_ringattn_first_forward", None)
    if handle is not None:
        handle.remove()
