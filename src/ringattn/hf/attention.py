"""The attention-interface function: one layer's call on this rank's shard, as a ring attention call."""

from __future__ import annotations

import dataclasses
import weakref

import torch

from .. import ring_attention
from ..callspec import Mask
from ..layouts import layout_of
from ..masks import KINDS
from ..validate import agree
from . import features, forward, generation, positions
from .batch import check_sharded_as
from .features import LayerNeeds
from .refusals import layer_index, where
from .registry import SETTINGS, RingSettings


def make_attention(name: str):
    def ring_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: float | None = None, sliding_window: int | None = None,
                               softcap: float | None = None, is_causal: bool | None = None,
                               **kwargs):
        return attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                 scaling=scaling, sliding_window=sliding_window, softcap=softcap,
                                 is_causal=is_causal, settings=SETTINGS[name], **kwargs)

    ring_attention_forward.__name__ = f"{name}_attention_forward"
    return ring_attention_forward


_NEEDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> LayerNeeds


def _needs(module, sliding_window, softcap, settings: RingSettings, device, kwargs) -> LayerNeeds:
    """What the module needs, read (and agreed on by every rank) at its first call."""
    needs = _NEEDS.get(module) if _weakrefable(module) else None
    if needs is not None:
        return needs
    error = None
    try:
        needs = features.needs_of(module, sliding_window, softcap, kwargs)
    except (ValueError, NotImplementedError) as e:
        error = e
    agree(f"hf layer needs {type(module).__name__} {needs}", error, settings.group, device)
    if _weakrefable(module):
        _NEEDS[module] = needs
    return needs


def _weakrefable(module) -> bool:
    return isinstance(module, torch.nn.Module)


def attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, *, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, settings: RingSettings | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """The transformers attention-interface function: ``query`` ``(b, heads, s, d)``, ``key``/``value``
    ``(b, kv_heads, s, d)`` of this rank's shard -> ``(out (b, s, heads, d), None)``.

    What the layer needs comes from the call, the module and its config (``features.needs_of``):
    ``sliding_window=w`` (transformers' convention: keys ``j > i - w``, also when only the model's mask has it)
    becomes ``window=(w - 1, ...)``; chunked layers (Llama 4) ``chunk_size``; ``softcap``; ``s_aux`` (gpt-oss
    sinks) ``sinks``. ``cu_seq_lens_q`` (global packed-document boundaries: a tensor for batch 1 or rows
    packed alike, or a list of one per row) becomes ringattn's ``cu_seqlens``; without it, documents are found
    where the global ``position_ids`` restart (the balanced layout needs it: ``shard_batch`` returns it).
    """
    settings = settings or RingSettings()
    step = generation.active()
    _check_call(module, query, key, attention_mask, dropout, step, settings, kwargs)
    needs = _needs(module, sliding_window, softcap, settings, query.device, kwargs)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if needs.temperature is not None and (step is None or step.prefill):  # a decode step's index is already global
        by_documents = layout_of(settings.layout).needs_documents
        query = positions.temperature_rescale(query, *needs.temperature, settings.group, settings.layout,
                                              kwargs.get("cu_seq_lens_q") if by_documents else None)
    kw = dict(group=settings.group, layout=settings.layout, softmax_scale=scaling,
              **needs.ring_kwargs(causal=causal, softcap=softcap, sinks=kwargs.get("s_aux")))
    if settings.backward_exchange != "ring":
        kw["backward_exchange"] = settings.backward_exchange
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if step is not None:  # inside model.generate(): the prompt's shard, or one new token over the sharded cache
        flat = _flat(kw)
        if not step.prefill:
            return generation.decode_rows(step, q, key, value, flat), None
        return generation.prefill_rows(step, q, k, v, flat,
                                       lambda qr, kr, vr, kwr: _call(qr, kr, vr, None, settings, kwr)), None
    rows, real = _documents(module, needs, query.shape[0], settings, kwargs)
    if real is not None and not causal:
        # shard_batch's padding repeats the last position; without a causal mask real tokens would see it.
        kw["mask"] = dataclasses.replace(kw["mask"], seq_len=real)
    if len(rows) == 1:
        return _call(q, k, v, rows[0], settings, kw), None
    # Rows packed differently: one ring call per row, each with its own documents.
    outs = [_call(q[i:i + 1], k[i:i + 1], v[i:i + 1], r, settings, kw) for i, r in enumerate(rows)]
    return torch.cat(outs, 0), None


def _check_call(module, query, key, attention_mask, dropout, step, settings: RingSettings, kwargs) -> None:
    """What the call itself gets wrong, said on every rank alike before any of them communicates."""
    if step is None:
        generation.refuse_generate(settings)
    if dropout:
        raise ValueError(f"attention dropout is not supported by ring attention, got dropout={dropout}; "
                         "set config.attention_dropout = 0 or call model.eval()")
    if isinstance(attention_mask, torch.Tensor):
        raise features.UnsupportedModel(
            f"{where(module)}: the model built its own dense attention_mask (not transformers' mask interface), "
            "which ring attention cannot apply on global positions; not supported",
            layer=layer_index(module), feature="a dense attention_mask built by the model itself is not supported")
    if step is None and isinstance(kwargs.get("position_ids"), torch.Tensor):
        check_sharded_as(kwargs["position_ids"], settings)
    if key.shape[2] != query.shape[2] and (step is None or step.prefill):
        raise ValueError(f"ring attention needs as many keys as queries on each rank, got {query.shape[2]} "
                         f"queries and {key.shape[2]} keys (a filled KV cache?): run with use_cache=False; to decode, "
                         "call model.generate() after ringattn.hf.prepare(model)")


def _documents(module, needs: LayerNeeds, batch: int, settings: RingSettings, kwargs) -> tuple[list, int | None]:
    """Each row's packed documents (one entry for rows packed alike; None: no documents) and, where they were
    read from ``position_ids``, the real length before ``shard_batch``'s padding."""
    model = forward.current()
    if model is not None:  # what the prepared model was given, where its layer does not pass it on
        kwargs = {"cu_seq_lens_q": model.cu_seq_lens, "position_ids": model.position_ids} | \
            {k: v for k, v in kwargs.items() if v is not None}
    rows, real = positions.packed_documents(kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids"), batch,
                                            settings.group, settings.layout)
    if kwargs.get("cu_seq_lens_q") is None and any(r is not None for r in rows):  # read from position_ids
        if needs.chunk_size is not None:
            raise features.UnsupportedModel(
                f"{where(module)}: chunked attention with packed documents (transformers counts the chunks "
                "from each document's start); not supported yet",
                layer=layer_index(module), feature="chunked attention with packed documents is not supported yet")
        elif len(rows) > 1 and all(r is not None and torch.equal(r, rows[0]) for r in rows):
            rows = rows[:1]
    return rows, real


def _flat(kw: dict) -> dict:
    """The call's keywords with the layer's mask as flat keywords (``causal`` always), as the decoding
    hooks read them; registered kinds, which have no flat keyword, stay in ``mask=``."""
    mask = kw["mask"]
    out = {name: val for name, val in kw.items() if name != "mask"}
    out.update(causal=mask.causal, window=None)
    out.update((KINDS[name].keyword, val) for name, val in mask.fields().items() if KINDS[name].keyword is not None)
    if mask.kinds:
        out["mask"] = Mask(kinds=mask.kinds)
    return out


def _call(q, k, v, cu, settings: RingSettings, kw: dict) -> torch.Tensor:
    if cu is not None:  # the documents join the layer's mask
        mask = kw["mask"]
        if mask.seq_len is not None:  # the padding as a document of its own: no real token sees it either way
            cu = cu[cu < mask.seq_len]
            cu = torch.cat([cu, cu.new_tensor([mask.seq_len])])
        kw = dict(kw, mask=dataclasses.replace(mask, documents=cu if q.shape[0] == 1 else [cu] * q.shape[0],
                                               seq_len=int(cu[-1])))
    if settings.strategy == "ring":
        return ring_attention(q, k, v, **kw)
    from .. import attention

    return attention(q, k, v, strategy=settings.strategy, **kw)
