"""``ringattn audit``: is a transformers model exact context-parallel? (``ringattn.hf.audit``)

Builds the model twice with the same weights in float64, ring attention on ``--nproc`` ranks and sdpa (or eager)
in one process, runs one random batch forward and backward, and prints per decoder layer the largest relative
error of its output and of its parameters' gradients, then the first layer and feature that disagrees.

Exit status: 0 every number matches, 1 a layer disagrees or the model is refused (the ``culprit:`` line names it),
2 bad input (a missing file, a bad flag).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

import torch.distributed as dist

from ..modes import Layout
from ..training import launch
from .flags import JsonFlag, add_flags, flag, from_args


@dataclass(frozen=True)
class Command:
    model: str | None = field(default=None, metadata=flag(
        "a config JSON file, a local checkpoint folder, or a model type (llama, mistral, ...) for a tiny random "
        "config", metavar="PATH_OR_TYPE"))
    nproc: int = field(default=2, metadata=flag("local processes (ignored under torchrun)"))
    layout: str = field(default="zigzag", metadata=flag("how the sequence is split", choices=list(Layout)))
    seq_len: int = field(default=256, metadata=flag("tokens in the random batch"))
    batch: int = field(default=1, metadata=flag("sequences in the random batch"))
    seed: int = field(default=0, metadata=flag("random batch (and random weights) from this seed"))
    tol: float | None = field(default=None, metadata=flag(
        "relative tolerance (default: 1e-9, or 1e-5 where the model computes in float32 itself)", type=float))
    trust_remote_code: bool = field(default=False, metadata=flag("let transformers run the checkpoint's own code"))
    compare_refused: bool = field(default=False, metadata=flag(
        "for a model ringattn.hf.prepare refuses, compare anyway: where does the refused part really differ?"))

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required: a config JSON file, a checkpoint folder or a model type")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, Command)
    p.add_argument("--json", action=JsonFlag, help="print the report as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from ..hf import audit

    try:
        cmd = from_args(Command, args)
        kw = dict(nproc=cmd.nproc, layout=cmd.layout, seq_len=cmd.seq_len, batch=cmd.batch, seed=cmd.seed,
                  tol=cmd.tol, trust_remote_code=cmd.trust_remote_code, compare_refused=cmd.compare_refused)
        if launch.under_torchrun():
            launch.init_from_env()
        report = audit(cmd.model, **kw)
    except (FileNotFoundError, ValueError, TypeError) as e:
        # Bad input, told apart from a model that disagrees (exit 1).
        print(f"ringattn audit: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0 if report.ok else 1
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(report.table())
    return 0 if report.ok else 1
