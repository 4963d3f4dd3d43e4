"""A small LLaMA-style decoder whose attention is context parallel: the Blockwise Parallel Transformer.

Every rank holds ``local_len`` tokens of each sequence (which ones: ``cfg.layout``). Everything but
attention is per token, so it runs on the local tokens unchanged; attention goes through
``ringattn.attention`` (ring, all-gather, Ulysses, ...), and rotary embeddings use each token's
*global* position. The feed-forward runs over the local sequence in chunks of ``cfg.ffn_chunk`` tokens
and recomputes each chunk's 4x-wide intermediate in backward (blockwise FFN, Liu & Abbeel 2023), so a
layer's activation memory does not hold the FFN hidden of the whole local sequence.

Pieces are public so other code (generation with a KV cache) can drive the layers itself:

    model = build(cfg)
    h = model.embed(tokens)                           # (b, s, dim)
    rope = model.rope(positions, h.dtype)             # positions: global, (s,) int
    for layer in model.layers:
        h = layer(h, rope, attend)                    # attend(q, k, v) -> (b, s, heads, head_dim)
    logits = model.logits(h)                          # final norm + head

and inside a layer ``layer.attn.qkv(layer.attn_norm(h), rope)`` gives rotated q, k, v and
``layer.attn.proj(o)`` the output projection.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as ckpt
from torch import nn

from ... import comm
from ...layouts import effective_layout, global_positions, layout_of
from ...modes import BackwardExchange, Layout, Strategy
from ...validate import check_backward_exchange
from ..config import flag

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LlamaConfig:
    """Model shape and how attention / memory saving run."""

    vocab_size: int = 256  # byte-level tokens
    dim: int = field(default=128, metadata=flag("model width"))
    n_layers: int = field(default=2, metadata=flag("decoder layers", name="--layers"))
    n_heads: int = field(default=4, metadata=flag("query heads", name="--heads"))
    n_kv_heads: int = field(default=2, metadata=flag(  # grouped-query attention: n_heads % n_kv_heads == 0
        "key/value heads (grouped-query attention)", name="--kv-heads"))
    ffn_hidden: int | None = None  # None = 4 * dim (the "4x-wide" SwiGLU hidden)
    rope_theta: float = field(default=10000.0, metadata=flag(
        "rotary base (larger: slower-turning angles, for longer contexts)"))
    norm_eps: float = 1e-5
    # attention: any ringattn strategy ("ring", "allgather", "ulysses", "hybrid", "auto"), or "dense"
    # (materialised softmax(QK^T), single process only: the vanilla baseline of the paper's Table 3)
    strategy: str = field(default="ring", metadata=flag(
        "attention strategy ('dense': materialised scores, one process only)", choices=[*Strategy, "dense"]))
    layout: str = field(default="contiguous", metadata=flag(  # which global positions each rank holds
        "which global positions each rank holds", choices=Layout))
    # ring/hybrid/auto: "ring" (dK/dV travel with their block) or "direct" (backward streams each block
    # from its owner and returns dK/dV straight to it: least memory; see ringattn.ring_attention)
    backward_exchange: str = field(default="ring", metadata=flag(
        "ring backward: dK/dV travel with their block (ring) or go straight to the owner (direct: least "
        "memory, traffic between non-neighbours)", choices=BackwardExchange))
    ffn_chunk: int = field(default=0, metadata=flag(  # recomputed in backward; 0 = whole sequence
        "blockwise FFN chunk in tokens (0 = off)"))
    checkpoint_layers: bool = field(default=False, metadata=flag(  # activation checkpointing
        "recompute each layer in backward"))
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.dim
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = dim / n_heads must be even for rotary embeddings, got {self.head_dim}")
        if layout_of(self.layout).needs_documents:
            raise ValueError(f"layout={self.layout!r} places tokens by packed documents, which this model does not "
                             "take; use layout='zigzag' (the same balance for one sequence)")
        if not self.rope_theta > 1:
            raise ValueError(f"rope_theta must be > 1, got {self.rope_theta}")
        if self.ffn_chunk < 0:
            raise ValueError(f"ffn_chunk must be >= 0 (0 = off), got {self.ffn_chunk}")
        check_backward_exchange(self.backward_exchange, self.strategy)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in at least float32: half-precision mean of squares loses too much.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Rope:
    """(cos, sin), each ``(len(positions), head_dim // 2)``, for the given *global* positions.

    Angles are computed in float64: at position 1e6 a float32 angle is off by ~0.06 rad.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate ``x`` ``(b, s, heads, head_dim)``: pairs (i, i + head_dim/2), as in LLaMA / Hugging Face."""
    cos, sin = rope
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, seq_len: int | None = None,
                    group=None) -> torch.Tensor:
    """Vanilla causal attention that materialises the (s x s) scores: the baseline, single process."""
    if comm.group_rank_world(group)[1] != 1:
        raise ValueError("strategy='dense' runs in a single process only (world size 1)")
    s, h = q.shape[1], q.shape[2]
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    v = v.repeat_interleave(h // v.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    i = torch.arange(s, device=q.device)
    keep = (i[None, :] <= i[:, None]) & (i[None, :] < (s if seq_len is None else seq_len))
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def qkv(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q ``(b, s, heads, hd)``, rotated k and v ``(b, s, kv_heads, hd)`` of normed input x."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        return apply_rope(q, rope), apply_rope(k, rope), v

    def proj(self, o: torch.Tensor) -> torch.Tensor:
        """Output projection of the attention output ``(b, s, heads, hd)``."""
        return self.wo(o.flatten(2))

    def forward(self, x: torch.Tensor, rope: Rope, attend: Attend) -> torch.Tensor:
        return self.proj(attend(*self.qkv(x, rope)))


class FeedForward(nn.Module):
    """SwiGLU, optionally blockwise: chunks of ``chunk`` tokens, each chunk's hidden recomputed in backward."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.chunk = cfg.ffn_chunk
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)  # down

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.chunk or x.shape[1] <= self.chunk:
            return self.swiglu(x)
        if not torch.is_grad_enabled():
            return torch.cat([self.swiglu(c) for c in x.split(self.chunk, dim=1)], dim=1)
        # Only the chunk's input is saved; its (chunk x ffn_hidden) intermediates live one chunk at a
        # time, in forward and again in backward.
        return torch.cat([ckpt.checkpoint(self.swiglu, c, use_reentrant=False)
                          for c in x.split(self.chunk, dim=1)], dim=1)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: Rope, attend: Attend) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), rope, attend)
        return h + self.ffn(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 n_layers) (GPT-2)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, std=std)

    # -- pieces (used by forward, and by generation) --------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(tokens)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        return rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))

    def attend_fn(self, *, group=None, mesh=None, seq_len: int | None = None) -> Attend:
        """Causal attention over the sequence split across ``group`` in ``cfg.layout``."""
        if self.cfg.strategy == "dense":
            return functools.partial(dense_attention, seq_len=seq_len, group=group)
        from ... import attention

        kw = {"mesh": mesh} if mesh is not None else {}
        if self.cfg.backward_exchange != "ring":
            kw["backward_exchange"] = self.cfg.backward_exchange
        return functools.partial(attention, strategy=self.cfg.strategy, group=group, layout=self.cfg.layout,
                                 causal=True, seq_len=seq_len, **kw)

    def hidden(self, tokens: torch.Tensor, *, positions: torch.Tensor | None = None, group=None, mesh=None,
               seq_len: int | None = None, attend: Attend | None = None) -> torch.Tensor:
        """Last layer's output (before the final norm), ``(b, local_len, dim)``."""
        if positions is None and mesh is not None:  # hybrid strategy: positions follow the 2-D mesh
            from ...layouts import mesh_positions

            positions = mesh_positions(self.cfg.layout, mesh, tokens.shape[1], tokens.device)
        elif positions is None:
            rank, world = comm.group_rank_world(group)
            positions = global_positions(effective_layout(self.cfg.layout, world), rank, world,
                                         tokens.shape[1], tokens.device)
        h = self.embed(tokens)
        rope = self.rope(positions, h.dtype)
        attend = attend or self.attend_fn(group=group, mesh=mesh, seq_len=seq_len)
        for layer in self.layers:
            if self.cfg.checkpoint_layers and torch.is_grad_enabled():
                h = ckpt.checkpoint(layer, h, rope, attend, use_reentrant=False)
            else:
                h = layer(h, rope, attend)
        return h

    def forward(self, tokens: torch.Tensor, *, positions: torch.Tensor | None = None, group=None, mesh=None,
                seq_len: int | None = None, attend: Attend | None = None) -> torch.Tensor:
        """Logits ``(b, local_len, vocab)`` of this rank's tokens ``(b, local_len)``.

        ``group`` holds the sequence (split in ``cfg.layout``; None = default group, or one process);
        for ``strategy="hybrid"`` pass the 2-D ``mesh`` instead (split as ``ringattn.shard(.., mesh=)``);
        ``positions`` default to the layout's global positions; ``seq_len`` is the true global length
        (later positions are padding); ``attend`` replaces attention entirely (e.g. a KV cache).
        """
        h = self.hidden(tokens, positions=positions, group=group, mesh=mesh, seq_len=seq_len, attend=attend)
        return self.logits(h)


def build(cfg: LlamaConfig, *, seed: int | None = 0, dtype: torch.dtype = torch.float32,
          device: torch.device | str = "cpu") -> Llama:
    """A freshly initialised model; the same ``seed`` gives the same weights on every rank."""
    if seed is None:
        return Llama(cfg).to(dtype=dtype, device=device)
    # A private generator state: building the model must not disturb the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Llama(cfg)
    return model.to(dtype=dtype, device=device)
