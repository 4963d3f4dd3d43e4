"""Lightning attention: linear attention with a scalar decay per head (MiniMax).

The state ``K^T V`` of one batch row, ``(heads, head_dim, head_dim)``, moves per token by ``h_t = exp(-s_h) h_{t-1} +
k_t^T v_t`` and the token reads ``o_t = q_t h_t``, so a span's transition is ``exp(-s_h * length)``, one scalar per
head. The recurrence is inline in the module's forward, which reads its initial state from the cache
(``get_linear_cache``) and writes its final one back (``set_linear_cache``): a span runs the module's own forward
given a cache that holds the span's initial state and keeps its final one.

Given a state, the forward takes its token-by-token path: a Python loop over the span whose autograd graph keeps one
state per token. A span that continues another runs the blocked path from zero instead, and adds what the state it
inherits contributes before the output's norm (``o_t += exp(-s_h (t + 1)) q_t h_in``, ``t`` counted from the span's
start), through a forward pre-hook on the module's ``norm``; the queries come from a forward hook on its activation
(``act_fn``, which the forward applies to the query-key-value projection alone). The norm and the output gate that
follow are nonlinear, so the correction cannot be added to the module's output: the span's forward runs again.
"""

from __future__ import annotations

import torch

from .base import (
    MixerCall,
    arguments,
    cached_generate_refusal,
    calls,
    forward_of,
    handles_module,
    refuse_cached_generate,
)

# What the forward reads and writes that makes it this recurrence: the cache's linear state, the decay per head and
# the blocked path's decay tables.
_NAMES = frozenset({"get_linear_cache", "set_linear_cache", "slope_rate", "query_decay", "key_decay", "diagonal_decay",
                    "block_size", "act_fn", "norm"})


def is_lightning(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward is lightning attention as transformers writes it (MiniMax): it keeps a linear
    state in its cache, decays it by the ``slope_rate`` buffer ``(heads, 1, 1)``, and calls no function of its
    modeling file but the padding mask's."""
    fwd = forward_of(type(module))
    if fwd is None or not _NAMES <= set(fwd.__code__.co_names) or calls(type(module))[2]:
        return False
    slope = getattr(module, "slope_rate", None)
    heads = getattr(module, "num_attention_heads", None)
    return (isinstance(slope, torch.Tensor) and isinstance(heads, int) and tuple(slope.shape) == (heads, 1, 1)
            and all(isinstance(getattr(module, n, None), int) for n in ("head_dim", "layer_idx"))
            and all(isinstance(getattr(module, n, None), torch.nn.Module) for n in ("norm", "act_fn")))


class LinearStateCache:
    """What lightning attention reads from and writes to its cache, for one span: the initial state (None: zero,
    the blocked path) in, the final one out."""

    def __init__(self, initial_state: torch.Tensor | None = None):
        self.initial, self.final = initial_state, None

    def get_linear_cache(self, layer_idx: int):
        return self.initial

    def set_linear_cache(self, layer_idx: int, linear_cache: torch.Tensor) -> None:
        self.final = linear_cache


WHAT = "lightning attention (linear attention with decay)"


WHY = "MiniMax's decoder takes no cache but its own class, MiniMaxCache"


def _check_shape(call: MixerCall, acts: int, norms: int) -> None:
    if acts != 1 or norms != 1:
        # The inherited state's part would be missing or misplaced: never a silently wrong output.
        raise RuntimeError(f"{call.where}: its forward applied act_fn {acts} and norm {norms} times, where lightning "
                           "attention applies each once (to the query-key-value projection, and to the mixed values "
                           "before the output gate)")


@handles_module("lightning_attention", WHAT, is_lightning, refuse_cached_generate(WHAT, WHY))
def run(forward, call: MixerCall, *args, **kwargs):
    """The module's forward over every rank's tokens: ``(output, None)``. The module returns its final state beside
    its output, which the decoder layer drops; no rank holds the whole sequence's."""
    module = call.module
    params = arguments(forward, args, kwargs)
    x = params.pop("hidden_states")
    mask = params.pop("attention_mask", None)
    if params.pop("cache", None) is not None:
        # A plain forward's cache is refused before the module runs (base._mixer_pre), a generate's before the
        # decoder runs (refuse_cached_generate); one that reaches here anyway keeps no state: refused the same.
        raise cached_generate_refusal(call.where, WHAT, WHY)
    heads, d = module.num_attention_heads, module.head_dim
    slope = module.slope_rate
    masked = mask is not None

    def transition(x_, *_):
        return torch.exp(-slope * x_.shape[1]).expand(x_.shape[0], heads, 1, 1)

    def step(x_, *rest):
        *m, initial = rest
        m_ = m[0] if masked else None
        state = LinearStateCache()
        if initial is None:
            # The summary pass runs on every rank before the exchange: the forward's shape (act_fn and norm each
            # applied once, which the correction below hooks into) is checked here, where a failure is every rank's.
            seen = []
            hooks = [mod.register_forward_hook(lambda *a, mod=mod: seen.append(mod))
                     for mod in (module.act_fn, module.norm)]
            try:
                y, _ = forward(x_, attention_mask=m_, cache=state, **params)
            finally:
                for h in hooks:
                    h.remove()
            _check_shape(call, seen.count(module.act_fn), seen.count(module.norm))
            return y, state.final
        qkv, normed = [], []
        n = x_.shape[1]

        def keep(mod, inputs, out):
            qkv.append(out)

        def carried(mod, inputs):
            (o,) = inputs
            normed.append(o.shape)
            q = qkv[-1] if m_ is None else qkv[-1] * m_[:, :, None]
            q = q.reshape(q.shape[0], n, heads, 3 * d)[..., :d]
            decay = torch.exp(-slope.to(initial.dtype) * torch.arange(1, n + 1, device=o.device, dtype=initial.dtype))
            delta = torch.einsum("bnhk,hn,bhkv->bnhv", q.to(initial.dtype), decay[:, 0], initial)
            return (o + delta.reshape(o.shape).to(o.dtype),)

        hooks = (module.act_fn.register_forward_hook(keep), module.norm.register_forward_pre_hook(carried))
        try:
            y, _ = forward(x_, attention_mask=m_, cache=state, **params)
        finally:
            for h in hooks:
                h.remove()
        _check_shape(call, len(qkv), len(normed))
        decay = transition(x_).to(initial.dtype)
        return y, decay * initial + state.final.to(initial.dtype)

    inputs = [x] + ([mask] if masked else [])
    y, _ = call.run_fragments(step, transition, inputs, keep_final=False, kind="diagonal", state_shape=(heads, d, d),
                              transition_shape=(heads, 1, 1))
    return y, None
