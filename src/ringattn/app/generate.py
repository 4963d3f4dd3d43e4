"""Long-context generation with ringattn's LLaMA-style model: ring prefill, sharded KV-cache decoding.

Prefill: every rank runs the model on its shard of the prompt (``cfg.layout``), attention by
``cfg.strategy`` (ring by default), and keeps the keys/values it computed — the cache is born sharded
and no rank ever holds all of it. Decode: every rank runs the new token through the layers (the same
few matmuls on every rank), the token's key/value go to one rank (round robin by position, so the
shards stay balanced), and attention is a local partial over each rank's cache slice merged across
ranks (``ringattn.decode``): per token and layer one all-gather of ``heads * (head_dim + 1)`` numbers,
independent of the context length. Every rank ends each step with bit-identical logits, so greedy and
seeded sampling pick the same token everywhere without further communication.

Command line (``ringattn.cli.generate``)::

    ringattn generate --nproc 2 --prompt-len 8192 --max-new-tokens 32 --layout zigzag --check
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import comm, profiling
from ..decode import merge_partials, partial_attention
from ..layouts import effective_layout, global_positions, padded_len
from ..profiling import Stats
from ..sharding import shard
from ..validate import agree
from .config import flag

# -- sampling ------------------------------------------------------------------------------------


@dataclass
class SamplingConfig:
    """How the next token is picked: greedy, or sampled at ``temperature`` with top-k / top-p cuts.

    ``temperature=None`` (the default) is greedy, unless ``top_k`` or ``top_p`` is given: a cut only
    means something when sampling, so they sample at temperature 1.0. ``temperature=0`` (greedy) with
    a cut is refused rather than silently ignoring the cut.
    """

    temperature: float | None = field(default=None, metadata=flag(
        "sampling temperature (0 = greedy; default: greedy, or 1.0 when --top-k or --top-p is given)", type=float))
    top_k: int = field(default=0, metadata=flag("keep the k most likely tokens (0 = no cut); samples"))
    # nucleus: the smallest set of tokens with probability mass >= top_p
    top_p: float = field(default=1.0, metadata=flag("nucleus sampling mass (1 = off); samples"))
    # the same on every rank, so every rank draws the same token
    seed: int = field(default=0, metadata=flag("sampling (and random prompt) seed"))

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.temperature is None:
            self.temperature = 1.0 if self.cuts else 0.0
            return
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite float >= 0, got {self.temperature!r}")
        if self.temperature == 0 and self.cuts:
            raise ValueError(f"temperature 0 is greedy decoding, which ignores {' and '.join(self.cuts)}: give a "
                             "temperature > 0 to sample with them (or leave it out: they sample at 1.0), or drop "
                             "them for greedy decoding")

    @property
    def cuts(self) -> list[str]:
        """The top-k / top-p cuts given (by name), which only sampling uses."""
        return [f"top_k={self.top_k}"] * bool(self.top_k) + [f"top_p={self.top_p}"] * (self.top_p < 1)


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens ``(b,)`` from logits ``(b, vocab)``: greedy, or temperature / top-k / top-p sampling."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    x = logits.double() / cfg.temperature
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = x.topk(cfg.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1:
        srt, idx = x.sort(dim=-1, descending=True)
        p = srt.softmax(-1)
        # Keep a token if the mass strictly before it is < top_p (the top token always stays).
        drop = (p.cumsum(-1) - p) >= cfg.top_p
        x = x.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    probs = x.softmax(-1)
    # Draw on the CPU generator: the same seed gives the same token on every rank and device.
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


# -- the sharded cache ---------------------------------------------------------------------------


class ShardedKVCache:
    """This rank's slice of every layer's keys and values, with their global positions.

    Slots are filled in order; ``positions[i] = -1`` marks an empty slot or prompt padding (never
    attended to). Decoded token ``p`` lives on rank ``p % world``.
    """

    def __init__(self, n_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        # Heads first: decoding reads each head's keys as one contiguous (n, head_dim) matrix.
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.positions = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.positions.shape[0]

    def add_prompt(self, positions: torch.Tensor, seq_len: int) -> None:
        """Reserve slots for this rank's prompt shard; padding positions (>= seq_len) stay empty."""
        n = positions.shape[0]
        self.positions[:n] = torch.where(positions < seq_len, positions, torch.full_like(positions, -1))
        self.length = n

    def add_token(self, position: int) -> int:
        """Reserve the next slot for a decoded token; returns the slot."""
        if self.length >= self.capacity:
            raise RuntimeError(f"KV cache full ({self.capacity} slots on this rank)")
        self.positions[self.length] = position
        self.length += 1
        return self.length - 1

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` ``(b, n, kv_heads, d)`` in slots ``start .. start + n``."""
        self.k[layer][:, :, start:start + k.shape[1]] = k.transpose(1, 2)
        self.v[layer][:, :, start:start + v.shape[1]] = v.transpose(1, 2)

    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's ``k``, ``v`` ``(b, kv_heads, n, d)`` and positions ``(n,)`` of ``layer``."""
        n = self.length
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n], self.positions[:n]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


# -- generation ----------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    """Generated tokens and how long it took (on this rank)."""

    tokens: torch.Tensor  # (b, n_new)
    logits: torch.Tensor | None  # (b, n_new, vocab): the logits each token was drawn from
    prompt_len: int
    prefill_s: float
    decode_s: float  # the decode steps (every token after the first)
    decode_steps: int
    bytes_per_token: float  # sent by this rank per decode step (all layers)
    cache_slots: int  # this rank's cache length at the end
    stats: Stats = field(default_factory=Stats)
    step_s: list = field(default_factory=list)  # wall time of each decode step

    @property
    def median_tokens_per_s(self) -> float:
        """Decoded tokens per second from the median step time (robust to a busy machine)."""
        if not self.step_s:
            return float("nan")
        return self.tokens.shape[0] / statistics.median(self.step_s)

    @property
    def tokens_per_s(self) -> float:
        """Decoded tokens per second (batch included), decode steps only."""
        return self.tokens.shape[0] * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


def _check(model, prompt, max_new_tokens) -> None:
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype not in (
            torch.int32, torch.int64):
        raise ValueError(f"prompt must be an int tensor (batch, prompt_len), got "
                         f"{getattr(prompt, 'dtype', type(prompt).__name__)} "
                         f"{tuple(getattr(prompt, 'shape', ()))}")
    if prompt.shape[1] < 1 or prompt.shape[0] < 1:
        raise ValueError(f"prompt must hold at least one token per sequence, got shape {tuple(prompt.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    vocab = model.cfg.vocab_size
    if int(prompt.min()) < 0 or int(prompt.max()) >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab}), got [{int(prompt.min())}, "
                         f"{int(prompt.max())}]")


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, *, group=None,
             sampling: SamplingConfig | None = None, stop_token: int | None = None,
             return_logits: bool = False) -> GenerationResult:
    """Generate ``max_new_tokens`` after ``prompt`` with the KV cache sharded across ``group``.

    Args:
        model: a ``ringattn.app.model.Llama`` (same weights on every rank); its ``cfg.layout`` and
            ``cfg.strategy`` shard and attend the prompt.
        prompt: ``(batch, prompt_len)`` token ids, the full prompt, identical on every rank.
        max_new_tokens: how many tokens to generate (fewer if every sequence emits ``stop_token``).
        group: the process group holding the sequence (None = default group, or one process).
        sampling: ``SamplingConfig``; None = greedy.
        return_logits: keep the ``(batch, vocab)`` logits of every step (float32 or the model's dtype).

    Returns:
        ``GenerationResult`` with the same ``tokens`` on every rank, and timings.
    """
    sampling = sampling or SamplingConfig()
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    _agree_on_call(model, prompt, max_new_tokens, sampling, stop_token, group, device)
    _, world = comm.group_rank_world(group)
    cfg = model.cfg
    layout = effective_layout(cfg.layout, world)
    prompt = prompt.to(device=device, dtype=torch.long)
    b, plen = prompt.shape
    local = padded_len(plen, world, layout) // world
    cache = ShardedKVCache(cfg.n_layers, b, local + -(-max_new_tokens // world) + 1, cfg.n_kv_heads,
                           cfg.head_dim, dtype, device)
    t0 = time.perf_counter()
    logits = _prefill(model, cache, prompt, layout, local, group)
    prefill_s = time.perf_counter() - t0
    decoded = _decode(model, cache, logits, plen, max_new_tokens, sampling, stop_token, return_logits, group)
    return GenerationResult(prompt_len=plen, prefill_s=prefill_s, cache_slots=cache.length, **decoded)


def _agree_on_call(model, prompt, max_new_tokens, sampling: SamplingConfig, stop_token, group, device) -> None:
    """The arguments checked, and the same call on every rank, before any rank communicates."""
    error = None
    try:
        _check(model, prompt, max_new_tokens)
    except Exception as e:  # noqa: BLE001 - whatever it is, every rank must hear of it
        error = e
    desc = f"generate {tuple(getattr(prompt, 'shape', ()))} {max_new_tokens} {sampling} {stop_token}"
    agree(desc, error, group, device)


def _prefill_attend(cache: ShardedKVCache, layer: int, attend, q, k, v) -> torch.Tensor:
    cache.write(layer, 0, k, v)
    return attend(q, k, v)


def _prefill(model, cache: ShardedKVCache, prompt: torch.Tensor, layout: str, local: int, group) -> torch.Tensor:
    """Ring attention over the sharded prompt, each layer's local K/V written straight into the cache; returns
    the logits after the last prompt token, on every rank."""
    rank, world = comm.group_rank_world(group)
    plen = prompt.shape[1]
    positions = global_positions(layout, rank, world, local, prompt.device)
    cache.add_prompt(positions, plen)
    attend = model.attend_fn(group=group, seq_len=plen)
    h = model.embed(shard(prompt, group=group, layout=layout))
    rope = model.rope(positions, h.dtype)
    for i, layer in enumerate(model.layers):
        h = layer(h, rope, functools.partial(_prefill_attend, cache, i, attend))
    return model.logits(_last_prompt_token(h, positions, plen, group))[:, 0]


def _last_prompt_token(h: torch.Tensor, positions: torch.Tensor, plen: int, group) -> torch.Tensor:
    """The hidden state ``(b, 1, dim)`` of the last prompt token, which lives on one rank: an all-reduce with
    zeros elsewhere hands it to all."""
    last = torch.zeros(h.shape[0], 1, h.shape[-1], dtype=h.dtype, device=h.device)
    hit = (positions == plen - 1).nonzero()
    if len(hit):
        last.copy_(h[:, int(hit[0, 0])][:, None])
    if comm.group_rank_world(group)[1] > 1:
        try:
            dist.all_reduce(last, group=group)
        except RuntimeError as e:
            raise comm.PeerError(f"ringattn: generation could not share the last prompt token; a peer rank "
                                 f"probably died or timed out: {comm.first_line(e)}") from e
    return last


def _decode(model, cache: ShardedKVCache, logits: torch.Tensor, plen: int, max_new_tokens: int,
            sampling: SamplingConfig, stop_token: int | None, return_logits: bool, group) -> dict:
    """Sample, then decode one token at a time over the sharded cache, until ``max_new_tokens`` or every
    sequence emitted ``stop_token``; the ``GenerationResult`` fields this loop measures."""
    rank, world = comm.group_rank_world(group)
    gen = torch.Generator().manual_seed(sampling.seed)
    tokens, kept, step_s = [], [], []
    prev = profiling.active()
    t1 = time.perf_counter()
    with profiling.profile() as stats:
        for step in range(max_new_tokens):
            tok = sample(logits, sampling, gen)
            tokens.append(tok)
            if return_logits:
                kept.append(logits)
            done = stop_token is not None and bool((torch.stack(tokens, 1) == stop_token).any(1).all())
            if step == max_new_tokens - 1 or done:
                break
            ts = time.perf_counter()
            logits = _decode_step(model, cache, tok, plen + step, rank, world, group)
            step_s.append(time.perf_counter() - ts)
    if prev is not None:
        prev += stats
    decode_s = time.perf_counter() - t1
    steps = len(tokens) - 1
    return dict(tokens=torch.stack(tokens, 1), logits=torch.stack(kept, 1) if return_logits else None,
                decode_s=decode_s, decode_steps=steps, bytes_per_token=stats.bytes_sent / steps if steps else 0.0,
                stats=stats, step_s=step_s)


def _decode_attend(cache: ShardedKVCache, layer: int, slot: int, pos: torch.Tensor, group, q, k, v) -> torch.Tensor:
    if slot >= 0:
        cache.write(layer, slot, k, v)
    ck, cv, cpos = cache.view(layer)
    out, lse = partial_attention(q, ck, cv, pos, cpos, heads_first=True)
    return merge_partials(out, lse, group=group)[0].to(q.dtype)


def _decode_step(model, cache: ShardedKVCache, tok: torch.Tensor, position: int, rank: int, world: int,
                 group) -> torch.Tensor:
    """Run one token (every rank) at ``position``; its K/V join the cache of rank ``position % world``."""
    slot = cache.add_token(position) if position % world == rank else -1
    pos = torch.tensor([position], device=tok.device)
    h = model.embed(tok[:, None])
    rope = model.rope(pos, h.dtype)
    for i, layer in enumerate(model.layers):
        h = layer(h, rope, functools.partial(_decode_attend, cache, i, slot, pos, group))
    return model.logits(h)[:, 0]


__all__ = ["GenerationResult", "SamplingConfig", "ShardedKVCache", "generate", "sample"]
