"""Fewer queries than keys (``q_seq_len``): the queries are the last positions of the key sequence
(bottom-right causal, as in chunked prefill), sharded with the same layout. Every strategy against the
float64 dense reference on the full sequence: out, lse, dq, dk, dv."""

from __future__ import annotations

import pytest
import torch

import ringattn
from ringattn import patterns
from ringattn.kernels import Capabilities
from ringattn.masks import Kind, MaskSpec, Segment
from ringattn.tasks import block_tasks

from .cases import Case, assert_close, run_case
from .reference import attention_ref, dense_mask

LAYOUTS = ["contiguous", "zigzag", "striped"]


def run_all(ranks, world, cases):
    for case in cases:
        assert_close(ranks.run(world, run_case, case), case)


def near_or_every_fourth(q, k):  # module level: cases carrying it pickle to the ranks
    return (k % 4 == 0) | (q - k < 5)


def core_cases(world: int, strategy: str, extra: dict | None = None) -> list[Case]:
    """Every layout, causal or not, GQA 4:1 / 4:2 / 4:4, query counts that do and do not divide the
    ranks (so q's local length differs from k's and the last ranks hold query padding); a window,
    packed documents, float32, chunks, ALiBi, sinks, softcap, mask_mod and slices."""
    x = extra or {}
    S = 16 * world + 7
    cases = []
    for i, lay in enumerate(LAYOUTS):
        for causal in (False, True):
            lq = (1, S // 3, S - 5)[(i + causal) % 3]
            cases.append(Case(seq_len=S, q_len=lq, kv_heads=(1, 2, 4)[(i + 2 * causal) % 3], layout=lay,
                              causal=causal, v_head_dim=8 if causal else None, seed=20 + i, strategy=strategy,
                              extra=dict(x)))
    n = 40 * world
    cases += [
        Case(seq_len=n - 3, q_len=n // 2 + 1, layout="striped", causal=True, window=(9, -1), tile=8,
             strategy=strategy, extra=dict(x), seed=27),
        Case(seq_len=n, q_len=n // 4 + 3, layout="contiguous", window=(5, 3), strategy=strategy, extra=dict(x),
             seed=28),
        Case(seq_len=n - 1, q_len=n // 2, batch=1, layout="zigzag", causal=True,
             cu_seqlens=[0, 5, n // 2, n - 6, n - 1], strategy=strategy, extra=dict(x), seed=29),
        Case(seq_len=n + 1, q_len=9, layout="zigzag", causal=True, dtype="float32", kv_heads=1,
             strategy=strategy, extra=dict(x), seed=30),
        # Score modifications read the query positions too: ALiBi's i - j, chunks, sinks; softcap with a
        # gradient through lse.
        Case(seq_len=n - 3, q_len=n // 3, layout="zigzag", causal=True, chunk_size=7, alibi=True, sinks=True,
             strategy=strategy, extra=dict(x), seed=34),
        Case(seq_len=n + 1, q_len=n // 2 - 1, layout="striped", causal=True, softcap=5.0, lse_grad=True,
             strategy=strategy, extra=dict(x), seed=35),
        # User masks on global positions: a predicate, and slices (a bidirectional prefix).
        Case(seq_len=n + 1, q_len=n // 2, layout="contiguous", causal=True, mask_mod=near_or_every_fourth,
             strategy=strategy, extra=dict(x), seed=36),
        Case(seq_len=n, q_len=n // 3 + 2, layout="striped", slices=patterns.prefix_lm(n // 2, n),
             strategy=strategy, extra=dict(x), seed=37),
    ]
    return cases


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_bottom_right(ranks, world):
    cases = core_cases(world, "ring")
    # Both backward exchanges, with key tiles that cut the blocks unevenly; q_seq_len equal to seq_len
    # (square, padded the same); q_seq_len's default when q and k differ in local length (every query
    # row real).
    S = 12 * world + 5
    cases += [Case(seq_len=S, q_len=lq, layout=lay, causal=True, chunk=5, seed=31,
                   extra={"backward_exchange": x})
              for lay in LAYOUTS for lq, x in ((S // 2, "ring"), (S // 2, "direct"), (S, "direct"))]
    cases += [Case(seq_len=S, q_len=2 * world, layout=lay, causal=True, seed=32, extra={"q_seq_len": None})
              for lay in LAYOUTS]
    run_all(ranks, world, cases)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("strategy", ["allgather", "ulysses"])
def test_strategies_bottom_right(ranks, world, strategy):
    run_all(ranks, world, core_cases(world, strategy))


@pytest.mark.parametrize("shape", [(2, 2), (1, 4), (4, 1)])
def test_hybrid_bottom_right(ranks, shape):
    extra = {"mesh_shape": shape}
    cases = core_cases(4, "hybrid", extra) if shape == (2, 2) else \
        [Case(seq_len=53, q_len=19, layout=lay, causal=True, strategy="hybrid", extra=dict(extra), seed=33, kv_heads=1)
         for lay in LAYOUTS]
    run_all(ranks, 4, cases)


def test_single_process_bottom_right():
    # No process group: every strategy is plain attention of the last queries over all keys.
    g = torch.Generator().manual_seed(2)
    S, Lq = 29, 6
    q = torch.randn(1, Lq, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, S, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    ref, _ = attention_ref(q, k, v, dense_mask(S, causal=True)[S - Lq:])
    for s in ("ring", "allgather", "ulysses", "auto"):
        assert torch.allclose(ringattn.attention(q, k, v, strategy=s, causal=True), ref, atol=1e-12)
    # The same queries padded to k's length need q_seq_len: by default equal lengths mean square attention.
    qp = torch.cat([q, q.new_zeros(1, S - Lq, 4, 8)], 1)
    out = ringattn.ring_attention(qp, k, v, causal=True, q_seq_len=Lq)
    assert torch.allclose(out[:, :Lq], ref, atol=1e-12)
    with pytest.raises(TypeError, match="q_seq_len must be an int"):
        ringattn.ring_attention(q, k, v, q_seq_len=6.0)


def test_auto_bottom_right(ranks):
    run_all(ranks, 2, [Case(seq_len=37, q_len=12, layout="zigzag", causal=True, strategy="auto"),
                       Case(seq_len=40, q_len=21, layout="striped", strategy="auto", window=(7, 2))])


def test_bottom_right_needs_no_dense_mask():
    """A query block later than its key block plans to one full and one causal call (no masked tiles),
    with or without documents."""
    caps = Capabilities(max_dense_tile=64)
    spec = MaskSpec(seq_len=1000, causal=True)
    tasks = block_tasks(spec, (Segment(700, 300),), (Segment(0, 1000),), caps)
    assert sorted((t.kind.name, t.q0, t.q1, t.k0, t.k1) for t in tasks) == \
        [("CAUSAL", 0, 300, 700, 1000), ("FULL", 0, 300, 0, 700)]
    docs = MaskSpec(seq_len=1000, causal=True, doc_bounds=(0, 400, 850, 1000))
    assert {t.kind for t in block_tasks(docs, (Segment(700, 300),), (Segment(0, 1000),), caps)} \
        == {Kind.FULL, Kind.CAUSAL}


def _errors(kind: str) -> str:
    rank = torch.distributed.get_rank()
    k = v = torch.randn(1, 8, 2, 8)
    try:
        if kind == "q_longer":  # 2 x 10 query rows over 2 x 8 keys: more queries than keys
            ringattn.ring_attention(torch.randn(1, 10, 4, 8), k, v, causal=True)
        elif kind == "q_seq_len_over_seq_len":
            ringattn.ring_attention(torch.randn(1, 4, 4, 8), k, v, seq_len=5, q_seq_len=7)
        elif kind == "q_seq_len_over_rows":
            ringattn.ring_attention(torch.randn(1, 4, 4, 8), k, v, q_seq_len=9)
        elif kind == "zigzag_odd_q":
            ringattn.attention(torch.randn(1, 3, 4, 8), k, v, strategy="ulysses", layout="zigzag")
        elif kind == "one_rank_bad":
            ringattn.attention(torch.randn(1, 4, 4, 8), k, v, strategy="allgather", q_seq_len=6 if rank else 7)
        elif kind == "kv_lengths":
            ringattn.ring_attention(torch.randn(1, 4, 4, 8), k, torch.randn(1, 6, 2, 8))
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.mark.parametrize("kind,words", [
    ("q_longer", "q is longer than k"),
    ("q_seq_len_over_seq_len", "q_seq_len (7) must be <= seq_len (5)"),
    ("q_seq_len_over_rows", "q_seq_len must be in [0, world * q local_len = 8]"),
    ("zigzag_odd_q", "even q local_len"),
    ("one_rank_bad", "disagree"),
    ("kv_lengths", "k and v must share local_len"),
])
def test_errors_on_every_rank(ranks, kind, words):
    msgs = ranks.run(2, _errors, kind)
    assert all(m.startswith("ValueError") for m in msgs), msgs
    assert any(words in m for m in msgs), msgs
