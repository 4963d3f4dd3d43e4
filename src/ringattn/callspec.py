"""What an attention call is, as data: the mask (:class:`Mask`), the keywords (:class:`Options`), where it
runs (:class:`Topology`) and the validated call every strategy receives (:class:`AttentionCall`).

A leaf: the front door (``call.py``) builds these, the strategies and the cost model read them, and this
module imports neither.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .kernels import BACKENDS, Backend
from .layouts import Uneven
from .masks import KINDS, MaskSpec, is_set
from .modes import BackwardExchange, Layout, Strategy
from .scores import ScoreMod
from .sharding import Sharding

Documents = torch.Tensor | Sequence[torch.Tensor]  # cu_seqlens, or one per batch row
Slices = Sequence[tuple[tuple[int, int], tuple[int, int], str]]
MaskFn = Callable[..., torch.Tensor]


@dataclass(frozen=True, eq=False, init=False)
class Mask:
    """Which keys each query sees, on global positions: one value for every mask keyword of a call.

    ``Mask(causal=True, window=(128, 0))`` passed as ``mask=`` is the same call as ``causal=True,
    window=(128, 0)`` passed flat. Fields (see ``ring_attention`` for each): ``causal``, ``window``,
    ``documents`` (the ``cu_seqlens`` keyword), ``chunk_size``, ``slices``, ``mask_mod`` and ``seq_len``
    (positions at or past it are padding). A field set both here and as a flat keyword is an error.
    A kind registered with ``ringattn.masks.register`` is one more keyword here (``Mask(name=value)``),
    read back as an attribute; the calls take it through ``mask=`` only.
    """

    causal: bool = False
    window: tuple[int, int] | None = None
    documents: Documents | None = None
    chunk_size: int | None = None
    slices: Slices | None = None
    mask_mod: MaskFn | None = None
    seq_len: int | None = None
    kinds: tuple[tuple[str, Any], ...] = ()  # registered kinds beyond the fields above, (name, value)

    def __init__(self, *, causal: bool = False, window: tuple[int, int] | None = None,
                 documents: Documents | None = None, chunk_size: int | None = None, slices: Slices | None = None,
                 mask_mod: MaskFn | None = None, seq_len: int | None = None,
                 kinds: tuple[tuple[str, Any], ...] = (), **named: Any) -> None:
        for name, val in (("causal", causal), ("window", window), ("documents", documents),
                          ("chunk_size", chunk_size), ("slices", slices), ("mask_mod", mask_mod),
                          ("seq_len", seq_len)):
            object.__setattr__(self, name, val)
        kinds = {**dict(kinds), **named}
        for name in kinds:
            if name not in KINDS:
                raise TypeError(f"Mask() got an unexpected keyword {name!r}: the mask kinds are {sorted(KINDS)} "
                                "(ringattn.masks.register adds one)")
        object.__setattr__(self, "kinds", tuple(kinds.items()))

    def __getattr__(self, name: str) -> Any:
        if name != "kinds" and name in KINDS:
            return dict(self.kinds).get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def fields(self) -> dict[str, Any]:
        """The kinds this mask sets (not left at their defaults), by ``Mask`` field name."""
        out = {name: getattr(self, name) for name in _BUILT_IN if is_set(getattr(self, name))}
        out.update((name, val) for name, val in self.kinds if is_set(val))
        return out

    def keywords(self) -> dict[str, Any]:
        """The kinds this mask sets, by their names in the calls' keywords (``MaskKind.key``)."""
        return {KINDS[name].key: val for name, val in self.fields().items()}


# The Mask fields of the built-in kinds: every kind with a MaskSpec field, declared in masks.KINDS.
_BUILT_IN = tuple(f.name for f in dataclasses.fields(Mask) if f.name != "kinds")
assert set(_BUILT_IN) == {k.name for k in KINDS.values() if k.spec_field is not None}, \
    "Mask's fields and the built-in kinds of masks.KINDS must match"


def merge_mask(mask: Mask | None, flat: dict[str, Any], who: str) -> dict[str, Any]:
    """``flat`` (the keywords a caller set) with the fields of ``mask`` added; a field given both ways is
    a ``ValueError`` naming it. Kinds without a flat keyword go in ``mask_kinds``."""
    if mask is None:
        return flat
    if not isinstance(mask, Mask):
        raise TypeError(f"{who}: mask must be a ringattn.Mask, got {type(mask).__name__}")
    out = dict(flat)
    extra = []
    for name, val in mask.fields().items():
        kind = KINDS[name]
        if kind.keyword is None:
            extra.append((name, val))
            continue
        given = flat.get(kind.keyword)
        if is_set(given):
            raise ValueError(f"{who}: {kind.keyword} is given twice, as mask=Mask({name}=...) and as the keyword "
                             f"{kind.keyword}=; pass it one way")
        out[kind.keyword] = val
    if extra:
        out[MASK_KINDS] = tuple(extra)
    return out


@dataclass(frozen=True, kw_only=True)
class Options:
    """The keywords of an attention call (see ``ring_attention`` for what each means)."""

    causal: bool = False
    window: tuple[int, int] | None = None
    layout: Layout | str = Layout.CONTIGUOUS
    seq_len: int | None = None
    q_seq_len: int | None = None
    cu_seqlens: Documents | None = None  # a list: one per batch row
    softmax_scale: float | None = None
    return_lse: bool = False
    backward_exchange: BackwardExchange | str = BackwardExchange.RING
    kv_head_chunk: int | None = None  # the kv_heads_per_gather keyword (allgather)
    backend: str | Backend | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    chunk_size: int | None = None
    alibi_slopes: torch.Tensor | None = None
    mask_mod: MaskFn | None = None
    slices: Slices | None = None
    uneven: bool = False
    sharding: Sharding | None = None  # what a copy of a shard no longer remembers (``call.remembered``)

    def mask_keywords(self) -> dict[str, Any]:
        """The flat keywords of the mask (``MaskKind.keyword``), as ``validate.make_spec`` takes them."""
        return {kind.keyword: getattr(self, kind.keyword) for kind in KINDS.values() if kind.keyword is not None}


# The options-dictionary key of the registered kinds a ``Mask`` carries (no flat keyword, so no ``Options``
# field): ``merge_mask`` puts them there, ``call.build`` hands them to ``validate.make_spec``.
MASK_KINDS = "mask_kinds"


@dataclass(frozen=True)
class Topology:
    """Where a strategy runs: the group its layout is over (``world`` blocks of ``block_rows`` local
    lengths), the group that splits the heads, if any, and every group that must agree on the call."""

    group: object
    rank: int
    world: int
    block_rows: int = 1
    head_group: object = None
    head_world: int = 1
    head_rank: int = 0
    agree_over: tuple = (None,)
    mesh: object = None


@dataclass(frozen=True)
class CallShape:
    """The sizes of a call's tensors, as the cost model and the planning before the agreement read them:
    ``q_rows`` and ``k_rows`` are the rows of one block of the layout (``block_rows`` local lengths)."""

    batch: int
    q_rows: int
    k_rows: int
    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    dtype_bytes: int
    grad: bool  # q, k or v asks for a gradient
    device: torch.device


@dataclass(frozen=True)
class AttentionCall:
    """One validated, agreed call, as every strategy receives it."""

    strategy: Strategy
    options: Options
    topo: Topology
    layout: Layout | Uneven  # contiguous when the layout's group has one rank (every layout is the same then)
    spec: MaskSpec
    scale: float
    backend: Backend
    q_offset: int = 0  # global position of query row 0 (Options.q_seq_len; 0 for square attention)
    scores: ScoreMod | None = None  # None: plain scores
    sinks: torch.Tensor | None = None  # (heads,) of the heads this call computes
    shape: CallShape | None = None

    @property
    def group(self):
        return self.topo.group

    def heads(self, h0: int, h1: int) -> AttentionCall:
        """The call for query heads ``[h0, h1)`` only (strategies that split the heads)."""
        return dataclasses.replace(self, scores=None if self.scores is None else self.scores.heads(h0, h1),
                                   sinks=None if self.sinks is None else self.sinks[h0:h1])

    def local_heads(self, heads: int) -> AttentionCall:
        """The call for this rank's share of ``heads`` query heads after a head-splitting all-to-all."""
        per = heads // self.topo.head_world
        return self.heads(self.topo.head_rank * per, (self.topo.head_rank + 1) * per)

    @property
    def backward_exchange(self) -> BackwardExchange:
        return BackwardExchange(self.options.backward_exchange)

    def backend_for(self, dlse: torch.Tensor | None) -> Backend:
        """The backend of this call's backward: its own, unless a gradient flows into lse and it cannot
        take one."""
        if dlse is None or self.backend.caps.takes_dlse:
            return self.backend
        return BACKENDS["reference"]
