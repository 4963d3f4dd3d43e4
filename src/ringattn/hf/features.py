"""What a transformers model needs from ring attention, read from the model itself, or why it cannot have it.

Ring attention is exact only where attention is the one place tokens meet and every mask feature reaches the
ring on global positions. Anything else is refused here, by name, before it can compute a wrong answer.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import torch

from ..callspec import Mask
from . import refusals
from .refusals import UnsupportedModel, layer_index, model_name

ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention", "attention"})
# Layer types that act on each token alone (Nemotron-H lists its MoE and MLP blocks as layers).
PER_TOKEN_LAYER_TYPES = frozenset({"moe", "mlp"})

# Module class names that mix tokens along the sequence without the attention interface. Each runs on one
# rank's shard alone, so its output would be that of a shorter, cut-up sequence.
MIXER_NAMES = re.compile(r"mamba|mixer|deltanet|gateddelta|linearattention|lightning|shortconv|rwkv|mlstm|slstm|"
                          r"xlstm|rglru|recurrentblock|recurrent_block|lru", re.IGNORECASE)
# Parts of a mixer's family that act on each token alone (its norms, MLPs, embeddings), named after the family.
_PER_TOKEN_NAMES = re.compile(r"norm|mlp|embed", re.IGNORECASE)
# A feed-forward named after the family acts on each token alone where all its parts do (xLSTM's); RWKV's holds a
# token shift.
_FEED_FORWARD_NAMES = re.compile(r"feedforward", re.IGNORECASE)
# Sparse attention that picks keys with a learned scorer (DeepSeek-V3.2's indexer): the scorer sees only the
# local shard, and ring attention has no top-k key selection.
_INDEXER_NAMES = re.compile(r"indexer", re.IGNORECASE)
# Weights chosen by a token's index in the sequence (Moshi's depth decoder): the index is the local one.
_BY_INDEX_NAMES = re.compile(r"flexiblelinear", re.IGNORECASE)
# Heads that pool one position of each row (the last real token, or the first) into the output: each rank
# would pool its own shard's.
_POOLED_HEADS = re.compile(r"For(SequenceClassification|MultipleChoice)$")
# RoPE variants that pick their frequencies from the largest position in the batch.
_DYNAMIC_ROPE = ("dynamic", "longrope")

_PREPARED: dict[int, weakref.ref] = {}  # id(config) -> config, for the configs prepare() patched
_CHECKED: dict[int, weakref.ref] = {}  # id(config) -> config, for the models check_model() passed without prepare
# id(config) -> (config, the layer indices whose token mixer prepare() made context-parallel)
_MIXER_LAYERS: dict[int, tuple[weakref.ref, set]] = {}
# id(config) -> (config, the local sizes of the masks transformers asked the mask interface for): which
# windows a model applies only in its mask (PhiMoE), and which config windows it never applies (Moshi).
_MASK_SIZES: dict[int, tuple[weakref.ref, set]] = {}


@dataclass(frozen=True)
class LayerNeeds:
    """The ring-attention options one attention module needs."""

    window: int | None = None       # transformers' sliding_window w: keys j > i - w
    chunk_size: int | None = None   # Llama 4 chunked attention: i // c == j // c
    temperature: tuple[float, float] | None = None  # Llama 4 (floor_scale, attn_scale) on NoPE layers

    def mask(self, *, causal: bool) -> Mask:
        """The layer's mask: transformers' window ``w`` (keys ``j > i - w``) is ringattn's ``window=(w - 1,
        ...)``, one-sided under a causal mask; chunked layers' ``chunk_size``."""
        window = None
        if self.window is not None:
            w = int(self.window) - 1
            window = (w, -1 if causal else w)
        return Mask(causal=causal, window=window, chunk_size=self.chunk_size)

    def ring_kwargs(self, *, causal: bool, softcap: float | None = None, sinks=None) -> dict:
        """The keywords of ``ring_attention`` for this layer's call: ``mask=`` the layer's ``Mask``, and its
        score modifications (``softcap``, ``sinks``)."""
        kw: dict = {"mask": self.mask(causal=causal)}
        if softcap is not None:
            kw["softcap"] = float(softcap)
        if sinks is not None:
            kw["sinks"] = sinks
        return kw


LayerPlan = LayerNeeds  # the name ringattn.hf exports


def _layer_types(config) -> list | None:
    types = getattr(config, "layer_types", None)
    return list(types) if isinstance(types, (list, tuple)) else None


def rope_types(config) -> set[str]:
    found = set()
    for key in ("rope_parameters", "rope_scaling"):
        rp = getattr(config, key, None)
        if not isinstance(rp, dict):
            continue
        for v in [rp, *[x for x in rp.values() if isinstance(x, dict)]]:
            t = v.get("rope_type", v.get("type"))
            if isinstance(t, str):
                found.add(t)
    return found


def is_prepared(config) -> bool:
    ref = _PREPARED.get(id(config))
    return ref is not None and ref() is config


def check_config(config) -> None:
    """The model-wide refusals that the config alone shows (the lazy path, without ``prepare``)."""
    name = model_name(config)
    _check_layer_types(config)
    dynamic = sorted(t for t in rope_types(config) if any(d in t for d in _DYNAMIC_ROPE))
    if dynamic and not is_prepared(config):
        raise UnsupportedModel(
            f"{name}: RoPE type {dynamic[0]!r} chooses its frequencies from the largest position in the batch, "
            "which each rank sees only for its shard; call ringattn.hf.prepare(model) once after loading, so "
            "the rotary embedding uses the global largest position")


def check_model(model: torch.nn.Module, *, prepared: bool = True) -> None:
    """Every refusal, model-wide: modules that mix tokens outside attention in a way ringattn does not run
    context-parallel (and, unless ``prepared``, any: their handlers are installed by ``prepare``), attention off the
    interface."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"prepare needs a transformers PreTrainedModel, got {type(model).__name__}")
    name = model_name(config)
    if _POOLED_HEADS.search(type(model).__name__):
        raise UnsupportedModel(
            f"{name}: {type(model).__name__} pools one position of each row into its output (the last real token, "
            "or the first), which one rank holds and each rank would take from its own shard; not supported with "
            "context parallelism (run the decoder, and the head on the rank holding that position)",
            feature="a head that pools one position of the sequence is not supported")
    from .mixers import HANDLERS, MODULE_HANDLERS, handled_modules, mixes, unknown_functions

    # path -> a mixer ringattn runs context-parallel
    handled = {p: m for p, m in handled_modules(model) if p}
    for path, m in model.named_modules():
        if not path:  # the model itself: its class is named after the family, not a mixer
            continue
        cls = type(m).__name__
        if _INDEXER_NAMES.search(cls):
            raise UnsupportedModel(f"{name}: {path} ({cls}): sparse attention with a learned key indexer is not "
                                   "supported by ring attention (the indexer would score the local shard only)",
                                   module=path, feature="sparse attention with a learned key indexer is not supported")
        if _BY_INDEX_NAMES.search(cls):
            raise UnsupportedModel(f"{name}: {path} ({cls}) picks its weights by the token's index in the "
                                   "sequence, which each rank knows only locally; not supported",
                                   module=path, feature="weights picked by the token's local index are not supported")
        if _passes_score_bias(type(m)):
            bias = [f"{p} ({type(b).__name__})" for p, b in m.named_children() if _PER_QUERY_BIAS.search(p)]
            raise UnsupportedModel(
                f"{name}: {path} ({cls}) adds a learned position bias to its attention scores (position_bias"
                + (f", from {bias[0]}" if bias else "") + "), built densely for the queries and keys it holds, "
                "which ring attention has no way to apply on global positions (it would drop it); not supported "
                "(run this model without context parallelism)", module=path, layer=layer_index(m),
                feature="a learned position bias added to the attention scores (position_bias) is not supported")
        unknown = unknown_functions(m) or _holder_calls(m, path, handled)
        if unknown:
            raise UnsupportedModel(
                f"{name}: {path} ({cls}) mixes tokens in {', '.join(unknown)}, which ringattn does not run "
                "context-parallel (it knows: " + ", ".join(sorted(HANDLERS)) + "), so each rank would mix its own "
                "shard alone; not supported yet (run this model without context parallelism)",
                module=path, layer=layer_index(m), feature=f"token mixing in {unknown[0]} is not context-parallel yet")
        if path in handled and not prepared:
            what = " and ".join(sorted(set(mixes(m))))
            raise UnsupportedModel(
                f"{name}: {path} ({cls}) mixes tokens outside attention ({what}), which runs context-parallel "
                "only in a prepared model: call ringattn.hf.prepare(model) once after loading",
                module=path, layer=layer_index(m), feature="a token mixer outside attention needs prepare(model)")
    suspects = []
    for path, m in model.named_modules():
        cls = type(m).__name__
        if not path or any(path == h or path.startswith(h + ".") or h.startswith(path + ".") for h in handled):
            continue  # the model, a handled mixer, a part of one (its convolution), or the block holding one
        conv = isinstance(m, torch.nn.Conv1d) and m.kernel_size[0] > 1
        if conv or (MIXER_NAMES.search(cls) and not _PER_TOKEN_NAMES.search(cls) and not _calls_attention(type(m))
                    and not _per_token_feed_forward(m)):
            suspects.append((path, m, conv))
    # The first that holds no other, so that the mixer is named rather than the block or model holding it.
    for path, m, conv in suspects:
        if any(p.startswith(path + ".") for p, _, _ in suspects):
            continue
        what = "a 1-D convolution along the sequence" if conv else "a recurrent / state-space / linear-attention mixer"
        raise UnsupportedModel(
            f"{name}: {path} ({type(m).__name__}) is {what} whose token mixing ringattn does not know (its forward "
            "calls none of the state-passing or convolution functions ringattn runs context-parallel: "
            f"{', '.join(sorted(HANDLERS))}; nor is it a module ringattn runs whole: "
            f"{', '.join(sorted(MODULE_HANDLERS)) or 'none'}), so each rank would mix its own shard alone; "
            "not supported "
            "(run this model without context parallelism)",
            module=path, layer=layer_index(m), feature="token mixing outside attention that ringattn does not know")
    if handled:
        _MIXER_LAYERS[id(config)] = (weakref.ref(config), {refusals.layer_of(model, p) for p in handled})
    _check_layer_types(config)
    on_interface = getattr(type(model), "_supports_attention_backend", False) or (
        bool(handled) and getattr(config, "model_type", None) in _HYBRIDS_ON_INTERFACE)
    attends = any(_calls_attention(type(m)) or "attention" in type(m).__name__.lower()
                  for p, m in model.named_modules() if p not in handled)
    # A model of mixers alone (Mamba, Mamba2) has no attention for the interface to reach.
    if (attends or not handled) and not on_interface:
        raise UnsupportedModel(
            f"{name}: transformers marks {type(model).__name__} as not supporting custom attention backends "
            "(_supports_attention_backend is False: its attention does not, or not only, go through the attention "
            "interface), so attn_implementation='ring' would not be what runs; not supported",
            feature="attention off transformers' attention interface is not supported")


# Activations that act on each element alone (torch.nn.modules.activation also holds Softmax over a dim and
# MultiheadAttention, which may reach other tokens).
_ELEMENTWISE = (torch.nn.ReLU, torch.nn.GELU, torch.nn.SiLU, torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.Identity,
                torch.nn.Dropout, torch.nn.Linear, torch.nn.Mish, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.Softplus)
# Calls in a forward that reach along the sequence.
_SEQUENCE_OPS = frozenset({"pad", "roll", "cumsum", "cumprod", "conv1d", "shift", "einsum", "bmm", "matmul", "scan",
                           "softmax", "flip", "unfold"})


def _holder_calls(m: torch.nn.Module, path: str, handled: dict) -> list[str]:
    """Where ``m`` holds a module ringattn runs whole whose weights a function may read instead of its forward (a
    ``Conv1d``: ``part_of_function_mixers``) and is no handled mixer itself, the modeling functions its forward
    calls that no handler runs: a holder may hand its part's weights to a function of its own (LFM2's short
    convolution before transformers 5.25: ``causal_conv1d_fn(x, self.conv.weight)``), which would then mix each
    rank's shard alone while the part it holds looks handled."""
    from .mixers.base import calls, module_handler

    def weights_part(h):
        handler = module_handler(handled[h])
        return handler is not None and handler.part_of_function_mixers

    if path in handled or not any(h.startswith(path + ".") and weights_part(h) for h in handled):
        return []
    return calls(type(m))[2]


def _per_token_feed_forward(m: torch.nn.Module) -> bool:
    """A feed-forward whose parts are all linear maps, elementwise activations or dropout and whose forward calls
    nothing that reaches along the sequence: a module named after a mixer family (xLSTM's) that mixes no tokens."""
    from .mixers.base import forward_of

    parts = list(m.modules())[1:]
    fwd = forward_of(type(m))
    return (bool(_FEED_FORWARD_NAMES.search(type(m).__name__)) and bool(parts) and fwd is not None
            and not (_SEQUENCE_OPS & set(fwd.__code__.co_names))
            and all(isinstance(k, _ELEMENTWISE) or type(k).__module__ == "transformers.activations" for k in parts))


# Hybrids that transformers leaves off _supports_attention_backend (the flag means a vLLM/TGI backend can run
# them, which would have to manage their mixers' state) whose attention calls the interface all the same, each
# exact with attention layers in tests/test_hf_sweep.py or tests/test_hf_mixers.py. Not inferred from the code:
# Inkling's attention calls the interface too, with a position_bias the ring cannot add (refused by name above).
_HYBRIDS_ON_INTERFACE = frozenset({"falcon_h1", "zamba2", "jamba", "nemotron_h", "qwen3_next", "qwen3_5_text",
                                   "qwen3_5_moe_text", "qwen4_exp_text", "kimi_linear", "bailing_hybrid",
                                   "olmo_hybrid", "lara_mini"})
# The attention interface, as a module's forward names it: such a module is softmax attention, whatever its name.
_ATTENTION_CALLS = frozenset({"eager_attention_forward", "ALL_ATTENTION_FUNCTIONS", "sdpa_attention_forward"})


# Submodules that make the per-query bias (Inkling's rel_logits_proj), named in the refusal.
_PER_QUERY_BIAS = re.compile(r"rel|bias", re.IGNORECASE)


def _passes_score_bias(cls: type) -> bool:
    """Whether ``cls``'s forward calls the attention interface with a ``position_bias`` of its own (Inkling's
    relative logits, T5-style biases): the interface's sdpa adds it to the scores, the ring cannot."""
    from .mixers.base import forward_of

    fwd = forward_of(cls)
    return _calls_attention(cls) and "position_bias" in fwd.__code__.co_varnames


def _calls_attention(cls: type) -> bool:
    from .mixers.base import forward_of

    fwd = forward_of(cls)
    return fwd is not None and bool(_ATTENTION_CALLS & set(fwd.__code__.co_names))


def _check_layer_types(config) -> None:
    types = _layer_types(config)
    entry = _MIXER_LAYERS.get(id(config))
    mixers = entry[1] if entry is not None and entry[0]() is config else set()
    for i, t in enumerate(types or ()):
        if t not in ATTENTION_LAYER_TYPES | PER_TOKEN_LAYER_TYPES and i not in mixers:
            raise UnsupportedModel(
                f"{model_name(config)}: layer {i} is a {t!r} layer (config.layer_types) and no module of it runs "
                "context-parallel (token mixing outside attention runs context-parallel only where ringattn knows "
                "its functions, in a model given to ringattn.hf.prepare(model)), so each rank would mix its own shard "
                "alone",
                layer=i, feature=f"a {t!r} layer: token mixing outside attention is not context-parallel")


def needs_of(module, sliding_window, softcap, kwargs: dict) -> LayerNeeds:
    """What the attention ``module`` needs, from its call, its attributes and its config; raises if it needs
    something the ring cannot do."""
    config = getattr(module, "config", None)
    cls = type(module).__name__
    if config is not None:
        check_config(config)
    where, idx = refusals.where(module, config), layer_index(module)
    if _INDEXER_NAMES.search(cls):
        raise UnsupportedModel(f"{where}: not plain softmax attention; not supported by ring attention",
                               layer=idx, feature="not plain softmax attention")
    types = _layer_types(config) if config is not None else None
    layer_type = types[idx] if types and idx is not None and idx < len(types) else None

    window = sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    if window is None and config is not None:
        # Models that put the window only in their mask (PhiMoE, Qwen2-MoE): sliding layers by layer_types, or
        # every layer when the model has no layer_types and a window in its config.
        w = getattr(config, "sliding_window", None)
        if w is not None and (layer_type == "sliding_attention" or (types is None and _window_is_used(config))):
            window = w
    if layer_type == "full_attention" and sliding_window is None:
        window = None
    chunk = None
    if layer_type == "chunked_attention":
        chunk = getattr(config, "attention_chunk_size", None)
        if not chunk:
            raise UnsupportedModel(f"{where}: a chunked_attention layer without config.attention_chunk_size")
    temperature = None
    if getattr(module, "attn_temperature_tuning", False) and not getattr(module, "use_rope", True):
        temperature = (float(module.floor_scale), float(module.attn_scale))
    if window is not None and (not isinstance(window, int) or window < 1):
        raise UnsupportedModel(f"{where}: sliding_window must be a positive int, got {window!r}")
    return LayerNeeds(window=window, chunk_size=int(chunk) if chunk else None, temperature=temperature)


def _window_is_used(config) -> bool:
    """Whether the model built a sliding-window mask of config.sliding_window (seen by the mask function)."""
    entry = _MASK_SIZES.get(id(config))
    return entry is not None and entry[0]() is config and config.sliding_window in entry[1]


def saw_mask(config, local_size) -> None:
    entry = _MASK_SIZES.get(id(config))
    if entry is None or entry[0]() is not config:
        entry = _MASK_SIZES[id(config)] = (weakref.ref(config), set())
    if local_size is not None:
        entry[1].add(int(local_size))


def mark_prepared(config) -> None:
    _PREPARED[id(config)] = weakref.ref(config)


def is_checked(config) -> bool:
    ref = _CHECKED.get(id(config))
    return ref is not None and ref() is config


def mark_checked(config) -> None:
    _CHECKED[id(config)] = weakref.ref(config)
