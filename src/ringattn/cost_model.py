"""A cost model for context-parallel attention: which strategy to use (``ringattn plan`` prints it).

For each strategy the model counts, per rank: attention FLOPs (from the same ``masks.block_tasks``
classification the kernels use, so causal halves, windows and documents skip what they hide), bytes
sent on the busiest link, peak activation memory, and a predicted time from the device's FLOP/s, the
link's one-way bandwidth and a per-message latency:

- ``ring``: W synchronous steps (fewer under windows); step ``i`` takes ``max(compute_i, transfer)``
  because the next K/V block travels while this one is computed. Backward also carries float32
  dK/dV with the blocks (``backward_exchange="ring"``), or streams each block from its owner and
  returns dK/dV to it in key tiles (``"direct"``, and the ring exchange on 2 ranks: same bytes, an
  exchange per tile, no whole block in flight in backward).
- ``allgather``: the K/V gather (and, in backward, the dK/dV reduce-scatter) runs in ``n`` head
  chunks overlapped with compute: ``first chunk's transfer + (n - 1) * max(compute, transfer) / n +
  last chunk's compute``.
- ``ulysses``: four all-to-alls forward (q, k, v, out) and four back, nothing hidden; compute is
  perfectly balanced (every rank sees the whole sequence for ``heads / W`` heads).
- ``hybrid``: Ulysses over U ranks of a node (intra-node bandwidth), ring over ``R = W / U`` nodes.

Compute time counts the FLOPs the kernels execute, not only the visible ones: a causal call computes its
diagonal key blocks whole (``Hardware.key_block``, the CPU op's 512), and on CPU the allgather strategy's
passes over the whole sequence's K/V in memory cost ``copy_bandwidth`` time. ``ringattn plan --measure``
measures both with the FLOP/s and the link; ``python -m benchmarks strategies`` compares the predictions
with measured times (docs/benchmarks.md).

The Ring Attention paper's overlap condition is built in: a ring step hides its transfer when the
block ``c`` satisfies ``4 d c^2 h / F >= 2 * c * d * kv_heads * bytes / B``; for multi-head attention
in bf16 that is ``c >= F / B`` tokens (``overlap_block``), and the paper's minimal sequence per device
is ``6 c`` (``min_sequence``): Table 2.

``strategy="auto"`` calls ``choose_strategy`` on the checked call: deterministic from it and the configured
hardware (``set_hardware``, ``$RINGATTN_HARDWARE``, else a preset guessed from the device), never
from a measurement taken inside the call, so every rank chooses the same.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .callspec import Mask
from .kernels.base import Capabilities
from .layouts import Uneven, as_bounds, effective_layout, layout_of, padded_len
from .masks import KINDS, MaskContext, MaskSpec, Segment, check_mask_mod, check_slices, spec_fields
from .tasks import block_tasks, task_flops
from .validate import check_backward_exchange

if TYPE_CHECKING:
    from .callspec import AttentionCall

STRATEGY_ORDER = ("ring", "allgather", "ulysses", "hybrid")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


@dataclass(frozen=True)
class Hardware:
    """One device and its links. Bandwidths are one-way bytes/s per device."""

    name: str
    flops: float  # attention FLOP/s one device sustains (dense, in the working dtype)
    bandwidth: float  # the slowest link a ring crosses (inter-node when W > node_size)
    latency: float = 5e-6  # seconds per message
    memory: float = 80e9  # bytes per device for activations
    node_size: int = 8  # devices joined by the fast intra-node link
    intra_bandwidth: float | None = None  # inside a node; None = bandwidth
    shared_cores: int | None = None  # CPU: all ranks share this many cores
    note: str = ""
    # A kernel backward's time over its forward's on the same task. FlashAttention-2's backward does 2.5x
    # the forward's FLOPs; one that runs them slower per FLOP takes longer (``measure`` times both).
    backward_time: float = 2.5
    # Keys a causal kernel call computes per query row: up to the end of its diagonal's block of this many
    # keys (``Capabilities.causal_key_block``; the CPU op's 512). Time counts those FLOPs, reports the visible.
    key_block: int = 1
    # Bytes/s one rank copies (a reordering copy, as of gathered K/V): the allgather strategy moves the whole
    # sequence's K/V (and float32 dK/dV) through memory several times, work no overlap hides. None = free
    # (device memory is fast next to the attention; ``measure`` times it on CPU).
    copy_bandwidth: float | None = None

    def rank_copy(self, world: int) -> float | None:
        """Copy bandwidth one rank gets when ``world`` ranks run at once."""
        if self.copy_bandwidth is None:
            return None
        return self.copy_bandwidth * (1.0 if self.shared_cores is None else min(1.0, self.shared_cores / world))

    def rank_flops(self, world: int) -> float:
        """FLOP/s one rank gets when ``world`` ranks run at once (CPU ranks share the cores)."""
        if self.shared_cores is None:
            return self.flops
        return self.flops * min(1.0, self.shared_cores / max(world, 1))

    def link(self, ranks: int) -> float:
        """Bandwidth of a collective over ``ranks`` consecutive devices."""
        if ranks <= self.node_size and self.intra_bandwidth is not None:
            return self.intra_bandwidth
        return self.bandwidth


PRESETS: dict[str, Hardware] = {h.name: h for h in (
    Hardware("a100-nvlink", 312e12, 300e9, 5e-6, 80e9, 8, None, note="paper Table 2: 312 TFLOP/s, 300 GB/s"),
    Hardware("a100-infiniband", 312e12, 12.5e9, 5e-6, 80e9, 8, 300e9,
             note="paper Table 2: 312 TFLOP/s, 12.5 GB/s across nodes; NVLink inside"),
    Hardware("h100-nvlink", 989e12, 450e9, 5e-6, 80e9, 8, None, note="bf16 dense; NVLink 4, 450 GB/s one-way"),
    Hardware("h100-infiniband", 989e12, 50e9, 5e-6, 80e9, 8, 450e9, note="400 Gb/s NDR per GPU across nodes"),
    Hardware("tpu-v3", 123e12, 112e9, 5e-6, 16e9, 4, None, note="paper Table 2"),
    Hardware("tpu-v4", 275e12, 268e9, 5e-6, 32e9, 4, None, note="paper Table 2"),
    Hardware("tpu-v5e", 196e12, 186e9, 5e-6, 16e9, 4, None, note="paper Table 2"),
    Hardware("cpu-gloo-loopback", 14e9, 1.4e9, 60e-6, 8e9, 64, None, shared_cores=2, key_block=512,
             note="a small CPU host, fp32: 14 GFLOP/s, gloo on loopback 1.4 GB/s, 60 us; --measure to refresh"),
)}
# The name the CPU preset had first; set_hardware("cpu") and $RINGATTN_HARDWARE=cpu keep working.
ALIASES = {"cpu": "cpu-gloo-loopback"}


def overlap_block(hw: Hardware, heads: int = 1, kv_heads: int = 1, dtype_bytes: int = 2) -> float:
    """Smallest block (tokens per ring step) whose compute hides its K/V transfer.

    Per step a rank computes ``4 d c^2 h`` FLOPs and sends ``2 c d kv_heads * bytes``: hidden when
    ``c >= F / B * kv_heads * bytes / (2 h)`` — ``F / B`` for multi-head bf16 (the paper's Table 2).
    """
    return hw.flops / hw.bandwidth * kv_heads * dtype_bytes / (2 * heads)


def min_sequence(hw: Hardware, **kw) -> float:
    """The paper's minimal sequence per device: six blocks (q, k, v in use, k, v arriving, out)."""
    return 6 * overlap_block(hw, **kw)


@dataclass(frozen=True)
class Problem:
    """One attention call (per layer), as the planner sees it."""

    seq_len: int
    world: int
    heads: int
    kv_heads: int
    head_dim: int = 128
    v_head_dim: int | None = None
    batch: int = 1
    dtype_bytes: int = 2
    causal: bool | None = None  # None: True, or what mask= says
    window: tuple[int, int] | None = None
    layout: str = "zigzag"
    backward: bool = True
    mesh: tuple[int, int] | None = None  # (ring, ulysses) for hybrid; None = chosen from node_size
    backward_exchange: str = "ring"  # the ring's backward: "ring" or "direct" (see ring_attention)
    # The masks beyond causal and window, as the call takes them: the FLOPs and ring steps come from the
    # same classification the strategies plan with.
    documents: tuple[int, ...] | None = None  # cu_seqlens
    chunk_size: int | None = None
    slices: tuple | None = None  # ((q0, q1), (k0, k1), kind), ...
    mask_mod: object = dataclasses.field(default=None, compare=False)  # fn(q_idx, kv_idx); not in reports
    # The kinds of ``mask`` without a field above (``masks.register``) as (name, value) pairs, each planned
    # as its MaskKind checks it.
    kinds: tuple[tuple[str, object], ...] = dataclasses.field(default=(), repr=False)
    # The whole mask as one value: a ringattn.Mask (its fields fill the ones above), or the MaskSpec of a
    # checked call (``from_call``), which is then the mask planned.
    # Compared (and so part of auto's cache key): two calls of one shape with other masks plan apart.
    mask: Mask | MaskSpec | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        if isinstance(self.mask, Mask):
            self._take_mask(self.mask)
        elif self.causal is None:
            object.__setattr__(self, "causal", True)
        for name in ("seq_len", "world", "heads", "kv_heads", "head_dim", "batch", "dtype_bytes"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        layout_of(self.layout)
        check_backward_exchange(self.backward_exchange)
        d = self.documents
        if d is not None and (len(d) < 2 or d[0] != 0 or d[-1] > self.seq_len or any(b <= a for a, b in zip(d, d[1:]))):
            raise ValueError(f"documents must rise strictly from 0 to at most seq_len {self.seq_len}, got {d[:8]}")
        if self.mesh is not None and math.prod(self.mesh) != self.world:
            raise ValueError(f"mesh {self.mesh} does not have world = {self.world} ranks")

    @property
    def dv(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def local_len(self) -> int:
        return padded_len(self.seq_len, self.world, effective_layout(self.layout, self.world)) // self.world

    def _take_mask(self, mask: Mask) -> None:
        """The fields of ``mask`` as this problem's: kinds with a field here into it, the others (registered
        kinds) into ``kinds``."""
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        kinds = list(self.kinds)
        for name, val in mask.fields().items():
            if name == "seq_len":
                raise ValueError("Problem(mask=Mask(seq_len=...)): the problem's seq_len is its own field")
            if name == "causal":
                continue
            if name not in given:  # a kind without a field here: planned from its MaskKind
                kinds.append((name, val))
                continue
            if given[name] is not None:
                raise ValueError(f"Problem: {name} is given twice, in mask= and as {name}=; pass it one way")
            if name == "documents":
                val = as_bounds(val)
            elif name in ("window", "slices"):
                val = tuple(val)
            object.__setattr__(self, name, val)
        object.__setattr__(self, "kinds", tuple(kinds))
        # As at the call: a causal=True given beside the mask stands; otherwise the mask says.
        object.__setattr__(self, "causal", bool(self.causal) or mask.causal)
        object.__setattr__(self, "mask", None)

    @classmethod
    def from_call(cls, call: AttentionCall) -> Problem:
        """The problem of a checked call, its mask the call's own. The model is of square attention: with
        fewer queries than keys it models the keys' length, which is what the ring and the gather move."""
        world, s = call.topo.world, call.shape
        layout = call.layout.base if isinstance(call.layout, Uneven) else call.layout
        return cls(seq_len=world * s.k_rows, world=world, heads=s.heads, kv_heads=s.kv_heads,
                   head_dim=s.head_dim, v_head_dim=s.v_head_dim, batch=s.batch, dtype_bytes=s.dtype_bytes,
                   causal=call.spec.causal, window=call.spec.window, layout=str(layout), backward=s.grad,
                   backward_exchange=str(call.backward_exchange), mask=call.spec)

    def spec(self) -> MaskSpec:
        if isinstance(self.mask, MaskSpec):
            return self.mask
        total = self.world * self.local_len
        real = self.documents[-1] if self.documents else self.seq_len  # keys past the documents: padding
        others = spec_fields({KINDS[name].key: val for name, val in self.kinds}, MaskContext(real, total, self.batch))
        return MaskSpec(real, self.causal, self.window, self.documents, chunk=self.chunk_size,
                        mask_mod=check_mask_mod(self.mask_mod), slices=check_slices(self.slices, total), **others)


@dataclass
class Estimate:
    """The model's view of one strategy on one problem; times in seconds, sizes in bytes, per rank."""

    strategy: str
    feasible: bool
    note: str = ""
    flops: float = 0.0  # busiest rank, forward (+ backward)
    compute_s: float = 0.0
    comm_bytes: float = 0.0  # sent per rank
    comm_s: float = 0.0  # time the transfers take, hidden or not
    exposed_s: float = 0.0  # transfer time not hidden behind compute
    time_s: float = math.inf
    memory_bytes: float = 0.0  # peak activations of this attention call
    hidden: bool = False
    fits: bool = True


def _tile(n: int) -> int:
    # Partial block pairs are tiled for counting as the kernels tile them, but coarser for huge
    # blocks so that planning a million tokens takes milliseconds, not minutes.
    return max(512, -(-n // 16))


@functools.lru_cache(maxsize=4096)
def pair_flops(spec: MaskSpec, qsegs: tuple[Segment, ...], ksegs: tuple[Segment, ...], per_token: float,
                key_block: int = 1) -> tuple[float, float]:
    """Forward FLOPs of a block pair per (batch * heads * (d + dv)) unit, scaled by ``per_token``: (the visible
    pairs', the ones a kernel computing whole diagonal blocks of ``key_block`` keys executes)."""
    tasks = block_tasks(spec, qsegs, ksegs, Capabilities(max_dense_tile=_tile(sum(s.length for s in qsegs))))
    return (per_token * sum(task_flops(t, 1, 1, 1, 0) / 2 for t in tasks),
            per_token * sum(task_flops(t, 1, 1, 1, 0, key_block) / 2 for t in tasks))


def flop_unit(p: Problem, heads: int) -> float:
    """task_flops(batch, heads, d, dv) / task_flops(1, 1, 1, 0) * 2 — FLOPs per visible (i, j) unit."""
    return 2.0 * p.batch * heads * (p.head_dim + p.dv)


# ---- strategy="auto" ------------------------------------------------------------------------------

_CONFIGURED: Hardware | None = None


def set_hardware(hw: Hardware | str | None) -> None:
    """The hardware ``strategy="auto"`` plans for (a preset name, a ``Hardware``, or None = detect).

    Must be the same on every rank (e.g. a preset, or a measurement broadcast from rank 0).
    """
    global _CONFIGURED
    _CONFIGURED = hardware(hw) if isinstance(hw, str) else hw


def hardware(name: str) -> Hardware:
    """The preset called ``name`` (or an alias of one, ``ALIASES``)."""
    name = ALIASES.get(name, name)
    if name not in PRESETS:
        raise ValueError(f"hardware must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def configured_hardware(device=None) -> Hardware:
    """``set_hardware``'s choice, else ``$RINGATTN_HARDWARE``, else a preset guessed from the device."""
    if _CONFIGURED is not None:
        return _CONFIGURED
    env = os.environ.get("RINGATTN_HARDWARE")
    if env:
        return hardware(env)
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        name = torch.cuda.get_device_name(device)
        return PRESETS["h100-nvlink" if ("H100" in name or "H200" in name) else "a100-nvlink"]
    return PRESETS["cpu-gloo-loopback"]


# --- token mixers of hybrid models (ringattn.mixers) ---------------------------------------------------

MIXER_KINDS = ("scalar", "diagonal", "dense", "log", "conv")


def _mixer_slots(layout: str, world: int, kind: str) -> int:
    """Summary slots (the most feeding pieces a rank holds) or, for a halo, the most fragments, without
    documents, from the layout's own positions (a layout placed by documents: as one run per rank). Zigzag:
    chunks r and 2W-1-r, one run on rank W-1; every piece but the last feeds. Strided layouts regroup to
    contiguous."""
    if world == 1:
        return 0
    rule = layout_of(layout)
    if rule.strided or rule.needs_documents:
        return 1
    local = 2 * world  # any local length the layout takes shows its runs
    most = 0
    for r in range(world):
        runs = []
        for seg in rule.positions(r, world, local, None):
            if runs and runs[-1][1] == seg.start:
                runs[-1] = (runs[-1][0], seg.start + seg.length)
            else:
                runs.append((seg.start, seg.start + seg.length))
        feeding = len(runs) if kind == "conv" else sum(end < world * local for _, end in runs)
        most = max(most, feeding)
    return most


@dataclass(frozen=True)
class MixerCost:
    """One mixer layer on one rank, beyond its share of the one-process work (``mixer_cost``)."""

    kind: str
    slots: int  # summaries (or halo tails) this rank contributes
    bytes_sent: int  # forward: what this rank puts into the all-gather (independent of the length)
    bytes_received: int  # forward: the other ranks' buffers
    backward_bytes: int  # the all-reduce of the gathered buffer's gradient (its size; a ring sends ~2x)
    regroup_bytes: int  # striped: the local tensors sent by the all-to-all, both ways, forward
    local_flops: float  # this rank's share of the one-process pass
    extra_flops: float  # the summary's extra local work: transition, correction (or rerun)
    extra_passes: float  # extra_flops / local_flops
    time: float  # predicted seconds of the extra work and the exchange, forward
    note: str


def mixer_cost(kind: str, *, seq_len: int, world: int, heads: int = 1, state: tuple[int, int] = (1, 1),
               channels: int = 0, kernel: int = 4, chunk: int = 64, batch: int = 1, dtype_bytes: int = 2,
               layout: str = "zigzag", slots: int | None = None, correct: bool = True,
               token_bytes: int = 0, hw: Hardware | None = None) -> MixerCost:
    """Per-layer cost of a context-parallel mixer on one rank (forward): bytes and the extra local work.

    ``kind``: ``"scalar"`` (Mamba2 / SSD: state ``heads x (P, N)``, a scalar transition per head),
    ``"diagonal"`` (Mamba1, RG-LRU: state ``heads x (D, N)`` and a transition of the state's shape; pass
    ``heads=1, state=(d_inner, N)``), ``"dense"`` (Gated DeltaNet, KDA: state ``heads x (K, V)``, a K x K
    transition), ``"log"`` (a stabilised state, ``run_fragments(kind="log")``: RWKV's WKV ``heads=1,
    state=(2, channels)`` (num, den), xLSTM's mLSTM ``heads x (K, V + 1)`` (C, n); the value and its log scale
    travel, and the log of a diagonal decay; no correction, so always the rerun path),
    ``"conv"`` (a depthwise causal convolution of ``channels`` and ``kernel``: a halo of
    ``kernel - 1`` rows per fragment). ``slots``: summaries per rank, the most feeding pieces one holds
    (default without documents: 1 contiguous or striped; zigzag 1 on 2 ranks, else 2; a halo: the most
    fragments, 2 zigzag); ``Fragments.summary_slots()`` / ``fragment_slots()`` give them for a plan.
    ``correct``: the correction path (``run_fragments(correct=)``; dense: one pass with K more value
    columns gives the transition and the correction's operator), else the rerun path (a second pass
    over the pieces that continue a document, after the exchange). ``token_bytes``: bytes of a token's
    inputs, for striped's regroup. Summaries are float32 (float64 for ``dtype_bytes=8``).

    FLOPs per token are rough counts of the chunked pure-torch steps (scalar: ``2cN + 2cP + 6PN`` per
    head; diagonal: ``6N`` per channel; dense: ``4cK + 4cV + 6KV`` per head; log: ``10`` per state
    element, exponentials counted as one; conv: ``2k`` per channel),
    enough to compare the extra work with the pass; ``python -m benchmarks mixers`` measures them."""
    if kind not in MIXER_KINDS:
        raise ValueError(f"mixer_cost: kind must be one of {MIXER_KINDS}, got {kind!r}")
    if world < 1 or seq_len < world:
        raise ValueError(f"mixer_cost: need 1 <= world <= seq_len, got world={world}, seq_len={seq_len}")
    hw = hw or configured_hardware()
    local = seq_len // world
    slots = slots if slots is not None else _mixer_slots(layout, world, kind)
    if world == 1:
        slots = 0
    a, b = state
    sbytes = 8 if dtype_bytes == 8 else 4
    if kind == "conv":
        if channels < 1:
            raise ValueError("mixer_cost: kind='conv' needs channels >= 1")
        per_slot, elem = (kernel - 1) * channels, dtype_bytes
        pass_flops, extra = 2.0 * kernel * channels, 0.0
    else:
        m = {"scalar": heads, "diagonal": heads * a * b, "dense": heads * a * a, "log": heads * a * b}[kind]
        # kind="log" sends the state's log scale beside its value
        per_slot, elem = m + (2 if kind == "log" else 1) * heads * a * b, sbytes
        correct = correct and kind != "log"
        if kind == "scalar":  # state (P, N) = (a, b)
            pass_flops = heads * (2 * chunk * (a + b) + 6 * a * b)
            corr = heads * 2 * a * b + heads  # C . h_in per token, and the decay
        elif kind == "diagonal":
            pass_flops = 6.0 * heads * a * b
            corr = 4.0 * heads * a * b  # the decay of h_in per (channel, state), and C . that
        elif kind == "log":
            pass_flops = corr = 10.0 * heads * a * b
        else:  # dense (K, V) = (a, b)
            pass_flops = heads * (4 * chunk * (a + b) + 6 * a * b)
            corr = heads * (4 * chunk * a + 6 * a * a + 2 * a * b)  # K more value columns, then P_t . h_in
        # The rerun path runs each piece that continues a document again: all but the first rank's
        # first piece, about one whole local pass on the critical path.
        extra = corr if correct else pass_flops
    local_flops = pass_flops * local * batch
    extra_flops = extra * local * batch if world > 1 else 0.0
    sent = slots * batch * per_slot * elem
    received = (world - 1) * sent
    regroup = 2 * local * batch * token_bytes * (world - 1) // world if layout_of(layout).strided and world > 1 else 0
    time = extra_flops / hw.rank_flops(world)
    if world > 1:
        time += hw.latency * 2 + (received + regroup) / hw.link(world)  # agreement + gather (+ all-to-alls)
    if kind == "conv":
        note = f"halo of {kernel - 1} rows x {slots} fragments; no extra pass"
    elif correct:
        note = "correction path: all ranks' local passes at once, the correction after the exchange"
    else:
        note = "rerun path: pieces that continue a document run again after the exchange"
    return MixerCost(kind, slots, sent, received, world * sent if world > 1 else 0, regroup, local_flops,
                     extra_flops, extra_flops / local_flops if local_flops else 0.0, time, note)
