"""Mamba2's selective scan (SSD): Mamba2, Bamba, Granite-4.0-H, Nemotron-H, Falcon-H1, Zamba2."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MixerCall, StateCache, handles


@handles("mamba2_scan_forward", "Mamba2 selective scan (SSD)")
def scan(original, call: MixerCall, module, hidden_states, B, C, dt, cache=None, **kwargs):
    """``mamba2_scan_forward(module, x, B, C, dt, cache)``: the state ``(heads, head_dim, state)`` decays by
    ``exp(A_h * sum dt)`` per head over a span, so a span's transition is one scalar per head. Given a cache (a
    generate prefill), the state after the prompt goes there, as the scan's own code would put it."""
    b, n, _ = hidden_states.shape
    heads = module.num_heads
    a = -torch.exp(module.A_log.float())
    lo, hi = module.time_step_limit

    def transition(x, b_, c, d):
        # As the scan discretises dt: softplus(dt + dt_bias), clamped to the module's limits.
        d = torch.clamp(F.softplus(d + module.dt_bias.to(d.dtype)), min=lo, max=hi)
        return torch.exp(a.to(d.dtype) * d.sum(1)).view(-1, heads, 1, 1)

    def step(x, b_, c, d, initial_state):
        if initial_state is not None and x.shape[1] == 1:
            # One token from a state is the scan's decode path, which updates a state in place (no gradient):
            # run it from zero and add what the state contributes, h = M h0 + S and y += C . (M h0).
            y, s = step(x, b_, c, d, None)
            h = transition(x, b_, c, d).to(s.dtype) * initial_state.to(s.dtype)
            cc = c.view(c.shape[0], module.n_groups, -1).repeat_interleave(heads // module.n_groups, dim=1)
            y = y + torch.einsum("bhpn,bhn->bhp", h, cc.to(h.dtype)).reshape(y.shape).to(y.dtype)
            return y, h + s
        state = StateCache(initial_state)
        y = original(module, x, b_, c, d, state, **kwargs)
        return y, state.final

    y, final = call.run_fragments(step, transition, [hidden_states, B, C, dt], keep_final=cache is not None,
                                  kind="diagonal", state_shape=(heads, module.head_dim, module.ssm_state_size),
                                  transition_shape=(heads, 1, 1))
    if cache is not None:
        cache.update_recurrent_state(final, module.layer_idx)
    return y


@handles("mamba2_split_conv1d_scan_combined", "fused Mamba2 convolution and scan")
def fused(original, call: MixerCall, *args, **kwargs):
    """The fused kernel would run the convolution and the scan over the local shard alone: returning None sends
    the mixer down its unfused path, whose convolution and scan are the ones handled above."""
    return None
