"""Mamba2's selective scan (SSD): Mamba2, Bamba, Granite-4.0-H, Nemotron-H, Falcon-H1, Zamba2."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MixerCall, StateCache, handles


@handles("mamba2_scan_forward", "Mamba2 selective scan (SSD)")
def scan(original, call: MixerCall, module, hidden_states, B, C, dt, cache=None, **kwargs):
    """``mamba2_scan_forward(module, x, B, C, dt, cache)``: the state ``(heads, head_dim, state)`` decays by
    ``exp(A_h * sum dt)`` per head over a span, so a span's transition is one scalar per head. Every piece runs the
    scan once, from a zero state, on every rank at once; a piece that continues another then adds the part of its
    outputs due to the state it inherits. Given a cache (a generate prefill), the state after the prompt goes
    there, as the scan's own code would put it."""
    b, n, _ = hidden_states.shape
    heads = module.num_heads
    a = -torch.exp(module.A_log.float())
    lo, hi = module.time_step_limit

    def discretised(d):
        # As the scan discretises dt: softplus(dt + dt_bias), clamped to the module's limits.
        return torch.clamp(F.softplus(d + module.dt_bias.to(d.dtype)), min=lo, max=hi)

    def transition(x, b_, c, d):
        return torch.exp(a.to(d.dtype) * discretised(d).sum(1)).view(-1, heads, 1, 1)

    def step(x, b_, c, d, initial_state):
        # Always from a zero state: a piece that continues another adds ``correct``'s part after the exchange.
        state = StateCache(None)
        y = original(module, x, b_, c, d, state, **kwargs)
        return y, state.final

    def correct(x, b_, c, d, initial_state):
        # The state a piece inherits reaches its outputs through C alone: y_t += C_t . (exp(cumsum A dt)_t h_in),
        # per head (B and C shared by the heads of a group).
        rows, length = x.shape[:2]
        h = initial_state
        decay = torch.exp(a.to(h.dtype) * discretised(d).to(h.dtype).cumsum(1))  # (rows, span, heads)
        cc = c.view(rows, length, module.n_groups, -1).repeat_interleave(heads // module.n_groups, dim=2)
        y = torch.einsum("bthn,bhpn->bthp", cc.to(h.dtype), h) * decay[..., None]
        return y.reshape(rows, length, -1)

    y, final = call.run_fragments(step, transition, [hidden_states, B, C, dt], keep_final=cache is not None,
                                  correct=correct, kind="diagonal",
                                  state_shape=(heads, module.head_dim, module.ssm_state_size),
                                  transition_shape=(heads, 1, 1))
    if cache is not None:
        cache.update_recurrent_state(final, module.layer_idx)
    return y


@handles("mamba2_split_conv1d_scan_combined", "fused Mamba2 convolution and scan")
def fused(original, call: MixerCall, *args, **kwargs):
    """The fused kernel would run the convolution and the scan over the local shard alone: returning None sends
    the mixer down its unfused path, whose convolution and scan are the ones handled above."""
    return None
