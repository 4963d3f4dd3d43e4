"""The ring's schedule and the block planner: every rank plans the same steps, every visible block pair
is visited, and a block's kernel tasks tile exactly the pairs the mask keeps."""

from __future__ import annotations

import random

import torch

from ringattn.kernels import Capabilities
from ringattn.layouts import segments
from ringattn.masks import Kind, MaskSpec, Segment
from ringattn.schedule import make_schedule
from ringattn.tasks import block_tasks


def test_plan_is_the_same_on_every_rank_and_covers_every_block():
    rnd = random.Random(0)
    for _ in range(150):
        world = rnd.randint(2, 6)
        layout = rnd.choice(["contiguous", "zigzag", "striped"])
        c = rnd.choice([2, 4, 6])
        n = world * c
        seq_len = rnd.randint(1, n)
        window = rnd.choice([None, (rnd.randint(-1, n), rnd.randint(-1, n))])
        window = None if window == (-1, -1) else window
        cuts = sorted(rnd.sample(range(1, seq_len), min(seq_len - 1, rnd.randint(0, 3)))) if seq_len > 1 else []
        docs = rnd.choice([None, (0, *cuts, seq_len)])
        spec = MaskSpec(seq_len, rnd.random() < 0.5, window, docs)
        plans = [make_schedule(spec, layout, r, world, c) for r in range(world)]
        assert len({p.steps for p in plans}) == 1, (spec, layout, world)
        steps = plans[0].steps
        assert len(set(o % world for o in steps)) == len(steps), "an offset is visited twice"
        segs = [segments(layout, r, world, c) for r in range(world)]
        for r in range(world):
            qpos = torch.cat([s.positions() for s in segs[r]])
            for o in range(world):
                kpos = torch.cat([s.positions() for s in segs[(r - o) % world]])
                if spec.visible(qpos[:, None], kpos[None, :]).any():
                    assert any(s % world == o for s in steps), (spec, layout, world, r, o)


def test_random_plan_blocks_reproduce_the_mask():
    """Random segments (any strides, padding, docs, windows): tasks tile exactly the visible pairs."""
    rnd = random.Random(1)
    for _ in range(200):
        seq_len = rnd.randint(1, 60)
        window = rnd.choice([None, (rnd.randint(-1, 20), rnd.randint(-1, 20))])
        cuts = sorted(rnd.sample(range(1, seq_len), min(seq_len - 1, 3))) if seq_len > 3 else []
        spec = MaskSpec(seq_len, rnd.random() < 0.5, None if window == (-1, -1) else window,
                        rnd.choice([None, (0, *cuts, seq_len)]))

        def segs():
            out = []
            for _ in range(rnd.randint(1, 2)):
                out.append(Segment(rnd.randint(0, 50), rnd.randint(0, 17), rnd.choice([1, 1, 2, 3])))
            return tuple(out)

        qsegs, ksegs = segs(), segs()
        qpos = torch.cat([s.positions() for s in qsegs])
        kpos = torch.cat([s.positions() for s in ksegs])
        want = spec.visible(qpos[:, None], kpos[None, :])
        got = torch.zeros_like(want)
        for t in block_tasks(spec, qsegs, ksegs, Capabilities(max_dense_tile=rnd.choice([3, 5, 512]))):
            keep = want[t.q0:t.q1, t.k0:t.k1]
            if t.kind is Kind.FULL:
                assert keep.all()
                tile = torch.ones_like(keep)
            elif t.kind is Kind.CAUSAL:
                i = torch.arange(t.q1 - t.q0)[:, None]
                tile = torch.arange(t.k1 - t.k0)[None, :] <= i
                assert torch.equal(keep, tile), (spec, qsegs, ksegs, t)
            else:
                tile = spec.visible(t.qseg.positions()[:, None], t.kseg.positions()[None, :])
                assert torch.equal(tile, keep)
            assert not (got[t.q0:t.q1, t.k0:t.k1] & tile).any(), "tasks overlap"
            got[t.q0:t.q1, t.k0:t.k1] |= tile
        assert torch.equal(got, want), (spec, qsegs, ksegs)
