"""The order in which ranks post their exchanges: deadlock-free under NCCL's rules, not just gloo's.

gloo matches messages by tag and blocks only in ``wait``, so a test on gloo passes whatever order the
ranks post their ``batch_isend_irecv`` groups in. NCCL runs each rank's groups one after another on one
stream, and a group finishes only when every one of its messages has met its partner (per ordered pair
of ranks, in posting order) in a group running at the same time on the peer. Ranks whose tiles differ
(windows, documents, padding) post different subsets of exchanges; unless every rank's groups follow one
global order, two ranks can each wait for a group the other has queued behind its own: a hang.

Here every rank's forward and backward run in this process, through ``comm.Ring.exchange`` down to a
recording ``batch_isend_irecv``; the messages of each pair must agree in tag, shape and dtype, and a
simulation of NCCL's rule checks that the recorded groups all complete.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from ringattn import comm
from ringattn.call import AttentionCall, Options, Topology
from ringattn.kernels import BACKENDS, heads_major, retiled
from ringattn.modes import Layout, Strategy
from ringattn.strategies import ring
from ringattn.validate import make_spec


class _Op:
    def __init__(self, op, tensor, peer, group=None, tag=0):
        self.op, self.tensor, self.peer, self.tag = op, tensor, peer, tag


def record(world, local, layout, causal, window, seq_len, direct, chunk, cu=None, monkeypatch=None, batch=1,
           q_local=None, q_seq_len=None):
    """Per rank, the exchange groups it posts in one forward + backward, through ``comm.Ring.exchange``
    down to ``batch_isend_irecv`` (replaced by a recorder): lists of (send|recv, (src, dst), tag, shape,
    dtype), one per message. ``q_local`` / ``q_seq_len``: fewer queries than keys, the last ones."""
    q_local = local if q_local is None else q_local
    backend = retiled(BACKENDS["cpu-flash"], backward_tile=chunk)
    monkeypatch.setattr(comm.dist, "P2POp", _Op)
    logs = []
    for rank in range(world):
        log = []

        def post(ops, rank=rank, log=log):
            if not ops:  # the real batch_isend_irecv fails on an empty list
                raise AssertionError("an exchange with no message was posted")
            log.append([("send", (rank, op.peer)) if op.op is dist.isend else ("recv", (op.peer, rank))
                        for op in ops])
            log[-1] = [(*m, op.tag, tuple(op.tensor.shape), op.tensor.dtype) for m, op in zip(log[-1], ops)]
            for op in ops:
                if op.op is dist.irecv:
                    op.tensor.zero_()
            return []

        class Recorder(comm.Ring):
            def __init__(self, group=None, rank=rank):
                self.group, self.rank, self.world = None, rank, world

        monkeypatch.setattr(comm.dist, "batch_isend_irecv", post)
        monkeypatch.setattr(ring, "Ring", Recorder)
        cu_t = torch.tensor(cu) if cu is not None else None
        spec = make_spec(world=world, local_len=local, layout=layout, causal=causal, window=window,
                         seq_len=seq_len, cu_seqlens=cu_t, batch=batch)
        q_offset = 0 if q_seq_len is None else spec.seq_len - q_seq_len
        call = AttentionCall(Strategy.RING, Options(backward_exchange="direct" if direct else "ring"),
                             Topology(None, rank, world), Layout(layout), spec, 0.5, backend, q_offset)
        g = torch.Generator().manual_seed(rank)
        q, k, v = (heads_major(torch.randn(batch, n, h, 4, generator=g, dtype=torch.float64))
                   for n, h in ((q_local, 2), (local, 1), (local, 1)))
        out, lse = ring._forward(q, k, v, call)
        ring._backward(torch.ones_like(out), q, k, v, out, lse, call, None)
        logs.append(log)
    return logs


def messages_match(logs) -> bool:
    """Per ordered pair of ranks, the n-th message sent and the n-th received agree in tag, shape, dtype."""
    sent, received = {}, {}
    for log in logs:
        for grp in log:
            for kind, pair, *what in grp:
                (sent if kind == "send" else received).setdefault(pair, []).append(tuple(what))
    return sent == received


def completes_under_nccl(logs) -> bool:
    """Simulate: each rank runs its groups in order; a message completes when its partner (same ordered
    pair, same index) is in the group running on the peer; a group ends when all its messages have."""
    groups = []
    for log in logs:
        count, gs = {}, []
        for grp in log:
            ops = []
            for kind, pair, *_ in grp:
                count[kind, pair] = count.get((kind, pair), 0) + 1
                ops.append([kind, pair, count[kind, pair], False])
            gs.append(ops)
        groups.append(gs)
    head = [0] * len(logs)
    while True:
        running = {(op[0], op[1], op[2]): op for r, gs in enumerate(groups) if head[r] < len(gs)
                   for op in gs[head[r]]}
        moved = False
        for (kind, pair, i), op in running.items():
            partner = running.get(("recv" if kind == "send" else "send", pair, i))
            if not op[3] and partner is not None:
                op[3] = partner[3] = moved = True
        for r, gs in enumerate(groups):
            if head[r] < len(gs) and all(op[3] for op in gs[head[r]]):
                head[r] += 1
                moved = True
        if not moved:
            return all(h == len(gs) for h, gs in zip(head, groups))


def test_the_simulation_catches_crossed_groups():
    # Rank 0 posts A (to 1) then B (from 1); rank 1 posts B' (to 0) then A' (from 0): each waits forever.
    crossed = [[[("send", (0, 1))], [("recv", (1, 0))]], [[("send", (1, 0))], [("recv", (0, 1))]]]
    assert not completes_under_nccl(crossed)
    matched = [[[("send", (0, 1))], [("recv", (1, 0))]], [[("recv", (0, 1))], [("send", (1, 0))]]]
    assert completes_under_nccl(matched)
    # Two messages on one pair in opposite orders complete, but each meets the wrong kind.
    swapped = [[[("send", (0, 1), 11, (4,), torch.float32)], [("send", (0, 1), 13, (2,), torch.float64)]],
               [[("recv", (0, 1), 13, (2,), torch.float64)], [("recv", (0, 1), 11, (4,), torch.float32)]]]
    assert not messages_match(swapped)


# Ranks with different tiles at the same step: zigzag with a window (found by a review: 4 ranks, window
# (4608, 256) on 8192 tokens per rank, tiles of 1024, here scaled by 1/128), documents, padding.
CONFIGS = [
    (4, 64, "zigzag", False, (36, 2), 256, 8, None),
    (4, 24, "zigzag", True, (5, -1), 90, 3, None),
    (4, 24, "zigzag", False, (5, 5), 96, 4, [0, 2, 10, 59, 96]),
    (5, 20, "zigzag", False, (17, 3), 97, 4, None),
    (8, 16, "zigzag", False, (30, 6), 128, 4, None),
    (3, 20, "striped", False, (11, 2), 55, 3, None),
    (4, 16, "contiguous", True, (20, -1), 60, 3, [0, 7, 31, 60]),
]


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_every_rank_posts_in_one_global_order(cfg, direct, monkeypatch):
    world, local, layout, causal, window, seq_len, chunk, cu = cfg
    logs = record(world, local, layout, causal, window, seq_len, direct, chunk, cu, monkeypatch)
    assert messages_match(logs), f"{cfg} direct={direct}: a message meets one of another kind"
    assert completes_under_nccl(logs), f"{cfg} direct={direct}: ranks would wait on each other under NCCL"


def test_random_configurations_post_in_one_global_order(monkeypatch):
    random_configurations(monkeypatch, seed=0, count=50)


@pytest.mark.slow
def test_more_random_configurations_post_in_one_global_order(monkeypatch):
    random_configurations(monkeypatch, seed=2, count=200)


def random_configurations(monkeypatch, seed: int, count: int) -> None:
    rnd = random.Random(seed)
    for _ in range(count):
        world = rnd.choice([2, 3, 4, 5, 6, 7, 8])
        local, chunk = rnd.choice([8, 12, 16, 20]), rnd.choice([2, 3, 4])
        layout = rnd.choice(["contiguous", "zigzag", "striped", "balanced"])
        causal, direct = rnd.random() < 0.5, rnd.random() < 0.5
        seq_len = world * local - rnd.choice([0, 1, 5, local // 2])
        window = None if rnd.random() < 0.3 else (rnd.randint(0, 2 * local), -1 if causal else rnd.randint(0, local))
        cu = None
        if rnd.random() < 0.3 or layout == "balanced":  # the balanced layout is placed by documents
            cu = sorted({0, seq_len, *rnd.sample(range(1, seq_len), 3)})
        batch = 1 if cu else rnd.choice([1, 2])
        logs = record(world, local, layout, causal, window, seq_len, direct, chunk, cu, monkeypatch, batch)
        what = (world, local, layout, causal, window, seq_len, chunk, cu, direct, batch)
        assert messages_match(logs) and completes_under_nccl(logs), what


def test_bottom_right_queries_post_in_one_global_order(monkeypatch):
    # Fewer queries than keys: the ranks' work per key tile differs more (the last positions' queries
    # see every key), and only K/V travel, whatever the queries' length.
    rnd = random.Random(1)
    for _ in range(25):
        world = rnd.choice([2, 3, 4, 5, 8])
        local, chunk = rnd.choice([8, 12, 16]), rnd.choice([2, 3, 4])
        layout, causal, direct = rnd.choice(["contiguous", "zigzag", "striped"]), rnd.random() < 0.7, rnd.random() < 0.5
        seq_len = world * local - rnd.choice([0, 1, 5])
        q_local = rnd.choice([2, 4, 6])
        q_seq_len = rnd.randint(1, min(world * q_local, seq_len))
        window = None if rnd.random() < 0.5 else (rnd.randint(0, 2 * local), -1 if causal else rnd.randint(0, local))
        logs = record(world, local, layout, causal, window, seq_len, direct, chunk, None, monkeypatch,
                      q_local=q_local, q_seq_len=q_seq_len)
        what = (world, local, layout, causal, window, seq_len, chunk, direct, q_local, q_seq_len)
        assert messages_match(logs) and completes_under_nccl(logs), what
