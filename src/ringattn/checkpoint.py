"""Training checkpoints with ``torch.distributed.checkpoint``: atomic save, verified and exact resume.

A checkpoint is the folder ``<dir>/step-NNNNNNNN``. Every rank writes into ``<dir>/.tmp-step-NNNNNNNN``;
only when all ranks are done does rank 0 write the manifest ``ringattn.json`` and rename the folder to
its final name (a rename is atomic on POSIX), so a process killed mid-save leaves a ``.tmp-*`` folder
that is ignored and later removed — never a corrupt ``step-*``.

The manifest holds the SHA-256 and size of every file of the checkpoint, the run's configuration and
its number of ranks. ``resume`` takes the newest checkpoint whose files all verify (the ranks share the
hashing); one that is incomplete or damaged is moved to ``<dir>/unusable-step-NNNNNNNN`` with a warning
naming the file, and the next newest is used. A configuration that differs is refused or warned about
by the caller's ``compare`` (``ringattn.train`` says which changes are allowed).

Saved: model parameters and optimizer state (``get_state_dict``: keyed by parameter name), the
training position (step, samples consumed) and each rank's RNG state, so a resumed run continues
bit for bit like one that was never stopped. With several ranks the folder must be on a file
system every rank sees (local ranks always do).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import comm

_NAME = re.compile(r"^step-(\d{8})$")
MANIFEST = "ringattn.json"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, incomplete, or from an incompatible run."""


def _barrier() -> None:
    if comm.group_rank_world()[1] > 1:
        dist.barrier()


def _gather(obj) -> list:
    """Every rank's ``obj``, in rank order (a list of one without a group)."""
    _, world = comm.group_rank_world()
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


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


def _steps(d: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)) and p.is_dir())


def latest(ckpt_dir: str | os.PathLike) -> pathlib.Path | None:
    """The checkpoint with the highest step in ``ckpt_dir`` (complete unless damaged later), or None."""
    found = _steps(pathlib.Path(ckpt_dir))
    return found[-1][1] if found else None


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _hash_share(folder: pathlib.Path, names: list[str]) -> dict[str, list]:
    """``{name: [sha256, bytes]}`` of this rank's share of ``names`` (the ranks split the hashing)."""
    rank, world = comm.group_rank_world()
    return {n: [_sha256(folder / n), (folder / n).stat().st_size] for n in names[rank::world]}


def _seal(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save(ckpt_dir: str | os.PathLike, model: torch.nn.Module, optim: torch.optim.Optimizer, *, step: int,
         samples: int, keep: int = 2, config: dict | None = None) -> pathlib.Path:
    """Write checkpoint ``step`` (collective: every rank calls it); keep the newest ``keep``.

    ``config`` (JSON-able) is stored in the manifest for ``resume``'s ``compare``.
    """
    d = pathlib.Path(ckpt_dir)
    rank, world = comm.group_rank_world()
    tmp, final = d / f".tmp-step-{step:08d}", d / f"step-{step:08d}"
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
        tmp.mkdir()
    _barrier()
    dcp.save(_state(model, optim, step, samples), checkpoint_id=str(tmp))
    _barrier()  # every rank's shard is written (dcp.save also ends with a collective; be explicit)
    names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    files: dict = {}
    for share in _gather(_hash_share(tmp, names)):
        files.update(share)
    if rank == 0:
        body = {"format": FORMAT, "step": step, "samples": samples, "world": world, "config": config,
                "files": files}
        (tmp / MANIFEST).write_text(json.dumps({**body, "manifest_sha256": _seal(body)}, indent=1))
        if final.exists():  # written before a kill that came ahead of our own progress record
            shutil.rmtree(final)
        os.replace(tmp, final)
        # The newest ``keep`` by step, never the one just written (a folder can hold higher steps of
        # an unusable checkpoint left for inspection elsewhere; those are not step-* any more).
        done = [p for _, p in _steps(d) if p != final]
        for old in done[:len(done) - (keep - 1)] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in d.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def set_aside(ckpt_dir: str | os.PathLike) -> pathlib.Path | None:
    """Move an older run's checkpoints out of the way of a fresh run (collective); returns where to.

    They go to ``<dir>/previous-<time>/``, where ``resume`` and pruning do not look: kept, not deleted.
    """
    d = pathlib.Path(ckpt_dir)
    rank, _ = comm.group_rank_world()
    found = _steps(d)
    dest = None
    if found:
        dest = d / time.strftime("previous-%Y%m%d-%H%M%S")
        while dest.exists():
            dest = dest.with_name(dest.name + "-1")
    _barrier()  # every rank has looked before rank 0 moves anything
    if rank == 0 and dest is not None:
        dest.mkdir()
        for _, p in found:
            os.replace(p, dest / p.name)
        print(f"ringattn: a fresh run (--no-resume) in {d}: the checkpoints found there "
              f"({', '.join(p.name for _, p in found)}) were moved to {dest}", file=sys.stderr, flush=True)
    _barrier()
    return dest


def _read_manifest(path: pathlib.Path) -> tuple[dict | None, str | None]:
    """(manifest, None), or (None, what is wrong with it). No manifest at all is (None, None)."""
    m = path / MANIFEST
    if not m.is_file():
        return None, None
    try:
        data = json.loads(m.read_text())
        body = {k: v for k, v in data.items() if k != "manifest_sha256"}
        if data.get("manifest_sha256") != _seal(body):
            return None, f"{MANIFEST} is damaged (its own checksum does not match)"
        return data, None
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        return None, f"{MANIFEST} is damaged ({type(e).__name__}: {comm.first_line(e)})"


def verify(path: str | os.PathLike) -> tuple[dict | None, str | None]:
    """Check checkpoint ``path`` against its manifest (collective: the ranks share the hashing).

    Returns ``(manifest, problem)``: the same on every rank; ``problem`` names the first damaged or
    missing file, or is None. A checkpoint written without a manifest has manifest None, problem None
    if its ``.metadata`` is there (it is loaded unverified).
    """
    path = pathlib.Path(path)
    manifest, problem = _read_manifest(path)
    names = []
    if problem is None and manifest is None and not (path / ".metadata").is_file():
        problem = "incomplete: no .metadata and no manifest"
    if manifest is not None:
        names = sorted(manifest["files"])
        missing = [n for n in names if not (path / n).is_file()]
        wrong = [n for n in names if n not in missing and (path / n).stat().st_size != manifest["files"][n][1]]
        if missing:
            problem = f"{missing[0]} is missing"
        elif wrong:
            problem = f"{wrong[0]} has {(path / wrong[0]).stat().st_size} bytes, not {manifest['files'][wrong[0]][1]}" \
                " (truncated or damaged)"
    mine = problem
    if mine is None and manifest is not None:
        rank, world = comm.group_rank_world()
        for n in names[rank::world]:
            if _sha256(path / n) != manifest["files"][n][0]:
                mine = f"{n} is damaged (its SHA-256 differs from the one recorded when it was written)"
                break
    everyone = _gather((mine, manifest is not None))
    problems = [p for p, _ in everyone if p is not None]
    if not problems and not all(has for _, has in everyone):
        problems = [f"{MANIFEST} is missing on some ranks (is the folder on a file system every rank sees?)"]
    return manifest, (problems[0] if problems else None)


def load(path: str | os.PathLike, model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG from checkpoint ``path``; returns {"step", "samples"}.

    Does not verify checksums (``resume`` does): errors from reading name the checkpoint.
    """
    path = pathlib.Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"not a complete checkpoint (no .metadata): {path}")
    state = _state(model, optim, 0, 0)
    rank, _ = comm.group_rank_world()
    try:
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        # A run on more ranks than wrote the checkpoint: the new ranks keep their fresh RNG (training draws
        # nothing from it; resuming on the same ranks restores every rank's).
        for key in (_rng_key(rank), f"cuda_rng_rank{rank}"):
            if key in state and key not in saved:
                del state[key]
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # noqa: BLE001 - dcp raises EOFError, AssertionError, KeyError, ... for damage
        raise CheckpointError(f"could not read checkpoint {path} ({type(e).__name__}: {comm.first_line(e)}); "
                              "it is damaged or was written by another configuration") from e
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if _rng_key(rank) in state:
        torch.set_rng_state(state[_rng_key(rank)])
    if f"cuda_rng_rank{rank}" in state:
        torch.cuda.set_rng_state(state[f"cuda_rng_rank{rank}"])
    return {"step": int(state["train"]["step"]), "samples": int(state["train"]["samples"])}


def _move_unusable(path: pathlib.Path) -> pathlib.Path:
    dest = path.with_name("unusable-" + path.name)
    n = 1
    while dest.exists():
        dest, n = path.with_name(f"unusable-{path.name}-{n}"), n + 1
    os.replace(path, dest)
    return dest


def resume(ckpt_dir: str | os.PathLike, model: torch.nn.Module, optim: torch.optim.Optimizer, *,
           compare: Callable[[dict | None, int], tuple[list[str], list[str]]] | None = None) -> dict | None:
    """Load the newest usable checkpoint of ``ckpt_dir`` (collective): its position (``step``, ``samples``)
    and ``path``; None if there is none.

    ``compare(saved_config, saved_world)`` returns ``(errors, warnings)``: with errors the checkpoint is
    refused (``CheckpointError`` on every rank), warnings are printed. Incomplete or damaged checkpoints
    are skipped, moved aside and named; if none is left, ``CheckpointError`` lists them.
    """
    d = pathlib.Path(ckpt_dir)
    rank, world = comm.group_rank_world()
    skipped = []
    for _, path in reversed(_steps(d)):
        manifest, problem = verify(path)
        if problem is not None:
            skipped.append(f"{path.name}: {problem}")
            _barrier()  # every rank is done with it before it moves
            if rank == 0:
                dest = _move_unusable(path)
                print(f"ringattn: warning: checkpoint {path} is unusable ({problem}); moved to {dest.name}, "
                      "trying the next newest", file=sys.stderr, flush=True)
            continue
        if manifest is None:
            if rank == 0:
                print(f"ringattn: warning: checkpoint {path} has no {MANIFEST} (written by an older "
                      "ringattn): loaded without checksums or configuration check", file=sys.stderr, flush=True)
        elif compare is not None:
            errors, warnings = compare(manifest.get("config"), int(manifest["world"]))
            if errors:
                raise CheckpointError(f"cannot resume {path}: " + "; ".join(errors))
            if warnings and rank == 0:
                print(f"ringattn: warning: resuming {path} with " + "; ".join(warnings), file=sys.stderr,
                      flush=True)
        pos = dict(load(path, model, optim), path=path)
        if skipped and rank == 0:
            print(f"ringattn: resumed from {path.name} (step {pos['step']}) instead of the newer "
                  f"unusable {', '.join(s.split(':')[0] for s in skipped)}", file=sys.stderr, flush=True)
        return pos
    if skipped:
        raise CheckpointError(f"no usable checkpoint in {d}: " + "; ".join(skipped) + " (moved to unusable-*; "
                              "pass --no-resume to start afresh)")
    return None
