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
    torchrun --nproc-per-node 8 -m ringattn train --dp 2 ...

(the command line is ``ringattn.cli.train``; its flags are the ``flag`` fields of ``TrainConfig`` and
``LlamaConfig``; ``--recipe NAME`` presets them from ``RECIPES``). ``--curriculum`` runs stages of
(length, steps, batch) in order, short to long, in one run: one learning-rate schedule over all of them.

Order of one step: data (samples ``[samples, samples + batch)``, pure function of the index) → shard
→ forward/backward → all-reduce → clip → AdamW with the cosine-with-warmup learning rate of the step.
Checkpoints (``--ckpt-dir``, every ``--ckpt-every`` steps and at the end) restore everything
(``ringattn.training.checkpoint``); a run with an existing checkpoint resumes from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from .. import comm
from .._measure import peak_rss_mb
from ..modes import DTYPES
from ..training.batch import count_labels, shard_batch
from ..training.grads import sum_gradients
from .config import flag
from .data import KEY_DIGITS, TASKS, TrainTask, make_task
from .model import Llama, LlamaConfig, build
from .model.loss import sharded_loss


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated ints, got {text!r}") from None


def parse_curriculum(text: str) -> tuple[tuple[int, int, int], ...]:
    """``"LEN:STEPS:BATCH,..."`` (e.g. ``256:300:16,4096:100:1``) as ``((len, steps, batch), ...)``."""
    stages = []
    for part in text.split(","):
        try:
            n, steps, batch = (int(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"curriculum stages are LEN:STEPS:BATCH, comma-separated; got {part!r}") from None
        stages.append((n, steps, batch))
    return tuple(stages)


@dataclass
class TrainConfig:
    """One training run; validated on construction. Fields with ``flag`` are ``ringattn train``'s flags."""

    model: LlamaConfig = field(default_factory=LlamaConfig)
    task: str = field(default="passkey", metadata=flag("synthetic task, or byte-level text", choices=TASKS))
    text_file: str | None = field(default=None, metadata=flag("byte-level training text for --task text"))
    seq_len: int = field(default=256, metadata=flag("tokens per sequence"))
    batch: int = field(default=4, metadata=flag("global batch size in sequences (split over dp)"))
    steps: int = field(default=100, metadata=flag("optimisation steps"))
    lr: float = field(default=3e-3, metadata=flag("peak learning rate"))
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = field(default=10, metadata=flag("linear warm-up steps"))
    weight_decay: float = field(default=0.1, metadata=flag("AdamW weight decay (not on norms)"))
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = field(default=1.0, metadata=flag("global gradient-norm clip (0 = off)"))
    loss_chunk: int = field(default=0, metadata=flag("blockwise loss chunk in tokens (0 = off)"))
    dp: int = field(default=1, metadata=flag("data-parallel size; context parallel = ranks / dp"))
    ulysses: int = field(default=0, metadata=flag("hybrid strategy: Ulysses size (ring = cp / it)"))
    dtype: str = field(default="float32", metadata=flag("parameter and activation dtype", choices=DTYPES))
    seed: int = field(default=0, metadata=flag("model, data and RNG seed"))
    ckpt_dir: str | None = field(default=None, metadata=flag(
        "checkpoint folder; an existing checkpoint there is resumed"))
    ckpt_every: int = field(default=0, metadata=flag("save every K steps (and always at the end)"))
    resume: bool = field(default=True, metadata=flag("ignore existing checkpoints", name="--no-resume"))
    eval_lens: tuple[int, ...] = field(default=(), metadata=flag(
        "comma-separated context lengths for accuracy (default L/2,L,2L)", type=_ints))
    eval_samples: int = field(default=16, metadata=flag("held-out samples per length (0 = no eval)"))
    curriculum: tuple[tuple[int, int, int], ...] = field(default=(), metadata=flag(
        "short to long: stages LEN:STEPS:BATCH,... run in order; sets --seq-len (the last LEN) and --steps "
        "(their sum)", type=parse_curriculum))

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch", "dp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "warmup", "ckpt_every", "eval_samples", "loss_chunk", "ulysses"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.batch % self.dp:
            raise ValueError(f"batch ({self.batch}) must be a multiple of dp ({self.dp})")
        if (self.model.strategy == "hybrid") != bool(self.ulysses):
            raise ValueError("strategy 'hybrid' and ulysses U go together (--strategy hybrid --ulysses U)")
        self.eval_lens = tuple(self.eval_lens)
        self.curriculum = tuple(tuple(int(x) for x in st) for st in self.curriculum)
        for n, steps, batch in self.curriculum:
            if n < 1 or steps < 1 or batch < 1 or batch % self.dp:
                raise ValueError(f"curriculum stage {n}:{steps}:{batch}: length, steps and batch must be >= 1 "
                                 f"and the batch a multiple of dp ({self.dp})")
        if self.curriculum:
            self.seq_len, self.steps = self.curriculum[-1][0], sum(st[1] for st in self.curriculum)
        task = make_task(self.task, seed=self.seed, text_file=self.text_file)  # checks the task and the file
        for n in (self.seq_len, *self.eval_lens, *(st[0] for st in self.curriculum)):
            if n < task.min_len:
                raise ValueError(f"task {self.task!r} needs sequences of >= {task.min_len} tokens, got {n}")

    def stage(self, step: int) -> tuple[int, int]:
        """(seq_len, batch) of optimisation step ``step``: the curriculum's stage, else the run's."""
        end = 0
        for n, steps, batch in self.curriculum:
            end += steps
            if step < end:
                return n, batch
        return self.seq_len, self.batch

    def check_world(self, world: int) -> None:
        """The checks that need the number of ranks (before any rank starts)."""
        _check_mesh(self.dp, self.ulysses, world)
        if self.model.strategy == "dense" and world > 1:
            raise ValueError("strategy 'dense' runs in a single process only (--nproc 1)")


# Presets of ``ringattn train``'s flags (``--recipe NAME``), by flag destination. passkey-long: see
# docs/benchmarks.md ("passkey") for why each choice, and what it reached.
RECIPES: dict[str, dict] = {
    "passkey-long": {
        "nproc": 4, "task": "passkey-place", "layout": "zigzag", "dim": 64, "n_layers": 2, "n_heads": 4,
        "n_kv_heads": 2, "ffn_chunk": 256, "loss_chunk": 256, "lr": 3e-3, "warmup": 20, "rope_theta": 1e6,
        # The retrieval forms at 96 tokens, where 32 keys per step are cheap; each later stage teaches the
        # distances (up to its length) that the shorter ones never showed, which the model does not
        # extrapolate to.
        "curriculum": ((96, 600, 32), (512, 300, 8), (2048, 300, 4), (8192, 200, 2)),
        "eval_lens": (8192,), "eval_samples": 10, "ckpt_every": 100,
    },
}


class Progress(Protocol):
    """What ``train`` reports as it goes (every rank calls it; a printer shows rank 0's)."""

    def start(self, step: int, steps: int, resumed_from: pathlib.Path | None) -> None: ...

    def step(self, step: int, loss: float, grad_norm: float, tokens_per_s: float) -> None: ...

    def close(self) -> None: ...


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
    _check_mesh(dp, ulysses, world)
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


def _check_mesh(dp: int, ulysses: int, world: int) -> None:
    if dp < 1 or world % dp:
        raise ValueError(f"dp ({dp}) must divide the number of ranks ({world})")
    if ulysses and (world // dp) % ulysses:
        raise ValueError(f"ulysses ({ulysses}) must divide the context-parallel size ({world // dp})")


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


def local_batch(task: TrainTask, tc: TrainConfig, par: Parallel, samples: int, seq_len: int, n: int):
    """This rank's (inputs, labels, seq_len): its dp row's sequences, its cp shard of them."""
    per_dp = n // par.dp
    b = task.batch(samples + par.dp_rank * per_dp, per_dp, seq_len)
    inputs, labels, s = shard_batch(b.inputs, b.labels, layout=tc.model.layout, **par.seq)
    answer = shard_batch(b.inputs, b.answer.long(), layout=tc.model.layout, **par.seq)[1]
    return inputs.to(par.device), labels.to(par.device), s, answer.to(par.device) == 1


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
    total = sum_gradients(model, with_value=loss)  # the loss rides in the gradients' all-reduce
    if tc.clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip, foreach=False)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    optim.step()
    return float(total), float(norm)


HELD_OUT = 10**9  # evaluation samples come from a range of indices training never reaches

ACCURACY_MEANS = {
    False: "share of held-out samples whose every answer token (all key digits) is the model's argmax, "
           "teacher-forced on the true prefix: the same as greedy decoding producing the whole key",
    True: "share of answer tokens (one per query) that are the model's argmax, teacher-forced",
}


@dataclass
class Score:
    """What ``score`` measured on some held-out samples of a task at one length."""

    samples: int = 0  # samples with at least one answer token
    right: int = 0  # of those, samples with every answer token right
    tokens: int = 0  # answer tokens
    tokens_right: int = 0
    answer_loss: float = 0.0  # summed cross-entropy of the answer tokens (nats)

    def accuracy(self, per_token: bool) -> float | None:
        if per_token:
            return self.tokens_right / self.tokens if self.tokens else None
        return self.right / self.samples if self.samples else None

    def mean_answer_loss(self) -> float | None:
        return self.answer_loss / self.tokens if self.tokens else None


@torch.no_grad()
def score(model: Llama, task: TrainTask, par: Parallel, layout: str, seq_len: int, indices: range,
          depth: float | None = None) -> Score:
    """Greedy (argmax) predictions of the answer tokens of samples ``indices`` at ``seq_len``, scored.

    ``depth`` (passkey tasks) puts the needle at that fraction of the haystack. Samples are split over
    the dp rows; every rank returns the same ``Score``. Each prediction is the argmax at the position
    whose label is the answer token, with the true tokens before it as input (teacher forcing): every
    answer token of a sample is right exactly when greedy decoding from the question writes the answer.
    """
    idx = list(indices)
    stats = torch.zeros(len(idx), 3, dtype=torch.float64, device=par.device)  # answers, wrong, loss
    was_training = model.training
    model.eval()
    for j in range(par.dp_rank, len(idx), par.dp):
        b = task.batch(idx[j], 1, seq_len) if depth is None else task.at_depth(idx[j], 1, seq_len, depth)
        inputs, labels, s = shard_batch(b.inputs, b.labels, layout=layout, **par.seq)
        answer = shard_batch(b.inputs, b.answer.long(), layout=layout, **par.seq)[1] == 1
        logits = model(inputs.to(par.device), seq_len=s, **par.seq).float().cpu()
        pred = logits.argmax(-1)
        target = torch.where(answer, labels, torch.zeros_like(labels))
        nll = -torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]
        stats[j, 0] = answer.sum()
        stats[j, 1] = (answer & (pred != labels)).sum()
        stats[j, 2] = nll[answer].sum()
    model.train(was_training)
    if par.world > 1:
        dist.all_reduce(stats)  # each sample's row is filled by every cp rank of one dp row
    has = stats[:, 0] > 0
    return Score(samples=int(has.sum()), right=int((has & (stats[:, 1] == 0)).sum()),
                 tokens=int(stats[:, 0].sum()), tokens_right=int((stats[:, 0] - stats[:, 1]).sum()),
                 answer_loss=float(stats[:, 2].sum()))


def evaluate(model: Llama, task: TrainTask, tc: TrainConfig, par: Parallel, seq_len: int) -> float | None:
    """Task accuracy at ``seq_len`` on ``tc.eval_samples`` held-out samples (``ACCURACY_MEANS``).

    A passkey counts as right only if all its digits are; mqar counts per query. Samples are split
    over dp; every rank returns the same number.
    """
    if task.name == "text":
        return None
    return score(model, task, par, tc.model.layout, seq_len, range(HELD_OUT, HELD_OUT + tc.eval_samples)
                 ).accuracy(task.per_token)


def eval_hint(task: TrainTask, tc: TrainConfig, loss_first: float | None, loss_last: float | None,
              accuracy: dict, answer_loss: dict) -> str | None:
    """Why accuracy stays at 0 while the loss falls, when it does (None otherwise)."""
    accs = [a for a in accuracy.values() if a is not None]
    if task.per_token or not accs or max(accs) > 0 or loss_first is None or not loss_last < 0.5 * loss_first:
        return None
    digit = min(v for v in answer_loss.values() if v is not None)
    why = (f"the loss fell ({loss_first:.2f} -> {loss_last:.2f}) but no held-out key was retrieved: the mean "
           f"loss of the key's digits is {digit:.2f} nats (guessing: ln 10 = 2.30)")
    if task.name == "passkey":
        return (why + f". Task 'passkey' scores all {tc.seq_len} tokens and only the {KEY_DIGITS} after the question "
                "need the needle: the rest (the repeated filler sentence, the fixed words) the model learns to "
                "predict without looking back. Train with the loss on the key only, in a random haystack: "
                "--task passkey-place (or --recipe passkey-long)")
    if task.name == "passkey-random":
        return (why + ". Its ASCII digits are found only by the digits before them, which repeat within many keys; "
                "--task passkey-place gives each digit a token of its place, found at any distance (the recipe's "
                "task: --recipe passkey-long)")
    return why + ": retrieval has not formed yet; train longer, or short sequences first (--curriculum)"


def peak_mem_mb(par: Parallel) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, else peak resident set size."""
    if par.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def _max_over_ranks(x: float, par: Parallel) -> float:
    if par.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=par.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


# What a resumed run may change. Everything else (the model, the data, the dtype, the number of ranks and
# how the batch is split) must match: the saved state means nothing under another one.
# allowed, with a warning (a curriculum's stages set the steps, as --steps does without one)
RESUME_WARN = ("steps", "lr", "min_lr_ratio", "warmup", "weight_decay", "betas", "clip", "curriculum")
RESUME_FREE = ("ckpt_dir", "ckpt_every", "resume", "eval_lens", "eval_samples", "progress", "json", "throttle",
               "loss_chunk", "ulysses", "model.strategy", "model.layout", "model.backward_exchange",
               "model.ffn_chunk", "model.checkpoint_layers")  # how it runs: the same numbers up to rounding
# Another number of ranks or data-parallel rows also computes the same numbers up to rounding: the batch is
# global (split over the dp rows), parameters and optimizer state are whole on every rank (the checkpoint
# reshards on load), and training draws nothing from the ranks' RNGs. Allowed, with a warning.
RESHARD = ("dp",)


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
        (changed if key in RESUME_WARN + RESHARD else bad).append(change)
    errors = []
    if saved_world != world:
        changed.append(f"ranks {saved_world} -> {world} (resharded: the same numbers up to rounding)")
    if bad:
        errors.append("the run's configuration differs: " + ", ".join(bad) + ". To resume, these must stay as "
                      "they were; allowed are changes of "
                      + ", ".join(k.replace("_", "-") for k in RESUME_WARN + RESHARD)
                      + " (with a warning) and "
                      "of how the run executes (strategy, layout, backward-exchange, chunking, threads, "
                      "evaluation, checkpoint interval). Or start afresh with --no-resume (the old "
                      "checkpoints are moved aside) or another --ckpt-dir")
    return errors, (["changed settings (allowed): " + ", ".join(changed)] if changed else [])


def train(tc: TrainConfig, *, progress: Progress | None = None) -> dict:
    """Run training on the ranks of the default group (or one process); returns the summary.

    ``progress`` hears of the start (and the checkpoint resumed from) and of every step. ``tc.ckpt_dir`` is
    checked at once; ``ringattn train`` also locks it for the run (``checkpoint.DirLock``), which a program
    that runs ``train`` on one folder from several processes must do itself.
    """
    tc.check_world(comm.group_rank_world()[1])
    if tc.ckpt_dir:
        from ..training.checkpoint import check_dir

        check_dir(tc.ckpt_dir)  # before the first steps are computed, not at the first save
    par = setup_parallel(tc.dp, tc.ulysses)
    task = make_task(tc.task, seed=tc.seed, text_file=tc.text_file)
    # A seeded global RNG per rank (a fresh process's is random): runs repeat, and resume restores it.
    torch.manual_seed(tc.seed * 100_003 + par.rank)
    model = build(tc.model, seed=tc.seed, dtype=DTYPES[tc.dtype], device=par.device)
    optim = make_optimizer(model, tc)
    config = run_config(tc)
    start, samples, last = _resume(tc, model, optim, par, config)
    if progress is not None:
        progress.start(start, tc.steps, last)
    run = _run_steps(tc, task, model, optim, par, config, start, samples, progress)
    if progress is not None:
        progress.close()
    return _summary(tc, task, model, par, start, last, *run)


def _resume(tc: TrainConfig, model, optim, par: Parallel, config: dict) -> tuple[int, int, object]:
    """Where the run starts: ``(step, samples consumed, the checkpoint resumed from)``; without a resumable
    checkpoint in ``tc.ckpt_dir``, from the beginning (``--no-resume`` sets the folder's checkpoints aside)."""
    if not tc.ckpt_dir:
        return 0, 0, None
    from ..training import checkpoint  # torch.distributed.checkpoint takes half a second to import

    if not tc.resume:
        checkpoint.set_aside(tc.ckpt_dir)
        return 0, 0, None
    pos = checkpoint.resume(tc.ckpt_dir, model, optim,
                            compare=lambda saved, world: compare_config(saved, world, config, par.world))
    if pos is None:
        return 0, 0, None
    if pos["step"] > tc.steps:
        raise ValueError(f"the checkpoint in {tc.ckpt_dir} is at step {pos['step']}, past --steps {tc.steps}: "
                         "raise --steps to continue that run, or start afresh with --no-resume")
    return pos["step"], pos["samples"], pos["path"]


def _run_steps(tc: TrainConfig, task: TrainTask, model, optim, par: Parallel, config: dict, start: int,
               samples: int, progress: Progress | None) -> tuple[list, float, int]:
    """Steps ``start .. tc.steps``, saving checkpoints on the way; ``(losses, seconds in steps, tokens)``."""
    losses, t_train, tokens = [], 0.0, 0
    for step in range(start, tc.steps):
        t0 = time.perf_counter()
        seq_len, n_seq = tc.stage(step)
        batch = local_batch(task, tc, par, samples, seq_len, n_seq)
        loss, norm = train_step(model, optim, batch, par, tc, step)
        samples += n_seq
        dt = time.perf_counter() - t0
        t_train += dt
        tokens += n_seq * seq_len
        losses.append(loss)
        if not math.isfinite(loss):
            raise RuntimeError(f"loss is {loss} at step {step}: lower --lr or use float32")
        if progress is not None:
            progress.step(step, loss, norm, n_seq * seq_len / dt)
        done = step + 1
        if tc.ckpt_dir and ((tc.ckpt_every and done % tc.ckpt_every == 0) or done == tc.steps):
            from ..training import checkpoint

            checkpoint.save(tc.ckpt_dir, model, optim, step=done, samples=samples, config=config)
    return losses, t_train, tokens


def _summary(tc: TrainConfig, task: TrainTask, model, par: Parallel, start: int, last, losses: list,
             t_train: float, tokens: int) -> dict:
    """The run's summary: losses, held-out scores at each evaluation length, throughput and its shape."""
    lens = tc.eval_lens or tuple(sorted({max(task.min_len, tc.seq_len // 2), tc.seq_len, 2 * tc.seq_len}))
    held_out = range(HELD_OUT, HELD_OUT + tc.eval_samples)
    scores = {str(n): score(model, task, par, tc.model.layout, n, held_out) for n in lens} \
        if tc.eval_samples and task.name != "text" else {}
    accuracy = {k: sc.accuracy(task.per_token) for k, sc in scores.items()}
    answer_loss = {k: sc.mean_answer_loss() for k, sc in scores.items()}
    loss_first, loss_last = (losses[0], losses[-1]) if losses else (None, None)
    return {
        "loss_first": loss_first,
        "loss_last": loss_last,
        "eval_accuracy": accuracy,
        "eval_accuracy_means": ACCURACY_MEANS[task.per_token] if scores else None,
        "eval_answer_loss": answer_loss,
        "hint": eval_hint(task, tc, loss_first, loss_last, accuracy, answer_loss),
        "tokens_per_s": tokens / t_train if t_train else None,
        "peak_mem_mb_per_rank": _max_over_ranks(peak_mem_mb(par), par),
        "losses": [round(x, 5) for x in losses],  # per step of this run (from start_step)
        "steps": tc.steps, "start_step": start, "resumed_from": str(last) if last else None,
        "world": par.world, "dp": par.dp, "cp": par.cp,
        "task": tc.task, "seq_len": tc.seq_len, "batch": tc.batch,
        "strategy": tc.model.strategy, "layout": tc.model.layout, "backward_exchange": tc.model.backward_exchange,
        "dtype": tc.dtype,
    }
