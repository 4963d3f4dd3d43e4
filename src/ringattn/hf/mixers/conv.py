"""The short causal convolution in front of Mamba / Mamba2 / Gated DeltaNet / KDA scans, and LFM2's mixer; and a
depthwise ``Conv1d`` module called as such (RecurrentGemma's, in front of its RG-LRU)."""

from __future__ import annotations

import torch

from ... import mixers as mx
from ..refusals import UnsupportedModel, layer_index
from .base import MixerCall, handles, handles_module


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


def _depthwise_causal(m: torch.nn.Module) -> bool:
    """A ``Conv1d`` run by its own forward that is a depthwise convolution along the sequence with ``k - 1`` zeros
    of padding on each side, whose first ``len`` outputs are the causal convolution (RecurrentGemma's ``conv_1d``;
    the caller slices them off). Other convolutions (strided, dilated, mixing channels, other padding) are left to
    the model-wide check, which refuses them."""
    if not isinstance(m, torch.nn.Conv1d) or type(m).forward is not torch.nn.Conv1d.forward:
        return False
    k = m.kernel_size[0]
    return (k > 1 and m.groups == m.in_channels == m.out_channels and m.stride == (1,) and m.dilation == (1,)
            and m.padding == (k - 1,) and m.padding_mode == "zeros")


@handles_module("Conv1d", "causal depthwise convolution (Conv1d, padding k - 1)", _depthwise_causal,
                part_of_function_mixers=True)
def conv_module(forward, call: MixerCall, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: A002
    """The module's output on this rank's ``(batch, channels, local_len)``: the causal convolution of the whole
    sequence at the local positions, every document on its own (``ringattn.mixers.causal_conv1d``), then ``k - 1``
    more positions, NaN. One process returns there the convolution of the sequence's last inputs with the padding
    after them, which no rank can give for its shard: a caller that reads them gets NaN, not a wrong number.
    In a generate prefill, the module holding it keeps the prompt's last ``k - 1`` inputs for its decode steps
    (RecurrentGemma's recurrent block, ``conv1d_state``, from its own shard): replaced by the prompt's, on every
    rank."""
    m = call.module
    k = m.kernel_size[0]
    if args or kwargs or not isinstance(input, torch.Tensor) or input.dim() != 3:
        shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
        raise UnsupportedModel(
            f"{call.where}: a context-parallel Conv1d takes one batched input (batch, channels, len), got {shape}"
            f"{' and more arguments' if args or kwargs else ''}; run this model without context parallelism",
            layer=layer_index(m), feature="a Conv1d called other than on one batched input")
    holder = _holder(call) if call.seq_len else None
    if call.seq_len:
        if holder is None or not hasattr(holder, "conv1d_state"):
            raise UnsupportedModel(
                f"{call.where}: model.generate() needs the convolution inputs of the prompt's last {k - 1} positions "
                "where its caller keeps them for decoding, which ringattn knows only for RecurrentGemma's recurrent "
                "block (conv1d_state): generation with this model under context parallelism is not supported; "
                "generate without context parallelism", layer=layer_index(m),
                feature="generation with a Conv1d whose caller keeps its state")
        if holder.conv1d_state is not None:  # (None: generating without a cache, it keeps none)
            # The caller kept its own shard's last inputs: the prompt's, on every rank (zeros before position 0).
            holder.conv1d_state = call.conv_tail(input, k - 1)
    b, c, n = input.shape
    weight = m.weight
    y = mx.causal_conv1d(input.transpose(1, 2).to(weight.dtype), weight, m.bias, plan=call.plan(n, b))
    y = y.transpose(1, 2).to(input.dtype)
    return torch.cat([y, y.new_full((b, c, k - 1), float("nan"))], -1)


def _holder(call: MixerCall) -> torch.nn.Module | None:
    """The module whose child the convolution is, within its decoder layer (None: not found)."""
    layer = call.module.__dict__.get("_ringattn_layer")
    mods = layer.modules() if layer is not None else ()
    return next((h for h in mods if any(c is call.module for c in h.children())), None)
