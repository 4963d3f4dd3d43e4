"""RecurrentGemma's RG-LRU (Griffin, Hawk): the linear recurrence its ``_rnn_scan`` method runs.

Per row and channel, ``h_t = a_t * h_{t-1} + x_t`` with ``a_t`` zeroed where the module resets (position 0, a
document's first token): a diagonal transition, ``prod a`` over a span. Each piece runs the module's own scan once,
from a zero state, before the exchange; a piece that continues a state then adds what that state contributes,
``cumprod(a)_t * h_in``, as the scan itself would carry it.
"""

from __future__ import annotations

import inspect

import torch

from ... import mixers as mx
from ...mixers.fragments import agree
from ..refusals import UnsupportedModel
from .base import MixerCall, handles

_DEFAULT = object()


@handles("_rnn_scan", "RG-LRU linear recurrence")
def rnn_scan(original, call: MixerCall, module, hidden_states: torch.Tensor, recurrent_gate: torch.Tensor,
             reset: torch.Tensor, recurrent_states: torch.Tensor | None = None, acc_dtype=_DEFAULT):
    """``module._rnn_scan(x, a, reset, h0, acc_dtype) -> (y, h_last)`` with ``x``, ``a`` ``(batch, len, width)``,
    ``reset`` ``(batch | 1, len, 1)``, context-parallel. The state it returns (which the module keeps for a decode
    step) is NaN: each rank's would be its own shard's, and a decode step reading it gets NaN, not a wrong
    number."""
    if acc_dtype is _DEFAULT:
        acc_dtype = inspect.signature(original).parameters["acc_dtype"].default
    b, n, width = hidden_states.shape
    plan = call.plan(n, b)
    error = None
    if call.seq_len:
        error = UnsupportedModel(
            f"{call.where}: model.generate() needs the RG-LRU state after the prompt and the convolution inputs "
            "before it on every rank, which this model's recurrent block keeps on the module itself and ringattn "
            "does not keep yet: generation with this model under context parallelism is not supported; generate "
            "without context parallelism (ringattn trains and scores it: use_cache=False, or a plain forward)",
            layer=getattr(call.module, "layer_idx", None), feature="generation with RG-LRU layers")
    elif recurrent_states is not None and bool((recurrent_states != 0).any()):
        # A state carried in from an earlier forward (a cache continued): its rank's own shard's at best.
        error = UnsupportedModel(
            f"{call.where}: a recurrent state carried into a context-parallel RG-LRU (the module keeps the last "
            "forward's when a cache is passed on); pass use_cache=False, or a new cache, to train or score",
            layer=getattr(call.module, "layer_idx", None), feature="a carried recurrent state for the RG-LRU")
    keep = (~reset).to(recurrent_gate.dtype).expand(b, n, 1)
    start = None if error is not None else _start_not_reset(plan, keep, call.batch.position_ids)
    if start is not None:
        # The plan starts the document from a zero state; the module normalises its first input as a continuing
        # one's (and one process would carry the state into it): neither that nor the document run alone.
        error = UnsupportedModel(
            f"{call.where}: a packed document starts at position {start}, where position_ids is not 0; the RG-LRU "
            "starts a document where position_ids is 0 (its own rule), so it would run this one as neither the "
            "packed sequence nor the document alone: pass position_ids that restart at 0 at every document "
            "(ringattn.hf.shard_batch(..., position_ids=...) shards them)",
            layer=getattr(call.module, "layer_idx", None),
            feature="packed documents whose position_ids do not restart at 0 with RG-LRU layers")
    agree(plan, error, f"{call.where}: RG-LRU")

    def step(x, a, k, h0):
        return original(module, x, a, k == 0, h0, acc_dtype)

    def gates(a, k, dtype):
        return (a * k).to(dtype)

    def transition(x, a, k):
        return gates(a, k, mx.summary_dtype(x.dtype)).prod(1)

    def correct(x, a, k, h0):
        return torch.cumprod(gates(a, k, h0.dtype), 1) * h0[:, None]

    y = mx.run_fragments(step, transition, [hidden_states, recurrent_gate, keep], plan=plan, kind="diagonal",
                         state_shape=(width,), correct=correct)
    return y, torch.full((b, width), float("nan"), dtype=acc_dtype, device=hidden_states.device)


def _start_not_reset(plan: mx.Fragments, keep: torch.Tensor, position_ids: torch.Tensor | None) -> int | None:
    """The global position of a document start (after the first) among this rank's tokens where the module does
    not reset (``keep`` is 1 there), or None. The layout's padding, a last document of one repeated position
    (``shard_batch`` repeats the last one), is no document of the sequence: no real token reads it."""
    b, n = keep.shape[:2]
    pos = position_ids.expand(b, n) if position_ids is not None and position_ids.shape[-1] == n else None
    for rp in plan.plans:
        rows = list(rp.rows) if rp.rows is not None else list(range(b))
        for p in rp.local_pieces(plan.rank):
            if not p.fresh or p.start == 0 or not bool((keep[rows, p.local] != 0).any()):
                continue
            span = None if pos is None else pos[rows, p.local:p.local + p.length]
            if p.start == rp.bounds[-1] and span is not None and bool((span == span[:, :1]).all()):
                continue
            return p.start
    return None
