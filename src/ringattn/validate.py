"""Argument checking, and making every rank agree on the call before anyone blocks in a P2P exchange.

Each rank checks its own arguments, then all ranks compare a short description of the call (shapes,
dtype, mask, layout, and whether the local check failed) with one tiny all-reduce. If any rank's check
failed or the descriptions differ, every rank raises the same ``ValueError`` — nobody is left waiting
in the ring for a peer that already gave up. A check that fails with any exception still takes part (as
"failed"), and the ranks also compare how many agreed calls each has made on the group: a call that one
rank skips or repeats (a caller that catches an error on one rank only and goes on) would otherwise pair
its next call with its peers' previous one and give wrong numbers without an error. The all-reduce runs
on every call (about a hundred microseconds on gloo), because skipping it for "known" calls would let a
rank with a new, bad call block in a collective its peers never enter.
"""

from __future__ import annotations

import math
import numbers
import re
import weakref
import zlib
from typing import Any

import torch
import torch.distributed as dist

from .comm import first_line, group_rank_world
from .kernels import BACKENDS, Backend, select
from .layouts import layout_of
from .masks import (  # noqa: F401 - the mask checks, importable from here too
    KINDS,
    MaskContext,
    MaskSpec,
    check_chunk_size,
    check_cu_seqlens,
    check_mask_mod,
    check_seq_len,
    check_slices,
    spec_fields,
)
from .modes import RING_STRATEGIES, BackwardExchange

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKWARD_EXCHANGES = tuple(str(m) for m in BackwardExchange)  # see Note [Backward exchange: ring vs direct]


def check_backward_exchange(value, strategy: str = "ring") -> None:
    """``backward_exchange`` is one of BACKWARD_EXCHANGES, and "direct" only where a ring runs."""
    if value not in BACKWARD_EXCHANGES:
        raise ValueError(f"backward_exchange must be one of {BACKWARD_EXCHANGES}, got {value!r}")
    if value == "direct" and strategy not in RING_STRATEGIES:
        raise ValueError(f"backward_exchange='direct' is a ring setting; strategy={strategy!r} has no ring")


def check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, local_len, heads, head_dim), got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k and v must share the batch size, got {q.shape[0]}, {k.shape[0]}, "
                         f"{v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must share local_len (dim 1), got {k.shape[1]} and {v.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[2]} and {v.shape[2]}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]})")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[3]} and {k.shape[3]}")
    if q.shape[3] == 0 or v.shape[3] == 0:
        raise ValueError("head_dim must be positive")


def make_spec(*, world: int, local_len: int, layout: str, batch: int, positional: bool = False,
              q_local_len: int | None = None, **mask: Any) -> MaskSpec:
    """The checked mask of a call: ``mask`` holds the mask keywords (``MaskKind.key`` of ``masks.KINDS``:
    ``causal``, ``window``, ``seq_len``, ``cu_seqlens``, ``chunk_size``, ``mask_mod``, ``slices`` and any
    registered kind), each checked by its kind. ``q_local_len``: the queries' local length where it is not
    ``local_len``'s (the layout's rules for both, asked here at once)."""
    rule = layout_of(layout)
    rule.check_documents(world, mask.get("cu_seqlens"))
    rule.check_local_len(world, local_len)
    if q_local_len is not None:
        rule.check_local_len(world, q_local_len, "q local_len")
    total = world * local_len
    seq_len = mask.get("seq_len")
    seq_len = total if seq_len is None else check_seq_len(seq_len, MaskContext(total, total, batch))
    fields = spec_fields(mask, MaskContext(seq_len, total, batch))
    return MaskSpec(seq_len=seq_len, positional=positional, **fields)


def check_backend(choice, q, k, v, score_mods: frozenset[str]) -> Backend:
    """The call's kernel: ``choice`` checked against the tensors and the score modifications, or the fastest
    that takes them (the reference for score modifications the fastest lacks)."""
    if choice is None:
        chosen = select(q, k, v)
        # Score modifications the fastest kernel lacks are run by the reference (tiled, exact).
        return chosen if score_mods <= chosen.caps.score_mods else BACKENDS["reference"]
    if isinstance(choice, str):
        if choice not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)} or a Backend, got {choice!r}")
        choice = BACKENDS[choice]
    if not (hasattr(choice, "caps") and hasattr(choice, "forward") and hasattr(choice, "supports")):
        raise TypeError(f"backend must be a name or a ringattn.kernels.Backend, got {type(choice).__name__}")
    if not choice.supports(q, k, v):
        raise ValueError(f"backend {choice.name!r} does not support {q.dtype} tensors on {q.device.type}")
    missing = score_mods - choice.caps.score_mods
    if missing:
        raise ValueError(f"backend {choice.name!r} cannot apply {', '.join(sorted(missing))}; leave backend=None "
                         "(the reference backend applies every score modification)")
    return choice


def query_offset(q_seq_len, *, seq_len: int, q_rows: int, same_len: bool) -> int:
    """The global position of query row 0. The queries are the last ``q_seq_len`` of the ``seq_len`` key
    positions (bottom-right aligned, as in chunked prefill); the ``q_rows`` rows the ranks hold beyond
    ``q_seq_len`` are padding. None means ``seq_len`` when q and k have the same local length (square
    attention), else every query row. The layout's rule for the queries' local length is make_spec's."""
    default = q_seq_len is None
    if default:
        q_seq_len = seq_len if same_len else q_rows
    elif isinstance(q_seq_len, bool) or not isinstance(q_seq_len, numbers.Integral):
        raise TypeError(f"q_seq_len must be an int or None, got {type(q_seq_len).__name__}")
    q_seq_len = int(q_seq_len)
    if not 0 <= q_seq_len <= q_rows:
        raise ValueError(f"q_seq_len must be in [0, world * q local_len = {q_rows}], got {q_seq_len}")
    if q_seq_len > seq_len:
        if default:
            raise ValueError(f"q is longer than k: its world * q local_len = {q_rows} query rows are more than "
                             f"seq_len = {seq_len} keys; the queries are the last q_seq_len key positions, so "
                             "pass q_seq_len= the number of real queries (or give q and k one local_len)")
        raise ValueError(f"q is longer than k: the queries are the last q_seq_len key positions, so "
                         f"q_seq_len ({q_seq_len}) must be <= seq_len ({seq_len})")
    return seq_len - q_seq_len


def softmax_scale_of(softmax_scale, head_dim: int) -> float:
    """The scale to use: ``1 / sqrt(head_dim)`` for None, else a finite real number."""
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    try:
        scale = float(softmax_scale)
    except OverflowError:
        scale = math.inf
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale:.6g}")
    return scale


def describe(q, k, v, spec: MaskSpec, layout: str, scale: float) -> str:
    """What every rank must agree on before the call communicates: ``name=value`` fields (see ``fields``)."""
    # Whether autograd records the call is part of it: a rank that will run the backward while a peer
    # will not would otherwise block until the group's timeout.
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    dtype = str(q.dtype).removeprefix("torch.")
    return (f"q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)} dtype={dtype} "
            f"device={q.device.type} layout={layout} {describe_mask(spec, k.shape[1], q.device)} "
            f"scale={scale!r} grad={grad}")


def describe_mask(spec: MaskSpec, block: int, device) -> str:
    """The mask as fields. A mask_mod is described by what it computes, not by its name: every rank asks it
    about the same probe pairs (see ``probe_positions``) and the answers' digest is compared, so ranks that
    pass different functions (or one closure over different tables) disagree before anything runs. Slices
    by value: their count and a digest of every range and kind."""
    window = "None" if spec.window is None else spec.window
    docs = "None" if spec.doc_bounds is None else f"{len(spec.doc_bounds) - 1}docs:{_crc(spec.doc_bounds)}"
    text = (f"seq_len={spec.seq_len} causal={spec.causal} window={window} cu_seqlens={docs} "
            f"chunk_size={spec.chunk} positional={spec.positional}")
    if spec.mask_mod is not None:
        name = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(spec.mask_mod).removeprefix("mask_mod="))  # no addresses
        text += f" mask_mod={name}"
        text += f" mask_mod_answers={mask_mod_digest(spec, block, device)}"
    if spec.slices is not None:
        text += (f" slices={len(spec.slices)}slices:"
                 f"{_crc(tuple((s.q0, s.q1, s.k0, s.k1, s.kind.value) for s in spec.slices))}")
    for kind in KINDS.values():  # a MaskSpec field of a kind not described above: by value
        if kind.spec_field is not None and kind.spec_field not in _DESCRIBED:
            text += f" {kind.key}={getattr(spec, kind.spec_field)!r}"
    if spec.terms:  # registered kinds, by value (a MaskTerm's repr says what it computes)
        text += f" terms=({', '.join(re.sub(r' at 0x[0-9a-fA-F]+', '', repr(t)) for t in spec.terms)})"
    return text


_DESCRIBED = frozenset({"seq_len", "causal", "window", "doc_bounds", "chunk", "mask_mod", "slices"})


def _crc(value) -> str:
    return f"{zlib.crc32(repr(value).encode()):08x}"


PROBE_POINTS = 64  # positions per axis: a 64 x 64 grid of (query, key) pairs at most


def probe_positions(seq_len: int, block: int) -> list[int]:
    """At most PROBE_POINTS global positions in ``[0, seq_len)``, the same on every rank: both sides of
    every half-block border (where zigzag and balanced blocks begin) and a strided grid over the sequence.
    Used for queries and keys alike, so the grid holds the diagonal and the pairs across each border."""
    if seq_len < 1:
        return []
    grid = {round(i * (seq_len - 1) / (PROBE_POINTS // 2 - 1)) for i in range(PROBE_POINTS // 2)}
    half = max(1, block // 2)
    borders = sorted({p for b in range(half, seq_len, half) for p in (b - 1, b)})
    keep = PROBE_POINTS - len(grid)
    if len(borders) > keep:  # many blocks: an even choice of them
        borders = [borders[round(i * (len(borders) - 1) / max(1, keep - 1))] for i in range(keep)]
    return sorted(grid | set(borders))


def mask_mod_digest(spec: MaskSpec, block: int, device) -> str:
    """A digest of the user's mask_mod on the probe grid (raises what the mask_mod raises)."""
    pos = torch.tensor(probe_positions(spec.seq_len, block), dtype=torch.long, device=device)
    if pos.numel() == 0:
        return "none"
    keep = spec.mask_mod(pos[:, None], pos[None, :])
    bits = keep.expand(len(pos), len(pos)).flatten().tolist()
    return f"{len(bits)}pairs:{zlib.crc32(bytes(bits)):08x}"


def fields(description: str) -> dict[str, str]:
    """A description split into named values: ``name=value`` and ``name(inner fields)`` tokens, split on
    spaces outside brackets; unnamed tokens are named by their place (``word 3``), parts joined by
    `` | `` (one call per batch row or head) prefixed ``part N``."""
    parts = description.split(" | ")
    out: dict[str, str] = {}
    for n, part in enumerate(parts):
        prefix = f"part {n} " if len(parts) > 1 else ""
        _fields_into(part, prefix, out)
    return out


def _fields_into(text: str, prefix: str, out: dict[str, str]) -> None:
    for i, tok in enumerate(_split_top(text)):
        eq, par = tok.find("="), tok.find("(")
        if par > 0 and (eq < 0 or par < eq) and tok.endswith(")") and "=" in tok:
            _fields_into(tok[par + 1:-1], f"{prefix}{tok[:par]}.", out)
        elif eq > 0:
            out[prefix + tok[:eq]] = tok[eq + 1:]
        else:
            out[f"{prefix}word {i}"] = tok


def _split_top(text: str) -> list[str]:
    toks, depth, cur = [], 0, []
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == " " and depth == 0:
            if cur:
                toks.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        toks.append("".join(cur))
    return toks


_DIGEST = re.compile(r"(\d+)(pairs|slices|docs):([0-9a-f]{8})")
_DIGEST_WORDS = {"pairs": "probe pairs", "slices": "slices", "docs": "documents"}


def _shown(value: str | None, width: int = 80) -> str:
    if value is None:
        return "(not given)"
    digest = _DIGEST.fullmatch(value)
    if digest:
        n, what, crc = digest.groups()
        return f"{n} {_DIGEST_WORDS[what]} (digest {crc})"
    if value and (value[0].isalpha() or value[0] == "_") and value not in ("True", "False", "None"):
        value = repr(value)  # a name or word: quoted, as the argument would be written
    return value if len(value) <= width else value[:width - 3] + "..."


def _ranks(rs: list[int]) -> str:
    return f"rank {rs[0]}" if len(rs) == 1 else "ranks " + ", ".join(map(str, rs))


def differences(descriptions: list[str], limit: int = 6) -> str:
    """The fields the ranks' descriptions differ in, each with its values and the ranks holding each."""
    parsed = [fields(d) for d in descriptions]
    names = list(dict.fromkeys(name for f in parsed for name in f))
    lines = []
    for name in names:
        values = [f.get(name) for f in parsed]
        if len(set(values)) == 1:
            continue
        holders: dict = {}
        for r, val in enumerate(values):
            holders.setdefault(val, []).append(r)
        if name.endswith("mask_mod_answers"):  # the same name, perhaps, but not the same mask
            lines.append(f"{name.removesuffix('_answers')} answers differently on the same probe positions: "
                         + ", ".join(f"{_shown(val)} on {_ranks(rs)}" for val, rs in holders.items()))
        else:  # as the argument is written: name=value
            lines.append(", ".join(f"{name}={_shown(val)} on {_ranks(rs)}" for val, rs in holders.items()))
    if not lines:
        return "the descriptions differ in spacing only: " + "; ".join(
            f"rank {r}: {d!r}" for r, d in enumerate(descriptions))
    more = f"; and {len(lines) - limit} more" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


# Per process group: how many agreed calls this rank has made on it (weak: a destroyed group's count goes).
_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _as_groups(groups) -> tuple:
    return tuple(groups) if isinstance(groups, (tuple, list)) else (groups,)


def call_number(groups) -> tuple[int, ...]:
    """This rank's numbers for a new call on each of ``groups`` (1, 2, ...), counted per group; () without
    an initialised process group.

    Taken on entry, before any check: a rank that leaves a call before the agreement (an exception the
    checks do not catch, such as KeyboardInterrupt) then carries a higher number into its next call than
    its peers, who are still waiting in the previous one, and every rank raises instead of pairing them.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return ()
    numbers = []
    for g in _as_groups(groups):
        pg = g if g is not None else dist.group.WORLD
        _CALLS[pg] = _CALLS.get(pg, 0) + 1
        numbers.append(_CALLS[pg])
    return tuple(numbers)


def out_of_step(numbers) -> ValueError:
    """The error every rank raises when the ranks' call numbers differ."""
    return ValueError(f"ranks are at different ringattn calls on this process group (call numbers "
                      f"{numbers}): a rank skipped or repeated a call, e.g. its caller caught an error on "
                      "that rank only and went on. Every rank must make the same calls in the same order; "
                      "the ranks stay out of step until they are restarted")


def agree(description: str, error: Exception | None, groups, device: torch.device,
          calls: tuple[int, ...] | None = None) -> None:
    """Raise on every rank if any rank's check failed, the ranks' descriptions differ, or the ranks are
    at different calls on the groups (``calls``: the entry's ``call_number``, else counted here).

    ``groups``: one process group (None = the default one), or several whose union reaches every rank
    that takes part (the hybrid strategy's Ulysses and ring groups: MAX over one and then the other
    reaches the whole mesh).
    """
    groups = _as_groups(groups)
    live = [g for g in groups if group_rank_world(g)[1] > 1]
    if not live:
        if error is not None:
            raise error
        return
    calls = call_number(groups) if calls is None else calls
    numbers = [c for g, c in zip(groups, calls) if group_rank_world(g)[1] > 1]
    verdict = _compare(description, error, numbers, live, device)
    if verdict.agreed:
        return
    if len(live) > 1:
        _raise_on_mesh(verdict, description, error, numbers)
    _raise_on_group(live[0], description, error, numbers[0])


class _Verdict:
    """What one MAX all-reduce says: whether the descriptions match, any rank failed, the calls match."""

    def __init__(self, t: torch.Tensor, calls: int):
        self.mismatch = int(t[0]) != -int(t[1])
        self.failed = bool(int(t[2]))
        self.in_step = all(int(t[3 + 2 * i]) == -int(t[4 + 2 * i]) for i in range(calls))

    @property
    def agreed(self) -> bool:
        return not self.mismatch and not self.failed and self.in_step


def _compare(description: str, error: Exception | None, numbers: list[int], live: list, device) -> _Verdict:
    """One tiny MAX all-reduce over each live group: a hash of the description and its negation (equal
    only where every rank's is the same), whether any rank failed, and each call number and its negation."""
    h = zlib.crc32(description.encode()) & 0x7FFFFFFF
    if dist.get_backend(live[0]) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([h, -h, 1 if error is not None else 0, *(x for c in numbers for x in (c, -c))],
                     dtype=torch.int64, device=device)
    try:
        for g in live:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g)
    except RuntimeError as e:
        raise RuntimeError(f"ringattn: the ranks could not agree on the call (a peer rank probably died or "
                           f"timed out): {first_line(e)}") from e
    return _Verdict(t, len(numbers))


def _raise_on_mesh(verdict: _Verdict, description: str, error: Exception | None, numbers: list[int]):
    """Several groups: what this rank knows from the all-reduce alone (a slow path would need every group)."""
    if error is not None:
        raise error
    if verdict.failed:
        raise ValueError("another rank of the mesh rejected its arguments, so this call was abandoned")
    if not verdict.in_step:
        raise out_of_step(f"this rank {tuple(numbers)}")
    raise ValueError("ranks of the mesh disagree on the attention call (every rank must pass the same "
                     f"shapes, dtype, masks and layout); this rank: {description}")


def _raise_on_group(group, description: str, error: Exception | None, number: int):
    """The slow path, taken by every rank of the group together: find out what went wrong where."""
    mine = f"error: {type(error).__name__}: {error}" if error is not None else description
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (number, mine), group=group)
    if error is not None:
        raise error
    bad = [f"rank {r}: {d[len('error: '):]}" for r, (_, d) in enumerate(everyone) if d.startswith("error: ")]
    if bad:
        raise ValueError("another rank rejected its arguments, so this call was abandoned: " + "; ".join(bad))
    numbers = [m for m, _ in everyone]
    if len(set(numbers)) > 1:
        raise out_of_step(numbers)
    raise ValueError(f"ranks disagree on the attention call: {differences([d for _, d in everyone])}. Every "
                     "rank must pass the same shapes, dtype, masks and layout")
