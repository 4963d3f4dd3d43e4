"""Transport: point-to-point exchange on a ring, and the small collectives the rest of ringattn needs.

All transfers are posted together with ``batch_isend_irecv`` (gloo and NCCL alike) and waited on
later, so the next block is in flight while the current one is computed. Tags keep key/value blocks,
travelling gradients and returned gradients apart on backends that match by tag (gloo). NCCL matches
by order instead and runs each rank's exchanges one after another, so the ring posts them in one global
order that every rank follows, skipping only exchanges it has no part in (``tests/test_exchange_order.py``
checks that no two ranks can wait on each other).
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch
import torch.distributed as dist

from . import profiling
from .kernels.base import heads_major, new_buffer

TAG_KV, TAG_GRAD, TAG_RETURN = 11, 12, 13


def group_rank_world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class ConcurrentCallError(RuntimeError):
    """A ringattn call on a process group another thread of this process is using."""


# Process group -> (thread, depth) of the ringattn call in it. Two calls on one group at once post
# collectives and exchanges whose order the peers cannot match (gloo pairs them by tag and order), so
# they hang until the timeout and then look like a dead peer: the second is refused instead.
_IN_USE: dict = {}
_IN_USE_LOCK = threading.Lock()


@contextlib.contextmanager
def exclusive(groups, what: str = "ringattn call"):
    """Hold ``groups`` (a group, None = the default one, or several) for one thread during a call; a call
    from another thread while one is inside raises ``ConcurrentCallError`` at once, before it
    communicates (and before it counts as a call: its peers are not put out of step). The same thread
    may enter again (a checkpointed forward recomputed inside a backward)."""
    groups = tuple(groups) if isinstance(groups, (tuple, list)) else (groups,)
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    pgs = list(dict.fromkeys(g if g is not None else dist.group.WORLD for g in groups))
    me = threading.current_thread()
    with _IN_USE_LOCK:
        for pg in pgs:
            owner = _IN_USE.get(pg)
            if owner is not None and owner[0] is not me:
                raise ConcurrentCallError(
                    f"ringattn: a {what} on a process group that thread {owner[0].name!r} of this process is "
                    f"using (this is thread {me.name!r}); ringattn calls on one group must come one at a "
                    "time: call from one thread, or give each thread its own group (dist.new_group)")
        for pg in pgs:
            _IN_USE[pg] = (me, _IN_USE.get(pg, (me, 0))[1] + 1)
    try:
        yield
    finally:
        with _IN_USE_LOCK:
            for pg in pgs:
                owner, depth = _IN_USE[pg]
                if depth > 1:
                    _IN_USE[pg] = (owner, depth - 1)
                else:
                    del _IN_USE[pg]


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (gloo/NCCL errors run to many lines), or its repr."""
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)


class PeerError(RuntimeError):
    """A point-to-point exchange could not complete: a peer died, hung past the timeout, or mismatched."""


class CallAbandoned(RuntimeError):
    """Another rank failed during a call; every rank abandoned it together (the group stays usable)."""


class Outcome:
    """This rank's first compute failure during a call, kept while the exchanges go on, and settled by
    every rank together at the end.

    Note [A failure after the agreement]: a rank whose kernel (or anything it runs between exchanges)
    raises must not leave its peers waiting on exchanges it will never post: gloo would hold them for the
    group's timeout, and the half-posted exchanges would break the group's next call. So the failing rank
    stops computing but keeps exchanging, as planned; at the end one tiny all-reduce tells every rank
    whether anyone failed, and then all raise (the failing rank its own exception, the others
    ``CallAbandoned`` naming it). Every exchange completed, so the group is usable for the next call.
    On gloo only: the all-reduce is one more of the agreement's size (about a hundred microseconds); on
    NCCL it would cost a host synchronisation per call, so there a failing rank raises at once and its
    peers wait for the watchdog's timeout. Only the kernel calls are guarded: a failure elsewhere between
    exchanges (allocating an accumulator, a KeyboardInterrupt) and of an exchange itself (a dead peer)
    still leave the peers to the timeout.
    """

    def __init__(self, groups, what: str, device: torch.device):
        """``groups``: a group (None = the default one), or several whose union reaches every rank that
        takes part (the hybrid strategy's Ulysses and ring groups, as in ``validate.agree``)."""
        groups = tuple(groups) if isinstance(groups, (tuple, list)) else (groups,)
        self.groups = tuple(g for g in groups if group_rank_world(g)[1] > 1)
        self.what, self.error = what, None
        self.settles = bool(self.groups) and device.type == "cpu" and dist.get_backend(self.groups[0]) != "nccl"

    @property
    def ok(self) -> bool:
        return self.error is None

    def __enter__(self) -> Outcome:
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if kind is None or not self.settles or not issubclass(kind, Exception) or isinstance(error, PeerError):
            return False
        if self.error is None:
            self.error = error
        return True  # the exchanges go on; ``settle`` raises it

    def settle(self) -> None:
        """Raise on every rank if any rank failed (call on every rank, after the last exchange)."""
        if not self.settles:
            return
        flag = torch.tensor([0 if self.error is None else 1], dtype=torch.int64)
        try:
            for g in self.groups:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=g)
        except RuntimeError as e:
            raise PeerError(f"ringattn: the ranks could not settle the {self.what} (a peer rank probably died "
                            f"or timed out): {first_line(e)}") from e
        if not int(flag):
            return
        if len(self.groups) > 1:  # a mesh: no one group to gather the notes over
            if self.error is not None:
                raise self.error
            raise CallAbandoned(f"ringattn: the {self.what} failed on another rank of the mesh, so every rank "
                                "abandoned it; the process groups are still usable")
        note = None if self.error is None else f"{type(self.error).__name__}: {first_line(self.error)}"
        notes: list = [None] * dist.get_world_size(self.groups[0])
        dist.all_gather_object(notes, note, group=self.groups[0])
        if self.error is not None:
            raise self.error
        failed = "; ".join(f"rank {r}: {n}" for r, n in enumerate(notes) if n)
        raise CallAbandoned(f"ringattn: the {self.what} failed on another rank, so every rank abandoned it "
                            f"({failed}); the process group is still usable")


class Pending:
    def __init__(self, works, tensors, what: str):
        self.works, self.tensors, self.what = works, tensors, what

    def done(self) -> bool:
        """Whether every transfer has finished (then ``wait`` returns at once); never blocks."""
        return all(w.is_completed() for w in self.works)

    def wait(self):
        t0 = time.perf_counter()
        try:
            for w in self.works:
                w.wait()
        except RuntimeError as e:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
            raise PeerError(f"ringattn: ring exchange failed ({self.what}); a peer rank probably died or "
                            f"timed out: {first_line(e)}") from e
        profiling.count_wait(time.perf_counter() - t0)
        return self.tensors


class Ring:
    """Exchanges with ranks at given offsets (neighbours, or owners of blocks) in one process group (ranks
    are the group's own)."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.world = group_rank_world(group)

    def _global(self, r: int) -> int:
        r %= self.world
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def exchange(self, send: tuple[torch.Tensor, ...], to: int, recv_like: tuple[torch.Tensor, ...],
                 frm: int, tag: int, dtype: torch.dtype | None = None, by_head: bool = False) -> Pending:
        """Send ``send`` to rank ``rank + to`` and receive as many tensors from ``rank + frm``.

        ``by_head``: 4-D tensors go as one message per (batch, head) row block, so that a slice along the
        sequence of a heads-major block is sent from where it lies, without a copy. Both ends must pass
        the same value (the ring's tile exchanges do, the whole-block ones do not).
        """
        # gloo and NCCL send and receive contiguous buffers only. A 4-D (batch, n, heads, d) block goes on
        # the wire in heads-major order, the storage the ring keeps it in anyway (no copy), and comes back
        # in it; other tensors go as contiguous ones. Every rank applies the same rule, so both ends agree.
        # NCCL may split a group of many messages into launches differently on the two ends and hang
        # (pytorch/pytorch#174942), and a copy of a tile costs little on a GPU: split by head on CPU only.
        # Every rank's tensors are on the same kind of device (agreed before any exchange).
        by_head = by_head and any(t.device.type == "cpu" for t in (*send, *recv_like))
        to_peer, from_peer = self._global(self.rank + to), self._global(self.rank + frm)
        ops = [dist.P2POp(dist.isend, w, to_peer, self.group, tag) for t in send for w in _wire(t, by_head)]
        recv = tuple(new_buffer(t.shape, dtype or t.dtype, t.device) for t in recv_like)
        ops += [dist.P2POp(dist.irecv, w, from_peer, self.group, tag) for t in recv for w in _wire(t, by_head)]
        what = f"rank {self.rank} sending to rank {(self.rank + to) % self.world}, receiving from rank " \
               f"{(self.rank + frm) % self.world}"
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as e:
            raise PeerError(f"ringattn: could not post the ring exchange ({what}): {e}") from e
        profiling.count_bytes(sum(t.numel() * t.element_size() for t in send))
        return Pending(works, recv, what)


def _wire(t: torch.Tensor, by_head: bool = False) -> list[torch.Tensor]:
    """The contiguous buffers that carry ``t``: heads-major for a 4-D tensor (one per (batch, head) if
    ``by_head``), row-major otherwise. Views of ``t`` where its storage allows (always for a received
    buffer, which ``new_buffer`` makes heads-major)."""
    if t.dim() != 4:
        return [t.contiguous()]
    rows = t.transpose(1, 2)  # (batch, heads, n, d)
    # One contiguous buffer needs the whole tensor heads-major; one per (batch, head) only each head's rows.
    rows_contiguous = rows.stride(3) == 1 and (rows.shape[2] <= 1 or rows.stride(2) == rows.shape[3])
    if not by_head or not rows_contiguous:
        rows = heads_major(t).transpose(1, 2)
    return [rows] if not by_head else [r for per_batch in rows.unbind(0) for r in per_batch.unbind(0)]


def gather_op():
    """``all_gather_single`` where torch has it, else the older ``all_gather_into_tensor``."""
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def reduce_scatter_op():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into W parts along ``scatter_dim``, send part j to rank j, and concatenate the parts
    received along ``gather_dim`` in rank order."""
    _, world = group_rank_world(group)
    if world == 1:
        return x
    send = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    profiling.count_bytes(send.numel() * send.element_size() * (world - 1) // world)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all``: the gradient travels back by the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.args = (group, scatter_dim, gather_dim)
        return all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        group, scatter_dim, gather_dim = ctx.args
        return all_to_all(grad.contiguous(), group, gather_dim, scatter_dim), None, None, None
