"""State passing for token mixers whose state is affine across a span of tokens: ``h_out = M @ h_in + S``.

Each rank runs each piece it holds (a fragment cut at document starts) from a zero state to get ``S``
and asks the mixer for the piece's transition ``M``; the summaries of every rank are all-gathered in one
collective and each rank folds, in global order, those before its pieces; each piece then runs from its
true initial state. Autograd runs back through the fold and the gather, whose backward sums the
gradients every rank computed for each summary (one all-reduce): the mirror fold
``dh_in = M^T dh_out`` is the fold's own backward, so gradients are exact with no hand-written rule.
Pieces that start a document run once; the others run twice (summary, then from the true state), or,
where the caller gives ``correct``, once from a zero state before the exchange plus a correction for the
incoming state after it: every rank's local pass then runs at once, and only the correction waits.

Mixers that carry their state with a stabiliser (RWKV's WKV: ``num * exp(max)``; xLSTM's mLSTM:
``C * exp(m)``) overflow in a linear summary, so ``kind="log"`` folds in the log domain: a state is a
value and its log scale, a transition the log of a diagonal decay, and two spans compose as
``m = max(log M + m_1, m_2)``, ``v = exp(log M + m_1 - m) v_1 + exp(m_2 - m) v_2``. The log scale is
also part of what such a mixer computes (xLSTM adds ``eps`` to a denominator scaled by ``exp(-m)``), so
a piece that continues a document runs its summary from an explicitly empty state (log scale
``EMPTY_LOG_SCALE``), not from the mixer's own zero state, which may carry a log scale of its own
(xLSTM's ``m = 0`` at a document start): the fold then reproduces one process's stabiliser exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .fragments import Fragments, RowPlan, Tie, agree, all_gather, as_contiguous, check_sharding, regroup
from .scan import scan_states_p2p
from .summaries import (
    KINDS,
    WHAT,
    empty_state,
    fold,
    local_pieces,
    summary_dtype,
    transition_shape_of,
)

COMBINES = ("auto", "gather", "scan")
# From this many ranks "auto" combines the summaries by the log-depth scan (mixers/scan.py) rather than the
# all-gather: past it each rank receives and folds more than the scan moves and composes (docs/api.md).
SCAN_FROM = 16

Step = Callable[..., tuple[torch.Tensor, torch.Tensor]]
Transition = Callable[..., torch.Tensor]
Correct = Callable[..., torch.Tensor]


def _rows(rp: RowPlan, batch: int) -> list[int]:
    return rp.batch_rows(batch)


def scan_states(summaries: Sequence[tuple[torch.Tensor, torch.Tensor] | None], plan: Fragments, *, kind: str,
                state_shape: Sequence[int], batch: int, transition_shape: Sequence[int] | None = None,
                dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                anchor: torch.Tensor | None = None, combine: str = "auto"
                ) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """The initial state of each of this rank's pieces (``local_pieces`` order; None: a document
    start, zero state) from every rank's summaries, combined in global order (``combine``).

    ``summaries[i]``: ``(M, S)`` of local piece i, shapes ``(rows, *transition_shape)`` and
    ``(rows, *state_shape)`` (``rows``: that piece's batch rows), given exactly where the piece ``feeds``
    a later one, else None. Returns the states and a tensor to tie into the outputs with ``Tie`` so that
    every rank takes part in the combine's backward (the gathered buffer; the scan's last round). ``anchor``:
    where any rank's summaries need a gradient, a tensor on every rank, preferably an input that needs one
    (a buffer without a gradient is tied to it, so that every rank runs the combine's backward). ``dtype``:
    the summaries' (``summary_dtype``). ``combine``: ``"gather"`` (one all-gather, then each rank folds what is before
    its pieces), ``"scan"`` (the log-depth scan of ``mixers/scan.py``: point-to-point rounds, fewer bytes
    and less work per rank on many ranks), ``"auto"`` (the scan from ``SCAN_FROM`` ranks). Every rank
    must call it, with the same ``combine``."""
    state_shape = tuple(state_shape)
    mshape = transition_shape_of(kind, state_shape, transition_shape)
    if _combine(combine, plan) == "scan":
        return scan_states_p2p(summaries, plan, kind=kind, state_shape=state_shape, mshape=mshape, batch=batch,
                               dtype=dtype, device=device, anchor=anchor)
    mn, sn = _numel(mshape), _numel(state_shape)
    slots = plan.summary_slots()
    mine = local_pieces(plan)
    # Ranks without a summary of their own still send a buffer of the agreed size and dtype.
    parts, order = [], []
    for rp in plan.plans:
        rows = _rows(rp, batch)
        slot_of = rp.slots(plan.rank)
        entries = [None] * slots
        for (q, p), s in zip(mine, summaries):
            if q is rp and p.feeds:
                m, st = s
                entries[slot_of[p]] = torch.cat([m.reshape(len(rows), mn).to(dtype),
                                                 st.reshape(len(rows), sn).to(dtype)], 1)
        zero = torch.zeros(len(rows), mn + sn, dtype=dtype, device=device)
        parts.append(torch.stack([e if e is not None else zero for e in entries], 1) if slots else
                     zero.new_zeros(len(rows), 0, mn + sn))
        order += rows
    buf = in_batch_order(torch.cat(parts, 0), order)
    if anchor is not None and not buf.requires_grad:
        # Every rank must run the gather's backward (an all-reduce), also one with no summary of its own
        # and under autograd.grad(..., inputs), which runs only what leads to those inputs.
        buf = Tie.apply(buf, anchor) if anchor.requires_grad else buf.detach().requires_grad_()
    gathered = all_gather(buf, plan)  # (W, batch, slots, mn + sn)

    states: dict[tuple[int, int], torch.Tensor | None] = {}
    for gi, rp in enumerate(plan.plans):
        rows = _rows(rp, batch)
        last = max((p.start for p in rp.pieces if p.rank == plan.rank), default=-1)
        g = gathered[:, torch.tensor(rows, device=gathered.device)] if rp.rows is not None else gathered
        # One unbind, not an index per summary: each index's backward would materialise a gradient of
        # the whole gathered buffer (quadratic in W); unbind's stacks them once.
        cells = [r.unbind(1) for r in g.unbind(0)]
        slot_of = {r: rp.slots(r) for r in range(plan.world)}
        end_state: dict[int, torch.Tensor | None] = {}
        for p in rp.pieces:
            if p.start > last:
                break
            h0 = None if p.fresh else end_state.pop(p.start)
            if p.rank == plan.rank:
                states[(gi, p.local)] = h0
            if p.feeds:
                row = cells[p.rank][slot_of[p.rank][p]]
                m = row[:, :mn].reshape(len(rows), *mshape)
                s = row[:, mn:].reshape(len(rows), *state_shape)
                end_state[p.end] = s if h0 is None else fold(kind, m, s, h0)
    index = {id(rp): gi for gi, rp in enumerate(plan.plans)}
    return [states[(index[id(rp)], p.local)] for rp, p in mine], gathered


def _combine(combine: str, plan: Fragments) -> str:
    if combine not in COMBINES:
        raise ValueError(f"{WHAT}: combine must be one of {COMBINES}, got {combine!r}")
    return combine if combine != "auto" else ("scan" if plan.world >= SCAN_FROM else "gather")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check(inputs, plan, kind, state_shape) -> int:
    if not isinstance(plan, Fragments):
        raise TypeError(f"{WHAT}: plan must come from ringattn.mixers.fragments(...), got {type(plan).__name__}")
    if kind not in KINDS:
        raise ValueError(f"{WHAT}: kind must be one of {KINDS} (a transition applied elementwise, "
                         f"broadcast, as a K x K matrix on a (..., K, V) state, or as the log of a diagonal "
                         f"decay on a stabilised (2, ...) state), got {kind!r}")
    if not all(isinstance(d, int) and d > 0 for d in state_shape):
        raise ValueError(f"{WHAT}: state_shape must be positive ints (the state of one batch row), got {state_shape}")
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError(f"{WHAT}: inputs must be a non-empty sequence of tensors (batch, local_len, ...)")
    batch = inputs[0].shape[0] if inputs[0].dim() >= 2 else -1
    for i, x in enumerate(inputs):
        if x.dim() < 2 or x.shape[0] != batch or x.shape[1] != plan.local_len:
            raise ValueError(f"{WHAT}: inputs[{i}] has shape {tuple(x.shape)}; every input must be (batch, "
                             f"local_len, ...) with one batch size and local_len={plan.local_len} on rank "
                             f"{plan.rank} ({plan.describe()})")
    if plan.local_len == 0:
        raise ValueError(f"{WHAT}: rank {plan.rank} holds no tokens; every rank needs at least one")
    for rp in plan.plans:
        if rp.rows is not None and max(rp.rows) >= batch:
            raise ValueError(f"{WHAT}: cu_seqlens has one row of documents per batch row, more than the "
                             f"batch of {batch}")
    if sum(len(rp.rows) if rp.rows is not None else batch for rp in plan.plans) != batch:
        raise ValueError(f"{WHAT}: cu_seqlens holds fewer rows of documents than the batch of {batch}")
    return batch


def _checked(what: str, t, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{WHAT}: {what} must have shape {shape}, got {got}")
    return t


def run_fragments(step: Step, transition: Transition, inputs: Sequence[torch.Tensor], *, plan: Fragments,
                  kind: str, state_shape: Sequence[int], transition_shape: Sequence[int] | None = None,
                  correct: Correct | None = None, combine: str = "auto") -> torch.Tensor:
    """Run an affine-state mixer over this rank's shard exactly as one process would over the whole
    sequence (every document from a zero state).

    ``inputs``: tensors ``(batch, local_len, ...)`` (sequence in dim 1) that the mixer reads per token;
    weights are the callables' own. ``step(*pieces, initial_state) -> (y, final_state)`` runs a span of
    them (``initial_state`` None: zero) and returns outputs ``(rows, span, ...)`` and the state after it,
    ``(rows, *state_shape)``; ``transition(*pieces) -> M`` the span's transition, ``(rows, *transition_shape)``
    for ``kind="diagonal"`` (elementwise, broadcast against the state; default the state's shape, e.g.
    ``(heads, 1, 1)`` for a scalar per head) or ``(rows, ..., K, K)`` for ``kind="dense"`` (state ``(..., K, V)``,
    ``h_out = M @ h_in + S``). Returns the outputs ``(batch, local_len, ...)``.

    ``kind="log"``: a mixer with a stabilised state (module docstring). The state is ``(rows, 2, *shape)``,
    its value and its log scale (the true state is ``value * exp(log scale)``), ``transition`` returns the
    log of the span's diagonal decay, broadcast against ``shape`` (default ``shape``), and a piece that
    continues a document runs its summary from ``empty_state`` (log scale ``EMPTY_LOG_SCALE``) rather than
    from None, which always means a document start. No ``correct``: such mixers' outputs are not linear
    in their state.

    ``correct(*pieces, initial_state) -> y_delta``: the outputs' part due to a nonzero initial state
    (for these mixers linear in it; e.g. Mamba2 ``y_t += C_t . exp(cumsum(A dt))_t h_in``), the shape of
    ``y``. Given it, every piece runs from a zero state before the exchange (all ranks at once) and the
    pieces that do not start a document add ``correct(...)`` after it, instead of running a second time
    from their true state after it. Then ``step`` may return a third value, ``aux``, handed to
    ``transition`` and ``correct`` of the same piece as ``aux=``: a step that computes the transition
    or the correction's operator in its own pass passes them on.

    ``combine``: how the summaries meet (``scan_states``): ``"auto"`` (default), ``"gather"``, ``"scan"``.

    Striped layouts (every token its own fragment) are regrouped to contiguous for the mixer by one
    all-to-all each way. Every rank must call it (collectives)."""
    error, extra = None, None
    try:
        state_shape = tuple(state_shape)
        check_sharding(plan, *inputs)
        batch = _check(inputs, plan, kind, state_shape)
        if correct is not None and not callable(correct):
            raise TypeError(f"{WHAT}: correct must be a callable (*pieces, initial_state) -> y_delta or None, "
                            f"got {type(correct).__name__}")
        if correct is not None and kind == "log":
            raise ValueError(f"{WHAT}: correct= with kind='log': a stabilised mixer's outputs are not linear in "
                             "its state, so continuing pieces run again from their true state; drop correct")
        mshape = transition_shape_of(kind, state_shape, transition_shape)
        combine = _combine(combine, plan)
        extra = (kind, state_shape, mshape, batch, correct is None, combine,
                 [(x.dtype, tuple(x.shape[2:]), x.requires_grad) for x in inputs])
    except Exception as e:  # noqa: BLE001 - raised on every rank by agree
        error = e
    agree(plan, error, WHAT, extra)
    if plan.scattered:
        target = as_contiguous(plan)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, x in enumerate(inputs):
            by_dtype.setdefault(x.dtype, []).append(i)
        moved = list(inputs)
        for idx in by_dtype.values():
            for i, x in zip(idx, regroup([inputs[i] for i in idx], plan, target)):
                moved[i] = x
        y = _run(step, transition, moved, target, kind, state_shape, mshape, batch, correct, combine)
        return regroup([y], target, plan)[0]
    return _run(step, transition, inputs, plan, kind, state_shape, mshape, batch, correct, combine)


def _run(step, transition, inputs, plan, kind, state_shape, mshape, batch, correct=None, combine="auto"):
    mine = local_pieces(plan)
    sdtype = summary_dtype(inputs[0].dtype)
    outs: dict[int, torch.Tensor] = {}
    summaries: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    error = None

    def span(rp, p):
        rows = rp.rows
        idx = None if rows is None else torch.tensor(rows, device=inputs[0].device)
        return [(x if idx is None else x.index_select(0, idx)).narrow(1, p.local, p.length) for x in inputs]

    aux: dict[int, dict] = {}
    try:
        for i, (rp, p) in enumerate(mine):
            n = len(rp.rows) if rp.rows is not None else batch
            if not (p.fresh or p.feeds or correct is not None):
                summaries.append(None)
                continue
            start = None if p.fresh or kind != "log" else \
                empty_state(kind, n, state_shape, summary_dtype(inputs[0].dtype), inputs[0].device)
            res = step(*span(rp, p), start)
            if not isinstance(res, (tuple, list)) or len(res) not in ((2, 3) if correct is not None else (2,)):
                raise ValueError(f"{WHAT}: step must return (y, final_state)"
                                 + (" or (y, final_state, aux)" if correct is not None else "")
                                 + f", got {type(res).__name__} of {len(res) if isinstance(res, (tuple, list)) else 1}")
            y, h = res[0], res[1]
            aux[i] = {"aux": res[2]} if len(res) == 3 else {}
            _checked("step's final state", h, (n, *state_shape))
            if p.fresh or correct is not None:
                _checked("step's output", y, (n, p.length, *y.shape[2:]))
                outs[i] = y
            if p.feeds:
                m = _checked("transition", transition(*span(rp, p), **aux[i]), (n, *mshape))
                summaries.append((m.to(sdtype), h.to(sdtype)))
            else:
                summaries.append(None)
    except Exception as e:  # noqa: BLE001 - raised on every rank by agree
        error = e
    # Whether any rank's summaries need a gradient (also through weights the callables hold): then every
    # rank runs the gather's backward.
    grad = agree(plan, error, WHAT, flag=torch.is_grad_enabled() and any(
        s is not None and (s[0].requires_grad or s[1].requires_grad) for s in summaries))
    if plan.world > 1 or any(not p.fresh for _, p in mine):
        states, gathered = scan_states(summaries, plan, kind=kind, state_shape=state_shape, batch=batch,
                                       transition_shape=mshape, dtype=sdtype, device=inputs[0].device,
                                       anchor=next((x for x in inputs if x.requires_grad), inputs[0]) if grad else None,
                                       combine=combine)
    else:
        states, gathered = [None] * len(mine), None
    for i, (rp, p) in enumerate(mine):
        if correct is not None:
            if states[i] is not None:
                # The state arrives in the summaries' dtype; the correction, like step, takes it so.
                delta = correct(*span(rp, p), states[i], **aux[i])
                outs[i] = outs[i] + _checked("correct's output", delta, tuple(outs[i].shape)).to(outs[i].dtype)
        elif i not in outs:
            outs[i] = step(*span(rp, p), states[i])[0]
    parts, order = [], []
    for rp in plan.plans:
        parts.append(torch.cat([outs[i] for i, (q, _) in enumerate(mine) if q is rp], 1))
        order += _rows(rp, batch)
    y = in_batch_order(torch.cat(parts, 0), order)
    if gathered is not None and grad:
        y = Tie.apply(y, gathered)
    return y


def in_batch_order(t: torch.Tensor, order: list[int]) -> torch.Tensor:
    """``t``'s rows, stacked plan by plan (row ``i`` is batch row ``order[i]``), back in batch order."""
    if order == list(range(len(order))):
        return t
    inv = [0] * len(order)
    for i, b in enumerate(order):
        inv[b] = i
    return t[torch.tensor(inv, device=t.device)]
