"""Causal depthwise convolution over a sharded sequence: each fragment reads the k - 1 inputs before it
from whichever ranks hold them, cut at document starts.

Every rank contributes the last ``min(length, k - 1)`` rows of each of its fragments to one all-gather;
the k - 1 positions before any fragment lie in those tails (a fragment ending before position ``s`` that
holds one of ``s - k + 1 .. s - 1`` holds it among its last k - 1 rows), also when they span several
fragments on several ranks. The gather's backward (one all-reduce of the tails' gradients) returns each
halo row's gradient to its owner. Striped layouts (every token its own fragment) regroup to contiguous
by one all-to-all each way instead, which moves less than (k - 1) tails per token.

``causal_windows`` uses the same tails for a function that pads itself (a module's own forward): each piece is
given to it with the tokens before it, rather than convolved here.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch

from .fragments import Fragments, Tie, agree, all_gather, as_contiguous, check_sharding, regroup

WHAT = "ringattn.mixers.causal_conv1d"


def _check(x, weight, bias, plan) -> int:
    if not isinstance(plan, Fragments):
        raise TypeError(f"{WHAT}: plan must come from ringattn.mixers.fragments(...), got {type(plan).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"{WHAT}: x must be a tensor (batch, local_len, channels), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[1] != plan.local_len:
        raise ValueError(f"{WHAT}: x holds {x.shape[1]} tokens on rank {plan.rank}, the plan {plan.local_len} "
                         f"({plan.describe()})")
    if plan.local_len == 0:
        raise ValueError(f"{WHAT}: rank {plan.rank} holds no tokens; every rank needs at least one")
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 3) or weight.shape[0] != x.shape[2] \
            or (weight.dim() == 3 and weight.shape[1] != 1) or weight.shape[-1] < 1:
        raise ValueError(f"{WHAT}: weight must be (channels, k) or (channels, 1, k) (depthwise, as Conv1d with "
                         f"groups=channels) for {x.shape[2]} channels, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (x.shape[2],)):
        raise ValueError(f"{WHAT}: bias must have shape ({x.shape[2]},), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    for rp in plan.plans:
        if rp.rows is not None and max(rp.rows) >= x.shape[0]:
            raise ValueError(f"{WHAT}: cu_seqlens has more rows of documents than the batch of {x.shape[0]}")
    if sum(len(rp.rows) if rp.rows is not None else x.shape[0] for rp in plan.plans) != x.shape[0]:
        raise ValueError(f"{WHAT}: cu_seqlens holds fewer rows of documents than the batch of {x.shape[0]}")
    return weight.shape[-1]


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  plan: Fragments) -> torch.Tensor:
    """``conv1d(x, weight, bias, groups=channels)`` with ``k - 1`` zeros of left padding, of the whole
    sequence, every document on its own (its first token sees no earlier document), on this rank's shard
    ``x`` of shape ``(batch, local_len, channels)``; ``weight`` ``(channels, k)`` or ``(channels, 1, k)``.
    Returns ``(batch, local_len, channels)``. Every rank must call it (collectives)."""
    error, extra = None, None
    try:
        check_sharding(plan, x)
        k = _check(x, weight, bias, plan)
        extra = (k, tuple(x.shape[::2]), x.dtype, x.requires_grad)
    except Exception as e:  # noqa: BLE001 - raised on every rank by agree
        error = e
    agree(plan, error, WHAT, extra)
    w = weight.reshape(weight.shape[0], k)
    if plan.scattered and k > 1:
        target = as_contiguous(plan)
        y = _conv(regroup([x], plan, target)[0], w, target, k)
        y = regroup([y], target, plan)[0]
    else:
        y = _conv(x, w, plan, k)
    return y if bias is None else y + bias


def _conv(x: torch.Tensor, w: torch.Tensor, plan: Fragments, k: int) -> torch.Tensor:
    batch, _, channels = x.shape
    h = k - 1
    if h == 0:
        return x * w[:, 0]
    slots = plan.fragment_slots()
    gathered = _gather_tails(x, plan, h, slots)  # (W, batch, slots, k - 1, channels)

    outs, order = [], []
    for rp in plan.plans:
        rows = rp.batch_rows(batch)
        xr = x if rp.rows is None else x.index_select(0, torch.tensor(rows, device=x.device))
        g = gathered if rp.rows is None else gathered[:, torch.tensor(rows, device=x.device)]
        # (rows, W * slots * (k - 1) + 1, channels): every tail row, then a zero row for positions < 0
        flat = g.permute(1, 0, 2, 3, 4).reshape(len(rows), -1, channels)
        flat = torch.cat([flat, flat.new_zeros(len(rows), 1, channels)], 1)
        zero_row = flat.shape[1] - 1
        frags = sorted((start, length, r, f) for r in range(plan.world)
                       for f, (_, start, length) in enumerate(rp.fragments[r]))
        starts = [f[0] for f in frags]
        pieces = []
        for local, start, length in rp.fragments[plan.rank]:
            idx = []
            for p in range(start - h, start):
                if p < 0:
                    idx.append(zero_row)
                    continue
                s, n, r, f = frags[bisect.bisect_right(starts, p) - 1]
                idx.append(((r * slots + f) * h) + h - (s + n - p))
            halo = flat.index_select(1, torch.tensor(idx, device=x.device))
            ext = torch.cat([halo, xr.narrow(1, local, length)], 1)
            pos = torch.arange(start, start + length)
            first = torch.tensor([rp.doc_start(int(q)) for q in pos])
            y = 0
            for j in range(k):
                # tap j reads position pos - h + j: cut at the token's document start
                keep = (pos - h + j >= first).to(x.dtype).to(x.device)[:, None]
                y = y + ext[:, j:j + length] * (w[:, j] * keep)
            pieces.append(y)
        outs.append(torch.cat(pieces, 1))
        order += rows
    y = torch.cat(outs, 0)
    if order != list(range(batch)):
        y = y[torch.tensor(_inverse(order), device=y.device)]
    if gathered.requires_grad:
        y = Tie.apply(y, gathered)
    return y


def _inverse(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for i, b in enumerate(order):
        inv[b] = i
    return inv


WINDOWS = "ringattn.mixers.causal_windows"


def causal_windows(fn: Callable, inputs: Sequence[torch.Tensor], history: int, *, plan: Fragments):
    """``fn``, a function of whole sequences whose output at each position depends on the inputs at that position
    and the ``history`` before it only (causal convolutions, token shifts and delays it pads itself), run on a
    sharded sequence: each of this rank's pieces is given to ``fn`` extended by the up to ``history`` tokens
    before it in its document, fetched from whichever ranks hold them (fewer at a document start, where ``fn``'s
    own padding applies, as on the document alone), and the outputs of the fetched tokens are dropped.

    ``inputs``: this rank's tensors ``(batch, local_len, ...)`` (any dtypes), ``fn(*extended)`` returns a tensor
    or a tuple of tensors ``(batch, extended_len, ...)``; the result is the same structure of ``(batch,
    local_len, ...)``. Gradients of the fetched tokens return to the ranks that hold them. Every rank must call
    it (collectives); striped layouts regroup contiguously for ``fn`` (one all-to-all each way per tensor)."""
    error = None
    try:
        if not isinstance(plan, Fragments):
            raise TypeError(f"{WINDOWS}: plan must come from ringattn.mixers.fragments(...), got "
                            f"{type(plan).__name__}")
        if not isinstance(history, int) or isinstance(history, bool) or history < 0:
            raise ValueError(f"{WINDOWS}: history must be a non-negative int, got {history!r}")
        if not inputs or any(not isinstance(x, torch.Tensor) or x.dim() < 2 for x in inputs):
            raise ValueError(f"{WINDOWS}: inputs must be tensors (batch, local_len, ...)")
        check_sharding(plan, *inputs)
        if any(tuple(x.shape[:2]) != tuple(inputs[0].shape[:2]) for x in inputs) \
                or inputs[0].shape[1] != plan.local_len:
            raise ValueError(f"{WINDOWS}: inputs hold {[tuple(x.shape[:2]) for x in inputs]} (batch, tokens) on rank "
                             f"{plan.rank}; the plan {plan.local_len} tokens ({plan.describe()})")
        if plan.local_len == 0:
            raise ValueError(f"{WINDOWS}: rank {plan.rank} holds no tokens; every rank needs at least one")
        batch = inputs[0].shape[0]
        if sum(len(rp.rows) if rp.rows is not None else batch for rp in plan.plans) != batch:
            raise ValueError(f"{WINDOWS}: cu_seqlens holds other rows of documents than the batch of {batch}")
    except Exception as e:  # noqa: BLE001 - raised on every rank by agree
        error = e
    extra = None if error is not None else \
        (history, [(tuple(x.shape[::2]), *x.shape[3:], x.dtype, x.requires_grad) for x in inputs])
    agree(plan, error, WINDOWS, extra)
    if plan.scattered and history > 0:
        target = as_contiguous(plan)
        out = _windows(fn, [regroup([x], plan, target)[0] for x in inputs], history, target)
        back = [regroup([y], target, plan)[0] for y in (out if isinstance(out, tuple) else (out,))]
        return tuple(back) if isinstance(out, tuple) else back[0]
    return _windows(fn, list(inputs), history, plan)


def _windows(fn, inputs: list[torch.Tensor], h: int, plan: Fragments):
    batch = inputs[0].shape[0]
    slots = plan.fragment_slots()
    # Each fragment's last h rows (zeros before short ones), every rank's, per input: a piece that continues a
    # document from another fragment finds the up to h positions before it among them.
    gathered = [_gather_tails(x, plan, h, slots) for x in inputs] if h > 0 else []
    outs, order, single = [], [], None
    for rp in plan.plans:
        rows = rp.batch_rows(batch)
        index = None if rp.rows is None else torch.tensor(rows, device=inputs[0].device)
        xs = [x if index is None else x.index_select(0, index) for x in inputs]
        # (rows, W * slots * h, ...): every tail row of every rank
        flats = [(g if index is None else g.index_select(1, index)).transpose(0, 1).flatten(1, 3) for g in gathered]
        frags = sorted((start, length, r, f) for r in range(plan.world)
                       for f, (_, start, length) in enumerate(rp.fragments[r]))
        starts = [f[0] for f in frags]
        pieces = []
        for p in rp.local_pieces(plan.rank):
            # A piece continuing its document starts its fragment (pieces are cut only at document starts): the
            # positions before it lie among the other fragments' tails.
            j = 0 if p.fresh else min(h, p.start - rp.doc_start(p.start))
            idx = []
            for q in range(p.start - j, p.start):
                s, n, r, f = frags[bisect.bisect_right(starts, q) - 1]
                idx.append((r * slots + f) * h + h - (s + n - q))
            ext = []
            for i, x in enumerate(xs):
                before = [flats[i].index_select(1, torch.tensor(idx, device=x.device))] if j else []
                ext.append(torch.cat([*before, x.narrow(1, p.local, p.length)], 1))
            y = fn(*ext)
            single = not isinstance(y, tuple)
            ys = (y,) if single else y
            for t in ys:
                if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[1] != j + p.length:
                    raise ValueError(f"{WINDOWS}: fn returned {getattr(t, 'shape', type(t).__name__)} for "
                                     f"{j + p.length} tokens; it must return (batch, tokens, ...) tensors")
            pieces.append([t.narrow(1, j, p.length) for t in ys])
        outs.append([torch.cat(parts, 1) for parts in zip(*pieces)])
        order += rows
    ys = [torch.cat(parts, 0) for parts in zip(*outs)]
    if order != list(range(batch)):
        inv = torch.tensor(_inverse(order), device=ys[0].device)
        ys = [y[inv] for y in ys]
    for g in gathered:
        if g.requires_grad:
            ys[0] = Tie.apply(ys[0], g)
    return ys[0] if single else tuple(ys)


def _gather_tails(x: torch.Tensor, plan: Fragments, h: int, slots: int) -> torch.Tensor:
    """``(W, batch, slots, h, ...)``: the last ``h`` rows of each fragment of every rank (zeros before a shorter
    one's, zeros in unused slots)."""
    if x.dtype == torch.bool:  # not every backend gathers bools
        return _gather_tails(x.to(torch.uint8), plan, h, slots).bool()
    batch, rest = x.shape[0], x.shape[2:]
    parts, order = [], []
    for rp in plan.plans:
        rows = rp.batch_rows(batch)
        xr = x if rp.rows is None else x.index_select(0, torch.tensor(rows, device=x.device))
        tails = []
        for local, _, length in rp.fragments[plan.rank]:
            t = min(length, h)
            tail = xr.narrow(1, local + length - t, t)
            tails.append(torch.cat([tail.new_zeros(len(rows), h - t, *rest), tail], 1) if t < h else tail)
        tails += [xr.new_zeros(len(rows), h, *rest)] * (slots - len(tails))
        parts.append(torch.stack(tails, 1))
        order += rows
    buf = torch.cat(parts, 0)
    if order != list(range(batch)):
        buf = buf[torch.tensor(_inverse(order), device=buf.device)]
    return all_gather(buf, plan)
