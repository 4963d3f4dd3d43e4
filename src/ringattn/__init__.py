"""ringattn: exact Ring Attention and context parallelism for PyTorch, on CPU (gloo) and GPU (NCCL).

The public contract is ``docs/api.md``: ``ring_attention``, ``attention``, ``decode_attention``, ``Mask``,
``shard``, ``unshard``, ``profile``, ``Sharding`` / ``sharding_of`` (what a shard remembers) and
``ringattn.hf.register``.
"""

from __future__ import annotations

import warnings

import torch

from . import _aliases
from . import call as _call
from .callspec import Documents, Mask, MaskFn, Slices, merge_mask
from .decode import decode_attention
from .kernels import Backend
from .layouts import LAYOUTS, global_positions
from .modes import BackwardExchange, Layout, Strategy
from .profiling import Stats, profile
from .sharding import Sharding, shard, sharding_of, unshard

__all__ = ["LAYOUTS", "BackwardExchange", "Layout", "Mask", "Sharding", "Stats", "Strategy", "attention",
           "decode_attention",
           "global_positions", "profile", "ring_attention", "shard", "sharding_of", "unshard"]
__version__ = "0.1.0"
_aliases.install()


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None,
                   mask: Mask | None = None, causal: bool = False, window: tuple[int, int] | None = None,
                   layout: Layout | str | None = None, seq_len: int | None = None, q_seq_len: int | None = None,
                   cu_seqlens: Documents | None = None, softmax_scale: float | None = None,
                   return_lse: bool = False, backward_exchange: BackwardExchange | str = BackwardExchange.RING,
                   kv_heads_per_gather: int | None = None, backend: str | Backend | None = None,
                   softcap: float | None = None, sinks: torch.Tensor | None = None, chunk_size: int | None = None,
                   alibi_slopes: torch.Tensor | None = None, mask_mod: MaskFn | None = None,
                   slices: Slices | None = None, uneven: bool | None = None, sharding: Sharding | None = None,
                   kv_head_chunk: int | None = None):
    """Exact attention over a sequence split across the ranks of ``group``.

    Args:
        q: ``(batch, q_local_len, heads, head_dim)``, this rank's queries (``q_local_len`` is
            ``local_len`` unless ``q_seq_len`` gives fewer queries than keys).
        k: ``(batch, local_len, kv_heads, head_dim)``; ``heads % kv_heads == 0`` and query head ``i``
            reads key/value head ``i // (heads // kv_heads)``. Only the kv_heads travel.
        v: ``(batch, local_len, kv_heads, v_head_dim)``.
        group: the process group holding the sequence (None = default group; without an
            initialised ``torch.distributed``, exact single-process attention).
        mask: a ``ringattn.Mask``: the mask keywords below (``causal``, ``window``, ``cu_seqlens`` as its
            ``documents``, ``chunk_size``, ``slices``, ``mask_mod``, ``seq_len``) as one value; a field set
            both there and as a keyword is an error.
        causal: keep key ``j`` for query ``i`` iff ``j <= i`` (global positions).
        window: ``(left, right)``: keep ``i - left <= j <= i + right``; -1 = unbounded on that side.
        layout: ``"contiguous"``, ``"zigzag"``, ``"striped"`` or ``"balanced"`` (``ringattn.Layout``):
            which global positions each rank holds (see ``ringattn.shard``; balanced places them by the
            documents of ``cu_seqlens``). Left out: what q, k, v remember (below), else contiguous.
        seq_len: the true global length; positions ``>= seq_len`` are padding, never attended to.
            None = what k and v remember, else ``world * local_len``.
        q_seq_len: the number of real queries, which are the *last* ``q_seq_len`` of the ``seq_len`` key
            positions (bottom-right causal: chunked prefill). q is sharded like k, same layout, over its
            own rows (``ringattn.shard`` of the full queries); query rows past ``q_seq_len`` are padding.
            None = ``seq_len`` if q and k have the same local length, else ``world * q_local_len``.
        cu_seqlens: int tensor ``[0, ..., seq_len]`` of packed-document boundaries (batch 1), or a list of
            one per batch row (rows packed differently: each row runs as a call of its own).
        softmax_scale: None = ``1 / sqrt(head_dim)``.
        return_lse: also return the logsumexp ``(batch, heads, local_len)``, float32 (float64 for
            float64 input).
        backward_exchange: how the backward moves blocks, ``"ring"`` (the paper's) or ``"direct"``; see
            Note [Backward exchange: ring vs direct] in ``ringattn/schedule.py``. Results are identical.
        kv_heads_per_gather: only for ``attention(strategy="allgather")``: K/V heads gathered per step
            (``kv_head_chunk``: its deprecated spelling).
        backend: the per-block kernel: None (chosen by device and dtype), a name in
            ``ringattn.kernels.BACKENDS`` or a ``ringattn.kernels.Backend``.
        softcap: Gemma 2's logit softcapping, scores ``cap * tanh(s / cap)`` before the mask.
        sinks: ``(heads,)`` attention-sink logits (gpt-oss): one more term of every row's softmax
            denominator; differentiable (each rank's gradient is the part of its own rows).
        chunk_size: chunked attention (Llama 4): keys only in the query's chunk, ``i // c == j // c``.
        alibi_slopes: ``(heads,)`` ALiBi slopes: scores ``s - slope_h * (i - j)`` on global positions.
        mask_mod: ``fn(q_idx, kv_idx) -> bool tensor`` on global positions (broadcasting int64 tensors), ANDed
            with the other masks; or ``fn(b, h, q_idx, kv_idx)``, run as one call per batch row and head.
        slices: ``[((q0, q1), (k0, k1), kind), ...]`` rectangles on global positions, kind ``"full"``,
            ``"causal"`` (bottom-right), ``"inv-causal"`` or ``"bi-causal"``; their union is visible.
        uneven: ranks hold their ``ringattn.layouts.uneven_lengths`` share of ``seq_len`` (required), no
            padding (``ringattn.shard(..., uneven=True)``).
        sharding: a ``ringattn.Sharding`` kept from a shard (``ringattn.sharding_of``), for k and v (and q
            unless it remembers its own) that no longer remember it (copies).

    Tensors made by ``ringattn.shard`` (and views of them) remember how (``ringattn.sharding_of``):
    ``layout``, ``seq_len``, ``q_seq_len``, ``uneven`` and the balanced layout's ``cu_seqlens`` left out
    are taken from them; a value passed that contradicts them (a ``seq_len`` past the length sharded, or
    anything else that differs), q, k, v sharded differently, or a sequence not in dim 1 is an error on
    every rank.

    Returns:
        ``out`` ``(batch, q_local_len, heads, v_head_dim)`` in q's dtype, or ``(out, lse)``. Rows that see
        no key (padding under a document mask) are 0 with lse ``-inf``. Differentiable in q, k and v.
        Both remember the call's sharding of the query rows, so ``ringattn.unshard(out)`` needs no
        arguments.
    """
    options = merge_mask(mask, _renamed(_given(locals()), "ring_attention"), "ring_attention")
    return _call.enter(q, k, v, strategy=Strategy.RING, group=group, **options)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strategy: Strategy | str = Strategy.RING,
              group=None, mesh=None, mask: Mask | None = None, causal: bool = False,
              window: tuple[int, int] | None = None, layout: Layout | str | None = None, seq_len: int | None = None,
              q_seq_len: int | None = None, cu_seqlens: Documents | None = None, softmax_scale: float | None = None,
              return_lse: bool = False, backward_exchange: BackwardExchange | str = BackwardExchange.RING,
              kv_heads_per_gather: int | None = None, backend: str | Backend | None = None,
              softcap: float | None = None,
              sinks: torch.Tensor | None = None, chunk_size: int | None = None,
              alibi_slopes: torch.Tensor | None = None, mask_mod: MaskFn | None = None,
              slices: Slices | None = None, uneven: bool | None = None, sharding: Sharding | None = None,
              kv_head_chunk: int | None = None):
    """Context-parallel attention by any strategy; same keywords, contract and results as
    ``ring_attention``.

    ``strategy``: ``"ring"``, ``"allgather"``, ``"ulysses"``, ``"hybrid"`` (needs a 2-D ``mesh``) or
    ``"auto"`` (the planner chooses).
    """
    options = merge_mask(mask, _renamed(_given(locals()), "attention"), "attention")
    return _call.enter(q, k, v, strategy=strategy, group=group, mesh=mesh, **options)


_NOT_OPTIONS = frozenset({"q", "k", "v", "group", "mesh", "strategy", "mask"})


def _given(args: dict) -> dict:
    """The call's keywords (``Options`` fields) that were set: None means left out (a layout, length,
    documents or sharding left out is taken from what the shards remember)."""
    return {name: val for name, val in args.items() if name not in _NOT_OPTIONS and val is not None}


def _renamed(options: dict, who: str) -> dict:
    """``kv_heads_per_gather`` under the name the strategies' tuning rules use (``kv_head_chunk``, also its
    deprecated spelling, which warns)."""
    if "kv_head_chunk" in options:
        if "kv_heads_per_gather" in options:
            raise ValueError(f"{who}: pass kv_heads_per_gather= only (kv_head_chunk= is its deprecated spelling)")
        warnings.warn("kv_head_chunk= is renamed kv_heads_per_gather=", DeprecationWarning, stacklevel=3)
    elif "kv_heads_per_gather" in options:
        options["kv_head_chunk"] = options.pop("kv_heads_per_gather")
    return options


def __getattr__(name):
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(name)
