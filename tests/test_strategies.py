"""All-gather, Ulysses, hybrid and auto on real gloo groups vs. the float64 dense reference.

Each strategy runs the ring's exactness cases (layouts, causal, window, documents, GQA, padding,
float32) through ``ringattn.attention(strategy=...)``, plus the checks specific to it: K/V head
replication (Ulysses), head chunking (all-gather), mesh shapes (hybrid), errors raised on every rank.
"""

from __future__ import annotations

import pytest
import torch

import ringattn

from .cases import Case, assert_close, run_case

LAYOUTS = ["contiguous", "zigzag", "striped"]


def exactness_cases(world: int, strategy: str, extra: dict | None = None, layouts=LAYOUTS) -> list[Case]:
    extra = extra or {}
    cases = []
    for i, lay in enumerate(layouts):
        for causal in (False, True):
            # GQA 4:1 / 4:2 / 4:4 and an odd length, so the last ranks hold padding.
            kvh = (1, 2, 4)[(i + causal) % 3]
            cases.append(Case(seq_len=16 * world + 7, kv_heads=kvh, layout=lay, causal=causal, seed=i,
                              v_head_dim=8 if causal else None, strategy=strategy, extra=dict(extra)))
    n = 40 * world
    cases += [
        # window (shrunk tiles, so partial pairs are cut), documents, float32
        Case(seq_len=n - 3, layout=layouts[-1], causal=True, window=(9, -1), tile=8, strategy=strategy,
             extra=dict(extra), seed=7),
        Case(seq_len=n, layout=layouts[0], window=(5, 3), strategy=strategy, extra=dict(extra), seed=8),
        Case(seq_len=n - 1, batch=1, layout=layouts[len(layouts) // 2], causal=True,
             cu_seqlens=[0, 5, n // 2, n - 6, n - 1], strategy=strategy, extra=dict(extra), seed=9),
        Case(seq_len=n + 1, layout=layouts[-1], causal=True, dtype="float32", kv_heads=1, strategy=strategy,
             extra=dict(extra), seed=10),
    ]
    return cases


def run_all(ranks, world, cases):
    for case in cases:
        assert_close(ranks.run(world, run_case, case), case)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_allgather_matches_dense(ranks, world):
    run_all(ranks, world, exactness_cases(world, "allgather"))


@pytest.mark.parametrize("world", [2, 4])
def test_allgather_head_chunks(ranks, world):
    # One kv head per gather (several chunks, gathers overlapped with compute) and uneven chunks.
    cases = [Case(seq_len=16 * world + 5, heads=6, kv_heads=3, layout=lay, causal=True, seed=11,
                  strategy="allgather", extra={"kv_head_chunk": ch}) for lay, ch in (("zigzag", 1), ("striped", 2))]
    run_all(ranks, world, cases)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ulysses_matches_dense(ranks, world):
    run_all(ranks, world, exactness_cases(world, "ulysses"))


def test_ulysses_replicates_kv_heads(ranks):
    # kv_heads 2 and 6 over 4 ranks: each K/V head is copied 2x (lcm(kv_heads, 4) heads travel).
    cases = [Case(seq_len=45, heads=h, kv_heads=kvh, layout="zigzag", causal=True, seed=h, strategy="ulysses")
             for h, kvh in ((8, 2), (12, 6))]
    run_all(ranks, 4, cases)


@pytest.mark.parametrize("shape", [(2, 2), (1, 4), (4, 1)])
def test_hybrid_matches_dense(ranks, shape):
    extra = {"mesh_shape": shape}
    cases = exactness_cases(4, "hybrid", extra) if shape == (2, 2) else \
        [Case(seq_len=53, layout=lay, causal=True, strategy="hybrid", extra=dict(extra), seed=3, kv_heads=1)
         for lay in LAYOUTS]
    run_all(ranks, 4, cases)


def test_auto_matches_dense(ranks):
    run_all(ranks, 2, [Case(seq_len=37, layout="zigzag", causal=True, strategy="auto"),
                       Case(seq_len=40, layout="striped", strategy="auto", window=(7, 2))])


def _lse_grads(strategy: str) -> float:
    """Largest gradient difference vs. the ring when the loss also uses lse (the dlse path)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 24, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    dl = torch.randn(1, 4, 24, generator=g, dtype=torch.float64)
    grads = []
    for strat in ("ring", strategy):
        xs = [ringattn.shard(t, layout="zigzag").requires_grad_() for t in (q, k, v)]
        out, lse = ringattn.attention(*xs, strategy=strat, causal=True, layout="zigzag", return_lse=True)
        (out.sum() + (lse * ringattn.shard(dl, layout="zigzag", dim=2)).sum()).backward()
        grads.append([x.grad for x in xs])
    return max(float((a - b).abs().max()) for a, b in zip(*grads))


@pytest.mark.parametrize("strategy", ["allgather", "ulysses"])
def test_gradient_through_lse(ranks, strategy):
    assert max(ranks.run(2, _lse_grads, strategy)) < 1e-10


def _errors(kind: str) -> str:
    rank = torch.distributed.get_rank()
    q = torch.randn(1, 8, 4, 8)
    k = v = torch.randn(1, 8, 2, 8)
    try:
        if kind == "one_rank_bad":  # only rank 1 passes a bad window: everybody must raise
            ringattn.attention(q, k, v, strategy="allgather", window=(2, -3) if rank == 1 else None)
        elif kind == "ulysses_heads":
            ringattn.attention(torch.randn(1, 8, 6, 8), torch.randn(1, 8, 3, 8), torch.randn(1, 8, 3, 8),
                               strategy="ulysses")
        elif kind == "unknown":
            ringattn.attention(q, k, v, strategy="pass-q")
        elif kind == "hybrid_no_mesh":
            ringattn.attention(q, k, v, strategy="hybrid")
        elif kind == "mesh_not_hybrid":
            from .cases import mesh_for

            ringattn.attention(q, k, v, strategy="ulysses", mesh=mesh_for((2, 2)))
        elif kind == "hybrid_one_rank_bad":
            from .cases import mesh_for

            ringattn.attention(q, k, v if rank != 3 else torch.randn(1, 8, 2, 4), strategy="hybrid",
                               mesh=mesh_for((2, 2)))
    except ValueError as e:
        return f"ValueError: {e}"
    return "no error"


@pytest.mark.parametrize("kind,world,words", [
    ("one_rank_bad", 2, "window"),
    ("ulysses_heads", 4, "divisible"),
    ("unknown", 2, "strategy must be one of"),
    ("hybrid_no_mesh", 2, "mesh"),
    ("mesh_not_hybrid", 4, "mesh"),
    ("hybrid_one_rank_bad", 4, "rank"),
])
def test_errors_on_every_rank(ranks, kind, world, words):
    msgs = ranks.run(world, _errors, kind)
    assert all(m.startswith("ValueError") for m in msgs), msgs
    assert any(words in m for m in msgs), msgs


def _profiled(strategy: str) -> tuple[float, int]:
    q = torch.randn(1, 16, 4, 8)
    k = v = torch.randn(1, 16, 2, 8)
    with ringattn.profile() as st:
        ringattn.attention(q, k, v, strategy=strategy, causal=True)
    return st.flops, st.bytes_sent


@pytest.mark.parametrize("strategy", ["allgather", "ulysses"])
def test_profile_counts(ranks, strategy):
    for flops, sent in ranks.run(2, _profiled, strategy):
        assert flops > 0 and sent > 0


def test_single_process_without_dist():
    # No process group at all: every strategy is plain exact attention.
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 10, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    ref = ringattn.ring_attention(q, k, v, causal=True)
    for s in ("allgather", "ulysses", "auto"):
        assert torch.allclose(ringattn.attention(q, k, v, strategy=s, causal=True), ref, atol=1e-12)
    with pytest.raises(ValueError, match="strategy must be one of"):
        ringattn.attention(q, k, v, strategy="bogus")
    # backward_exchange is the ring's: the others take "ring" (a model may name it) and reject "direct";
    # "auto" drops it when it picks a strategy without a ring.
    for s in ("allgather", "ulysses"):
        out = ringattn.attention(q, k, v, strategy=s, causal=True, backward_exchange="ring")
        assert torch.allclose(out, ref, atol=1e-12)
        with pytest.raises(ValueError, match="has no ring"):
            ringattn.attention(q, k, v, strategy=s, causal=True, backward_exchange="direct")
    for x in ("ring", "direct"):
        out = ringattn.attention(q, k, v, strategy="auto", causal=True, backward_exchange=x)
        assert torch.allclose(out, ref, atol=1e-12)


def _mesh_roundtrip(layout: str, by_position: bool) -> bool:
    from torch.distributed.device_mesh import init_device_mesh

    from .cases import mesh_for

    # An unnamed mesh is read by position: dim 0 = ring, dim 1 = ulysses (same as the named one).
    mesh = init_device_mesh("cpu", (2, 2)) if by_position else mesh_for((2, 2))
    x = torch.arange(2 * 29 * 3, dtype=torch.float64).view(2, 29, 3).requires_grad_()
    part = ringattn.shard(x, layout=layout, mesh=mesh)
    full = ringattn.unshard(part, layout=layout, mesh=mesh, seq_len=29)
    pos = ringattn.layouts.mesh_positions(layout, mesh, part.shape[1])
    valid = pos < 29
    return torch.equal(full, x.detach()) and torch.equal(part[:, valid], x.detach()[:, pos[valid]])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_unshard_with_mesh(ranks, layout):
    assert all(ranks.run(4, _mesh_roundtrip, layout, layout == "striped"))
