"""Projections that mix tokens only through causal convolutions they pad themselves and a one-token delay (Zaya's
CCA: q/k through two stacked ``Conv1d`` on an ``F.pad``-ed input, half of each value head from the previous
token): the module's own forward runs on each of this rank's pieces extended by the tokens before it that its
outputs can see (``ringattn.mixers.causal_windows``).

Such a module is recognised by what it does: every ``Conv1d`` in it unpadded with stride 1 (its forward pads),
its forward calling ``F.pad`` and keeping a conv state and a recurrent state in the cache (decode reads the last
``conv_kernel_size`` conv inputs and one recurrent state), and its ``conv_kernel_size`` the stacked convolutions'
reach. Its recurrent state is the previous token's: checked once per module, before its first context-parallel
forward, by the module's own forward on a short input (a token's change must not reach the outputs more than
``history`` tokens later); a module that carries more is refused by name.
"""

from __future__ import annotations

import inspect

import torch

from ... import mixers as mx
from ...mixers.fragments import agree
from ..refusals import UnsupportedModel, layer_index
from .base import MixerCall, arguments, forward_of, handles_module

# What the forward must call: a padding of its own, and the cache's conv and recurrent states.
_CALLS = frozenset({"pad", "get_conv_state", "update_conv_state", "get_recurrent_state", "update_recurrent_state"})
_PARAMS = ["hidden_states", "cache", "conv_mask"]
WHAT = "causal convolutions and a one-token delay it pads itself"


def _convs(module: torch.nn.Module) -> list[torch.nn.Conv1d]:
    return [c for c in module.modules() if isinstance(c, torch.nn.Conv1d)]


def reach(module: torch.nn.Module) -> int:
    """How many tokens before a position its stacked convolutions see."""
    return sum(c.dilation[0] * (c.kernel_size[0] - 1) for c in _convs(module))


def history(module: torch.nn.Module) -> int:
    """How many tokens before each piece the module's forward is given: its convolutions' reach, and one for the
    delayed token."""
    return max(reach(module), 1)


def matches(module: torch.nn.Module) -> bool:
    convs = _convs(module)
    if not convs or any(c.padding != (0,) or c.stride != (1,) or c.padding_mode != "zeros" for c in convs):
        return False
    fwd = forward_of(type(module))
    if fwd is None or not _CALLS <= set(fwd.__code__.co_names):
        return False
    params = [p for p in inspect.signature(fwd).parameters if p != "self"]
    return params == _PARAMS and getattr(module, "conv_kernel_size", None) == reach(module)


def _bind(forward, args, kwargs) -> tuple[torch.Tensor, object, torch.Tensor | None]:
    a = arguments(forward, args, kwargs, defaults=True)
    return a["hidden_states"], a.get("cache"), a.get("conv_mask")


@handles_module("causal_window", WHAT, matches)
def run(forward, call: MixerCall, *args, **kwargs):
    """The module's forward over this rank's pieces, each extended by the ``history`` tokens before it (fewer at a
    document start, where the module's own zero padding applies as on the document alone). In a generate prefill,
    the module's own forward on the prompt's last ``history`` tokens then writes its cache (the conv inputs and the
    delayed value decoding reads), on every rank."""
    x, cache, mask = _bind(forward, args, kwargs)
    b, n = x.shape[:2]
    plan = call.plan(n, b)
    h = history(call.module)
    error = None
    try:
        if cache is not None and not call.seq_len:
            raise UnsupportedModel(
                f"{call.where}: a cache given to a context-parallel {WHAT} outside model.generate() (use_cache=True, "
                "which this model's config defaults to, or past_key_values): each rank holds a shard of the sequence, "
                "so no rank's cache would hold the states after it. Pass use_cache=False to train or score; to "
                "generate, call model.generate()", layer=layer_index(call.module),
                feature="a cache outside model.generate() with convolution layers")
        _check_delay(forward, call, x, h)
    except Exception as e:  # noqa: BLE001 - raised on every rank by agree
        error = e
    agree(plan, error, call.where)
    inputs = [x] if mask is None else [x, mask]

    def piece(xe, me=None):
        return forward(xe, None, me)

    out = mx.causal_windows(piece, inputs, h, plan=plan)
    if cache is not None:
        tail = [call.prompt_tail(t, h) for t in inputs]
        with torch.no_grad():
            forward(tail[0], cache, *tail[1:])
        call.kept += 1
    return out


def _check_delay(forward, call: MixerCall, x: torch.Tensor, h: int) -> None:
    """The module's outputs more than ``h`` tokens after a change of its input are unchanged (its recurrent state
    is the previous token's), once per module, on a random input of ``h + 3`` tokens."""
    module = call.module
    if module.__dict__.get("_ringattn_window_checked") == h:
        return
    g = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(1, h + 3, x.shape[-1], generator=g, dtype=torch.float64).to(x.device, x.dtype)
    moved = probe.clone()
    moved[:, 0] += 1
    with torch.no_grad():
        a, b = forward(probe, None, None), forward(moved, None, None)
    for s, t in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        if not torch.equal(s[:, h + 1:], t[:, h + 1:]):
            raise UnsupportedModel(
                f"{call.where}: its outputs depend on tokens more than {h} positions back (a recurrent state that "
                "carries more than the previous token, beside its convolutions), which ringattn's context-parallel "
                f"{WHAT} does not pass between the ranks; not supported (run this model without context parallelism)",
                layer=layer_index(module),
                feature="a recurrent state carried past its convolutions' reach is not context-parallel")
    module.__dict__["_ringattn_window_checked"] = h
