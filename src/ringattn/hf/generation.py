"""``model.generate()`` with ``attn_implementation="ring"``: ring prefill and a KV cache sharded across ranks.

Every rank calls ``model.generate(input_ids=prompt, ...)`` with the same whole prompt, as in one process.
Hooks on the decoder (``ringattn.hf.prepare`` installs them; they act only inside transformers' generate)
change what one forward sees, never what generate does:

- **Prefill** (the prompt): the decoder is given this rank's shard of ``input_ids`` / ``inputs_embeds`` and
  ``position_ids`` (the layout's, as ``shard_batch`` makes them), attention is ring attention, and each
  layer's cache keeps the keys/values of its own shard only (``RingCache``). After the last layer only
  the hidden state of the prompt's last position is kept (one sum over the ranks brings it from the rank
  that holds it), so the model's ``logits[:, -1]`` is the one generate reads.
- **Decode** (one token a step): every rank runs the token through the model; its key/value are kept by
  one rank only (round robin by position), and attention is each rank's partial over its own slots,
  merged by logsumexp (``ringattn.decode``): every rank ends with the same logits, so greedy search and
  sampling with one seed pick the same token everywhere.

Hybrid models (``ringattn.hf.mixers``): the prefill's mixers run context-parallel and leave in the cache, on
every rank, the conv inputs of the prompt's last ``k`` positions and the recurrent state after its last position
(``RingCache``'s linear-attention layers; RecurrentGemma's recurrent block keeps them on itself, and its output
carries no cache, so generate passes its own cache again each step: the RingCache the prefill filled in its place
stands in for it); each decode step runs the module's own single-token path on them, alike on every rank. A padded
prompt gives each mixer this rank's shard of the padding mask.

Padding (batch > 1): a row's ``attention_mask`` may be ones then zeros (right padding) or zeros then ones
(left padding); its padded keys are never seen, as transformers' mask has it for sdpa. The mask is
checked, not assumed: other shapes are refused. Memory per rank: the cache holds about ``S / W + new / W``
positions per layer; no rank ever builds the whole prompt's activations.

Not supported yet (refused by name): assisted / speculative decoding, prefill chunking,
output_hidden_states / output_attentions, a cache the hooks did not make, and the balanced layout.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys

import torch
import torch.distributed as dist

from .. import comm
from ..decode import decode_attention
from ..layouts import global_positions, layout_of, padded_len
from ..sharding import shard
from ..validate import agree
from .registry import SETTINGS, RingSettings

try:
    from transformers.cache_utils import (
        DYNAMIC_LAYER_TYPE_MAPPING,
        Cache,
        DynamicLayer,
        LinearAttentionCacheLayerMixin,
        get_layer_types_and_kwargs,
    )
except ImportError:  # pragma: no cover - ringattn.hf needs transformers
    raise ImportError("ringattn.hf needs transformers: pip install 'ringattn[hf]'") from None

__all__ = ["RingCache", "active", "install"]


class RingCache(Cache):
    """A transformers ``Cache`` whose layers hold this rank's share of the keys and values.

    ``positions`` are the global positions of this rank's slots and ``valid`` ``(batch, slots)`` which of
    them each row may see (padding is not); ``length`` is the whole sequence's length, what generate reads
    as the cache's length. Made by the generation hooks at prefill; not meant to be filled by hand.

    Given the model's ``config``, the layers of hybrid models' recurrent or convolution mixers are transformers'
    own linear-attention cache layers, holding the same states on every rank (those after the whole prompt, then
    after each decoded token).
    """

    def __init__(self, group=None, layout: str = "contiguous", config=None) -> None:
        layers = _layers(config)
        if layers is None:
            super().__init__(layer_class_to_replicate=DynamicLayer)
        else:
            super().__init__(layers=layers)
        self.group, self.layout = group, layout
        self.rank, self.world = comm.group_rank_world(group)
        self.length = 0
        self.positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.keep_new = True  # whether this rank keeps the keys/values of the forward under way
        self.ranges: list[tuple[int, int]] = []  # each row's unpadded positions [lo, hi) in the prompt

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.keep_new:  # another rank keeps this token: add none of it, return this rank's slots
            key_states, value_states = key_states[:, :, :0], value_states[:, :, :0]
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.length + query_length, 0

    @property
    def rows_alike(self) -> bool:
        """Every row sees the same slots (the same on every rank): one decode call for all rows."""
        return len(set(self.ranges)) == 1

    def slots(self) -> int:
        return 0 if self.positions is None else int(self.positions.numel())

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: rows follow their beams (every rank gets the same ``beam_idx``: the logits agree)."""
        for layer in self.layers:
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                LinearAttentionCacheLayerMixin.reorder_cache(layer, beam_idx)
            if getattr(layer, "is_initialized", False):
                layer.keys = layer.keys.index_select(0, beam_idx.to(layer.keys.device))
                layer.values = layer.values.index_select(0, beam_idx.to(layer.values.device))
        if self.valid is not None:
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))
        self.ranges = [self.ranges[int(i)] for i in beam_idx.tolist()]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("ringattn's RingCache does not support assisted or speculative decoding yet")


def _layers(config) -> list | None:
    """One cache layer per decoder layer where some hold a recurrent or convolution state (None: none does).
    Attention layers keep every key of this rank (the ring applies windows and chunks itself)."""
    if config is None:
        return None
    try:
        types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except (AttributeError, TypeError, ValueError):
        return None
    classes = [DYNAMIC_LAYER_TYPE_MAPPING.get(t) for t in types]
    if not any(isinstance(c, type) and issubclass(c, LinearAttentionCacheLayerMixin) for c in classes):
        return None
    out = []
    for c, kw in zip(classes, kwargs):
        if isinstance(c, type) and issubclass(c, LinearAttentionCacheLayerMixin):
            if issubclass(c, DynamicLayer) and c is not DYNAMIC_LAYER_TYPE_MAPPING["hybrid"]:
                c = DYNAMIC_LAYER_TYPE_MAPPING["hybrid"]  # a sliding hybrid layer: the ring keeps every key
            out.append(c(number_of_states=kw.get("number_of_states", 1)))
        else:
            out.append(DynamicLayer())
    return out


class _Step:
    """The generate forward under way: what the attention function needs beyond its arguments."""

    def __init__(self, settings, cache: RingCache | None, prefill: bool, ranges: list[tuple[int, int]], seq_len: int):
        self.settings, self.cache, self.prefill, self.ranges, self.seq_len = settings, cache, prefill, ranges, seq_len


_ACTIVE: dict[int, _Step] = {}  # id(decoder) -> its forward under way


def active() -> _Step | None:
    """The generate forward under way, if any (one decoder at a time runs attention on a rank)."""
    return next(iter(_ACTIVE.values()), None)


def install(model: torch.nn.Module) -> None:
    """Hook ``model``'s decoder (once) so that ``model.generate`` runs context-parallel under a ring
    attention implementation on more than one rank."""
    decoder = _decoder(model)
    if decoder is None or getattr(decoder, "_ringattn_generation", False):
        return
    decoder.register_forward_pre_hook(_before, with_kwargs=True)
    decoder.register_forward_hook(_after, with_kwargs=True, always_call=True)
    decoder._ringattn_generation = True


def _decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that turns ids into the last hidden states (``LlamaModel`` of ``LlamaForCausalLM``)."""
    get = getattr(model, "get_decoder", None)
    for cand in (get() if callable(get) else None, getattr(model, "base_model", None), getattr(model, "model", None)):
        if isinstance(cand, torch.nn.Module) and cand is not model:
            return cand
    return None


def _settings(module):
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
    s = SETTINGS.get(impl) if isinstance(impl, str) else None
    if s is None or not in_generate():
        return None
    return s


def _key_ranges(mask: torch.Tensor | None, b: int, n: int) -> tuple[list[tuple[int, int]], str | None]:
    """Each row's visible keys as one range ``[lo, hi)`` of positions, from a 2-D padding mask."""
    if mask is None:
        return [(0, n)] * b, None
    if mask.dim() != 2 or tuple(mask.shape) != (b, n):
        return [], f"attention_mask must be (batch, {n}) ones and zeros, got {tuple(mask.shape)}"
    ranges = []
    for row in mask.bool():
        ones = torch.nonzero(row).flatten()
        lo, hi = (int(ones[0]), int(ones[-1]) + 1) if ones.numel() else (0, 0)
        if hi - lo != ones.numel():
            return [], ("ring attention generates from rows padded on one side only (attention_mask ones then "
                        "zeros, or zeros then ones); this row has zeros between ones (transformers masks every prompt "
                        "token equal to pad_token_id when no attention_mask is given; with use_cache=False, right "
                        "padding becomes that after one step: keep the cache on)")
        ranges.append((lo, hi))
    return ranges, None


def _refuse(kwargs: dict, decoder) -> str | None:
    for name in ("output_hidden_states", "output_attentions"):
        if kwargs.get(name):
            return f"{name}=True is not supported by model.generate() with ring attention yet"
    return None


def _before(decoder, args, kwargs):
    s = _settings(decoder)
    _ACTIVE.pop(id(decoder), None)
    if s is None:
        return None
    if args:
        args, kwargs = _as_keywords(decoder, args, kwargs)
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    x = ids if ids is not None else embeds
    device = x.device
    b, n = x.shape[:2]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    ring = getattr(cache, "__dict__", {}).get("_ringattn_ring") if not isinstance(cache, RingCache) else None
    if ring is not None:
        # A model whose output carries no cache (RecurrentGemma's) is given generate's own cache again at each
        # step: the RingCache its prefill filled in its place.
        cache = ring
        kwargs.pop("past_key_values", None)
        kwargs[_cache_key(decoder)] = ring
    error = _refuse(kwargs, decoder)
    if layout_of(s.layout).needs_documents and error is None:
        error = f"layout={str(s.layout)!r} places tokens by document; model.generate() with ring attention takes " \
                "contiguous, zigzag or striped"
    decode = isinstance(cache, RingCache) and cache.length > 0
    if decode:
        step = _before_decode(decoder, kwargs, cache, b, n, error, s, device)
    else:
        step = _before_prefill(decoder, kwargs, cache, b, n, error, s, device)
    _ACTIVE[id(decoder)] = step
    return args, kwargs


def _as_keywords(decoder, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The decoder's positional arguments (Mamba2's causal LM passes ``input_ids`` so) by their names."""
    params = [p for p in inspect.signature(decoder.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(params) or any(p.name in kwargs for p in params[:len(args)]) or \
            any(p.kind is p.POSITIONAL_ONLY for p in params[:len(args)]):
        raise ValueError("ringattn's generation hooks need the decoder's arguments by name, as transformers' causal "
                         f"LMs pass them; {type(decoder).__name__} got {len(args)} positional")
    return (), {**kwargs, **{p.name: a for p, a in zip(params, args)}}


def _cache_key(decoder) -> str:
    """The decoder's name for its cache argument: ``cache`` (transformers >= 5.x), else ``past_key_values``."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params or "past_key_values" not in params else "past_key_values"


# What the prefill shards (or replaces): any other per-token input would meet a shard of the tokens whole.
_SHARDED = ("input_ids", "inputs_embeds", "position_ids", "attention_mask")


def _before_prefill(decoder, kwargs, cache, b, n, error, s, device) -> _Step:
    mask = kwargs.get("attention_mask")
    ranges, bad = _key_ranges(mask, b, n)
    error = error or bad
    per_token = [k for k, v in kwargs.items() if k not in _SHARDED and isinstance(v, torch.Tensor) and v.dim() >= 2
                 and v.shape[0] == b and v.shape[1] == n]
    if error is None and per_token:
        error = (f"model.generate() with ring attention shards input_ids, inputs_embeds and position_ids only; "
                 f"{', '.join(per_token)} would stay whole beside this rank's shard of the tokens: not supported yet")
    if error is None and cache is not None and not isinstance(cache, RingCache) and cache.get_seq_length() > 0:
        error = ("model.generate() with ring attention continues only a cache it made itself; pass no cache "
                 "(or a fresh one)")
    if error is None and isinstance(cache, RingCache) and cache.slots():
        error = "a RingCache is filled once, by its prefill; start a new generate() for a new prompt"
    agree(f"hf generate prefill {b}x{n} {ranges} {s.layout}", ValueError(error) if error else None, s.group, device)
    rank, world = comm.group_rank_world(s.group)
    total = padded_len(n, world, s.layout)
    local = total // world
    pos = global_positions(s.layout, rank, world, local, device)
    for name in ("input_ids", "inputs_embeds"):
        if kwargs.get(name) is not None:
            kwargs[name] = shard(kwargs[name], group=s.group, layout=s.layout)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(n, device=device)[None]
    position_ids = position_ids.expand(b, n) if position_ids.dim() == 2 else position_ids
    # padding slots repeat the last position (as shard_batch does); no real token sees them
    padded = torch.cat([position_ids, position_ids[..., -1:].expand(*position_ids.shape[:-1], total - n)], -1)
    kwargs["position_ids"] = shard(padded, group=s.group, layout=s.layout, dim=padded.dim() - 1)
    kwargs["attention_mask"] = None
    use_cache = kwargs.get("use_cache", True) is not False
    ring = None
    if use_cache:
        ring = cache if isinstance(cache, RingCache) else RingCache(s.group, s.layout, getattr(decoder, "config", None))
        if cache is not None and cache is not ring:
            cache.__dict__["_ringattn_ring"] = ring
        lo = torch.tensor([r[0] for r in ranges], device=device)[:, None]
        hi = torch.tensor([r[1] for r in ranges], device=device)[:, None]
        ring.positions, ring.valid, ring.keep_new = pos, (pos[None] >= lo) & (pos[None] < hi), True
        ring.ranges = ranges
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        kwargs[_cache_key(decoder)] = ring
    return _Step(s, ring, True, ranges, n)


def _before_decode(decoder, kwargs, cache: RingCache, b, n, error, s, device) -> _Step:
    mask = kwargs.get("attention_mask")
    if error is None and n != 1:
        error = (f"ring attention decodes one token per step, got {n} (assisted or speculative decoding, or "
                 "prefill chunking, is not supported yet)")
    if error is None and mask is not None and not bool(mask[:, -1].all()):
        error = "a new token's attention_mask must be 1 (padding goes in the prompt)"
    if error is None and cache.valid is not None and cache.valid.shape[0] != b:
        error = f"the cache holds {cache.valid.shape[0]} rows, the step {b}"
    agree(f"hf generate decode {b}x{n} at {cache.length}", ValueError(error) if error else None, s.group, device)
    owner = cache.length % cache.world  # round robin keeps the slots balanced
    cache.keep_new = cache.rank == owner
    if cache.keep_new:
        new = torch.tensor([cache.length], device=device)
        cache.positions = torch.cat([cache.positions, new])
        cache.valid = torch.cat([cache.valid, cache.valid.new_ones(b, 1)], 1)
    kwargs["attention_mask"] = None
    return _Step(s, cache, False, [], cache.length)


def _after(decoder, args, kwargs, output):
    step = _ACTIVE.pop(id(decoder), None)
    if step is None or output is None:
        return None
    if step.cache is not None:
        step.cache.length = step.seq_len if step.prefill else step.cache.length + 1
        step.cache.keep_new = True
        # The output's own field name only: asking a transformers 5 output for ``past_key_values`` logs its
        # deprecation warning (on every rank).
        fields = getattr(type(output), "__dataclass_fields__", {})
        key = "cache" if "cache" in fields or "past_key_values" not in fields else "past_key_values"
        if key in output:
            output[key] = step.cache
    if step.prefill:
        if "last_hidden_state" not in output:
            raise ValueError(f"ring generation: {type(decoder).__name__} returned no last_hidden_state; "
                             "model.generate() with ring attention is not supported for this model")
        output["last_hidden_state"] = _last_position(output["last_hidden_state"], step)
    return output


def _last_position(hidden: torch.Tensor, step: _Step) -> torch.Tensor:
    """``(b, 1, hidden)``: the prompt's last position's hidden state, on every rank (only the rank holding it
    contributes to the sum, so the sum is that value exactly)."""
    group = step.settings.group
    rank, world = comm.group_rank_world(group)
    pos = global_positions(step.settings.layout, rank, world, hidden.shape[1], hidden.device)
    out = torch.zeros_like(hidden[:, :1])
    where = torch.nonzero(pos == step.seq_len - 1).flatten()
    if where.numel():
        out = out + hidden[:, int(where[0]):int(where[0]) + 1]
    if world > 1:
        dist.all_reduce(out, group=group)
    return out


# -- attention ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def row_mask(lo: int, chunk: int | None):
    """A padded row's mask beyond causal: keys from ``lo`` (its first real token) on, and with chunked
    attention chunks counted from ``lo``, as transformers counts them. One object per argument pair (the
    decode agreement describes it by its answers, not its address)."""
    return _RowMask(lo, chunk)


class _RowMask:
    def __init__(self, lo: int, chunk: int | None):
        self.lo, self.chunk = lo, chunk

    def __call__(self, q_idx, kv_idx):
        keep = (kv_idx >= self.lo) & (q_idx >= 0)
        if self.chunk is not None:
            keep = keep & ((q_idx - self.lo) // self.chunk == (kv_idx - self.lo) // self.chunk)
        return keep

    def __repr__(self) -> str:
        return f"row_mask(lo={self.lo}, chunk={self.chunk})"


def _row_kw(kw: dict, lo: int) -> dict:
    if lo == 0:
        return kw
    out = dict(kw, mask_mod=row_mask(lo, kw.get("chunk_size")))
    out.pop("chunk_size", None)
    return out


def prefill_rows(step: _Step, q, k, v, kw: dict, call) -> torch.Tensor:
    """Ring attention of the prompt's shard, each row seeing only its unpadded keys."""
    ranges = step.ranges
    if all(r == (0, step.seq_len) for r in ranges):
        return call(q, k, v, dict(kw, seq_len=step.seq_len))
    outs = [call(q[i:i + 1], k[i:i + 1], v[i:i + 1], dict(_row_kw(kw, lo), seq_len=hi))
            for i, (lo, hi) in enumerate(ranges)]
    return torch.cat(outs, 0)


def decode_rows(step: _Step, q, key, value, kw: dict) -> torch.Tensor:
    """One new token's attention over every rank's slots: ``q`` ``(b, 1, h, d)``, ``key``/``value`` the
    cache's ``(b, kv_heads, slots, d)``."""
    cache = step.cache
    if key.shape[2] != cache.slots():
        raise ValueError(f"ring generation: the layer's cache holds {key.shape[2]} keys but the rank owns "
                         f"{cache.slots()} slots (layers sharing a KV cache are not supported yet)")
    q_pos = torch.tensor([cache.length], device=q.device)
    k, v = key.transpose(1, 2), value.transpose(1, 2)

    def call(rows: slice, lo: int, valid: torch.Tensor) -> torch.Tensor:
        rk = _row_kw(kw, lo)
        return decode_attention(q[rows], k[rows], v[rows], q_pos, torch.where(valid, cache.positions, -1),
                                group=rk["group"], softmax_scale=rk.get("softmax_scale"), causal=rk["causal"],
                                window=rk.get("window"), softcap=rk.get("softcap"), sinks=rk.get("sinks"),
                                chunk_size=rk.get("chunk_size"), mask_mod=rk.get("mask_mod"))

    if cache.rows_alike:
        return call(slice(None), cache.ranges[0][0], cache.valid[0])
    return torch.cat([call(slice(i, i + 1), lo, cache.valid[i]) for i, (lo, _) in enumerate(cache.ranges)], 0)


_GENERATION_DIR: str | None = None


def in_generate() -> bool:
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


def refuse_generate(settings: RingSettings) -> None:
    # generate() hands every rank the whole prompt (and each new token), which the ring would take for that rank's
    # shard of one longer sequence unless prepare's hooks shard it. Every rank is in generate alike, so every rank
    # raises here, before a collective.
    if in_generate():
        raise ValueError("transformers' generate() with attn_implementation='ring' needs "
                         "ringattn.hf.prepare(model) first: it hooks the model so that generate's whole prompt is "
                         "sharded, prefilled with ring attention, and decoded over a KV cache sharded across ranks "
                         "(without it every rank would take the whole prompt for its shard of a longer sequence)")
