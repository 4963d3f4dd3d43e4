"""The front door: every attention call enters here, whatever the strategy.

One validation (pure ``check_*`` functions), one cross-rank agreement (``validate.agree``), one
description, one profile count, and one backend choice per call; the strategy then receives a finished
``callspec.AttentionCall``. ``strategy="auto"`` is resolved after the checks, from the checked mask
(``cost_model.Problem.from_call``), and the choice is part of what the ranks agree on.
``decode_attention`` enters through :func:`checked` too.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from . import profiling
from .callspec import MASK_KINDS, AttentionCall, CallShape, Options, Topology
from .comm import exclusive
from .cost_model import Problem
from .layouts import Uneven, effective_layout, layout_of, uneven_lengths
from .masks import EVAL_PAIRS, Kind, MaskSpec, RowHeadMask, takes_four
from .modes import Layout, Strategy, choose
from .scores import ALIBI, ScoreMod, check_alibi_slopes, check_per_head, check_softcap, sink_digest
from .sharding import (
    Sharding,
    check_distributed,
    document_rows,
    documents_text,
    remember,
    settle,
    settle_len,
    sharding_of,
)
from .strategies import IMPLEMENTATIONS, REGISTRY
from .strategies.auto import choose_strategy
from .strategies.base import TUNING, group_topology
from .validate import (
    agree,
    call_number,
    check_backend,
    check_backward_exchange,
    check_qkv,
    describe,
    make_spec,
    query_offset,
    softmax_scale_of,
)


def topology(strategy: Strategy, group, mesh) -> Topology:
    """The strategy's groups; misuse of ``group=`` / ``mesh=`` is an error at once (nothing to agree on).
    ``"auto"`` runs over ``group`` until it has chosen."""
    if strategy is Strategy.AUTO:
        return group_topology(strategy, group, mesh)
    return REGISTRY[strategy].topology(group, mesh)


def build(q, k, v, strategy: Strategy, topo: Topology, options: dict[str, Any]) -> tuple[AttentionCall, str]:
    """Check every argument on this rank; the call and the description all ranks must agree on."""
    kinds = dict(options.get(MASK_KINDS, ()))
    try:
        opts = Options(**{name: val for name, val in options.items() if name != MASK_KINDS})
    except TypeError as e:
        raise TypeError(f"attention(): {e}".replace("Options.__init__() ", "")) from None
    check_qkv(q, k, v)
    layout = choose(Layout, opts.layout, "layout")
    if not isinstance(opts.uneven, bool):
        raise TypeError(f"uneven must be a bool, got {type(opts.uneven).__name__}")
    cap = check_softcap(opts.softcap)
    mods = ScoreMod(cap, opts.alibi_slopes).kinds
    backend = check_backend(opts.backend, q, k, v, mods)
    # Uneven blocks arrive padded to the longest (uneven_inputs), at explicit positions: no even-length rule.
    q_block = topo.block_rows * q.shape[1]
    spec = make_spec(world=topo.world, local_len=topo.block_rows * k.shape[1],
                     layout=Layout.CONTIGUOUS if opts.uneven else layout, batch=q.shape[0],
                     positional=ALIBI in mods, q_local_len=q_block, **opts.mask_keywords(), **kinds)
    q_offset = query_offset(opts.q_seq_len, seq_len=spec.seq_len, q_rows=topo.world * q_block,
                            same_len=q.shape[1] == k.shape[1])
    scale = softmax_scale_of(opts.softmax_scale, q.shape[-1])
    check_backward_exchange(opts.backward_exchange)
    chunk = opts.kv_head_chunk
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"kv_heads_per_gather must be a positive int or None, got {chunk!r}")
    if strategy is not Strategy.AUTO:
        REGISTRY[strategy].check_tuning(options)
    shape = CallShape(q.shape[0], q_block, topo.block_rows * k.shape[1], q.shape[2], k.shape[2], q.shape[3],
                      v.shape[3], q.element_size(), any(t.requires_grad for t in (q, k, v)), q.device)
    about = describe(q, k, v, spec, layout, scale)
    scores = ScoreMod(cap, check_alibi_slopes(opts.alibi_slopes, shape.heads, q))
    sinks = check_per_head("sinks", opts.sinks, shape.heads, q)
    placed = Uneven(layout, spec.seq_len) if opts.uneven else layout
    call = AttentionCall(strategy, opts, topo, effective_layout(placed, topo.world), spec, scale, backend,
                         q_offset, scores if scores.kinds else None, sinks, shape)
    if strategy is Strategy.AUTO:
        call = resolve_auto(call)
    return call, f"strategy={call.strategy} {about} {described(call)}"


def described(call: AttentionCall) -> str:
    """What the ranks agree on beyond ``validate.describe`` of the tensors and the mask: the rest of the
    checked call. The strategy's head split is checked here and the user's mask planned (see
    ``evaluate_user_mask``)."""
    topo, shape, scores = call.topo, call.shape, call.scores or ScoreMod(None, None)
    if topo.head_world > 1 and shape.heads % topo.head_world:
        raise ValueError(f"strategy={call.strategy!r} splits the heads over {topo.head_world} ranks: heads "
                         f"({shape.heads}) must be divisible by {topo.head_world}")
    evaluate_user_mask(call)
    sinks = call.sinks
    return (f"q_offset={call.q_offset}"
            f" backward_exchange={call.backward_exchange}"
            f" {scores.describe()} sinks={sink_digest(sinks)}"
            f" sinks_grad={sinks is not None and sinks.requires_grad and torch.is_grad_enabled()}"
            f" kv_heads_per_gather={call.options.kv_head_chunk}"
            f" backend={call.backend.name} {_caps_text(call.backend.caps)}"
            f" blocks={topo.world}x{topo.block_rows}"
            f" heads_split={topo.head_world}")


def resolve_auto(call: AttentionCall) -> AttentionCall:
    """The checked ``strategy="auto"`` call as the strategy the cost model chooses for it runs it
    (deterministic from the checked call and the configured hardware). Keywords that tune a strategy
    not chosen go back to their defaults."""
    topo = call.topo
    chosen = Strategy.RING
    if topo.world > 1:
        chosen = Strategy(choose_strategy(Problem.from_call(call), call.shape.device))
    if chosen is not Strategy.RING:
        topo = topology(chosen, topo.group, None)
    opts = call.options
    tunes = REGISTRY[chosen].tunes
    opts = dataclasses.replace(opts, **{name: default for name, (default, _) in TUNING.items() if name not in tunes})
    return dataclasses.replace(call, strategy=chosen, topo=topo, options=opts)


def auto_strategy(q, k, v, *, group=None, mesh=None, **options) -> Strategy:
    """The strategy ``attention(q, k, v, strategy="auto", group=group, mesh=mesh, **options)`` runs on this
    rank (its checks run, nothing is communicated)."""
    if mesh is not None:
        return Strategy.HYBRID
    call, _ = build(q, k, v, Strategy.AUTO, topology(Strategy.AUTO, group, None), options)
    return call.strategy


def evaluate_user_mask(call: AttentionCall) -> None:
    """Plan this rank's blocks before the agreement where a mask_mod makes the plan: planning runs the
    user's function on every block pair this rank computes (and the cached plan is what the strategy then
    runs), so whatever it raises on some ranks only becomes an agreed error on every rank. Pairs too
    large to classify whole, which a backend masks natively, are evaluated here too, tile by tile.

    A mask_mod that answers differently when asked again (not a function of its positions) and failures
    of anything else once the exchanges start (a kernel, memory) are left to Note [A failure after the
    agreement] (comm.Outcome). A strategy without ``tasks`` (Ulysses) plans the whole sequence alike on every
    rank: any error there is every rank's.
    """
    tasks_for = REGISTRY[call.strategy].tasks
    if call.spec.mask_mod is None or tasks_for is None:
        return
    _evaluate_large_partials(call.spec, tasks_for(call, call.shape.q_rows, call.shape.k_rows))


@functools.lru_cache(maxsize=256)
def _evaluate_large_partials(spec: MaskSpec, tasks: tuple) -> None:
    step = int(EVAL_PAIRS ** 0.5)
    for t in tasks:
        if t.kind is Kind.PARTIAL and t.qseg.length * t.kseg.length > EVAL_PAIRS:
            for a in range(0, t.qseg.length, step):
                for b in range(0, t.kseg.length, step):
                    spec.tile(t.qseg.sub(a, min(a + step, t.qseg.length)),
                              t.kseg.sub(b, min(b + step, t.kseg.length)))


def _caps_text(caps) -> str:
    """The planning sizes and kinds of a backend, for the agreement: two backends of one name (e.g. one
    ``retiled``) plan different tiles, and the ring's backward exchanges them tile by tile. Sorted and
    by field, since a frozenset's order follows the per-process string hash."""
    fields = []
    for f in dataclasses.fields(caps):
        val = getattr(caps, f.name)
        if isinstance(val, frozenset):
            val = ",".join(sorted(str(getattr(x, "name", x)) for x in val))
        fields.append(f"{f.name}={val}")
    return "caps(" + " ".join(fields) + ")"


def checked(make: Callable[[], tuple[Any, str]], groups, like) -> Any:
    """Run ``make`` (this rank's checks; returns ``(result, description)``) and agree across ``groups``:
    every rank raises if any rank's checks failed (whatever the exception) or the descriptions differ,
    before anyone communicates. Counts the call in the active profile."""
    calls = call_number(groups)  # before any check: see validate.call_number
    error, result, desc = None, None, ""
    try:
        result, desc = make()
    except Exception as e:  # noqa: BLE001 - every failure must reach the agreement, or peers hang
        error = e
    device = like.device if isinstance(like, torch.Tensor) and like.device.type != "meta" else torch.device("cpu")
    agree(desc, error, groups, device, calls)
    profiling.count_call()
    return result


def enter(q, k, v, *, strategy: Strategy | str = Strategy.RING, group=None, mesh=None, **options):
    """``ringattn.attention``: validate, agree, choose the backend once, and run the strategy."""
    check_distributed()
    strategy = choose(Strategy, strategy, "strategy")
    try:
        options, sharded = remembered(q, k, v, options)
        problem = None
    except Exception as e:  # noqa: BLE001 - raised below on every rank together, at the agreement
        sharded, problem = None, e
    if strategy is Strategy.AUTO and mesh is not None:  # the shards were made for the mesh
        strategy = Strategy.HYBRID
        options.pop("kv_head_chunk", None)
    topo = topology(strategy, group, mesh)
    if problem is None and sharded is not None:
        problem = misplaced(sharded, topo)
    with exclusive(topo.agree_over):
        if problem is not None:
            checked(functools.partial(_raise, problem), topo.agree_over, q)
        if options.get("uneven"):
            out = _enter_uneven(q, k, v, strategy, topo, options)
        elif isinstance(options.get("cu_seqlens"), (list, tuple)) or takes_four(options.get("mask_mod")):
            out = _enter_parts(q, k, v, strategy, topo, options)
        else:
            call = checked(lambda: build(q, k, v, strategy, topo, options), topo.agree_over, q)
            out, lse = IMPLEMENTATIONS[call.strategy](q, k, v, call)
            out = (out, lse) if call.options.return_lse else out
    return _remembering(out, topo, options, q.shape[1], k.shape[1])


def _raise(error: Exception):
    raise error


def remembered(q, k, v, options: dict[str, Any]) -> tuple[dict[str, Any], Sharding | None]:
    """``options`` with what q, k and v remember of ``ringattn.shard`` (``layouts.sharding_of``; ``sharding=``
    for k and v that do not) filled in where nothing was passed, and the keys' sharding (else the
    queries'); an error where what was passed contradicts it, where k and v (or q and k, beyond their
    lengths) were sharded differently, or where the sequence is not in dim 1. Plain tensors leave
    ``options`` as they are."""
    options = dict(options)
    tags = {name: sharding_of(t) for name, t in (("q", q), ("k", k), ("v", v))}
    kept = options.pop("sharding", None)
    if kept is not None:
        if not isinstance(kept, Sharding):
            raise TypeError(f"sharding must be a ringattn.Sharding (what ringattn.sharding_of returns for a shard), "
                            f"got {type(kept).__name__}")
        for name in ("k", "v"):
            if tags[name] is not None and tags[name] != kept:
                raise ValueError(f"sharding= says {kept.describe()}, but {name} remembers {tags[name].describe()}; "
                                 "leave sharding out or pass the one the shards remember")
            tags[name] = kept
    for name, s in tags.items():
        if s is not None and s.dim != 1:
            raise ValueError(f"{name} holds its sequence in dim {s.dim} (it is ringattn.shard(..., dim={s.dim}) or "
                             "a transpose of a shard), but attention takes (batch, local_len, heads, head_dim), the "
                             "sequence in dim 1: shard (batch, seq, heads, head_dim) tensors along dim=1 (for "
                             "SDPA's (batch, heads, seq, head_dim), .transpose(1, 2) before shard)")
    sq, sk, sv = tags["q"], tags["k"], tags["v"]
    if sk is not None and sv is not None and sk != sv:
        raise ValueError(f"k and v were sharded differently: k with {sk.describe()}, v with {sv.describe()}; "
                         "shard them alike")
    sk = sk or sv
    if sq is not None and sk is not None and dataclasses.replace(sq, seq_len=sk.seq_len) != sk:
        raise ValueError(f"q and k were sharded differently: q with {sq.describe()}, k with {sk.describe()}; shard "
                         "q, k and v alike (only their lengths may differ: fewer queries are the last q_seq_len)")
    s = sk or sq
    if s is None:
        return options, None
    whose, who = "q, k, v were sharded by", "attention"
    out = options
    out["layout"] = settle("layout", options.get("layout"), s.layout, whose, who)
    if options.get("uneven") is not None or s.uneven:
        out["uneven"] = settle("uneven", options.get("uneven"), s.uneven, whose, who)
    keys = sk if sk is not None else (sq if q.shape[1] == k.shape[1] else None)
    if keys is not None:
        ends = {b[-1] for b in keys.documents or ()}
        real = ends.pop() if len(ends) == 1 else keys.seq_len  # the documents end where the tokens do
        out["seq_len"] = settle_len("seq_len", options.get("seq_len"), real, whose, who)
    if sq is not None and (sk is None or sq.seq_len != sk.seq_len):
        out["q_seq_len"] = settle_len("q_seq_len", options.get("q_seq_len"), sq.seq_len, "q was sharded by", who)
    if s.documents is not None:
        given = options.get("cu_seqlens")
        if given is None:
            docs = [torch.tensor(b, dtype=torch.int64) for b in s.documents]
            out["cu_seqlens"] = docs * q.shape[0] if len(docs) == 1 and q.shape[0] > 1 else \
                docs if len(docs) > 1 else docs[0]
        elif document_rows(given) not in (s.documents, None):
            raise ValueError(f"attention: q, k, v were sharded by ringattn.shard with the documents "
                             f"cu_seqlens={documents_text(s.documents)}, not the ones "
                             "passed here: leave cu_seqlens out (what the shards remember is used) or pass the same")
    return out, s


def misplaced(s: Sharding, topo: Topology) -> ValueError | None:
    """An error where q, k, v were sharded for another place than the call's group (or mesh) gives this
    process: their positions would not be the ones the call computes."""
    here = ((topo.rank, topo.world, topo.head_rank, topo.head_world) if topo.mesh is not None
            else (topo.rank, topo.world))
    if s.place is None or (s.mesh is not None) == (topo.mesh is not None) and s.place == here:
        return None
    what = "mesh (ring rank, ring size, ulysses rank, ulysses size)" if topo.mesh is not None else "group (rank, world)"
    made = "mesh" if s.mesh is not None else "group"
    return ValueError(f"attention: q, k, v were sharded by ringattn.shard over a {made} where this process is "
                      f"{s.place}, but the call's {what} is {here}: shard and call over the same group (or mesh)")


def _remembering(out, topo: Topology, options: dict[str, Any], q_rows: int, k_rows: int):
    """The call's output (and lse) remembering its sharding: the real query rows in the call's layout, so
    that ``unshard(out)`` needs no arguments."""
    layout = choose(Layout, options.get("layout", Layout.CONTIGUOUS), "layout")
    n = options.get("q_seq_len")
    if n is None and q_rows == k_rows:
        n = options.get("seq_len")
    if n is None:  # every query row is real
        n = topo.world * topo.block_rows * q_rows
    docs = document_rows(options.get("cu_seqlens")) if layout_of(layout).needs_documents else None
    place = ((topo.rank, topo.world, topo.head_rank, topo.head_world) if topo.mesh is not None
             else (topo.rank, topo.world))
    group = None if topo.mesh is not None else topo.group
    s = Sharding(str(layout), int(n), 1, bool(options.get("uneven")), docs, place, group, topo.mesh)
    if isinstance(out, tuple):
        return remember(out[0], s), remember(out[1], dataclasses.replace(s, dim=2))
    return remember(out, s)


def uneven_inputs(q, k, v, strategy: Strategy, topo: Topology, options: dict[str, Any]):
    """Blocks of ``uneven_lengths`` (``uneven=True``): checked, padded to the longest, and their call."""
    check_qkv(q, k, v)
    if strategy is Strategy.HYBRID:
        raise ValueError("uneven=True is not supported by strategy='hybrid'; pad and pass seq_len instead")
    # Per-row documents and 4-argument masks split a call into parts, each of its own length.
    if isinstance(options.get("cu_seqlens"), (list, tuple)):
        raise ValueError("uneven=True takes one cu_seqlens for the whole batch (not one per row)")
    if takes_four(options.get("mask_mod")):
        raise ValueError("uneven=True takes a 2-argument mask_mod (not one per row and head)")
    layout = choose(Layout, options.get("layout", Layout.CONTIGUOUS), "layout")
    n = options.get("seq_len")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"uneven=True needs seq_len, the total number of tokens (a positive int), got {n!r}")
    if options.get("q_seq_len") not in (None, n) or q.shape[1] != k.shape[1]:
        raise ValueError("uneven=True takes as many queries as keys (q_seq_len = seq_len)")
    lens = uneven_lengths(n, topo.world, layout)
    if k.shape[1] != lens[topo.rank]:
        raise ValueError(f"uneven=True: rank {topo.rank} holds {k.shape[1]} tokens, but layout {str(layout)!r} over "
                         f"{topo.world} ranks of seq_len {n} gives it {lens[topo.rank]} (ringattn.shard(..., "
                         "uneven=True) makes these shards)")
    padded = tuple(_pad_rows(t, max(lens)) for t in (q, k, v))
    call, desc = build(*padded, strategy, topo, options)
    return (call, padded, lens[topo.rank]), f"{desc} uneven={lens}"


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, 0, 0, 0, 0, rows - t.shape[1]))


def _enter_uneven(q, k, v, strategy: Strategy, topo: Topology, options: dict[str, Any]):
    call, padded, n = checked(lambda: uneven_inputs(q, k, v, strategy, topo, options), topo.agree_over, q)
    out, lse = IMPLEMENTATIONS[call.strategy](*padded, call)
    # The padding rows' gradient is zero: they leave the graph here. Copies, not views of the padded result,
    # so that views of the output remember its sharding too (sharding_of follows a view to its base).
    if n < out.shape[1]:
        out, lse = out[:, :n].clone(), lse[..., :n].clone()
    return (out, lse) if call.options.return_lse else out


def part_inputs(q, k, v, b: int, h: int | None):
    """q, k, v of batch row ``b`` and query head ``h`` (None = every head) with its K/V head."""
    q, k, v = q[b:b + 1], k[b:b + 1], v[b:b + 1]
    if h is None:
        return q, k, v
    g = h // (q.shape[2] // k.shape[2])  # contiguous GQA groups
    return q[:, :, h:h + 1], k[:, :, g:g + 1], v[:, :, g:g + 1]


def build_parts(q, k, v, strategy: Strategy, topo: Topology,
                options: dict[str, Any]) -> tuple[list[tuple[int, int | None, AttentionCall]], str]:
    """One call per batch row when rows are packed differently (``cu_seqlens`` a list of one per row), and
    per row and head for a 4-argument ``mask_mod``; all checked here, before anyone communicates."""
    check_qkv(q, k, v)
    rows = options.get("cu_seqlens")
    per_row = isinstance(rows, (list, tuple))
    if per_row:
        if not all(isinstance(r, torch.Tensor) for r in rows):
            raise TypeError("cu_seqlens must be an integer torch.Tensor, or a list of one per batch row; got a "
                            f"{type(rows).__name__} of {', '.join(sorted({type(r).__name__ for r in rows}))}")
        if len(rows) != q.shape[0]:
            raise ValueError(f"cu_seqlens as a list holds one tensor per batch row: got {len(rows)} for batch "
                             f"{q.shape[0]}")
    fn = options.get("mask_mod")
    heads = range(q.shape[2]) if takes_four(fn) else [None]
    if heads != [None]:
        if topo.head_world > 1:
            raise ValueError(f"a 4-argument mask_mod(b, h, q_idx, kv_idx) runs one call per head, and "
                             f"strategy={strategy!r} splits the heads: use strategy 'ring' or 'allgather'")
        for name in ("sinks", "alibi_slopes"):  # checked whole, since each part takes its head's only
            check_per_head(name, options.get(name), q.shape[2], q)
    parts, descs = [], []
    for b in range(q.shape[0]):
        for h in heads:
            o = dict(options)
            if per_row:
                o["cu_seqlens"] = rows[b]
            if h is not None:
                o["mask_mod"] = RowHeadMask(fn, b, h)
                o.update({n: o[n][h:h + 1] for n in ("sinks", "alibi_slopes") if o.get(n) is not None})
            call, desc = build(*part_inputs(q, k, v, b, h), strategy, topo, o)
            parts.append((b, h, call))
            descs.append(desc)
    return parts, " | ".join(descs)


def _enter_parts(q, k, v, strategy: Strategy, topo: Topology, options: dict[str, Any]):
    # Every part's checks pass one agreement together; then each runs as a call of its own (its documents
    # or its mask give it its own plan), on the same group in the same order on every rank.
    parts = checked(lambda: build_parts(q, k, v, strategy, topo, options), topo.agree_over, q)
    done = [IMPLEMENTATIONS[call.strategy](*part_inputs(q, k, v, b, h), call) for b, h, call in parts]
    per_row = len(parts) // q.shape[0]  # parts are row-major: every head of row 0, then of row 1, ...
    out = torch.cat([torch.cat([o for o, _ in done[b * per_row:(b + 1) * per_row]], 2) for b in range(q.shape[0])])
    if not parts[0][2].options.return_lse:
        return out
    return out, torch.cat([torch.cat([lse for _, lse in done[b * per_row:(b + 1) * per_row]], 1)
                           for b in range(q.shape[0])])
