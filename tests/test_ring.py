"""Ring attention on real gloo process groups vs. the float64 dense reference: out, lse, dq, dk, dv."""

from __future__ import annotations

import pytest

from .cases import Case, assert_close, run_case

LAYOUTS = ["contiguous", "zigzag", "striped"]


def run_all(ranks, world, cases):
    for case in cases:
        assert_close(ranks.run(world, run_case, case), case)


@pytest.mark.parametrize("exchange", ["ring", "direct"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_matches_dense(ranks, world, layout, causal, dtype, exchange):
    # GQA ratios 4:1 (MQA), 4:2 and 4:4; odd global lengths, so the last ranks hold padding. The last two
    # cut the backward's visiting blocks into key/query tiles that divide the block unevenly. Both
    # backward exchanges: dK/dV travelling with their block, and streamed from / returned to the owner.
    x = {"backward_exchange": exchange}
    cases = [
        Case(seq_len=37, kv_heads=1, layout=layout, causal=causal, dtype=dtype, seed=1, extra=x),
        Case(seq_len=16 * world + 7, kv_heads=2, layout=layout, causal=causal, dtype=dtype, seed=2,
             v_head_dim=8, chunk=6, extra=x),
        Case(seq_len=131, kv_heads=4, layout=layout, causal=causal, dtype=dtype, seed=3, batch=1, chunk=11,
             extra=x),
    ]
    run_all(ranks, world, cases)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [3, 4])
def test_shorter_than_world(ranks, world, layout):
    # Global lengths 1..W-1: some ranks hold nothing but padding.
    cases = [Case(seq_len=n, layout=layout, causal=c, seed=n, extra={"backward_exchange": x})
             for n in range(1, world) for c in (False, True) for x in ("ring", "direct")]
    run_all(ranks, world, cases)


@pytest.mark.parametrize("world", [2, 4])
def test_tiled_partial_blocks(ranks, world):
    # Large enough blocks that partial pairs are cut into tiles (TILE shrunk to 8).
    cases = [Case(seq_len=101, layout=lay, causal=c, window=(13, 5) if not c else (13, -1), tile=8, seed=5,
                  chunk=chunk, extra={"backward_exchange": x})
             for lay in LAYOUTS for c in (False, True) for chunk, x in ((None, "ring"), (12, "ring"), (12, "direct"))]
    run_all(ranks, world, cases)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eight_ranks(ranks, layout):
    cases = [Case(seq_len=77, kv_heads=k, layout=layout, causal=c, dtype=dt, seed=k, chunk=4,
                  extra={"backward_exchange": x})
             for k in (1, 4) for c in (False, True) for dt in ("float64", "float32") for x in ("ring", "direct")]
    run_all(ranks, 8, cases)


def exchange_mixed_storage():
    """Neighbours whose blocks are stored differently (row-major, heads-major, a strided view) still
    receive exactly what was sent: both ends put a 4-D block on the wire in the same order."""
    import torch
    import torch.distributed as dist

    from ringattn.comm import Ring

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    base = torch.randn(2, 7, 3, 5, generator=g)
    storages = [base, base.transpose(1, 2).contiguous().transpose(1, 2), torch.randn(2, 7, 3, 10)[..., ::2]]
    mine = storages[rank % 3].copy_(base) if rank % 3 else base
    lse = torch.randn(2, 3, 7, generator=g)
    ring = Ring()
    got = ring.exchange((mine, lse), 1, (storages[(rank + 1) % 3], lse), -1, 11).wait()
    g = torch.Generator().manual_seed((rank - 1) % dist.get_world_size())
    want = torch.randn(2, 7, 3, 5, generator=g), torch.randn(2, 3, 7, generator=g)
    return all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("world", [2, 3])
def test_exchange_mixed_storage(ranks, world):
    assert all(ranks.run(world, exchange_mixed_storage))


def backward_traffic(exchange: str, chunk: int):
    """(tag, rows of the largest 4-D tensor sent, peer offset) of every exchange the backward posts."""
    import torch

    import ringattn
    from ringattn.kernels import BACKENDS, retiled

    from .cases import recorded_exchanges

    def what(ring, send, to, tag):
        return tag, max((t.shape[1] for t in send if t.dim() == 4), default=0), to % ring.world

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 32, h, 8, generator=g, dtype=torch.float64).requires_grad_() for h in (4, 2, 2))
    out = ringattn.ring_attention(q, k, v, causal=True, layout="zigzag", backward_exchange=exchange,
                                  backend=retiled(BACKENDS["cpu-flash"], backward_tile=chunk))
    with recorded_exchanges(what) as log:
        out.sum().backward()
    return log


def test_direct_backward_moves_tiles_between_owner_and_holder(ranks):
    # 4 ranks, 32 rows each, key tiles of 8: the ring exchange sends whole blocks and travelling
    # gradients between neighbours; the direct one only tiles, to and from ranks up to 3 apart.
    from ringattn.comm import TAG_GRAD

    for log in ranks.run(4, backward_traffic, "ring", 8):
        assert any(tag == TAG_GRAD and rows == 32 for tag, rows, _ in log)
    for log in ranks.run(4, backward_traffic, "direct", 8):
        assert log and all(tag != TAG_GRAD and rows <= 8 for tag, rows, _ in log)
        assert {to for *_, to in log} >= {1, 2, 3}
