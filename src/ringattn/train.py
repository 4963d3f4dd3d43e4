"""``ringattn train``: context-parallel training of the small LLaMA-style model (the BPT).

Ranks form a 2-D mesh ``("dp", "cp")``. The ``cp`` ranks of a row hold different tokens of the *same*
sequences (split in ``--layout``; attention by ``--strategy``); the ``dp`` rows take different
sequences. Gradient reduction, for both dimensions at once: each rank's loss is its token losses
summed and divided by the number of valid labels in the whole global batch (over every rank), so the
*sum* of all ranks' parameter gradients is exactly the single-process gradient of the mean token loss
— one all-reduce (SUM) over all ranks. (CP ranks' gradients must be summed since each holds part of a
sequence; across DP this normalisation is the usual average when every rank has as many labels.)
All ranks then hold bitwise the same gradient, hence the same clipping norm and the same update.

    ringattn train --nproc 4 --dp 2 --task passkey --seq-len 512 --steps 200 --json
    torchrun --nproc-per-node 8 -m ringattn.cli train --dp 2 ...

Order of one step: data (samples ``[samples, samples + batch)``, pure function of the index) → shard
→ forward/backward → all-reduce → clip → AdamW with the cosine-with-warmup learning rate of the step.
Checkpoints (``--ckpt-dir``, every ``--ckpt-every`` steps and at the end) restore everything
(``ringattn.checkpoint``); a run with an existing checkpoint resumes from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import comm, launch
from .data import TASKS, Task, make_task
from .layouts import LAYOUTS
from .model import Llama, LlamaConfig, build
from .model.loss import count_labels, shard_batch, sharded_loss
from .validate import BACKWARD_EXCHANGES

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


@dataclass
class TrainConfig:
    model: LlamaConfig = field(default_factory=LlamaConfig)
    task: str = "passkey"
    text_file: str | None = None
    seq_len: int = 256
    batch: int = 4  # global batch, in sequences (split over dp)
    steps: int = 100
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0  # global gradient-norm clip; 0 = off
    loss_chunk: int = 0  # blockwise loss: logits for this many tokens at a time (0 = all)
    dp: int = 1  # data-parallel size; context-parallel size = world / dp
    ulysses: int = 0  # strategy "hybrid": Ulysses size inside the context-parallel ranks (ring = cp / it)
    dtype: str = "float32"
    seed: int = 0
    ckpt_dir: str | None = None
    ckpt_every: int = 0  # 0 = only at the end (when ckpt_dir is set)
    resume: bool = True
    eval_lens: tuple[int, ...] = ()  # () = seq_len / 2, seq_len, 2 * seq_len
    eval_samples: int = 16
    progress: bool = True
    json: bool = False
    throttle: float = 0.0  # sleep per step (seconds): makes a short run long enough to interrupt


@dataclass
class Parallel:
    """Where this rank sits: the 2-D mesh (dp, cp) and its groups (None in a single process)."""

    rank: int = 0
    world: int = 1
    dp: int = 1
    cp: int = 1
    dp_rank: int = 0
    cp_rank: int = 0
    mesh: object = None
    cp_group: object = None
    cp_mesh: object = None  # hybrid strategy: the 2-D ("ring", "ulysses") mesh holding the sequence
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def seq(self) -> dict:
        """Keywords naming where the sequence lives: ``{"group": ..}`` or, for hybrid, ``{"mesh": ..}``."""
        return {"mesh": self.cp_mesh} if self.cp_mesh is not None else {"group": self.cp_group}


def setup_parallel(dp: int, ulysses: int = 0) -> Parallel:
    """The ("dp", "cp") DeviceMesh over every rank of the default group.

    ``ulysses`` > 0 (hybrid strategy) splits cp further: a 3-D mesh ("dp", "ring", "ulysses").
    """
    rank, world = comm.group_rank_world()
    if dp < 1 or world % dp:
        raise ValueError(f"dp must divide the number of ranks ({world}), got {dp}")
    if ulysses and (world // dp) % ulysses:
        raise ValueError(f"ulysses ({ulysses}) must divide the context-parallel size ({world // dp})")
    if world == 1 and not ulysses:
        return Parallel()
    from torch.distributed.device_mesh import init_device_mesh

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    cp = world // dp
    if ulysses:
        mesh = init_device_mesh(device.type, (dp, cp // ulysses, ulysses),
                                mesh_dim_names=("dp", "ring", "ulysses"))
        cp_mesh = mesh["ring", "ulysses"]
        cp_rank = mesh.get_local_rank("ring") * ulysses + mesh.get_local_rank("ulysses")
        return Parallel(rank, world, dp, cp, mesh.get_local_rank("dp"), cp_rank, mesh, None, cp_mesh, device)
    mesh = init_device_mesh(device.type, (dp, cp), mesh_dim_names=("dp", "cp"))
    return Parallel(rank, world, dp, cp, mesh.get_local_rank("dp"), mesh.get_local_rank("cp"), mesh,
                    mesh.get_group("cp"), None, device)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``lr`` down to ``lr * min_lr_ratio``."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_optimizer(model: Llama, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms (1-D parameters)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the same per-parameter arithmetic whatever the grouping, so runs compare bitwise.
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas, foreach=False)


def local_batch(task: Task, tc: TrainConfig, par: Parallel, samples: int, seq_len: int, n: int):
    """This rank's (inputs, labels, seq_len): its dp row's sequences, its cp shard of them."""
    per_dp = n // par.dp
    b = task.batch(samples + par.dp_rank * per_dp, per_dp, seq_len)
    inputs, labels, s = shard_batch(b.inputs, b.labels, layout=tc.model.layout, **par.seq)
    answer = shard_batch(b.inputs, b.answer.long(), layout=tc.model.layout, **par.seq)[1]
    return inputs.to(par.device), labels.to(par.device), s, answer.to(par.device) == 1


def reduce_gradients(model: torch.nn.Module, loss: torch.Tensor, par: Parallel) -> torch.Tensor:
    """Sum every parameter gradient and the loss over all ranks (one flat all-reduce); returns the loss."""
    params = list(model.parameters())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)])
    if par.world > 1:
        try:
            dist.all_reduce(flat)
        except RuntimeError as e:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
            raise comm.PeerError(f"ringattn: the gradient all-reduce failed; a peer rank probably died or timed "
                                 f"out: {comm.first_line(e)}") from e
    off = 0
    for p, g in zip(params, grads):
        p.grad = flat[off: off + g.numel()].view_as(g).clone()
        off += g.numel()
    return flat[-1]


def train_step(model: Llama, optim: torch.optim.Optimizer, batch, par: Parallel, tc: TrainConfig,
               step: int) -> tuple[float, float]:
    """One optimisation step on this rank's shard of the global batch; returns (loss, grad norm).

    The loss is the global mean token loss, the same on every rank.
    """
    inputs, labels, seq_len = batch[:3]
    n_labels = count_labels(labels)  # over every rank: the global normaliser
    for g in optim.param_groups:
        g["lr"] = lr_at(step, tc)
    optim.zero_grad(set_to_none=True)
    loss = sharded_loss(model, inputs, labels, n_labels=n_labels, seq_len=seq_len, **par.seq,
                        chunk=tc.loss_chunk)
    loss.backward()
    total = reduce_gradients(model, loss, par)
    if tc.clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip, foreach=False)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    optim.step()
    return float(total), float(norm)


@torch.no_grad()
def evaluate(model: Llama, task: Task, tc: TrainConfig, par: Parallel, seq_len: int) -> float | None:
    """Task accuracy at ``seq_len`` on held-out samples (teacher-forced argmax on the answer tokens).

    A passkey counts as right only if all its digits are; mqar counts per query. Samples are split
    over dp; every rank returns the same number.
    """
    if task.name == "text":
        return None
    n = tc.eval_samples
    stats = torch.zeros(n, 2, dtype=torch.float64, device=par.device)  # per sample: answers, wrong
    held_out = 10**9  # eval samples come from a range training never reaches
    was_training = model.training
    model.eval()
    for i in range(par.dp_rank, n, par.dp):
        b = task.batch(held_out + i, 1, seq_len)
        inputs, labels, s = shard_batch(b.inputs, b.labels, layout=tc.model.layout, **par.seq)
        answer = shard_batch(b.inputs, b.answer.long(), layout=tc.model.layout, **par.seq)[1] == 1
        logits = model(inputs.to(par.device), seq_len=s, **par.seq)
        pred = logits.argmax(-1).cpu()
        stats[i, 0] = answer.sum()
        stats[i, 1] = (answer & (pred != labels)).sum()
    model.train(was_training)
    if par.world > 1:
        dist.all_reduce(stats)
    if task.per_token:
        return float(1 - stats[:, 1].sum() / stats[:, 0].sum().clamp(min=1))
    has = stats[:, 0] > 0
    return float((stats[has, 1] == 0).double().mean()) if bool(has.any()) else None


def peak_mem_mb(par: Parallel) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, else peak resident set size."""
    if par.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _max_over_ranks(x: float, par: Parallel) -> float:
    if par.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=par.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


# What a resumed run may change. Everything else (the model, the data, the dtype, the number of ranks and
# how the batch is split) must match: the saved state means nothing under another one.
RESUME_WARN = ("steps", "lr", "min_lr_ratio", "warmup", "weight_decay", "betas", "clip")  # allowed, with a warning
RESUME_FREE = ("ckpt_dir", "ckpt_every", "resume", "eval_lens", "eval_samples", "progress", "json", "throttle",
               "loss_chunk", "ulysses", "model.strategy", "model.layout", "model.backward_exchange",
               "model.ffn_chunk", "model.checkpoint_layers")  # how it runs: the same numbers up to rounding


def run_config(tc: TrainConfig) -> dict:
    """The run's configuration as JSON data, flat (``model.dim``), as checkpoints store it."""
    d = dataclasses.asdict(tc)
    model = d.pop("model")
    flat = {**d, **{f"model.{k}": v for k, v in model.items()}}
    return json.loads(json.dumps(flat))


def compare_config(saved: dict | None, saved_world: int, config: dict, world: int) -> tuple[list[str], list[str]]:
    """(errors, warnings) for resuming a checkpoint of configuration ``saved`` written by ``saved_world``
    ranks in a run of ``config`` on ``world`` ranks."""
    saved = saved or {}
    bad, changed = [], []
    for key in sorted(set(saved) | set(config)):
        if key in RESUME_FREE or saved.get(key) == config.get(key):
            continue
        change = f"{key.removeprefix('model.').replace('_', '-')} {saved.get(key)!r} -> {config.get(key)!r}"
        (changed if key in RESUME_WARN else bad).append(change)
    errors = []
    if saved_world != world:
        errors.append(f"it was written by {saved_world} ranks and this run has {world}: resuming on another "
                      f"number of ranks is not supported (run it on {saved_world})")
    if bad:
        errors.append("the run's configuration differs: " + ", ".join(bad) + ". To resume, these must stay as "
                      "they were; allowed are changes of " + ", ".join(k.replace("_", "-") for k in RESUME_WARN)
                      + " (with a warning) and "
                      "of how the run executes (strategy, layout, backward-exchange, chunking, threads, "
                      "evaluation, checkpoint interval). Or start afresh with --no-resume (the old "
                      "checkpoints are moved aside) or another --ckpt-dir")
    return errors, (["changed settings (allowed): " + ", ".join(changed)] if changed else [])


def train(tc: TrainConfig) -> dict:
    """Run training on the ranks of the default group (or one process); returns the summary."""
    if (tc.model.strategy == "hybrid") != bool(tc.ulysses):
        raise ValueError("--strategy hybrid and --ulysses U go together (U: the Ulysses size)")
    par = setup_parallel(tc.dp, tc.ulysses)
    if tc.batch % par.dp:
        raise ValueError(f"batch ({tc.batch}) must be a multiple of dp ({par.dp})")
    task = make_task(tc.task, seed=tc.seed, text_file=tc.text_file)
    # A seeded global RNG per rank (a fresh process's is random): runs repeat, and resume restores it.
    torch.manual_seed(tc.seed * 100_003 + par.rank)
    model = build(tc.model, seed=tc.seed, dtype=DTYPES[tc.dtype], device=par.device)
    optim = make_optimizer(model, tc)
    start, samples = 0, 0
    config = run_config(tc)
    if tc.ckpt_dir:
        from . import checkpoint  # torch.distributed.checkpoint takes half a second to import

        if not tc.resume:
            checkpoint.set_aside(tc.ckpt_dir)
        elif (pos := checkpoint.resume(tc.ckpt_dir, model, optim,
                                       compare=lambda saved, world: compare_config(saved, world, config,
                                                                                   par.world))) is not None:
            start, samples = pos["step"], pos["samples"]
            if start > tc.steps:
                raise ValueError(f"the checkpoint in {tc.ckpt_dir} is at step {start}, past --steps {tc.steps}: "
                                 "raise --steps to continue that run, or start afresh with --no-resume")

    bar = None
    if par.rank == 0 and tc.progress and start < tc.steps:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", file=sys.stderr,
                   dynamic_ncols=True)
    losses, t_train, tokens = [], 0.0, 0
    for step in range(start, tc.steps):
        t0 = time.perf_counter()
        batch = local_batch(task, tc, par, samples, tc.seq_len, tc.batch)
        loss, norm = train_step(model, optim, batch, par, tc, step)
        samples += tc.batch
        dt = time.perf_counter() - t0
        t_train += dt
        tokens += tc.batch * tc.seq_len
        losses.append(loss)
        if not math.isfinite(loss):
            raise RuntimeError(f"loss is {loss} at step {step}: lower --lr or use float32")
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tc.batch * tc.seq_len / dt:,.0f}", gnorm=f"{norm:.2f}")
            bar.update(1)
        if tc.throttle:
            time.sleep(tc.throttle)
        done = step + 1
        if tc.ckpt_dir and ((tc.ckpt_every and done % tc.ckpt_every == 0) or done == tc.steps):
            checkpoint.save(tc.ckpt_dir, model, optim, step=done, samples=samples, config=config)
    if bar is not None:
        bar.close()

    lens = tc.eval_lens or tuple(sorted({max(task.min_len, tc.seq_len // 2), tc.seq_len, 2 * tc.seq_len}))
    accuracy = {str(n): evaluate(model, task, tc, par, n) for n in lens} if tc.eval_samples else {}
    return {
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "tokens_per_s": tokens / t_train if t_train else None,
        "peak_mem_mb_per_rank": _max_over_ranks(peak_mem_mb(par), par),
        "eval_accuracy": accuracy,
        "steps": tc.steps, "start_step": start, "world": par.world, "dp": par.dp, "cp": par.cp,
        "task": tc.task, "seq_len": tc.seq_len, "batch": tc.batch,
        "strategy": tc.model.strategy, "layout": tc.model.layout, "backward_exchange": tc.model.backward_exchange,
        "dtype": tc.dtype,
    }


def _worker(tc: TrainConfig) -> None:
    summary = train(tc)
    if comm.group_rank_world()[0] == 0:
        if tc.json:
            print(json.dumps(summary), flush=True)
        else:
            acc = ", ".join(f"{k}: {v:.2f}" for k, v in summary["eval_accuracy"].items() if v is not None)
            print(f"loss {summary['loss_first']} -> {summary['loss_last']}, "
                  f"{summary['tokens_per_s'] or 0:,.0f} tokens/s, peak {summary['peak_mem_mb_per_rank']:.0f} MB"
                  f"/rank{', accuracy ' + acc if acc else ''}", flush=True)


# -- command line ---------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    m, t = LlamaConfig(), TrainConfig()
    p.add_argument("--nproc", type=int, default=1, help="local gloo ranks to spawn (ignored under torchrun)")
    p.add_argument("--dp", type=int, default=t.dp, help="data-parallel size; context parallel = ranks / dp")
    p.add_argument("--ulysses", type=int, default=0, help="hybrid strategy: Ulysses size (ring = cp / it)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--strategy", default=m.strategy, help="ring, allgather, ulysses, hybrid, auto (or dense)")
    p.add_argument("--layout", default=m.layout, choices=LAYOUTS)
    p.add_argument("--task", default=t.task, choices=TASKS)
    p.add_argument("--text-file", help="byte-level training text for --task text")
    p.add_argument("--seq-len", type=int, default=t.seq_len)
    p.add_argument("--batch", type=int, default=t.batch, help="global batch size in sequences")
    p.add_argument("--steps", type=int, default=t.steps)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--warmup", type=int, default=t.warmup)
    p.add_argument("--weight-decay", type=float, default=t.weight_decay)
    p.add_argument("--clip", type=float, default=t.clip, help="gradient-norm clip (0 = off)")
    p.add_argument("--dim", type=int, default=m.dim)
    p.add_argument("--layers", type=int, default=m.n_layers)
    p.add_argument("--heads", type=int, default=m.n_heads)
    p.add_argument("--kv-heads", type=int, default=m.n_kv_heads)
    p.add_argument("--ffn-chunk", type=int, default=256, help="blockwise FFN chunk in tokens (0 = off)")
    p.add_argument("--loss-chunk", type=int, default=0, help="blockwise loss chunk in tokens (0 = off)")
    p.add_argument("--checkpoint-layers", action="store_true", help="recompute each layer in backward")
    p.add_argument("--backward-exchange", default=m.backward_exchange, choices=BACKWARD_EXCHANGES,
                   help="ring backward: dK/dV travel with their block (ring) or go straight to the owner "
                        "(direct: least memory, traffic between non-neighbours)")
    p.add_argument("--dtype", default=t.dtype, choices=list(DTYPES))
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--ckpt-dir", help="checkpoint folder; an existing checkpoint there is resumed")
    p.add_argument("--ckpt-every", type=int, default=0, help="save every K steps (and always at the end)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore existing checkpoints")
    p.add_argument("--eval-lens", help="comma-separated context lengths for accuracy (default L/2,L,2L)")
    p.add_argument("--eval-samples", type=int, default=t.eval_samples, help="per length (0 = no eval)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--json", action="store_true", help="print a final JSON summary line")
    p.add_argument("--throttle", type=float, default=0.0, help=argparse.SUPPRESS)


def config_from_args(args) -> TrainConfig:
    """A validated TrainConfig from parsed arguments (ValueError names the bad option)."""
    for name in ("seq_len", "batch", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("steps", "warmup", "ckpt_every", "eval_samples", "ffn_chunk", "loss_chunk"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    strategies = ("ring", "allgather", "ulysses", "hybrid", "auto", "dense")
    if args.strategy not in strategies:
        raise ValueError(f"--strategy must be one of {strategies}, got {args.strategy!r}")
    try:
        model = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                            strategy=args.strategy, layout=args.layout, ffn_chunk=args.ffn_chunk,
                            checkpoint_layers=args.checkpoint_layers, backward_exchange=args.backward_exchange)
    except ValueError as e:
        raise ValueError(f"model: {e}") from None
    try:
        lens = tuple(int(x) for x in args.eval_lens.split(",")) if args.eval_lens else ()
    except ValueError:
        raise ValueError(f"--eval-lens must be comma-separated ints, got {args.eval_lens!r}") from None
    tc = TrainConfig(model=model, task=args.task, text_file=args.text_file, seq_len=args.seq_len,
                     batch=args.batch, steps=args.steps, lr=args.lr, warmup=args.warmup,
                     weight_decay=args.weight_decay, clip=args.clip, loss_chunk=args.loss_chunk, dp=args.dp,
                     ulysses=args.ulysses,
                     dtype=args.dtype, seed=args.seed, ckpt_dir=args.ckpt_dir, ckpt_every=args.ckpt_every,
                     resume=args.resume, eval_lens=lens, eval_samples=args.eval_samples,
                     progress=args.progress, json=args.json, throttle=args.throttle)
    task = make_task(tc.task, seed=tc.seed, text_file=tc.text_file)  # checks the task and the file
    for n in (tc.seq_len, *lens):
        if n < task.min_len:
            raise ValueError(f"task {tc.task!r} needs sequences of >= {task.min_len} tokens, got {n}")
    return tc


def run(args) -> int:
    tc = config_from_args(args)
    if launch.under_torchrun():
        launch.init_from_env(args.threads)
        try:
            _check_world(tc, dist.get_world_size())
            _worker(tc)
        finally:
            # Without it the process aborts at exit under torchrun (gloo's threads outlive the group).
            dist.destroy_process_group()
        return 0
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    _check_world(tc, args.nproc)
    if args.nproc == 1:
        torch.set_num_threads(args.threads)
        _worker(tc)
    else:
        launch.spawn(_worker, args.nproc, tc, threads=args.threads)
    return 0


def _check_world(tc: TrainConfig, world: int) -> None:
    if world % tc.dp:
        raise ValueError(f"--dp ({tc.dp}) must divide the number of ranks ({world})")
    if tc.batch % tc.dp:
        raise ValueError(f"--batch ({tc.batch}) must be a multiple of --dp ({tc.dp})")
    if (tc.model.strategy == "hybrid") != bool(tc.ulysses):
        raise ValueError("--strategy hybrid needs --ulysses U (and --ulysses needs --strategy hybrid)")
    if tc.ulysses and (world // tc.dp) % tc.ulysses:
        raise ValueError(f"--ulysses ({tc.ulysses}) must divide the context-parallel size ({world // tc.dp})")
    if tc.model.strategy == "dense" and world > 1:
        raise ValueError("--strategy dense runs in a single process only (--nproc 1)")

