"""Mistakes with masks and calls, as users make them: a different mask_mod on each rank, masks written to
index a table of seq_len entries (attention-gym's document_mask), a mask_mod that raises on some ranks,
thousands of slices, two threads on one group, and what the disagreement error says."""

from __future__ import annotations

import random
import time

import pytest
import torch
import torch.distributed as dist

import ringattn
from ringattn import masks
from ringattn.masks import MaskSpec

from .cases import Case, assert_close, mesh_for, run_case

F64 = torch.float64
N = 61  # odd: zigzag, balanced and uneven blocks all end in padding or uneven lengths

# A document id per token, as attention-gym's document_mask builds it: exactly N entries.
DOCUMENT_ID = torch.repeat_interleave(torch.arange(4), torch.tensor([9, 20, 1, 31]))


def document_mask(q_idx, kv_idx):
    return DOCUMENT_ID[q_idx] == DOCUMENT_ID[kv_idx]


def causal_document_mask(q_idx, kv_idx):
    return (DOCUMENT_ID[q_idx] == DOCUMENT_ID[kv_idx]) & (kv_idx <= q_idx)


@pytest.mark.parametrize("world,layout,extra", [(2, "zigzag", {}), (3, "balanced", {}), (4, "balanced", {}),
                                                (3, "contiguous", {"uneven": True}), (3, "striped", {})])
def test_a_mask_that_indexes_a_table_of_seq_len_entries_runs(ranks, world, layout, extra):
    # ringattn asks the mask about real positions only: no IndexError on any rank, and exact numbers.
    cu = [0, 9, 29, 30, N] if layout == "balanced" else None
    for fn in (document_mask, causal_document_mask):
        case = Case(seq_len=N, batch=1, layout=layout, mask_mod=fn, cu_seqlens=cu, **extra)
        assert_close(ranks.run(world, run_case, case), case)


def test_mask_mod_is_never_asked_about_padding():
    asked = []

    def spy(q, k):
        asked.append((int(q.min()), int(q.max()), int(k.min()), int(k.max())))
        return k <= q

    spec = MaskSpec(seq_len=13, mask_mod=masks.MaskMod(spy))
    pos = torch.arange(16)
    keep = spec.visible(pos[:, None], pos[None, :])
    assert not keep[13:].any() and not keep[:, 13:].any()  # padding rows and keys see nothing
    assert torch.equal(keep[:13, :13], torch.ones(13, 13, dtype=torch.bool).tril())
    assert asked and all(0 <= a and b < 13 and 0 <= c and d < 13 for a, b, c, d in asked), asked


# --- different masks on different ranks ----------------------------------------------------------------

def _table_mask(table):
    def same_document(q_idx, kv_idx):  # one name on every rank, a different table on each
        return table[q_idx] == table[kv_idx]
    return same_document


def different_mask_mods(kind: str):
    rank = dist.get_rank()
    q = torch.randn(1, 8, 2, 8, dtype=F64)
    n = 8 * dist.get_world_size()
    if kind == "closure":
        mod = _table_mask(torch.arange(n) // (4 if rank == 1 else 8))
        kw = {"mask_mod": mod}
    else:
        kw = {"slices": [((0, n), (0, n), "causal" if rank == 2 else "full")]}
    t0 = time.perf_counter()
    try:
        ringattn.ring_attention(q, q, q, **kw)
    except ValueError as e:
        return str(e), time.perf_counter() - t0
    return None, time.perf_counter() - t0


@pytest.mark.parametrize("kind,field,odd", [("closure", "mask_mod", 1), ("slices", "slices", 2)])
def test_different_masks_on_each_rank_are_refused_everywhere(ranks, kind, field, odd):
    for msg, secs in ranks.run(3, different_mask_mods, kind):
        assert msg is not None and secs < 10
        assert "ranks disagree" in msg and f"{field}" in msg and f"on rank {odd}" in msg, msg
        others = ", ".join(str(r) for r in range(3) if r != odd)
        assert f"on ranks {others}" in msg, msg
    assert_close(ranks.run(3, run_case, Case(seq_len=20)), Case(seq_len=20))


def layout_differs():
    q = torch.randn(1, 8, 2, 8, dtype=F64)
    try:
        ringattn.ring_attention(q, q, q, layout="zigzag" if dist.get_rank() else "striped")
    except ValueError as e:
        return str(e)
    return None


def test_disagreement_names_the_field_and_the_ranks(ranks):
    for msg in ranks.run(3, layout_differs):
        assert msg.startswith("ranks disagree on the attention call: layout='striped' on rank 0, layout='zigzag' "
                              "on ranks 1, 2. "), msg
        assert "<" not in msg and len(msg) < 300, msg


# --- user code that raises on some ranks only -----------------------------------------------------------

def raises_on_rank_1(q_idx, kv_idx):  # a table that lacks an entry on one rank only
    if dist.get_rank() == 1 and bool(((q_idx == 100) & (kv_idx == 50)).any()):
        raise KeyError("no entry for token 100")
    return kv_idx <= q_idx


def raising_mask_on_one_rank():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 2, 8, dtype=F64, generator=g)
    t0 = time.perf_counter()
    try:
        ringattn.ring_attention(q, q, q, mask_mod=raises_on_rank_1)
    except ValueError as e:
        return str(e), time.perf_counter() - t0
    return None, time.perf_counter() - t0


def test_a_mask_mod_raising_on_one_rank_ends_the_call_everywhere(ranks):
    # The probe grid misses (100, 50); rank 1's planning asks about it: an agreed error, not a hang.
    results = ranks.run(3, raising_mask_on_one_rank)
    for rank, (msg, secs) in enumerate(results):
        assert msg is not None and secs < 10, msg
        assert "raised when asked about query positions" in msg and "no entry for token 100" in msg, msg
        assert rank == 1 or "rank 1" in msg, msg
    assert_close(ranks.run(3, run_case, Case(seq_len=20)), Case(seq_len=20))


# --- many slices ------------------------------------------------------------------------------------------

def test_slices_cost_the_tiles_they_touch(monkeypatch):
    # 900 slices over 1,500 tokens: classification and dense tiles visit each slice only where it lies.
    rng = random.Random(0)
    n, sl = 1500, []
    for _ in range(900):
        q0, k0 = rng.randrange(n), rng.randrange(n)
        sl.append(((q0, min(n, q0 + rng.randrange(1, 101))), (k0, min(n, k0 + rng.randrange(1, 101))),
                   rng.choice(["full", "causal", "inv-causal", "bi-causal"])))
    area = sum((q1 - q0) * (k1 - k0) for (q0, q1), (k0, k1), _ in sl)
    visits, cells = [0], [0]
    fill, overlap = masks.Slice.fill, masks.Slice.overlap

    def counted_fill(self, keep, qs, ks):
        cells[0] += (qs.count_below(self.q1) - qs.count_below(self.q0)) * (ks.count_below(self.k1)
                                                                           - ks.count_below(self.k0))
        return fill(self, keep, qs, ks)

    def counted_overlap(self, *a, **k):
        visits[0] += 1
        return overlap(self, *a, **k)

    monkeypatch.setattr(masks.Slice, "fill", counted_fill)
    monkeypatch.setattr(masks.Slice, "overlap", counted_overlap)
    monkeypatch.setattr(masks.Slice, "visible", None)  # the whole-tile test per slice is not used
    q = torch.randn(1, n, 1, 8, dtype=F64, requires_grad=True)
    ringattn.ring_attention(q, q, q, slices=sl).sum().backward()
    assert 0 < cells[0] <= 3 * area, (cells, area)  # each slice's own area, a few times at most
    assert visits[0] <= 4 * len(sl), visits  # not slices x tiles


# --- two threads on one group ---------------------------------------------------------------------------

def two_threads_one_group():
    import threading

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 16, 2, 8, dtype=F64, generator=g)
    inside, refused = threading.Event(), threading.Event()
    seen = {}

    def slow_causal(q_idx, kv_idx):  # holds the first call inside until the second has been answered
        inside.set()
        refused.wait(30)
        return kv_idx <= q_idx

    def first():
        seen["first"] = ringattn.ring_attention(q, q, q, mask_mod=slow_causal)

    def second():
        inside.wait(30)
        t0 = time.perf_counter()
        try:
            ringattn.ring_attention(q, q, q, causal=True)
        except RuntimeError as e:
            seen["second"] = (type(e).__name__, str(e), time.perf_counter() - t0)
        finally:
            refused.set()

    threads = [threading.Thread(target=first, name="first"), threading.Thread(target=second, name="second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = ringattn.ring_attention(q, q, q, causal=True)  # the group is usable: one call at a time
    return seen.get("second"), bool(torch.allclose(seen["first"], after))


def test_two_threads_on_one_group_are_refused_at_once(ranks):
    for second, same in ranks.run(2, two_threads_one_group):
        kind, msg, secs = second
        assert kind == "ConcurrentCallError" and secs < 5, second
        assert "thread 'first'" in msg and "one at a time" in msg and "dist.new_group" in msg, msg
        assert same


# --- a failure after the agreement ------------------------------------------------------------------------

def fails_mid_call(strategy: str, where: str):
    """Rank 1's first kernel call (forward or backward) raises, as an out-of-memory would."""
    from ringattn import strategies

    module = getattr(strategies, "ring" if strategy == "hybrid" else strategy)
    name = "run_forward" if where == "forward" else "run_backward"
    real = getattr(module, name)

    def flaky(*a, **k):
        if dist.get_rank() == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(*a, **k)

    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 16, 6, 8, dtype=F64, generator=g, requires_grad=True)
    mesh = {"mesh": mesh_for((2, 2))} if strategy == "hybrid" else {}
    setattr(module, name, flaky)
    t0 = time.perf_counter()
    try:
        ringattn.attention(q, q, q, causal=True, strategy=strategy, **mesh).sum().backward()
    except RuntimeError as e:
        return type(e).__name__, str(e), time.perf_counter() - t0
    finally:
        setattr(module, name, real)
    return None, None, time.perf_counter() - t0


@pytest.mark.parametrize("strategy,where", [("ring", "forward"), ("ring", "backward"), ("allgather", "forward"),
                                            ("allgather", "backward"), ("ulysses", "backward"),
                                            ("hybrid", "forward"), ("hybrid", "backward")])
def test_a_failure_on_one_rank_after_the_agreement_ends_the_call_everywhere(ranks, strategy, where):
    what = {"ring": "ring", "allgather": "all-gather", "ulysses": "ulysses", "hybrid": "ring"}[strategy]
    world = 4 if strategy == "hybrid" else 3
    for rank, (kind, msg, secs) in enumerate(ranks.run(world, fails_mid_call, strategy, where)):
        assert kind is not None and secs < 10, (rank, msg, secs)
        if rank == 1:
            assert msg == "out of memory (simulated)", msg
        else:
            assert kind == "CallAbandoned" and f"{what} {where} failed on another rank" in msg, msg
            assert strategy == "hybrid" or "rank 1: RuntimeError: out of memory (simulated)" in msg, msg
    # Every exchange was completed: the group serves the next calls.
    case = Case(seq_len=20, causal=True, strategy=strategy, heads=6, kv_heads=3)
    if strategy == "hybrid":
        case = Case(seq_len=24, causal=True, strategy=strategy, heads=4, kv_heads=2, extra={"mesh_shape": (2, 2)})
    assert_close(ranks.run(world, run_case, case), case)


def test_a_mask_mod_reading_a_table_that_changes_between_calls_is_replanned():
    # One function object, its table changed in place between calls (a new batch's documents): the second
    # call must plan the new mask, not reuse the first call's block classification.
    from .reference import attention_ref, rel_err

    n, table = 64, torch.zeros(64, dtype=torch.int64)
    fn = _table_mask(table)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 8, generator=g, dtype=F64) for _ in range(3))
    pos = torch.arange(n)
    for docs in ([64], [10, 54], [40, 3, 21]):
        table.copy_(torch.repeat_interleave(torch.arange(len(docs)), torch.tensor(docs)))
        out = ringattn.ring_attention(q, k, v, mask_mod=fn, backend="reference")
        ref, _ = attention_ref(q, k, v, fn(pos[:, None], pos[None, :]))
        assert rel_err(out, ref) < 1e-12, docs


def decode_with_rank_tables():
    # Each rank's closure reads its own document table: decode must refuse, as the ring does.
    rank = dist.get_rank()
    table = torch.tensor([0] * 6 + [1] * 6) if rank == 0 else torch.tensor([0] * 4 + [1] * 8)
    fn = _table_mask(table)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 2, 8, generator=g, dtype=F64)
    k, v = (torch.randn(1, 6, 2, 8, generator=g, dtype=F64) for _ in range(2))
    k_pos = torch.arange(rank * 6, rank * 6 + 6)
    try:
        ringattn.decode_attention(q, k, v, torch.tensor([11]), k_pos, mask_mod=fn)
    except ValueError as e:
        return str(e)
    return "no error"


def test_decode_with_different_masks_on_each_rank_is_refused(ranks):
    for msg in ranks.run(2, decode_with_rank_tables):
        assert "ranks disagree" in msg and "mask_mod" in msg, msg
