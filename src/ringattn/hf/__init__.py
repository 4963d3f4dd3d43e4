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

import functools
import os
import sys
import weakref
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import comm, ring_attention
from ..layouts import check_layout, padded_len, shard
from ..training.batch import IGNORE_INDEX
from ..training.batch import shard_batch as _shard_tokens
from ..training.batch import shift_labels as _shift_labels
from ..training.grads import sum_gradients
from ..training.loss import local_loss_sum, mean_over_ranks
from ..validate import agree, check_backward_exchange
from . import features, generation, positions
from .features import LayerPlan, UnsupportedModel
from .generation import RingCache

__all__ = ["IGNORE_INDEX", "AuditReport", "LayerPlan", "RingCache", "RingSettings", "UnsupportedModel",
           "attention_forward",
           "audit", "causal_lm_loss", "prepare", "register", "settings", "shard_batch", "sync_gradients"]


@dataclass
class RingSettings:
    """What ``attn_implementation="ring"`` uses: the sequence-parallel group, layout and strategy."""

    group: object = None
    layout: str = "contiguous"
    strategy: str = "ring"
    backward_exchange: str = "ring"


_SETTINGS: dict[str, RingSettings] = {}


def settings(name: str = "ring") -> RingSettings:
    """The settings registered under ``name`` (raises ``KeyError`` if ``register`` was not called)."""
    return _SETTINGS[name]


def register(group=None, layout: str = "contiguous", *, strategy: str = "ring", name: str = "ring",
             backward_exchange: str = "ring") -> None:
    """Make ``attn_implementation=name`` (default ``"ring"``) available to transformers models.

    Args:
        group: the process group the sequence is split over (None = default group).
        layout: ``"contiguous"``, ``"zigzag"``, ``"striped"`` or ``"balanced"``: must match how the inputs
            were sharded (``shard_batch(..., layout=...)``; balanced also passes the model its
            ``cu_seq_lens_q``).
        strategy: any ``ringattn.attention`` strategy (``"ring"`` by default).
        name: the attention-implementation name to register. Calling again updates the settings.
        backward_exchange: the ring's backward, ``"ring"`` or ``"direct"`` (see ``ring_attention``);
            ``"direct"`` needs a strategy with a ring (``"ring"``, ``"hybrid"``, ``"auto"``).
    """
    check_layout(layout)
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a str, got {type(strategy).__name__}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    check_backward_exchange(backward_exchange, strategy)
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ringattn.hf needs transformers: pip install 'ringattn[hf]'") from e
    _SETTINGS[name] = RingSettings(group, layout, strategy, backward_exchange)
    AttentionInterface.register(name, _make_attention(name))
    AttentionMaskInterface.register(name, _make_mask(name))
    _guard_model_loss()
    _guard_unprepared()


def _make_attention(name: str):
    def ring_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: float | None = None, sliding_window: int | None = None,
                               softcap: float | None = None, is_causal: bool | None = None,
                               **kwargs):
        return attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                 scaling=scaling, sliding_window=sliding_window, softcap=softcap,
                                 is_causal=is_causal, settings=_SETTINGS[name], **kwargs)

    ring_attention_forward.__name__ = f"{name}_attention_forward"
    return ring_attention_forward


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> LayerPlan


def _plan(module, sliding_window, softcap, settings: RingSettings, device, kwargs) -> LayerPlan:
    """The module's plan, made (and agreed on by every rank) at its first call."""
    plan = _PLANS.get(module) if _weakrefable(module) else None
    if plan is not None:
        return plan
    error = None
    try:
        plan = features.plan_module(module, sliding_window, softcap, kwargs)
    except (ValueError, NotImplementedError) as e:
        error = e
    agree(f"hf plan {type(module).__name__} {plan}", error, settings.group, device)
    if _weakrefable(module):
        _PLANS[module] = plan
    return plan


def _weakrefable(module) -> bool:
    return isinstance(module, torch.nn.Module)


def attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, *, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, settings: RingSettings | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """The transformers attention-interface function: ``query`` ``(b, heads, s, d)``, ``key``/``value``
    ``(b, kv_heads, s, d)`` of this rank's shard -> ``(out (b, s, heads, d), None)``.

    What the layer needs comes from the call, the module and its config (``features.plan_module``):
    ``sliding_window=w`` (transformers' convention: keys ``j > i - w``, also when only the model's mask has it)
    becomes ``window=(w - 1, ...)``; chunked layers (Llama 4) ``chunk_size``; ``softcap``; ``s_aux`` (gpt-oss
    sinks) ``sinks``. ``cu_seq_lens_q`` (global packed-document boundaries: a tensor for batch 1 or rows
    packed alike, or a list of one per row) becomes ringattn's ``cu_seqlens``; without it, documents are found
    where the global ``position_ids`` restart (the balanced layout needs it: ``shard_batch`` returns it).
    """
    settings = settings or RingSettings()
    step = generation.active()
    if step is None:
        _refuse_generate(settings)
    if dropout:
        raise ValueError(f"attention dropout is not supported by ring attention, got dropout={dropout}; "
                         "set config.attention_dropout = 0 or call model.eval()")
    if isinstance(attention_mask, torch.Tensor):
        raise features.UnsupportedModel(
            f"{_where(module)}: the model built its own dense attention_mask (not transformers' mask interface), "
            "which ring attention cannot apply on global positions; not supported",
            layer=_layer_index(module), feature="a dense attention_mask built by the model itself is not supported")
    if step is None and isinstance(kwargs.get("position_ids"), torch.Tensor):
        _check_sharded_as(kwargs["position_ids"], settings)
    if key.shape[2] != query.shape[2] and (step is None or step.prefill):
        raise ValueError(f"ring attention needs as many keys as queries on each rank, got {query.shape[2]} "
                         f"queries and {key.shape[2]} keys (a filled KV cache?): run with use_cache=False; to decode, "
                         "call model.generate() after ringattn.hf.prepare(model)")
    plan = _plan(module, sliding_window, softcap, settings, query.device, kwargs)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = None
    if plan.window is not None:
        w = int(plan.window) - 1
        window = (w, -1 if causal else w)
    if plan.temperature is not None and (step is None or step.prefill):  # a decode step's index is already global
        query = positions.temperature_rescale(query, *plan.temperature, settings.group, settings.layout,
                                              kwargs.get("cu_seq_lens_q") if settings.layout == "balanced" else None)
    kw = dict(group=settings.group, causal=causal, window=window, layout=settings.layout,
              softmax_scale=scaling)
    if plan.chunk_size is not None:
        kw["chunk_size"] = plan.chunk_size
    if softcap is not None:
        kw["softcap"] = float(softcap)
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        kw["sinks"] = sinks
    if settings.backward_exchange != "ring":
        kw["backward_exchange"] = settings.backward_exchange
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if step is not None:  # inside model.generate(): the prompt's shard, or one new token over the sharded cache
        if not step.prefill:
            return generation.decode_rows(step, q, key, value, kw), None
        return generation.prefill_rows(step, q, k, v, kw,
                                       lambda qr, kr, vr, kwr: _call(qr, kr, vr, None, settings, kwr)), None
    cu = kwargs.get("cu_seq_lens_q")
    rows, real = list(cu) if isinstance(cu, (list, tuple)) else [cu], None
    if cu is None and settings.layout == "balanced":
        raise ValueError("layout='balanced' places the tokens by document: pass the model the cu_seq_lens_q that "
                         "ringattn.hf.shard_batch returns with them")
    if cu is None and kwargs.get("position_ids") is not None:
        rows, real = positions.documents(kwargs["position_ids"], query.shape[0], settings.group, settings.layout)
        if all(r is None for r in rows):
            rows = [None]
        elif plan.chunk_size is not None:
            raise features.UnsupportedModel(
                f"{_where(module)}: chunked attention with packed documents (transformers counts the chunks "
                "from each document's start); not supported yet",
                layer=_layer_index(module), feature="chunked attention with packed documents is not supported yet")
        elif len(rows) > 1 and all(r is not None and torch.equal(r, rows[0]) for r in rows):
            rows = rows[:1]
    if real is not None and not causal:
        # shard_batch's padding repeats the last position; without a causal mask real tokens would see it.
        kw["seq_len"] = real
    if len(rows) == 1:
        return _call(q, k, v, rows[0], settings, kw), None
    # Rows packed differently: one ring call per row, each with its own documents.
    outs = [_call(q[i:i + 1], k[i:i + 1], v[i:i + 1], r, settings, kw) for i, r in enumerate(rows)]
    return torch.cat(outs, 0), None


# id(position_ids) -> (the tensor, the layout and world size shard_batch made it for): a model hands its layers
# the position_ids it was given, so the attention can tell a batch sharded one way from a ring registered another.
_SHARDED_AS: dict[int, tuple[weakref.ref, str, int]] = {}


def _stamp(position_ids: torch.Tensor, layout: str, world: int) -> None:
    key = id(position_ids)
    _SHARDED_AS[key] = (weakref.ref(position_ids, lambda _, key=key: _SHARDED_AS.pop(key, None)), layout, world)


def _needs_ring(model, args, kwargs) -> None:
    """A prepared model given a sharded batch while its attention is not a ring (built with sdpa, and
    ``set_attn_implementation("ring")`` forgotten): each rank would attend within its own shard only."""
    impl = getattr(model.config, "_attn_implementation", None)
    if isinstance(impl, str) and impl in _SETTINGS:
        return
    for t in (*args, *kwargs.values()):
        entry = _SHARDED_AS.get(id(t)) if isinstance(t, torch.Tensor) else None
        if entry is not None and entry[0]() is t and entry[2] > 1:
            raise ValueError(f"{type(model).__name__} was given this rank's shard of a batch (ringattn.hf.shard_batch "
                             f"over {entry[2]} ranks) but runs with attn_implementation={impl!r}, which would attend "
                             "within each rank's shard alone: build it with attn_implementation='ring' or call "
                             "model.set_attn_implementation('ring') after ringattn.hf.register")


def _check_sharded_as(position_ids: torch.Tensor, settings: RingSettings) -> None:
    # Every rank sharded its batch with the same call, so every rank raises here alike, before a collective.
    entry = _SHARDED_AS.get(id(position_ids))
    if entry is None or entry[0]() is not position_ids:
        return
    world = comm.group_rank_world(settings.group)[1]
    if entry[2] != world or (entry[1] != settings.layout and world > 1):  # on one rank every layout is the same
        raise ValueError(f"the batch was sharded by ringattn.hf.shard_batch with layout={entry[1]!r} over {entry[2]} "
                         f"ranks, but the ring attention was registered with layout={settings.layout!r} over {world} "
                         "ranks: each rank would take its tokens for other positions; pass the same layout and group "
                         "to ringattn.hf.register and ringattn.hf.shard_batch")


def _call(q, k, v, cu, settings: RingSettings, kw: dict) -> torch.Tensor:
    if cu is not None:
        if "seq_len" in kw:  # the padding as a document of its own: no real token sees it either way
            cu = cu[cu < kw["seq_len"]]
            cu = torch.cat([cu, cu.new_tensor([kw["seq_len"]])])
        kw = dict(kw, cu_seqlens=cu if q.shape[0] == 1 else [cu] * q.shape[0], seq_len=int(cu[-1]))
    if settings.strategy == "ring":
        return ring_attention(q, k, v, **kw)
    from .. import attention

    return attention(q, k, v, strategy=settings.strategy, **kw)


_GENERATION_DIR: str | None = None


def _in_generate() -> bool:
    """Whether transformers' generation code (``generate`` and its decoding loops) is on the call stack."""
    global _GENERATION_DIR
    if _GENERATION_DIR is None:
        import transformers.generation

        _GENERATION_DIR = os.path.dirname(transformers.generation.__file__) + os.sep
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_filename.startswith(_GENERATION_DIR):
            return True
        f = f.f_back
    return False


def _refuse_generate(settings: RingSettings) -> None:
    # generate() hands every rank the whole prompt (and each new token), which the ring would take for that rank's
    # shard of one longer sequence unless prepare's hooks shard it. Every rank is in generate alike, so every rank
    # raises here, before a collective.
    if _in_generate():
        raise ValueError("transformers' generate() with attn_implementation='ring' needs "
                         "ringattn.hf.prepare(model) first: it hooks the model so that generate's whole prompt is "
                         "sharded, prefilled with ring attention, and decoded over a KV cache sharded across ranks "
                         "(without it every rank would take the whole prompt for its shard of a longer sequence)")


def _layer_index(module) -> int | None:
    idx = getattr(module, "layer_idx", None)
    return idx if isinstance(idx, int) else None


def _where(module) -> str:
    config = getattr(module, "config", None)
    name = features.model_name(config) if config is not None else "model"
    idx = getattr(module, "layer_idx", None)
    return f"{name}: layer {idx} ({type(module).__name__})" if idx is not None else f"{name}: {type(module).__name__}"


def prepare(model: torch.nn.Module, *, group=None) -> torch.nn.Module:
    """Check a transformers model for ``attn_implementation="ring"`` and adapt what needs the global sequence.

    Raises ``ringattn.hf.UnsupportedModel`` (a ``NotImplementedError``) naming the model, the layer and the
    feature for what ring attention cannot compute exactly: token mixing outside attention (Mamba, Mamba2,
    gated delta net / linear attention, short convolutions, recurrent blocks), attention that is not on
    transformers' attention interface (Bloom, MPT, Falcon, ...), DeepSeek-V3.2's sparse indexer. Patches the
    rotary embeddings whose frequencies depend on the largest position (dynamic NTK, LongRoPE) to use the
    group's. Returns ``model``. Without it the same checks run at the model's first forward (the per-layer ones
    at the first attention call), and dynamic RoPE is refused.

    Also hooks the decoder so that ``model.generate()`` runs context-parallel (``ringattn.hf.generation``).
    """
    features.check_model(model)
    generation.install(model)
    if not getattr(model, "_ringattn_needs_ring", False):
        model.register_forward_pre_hook(_needs_ring, with_kwargs=True)
        model._ringattn_needs_ring = True
    for m in model.modules():
        positions.patch_dynamic_rope(m, group)
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None:
            features.mark_prepared(config)
    return model


def _make_mask(name: str):
    def ring_mask(batch_size: int = 1, q_length: int = 0, kv_length: int = 0, q_offset: int = 0,
                  kv_offset: int = 0, mask_function=None, attention_mask=None, **kwargs):
        """No dense mask: ring attention masks on global positions. A 2-D padding mask must be all ones.

        Models build their masks before their first layer, so this is where model-wide refusals (layers that
        are not attention, dynamic RoPE not prepared) come first, from the config transformers passes."""
        if generation.active() is None:
            _refuse_generate(_SETTINGS[name])
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
        s = _SETTINGS[name]
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
            _first_forward(owner, ())
            return
        f = f.f_back


def shard_batch(input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, group=None,
                layout: str = "contiguous", position_ids: torch.Tensor | None = None,
                ignore_index: int = IGNORE_INDEX) -> dict:
    """This rank's shard of a causal-LM batch, with labels shifted on the full sequence first.

    Args:
        input_ids: ``(batch, seq_len)`` full token ids, identical on every rank (checked: a batch that differs
            between the ranks, as from a data loader sharded over them, raises ``ValueError`` on every rank).
        labels: ``(batch, seq_len)`` targets aligned with ``input_ids`` (the usual HF convention: the
            model shifts them); None = ``input_ids``. ``ignore_index`` entries are not scored.
        group, layout: the sequence-parallel group and layout (as passed to ``register``).
        position_ids: ``(batch, seq_len)`` or ``(seq_len,)``; None = ``0 .. seq_len-1``.

    Returns:
        ``{"input_ids", "position_ids", "shift_labels", "num_items_in_batch", "seq_len"}``:
        ``(batch, local_len)`` shards (the tail padded up to a multiple of W, 2W for zigzag; padding has
        id 0, the last position repeated and label ``ignore_index``), ``shift_labels[i]`` = the label of token
        ``i + 1``, and the global count of scored tokens. With ``layout="balanced"`` also ``cu_seq_lens_q``,
        the documents (where ``position_ids`` restart) that placed the tokens: pass it to the model too.
    """
    check_layout(layout)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a 2-D (batch, seq_len) tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    b, n = input_ids.shape
    labels = input_ids if labels is None else labels
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (b, n):
        raise ValueError(f"labels must have the shape of input_ids {(b, n)}, got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    _, world = comm.group_rank_world(group)
    if world > 1:
        _check_same_batch(input_ids, labels, position_ids, group)
    pad = padded_len(n, world, layout) - n
    if position_ids is None:
        position_ids = torch.arange(n, device=input_ids.device).expand(b, n)
    # Padding repeats the last position: the largest position (which dynamic RoPE and LongRoPE read) stays the
    # real sequence's, and the padding joins the last document, which no real token sees under a causal mask.
    position_ids = position_ids.unsqueeze(0) if position_ids.dim() == 1 else position_ids
    if position_ids.shape[-1] != n:
        raise ValueError(f"position_ids must have seq_len {n} entries, got {tuple(position_ids.shape)}")
    position_ids = position_ids.expand(b, n)
    if pad:
        position_ids = torch.cat([position_ids, position_ids[:, -1:].expand(b, pad)], 1)
    shifted = _shift_labels(labels, ignore_index)
    cu = None
    if layout == "balanced":  # the documents place the tokens, and the attention needs the same ones
        rows = [positions.restarts(row[:n]) for row in position_ids]
        cu = rows[0] if all(torch.equal(r, rows[0]) for r in rows) else rows
    ids, shift_labels, _ = _shard_tokens(input_ids, shifted, group=group, layout=layout, ignore_index=ignore_index,
                                         cu_seqlens=cu)
    sharded_positions = shard(position_ids, group=group, layout=layout, cu_seqlens=cu)
    _stamp(sharded_positions, layout, world)
    _stamp(ids, layout, world)
    out = {
        "input_ids": ids,
        "position_ids": sharded_positions,
        "shift_labels": shift_labels,
        "num_items_in_batch": int((shifted != ignore_index).sum()),
        "seq_len": n,
    }
    if cu is not None:
        out["cu_seq_lens_q"] = cu
    return out


def _fingerprint(t: torch.Tensor | None) -> list[torch.Tensor]:
    """Shape and a position-weighted sum of an integer tensor (int64 sums wrap alike on every rank)."""
    if t is None:
        return [torch.tensor(-1)]
    flat = t.reshape(-1).to(torch.int64)
    weights = torch.arange(12345, 12345 + flat.numel(), device=flat.device, dtype=torch.int64)
    shape = torch.tensor([t.dim(), *t.shape, *[0] * (3 - t.dim())][:4])
    return [shape, flat.sum().cpu()[None], (flat * weights).sum().cpu()[None]]


def _check_same_batch(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None,
                      group) -> None:
    """Every rank must pass the same whole batch (each keeps its shard of it): a per-rank batch (a data loader
    sharded over these ranks, as for data parallelism) would make each rank's shard a piece of another
    sequence. One all-reduce of a fingerprint; every rank sees the result and raises alike."""
    fp = torch.cat([x.reshape(-1) for t in (input_ids, labels, position_ids) for x in _fingerprint(t)])
    device = input_ids.device
    if dist.get_backend(group) == "nccl" and device.type != "cuda":  # a batch still on the CPU, as loaders give it
        device = torch.device("cuda", torch.cuda.current_device())
    both = torch.cat([fp, -fp]).to(device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(both[:fp.numel()], -both[fp.numel():]):
        raise ValueError("ringattn.hf.shard_batch got a different batch on each rank of the group: every rank passes "
                         "the same whole input_ids (and labels, position_ids) and keeps its own shard of it; a data "
                         "loader sharded over these ranks (DistributedSampler, as for data parallelism) gives each "
                         "rank its own batch instead. Shard the data over the data-parallel ranks only (RingTrainer "
                         "does), or load the same batch on every rank of the context-parallel group")


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


def _guard_model_loss() -> None:
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
        settings = _SETTINGS.get(impl) if isinstance(impl, str) else None
        if settings is None or fn is not LOSS_MAPPING.get("ForCausalLM"):
            return fn
        return functools.partial(_model_causal_lm_loss, fn, settings)

    PreTrainedModel.loss_function = _GuardedLoss(loss_function, prop.fset, None, prop.__doc__)


def _guard_unprepared() -> None:
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
        if isinstance(impl, str) and impl in _SETTINGS:
            # At construction the submodels do not exist yet (each is hooked by its own construction); at
            # set_attn_implementation they do, and a submodel sharing this config is not asked again.
            for m in self.modules():
                if isinstance(m, PreTrainedModel) and m.config is self.config and \
                        "_ringattn_first_forward" not in m.__dict__:
                    m.__dict__["_ringattn_first_forward"] = m.register_forward_pre_hook(_first_forward)
        return impl

    check_and_adjust._ringattn_guard = True
    PreTrainedModel._check_and_adjust_attn_implementation = check_and_adjust


def _first_forward(model, args) -> None:
    """A ring model's first forward without ``prepare``: ``prepare``'s checks, on every rank alike (each holds the
    same model), before any layer runs. Passed (or prepared), the hook goes."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if not (isinstance(impl, str) and impl in _SETTINGS):
        return
    if not features.is_prepared(config) and not features.is_checked(config):
        try:
            features.check_config(config)  # what the mask function would refuse, said first as it would say it
            features.check_model(model)
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


class _GuardedLoss(property):
    """``PreTrainedModel.loss_function`` once ``_guard_model_loss`` wrapped it (so it is wrapped once)."""


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


from .audit import AuditReport, audit  # noqa: E402 - audit uses the functions above

# transformers' Trainer (ringattn.hf.trainer) imports accelerate and Trainer itself: loaded on first use.
_TRAINER_NAMES = ("ContextParallel", "RingTrainer", "setup_context_parallel")
__all__ += list(_TRAINER_NAMES)


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
