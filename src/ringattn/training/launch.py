"""Start N local processes in a gloo group (one thread each) — the ``--nproc`` of every CLI command.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) nothing is spawned: the current process joins the
group torchrun describes, with NCCL when CUDA is available. Errors on any rank end every rank and are
re-raised in the parent with the failing rank's traceback; a rank killed by a signal is named with it.
The ranks never outlive the parent: SIGINT or SIGTERM to it stops them (SIGKILL after a grace period),
and on Linux a rank gets SIGKILL as soon as the parent dies in any way, SIGKILL included.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .._aliases import short_path

STOP_GRACE_S = 10.0  # after SIGTERM, how long the ranks have before SIGKILL


def pg_timeout() -> datetime.timedelta:
    """The process-group timeout: ``RINGATTN_PG_TIMEOUT`` seconds (default 300), checked."""
    raw = os.environ.get("RINGATTN_PG_TIMEOUT", "300")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"RINGATTN_PG_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


@short_path
class RankError(RuntimeError):
    """A rank failed; ``usage``: every rank that failed with an error failed on bad input (``is_usage_error``)."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


def is_usage_error(e: BaseException) -> bool:
    """Whether ``e`` says the input was wrong (a bad value, a file given that is missing), not a failure."""
    return isinstance(e, (ValueError, TypeError, FileNotFoundError, NotADirectoryError))


class Stopped(BaseException):
    """The launcher got SIGTERM or SIGHUP (a BaseException, like KeyboardInterrupt for SIGINT)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _die_with_parent(parent: int) -> None:
    """Make this process end when ``parent`` does, however it ends (SIGKILL included)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):  # not Linux: watch for the parent to go
        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="ringattn-parent-watch").start()
    if os.getppid() != parent:  # it died before the request above
        os._exit(1)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


INIT_TIMEOUT_S = 120.0  # joining the group: a rank that does not come by then ends the attempt


def _env_store(world: int, timeout: datetime.timedelta):
    """The rendezvous store of ``MASTER_ADDR:MASTER_PORT``, under a prefix of its own per torchrun attempt.

    torchrun's agent keeps one store across restarts, and ``init_process_group`` would use the same keys
    in every attempt: a restarted rank then reads its dead peers' gloo addresses and waits in
    ``connectFullMesh`` for connections that never come (or fails there).
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    rank = int(os.environ["RANK"])
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=not agent and rank == 0, timeout=timeout, multi_tenant=True)
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"ringattn/{run}/attempt-{attempt}", base)


def init_from_env(threads: int | None = 1) -> tuple[int, int]:
    """Join the group torchrun set up (NCCL on CUDA, else gloo); returns (rank, world).

    Joining is bounded by ``INIT_TIMEOUT_S`` (then the error ends this attempt and torchrun restarts
    it); collectives then get ``RINGATTN_PG_TIMEOUT``.
    """
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = pg_timeout()
        set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        join = min(timeout, datetime.timedelta(seconds=INIT_TIMEOUT_S)) if set_timeout else timeout
        world = int(os.environ["WORLD_SIZE"])
        try:
            dist.init_process_group(backend, store=_env_store(world, join), rank=int(os.environ["RANK"]),
                                    world_size=world, timeout=join)
        except RuntimeError as e:
            raise RuntimeError(f"ringattn: could not join the torchrun group within {join.total_seconds():.0f}"
                               f" s (rank {os.environ['RANK']} of {world}): {e}") from e
        if set_timeout and join != timeout:
            set_timeout(timeout)
    if threads:
        torch.set_num_threads(threads)
    quiet_peers(dist.get_rank())
    return dist.get_rank(), dist.get_world_size()


def quiet_peers(rank: int) -> None:
    """Deprecation and future warnings from rank 0 only: every rank runs the same code, so the others
    would print the same warning once each."""
    if rank != 0:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, threads: int, errq, parent: int) -> None:
    _die_with_parent(parent)
    quiet_peers(rank)
    torch.set_num_threads(threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=pg_timeout())
        fn(*args)
    except BaseException as e:
        errq.put((rank, traceback.format_exc(), is_usage_error(e)))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(procs, grace: float) -> set[int]:
    """SIGTERM to every live rank, SIGKILL to those still alive after ``grace`` s; returns the ranks hit."""
    hit = {r for r, p in enumerate(procs) if p.is_alive()}
    for r in hit:
        procs[r].terminate()
    deadline = time.monotonic() + grace
    for r in hit:
        procs[r].join(timeout=max(0.0, deadline - time.monotonic()))
    for r in hit:
        if procs[r].is_alive():
            procs[r].kill()
            procs[r].join()
    return hit


def spawn(fn: Callable, nproc: int, *args, threads: int = 1) -> None:
    """Run ``fn(*args)`` on ``nproc`` local gloo ranks; ``fn`` must be importable (module level)."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    pg_timeout()  # a bad RINGATTN_PG_TIMEOUT is one error here, not one per rank
    ctx = mp.get_context("spawn")
    errq = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, nproc, port, fn, args, threads, errq, os.getpid()))
             for r in range(nproc)]

    def on_signal(signum, frame):
        raise Stopped(signum)

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)} if main else {}
    try:
        for p in procs:
            p.start()
        stopped = _wait(procs)
    except BaseException as e:  # SIGINT (KeyboardInterrupt), SIGTERM / SIGHUP (Stopped), anything else
        _stop([p for p in procs if p.pid is not None], STOP_GRACE_S)
        if isinstance(e, Stopped):
            print(f"ringattn: {e}; every rank stopped", file=sys.stderr, flush=True)
            raise SystemExit(128 + e.signum) from None
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    errors, usage = {}, {}
    while not errq.empty():
        r, tb, bad_input = errq.get()
        errors.setdefault(r, tb)
        usage.setdefault(r, bad_input)
    codes = [p.exitcode for p in procs]
    if errors or any(c != 0 for c in codes):
        raise _rank_error(codes, errors, usage, stopped)


def _wait(procs) -> set:
    """Until every rank has ended; at the first that fails the others get 2 s and are then stopped. Returns
    the ranks this stopped."""
    failed = None
    while any(p.is_alive() for p in procs):
        for p in procs:
            p.join(timeout=0.2)
            if p.exitcode not in (None, 0) and failed is None:
                failed = p
        if failed is not None:
            break
    stopped = set()
    if failed is not None:
        for p in procs:
            p.join(timeout=2)
        stopped = _stop(procs, 0.0)
    for p in procs:
        p.join()
    return stopped


def _rank_error(codes: list, errors: dict, usage: dict, stopped: set) -> RankError:
    """What each rank did, the cause first: a rank killed by a signal (not by the launcher) or one that exited
    without a traceback explains its peers' "a peer rank probably died"."""
    causes = [f"rank {r} was killed by {_signal_name(-c)}" for r, c in enumerate(codes)
              if c is not None and c < 0 and r not in stopped]
    causes += [f"rank {r} exited with code {c} without an error" for r, c in enumerate(codes)
               if c not in (None, 0) and c > 0 and r not in errors]
    by_error: dict[str, list[int]] = {}  # the same error on several ranks is told once
    for r, tb in sorted(errors.items()):
        by_error.setdefault(tb.strip().splitlines()[-1], []).append(r)
    firsts = [f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {line}" for line, rs in by_error.items()]
    detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())) or f"exit codes {codes}"
    return RankError("; ".join(causes + firsts) + "\n" + detail, usage=not causes and all(usage.values()))


def _run_and_keep(fn: Callable, path: str, *args) -> None:
    result = fn(*args)
    if dist.get_rank() == 0:
        with open(path, "wb") as f:
            pickle.dump(result, f)


def spawn_collect(fn: Callable, nproc: int, *args, threads: int = 1):
    """``spawn(fn, nproc, *args)`` and return what ``fn`` returned on rank 0 (it must pickle).

    Ranks gather what they need into rank 0's return value themselves (e.g. ``all_gather_object``);
    the other ranks' return values are dropped.
    """
    with tempfile.TemporaryDirectory(prefix="ringattn-") as tmp:
        path = os.path.join(tmp, "rank0.pkl")
        spawn(_run_and_keep, nproc, fn, path, *args, threads=threads)
        with open(path, "rb") as f:
            return pickle.load(f)
