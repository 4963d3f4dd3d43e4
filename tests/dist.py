"""Run a function on N real gloo ranks (loopback, one thread each) and surface every rank's traceback.

A pool of worker processes per world size is started once per test session and reused; a job that
fails or hangs tears its pool down (a failed collective leaves the group in an unknown state) and the
next job starts a fresh one.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

JOB_TIMEOUT = float(os.environ.get("RINGATTN_TEST_TIMEOUT", "180"))
PG_TIMEOUT = datetime.timedelta(seconds=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, jobs, results):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=PG_TIMEOUT)
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the test process
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankFailure(AssertionError):
    pass


class Pool:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(world)]
        port = free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, self.jobs[r], self.results),
                                  daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, timeout: float = JOB_TIMEOUT, **kwargs) -> list:
        for q in self.jobs:
            q.put((fn, args, kwargs))
        out, errors = [None] * self.world, []
        deadline = time.monotonic() + timeout
        pending = self.world
        while pending:
            try:
                rank, ok, val = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close(force=True)
                    why = f"ranks {dead} died" if dead else f"no answer within {timeout}s (hang?)"
                    raise RankFailure(f"{fn.__name__} on {self.world} ranks: {why}; errors so far: {errors}") from None
                continue
            pending -= 1
            if ok:
                out[rank] = val
            else:
                errors.append(f"--- rank {rank} ---\n{val}")
        if errors:
            self.close(force=True)
            raise RankFailure(f"{fn.__name__} failed on {len(errors)} of {self.world} ranks:\n"
                              + "\n".join(errors))
        return out

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self, force: bool = False) -> None:
        if not force:
            for q in self.jobs:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


class Pools:
    """World size -> live pool, restarted after a failure."""

    def __init__(self):
        self.pools: dict[int, Pool] = {}

    def run(self, world: int, fn, *args, **kwargs) -> list:
        p = self.pools.get(world)
        if p is None or not p.alive():
            p = self.pools[world] = Pool(world)
        try:
            return p.run(fn, *args, **kwargs)
        except RankFailure:
            self.pools.pop(world, None)
            raise

    def close(self):
        for p in self.pools.values():
            p.close()
        self.pools.clear()
