"""``ringattn generate``: long-context generation with a sharded KV cache (``ringattn.generate``).

Flags: the ``flag`` fields of ``Command`` (below), ``SamplingConfig`` and the model's shape and
attention from ``LlamaConfig``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import comm
from ..app.generate import GenerationResult, SamplingConfig, generate
from ..app.model import LlamaConfig, build
from ..modes import DTYPES
from ..training import launch
from . import memory
from .flags import JsonFlag, add_flags, flag, from_args

# Generation needs only the model's shape and how the prompt is attended.
MODEL_SKIP = ("backward_exchange", "ffn_chunk", "checkpoint_layers")
MODEL_DEFAULTS = {"layout": "zigzag"}


@dataclass(frozen=True)
class Command:
    """What to generate from, on how many ranks; validated on construction."""

    nproc: int = field(default=2, metadata=flag("local processes (ignored under torchrun)"))
    prompt_len: int = field(default=4096, metadata=flag("random prompt of this many tokens"))
    prompt: str | None = field(default=None, metadata=flag("prompt text (byte-level tokens) instead"))
    batch: int = field(default=1, metadata=flag("sequences generated at once (the prompt repeated)"))
    max_new_tokens: int = field(default=32, metadata=flag("tokens to generate"))
    dtype: str = field(default="float32", metadata=flag("model dtype", choices=DTYPES))
    model_seed: int = field(default=0, metadata=flag("random weights from this seed"))
    check: bool = field(default=False, metadata=flag(
        "re-run single-process with an unsharded cache and compare the tokens"))
    json_out: str | None = field(default=None, metadata=flag("also write the JSON summary to this file",
                                                              metavar="PATH"))

    def __post_init__(self) -> None:
        for name in ("nproc", "prompt_len", "batch", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.prompt == "":
            raise ValueError("--prompt must not be empty")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, Command)
    add_flags(p, SamplingConfig)
    add_flags(p, LlamaConfig, defaults=MODEL_DEFAULTS, skip=MODEL_SKIP)
    p.add_argument("--json", action=JsonFlag, help="print the summary as JSON on stdout")


def _model(cmd: Command, model: LlamaConfig):
    return build(model, seed=cmd.model_seed, dtype=DTYPES[cmd.dtype])


def _prompt(cmd: Command, sampling: SamplingConfig) -> torch.Tensor:
    if cmd.prompt is not None:
        ids = torch.tensor(list(cmd.prompt.encode("utf-8")), dtype=torch.long)
        return ids[None].repeat(cmd.batch, 1)
    g = torch.Generator().manual_seed(sampling.seed)
    return torch.randint(0, 256, (cmd.batch, cmd.prompt_len), generator=g)


def _generate(cmd: Command, sampling: SamplingConfig, model: LlamaConfig) -> GenerationResult:
    return generate(_model(cmd, model), _prompt(cmd, sampling), cmd.max_new_tokens, sampling=sampling)


def _summary(res: GenerationResult, world: int) -> dict:
    return {"world": world, "prompt_len": res.prompt_len, "batch": res.tokens.shape[0],
            "new_tokens": res.tokens.shape[1], "tokens": res.tokens.tolist(),
            "prefill_s": res.prefill_s, "decode_s": res.decode_s, "decode_tokens_per_s": res.tokens_per_s,
            "decode_tokens_per_s_median": res.median_tokens_per_s,
            "decode_first_step_s": res.step_s[0] if res.step_s else None,
            "bytes_per_token": res.bytes_per_token, "cache_slots_per_rank": res.cache_slots}


def _worker(cmd: Command, sampling: SamplingConfig, model: LlamaConfig) -> dict:
    torch.set_num_threads(1)
    return _summary(_generate(cmd, sampling, model), comm.group_rank_world()[1])


def _print(s: dict) -> None:
    if s.get("decode_first_step_s") is None:
        decode = "no decode step (the one token comes from the prefill)"
    else:
        # The first step pays one-time costs (first calls of the decode path), which the median leaves out.
        median_ms = s["batch"] / s["decode_tokens_per_s_median"] * 1e3
        decode = (f"decode {s['decode_tokens_per_s']:.1f} tokens/s overall (first step "
                  f"{s['decode_first_step_s'] * 1e3:.1f} ms, median step {median_ms:.1f} ms = "
                  f"{s['decode_tokens_per_s_median']:.1f} tokens/s)")
    print(f"{s['world']} rank(s), prompt {s['prompt_len']} tokens x batch {s['batch']}: prefill "
          f"{s['prefill_s']:.2f} s, {s['new_tokens']} new tokens, {decode}, {s['bytes_per_token']:.0f} bytes sent "
          f"per token per rank, {s['cache_slots_per_rank']} cache slots per rank")
    for row in s["tokens"]:
        text = bytes(t for t in row if 32 <= t < 127).decode("ascii")
        print(f"  tokens {row[:16]}{' ...' if len(row) > 16 else ''}  text {text!r}")


def notes(cmd: Command, sampling: SamplingConfig, given_temperature: float | None) -> list[str]:
    """What the run does that the command line does not say (printed once, before it starts)."""
    out = [f"the weights are random (--model-seed {cmd.model_seed}; no trained checkpoint): the tokens are "
           "noise; this measures speed and that the sharded cache decodes as one process would"]
    if given_temperature is None and sampling.cuts:
        out.append(f"{' and '.join(sampling.cuts)} given without --temperature: sampling at temperature "
                   f"{sampling.temperature} (seed {sampling.seed}); --temperature 0 with them is refused")
    return out


def run(args: argparse.Namespace) -> int:
    """Run on ``--nproc`` local ranks (or torchrun's); print tokens and tokens/s, or the JSON summary."""
    cmd, sampling = from_args(Command, args), from_args(SamplingConfig, args)
    model = from_args(LlamaConfig, args)
    world = int(os.environ["WORLD_SIZE"]) if launch.under_torchrun() else cmd.nproc
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launch.under_torchrun() else cmd.nproc
    plen = len(cmd.prompt.encode()) if cmd.prompt is not None else cmd.prompt_len
    need, _ = memory.generate_bytes(model, plen, cmd.batch, cmd.max_new_tokens, cmd.dtype, world)
    memory.check("ringattn generate", f"a prompt of {cmd.batch} x {plen:,} tokens", need, world, local,
                 launch.under_torchrun() and torch.cuda.is_available())
    if not launch.under_torchrun() or os.environ.get("RANK") == "0":
        for line in notes(cmd, sampling, args.temperature):
            print(f"ringattn generate: note: {line}", file=sys.stderr, flush=True)
    if launch.under_torchrun():
        if cmd.check:
            raise ValueError("--check needs ringattn's own launcher (--nproc), not torchrun")
        launch.init_from_env()
        summary = _worker(cmd, sampling, model)
        if dist.get_rank() != 0:
            return 0
    else:
        summary = launch.spawn_collect(_worker, cmd.nproc, cmd, sampling, model)
    code = 0
    if cmd.check:
        torch.set_num_threads(1)
        single = _generate(cmd, sampling, model)
        summary["check_single_process_tokens_per_s"] = single.tokens_per_s
        summary["check_same_tokens"] = single.tokens.tolist() == summary["tokens"]
        code = 0 if summary["check_same_tokens"] else 1
    if args.json:
        print(json.dumps(summary))
    else:
        _print(summary)
        if cmd.check:
            print(f"check: single process, unsharded cache: {summary['check_single_process_tokens_per_s']:.1f} "
                  f"tokens/s; same tokens: {summary['check_same_tokens']}")
    if cmd.json_out:
        pathlib.Path(cmd.json_out).write_text(json.dumps(summary, indent=1))
    return code
