"""Gated DeltaNet's delta rule: Qwen3-Next, Qwen3.5 (dense and MoE), OLMo-hybrid, LaRA-mini, Qwen4-exp.

The rule keeps a state ``(heads, K, V)`` per row; a token multiplies it on the left by ``exp(g) (I - beta k k^T)``
and adds ``beta k v^T``, so a span's transition is a dense ``K x K`` matrix per head. Each column of the state
evolves alone, so the rule itself computes the transition: run from the identity with zero values, its final
state is ``M``. ``delta_rule`` is shared with Kimi's delta attention (``kda.py``), whose gate is per key channel.
"""

from __future__ import annotations

import inspect

import torch

from ... import mixers as mx
from ..features import UnsupportedModel
from .base import MixerCall, handles

# Keywords that describe the whole sequence (its packed documents), not this rank's spans: the plan cuts the
# documents, so they are dropped (transformers' torch rules refuse cu_seqlens; a fused kernel would misread it).
GLOBAL_KEYWORDS = frozenset({"cu_seqlens", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                             "seq_idx", "position_ids"})


def _key(tensors) -> tuple:
    return tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) for t in tensors)


def delta_rule(original, call: MixerCall, what: str, *args, **kwargs):
    """``rule(query, key, value, g, beta, ..., initial_state, output_final_state, ...) -> (out, final)`` with
    queries and keys ``(batch, len, heads_k, K)``, values ``(batch, len, heads, V)``, context-parallel: every
    rank's pieces from their true initial states (``ringattn.mixers.run_fragments``, kind ``dense``)."""
    # transformers wraps the rule in a module for kernelize; its forward carries the signature.
    sig = inspect.signature(original.forward if isinstance(original, torch.nn.Module) else original)
    bound = sig.bind(*args, **kwargs)
    params = dict(bound.arguments)
    for name, p in sig.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            params.update(params.pop(name, {}))
    q, k, v, g, beta = (params.pop(n) for n in ("query", "key", "value", "g", "beta"))
    initial_state = params.pop("initial_state", None)
    final = params.pop("output_final_state", False)
    if initial_state is not None or final:
        raise UnsupportedModel(
            f"{call.where}: a recurrent state carried into or out of a context-parallel {what} (a cache: "
            "generation, or a prefill that keeps its state) is not supported; pass use_cache=False to train or score",
            layer=getattr(call.module, "layer_idx", None), feature=f"a cached state for {what}")
    rest = {n: x for n, x in params.items() if n not in GLOBAL_KEYWORDS}
    b, n, heads, vd = v.shape
    kd = k.shape[-1]
    plan = call.plan(n, b)
    # The transition of the span the latest zero-start pass ran, with that span's inputs (held, so that no other
    # tensor can take their memory): ``transition`` called on the same span reads it instead of another pass.
    last: dict = {}

    def step(q_, k_, v_, g_, beta_, initial_state):
        if initial_state is not None:
            return original(q_, k_, v_, g=g_, beta=beta_, initial_state=initial_state, output_final_state=True,
                            **rest)
        # K more value columns, zero, from the identity: the state's columns evolve alone, so these carry the
        # span's transition out beside its state in the same pass, and the first V columns are the zero-start run.
        rows, length = v_.shape[:2]
        sdtype = mx.summary_dtype(v_.dtype)
        eye = torch.eye(kd, dtype=sdtype, device=v_.device).expand(rows, heads, kd, kd)
        h0 = torch.cat([eye.new_zeros(rows, heads, kd, vd), eye], -1)
        vv = torch.cat([v_, v_.new_zeros(rows, length, heads, kd)], -1)
        y, h = original(q_, k_, vv, g=g_, beta=beta_, initial_state=h0, output_final_state=True, **rest)
        last.clear()
        last.update(inputs=(q_, k_, g_, beta_), key=_key((q_, k_, g_, beta_)), m=h[..., vd:])
        return y[..., :vd], h[..., :vd]

    def transition(q_, k_, v_, g_, beta_):
        if last and last["key"] == _key((q_, k_, g_, beta_)):
            m = last["m"]
            last.clear()
            return m
        rows, length = v_.shape[:2]
        sdtype = mx.summary_dtype(v_.dtype)
        eye = torch.eye(kd, dtype=sdtype, device=v_.device).expand(rows, heads, kd, kd)
        _, m = original(q_, k_, v_.new_zeros(rows, length, heads, kd), g=g_, beta=beta_, initial_state=eye,
                        output_final_state=True, **rest)
        return m

    y = mx.run_fragments(step, transition, [q, k, v, g, beta], plan=plan, kind="dense", state_shape=(heads, kd, vd))
    return y, None


@handles("torch_chunk_gated_delta_rule", "Gated DeltaNet delta rule")
def chunked(original, call: MixerCall, *args, **kwargs):
    """The chunked rule the forward runs on a sequence."""
    return delta_rule(original, call, "Gated DeltaNet delta rule", *args, **kwargs)


@handles("torch_recurrent_gated_delta_rule", "Gated DeltaNet delta rule, token by token")
def recurrent(original, call: MixerCall, *args, **kwargs):
    """The token-by-token rule: the forward calls it only with a cache (decoding, or the states a cache keeps),
    which a context-parallel forward refuses before; any other call runs exactly like the chunked rule."""
    return delta_rule(original, call, "Gated DeltaNet delta rule", *args, **kwargs)
