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
from .layouts import Sharding, Uneven
from .masks import MaskSpec
from .modes import BackwardExchange, Layout, Strategy
from .scores import ScoreMod

Documents = torch.Tensor | Sequence[torch.Tensor]  # cu_seqlens, or one per batch row
Slices = Sequence[tuple[tuple[int, int], tuple[int, int], str]]
MaskFn = Callable[..., torch.Tensor]


@dataclass(frozen=True, kw_only=True, eq=False)
class Mask:
    """Which keys each query sees, on global positions: one value for every mask keyword of a call.

    ``Mask(causal=True, window=(128, 0))`` passed as ``mask=`` is the same call as ``causal=True,
    window=(128, 0)`` passed flat. Fields (see ``ring_attention`` for each): ``causal``, ``window``,
    ``documents`` (the ``cu_seqlens`` keyword), ``chunk_size``, ``slices``, ``mask_mod`` and ``seq_len``
    (positions at or past it are padding). A field set both here and as a flat keyword is an error.
    """

    causal: bool = False
    window: tuple[int, int] | None = None
    documents: Documents | None = None
    chunk_size: int | None = None
    slices: Slices | None = None
    mask_mod: MaskFn | None = None
    seq_len: int | None = None

    # Mask field -> the flat keyword of the calls.
    KEYWORDS = {"causal": "causal", "window": "window", "documents": "cu_seqlens", "chunk_size": "chunk_size",
                "slices": "slices", "mask_mod": "mask_mod", "seq_len": "seq_len"}

    def keywords(self) -> dict[str, Any]:
        """The fields this mask sets (not left at their defaults), by their flat keyword names."""
        out = {}
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if val is not f.default and not (f.name == "causal" and val is False):
                out[self.KEYWORDS[f.name]] = val
        return out


def merge_mask(mask: Mask | None, flat: dict[str, Any], who: str) -> dict[str, Any]:
    """``flat`` (the keywords a caller set) with the fields of ``mask`` added; a field given both ways is
    a ``ValueError`` naming it."""
    if mask is None:
        return flat
    if not isinstance(mask, Mask):
        raise TypeError(f"{who}: mask must be a ringattn.Mask, got {type(mask).__name__}")
    out = dict(flat)
    for name, val in mask.keywords().items():
        given = flat.get(name)
        if given is not None and given is not False:
            field = next(f for f, kw in Mask.KEYWORDS.items() if kw == name)
            raise ValueError(f"{who}: {name} is given twice, as mask=Mask({field}=...) and as the keyword "
                             f"{name}=; pass it one way")
        out[name] = val
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
    kv_head_chunk: int | None = None
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
        """The keywords of the mask (``Mask.KEYWORDS``' names), as ``validate.make_spec`` takes them."""
        return {name: getattr(self, name) for name in Mask.KEYWORDS.values()}


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
