"""Mamba1's selective scan: Mamba, Falcon-Mamba, Jamba (``mamba_scan_forward``) and Zamba (``mamba_selective_scan``).

The state ``(d_inner, state)`` of one batch row moves per token by ``h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t``
(elementwise ``A`` of shape ``(d_inner, state)``, ``dt_t`` per channel), so a span's transition is the diagonal
``exp(A * sum_t dt_t)``. transformers' scans run from a zero state only (their loop ignores a cached state), so a
span that continues another runs from zero and adds what the state it inherits contributes: ``C_t . (exp(A *
cumsum dt)_t * h_in)`` per channel, through the same gate as the scan's output (the ``D`` skip term does not depend
on the state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..refusals import UnsupportedModel, layer_index
from .base import MixerCall, StateCache, handles


def _run(zero_start, a, bias, softplus: bool, x, dt, b_, c, z, call: MixerCall, keep_final: bool):
    """The scan over every rank's tokens: inputs ``(batch, d_inner | state, len)`` as the scans take them,
    ``zero_start(x, dt, B, C, z) -> (y, final state)`` on a span from a zero state (sequence in dim 1). Returns
    ``(y, final)``: with ``keep_final`` (a generate prefill), the state after the prompt on every rank."""
    batch, channels, n = x.shape

    def discretised(d):
        # As the scan: dt + bias in dt's dtype, then softplus; accumulated in at least float32.
        if bias is not None:
            d = d + bias.to(d.dtype)
        d = F.softplus(d) if softplus else d
        return d.to(torch.promote_types(d.dtype, torch.float32))

    def transition(x, d, b_, c, *z):
        return torch.exp(a * discretised(d).sum(1)[..., None])

    def step(x, d, b_, c, *rest):
        *z, h_in = rest  # always None: with ``correct`` every piece runs from a zero state
        return zero_start(x, d, b_, c, z[0] if z else None)

    def correct(x, d, b_, c, *rest):
        *z, h_in = rest
        decay = torch.exp(a * discretised(d).cumsum(1)[..., None])  # (rows, span, d_inner, state)
        carried = (decay * h_in[:, None].to(decay.dtype) * c[:, :, None, :].to(decay.dtype)).sum(-1)
        return carried * F.silu(z[0]) if z else carried

    inputs = [x.transpose(1, 2), dt.transpose(1, 2), b_, c] + ([] if z is None else [z.transpose(1, 2)])
    y, final = call.run_fragments(step, transition, inputs, keep_final=keep_final, correct=correct,
                                  kind="diagonal", state_shape=(channels, a.shape[-1]))
    return y.transpose(1, 2), final


@handles("mamba_scan_forward", "Mamba selective scan")
def scan(original, call: MixerCall, module, hidden_states, time_step, B, C, gate, cache=None, **kwargs):
    """``mamba_scan_forward(module, x, dt, B, C, gate, cache)`` (Mamba, Falcon-Mamba, Jamba): ``x``, ``dt``,
    ``gate`` ``(batch, d_inner, len)``, ``B``, ``C`` ``(batch, len, state)``; returns the gated output with the
    ``D`` skip term, ``(batch, d_inner, len)``. Given a cache (a generate prefill), the state after the prompt goes
    there, as the scan's own code would put it."""
    if cache is not None and cache.get_recurrent_states_to_keep(module.layer_idx) > 0:
        raise UnsupportedModel(
            f"{call.where}: the cache asks the selective scan for the states after each of the last tokens (it records "
            "the past, for assisted decoding), which a context-parallel prefill does not compute; generate without "
            "an assistant model", layer=layer_index(call.module),
            feature="intermediate recurrent states under context parallelism")
    a = -torch.exp(module.A_log.float())
    bias = module.dt_proj.bias.float() if module.dt_proj.bias is not None else None

    def zero_start(x, d, b_, c, z):
        state = StateCache(None)
        y = original(module, x.transpose(1, 2), d.transpose(1, 2), b_, c, z.transpose(1, 2), state, **kwargs)
        return y.transpose(1, 2), state.final

    y, final = _run(zero_start, a, bias, True, hidden_states, time_step, B, C, gate, call,
                    keep_final=cache is not None)
    if cache is not None:
        cache.update_recurrent_state(final, module.layer_idx)
    return y


@handles("mamba_selective_scan", "Mamba selective scan")
def selective_scan(original, call: MixerCall, hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus: bool = False, return_last_state: bool = False, **kwargs):
    """``mamba_selective_scan(x, dt, A, B, C, D, z, delta_bias, delta_softplus, ...)`` (Zamba, one call per head):
    ``x``, ``dt``, ``z`` ``(batch, d_inner, len)``, ``B``, ``C`` ``(batch, state, len)``, ``A`` ``(d_inner, state)``.
    Asked for its final state (``return_last_state``: a generate prefill), it returns the state after the prompt,
    on every rank, for the module to store."""
    if return_last_state and not call.seq_len:
        raise UnsupportedModel(
            f"{call.where}: its selective scan was asked for its final state (a cache to fill) outside the prefill of "
            "model.generate(), where each rank holds a shard of the sequence and no rank's state is the one after "
            "it: pass use_cache=False to train or score, or call model.generate()",
            layer=layer_index(call.module), feature="a cache outside model.generate() with recurrent "
            "or convolution layers")

    def zero_start(x, d, b_, c, g):
        y, h = original(x.transpose(1, 2), d.transpose(1, 2), A, b_.transpose(1, 2), c.transpose(1, 2), D=D,
                        z=None if g is None else g.transpose(1, 2), delta_bias=delta_bias,
                        delta_softplus=delta_softplus, return_last_state=True, **kwargs)
        return y.transpose(1, 2), h

    y, final = _run(zero_start, A, delta_bias, delta_softplus, hidden_states, dt, B.transpose(1, 2),
                    C.transpose(1, 2), z, call, keep_final=return_last_state)
    return (y, final) if return_last_state else y


@handles("mamba_selective_state_update", "Mamba one-token state update")
def state_update(original, call: MixerCall, *args, **kwargs):
    """One token from a cached state: decoding calls it outside any context-parallel forward (each rank runs the
    token alike on the state the prefill left); inside one, a state was carried into a sharded forward."""
    raise UnsupportedModel(
        f"{call.where}: a one-token step from a cached recurrent state inside a context-parallel forward (a cache "
        "continued by a forward of its own: prefill chunking); prefill the whole prompt at once with "
        "model.generate(), or pass use_cache=False to train or score",
        layer=layer_index(call.module), feature="a cached state for the Mamba selective scan")


@handles("mamba_inner_fn", "fused Mamba convolution, scan and projections")
def fused(original, call: MixerCall, *args, **kwargs):
    """The fused kernel would run the convolution and the scan over the local shard alone: returning None sends
    the mixer down its unfused path (its forward takes None as "no kernel"), whose convolution and scan are the
    ones handled above."""
    return None
