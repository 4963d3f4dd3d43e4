"""``ringattn train``: context-parallel training of the small LLaMA-style model (``ringattn.train``).

The training flags are the ``flag`` fields of ``TrainConfig`` and ``LlamaConfig``; this module adds
only how to launch (``--nproc``, ``--threads``) and how to show the run (``--no-progress``, ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import comm
from ..app.model import LlamaConfig
from ..app.train import RECIPES, TrainConfig, train
from ..training import launch
from . import memory
from .flags import JsonFlag, add_flags, from_args

# The command's default model keeps the feed-forward blockwise (the library's default is whole-sequence).
MODEL_DEFAULTS = {"ffn_chunk": 256}


@dataclass(frozen=True)
class Show:
    """How a run is shown: presentation only, never part of what is trained."""

    progress: bool = True
    json: bool = False
    throttle: float = 0.0  # seconds to sleep per step: makes a short run long enough to interrupt


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", choices=RECIPES, default=None, help=(
        "a preset of the flags below (passkey-long: passkey retrieval at 8192 tokens, trained on 4 ranks; "
        "what it reached: docs/benchmarks.md); flags given with other values than their defaults override it"))
    p.add_argument("--nproc", type=int, default=1, help="local gloo ranks to spawn (ignored under torchrun)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    add_flags(p, TrainConfig)
    add_flags(p, LlamaConfig, defaults=MODEL_DEFAULTS)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or lines")
    p.add_argument("--json", action=JsonFlag, help="print the final summary as one JSON line on stdout")
    p.add_argument("--throttle", type=float, default=0.0, help=argparse.SUPPRESS)
    p.set_defaults(_defaults={a.dest: a.default for a in p._actions})


def apply_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``--recipe``'s values wherever a flag was left at its default."""
    if not getattr(args, "recipe", None):
        return args
    defaults = getattr(args, "_defaults", {})
    out = argparse.Namespace(**vars(args))
    for name, value in RECIPES[args.recipe].items():
        if getattr(args, name) == defaults.get(name):
            setattr(out, name, value)
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` the flags (and ``--recipe``) describe (its own checks name a bad value)."""
    args = apply_recipe(args)
    try:
        model = from_args(LlamaConfig, args)
    except ValueError as e:
        raise ValueError(f"model: {e}") from None
    return from_args(TrainConfig, args, model=model)


class Printer:
    """Rank 0 shows a tqdm bar when tqdm is installed, plain lines otherwise; every rank throttles."""

    def __init__(self, show: Show, rank: int):
        self.show, self.visible = show, rank == 0
        self.bar, self.every, self.steps = None, 1, 0

    def start(self, step: int, steps: int, resumed_from: pathlib.Path | None) -> None:
        if not self.visible:
            return
        if resumed_from is not None:
            print(f"resumed from {resumed_from.name} in {resumed_from.parent}", file=sys.stderr, flush=True)
        if not self.show.progress or step >= steps:
            return
        self.steps, self.every = steps, max(1, steps // 20)
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=steps, initial=step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)

    def step(self, step: int, loss: float, grad_norm: float, tokens_per_s: float) -> None:
        if self.visible and self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", gnorm=f"{grad_norm:.2f}")
            self.bar.update(1)
        elif self.visible and self.steps and ((step + 1) % self.every == 0 or step + 1 == self.steps):
            print(f"train step {step + 1}/{self.steps}: loss {loss:.4f}, {tokens_per_s:,.0f} tokens/s, "
                  f"grad norm {grad_norm:.2f}", file=sys.stderr, flush=True)
        if self.show.throttle:
            time.sleep(self.show.throttle)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary), flush=True)
        return
    acc = ", ".join(f"{k}: {v:.2f}" for k, v in summary["eval_accuracy"].items() if v is not None)
    resumed = f" (resumed at step {summary['start_step']})" if summary.get("resumed_from") else ""
    print(f"loss {summary['loss_first']} -> {summary['loss_last']}{resumed}, "
          f"{summary['tokens_per_s'] or 0:,.0f} tokens/s, peak {summary['peak_mem_mb_per_rank']:.0f} MB"
          f"/rank{', accuracy ' + acc if acc else ''}", flush=True)
    if acc:
        print(f"accuracy (by context length) = {summary['eval_accuracy_means']}", flush=True)
    if summary.get("hint"):
        print(f"hint: {summary['hint']}", flush=True)


def _worker(tc: TrainConfig, show: Show) -> None:
    rank = comm.group_rank_world()[0]
    summary = train(tc, progress=Printer(show, rank))
    if rank == 0:
        print_summary(summary, show.json)


def _lock(tc: TrainConfig):
    """The checkpoint folder's lock, taken before any rank starts (a no-op without ``--ckpt-dir``)."""
    from ..training import checkpoint

    if not tc.ckpt_dir:
        return contextlib.nullcontext()
    lock = checkpoint.DirLock(tc.ckpt_dir).acquire()
    if lock.took_over:
        print(f"ringattn train: note: took over the lock of {tc.ckpt_dir} from a run that is gone ({lock.took_over})",
              file=sys.stderr, flush=True)
    return lock


def _torchrun_lock(tc: TrainConfig):
    """Under torchrun rank 0 takes the lock; every rank hears whether it could, before any other collective."""
    from ..training import checkpoint

    held, error = contextlib.nullcontext(), None
    if dist.get_rank() == 0:
        try:
            held = _lock(tc)
        except (checkpoint.CheckpointError, ValueError) as e:
            error = e
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    # 0: taken, 1: refused (held by another run), 2: unusable (a usage error, exit 2 on every rank)
    failed = torch.tensor([0 if error is None else 2 if isinstance(error, ValueError) else 1], dtype=torch.int64,
                          device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(failed):
        why = f"rank 0 could not take the checkpoint folder {tc.ckpt_dir} (its error says why)"
        raise ValueError(why) if int(failed) == 2 else checkpoint.CheckpointError(why)
    return held


def _check_memory(tc: TrainConfig, world: int, local_ranks: int, cuda: bool, shown: bool) -> None:
    """Refuse a step no rank can hold, before anything is allocated; announce one that takes long."""
    if world % tc.dp:
        return  # check_world names that
    need, tokens = memory.train_bytes(tc, world)
    longest = max(tc.curriculum, key=lambda st: st[0] * st[2])[::2] if tc.curriculum else (tc.seq_len, tc.batch)
    what = f"a step of {longest[1]} x {longest[0]:,} tokens ({tokens:,} per rank)"
    memory.check("ringattn train", what, need, world, local_ranks, cuda)
    if shown and tokens >= memory.LONG_TOKENS:
        print(f"ringattn train: note: {what} needs about {memory.human(need)} per rank; each step takes a while "
              "(progress shows after the first)", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    args = apply_recipe(args)
    tc = config_from_args(args)
    show = Show(progress=args.progress, json=args.json, throttle=args.throttle)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if launch.under_torchrun():
        _check_memory(tc, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                      torch.cuda.is_available(), os.environ["RANK"] == "0")
        launch.init_from_env(args.threads)
        try:
            tc.check_world(dist.get_world_size())
            with _torchrun_lock(tc):
                _worker(tc, show)
        finally:
            # Without it the process aborts at exit under torchrun (gloo's threads outlive the group).
            dist.destroy_process_group()
        return 0
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    tc.check_world(args.nproc)
    _check_memory(tc, args.nproc, args.nproc, False, True)
    with _lock(tc):
        if args.nproc == 1:
            torch.set_num_threads(args.threads)
            _worker(tc, show)
        else:
            launch.spawn(_worker, args.nproc, tc, show, threads=args.threads)
    return 0
