"""``ringattn eval``: passkey retrieval accuracy of a trained checkpoint, by needle depth.

    ringattn eval --ckpt examples/checkpoints/passkey --seq-len 8192 --nproc 4 --depths 10 --samples 10

The model (shape, attention, layout, dtype) is the one the checkpoint's manifest records; only its
weights are read (``torch.distributed.checkpoint`` reads them on any number of ranks, whatever number
wrote them). For each of ``--depths`` needle depths evenly spaced over 0-100 % of the haystack,
``--samples`` held-out samples (indices training never reaches) at ``--seq-len`` tokens run through the
model on ``--nproc`` ranks with the checkpoint's attention strategy; a sample is right when every digit of
its key is the argmax at its answer position (teacher-forced, i.e. greedy decoding writes the whole key).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import warnings
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

from .. import comm
from ..app.data import PASSKEY_TASKS, TrainTask, make_task
from ..app.model import Llama, LlamaConfig, build
from ..modes import DTYPES
from ..training import launch
from .flags import JsonFlag, add_flags, flag, from_args


@dataclass(frozen=True)
class EvalCommand:
    """What to evaluate, where, on how many ranks; validated on construction."""

    ckpt: str = field(default="", metadata=flag(
        "checkpoint: a step-NNNNNNNN folder, or a folder holding them (the newest is used)", metavar="DIR"))
    task: str | None = field(default=None, metadata=flag(
        "passkey task to evaluate on (default: the one the checkpoint was trained on)",
        choices=PASSKEY_TASKS))
    seq_len: int = field(default=0, metadata=flag("context length in tokens (0: the training length)"))
    nproc: int = field(default=1, metadata=flag("local ranks holding the sequence (ignored under torchrun)"))
    depths: int = field(default=10, metadata=flag("needle depths, evenly spaced over 0-100%% of the haystack"))
    samples: int = field(default=10, metadata=flag("held-out samples per depth"))

    def __post_init__(self) -> None:
        if not self.ckpt:
            raise ValueError("--ckpt DIR is required")
        for name in ("nproc", "depths", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 0:
            raise ValueError(f"--seq-len must be >= 1 (0 = the training length), got {self.seq_len}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, EvalCommand)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--json", action=JsonFlag, help="print the result as JSON on stdout")


def find_checkpoint(path: str | pathlib.Path) -> pathlib.Path:
    """The checkpoint folder ``path`` names: itself if it is one, else the newest ``step-*`` inside."""
    from ..training import checkpoint

    p = pathlib.Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {p}")
    if (p / ".metadata").is_file():
        return p
    found = checkpoint.latest(p)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {p} (neither a .metadata file nor step-* folders)")
    return found


def saved_config(path: pathlib.Path) -> dict:
    """The run configuration recorded in checkpoint ``path``'s manifest (flat, ``model.dim``...)."""
    from ..training.checkpoint import MANIFEST

    m = path / MANIFEST
    if not m.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {MANIFEST}: its model configuration is unknown")
    config = json.loads(m.read_text()).get("config")
    if not config:
        raise ValueError(f"checkpoint {path}: its {MANIFEST} records no run configuration")
    return config


def model_config(config: dict, world: int) -> LlamaConfig:
    """The checkpoint's model, attending with its own strategy ('dense' runs as 'ring' on several ranks)."""
    names = {f.name for f in fields(LlamaConfig)}
    kw = {k.removeprefix("model."): v for k, v in config.items() if k.startswith("model.")}
    kw = {k: v for k, v in kw.items() if k in names}
    if kw.get("strategy") == "hybrid" or (kw.get("strategy") == "dense" and world > 1):
        kw["strategy"] = "ring"  # the same attention; hybrid needs a 2-D mesh eval does not build
    if kw.get("strategy") == "dense":
        kw["backward_exchange"] = "ring"
    return LlamaConfig(**kw)


def load_model(path: pathlib.Path, cfg: LlamaConfig, dtype: torch.dtype) -> Llama:
    """The model of checkpoint ``path`` (collective with several ranks): only its weights are read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from ..training.checkpoint import CheckpointError, LoadInterrupted, peer_failure

    model = build(cfg, seed=None, dtype=dtype)
    state = {"model": get_model_state_dict(model)}
    try:
        with warnings.catch_warnings():  # one process: dcp warns that it reads without a group, as meant
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except Exception as e:  # noqa: BLE001 - dcp raises many kinds for a damaged or foreign checkpoint
        if why := peer_failure(e):
            raise LoadInterrupted(f"interrupted while loading the model of checkpoint {path}: {why}. The "
                                  "checkpoint is not at fault") from e
        raise CheckpointError(f"could not read the model of checkpoint {path} ({type(e).__name__}: "
                              f"{comm.first_line(e)})") from e
    set_model_state_dict(model, state["model"])
    return model


def depth_points(n: int) -> list[float]:
    """``n`` needle depths evenly spaced over [0, 1] (one: the middle)."""
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


def evaluate_depths(model: Llama, task: TrainTask, seq_len: int, depths: list[float], samples: int,
                    progress: bool = False) -> dict:
    """Accuracy overall and per depth on the ranks of the default group (or one process).

    Depth ``i`` uses held-out samples ``HELD_OUT + i * samples + j``: every cell has its own keys.
    """
    from ..app.train import ACCURACY_MEANS, HELD_OUT, Parallel, Score, score, setup_parallel

    par = setup_parallel(1) if dist.is_initialized() else Parallel()
    bar = None
    if progress and par.rank == 0:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(depths), desc=f"eval {seq_len}", unit="depth", file=sys.stderr, leave=False)
        except ImportError:
            pass
    by_depth, total = {}, Score()
    for i, d in enumerate(depths):
        start = HELD_OUT + i * samples
        sc = score(model, task, par, model.cfg.layout, seq_len, range(start, start + samples), depth=d)
        by_depth[f"{d:.3f}"] = sc.accuracy(per_token=False)
        for f in fields(Score):
            setattr(total, f.name, getattr(total, f.name) + getattr(sc, f.name))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {"accuracy": total.accuracy(per_token=False), "by_depth": by_depth, "seq_len": seq_len,
            "digit_accuracy": total.accuracy(per_token=True), "answer_loss": total.mean_answer_loss(),
            "samples_per_depth": samples, "accuracy_means": ACCURACY_MEANS[False]}


@dataclass(frozen=True)
class Job:
    path: pathlib.Path
    cfg: LlamaConfig
    dtype: str
    task: str
    seed: int
    seq_len: int
    depths: tuple[float, ...]
    samples: int
    progress: bool


def _worker(job: Job) -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = load_model(job.path, job.cfg, DTYPES[job.dtype])
    task = make_task(job.task, seed=job.seed)
    out = evaluate_depths(model, task, job.seq_len, list(job.depths), job.samples, job.progress)
    return {**out, "task": job.task, "checkpoint": str(job.path), "world": comm.group_rank_world()[1],
            "strategy": job.cfg.strategy, "layout": job.cfg.layout, "wall_s": time.perf_counter() - t0}


def prepare(cmd: EvalCommand, world: int, progress: bool = False) -> Job:
    """Everything the ranks need, checked before any of them starts."""
    path = find_checkpoint(cmd.ckpt)
    config = saved_config(path)
    task_name = cmd.task or config.get("task")
    if task_name not in PASSKEY_TASKS:
        raise ValueError(f"ringattn eval measures passkey retrieval; the checkpoint was trained on task "
                         f"{config.get('task')!r}: pass --task, one of " + ", ".join(PASSKEY_TASKS))
    seq_len = cmd.seq_len or int(config.get("seq_len") or 0)
    task = make_task(task_name, seed=int(config.get("seed", 0)))
    if seq_len < task.min_len:
        raise ValueError(f"task {task_name!r} needs --seq-len >= {task.min_len}, got {seq_len}")
    cfg = model_config(config, world)
    dtype = config.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"checkpoint {path}: unknown dtype {dtype!r}")
    return Job(path, cfg, dtype, task_name, int(config.get("seed", 0)), seq_len, tuple(depth_points(cmd.depths)),
               cmd.samples, progress)


def print_result(r: dict) -> None:
    print(f"passkey retrieval, {r['task']}, {r['seq_len']} tokens on {r['world']} rank(s), "
          f"{r['samples_per_depth']} samples per depth ({r['checkpoint']}):")
    for d, a in r["by_depth"].items():
        print(f"  depth {float(d) * 100:5.1f}%  accuracy {a:.3f}")
    print(f"accuracy {r['accuracy']:.3f} overall (digits right: {r['digit_accuracy']:.3f}, mean answer-digit loss "
          f"{r['answer_loss']:.3f} nats; guessing gives 0.00001, 0.1 and ln 10 = 2.303), {r['wall_s']:.1f} s")
    print(f"accuracy = {r['accuracy_means']}")


def run(args: argparse.Namespace) -> int:
    cmd = from_args(EvalCommand, args)
    if launch.under_torchrun():
        launch.init_from_env()
        try:
            result = _worker(prepare(cmd, dist.get_world_size(), args.progress))
        finally:
            rank = dist.get_rank()
            dist.destroy_process_group()
        if rank != 0:
            return 0
    elif cmd.nproc == 1:
        result = _worker(prepare(cmd, 1, args.progress))
    else:
        result = launch.spawn_collect(_worker, cmd.nproc, prepare(cmd, cmd.nproc, args.progress))
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print_result(result)
    return 0
