"""The short causal convolution in front of Mamba / Mamba2 / Gated DeltaNet / KDA scans, and LFM2's mixer."""

from __future__ import annotations

from ... import mixers as mx
from .base import MixerCall, handles


@handles("causal_conv1d_forward", "causal short convolution")
def conv(original, call: MixerCall, conv1d, hidden_states, cache=None, layer_idx=None, activation=None,
         state_idx: int = 0, **kwargs):
    """``causal_conv1d_forward(conv1d, x (batch, channels, len), ...)``: the depthwise convolution with its
    ``k - 1`` inputs before each fragment fetched from whichever ranks hold them, then the activation. Given a
    cache (a generate prefill), it also keeps the prompt's last ``k`` inputs there for the decode steps."""
    from transformers.activations import ACT2FN

    weight = conv1d.weight.squeeze(1)
    b, _, n = hidden_states.shape
    y = mx.causal_conv1d(hidden_states.transpose(1, 2).to(weight.dtype), weight, conv1d.bias,
                         plan=call.plan(n, b)).transpose(1, 2)
    if activation is not None:
        y = ACT2FN[activation](y)
    if cache is not None:
        call.save_conv_state(cache, hidden_states, layer_idx, state_idx, conv1d.kernel_size[0])
    return y.to(hidden_states.dtype)
