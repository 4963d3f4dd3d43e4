"""The ring's schedule: which block a rank holds at each step, and how the backward moves blocks.

Note [Ring schedule and offsets]
--------------------------------
At *offset* ``o`` a rank holds the key/value block of rank ``rank - o`` (mod W). Offsets ``0, 1, ..., a``
are the forward ring (after each step a block moves on to ``rank + 1``); ``-1, ..., -b`` the reverse ring,
which starts again from each rank's own block and moves it to ``rank - 1`` (offset ``-i`` reaches the
block of ``rank + i``). Offsets whose block pair is empty on *every* rank are left out, and ``(a, b)`` is
the shortest cover of the rest (``directions``). Every rank runs the same steps, so the exchanges pair up.
Four ranks, causal, contiguous layout (C = causal diagonal block, F = full, . = nothing to compute):

                 step 0    step 1    step 2    step 3       (offsets 0, 1, 2, 3; no reverse run)
      rank 0     K0 C      K3 .      K2 .      K1 .
      rank 1     K1 C      K0 F      K3 .      K2 .
      rank 2     K2 C      K1 F      K0 F      K3 .
      rank 3     K3 C      K2 F      K1 F      K0 F

The zigzag and striped layouts make every row of this table cost the same. A sliding window on the
contiguous layout keeps about ``ceil(left / local_len) + 1`` steps instead of W (and the reverse run only
when the window reaches right). While step ``i`` computes, the exchange that brings step ``i + 1``'s block
is in flight. With fewer queries than keys (``q_seq_len``) only the query positions move (to the end
of the key sequence); offsets are chosen from them the same way, and only K/V travel, as always.

Note [Backward exchange: ring vs direct]
----------------------------------------
The backward replays the schedule; dQ accumulates locally and dK/dV of a visiting block are computed in
key tiles (``Capabilities.backward_tile``). What moves, for a rank r at offset o:

    backward_exchange="ring" (the paper's)          backward_exchange="direct"
    step o:   K/V of r-o arrive from r-1            step o:   K/V tiles of r-o stream in from r-o,
              + its float32 dK/dV so far                      TILES_AHEAD tiles ahead
              compute, add our share                          compute, add our share per tile
              K/V + dK/dV move on to r+1                      each tile's dK/dV goes straight home
    last step of a direction: dK/dV go home to                to r-o (RETURNS_IN_FLIGHT at most
              r-o, tile by tile as each is done               in flight); nothing moves on

On more than 2 ranks "ring" holds about two blocks beyond a single process for one layer (the next block
in flight and the travelling dK/dV); "direct" a few tiles at any world size, with the same bytes per step
but traffic between ranks up to W - 1 apart. A direction one step long (2 ranks, short windows; 3 ranks,
whose schedule is 0, 1, -1) streams its block either way, so there the two are the same exchange.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .kernels.base import Capabilities
from .layouts import query_segments, segments
from .masks import MaskSpec, Task
from .tasks import DEFAULT_CAPS, block_tasks

RETURNS_IN_FLIGHT = 2  # returned dK/dV key tiles a rank may have posted and not yet added
TILES_AHEAD = 2  # key/value tiles of a streamed block asked for ahead of the one being computed


@dataclass(frozen=True)
class RingSchedule:
    steps: tuple[int, ...]  # offsets, the same on every rank
    tasks: dict[int, tuple[Task, ...]]  # offset -> this rank's kernel tasks
    tasks_of_holder: dict[int, tuple[Task, ...]]  # offset -> tasks of the rank holding *our* block (rank + o)
    last: frozenset[int]  # step indices after which the visiting block goes home (its dK/dV returned)
    streamed: frozenset[int]  # step indices whose block streams in tile by tile instead of being prefetched


def directions(needed: list[int], world: int) -> tuple[int, int]:
    """Steps ``(a, b)`` of the forward run ``1..a`` and the reverse run ``-1..-b`` covering the offsets
    ``needed`` (in ``1..world-1``; the reverse run reaches offset ``world - i`` at step ``-i``)."""
    # Fewest steps total. Among equally short schedules, one where no block moves on if there is one: a
    # direction one step long streams its block, while a longer one has dK/dV travelling and the next
    # block in flight (e.g. 3 ranks causal: 0, 1, -1 rather than 0, -1, -2). Otherwise the first
    # (measured: on 4 ranks, one long direction peaks lower than a short one next to a long one, whose
    # returns overlap it).
    def cost(a: int, b: int) -> tuple[int, bool]:
        return a + b, a > 1 or b > 1

    return min(((a, max((world - o for o in needed if o > a), default=0)) for a in range(world)),
               key=lambda ab: cost(*ab))


def last_of_direction(steps: tuple[int, ...], i: int, direct: bool) -> bool:
    """Whether the block of step ``i`` goes home after it (always, if the exchange is direct)."""
    o = steps[i]
    return o != 0 and (direct or i + 1 == len(steps) or steps[i + 1] != o + (1 if o > 0 else -1))


@functools.lru_cache(maxsize=256)
def make_schedule(spec: MaskSpec, layout: str, rank: int, world: int, local_len: int,
              caps: Capabilities = DEFAULT_CAPS, direct: bool = False, q_len: int | None = None,
              q_offset: int = 0) -> RingSchedule:
    """The schedule (Note [Ring schedule and offsets]) and this rank's kernel tasks at every step.

    ``local_len`` is the key block's length; ``q_len`` (default: the same) the query block's, whose row
    0 sits at global position ``q_offset`` (``layouts.query_segments``)."""
    q_len = local_len if q_len is None else q_len
    ksegs = [segments(layout, r, world, local_len, spec.doc_bounds) for r in range(world)]
    qsegs = [query_segments(layout, r, world, q_len, q_offset, spec.doc_bounds) for r in range(world)]

    def busy(r: int, o: int) -> bool:
        return any(spec.any_visible(qs, ks) for qs in qsegs[r] for ks in ksegs[(r - o) % world])

    a, b = directions([o for o in range(1, world) if any(busy(r, o) for r in range(world))], world)
    steps = (0, *range(1, a + 1), *(-i for i in range(1, b + 1)))
    tasks = {o: block_tasks(spec, qsegs[rank], ksegs[(rank - o) % world], caps) for o in steps}
    held = {o: block_tasks(spec, qsegs[(rank + o) % world], ksegs[rank], caps) for o in steps if o}
    last = frozenset(i for i in range(len(steps)) if last_of_direction(steps, i, direct))
    # A block used for one step only (a direction one step long, e.g. 2 ranks; every block if direct) is
    # not prefetched whole: it streams in from its owner key tile by key tile during that step, so at no
    # time does a whole extra block sit beside our gradients.
    streamed = frozenset(i for i in last if direct or abs(steps[i]) == 1)
    return RingSchedule(steps, tasks, held, last, streamed)
