"""Training checkpoints with ``torch.distributed.checkpoint``: atomic save, exact resume.

A checkpoint is the folder ``<dir>/step-NNNNNNNN``. Every rank writes into ``<dir>/.tmp-step-NNNNNNNN``;
only when all ranks are done does rank 0 rename it to its final name (a rename is atomic on POSIX), so
a process killed mid-save leaves a ``.tmp-*`` folder that is ignored and later removed — never a
corrupt ``step-*``. Resume picks the highest ``step-*``.

Saved: model parameters and optimizer state (``get_state_dict``: keyed by parameter name), the
training position (step, samples consumed) and each rank's RNG state, so a resumed run continues
bit for bit like one that was never stopped. With several ranks the folder must be on a file
system every rank sees (local ranks always do).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import comm

_NAME = re.compile(r"^step-(\d{8})$")


def _barrier() -> None:
    if comm.group_rank_world()[1] > 1:
        dist.barrier()


def _rng_key(rank: int) -> str:
    return f"rng_rank{rank}"


def _state(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int, samples: int) -> dict:
    rank, _ = comm.group_rank_world()
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd, "train": {"step": step, "samples": samples},
             _rng_key(rank): torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state[f"cuda_rng_rank{rank}"] = torch.cuda.get_rng_state()
    return state


def latest(ckpt_dir: str | os.PathLike) -> pathlib.Path | None:
    """The complete checkpoint with the highest step in ``ckpt_dir``, or None."""
    d = pathlib.Path(ckpt_dir)
    if not d.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)) and p.is_dir())
    return found[-1][1] if found else None


def save(ckpt_dir: str | os.PathLike, model: torch.nn.Module, optim: torch.optim.Optimizer, *, step: int,
         samples: int, keep: int = 2) -> pathlib.Path:
    """Write checkpoint ``step`` (collective: every rank calls it); keep the newest ``keep``."""
    d = pathlib.Path(ckpt_dir)
    rank, _ = comm.group_rank_world()
    tmp, final = d / f".tmp-step-{step:08d}", d / f"step-{step:08d}"
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
        tmp.mkdir()
    _barrier()
    dcp.save(_state(model, optim, step, samples), checkpoint_id=str(tmp))
    _barrier()  # every rank's shard is written (dcp.save also ends with a collective; be explicit)
    if rank == 0:
        if final.exists():  # written before a kill that came ahead of our own progress record
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted(p for p in d.iterdir() if _NAME.match(p.name))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in d.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load(path: str | os.PathLike, model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG from checkpoint ``path``; returns {"step", "samples"}."""
    path = pathlib.Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"not a complete checkpoint (no .metadata): {path}")
    state = _state(model, optim, 0, 0)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank, _ = comm.group_rank_world()
    torch.set_rng_state(state[_rng_key(rank)])
    if f"cuda_rng_rank{rank}" in state:
        torch.cuda.set_rng_state(state[f"cuda_rng_rank{rank}"])
    return {"step": int(state["train"]["step"]), "samples": int(state["train"]["samples"])}
