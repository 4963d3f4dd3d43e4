"""``kv_heads_per_gather`` (allgather: K/V heads gathered per step) and its deprecated spelling ``kv_head_chunk``."""

from __future__ import annotations

import warnings

import pytest
import torch

import ringattn


def _qkv():
    g = torch.Generator().manual_seed(5)
    return tuple(torch.randn(1, 12, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))


def test_the_new_name_runs_and_the_old_one_warns():
    q, k, v = _qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = ringattn.attention(q, k, v, strategy="allgather", causal=True, kv_heads_per_gather=1)
    with pytest.warns(DeprecationWarning, match="kv_head_chunk= is renamed kv_heads_per_gather="):
        old = ringattn.attention(q, k, v, strategy="allgather", causal=True, kv_head_chunk=1)
    assert torch.equal(new, old)
    with pytest.raises(ValueError, match="pass kv_heads_per_gather= only"):
        ringattn.attention(q, k, v, strategy="allgather", kv_heads_per_gather=1, kv_head_chunk=1)
    with pytest.raises(ValueError, match="kv_heads_per_gather must be a positive int or None, got 0"):
        ringattn.attention(q, k, v, strategy="allgather", kv_heads_per_gather=0)
    with pytest.raises(ValueError, match="kv_heads_per_gather / kv_head_chunk is an allgather setting; "
                                         "strategy='ring'"):
        ringattn.ring_attention(q, k, v, kv_heads_per_gather=1)
