"""A new user's sharding mistakes are errors (or right numbers), never wrong numbers: a forgotten
``init_process_group`` under torchrun, and a layout, length or sequence dimension given at ``shard`` and
another (or none) at the call or ``unshard``. Exact paths against the float64 dense reference."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import ringattn

from .cases import mesh_for
from .reference import TOL, attention_ref, dense_mask, rel_err

F64 = torch.float64


def full_qkv(S: int, Lq: int | None = None, seed: int = 0, b: int = 1):
    g = torch.Generator().manual_seed(seed)
    Lq = S if Lq is None else Lq
    return (torch.randn(b, Lq, 4, 8, generator=g, dtype=F64), torch.randn(b, S, 2, 8, generator=g, dtype=F64),
            torch.randn(b, S, 2, 8, generator=g, dtype=F64))


def reference(q, k, v, causal=False, cu_seqlens=None):
    S, Lq = k.shape[1], q.shape[1]
    keep = dense_mask(S, causal=causal, cu_seqlens=cu_seqlens)[S - Lq:]
    return attention_ref(q, k, v, keep)


def raised(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except (ValueError, RuntimeError) as e:
        return str(e)
    return "no error"


# --- torch.distributed not initialised under torchrun -----------------------------------------------

def test_forgotten_init_process_group_is_refused(monkeypatch):
    assert not dist.is_initialized()
    q, k, v = full_qkv(8)
    monkeypatch.setenv("WORLD_SIZE", "2")
    want = ("torch.distributed is not initialised but WORLD_SIZE=2: call dist.init_process_group(...) first")
    for fn in (lambda: ringattn.shard(q), lambda: ringattn.unshard(q), lambda: ringattn.ring_attention(q, k, v),
               lambda: ringattn.attention(q, k, v, strategy="allgather")):
        with pytest.raises(RuntimeError) as e:
            fn()
        assert want in str(e.value)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process, as torchrun --nproc-per-node 1 says
    assert torch.equal(ringattn.unshard(ringattn.shard(q)), q)
    monkeypatch.delenv("WORLD_SIZE")
    ringattn.ring_attention(q, k, v)


# --- the sharding travels from shard to the call and unshard ----------------------------------------

def _defaults_exact(S: int, layout: str, causal: bool, Lq: int | None, strategy: str = "ring"):
    """Shard, call and unshard passing nothing but the layout to shard: the tensors carry the rest."""
    q, k, v = full_qkv(S, Lq)
    mesh = mesh_for((2, 2)) if strategy == "hybrid" else None
    qs, ks, vs = (ringattn.shard(t, layout=layout, mesh=mesh).requires_grad_() for t in (q, k, v))
    out, lse = ringattn.attention(qs, ks, vs, causal=causal, strategy=strategy, mesh=mesh, return_lse=True)
    full, full_lse = ringattn.unshard(out), ringattn.unshard(lse)
    ref, ref_lse = reference(q, k, v, causal)
    assert full.shape == ref.shape and full_lse.shape == ref_lse.shape, (full.shape, ref.shape)
    out.sum().backward()  # the remembered sharding does not get in autograd's way
    return max(rel_err(full, ref), rel_err(full_lse, ref_lse))


@pytest.mark.parametrize("world,layout,causal,Lq,strategy", [
    (2, "zigzag", False, None, "ring"), (2, "zigzag", True, None, "ring"), (2, "contiguous", False, None, "ring"),
    (3, "zigzag", True, None, "ring"), (2, "zigzag", True, 21, "ring"), (3, "striped", False, None, "ring"),
    (2, "zigzag", True, None, "allgather"), (2, "zigzag", True, None, "ulysses"), (4, "zigzag", True, None, "hybrid"),
])
def test_call_and_unshard_take_the_sharding_from_the_tensors(ranks, world, layout, causal, Lq, strategy):
    errs = ranks.run(world, _defaults_exact, 61, layout, causal, Lq, strategy)
    assert max(errs) < TOL[F64], errs


def _explicit_exact():
    """Plain tensors and explicit arguments work as before; a smaller seq_len marks the caller's padding."""
    S = 61
    q, k, v = full_qkv(S)
    qs, ks, vs = (ringattn.shard(t, layout="zigzag").contiguous().clone() for t in (q, k, v))
    assert ringattn.sharding_of(qs) is None
    out = ringattn.ring_attention(qs, ks, vs, layout="zigzag", seq_len=S, causal=True)
    e1 = rel_err(ringattn.unshard(out.detach().clone(), layout="zigzag", seq_len=S), reference(q, k, v, True)[0])
    # Tensors padded by the caller to 64, sharded, with the real length at the call.
    pad = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 64 - S)) for t in (q, k, v)]
    ps = [ringattn.shard(t, layout="zigzag") for t in pad]
    out = ringattn.ring_attention(*ps, seq_len=S, causal=True)
    e2 = rel_err(ringattn.unshard(out), reference(q, k, v, True)[0])
    # A view that splits the hidden size into heads keeps the sequence where it was.
    hidden = [ringattn.shard(t.flatten(2), layout="zigzag") for t in (q, k, v)]
    views = [h.view(*h.shape[:2], -1, 8) for h in hidden]
    e3 = rel_err(ringattn.unshard(ringattn.ring_attention(*views, causal=True)), reference(q, k, v, True)[0])
    return e1, e2, e3


def test_plain_tensors_and_explicit_arguments_still_work(ranks):
    for errs in ranks.run(2, _explicit_exact):
        assert max(errs) < TOL[F64], errs


def _kept_explicitly():
    """Copies forget; the Sharding kept from a shard stands in for what they forgot."""
    S = 61
    q, k, v = full_qkv(S)
    qs, ks, vs = (ringattn.shard(t, layout="zigzag") for t in (q, k, v))
    kept = ringattn.sharding_of(ks)
    copies = [t.clone() for t in (qs, ks, vs)]
    out = ringattn.ring_attention(*copies, sharding=kept, causal=True)
    err = rel_err(ringattn.unshard(out), reference(q, k, v, True)[0])
    err = max(err, rel_err(kept.unshard(out.detach()), reference(q, k, v, True)[0]))
    wrong = raised(ringattn.ring_attention, qs, ks, vs, sharding=ringattn.sharding_of(ringattn.shard(k)))
    try:
        ringattn.ring_attention(*copies, sharding="zigzag")
    except TypeError as e:
        kind = str(e)
    return err, wrong, kind


def test_a_kept_sharding_stands_in_for_what_copies_forget(ranks):
    for err, wrong, kind in ranks.run(2, _kept_explicitly):
        assert err < TOL[F64], err
        assert "sharding= says layout='contiguous'" in wrong and "but k remembers layout='zigzag'" in wrong, wrong
        assert "sharding must be a ringattn.Sharding" in kind, kind


def _balanced_and_uneven():
    S = 61
    cu = torch.tensor([0, 40, 61])
    q, k, v = full_qkv(S)
    qs, ks, vs = (ringattn.shard(t, layout="balanced", cu_seqlens=cu) for t in (q, k, v))
    out = ringattn.ring_attention(qs, ks, vs, causal=True)
    e1 = rel_err(ringattn.unshard(out), reference(q, k, v, True, cu)[0])
    other = raised(ringattn.ring_attention, qs, ks, vs, causal=True, cu_seqlens=torch.tensor([0, 30, 61]))
    us = [ringattn.shard(t, layout="zigzag", uneven=True) for t in (q, k, v)]
    out = ringattn.ring_attention(*us, causal=True)
    e2 = rel_err(ringattn.unshard(out), reference(q, k, v, True)[0])
    # A view of the uneven output (one head) remembers the uneven split too.
    e3 = rel_err(ringattn.unshard(out[:, :, :1]), reference(q, k, v, True)[0][:, :, :1])
    return e1, max(e2, e3), other


def test_balanced_documents_and_uneven_travel_too(ranks):
    for e1, e2, other in ranks.run(2, _balanced_and_uneven):
        assert max(e1, e2) < TOL[F64], (e1, e2)
        assert "sharded by ringattn.shard with the documents cu_seqlens=[0, 40, 61]" in other, other


# --- contradictions are errors on every rank -----------------------------------------------------------

def _mistakes() -> dict[str, str]:
    S = 61
    q, k, v = full_qkv(S)
    qs, ks, vs = (ringattn.shard(t, layout="zigzag") for t in (q, k, v))
    out = {
        "seq_len padded": raised(ringattn.ring_attention, qs, ks, vs, seq_len=62),
        "layout": raised(ringattn.ring_attention, qs, ks, vs, layout="contiguous"),
        "layout auto": raised(ringattn.attention, qs, ks, vs, layout="striped", strategy="auto"),
        "k and v": raised(ringattn.ring_attention, qs, ks, ringattn.shard(v, layout="striped")),
        "q and k": raised(ringattn.ring_attention, ringattn.shard(q), ks, vs),
        "uneven": raised(ringattn.ring_attention, qs, ks, vs, uneven=True, seq_len=S),
        "unshard seq_len": raised(ringattn.unshard, qs, seq_len=62),
        "unshard layout": raised(ringattn.unshard, qs, layout="contiguous"),
    }
    # (batch, heads, seq, head_dim) tensors: sharded along dim 2, or shards transposed.
    bhsd = [ringattn.shard(t.transpose(1, 2), layout="zigzag", dim=2) for t in (q, k, v)]
    out["dim 2"] = raised(ringattn.ring_attention, *bhsd)
    out["transposed"] = raised(ringattn.ring_attention, *(t.transpose(1, 2) for t in (qs, ks, vs)))
    # Sharded over a group of one (each rank alone), called over both ranks.
    alone = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]
    mine = [ringattn.shard(t, group=alone) for t in (q, k, v)]
    out["group"] = raised(ringattn.ring_attention, *mine)
    # After all of that the group still works.
    out["after"] = rel_err(ringattn.unshard(ringattn.ring_attention(qs, ks, vs)), reference(q, k, v)[0])
    return out


def _mesh_mistake() -> str:
    q, k, v = full_qkv(61)
    return raised(ringattn.attention, *(ringattn.shard(t, layout="zigzag") for t in (q, k, v)), strategy="hybrid",
                  mesh=mesh_for((2, 2)))


def test_shards_of_the_group_called_on_a_mesh_are_refused(ranks):
    for msg in ranks.run(4, _mesh_mistake):
        assert "sharded by ringattn.shard over a group where this process is" in msg, msg
        assert "but the call's mesh (ring rank, ring size, ulysses rank, ulysses size) is" in msg, msg


def test_contradicting_the_sharding_is_an_error_on_every_rank(ranks):
    for got in ranks.run(2, _mistakes):
        assert "seq_len=62 was passed, but q, k, v were sharded by ringattn.shard of 61 tokens" in got["seq_len padded"]
        assert ("layout='contiguous' was passed, but q, k, v were sharded by ringattn.shard with layout='zigzag'"
                in got["layout"]), got["layout"]
        assert "layout='striped' was passed" in got["layout auto"], got["layout auto"]
        assert "k and v were sharded differently: k with layout='zigzag'" in got["k and v"], got["k and v"]
        assert "q and k were sharded differently" in got["q and k"], got["q and k"]
        assert "uneven=True was passed" in got["uneven"], got["uneven"]
        assert "unshard: seq_len=62 was passed" in got["unshard seq_len"], got["unshard seq_len"]
        assert "unshard: layout='contiguous' was passed" in got["unshard layout"], got["unshard layout"]
        for what in ("dim 2", "transposed"):
            assert "q holds its sequence in dim 2" in got[what] and ".transpose(1, 2) before shard" in got[what], \
                got[what]
        assert "sharded by ringattn.shard over a group where this process is (0, 1)" in got["group"], got["group"]
        assert got["after"] < TOL[F64]
