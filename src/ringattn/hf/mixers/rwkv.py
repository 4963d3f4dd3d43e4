"""RWKV-4: the WKV recurrence (``rwkv_linear_attention``) and the token shift in front of both its time mixing
and its channel mixing (``time_shift = nn.ZeroPad2d((0, 0, 1, -1))``, in ``RwkvSelfAttention`` and
``RwkvFeedForward`` alike).

WKV keeps per channel a numerator and a denominator stabilised by a running maximum: the true state is
``(num, den) * exp(max)``. A token multiplies both by ``exp(w)``, ``w = -exp(time_decay)``, and adds
``exp(k) * (v, 1)``, so a span of ``n`` tokens moves the state by the scalar ``exp(n w)`` per channel. The
summaries fold in the log domain (``run_fragments(kind="log")``) with the state ``(2, 2, channels)``: the value
``(num, den)`` and, for both, the log scale ``max``. The output ``num / den`` is not linear in the state, so a piece
that continues a document runs again from its true state (no correction).

The token shift gives each token the one before it (zero at a document start): a depthwise causal convolution
with kernel ``[1, 0]``, whose one-token halo ``ringattn.mixers.causal_conv1d`` fetches from whichever rank holds it
and whose backward returns that token's gradient there. The shift is matched as what it is (a zero pad of one row
before dim -2, the last row cut), not by the name of the module holding it.

RWKV passes its recurrent state through the model as ``state`` (a list of tensors, not a Cache): a context-parallel
forward refuses one (``use_cache=True``, the config's default in eval mode, or ``state=...``), and with it
``model.generate()`` with a cache; ``model.generate(..., use_cache=False)`` runs each step as a whole forward.
"""

from __future__ import annotations

import torch

from ... import mixers as mx
from ..refusals import UnsupportedModel
from .base import MixerCall, handles, handles_module


def is_token_shift(module: torch.nn.Module) -> bool:
    """``nn.ZeroPad2d((0, 0, 1, -1))``: on ``(batch, len, channels)`` row ``t`` of its output is row ``t - 1`` of
    its input, row 0 zero."""
    return isinstance(module, torch.nn.ZeroPad2d) and tuple(module.padding) == (0, 0, 1, -1)


@handles_module("token shift", "token shift (each token reads the one before it)", is_token_shift)
def token_shift(forward, call: MixerCall, hidden: torch.Tensor) -> torch.Tensor:
    """The shift over every rank's tokens: row ``t`` gets the token before it in its document, from the rank
    holding it, zero where ``t`` starts a document."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise UnsupportedModel(
            f"{call.where}: a token shift (ZeroPad2d((0, 0, 1, -1))) applied to a tensor of shape "
            f"{tuple(getattr(hidden, 'shape', ()))}; ringattn shifts (batch, len, channels) along len only",
            feature="a token shift on other than (batch, len, channels)")
    b, n, c = hidden.shape
    kernel = hidden.new_zeros(c, 2)
    kernel[:, 0] = 1  # tap 0 reads position t - 1, tap 1 position t
    # A copy: the convolution's output may be a view made inside its autograd function, which the module's own
    # code writes into where it is given a state (to be refused after, by the WKV it feeds).
    return mx.causal_conv1d(hidden, kernel, plan=call.plan(n, b)).clone()


def _refuse_state(call: MixerCall) -> None:
    layer = getattr(call.module, "layer_id", None)
    if call.seq_len:
        raise UnsupportedModel(
            f"{call.where}: model.generate() needs RWKV's state after the prompt on every rank (each layer's last "
            "token-shift inputs and WKV numerator, denominator and maximum, which RWKV passes through the model as "
            "`state`, not in a Cache); ringattn does not keep it yet: call model.generate(..., use_cache=False), which "
            "runs every step context-parallel over the whole sequence (one full forward per new token), or generate "
            "without context parallelism", layer=layer, feature="model.generate() with RWKV is not supported yet")
    raise UnsupportedModel(
        f"{call.where}: a recurrent state given to or asked of a context-parallel RWKV WKV (use_cache=True, which "
        "RWKV's config defaults to in eval mode, or state=...): each rank holds a shard of the sequence, so no "
        "rank's state would be the one after it. Pass use_cache=False to train or score "
        "(model(input_ids=..., use_cache=False)) and to generate (model.generate(..., use_cache=False))",
        layer=layer, feature="an RWKV state (use_cache=True or state=...) under context parallelism")


@handles("rwkv_linear_attention", "RWKV WKV recurrence")
def wkv(original, call: MixerCall, time_decay, time_first, key, value, state=None, return_state: bool = False):
    """``rwkv_linear_attention(time_decay, time_first, key, value)`` with ``key``, ``value`` ``(batch, len,
    channels)``: every rank's pieces from their true initial states. Returns ``(output, None)`` as the original does
    without a state."""
    if state is not None or return_state:
        _refuse_state(call)
    b, n, c = key.shape
    plan = call.plan(n, b)
    if plan.world == 1 and all(len(rp.pieces) == 1 for rp in plan.plans):
        return original(time_decay, time_first, key, value)
    run = original
    if torch.is_grad_enabled() and any(t.requires_grad for t in (time_decay, time_first, key, value)):
        # The CUDA kernel's backward gives no gradient to a state given or returned, which carry the gradient
        # between pieces here; the modeling file's pure-torch fallback runs instead.
        run = getattr(original, "__globals__", {}).get("rwkv_linear_attention_cpu")
        if run is None:
            raise UnsupportedModel(
                f"{call.where}: this transformers' RWKV has no pure-torch WKV (rwkv_linear_attention_cpu) to run "
                "context-parallel with gradients; train it without context parallelism",
                layer=getattr(call.module, "layer_id", None), feature="RWKV WKV without its pure-torch fallback")
    log_decay = -torch.exp(time_decay)  # per token, as the fallback computes it

    def packed(num, den, top):
        return torch.stack([torch.stack([num, den], 1), torch.stack([top, top], 1)], 1)

    def step(k, v, initial):
        if initial is None:
            y, (num, den, top) = run(time_decay, time_first, k, v, state=None, return_state=True)
            return y, packed(num, den, top)
        value_, scale = initial[:, 0], initial[:, 1]
        if bool((scale <= mx.EMPTY_LOG_SCALE / 2).all()):
            # The summary pass of a piece that continues a document (run_fragments gives it the empty state): only
            # its state after the span is read, whose closed form is one vectorised pass where the WKV is a loop
            # over the tokens; its outputs come from the run from its true state.
            return k.new_zeros(()).expand(k.shape), packed(*summary(k, v))
        top = scale.amax(1)  # num and den share their log scale; the fold keeps it so
        num, den = (value_ * torch.exp(scale - top[:, None])).unbind(1)
        y, (num, den, top) = run(time_decay, time_first, k, v, state=[num, den, top], return_state=True)
        return y, packed(num, den, top)

    def summary(k, v):
        # Token t of n adds exp(k_t) (v_t, 1), decayed by exp(w) for each token after it: the true state after the
        # span is sum_t exp(k_t + (n - 1 - t) w) (v_t, 1), kept as its maximum exponent and what multiplies it.
        # Keys in float32, as the WKV reads them.
        n = k.shape[1]
        e = k.float() + torch.arange(n - 1, -1, -1, device=k.device, dtype=log_decay.dtype)[:, None] * log_decay
        top = e.amax(1)
        weight = torch.exp(e - top[:, None])
        return (weight * v).sum(1), weight.sum(1), top

    def transition(k, v):
        return (k.shape[1] * log_decay).expand(k.shape[0], 1, c)

    y = mx.run_fragments(step, transition, [key, value], plan=plan, kind="log", state_shape=(2, 2, c),
                         transition_shape=(1, c))
    return y, None
