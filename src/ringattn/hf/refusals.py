"""What a refusal says: ``UnsupportedModel`` and how it names the model. A leaf, so that every part of the
integration (the checks in ``features``, the mixers, the audit) can refuse without importing the others."""

from __future__ import annotations


class UnsupportedModel(NotImplementedError):
    """A model feature ring attention cannot compute exactly (raised at load time or the first call).

    ``module`` (the refused submodule's path), ``layer`` (its decoder-layer index, where the config names it)
    and ``feature`` (what is refused, in a few words) are set where the refusal knows them, so tools such as
    ``ringattn.hf.audit`` can name the layer without parsing the message."""

    def __init__(self, message: str, *, module: str | None = None, layer: int | None = None,
                 feature: str | None = None):
        super().__init__(message)
        self.module, self.layer, self.feature = module, layer, feature


def model_name(config) -> str:
    archs = getattr(config, "architectures", None)
    return archs[0] if archs else f"{type(config).__name__.removesuffix('Config')} (model_type={config.model_type!r})"


def layer_index(module) -> int | None:
    """The decoder-layer index a module carries, where it has one (or ``prepare`` found for it: ``layer_of``): a
    negative one (Zamba2's attention block, shared by several layers, has -1) names no layer."""
    idx = getattr(module, "layer_idx", None)
    if not isinstance(idx, int):
        idx = getattr(module, "__dict__", {}).get("_ringattn_layer_idx")
    return idx if isinstance(idx, int) and idx >= 0 else None


def layer_of(model, path: str) -> int | None:
    """The layer a module at ``path`` belongs to: its own index, else its nearest holder's (RecurrentGemma's RG-LRU
    and convolution keep none), else the index of the layer list entry holding it."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        idx = layer_index(model.get_submodule(".".join(parts[:i])))
        if idx is not None:
            return idx
    return next((int(p) for p in parts if p.isdigit()), None)


def where(module, config=None) -> str:
    """How messages name a module: ``"LlamaForCausalLM: layer 3 (LlamaAttention)"``."""
    config = config if config is not None else getattr(module, "config", None)
    name = model_name(config) if config is not None else "model"
    idx = layer_index(module)
    return f"{name}: layer {idx} ({type(module).__name__})" if idx is not None else f"{name}: {type(module).__name__}"
