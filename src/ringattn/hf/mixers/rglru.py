"""RecurrentGemma's RG-LRU (Griffin, Hawk): the linear recurrence its ``_rnn_scan`` method runs.

Per row and channel, ``h_t = a_t * h_{t-1} + x_t`` with ``a_t`` zeroed where the module resets (position 0, a
document's first token): a diagonal transition, ``prod a`` over a span. Each piece runs the module's own scan once,
from a zero state, before the exchange; a piece that continues a state then adds what that state contributes,
``cumprod(a)_t * h_in``, as the scan itself would carry it.

``model.generate()``: the recurrent block keeps its decoding states on itself (``rg_lru.recurrent_states``, and its
convolution's inputs, which ``conv.py``'s Conv1d handler keeps): in the prefill each piece runs from its true
state, so that the state after the prompt's last position is known, and every rank keeps it; each decode step then
runs the module's own one-token scan from it, alike on every rank.
"""

from __future__ import annotations

import inspect

import torch

from ... import mixers as mx
from ...mixers.fragments import agree
from ..refusals import UnsupportedModel, layer_index
from .base import MixerCall, handles

_DEFAULT = object()


@handles("_rnn_scan", "RG-LRU linear recurrence")
def rnn_scan(original, call: MixerCall, module, hidden_states: torch.Tensor, recurrent_gate: torch.Tensor,
             reset: torch.Tensor, recurrent_states: torch.Tensor | None = None, acc_dtype=_DEFAULT):
    """``module._rnn_scan(x, a, reset, h0, acc_dtype) -> (y, h_last)`` with ``x``, ``a`` ``(batch, len, width)``,
    ``reset`` ``(batch | 1, len, 1)``, context-parallel. The state it returns, which the module keeps for its decode
    steps, is in a generate prefill the state after the prompt's last position, on every rank; otherwise NaN (each
    rank's would be its own shard's: a decode step that read it gets NaN, not a wrong number)."""
    if acc_dtype is _DEFAULT:
        acc_dtype = inspect.signature(original).parameters["acc_dtype"].default
    b, n, width = hidden_states.shape
    plan = call.plan(n, b)
    keep = (~reset).to(recurrent_gate.dtype).expand(b, n, 1)
    error = None
    if recurrent_states is not None and bool((recurrent_states != 0).any()) and _continues(plan, keep):
        # The module keeps the last forward's state and starts the next from it; a sequence whose first token resets
        # (position 0) does not read it, one that continues it (a cache passed on) would need it on every rank.
        error = UnsupportedModel(
            f"{call.where}: a recurrent state carried into a context-parallel RG-LRU whose first position is not 0 "
            "(a cache continued by more than one token); prefill the whole prompt at once, or pass use_cache=False "
            "to train or score", layer=layer_index(call.module),
            feature="a carried recurrent state for the RG-LRU")
    # (A generate prefill's plan has the prompt and the layout's padding after it as its documents.)
    start = None if error is not None or call.seq_len else _start_not_reset(plan, keep, call.batch.position_ids)
    if start is not None:
        # The plan starts the document from a zero state; the module normalises its first input as a continuing
        # one's (and one process would carry the state into it): neither that nor the document run alone.
        error = UnsupportedModel(
            f"{call.where}: a packed document starts at position {start}, where position_ids is not 0; the RG-LRU "
            "starts a document where position_ids is 0 (its own rule), so it would run this one as neither the "
            "packed sequence nor the document alone: pass position_ids that restart at 0 at every document "
            "(ringattn.hf.shard_batch(..., position_ids=...) shards them)",
            layer=layer_index(call.module),
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

    if call.seq_len:
        # A generate prefill: each piece from its true state, so that the one ending at the prompt's last position
        # leaves the state after it, which the module keeps for its decode steps, on every rank.
        return call.run_fragments(step, transition, [hidden_states, recurrent_gate, keep], keep_final=True,
                                  kind="diagonal", state_shape=(width,))
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
        rows = rp.batch_rows(b)
        for p in rp.local_pieces(plan.rank):
            if not p.fresh or p.start == 0 or not bool((keep[rows, p.local] != 0).any()):
                continue
            span = None if pos is None else pos[rows, p.local:p.local + p.length]
            if p.start == rp.bounds[-1] and span is not None and bool((span == span[:, :1]).all()):
                continue
            return p.start
    return None


def _continues(plan: mx.Fragments, keep: torch.Tensor) -> bool:
    """Whether the sequence's first position is among this rank's tokens and does not reset in some row."""
    for rp in plan.plans:
        rows = rp.batch_rows(keep.shape[0])
        for p in rp.local_pieces(plan.rank):
            if p.start == 0 and bool((keep[rows, p.local] != 0).any()):
                return True
    return False
