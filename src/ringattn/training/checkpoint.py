"""Training checkpoints with ``torch.distributed.checkpoint``: atomic save, verified and exact resume.

A checkpoint is the folder ``<dir>/step-NNNNNNNN``. Every rank writes into ``<dir>/.tmp-step-NNNNNNNN``;
only when all ranks are done does rank 0 write the manifest ``ringattn.json`` and rename the folder to
its final name (a rename is atomic on POSIX), so a process killed mid-save leaves a ``.tmp-*`` folder
that is ignored and later removed — never a corrupt ``step-*``.

The manifest holds the SHA-256 and size of every file of the checkpoint, the run's configuration and
its number of ranks. ``resume`` takes the newest checkpoint whose files all verify (the ranks share the
hashing); one that is incomplete or damaged is moved to ``<dir>/unusable-step-NNNNNNNN`` with a warning
naming the file, and the next newest is used. A configuration that differs is refused or warned about
by the caller's ``compare`` (``ringattn.app.train`` says which changes are allowed).

Saved: model parameters and optimizer state (``get_state_dict``: keyed by parameter name), the
training position (step, samples consumed) and each rank's RNG state, so a resumed run continues
bit for bit like one that was never stopped. With several ranks the folder must be on a file
system every rank sees (local ranks always do).

One run writes a folder at a time: ``DirLock`` (``ringattn train`` takes it at start) holds an
``flock`` on ``<dir>/.ringattn.lock`` and records who holds it there (pid, host, start time, command),
so a second run is refused with the first one named. The kernel drops the lock when its holder dies
(``kill -9`` included): a later run takes it over with a note, never a false refusal.

A save that fails (a full disk, a file system error) names the folder and the cause (``errno``'s, or the
space left where torch's writer reports only "unexpected pos") and removes its partial ``.tmp-*``
folder; the complete checkpoints are not touched. A load that stops because a peer rank died is told
apart from a damaged checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .. import comm
from .._aliases import short_path

_NAME = re.compile(r"^step-(\d{8})$")
MANIFEST = "ringattn.json"
FORMAT = 1


@short_path
class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, incomplete, or from an incompatible run."""


@short_path
class ConfigMismatch(CheckpointError, ValueError):
    """The run's configuration differs from the checkpoint's where it must not: bad input (a ``ValueError``)."""


@short_path
class FolderInUse(CheckpointError):
    """Another live run holds the checkpoint folder's lock."""


@short_path
class LoadInterrupted(CheckpointError):
    """Loading stopped because a peer rank died or the group failed; the checkpoint itself is not at fault."""


LOCK = ".ringattn.lock"


def check_dir(ckpt_dir: str | os.PathLike) -> pathlib.Path:
    """``ckpt_dir`` as a folder this process can write into (created if missing), or a ``ValueError`` saying
    why not: found at start rather than at the first save, after the first steps were computed."""
    d = pathlib.Path(ckpt_dir)
    if d.exists() and not d.is_dir():
        raise ValueError(f"--ckpt-dir {d} is a file, not a folder: give a folder for the checkpoints")
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--ckpt-dir {d} cannot be written: {e.strerror or e} "
                         f"({errno.errorcode.get(e.errno, e.errno)}); give a folder this user can write") from None
    return d


def _describe_owner(raw: bytes) -> str:
    try:
        o = json.loads(raw)
        return f"pid {o['pid']} on host {o['host']}, started {o['started']}: {o['command']}"
    except (ValueError, KeyError, TypeError):
        return "no record of who"


class DirLock:
    """One writer per checkpoint folder: an exclusive ``flock`` on ``<dir>/.ringattn.lock`` for as long as
    the run lasts, with the holder's pid, host, start time and command written in the file.

    ``acquire`` raises ``FolderInUse`` naming the holder while another process holds it. The kernel
    releases an ``flock`` when its holder dies however it dies, so a record left behind by a killed run
    belongs to no one: it is taken over with a note (``took_over``). Releasing empties the record.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, command: str | None = None):
        self.dir = pathlib.Path(ckpt_dir)
        self.path = self.dir / LOCK
        self.command = command or " ".join(["ringattn", *sys.argv[1:]])
        self.fd: int | None = None
        self.took_over: str | None = None  # the dead holder's record, when there was one

    def acquire(self) -> DirLock:
        check_dir(self.dir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            held = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
            owner = _describe_owner(os.pread(fd, 65536, 0)) if held else ""
            os.close(fd)
            if not held:
                raise CheckpointError(f"could not lock checkpoint folder {self.dir} ({e.strerror or e})") from e
            raise FolderInUse(f"checkpoint folder {self.dir} is in use by another run ({owner}); two runs writing "
                              "one folder would remove each other's checkpoints: wait for that run to end (or stop "
                              "it), or give this run another --ckpt-dir") from None
        previous = os.pread(fd, 65536, 0)
        if previous.strip():
            self.took_over = _describe_owner(previous)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # an empty record: nobody to take over from
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> DirLock:
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _failures(e: BaseException) -> list[BaseException]:
    """``e``, its causes and contexts, and the per-rank exceptions dcp wraps in a ``CheckpointException``."""
    out, todo = [], [e]
    while todo:
        x = todo.pop()
        if x is None or any(x is y for y in out):
            continue
        out.append(x)
        todo += [x.__cause__, x.__context__]
        if isinstance(x, CheckpointException):
            todo += [exc for exc, _ in x.failures.values() if isinstance(exc, BaseException)]
    return out


def _free_bytes(path: pathlib.Path) -> int | None:
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
            return st.f_bavail * st.f_frsize
        except OSError:
            continue
    return None


# torch's zip writer reports a failed write with no errno: "[enforce fail at inline_container.cc:...]
# unexpected pos", "PytorchStreamWriter failed writing file".
_WRITER_FAILED = ("unexpected pos", "failed writing file", "file write failed")
LOW_SPACE = 64 << 20  # bytes free under which a writer failure is put down to a full disk


def _human(n: float) -> str:
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{n:.0f} bytes"


def write_failure(e: BaseException, where: pathlib.Path) -> str:
    """What went wrong writing under ``where``, in words: the errno when there is one, else the space left."""
    found = _failures(e)
    os_error = next((x for x in found if isinstance(x, OSError) and x.errno), None)
    free = _free_bytes(where)
    space = f"{_human(free)} free there" if free is not None else "free space unknown"
    if os_error is not None:
        name = errno.errorcode.get(os_error.errno, str(os_error.errno))
        cause = f"{os.strerror(os_error.errno)} ({name}"
        cause += f"; {space})" if os_error.errno in (errno.ENOSPC, errno.EDQUOT) else ")"
        if os_error.filename:
            cause += f" on {os_error.filename}"
        return cause
    text = " ".join(str(x) for x in found if not isinstance(x, CheckpointException))
    if any(w in text for w in _WRITER_FAILED):
        if free is not None and free < LOW_SPACE:
            return f"no space left on device ({space}; torch's writer said: {comm.first_line(found[-1])})"
        return f"a write failed ({space}; torch's writer said: {comm.first_line(found[-1])})"
    return f"{type(found[-1]).__name__}: {comm.first_line(found[-1])}"


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


@contextlib.contextmanager
def _one_process_is_meant():
    """dcp warns on every save and load without a process group that it assumes one process: as meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized")
        yield


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
    try:
        if rank == 0:
            d.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
            tmp.mkdir()
        _barrier()
        with _one_process_is_meant():
            dcp.save(_state(model, optim, step, samples), checkpoint_id=str(tmp))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - dcp wraps the writer's error (a BaseException)
        if why := peer_failure(e):
            raise comm.PeerError(f"interrupted while saving checkpoint step {step} in {d}: {why}") from e
        if isinstance(e, CheckpointException) or any(
                isinstance(x, OSError) or any(w in str(x) for w in _WRITER_FAILED) for x in _failures(e)):
            raise _save_failed(e, d, tmp, step) from e
        raise
    _barrier()  # every rank's shard is written (dcp.save also ends with a collective; be explicit)
    names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    files: dict = {}
    for share in _gather(_hash_share(tmp, names)):
        files.update(share)
    if rank == 0:
        body = {"format": FORMAT, "step": step, "samples": samples, "world": world, "config": config,
                "files": files}
        try:
            (tmp / MANIFEST).write_text(json.dumps({**body, "manifest_sha256": _seal(body)}, indent=1))
        except OSError as e:
            raise _save_failed(e, d, tmp, step) from e
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


def _save_failed(e: BaseException, d: pathlib.Path, tmp: pathlib.Path, step: int) -> CheckpointError:
    """The error for a save that could not be written; its partial folder goes (it holds no usable state)."""
    cause = write_failure(e, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    kept = [p.name for _, p in _steps(d)]
    return CheckpointError(f"could not write checkpoint step {step} in {d}: {cause}. "
                           + (f"The complete checkpoints are kept ({', '.join(kept)}); " if kept else "")
                           + "free space there or give another --ckpt-dir, then run again to resume")


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
        with _one_process_is_meant():
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - dcp raises EOFError, KeyError, ... for damage
        if peer_failure(e):
            raise LoadInterrupted(f"interrupted while loading checkpoint {path}: {peer_failure(e)}. The "
                                  "checkpoint is not at fault (it is left in place); run again to resume "
                                  "from it") from e
        raise CheckpointError(f"could not read checkpoint {path} ({type(e).__name__}: {comm.first_line(e)}); "
                              "it is damaged or was written by another configuration") from e
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if _rng_key(rank) in state:
        torch.set_rng_state(state[_rng_key(rank)])
    if f"cuda_rng_rank{rank}" in state:
        torch.cuda.set_rng_state(state[f"cuda_rng_rank{rank}"])
    return {"step": int(state["train"]["step"]), "samples": int(state["train"]["samples"])}


# What gloo, NCCL and the TCP store say when a peer rank is gone or the group timed out.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
              "Connection refused", "NCCL communicator was aborted", "DistNetworkError", "ProcessGroupGloo",
              "Socket Timeout", "recvBytes", "sendBytes")


def peer_failure(e: BaseException) -> str | None:
    """Why a collective failed, when it is a peer rank dying or the group timing out (else None)."""
    for x in _failures(e):
        if isinstance(x, CheckpointException):
            continue
        text = str(x)
        if isinstance(x, (dist.DistNetworkError, dist.DistStoreError)) or any(w in text for w in _PEER_GONE):
            said = comm.first_line(x).split(" This is typically caused")[0]  # gloo's advice runs on
            return f"a peer rank stopped or the group failed ({type(x).__name__}: {said})"
    return None


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
        try:
            manifest, problem = verify(path)
        except RuntimeError as e:
            if why := peer_failure(e):
                raise LoadInterrupted(f"interrupted while checking checkpoint {path}: {why}. The checkpoint is not "
                                      "at fault (it is left in place); run again to resume from it") from e
            raise
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
                raise ConfigMismatch(f"cannot resume {path}: " + "; ".join(errors))
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
