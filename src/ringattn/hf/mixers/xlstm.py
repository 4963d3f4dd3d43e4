"""xLSTM's mLSTM (transformers' ``xLSTMBackend``, run by its pure-torch kernels where the ``xlstm`` package is absent).

Per head the cell keeps ``C`` (K x V) and ``n`` (K) in a stabilised form: the true state is ``C exp(m)``, ``n exp(m)``
with ``m`` a scalar the kernels carry beside them. A token adds ``exp(i_t) k v^T`` and decays the true state by
``sigmoid(f_t)``, so a span's transition is the scalar ``exp(sum log sigmoid(f))`` per head (kind ``log`` of
``ringattn.mixers.run_fragments``). The outputs ``q.C / (max(|q.n|, exp(-m)) + eps)`` are not linear in the state
and depend on ``m`` itself, not only on the true state: each span that continues a document runs again from its
true state, and ``m`` must be the one one process carries, ``m_t = max(b_t + m_0, max_{j<=t} b_t - b_j + i_j)``
(``b`` the running sum of ``log sigmoid(f)``, ``m_0 = 0`` at a document start). A span's summary therefore runs
from an empty state (``m_0`` far below every term), and the fold ``m = max(log M + m_in, m_s)`` rebuilds exactly
that maximum.

The backend's forward is run as the module's own code on each span: in ``inference`` mode whole (its chunked
kernel, then its token-by-token kernel for the rest), in ``train`` mode its chunked kernel over whole chunks and
the same kernel with one shorter chunk for the rest (a span need not be a multiple of ``chunk_size``; the result
does not depend on the chunking). xLSTM has no sLSTM cells in transformers (its blocks are all mLSTM).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..refusals import UnsupportedModel
from .base import MixerCall, _modeling_function, arguments, forward_of, handles_module, refuse_cached_generate

WHAT = "mLSTM (xLSTM) matrix memory"
# What the backend's forward takes: the per-token projections and gates, and the stabilised state (C, n, m).
_ARGS = ("query", "key", "value", "igate", "fgate", "c_initial", "n_initial", "m_initial")


def is_mlstm_backend(module: torch.nn.Module) -> bool:
    """A transformers module whose forward runs the mLSTM from a stabilised state ``(c_initial, n_initial,
    m_initial)`` with the native chunked kernel ringattn calls for the remainder of a span."""
    fwd = forward_of(type(module))
    if fwd is None or not _modeling_function(fwd):
        return False
    params = inspect.signature(fwd).parameters
    return all(a in params for a in _ARGS) and callable(getattr(module, "chunkwise_kernel_fn", None)) and \
        hasattr(getattr(module, "config", None), "chunk_size")


def _refuse(call: MixerCall, why: str, feature: str):
    raise UnsupportedModel(f"{call.where}: {why}", feature=feature)


@handles_module("xLSTMBackend", WHAT, is_mlstm_backend,
                refuse_cached_generate(WHAT, "xLSTMCache, whose rnn_state the model reads; transformers' generate "
                                             "runs xLSTM over the whole sequence at every step either way"))
def mlstm(forward, call: MixerCall, *args, **kwargs):
    """The backend's ``forward(query, key, value, igate, fgate, c_initial, n_initial, m_initial,
    return_last_states, mode)`` (queries ``(batch, heads, len, K)``, gates ``(batch, heads, len)``), context-parallel.
    In a generate prefill it returns the state after the prompt on every rank, as the model stores it in its cache."""
    module = call.module
    config = module.config
    p = arguments(forward, args, kwargs, defaults=True)
    q, k, v, ig, fg = (p[n] for n in _ARGS[:5])
    c0, n0, m0 = p["c_initial"], p["n_initial"], p["m_initial"]
    mode = p["mode"] or config.mode
    if "with_padding" in mode:
        _refuse(call, f"xLSTM's mode {mode!r} pads each call to whole chunks and so returns no state after a span, "
                "which a context-parallel mLSTM passes between the ranks (nor does xLSTMLayer run in it in one "
                "process); set config.mode = 'train' or 'inference'", f"xLSTM mode {mode!r}")
    returns_state = "train" not in mode or (p["return_last_states"] if p["return_last_states"] is not None
                                            else config.return_last_states)
    prefill = call.seq_len > 0
    if c0 is not None or n0 is not None or m0 is not None:
        # A generate prefill passes the cache's fresh state, all zeros: m_0 = 0, the kernels' own start.
        fresh = prefill and all(t is not None and not bool(t.detach().any()) for t in (c0, n0, m0))
        if not fresh:
            _refuse(call, "a recurrent state carried into a context-parallel mLSTM: a cache outside model.generate() "
                    "(use_cache=True, which xLSTM's config defaults to, or cache=...), or xLSTM's own chunked "
                    "inference of a local shard longer than config.max_inference_chunksize; each rank holds a shard "
                    "of the sequence, so no rank's cache would hold the state after it. Pass use_cache=False to "
                    "train or score (model(input_ids=..., use_cache=False), config.max_inference_chunksize at least "
                    "the shard's length); to generate, call model.generate()",
                    "a cache outside model.generate() with xLSTM layers")
    b, heads, n, dk = q.shape
    dv = v.shape[-1]
    cs = config.chunk_size

    def kernel(q_, k_, v_, i_, f_, c, nn, m):
        """The mLSTM over one span, ``(batch, heads, len, ...)``, from the stabilised state (None: zero, m_0 = 0)."""
        if "inference" in mode:
            return forward(q_, k_, v_, i_, f_, c, nn, m, mode=mode)
        whole = q_.shape[2] - q_.shape[2] % cs
        # The chunked kernel keeps its state in the inputs' dtype (it multiplies them together): a passed state too.
        outs, state = [], tuple(None if t is None else t.to(q_.dtype) for t in (c, nn, m))
        for lo, hi, chunk in ((0, whole, cs), (whole, q_.shape[2], q_.shape[2] - whole)):
            if hi > lo:
                span = [t[:, :, lo:hi].contiguous() for t in (q_, k_, v_, i_, f_)]
                h, state = module.chunkwise_kernel_fn(*span, *state, return_last_states=True, eps=config.eps,
                                                      chunk_size=chunk)
                outs.append(h)
        return torch.cat(outs, 2), state

    def step(q_, k_, v_, i_, f_, initial):
        # Pieces come as (rows, span, heads, ...); the kernels take (rows, heads, span, ...).
        t = [x.transpose(1, 2) for x in (q_, k_, v_, i_, f_)]
        if initial is None:
            c = nn = m = None
        else:
            value, scale = initial[:, 0], initial[:, 1]
            c, nn, m = value[..., :dv], value[..., dv], scale[:, :, 0, :1]
        h, (c, nn, m) = kernel(*t, c, nn, m)
        value = torch.cat([c, nn[..., None].to(c.dtype)], -1)
        scale = m.reshape(m.shape[0], heads, 1, 1).to(value.dtype).expand_as(value)
        return h.transpose(1, 2), torch.stack([value, scale], 1)

    def transition(q_, k_, v_, i_, f_):
        ls = F.logsigmoid(f_.to(torch.promote_types(f_.dtype, torch.float32)))
        return ls.sum(1).reshape(f_.shape[0], heads, 1, 1)

    inputs = [x.transpose(1, 2) for x in (q, k, v, ig, fg)]
    y, final = call.run_fragments(step, transition, inputs, keep_final=prefill, kind="log",
                                  state_shape=(2, heads, dk, dv + 1), transition_shape=(heads, 1, 1))
    h = y.transpose(1, 2)
    if not returns_state:
        return h
    if final is None:
        # Outside a prefill the model keeps the state only in a cache, refused above: none to return.
        return h, None
    value, scale = final[:, 0], final[:, 1]
    return h, (value[..., :dv], value[..., dv], scale[:, :, 0, :1])
