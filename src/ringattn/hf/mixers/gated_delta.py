"""Gated DeltaNet's delta rule: Qwen3-Next, Qwen3.5 (dense and MoE), OLMo-hybrid, LaRA-mini, Qwen4-exp.

The rule keeps a state ``(heads, K, V)`` per row; a token multiplies it on the left by ``exp(g) (I - beta k k^T)``
and adds ``beta k v^T``, so a span's transition is a dense ``K x K`` matrix per head. Each column of the state
evolves alone, so the rule itself computes the transition: run from the identity with zero values, its final
state is ``M``. ``delta_rule`` is shared with Kimi's delta attention (``kda.py``), whose gate is per key channel.
"""

from __future__ import annotations

import torch

from ... import mixers as mx
from ..refusals import UnsupportedModel, layer_index
from .base import MixerCall, arguments, handles

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
    params = arguments(original.forward if isinstance(original, torch.nn.Module) else original, args, kwargs)
    q, k, v, g, beta = (params.pop(n) for n in ("query", "key", "value", "g", "beta"))
    initial_state = params.pop("initial_state", None)
    final = bool(params.pop("output_final_state", False))
    if initial_state is not None:
        raise UnsupportedModel(
            f"{call.where}: a recurrent state carried into a context-parallel {what} (a cache continued by more "
            "than one token: prefill chunking); prefill the whole prompt at once, or pass use_cache=False to train "
            "or score", layer=layer_index(call.module), feature=f"a cached state for {what}")
    rest = {n: x for n, x in params.items() if n not in GLOBAL_KEYWORDS}
    b, n, heads, vd = v.shape
    kd = k.shape[-1]
    plan = call.plan(n, b)
    if not final and plan.world == 1 and all(len(rp.pieces) == 1 for rp in plan.plans):
        # One rank, one document a row: nothing to pass, and no summary pass whose extra columns nobody reads.
        return original(q, k, v, g=g, beta=beta, initial_state=None, output_final_state=False, **rest)
    # What the zero-start pass of each span found, by the span's inputs (held, so that no other tensor can take
    # their memory and key): the transition, read by ``transition``, and for a span run again from its true state,
    # the outputs corrected for that state instead of a second pass.
    done: dict = {}

    def step(q_, k_, v_, g_, beta_, initial_state):
        key = _key((q_, k_, v_, g_, beta_))
        if initial_state is not None:
            hit = done.pop(key, None)
            if hit is None:
                return original(q_, k_, v_, g=g_, beta=beta_, initial_state=initial_state, output_final_state=True,
                                **rest)
            _, y0, ym, s, m = hit
            h0 = initial_state
            # o_t = q_t^T S_t and S_t = M_{<=t} h0 + S_t(0): the output from h0 is the zero-start output plus the
            # identity columns' output (q_t^T M_{<=t}) times h0 (for half inputs both come rounded to the input's
            # dtype, as the rule returns them: the sum is within one unit of the last place of a second pass).
            y = y0.to(h0.dtype) + torch.einsum("bnhk,bhkv->bnhv", ym.to(h0.dtype), h0)
            return y.to(y0.dtype), s.to(h0.dtype) + m.to(h0.dtype) @ h0
        # K more value columns, zero, from the identity: the state's columns evolve alone, so these carry the
        # span's transition out beside its state, and its outputs' part linear in the initial state beside the
        # zero-start outputs, in the same pass.
        rows, length = v_.shape[:2]
        sdtype = mx.summary_dtype(v_.dtype)
        eye = torch.eye(kd, dtype=sdtype, device=v_.device).expand(rows, heads, kd, kd)
        h0 = torch.cat([eye.new_zeros(rows, heads, kd, vd), eye], -1)
        vv = torch.cat([v_, v_.new_zeros(rows, length, heads, kd)], -1)
        y, h = original(q_, k_, vv, g=g_, beta=beta_, initial_state=h0, output_final_state=True, **rest)
        done[key] = ((q_, k_, v_, g_, beta_), y[..., :vd], y[..., vd:], h[..., :vd], h[..., vd:])
        return y[..., :vd], h[..., :vd]

    def transition(q_, k_, v_, g_, beta_):
        hit = done.get(_key((q_, k_, v_, g_, beta_)))
        if hit is not None:
            return hit[4]
        rows, length = v_.shape[:2]
        sdtype = mx.summary_dtype(v_.dtype)
        eye = torch.eye(kd, dtype=sdtype, device=v_.device).expand(rows, heads, kd, kd)
        _, m = original(q_, k_, v_.new_zeros(rows, length, heads, kd), g=g_, beta=beta_, initial_state=eye,
                        output_final_state=True, **rest)
        return m

    # Asked for its final state (a generate prefill): the state after the prompt, on every rank, for decoding.
    return call.run_fragments(step, transition, [q, k, v, g, beta], keep_final=final, kind="dense",
                              state_shape=(heads, kd, vd))


def register_rules(chunked: str, recurrent: str, what: str) -> None:
    """Register a family's chunked rule (what its forward runs on a sequence) and its token-by-token rule (called
    only with a cache: decoding, or the states a cache keeps, which a context-parallel forward refuses before;
    any other call runs exactly like the chunked rule) as ``delta_rule``."""
    def run(original, call: MixerCall, *args, **kwargs):
        return delta_rule(original, call, what, *args, **kwargs)

    handles(chunked, what)(run)
    handles(recurrent, f"{what}, token by token")(run)


register_rules("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "Gated DeltaNet delta rule")
