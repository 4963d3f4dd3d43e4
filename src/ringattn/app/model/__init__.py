"""The Blockwise Parallel Transformer: a LLaMA-style decoder with context-parallel attention.

``build(cfg)`` makes a model from a ``LlamaConfig``; ``loss.sharded_loss`` is the next-token loss over a
sequence split across ranks.
"""

from __future__ import annotations

from .llama import Attention, Block, FeedForward, Llama, LlamaConfig, RMSNorm, apply_rope, build, rope_tables

__all__ = ["Attention", "Block", "FeedForward", "Llama", "LlamaConfig", "RMSNorm", "apply_rope", "build",
           "rope_tables"]
