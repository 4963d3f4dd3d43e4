"""One attention case run on every rank and checked against the float64 dense reference.

Importable by spawned workers. Every rank builds the same global inputs from the seed, runs the path
under test on its shard, and compares its shard of out / lse / dq / dk / dv with the same shard of the
reference, errors relative to the reference's largest magnitude over the whole sequence.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import ringattn
from ringattn import comm
from ringattn.call import takes_four

from .backends import backend_for
from .reference import TOL, attention_ref, dense_mask, slices_mask

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


@dataclass
class Case:
    seq_len: int
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    v_head_dim: int | None = None
    batch: int = 2
    dtype: str = "float64"
    layout: str = "contiguous"
    causal: bool = False
    window: tuple | None = None
    cu_seqlens: list | None = None  # ints: the documents of batch 1; a list of lists: one per batch row
    seed: int = 0
    tile: int | None = None  # a smaller Capabilities.max_dense_tile, to exercise tiling on small inputs
    chunk: int | None = None  # a smaller Capabilities.backward_tile: the ring backward's key tiles
    doc_piece: int | None = None  # a smaller Capabilities.min_document_piece: per-document planning
    backend: str | None = None  # a library or test backend (tests/backends.py); None = the library's choice
    strategy: str = "ring"
    scale_logits: float = 1.0
    q_len: int | None = None  # queries: the last q_len of the seq_len positions (q_seq_len); None = all
    extra: dict = field(default_factory=dict)
    # Score modifications and sinks (random slopes / sink logits from the seed); lse_grad: a gradient
    # flows into the returned lse too.
    softcap: float | None = None
    sinks: bool = False
    alibi: bool = False
    chunk_size: int | None = None
    lse_grad: bool = False
    mask_mod: Callable | None = None  # a module-level function (it travels to the ranks by pickle)
    slices: list | None = None
    uneven: bool = False  # no padding: ranks hold different lengths (shard(..., uneven=True))


def ref_with_mods(q, k, v, dout, dlse, keep, mods: dict):
    """Out, lse and the gradients of q, k, v (and sinks) of the reference with score modifications."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    sinks = mods.get("sinks")
    if sinks is not None:
        sinks = sinks.detach().double().requires_grad_()
    assert sinks is not None or bool(keep.any(-1).all()), "rows that see nothing need the masked reference"
    out, lse = attention_ref(*leaves, keep, **{**mods, "sinks": sinks})
    loss = (out * dout.double()).sum()
    if dlse is not None:
        loss = loss + (lse * dlse.double()).sum()
    loss.backward()
    return out.detach(), lse.detach(), *(t.grad for t in leaves), None if sinks is None else sinks.grad

def ref_with_grads(q, k, v, dout, keep, scale=None):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    h, kvh = q.shape[2], k.shape[2]
    kr = k.repeat_interleave(h // kvh, dim=2)
    vr = v.repeat_interleave(h // kvh, dim=2)
    sc = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q, kr) * sc
    rows = keep.any(-1)
    s = torch.where(keep, s, torch.where(rows[..., None], float("-inf"), 0.0))
    p = torch.softmax(s, -1) * keep
    out = torch.einsum("bhij,bjhd->bihd", p, vr)
    (out * dout.double()).sum().backward()
    _, lse = attention_ref(q.detach(), k.detach(), v.detach(), keep, scale)
    return out.detach(), lse, q.grad, k.grad, v.grad


_MESHES: dict = {}


def mesh_for(shape: tuple[int, int]):
    """A cached ("ring", "ulysses") DeviceMesh over the default group (built once per worker)."""
    if shape not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        _MESHES[shape] = init_device_mesh("cpu", shape, mesh_dim_names=("ring", "ulysses"))
    return _MESHES[shape]


def run_case(case: Case) -> dict:
    rank, world = comm.group_rank_world()
    dtype = DTYPES[case.dtype]
    backend = backend_for(case.backend or os.environ.get("RINGATTN_TEST_BACKEND"), case.tile, case.chunk,
                          case.doc_piece)
    g = torch.Generator().manual_seed(case.seed)
    S, b = case.seq_len, case.batch
    Lq = S if case.q_len is None else case.q_len
    dv = case.v_head_dim or case.head_dim
    q = torch.randn(b, Lq, case.heads, case.head_dim, generator=g, dtype=torch.float64) * case.scale_logits
    k = torch.randn(b, S, case.kv_heads, case.head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(b, S, case.kv_heads, dv, generator=g, dtype=torch.float64)
    dout = torch.randn(b, Lq, case.heads, dv, generator=g, dtype=torch.float64)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    per_row = case.cu_seqlens is not None and isinstance(case.cu_seqlens[0], (list, tuple))
    if per_row:
        cu = [torch.tensor(c, dtype=torch.int32) for c in case.cu_seqlens]
    else:
        cu = torch.tensor(case.cu_seqlens, dtype=torch.int32) if case.cu_seqlens is not None else None
    # The queries are the last Lq positions: their rows of the full square mask.
    masks = dict(causal=case.causal, window=case.window, chunk_size=case.chunk_size)
    if per_row:  # (batch, 1, S, S): one mask per row, broadcast over the heads
        keep = torch.stack([dense_mask(S, cu_seqlens=c, **masks) for c in cu])[:, None]
    else:
        keep = dense_mask(S, cu_seqlens=cu, **masks)
    if case.mask_mod is not None and takes_four(case.mask_mod):  # (batch, heads, S, S)
        rows_heads = torch.arange(b)[:, None, None, None], torch.arange(case.heads)[None, :, None, None]
        keep = keep & case.mask_mod(*rows_heads, torch.arange(S)[:, None], torch.arange(S)[None, :])
    elif case.mask_mod is not None:
        keep &= case.mask_mod(torch.arange(S)[:, None], torch.arange(S)[None, :])
    if case.slices is not None:
        keep &= slices_mask(S, case.slices)
    keep = keep[..., S - Lq:, :]
    mods = {}
    if case.softcap is not None:
        mods["softcap"] = case.softcap
    if case.alibi:
        mods["alibi_slopes"] = torch.rand(case.heads, generator=g, dtype=torch.float64).to(dtype)
    if case.sinks:
        mods["sinks"] = torch.randn(case.heads, generator=g, dtype=torch.float64).to(dtype)
    dlse = torch.randn(b, case.heads, Lq, generator=g, dtype=torch.float64) if case.lse_grad else None
    r_dsinks = None
    if mods or dlse is not None:
        r_out, r_lse, r_dq, r_dk, r_dv, r_dsinks = ref_with_mods(q, k, v, dout, dlse, keep, mods)
    else:
        r_out, r_lse, r_dq, r_dk, r_dv = ref_with_grads(q, k, v, dout, keep)

    lay = case.layout
    extra = dict(case.extra)
    # extra={"mesh_shape": (R, U)}: a 2-D mesh for strategy="hybrid"; shards follow the mesh. Anything
    # else in extra is passed to the strategy (e.g. backward_exchange, kv_head_chunk).
    mesh = mesh_for(tuple(extra.pop("mesh_shape"))) if "mesh_shape" in extra else None
    if mesh is not None:
        extra["mesh"] = mesh
    place = cu if lay == "balanced" else None  # the documents place the balanced layout's tokens

    def shard_ref(x, dim=1):
        return ringattn.shard(x, layout=lay, dim=dim, mesh=mesh, cu_seqlens=place, uneven=case.uneven)

    qs, ks, vs = (shard_ref(t).requires_grad_() for t in (q, k, v))
    ds = shard_ref(dout)
    kw = dict(causal=case.causal, window=case.window, layout=lay, seq_len=S, cu_seqlens=cu, return_lse=True,
              backend=backend)
    if case.q_len is not None and "q_seq_len" not in extra:  # extra={"q_seq_len": None}: the default
        kw["q_seq_len"] = Lq
    if case.uneven:
        kw["uneven"] = True
    for name in ("chunk_size", "mask_mod", "slices"):
        if getattr(case, name) is not None:
            kw[name] = getattr(case, name)
    sinks = None
    for name, val in mods.items():
        if name == "sinks":
            val = sinks = val.clone().requires_grad_()
        kw[name] = val
    if case.strategy == "ring":
        out, lse = ringattn.ring_attention(qs, ks, vs, **kw, **extra)
    else:
        out, lse = ringattn.attention(qs, ks, vs, strategy=case.strategy, **kw, **extra)
    loss = (out.double() * ds.double()).sum()
    if dlse is not None:  # shard zero-pads: no gradient flows into the padding rows' lse
        loss = loss + (lse.double() * shard_ref(dlse, dim=2)).sum()
    loss.backward()

    local = qs.shape[1]
    def positions(bounds):
        if case.uneven:
            return ringattn.shard(torch.arange(S), layout=lay, dim=0, uneven=True)
        if mesh is not None:
            return ringattn.layouts.mesh_positions(lay, mesh, local, bounds=ringattn.layouts.as_bounds(bounds))
        return ringattn.global_positions(lay, rank, world, local, cu_seqlens=bounds)

    rows = torch.stack([positions(c) for c in place]) if per_row and place is not None else positions(place)
    valid = (rows < Lq).expand(b, local)  # (batch, local) query rows, numbered from the first query

    def err(x, ref, full_ref, dim=1, only_valid=False):
        x, ref = x.detach().double(), ref.double()
        if only_valid:  # padding rows are compared as zeros
            mask = valid[:, :, None, None] if dim == 1 else valid[:, None, :]
            x, ref = x.masked_fill(~mask, 0), ref.masked_fill(~mask, 0)
        fin = torch.isfinite(ref)
        if not torch.equal(fin, torch.isfinite(x)):
            return float("inf")
        if not torch.equal(x[~fin], ref[~fin]):
            return float("inf")
        finite = full_ref[torch.isfinite(full_ref)]
        denom = float(finite.abs().max()) if finite.numel() else 0.0
        denom = denom if denom > 1e-12 else 1.0  # a reference that vanishes: compare absolutely
        return float((x[fin] - ref[fin]).abs().max() / denom) if fin.any() else 0.0

    errs = {
        "out": err(out, shard_ref(r_out), r_out, only_valid=True),
        "lse": err(lse, shard_ref(r_lse, dim=2), r_lse, dim=2, only_valid=True),
        "dq": err(qs.grad, shard_ref(r_dq), r_dq),
        "dk": err(ks.grad, shard_ref(r_dk), r_dk),
        "dv": err(vs.grad, shard_ref(r_dv), r_dv),
    }
    if sinks is not None:  # every rank holds the part of its rows: the sum is the gradient
        total = sinks.grad.detach().double().clone()
        if world > 1:
            torch.distributed.all_reduce(total)
        errs["dsinks"] = err(total, r_dsinks, r_dsinks, dim=0)
    assert out.dtype == dtype and out.shape == (b, local, case.heads, dv)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(out).all(), "non-finite output"
    return errs


def raised(fn: Callable, *args, **kwargs) -> str:
    """The message of the ValueError that ``fn(*args, **kwargs)`` raises, or "no error": run on every rank,
    it shows that a refusal reaches each of them."""
    try:
        fn(*args, **kwargs)
    except ValueError as e:
        return str(e)
    return "no error"


def assert_close(results: list[dict], case: Case, tol: float | None = None) -> None:
    tol = TOL[DTYPES[case.dtype]] if tol is None else tol
    bad = {f"rank{r}.{k}": e for r, errs in enumerate(results) for k, e in errs.items() if not e <= tol}
    assert not bad, f"{case}: errors above {tol}: {bad}"


@contextlib.contextmanager
def recorded_exchanges(what=lambda ring, send, to, tag: tag):
    """``what(ring, send, to, tag)`` of every ring exchange this rank posts inside the block (a list,
    filled in place); by default the tags, which tell which backward exchange really ran, since both
    give the same numbers."""
    log, post = [], comm.Ring.exchange

    def spy(self, send, to, recv_like, frm, tag, *args, **kwargs):
        log.append(what(self, send, to, tag))
        return post(self, send, to, recv_like, frm, tag, *args, **kwargs)

    comm.Ring.exchange = spy
    try:
        yield log
    finally:
        comm.Ring.exchange = post
