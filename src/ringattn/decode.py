"""Decode attention over a KV cache sharded across ranks (the flash-decoding / tree-attention merge).

Each rank holds a slice of the cache: some keys/values and their global positions. A new token's query
attends to the local slice only, giving a partial ``(out, lse)``; the partials are merged across ranks
by logsumexp, exactly as ring attention merges blocks. One all-gather of ``(out, lse)`` per call moves
``heads * (v_head_dim + 1)`` numbers per query token and rank — O(heads * head_dim), independent of the
context length. Every rank merges the same gathered data in the same order, so all ranks end with
bit-identical outputs (generation relies on it: every rank samples the same token).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from . import comm, profiling
from .call import checked
from .callspec import MASK_KINDS, Mask, MaskFn, Slices, merge_mask
from .kernels import acc_dtype
from .masks import MaskContext, MaskSpec, RowHeadMask, spec_fields, takes_four
from .scores import ScoreMod, check_alibi_slopes, check_per_head, check_softcap, merge_sinks, sink_digest
from .validate import check_chunk_size, check_cu_seqlens, check_mask_mod, check_slices, describe_mask

# Decoding has no padded length: empty cache slots are marked by a negative position instead.
_NO_PADDING = 2**62


def _renamed_scale(scale: float | None, softmax_scale: float | None) -> float | None:
    if scale is None:
        return softmax_scale
    if softmax_scale is not None:
        raise ValueError("decode_attention: pass softmax_scale= only (scale= is its deprecated spelling)")
    warnings.warn("decode_attention(scale=) is renamed softmax_scale=, as in ring_attention", DeprecationWarning,
                  stacklevel=3)
    return scale


def decode_spec(causal: bool = True, window: tuple[int, int] | None = None,
                doc_bounds: tuple[int, ...] | None = None, chunk: int | None = None, mask_mod=None,
                slices=None, kinds: tuple[tuple[str, object], ...] = (), batch: int = 1) -> MaskSpec:
    """The mask of a decode call, on global positions (the same predicate as every other path); ``kinds``:
    registered kinds (``Mask(name=...)``), checked by their ``MaskKind``."""
    if window is not None:
        window = (int(window[0]), int(window[1]))
        if window == (-1, -1):
            window = None
    terms = spec_fields(dict(kinds), MaskContext(_NO_PADDING, _NO_PADDING, batch), decode=True).get("terms", ())
    return MaskSpec(seq_len=_NO_PADDING, causal=causal, window=window, doc_bounds=doc_bounds, chunk=chunk,
                    mask_mod=check_mask_mod(mask_mod), slices=check_slices(slices, _NO_PADDING), terms=terms)


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                      k_pos: torch.Tensor, *, scale: float | None = None, causal: bool = True,
                      window: tuple[int, int] | None = None, heads_first: bool = False,
                      spec: MaskSpec | None = None, scores: ScoreMod | None = None,
                      mask_mod4=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries over one cache slice, unnormalised across slices.

    Args:
        q: ``(b, t, heads, d)`` queries at global positions ``q_pos`` ``(t,)``.
        k, v: ``(b, n, kv_heads, d)`` / ``(b, n, kv_heads, dv)`` cached keys/values at global positions
            ``k_pos`` ``(n,)`` (``(b, kv_heads, n, d)`` with ``heads_first``, the cache's own layout, which
            reads each head's keys contiguously); a negative position marks an empty slot.
        causal: keep ``k_pos <= q_pos``. window: ``(left, right)``, -1 = unbounded.
        spec: the whole mask instead of ``causal``/``window`` (e.g. with packed documents).
        scores: softcap / ALiBi (``ringattn.scores.ScoreMod``), applied as in ``ring_attention``.
        mask_mod4: a 4-argument ``mask_mod(b, h, q_idx, kv_idx)``, ANDed with ``spec``.

    Returns:
        ``out`` ``(b, t, heads, dv)`` and ``lse`` ``(b, t, heads)``, both float32 (float64 for float64
        input); rows that see nothing are out 0, lse ``-inf``.
    """
    acc = acc_dtype(q.dtype)
    b, t, h, d = q.shape
    if not heads_first:
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    kvh = k.shape[1]
    g = h // kvh
    scale = d ** -0.5 if scale is None else scale
    spec = decode_spec(causal, window) if spec is None else spec
    keep = spec.visible(q_pos[:, None], k_pos[None, :]) & (k_pos >= 0)[None, :]
    # Grouped-query attention without repeating K/V: query head i reads kv head i // g, so the g heads
    # of a group and the t queries form the rows of one (g*t, n) score matrix per kv head.
    qg = q.to(acc).reshape(b, t, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
    s = torch.matmul(qg, k.to(acc).transpose(-1, -2)) * scale  # (b, kvh, g*t, n)
    s = s.view(b, kvh, g, t, -1)
    if scores is not None and scores.alibi_slopes is not None:
        dist = (q_pos[:, None] - k_pos[None, :]).to(acc)  # exact: positions subtract as integers
        s = s - scores.alibi_slopes.to(acc).view(kvh, g, 1, 1) * dist
    if scores is not None and scores.softcap is not None:
        s = torch.tanh(s / scores.softcap) * scores.softcap
    if mask_mod4 is not None:  # broadcast over the (b, kv head, group, t, n) scores; head = kv head * g + i
        heads = torch.arange(h, device=s.device).view(1, kvh, g, 1, 1)
        rows = torch.arange(b, device=s.device).view(b, 1, 1, 1, 1)
        keep = keep & mask_mod4(rows, heads, q_pos.view(1, 1, 1, t, 1), k_pos.view(1, 1, 1, 1, -1))
    s = s.masked_fill(~keep, float("-inf")).view(b, kvh, g * t, -1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
    out = torch.matmul(p, v.to(acc))  # (b, kvh, g*t, dv)
    out = out.view(b, kvh, g, t, -1).permute(0, 3, 1, 2, 4).reshape(b, t, h, -1)
    return out, lse.view(b, kvh, g, t).permute(0, 3, 1, 2).reshape(b, t, h)


def merge_partials(out: torch.Tensor, lse: torch.Tensor, *, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge every rank's partial ``(out (b, t, h, dv), lse (b, t, h))`` of the same queries.

    One all-gather of the packed ``[out | lse]``; the result is identical on every rank.
    """
    _, world = comm.group_rank_world(group)
    if world == 1:
        return out, lse
    packed = torch.cat([out, lse[..., None]], dim=-1).contiguous()
    gathered = packed.new_empty((world * packed.shape[0], *packed.shape[1:]))
    profiling.count_bytes(packed.numel() * packed.element_size())
    try:
        comm.gather_op()(gathered, packed, group=group)
    except RuntimeError as e:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
        raise comm.PeerError(f"ringattn: decoding could not merge the ranks' partial attention; a peer rank "
                             f"probably died or timed out: {comm.first_line(e)}") from e
    gathered = gathered.view(world, *packed.shape)
    outs, lses = gathered[..., :-1], gathered[..., -1]
    m = lses.amax(dim=0)
    m_safe = m.masked_fill(torch.isneginf(m), 0.0)  # rows nobody sees: weights all 0, out 0
    w = torch.exp(lses - m_safe)  # (W, b, t, h); exp(-inf) = 0 for empty slices
    den = w.sum(dim=0)
    merged = (w[..., None] * outs).sum(dim=0) / den.clamp_min(torch.finfo(den.dtype).tiny)[..., None]
    return merged, m_safe + torch.log(den)


def _check(q, k, v, q_pos, k_pos, window) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("q_pos", q_pos), ("k_pos", k_pos)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a 4-D float tensor (batch, len, heads, dim), got {t.dtype} "
                             f"{tuple(t.shape)}")
    if q_pos.dim() != 1 or q_pos.shape[0] != q.shape[1] or q_pos.dtype.is_floating_point:
        raise ValueError(f"q_pos must be 1-D int with one position per query ({q.shape[1]}), got "
                         f"{q_pos.dtype} {tuple(q_pos.shape)}")
    if k_pos.dim() != 1 or k_pos.shape[0] != k.shape[1] or k_pos.dtype.is_floating_point:
        raise ValueError(f"k_pos must be 1-D int with one position per cached key ({k.shape[1]}), got "
                         f"{k_pos.dtype} {tuple(k_pos.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]})")
    if window is not None and not (isinstance(window, (tuple, list)) and len(window) == 2
                                   and all(isinstance(w, int) and w >= -1 for w in window)):
        raise ValueError(f"window must be (left, right) with ints >= -1, got {window!r}")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                     k_pos: torch.Tensor, *, group=None, mask: Mask | None = None,
                     softmax_scale: float | None = None, causal: bool | None = None,
                     window: tuple[int, int] | None = None, cu_seqlens: torch.Tensor | None = None,
                     return_lse: bool = False, softcap: float | None = None, sinks: torch.Tensor | None = None,
                     chunk_size: int | None = None, alibi_slopes: torch.Tensor | None = None,
                     mask_mod: MaskFn | None = None, slices: Slices | None = None, scale: float | None = None):
    """Exact attention of new queries over a KV cache split across ``group``: local partial + merge.

    Arguments as in ``partial_attention`` (``k``, ``v``, ``k_pos`` are this rank's cache slice; every rank
    passes the same ``q`` and ``q_pos``); ``cu_seqlens`` (packed documents, as for ``ring_attention``)
    keeps each query to the keys of its own document, queries past the last boundary continuing the last
    document; ``softmax_scale``, ``softcap``, ``sinks``, ``chunk_size``, ``alibi_slopes``, ``mask_mod`` (2
    or 4 arguments) and ``slices`` as in ``ring_attention``. ``mask``: a ``ringattn.Mask`` for the mask
    keywords (a field set both ways is an error; a cache has no padding, so no ``seq_len``). ``causal``:
    None = causal, unless ``mask`` says otherwise. ``scale``: a deprecated spelling of
    ``softmax_scale``.
    Returns ``out`` ``(b, t, heads, dv)`` in q's dtype, or ``(out, lse)``. Not differentiable (inference).
    """
    softmax_scale = _renamed_scale(scale, softmax_scale)
    given = {name: val for name, val in (("causal", causal), ("window", window), ("cu_seqlens", cu_seqlens),
                                         ("chunk_size", chunk_size), ("slices", slices), ("mask_mod", mask_mod))
             if val is not None}
    if mask is not None:
        if isinstance(mask, Mask) and mask.seq_len is not None:
            raise ValueError("decode_attention: a KV cache has no padding to cut off; leave Mask.seq_len out "
                             "(empty cache slots take a negative position in k_pos)")
        given = {"causal": False, **merge_mask(mask, given, "decode_attention")}
    causal, window, cu_seqlens = given.get("causal", True), given.get("window"), given.get("cu_seqlens")
    chunk_size, slices, mask_mod = given.get("chunk_size"), given.get("slices"), given.get("mask_mod")
    kinds = given.get(MASK_KINDS, ())
    scale = softmax_scale

    def make():
        _check(q, k, v, q_pos, k_pos, window)
        bounds = None
        if cu_seqlens is not None:
            # Generated tokens continue the last document: positions past its end belong to it, so the
            # last boundary is dropped (bounds mark where documents start).
            bounds = check_cu_seqlens(cu_seqlens, int(cu_seqlens[-1]), q.shape[0])[:-1]
        mods = ScoreMod(check_softcap(softcap), check_alibi_slopes(alibi_slopes, q.shape[2], q))
        sink = check_per_head("sinks", sinks, q.shape[2], q)
        four = takes_four(mask_mod)
        spec = decode_spec(causal, window, bounds, check_chunk_size(chunk_size), None if four else mask_mod, slices,
                           kinds, q.shape[0])
        if four:  # checked as the 2-argument form of row 0, head 0 would be
            check_mask_mod(RowHeadMask(mask_mod, 0, 0))
        # The mask as the ring's agreement describes it: a mask_mod by its answers on probe positions, here
        # those up to the newest query (every key position is at most that), so ranks with different
        # functions or tables disagree before anything runs.
        seen = dataclasses.replace(spec, seq_len=int(q_pos.max()) + 1 if q_pos.numel() else 0)
        return (spec, mods if mods.kinds else None, sink, mask_mod if four else None), (
            f"decode q{tuple(q.shape)} kv_heads={k.shape[2]} dv={v.shape[3]} {q.dtype} "
            f"{describe_mask(seen, seen.seq_len, q.device)} "
            f"scale={scale!r} {mods.describe()} sinks={sink_digest(sink)}"
            f" mask_mod4={RowHeadMask(mask_mod, 0, 0) if four else None}")

    spec, mods, sink, four = checked(make, group, q)
    out, lse = partial_attention(q, k, v, q_pos, k_pos, scale=scale, spec=spec, scores=mods, mask_mod4=four)
    out, lse = merge_partials(out, lse, group=group)
    if sink is not None:  # (b, t, h) rows: the sink merge wants heads before rows
        out, lse = merge_sinks(out, lse.transpose(1, 2), sink)
        lse = lse.transpose(1, 2)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
