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

from ... import mixers as mx
from ..refusals import UnsupportedModel, layer_index
from .base import MixerCall, StateCache, handles


def _run(zero_start, a, bias, softplus: bool, x, dt, b_, c, z, call: MixerCall) -> torch.Tensor:
    """The scan over every rank's tokens: inputs ``(batch, d_inner | state, len)`` as the scans take them,
    ``zero_start(x, dt, B, C, z) -> (y, final state)`` on a span from a zero state (sequence in dim 1)."""
    batch, channels, n = x.shape

    def discretised(d):
        # As the scan: dt + bias in dt's dtype, then softplus; accumulated in at least float32.
        if bias is not None:
            d = d + bias.to(d.dtype)
        d = F.softplus(d) if softplus else d
        return d.to(torch.promote_types(d.dtype, torch.float32))

    def transition(x, d, b_, c, *z):
        return torch.exp(a * discretised(d).sum(1)[..., None])

    # A piece that continues another runs twice under run_fragments (its summary, then from its true state): the
    # second run is the first one's output plus the correction, so the scan itself runs once per piece. Keyed by
    # the piece's view of x, kept alive with the entry so that no other tensor can take its address meanwhile.
    zero_runs: dict = {}

    def step(x, d, b_, c, *rest):
        *z, h_in = rest
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
        if h_in is None or key not in zero_runs:
            y, h = zero_start(x, d, b_, c, z[0] if z else None)
        else:
            _, y, h = zero_runs.pop(key)
        if h_in is None:
            zero_runs[key] = (x, y, h)
            return y, h
        decay = torch.exp(a * discretised(d).cumsum(1)[..., None])  # (rows, span, d_inner, state)
        carried = (decay * h_in[:, None].to(decay.dtype) * c[:, :, None, :].to(decay.dtype)).sum(-1)
        if z:
            carried = carried * F.silu(z[0])
        return y + carried.to(y.dtype), decay[:, -1] * h_in + h

    inputs = [x.transpose(1, 2), dt.transpose(1, 2), b_, c] + ([] if z is None else [z.transpose(1, 2)])
    y = mx.run_fragments(step, transition, inputs, plan=call.plan(n, batch), kind="diagonal",
                         state_shape=(channels, a.shape[-1]))
    return y.transpose(1, 2)


@handles("mamba_scan_forward", "Mamba selective scan")
def scan(original, call: MixerCall, module, hidden_states, time_step, B, C, gate, cache=None, **kwargs):
    """``mamba_scan_forward(module, x, dt, B, C, gate, cache)`` (Mamba, Falcon-Mamba, Jamba): ``x``, ``dt``,
    ``gate`` ``(batch, d_inner, len)``, ``B``, ``C`` ``(batch, len, state)``; returns the gated output with the
    ``D`` skip term, ``(batch, d_inner, len)``."""
    a = -torch.exp(module.A_log.float())
    bias = module.dt_proj.bias.float() if module.dt_proj.bias is not None else None

    def zero_start(x, d, b_, c, z):
        state = StateCache(None)
        y = original(module, x.transpose(1, 2), d.transpose(1, 2), b_, c, z.transpose(1, 2), state, **kwargs)
        return y.transpose(1, 2), state.final

    return _run(zero_start, a, bias, True, hidden_states, time_step, B, C, gate, call)


@handles("mamba_selective_scan", "Mamba selective scan")
def selective_scan(original, call: MixerCall, hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus: bool = False, return_last_state: bool = False, **kwargs):
    """``mamba_selective_scan(x, dt, A, B, C, D, z, delta_bias, delta_softplus, ...)`` (Zamba, one call per head):
    ``x``, ``dt``, ``z`` ``(batch, d_inner, len)``, ``B``, ``C`` ``(batch, state, len)``, ``A`` ``(d_inner, state)``."""
    if return_last_state:
        raise UnsupportedModel(
            f"{call.where}: its selective scan was asked for its final state (a cache to fill), which under context "
            "parallelism only the rank holding the last token knows; generation of models with such layers is not "
            "supported yet: pass use_cache=False to train or score",
            layer=layer_index(call.module), feature="generation with recurrent or convolution layers")

    def zero_start(x, d, b_, c, g):
        y, h = original(x.transpose(1, 2), d.transpose(1, 2), A, b_.transpose(1, 2), c.transpose(1, 2), D=D,
                        z=None if g is None else g.transpose(1, 2), delta_bias=delta_bias,
                        delta_softplus=delta_softplus, return_last_state=True, **kwargs)
        return y.transpose(1, 2), h

    return _run(zero_start, A, delta_bias, delta_softplus, hidden_states, dt, B.transpose(1, 2), C.transpose(1, 2),
                z, call)


@handles("mamba_selective_state_update", "Mamba one-token state update")
def state_update(original, call: MixerCall, *args, **kwargs):
    """One token from a cached state: only decoding calls it, which a prepared mixer refuses before."""
    raise UnsupportedModel(
        f"{call.where}: a one-token step from a cached recurrent state (decoding) under context parallelism; "
        "generation of models with such layers is not supported yet: pass use_cache=False to train or score",
        layer=layer_index(call.module), feature="generation with recurrent or convolution layers")


@handles("mamba_inner_fn", "fused Mamba convolution, scan and projections")
def fused(original, call: MixerCall, *args, **kwargs):
    """The fused kernel would run the convolution and the scan over the local shard alone: returning None sends
    the mixer down its unfused path (its forward takes None as "no kernel"), whose convolution and scan are the
    ones handled above."""
    return None
