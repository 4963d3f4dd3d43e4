"""Start N local processes in a gloo group (one thread each) — the ``--nproc`` of every CLI command.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) nothing is spawned: the current process joins the
group torchrun describes, with NCCL when CUDA is available. Errors on any rank end every rank and are
re-raised in the parent with the failing rank's traceback.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("RINGATTN_PG_TIMEOUT", "300")))


class RankError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init_from_env(threads: int | None = 1) -> tuple[int, int]:
    """Join the group torchrun set up (NCCL on CUDA, else gloo); returns (rank, world)."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=DEFAULT_TIMEOUT)
    if threads:
        torch.set_num_threads(threads)
    return dist.get_rank(), dist.get_world_size()


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, threads: int, errq) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=DEFAULT_TIMEOUT)
        fn(*args)
    except BaseException:
        errq.put((rank, traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, nproc: int, *args, threads: int = 1) -> None:
    """Run ``fn(*args)`` on ``nproc`` local gloo ranks; ``fn`` must be importable (module level)."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    ctx = mp.get_context("spawn")
    errq = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, nproc, port, fn, args, threads, errq)) for r in range(nproc)]
    for p in procs:
        p.start()
    failed = None
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=0.2)
                if p.exitcode not in (None, 0) and failed is None:
                    failed = p
            if failed is not None:
                break
    finally:
        if failed is not None:
            for p in procs:
                p.join(timeout=2)
            for p in procs:
                if p.is_alive():
                    p.terminate()
        for p in procs:
            p.join()
    errors = []
    while not errq.empty():
        errors.append(errq.get())
    if errors or any(p.exitcode != 0 for p in procs):
        errors.sort()
        detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in errors) or \
            f"exit codes {[p.exitcode for p in procs]}"
        first = errors[0][1].strip().splitlines()[-1] if errors else "a rank exited abnormally"
        raise RankError(f"rank {errors[0][0] if errors else '?'}: {first}\n{detail}")


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
