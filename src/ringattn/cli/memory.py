"""Will a run fit? A length a rank's memory cannot hold is refused before anything is allocated.

The estimates are of what a rank certainly holds (the token ids of its sequences, the activations its
layers keep for backward, the KV cache), a little under what ``ringattn train`` measures (24 KB per token
per rank for the default model in float32: 2 layers of width 128), so a refusal is never a false one.
Memory available: ``MemAvailable`` of ``/proc/meminfo`` shared by the local ranks on CPU, the device's
free memory (``torch.cuda.mem_get_info``) on GPU. ``RINGATTN_SKIP_MEMORY_CHECK=1`` runs anyway.
"""

from __future__ import annotations

import os

import torch

from ..modes import DTYPES

# A long step: above this many tokens per rank, the first step is announced (it takes minutes on CPU).
LONG_TOKENS = 1 << 18
BASE = 256 << 20  # a CPU rank's own process before any tensor: the interpreter, torch, gloo


def human(n: float) -> str:
    for unit, f in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{n:.0f} bytes"


def available(local_ranks: int, cuda: bool) -> tuple[float | None, str]:
    """(bytes one rank may use, where that figure comes from); None when it cannot be told."""
    if cuda and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")))
        return float(free), "free on this rank's GPU (torch.cuda.mem_get_info)"
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: line.split()[1] for line in f}
        total = float(info["MemAvailable"]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None, "unknown"
    share = f", shared by {local_ranks} local ranks" if local_ranks > 1 else ""
    return total / local_ranks, f"MemAvailable of this machine{share}"


def train_bytes(tc, world: int) -> tuple[float, int]:
    """(bytes per rank, tokens per rank) of the longest step of training run ``tc`` on ``world`` ranks."""
    m = tc.model
    dtype = DTYPES[tc.dtype].itemsize
    stages = [(n, b) for n, _, b in tc.curriculum] or [(tc.seq_len, tc.batch)]
    cp = world // tc.dp
    worst, worst_tokens = 0.0, 0
    for seq_len, batch in stages:
        per_dp = batch // tc.dp
        local = per_dp * -(-seq_len // cp)
        # token ids (inputs, labels, answer mask) of the whole sequences, on every rank of the dp row
        ids = 3 * 8 * per_dp * seq_len
        # kept for backward per token and layer: norms, q/k/v, attention output and lse, residuals, ...
        layers = local * m.n_layers * 16 * m.dim * dtype
        logits = local * (2 * m.vocab_size * dtype + m.vocab_size * 4) if not tc.loss_chunk else 0
        need = ids + layers + logits
        if need > worst:
            worst, worst_tokens = need, local
    return worst, worst_tokens


def generate_bytes(model, prompt_len: int, batch: int, new_tokens: int, dtype: str, world: int) -> tuple[float, int]:
    """(bytes per rank, prompt tokens per rank) of ``ringattn generate``: the cache and the prefill."""
    size = DTYPES[dtype].itemsize
    local = -(-prompt_len // world) + -(-new_tokens // world)
    cache = 2 * model.n_layers * batch * local * model.n_kv_heads * (model.dim // model.n_heads) * size
    prefill = 4 * batch * local * model.dim * size
    return 8 * batch * prompt_len + cache + prefill, local


def demo_bytes(cfg) -> float:
    """Bytes per rank of ``ringattn demo``: every rank makes the whole q, k, v and output gradient."""
    whole = cfg.seq_len * (2 * cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim * 4
    return whole + 3 * whole / cfg.nproc


def check(command: str, what: str, need: float, ranks: int, local_ranks: int, cuda: bool = False) -> None:
    """Refuse (``ValueError``: exit 2) a run whose ranks need more memory than each has, with the estimate
    and the ways out."""
    if os.environ.get("RINGATTN_SKIP_MEMORY_CHECK") == "1":
        return
    have, where = available(local_ranks, cuda)
    need += 0 if cuda else BASE
    if have is None or need <= have:
        return
    raise ValueError(
        f"{what} needs about {human(need)} per rank on {ranks} rank(s) (an estimate, before anything is "
        f"allocated), but a rank has {human(have)} ({where}). Split the sequence over more ranks (--nproc N "
        f"here, or torchrun over more machines: each rank holds 1/N of it; `ringattn plan` shows the "
        f"attention's memory per strategy), or shorten it; RINGATTN_SKIP_MEMORY_CHECK=1 runs {command} anyway")
