"""Attention sinks, softcapping, chunked attention and ALiBi on the ring: cost relative to plain causal.

All variants run in one launch of 2 ranks (zigzag, fp32, forward + backward), alternating round by
round so that drift in machine load hits every variant alike; the best round of each is kept. What to
expect: sinks cost one merge per call (nothing per block); chunked attention skips every pair outside a
chunk, so it is cheaper than plain causal; ALiBi runs the fused op on position-carrying tiles with a
bias; softcap has no fused CPU kernel and runs on the tiled reference.
"""

from __future__ import annotations

import pathlib
import time

import torch
import torch.distributed as dist

import ringattn
from ringattn.training.launch import spawn_collect

from ..common import machine

VARIANTS = ["causal", "sinks", "chunked", "alibi", "softcap"]


def _options(name: str, heads: int, chunk: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"causal": {}, "sinks": {"sinks": torch.randn(heads, generator=g)}, "chunked": {"chunk_size": chunk},
            "alibi": {"alibi_slopes": torch.rand(heads, generator=g)}, "softcap": {"softcap": 30.0}}[name]


def _rank(S: int, heads: int, d: int, chunk: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (ringattn.shard(torch.randn(1, S, heads, d, generator=g), layout="zigzag") for _ in range(4))
    best = {n: float("inf") for n in VARIANTS}
    for r in range(rounds + 1):  # round 0 warms up every path
        for name in VARIANTS:
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            opts = _options(name, heads, chunk)
            dist.barrier()
            t0 = time.perf_counter()
            ringattn.ring_attention(qq, kk, vv, causal=True, layout="zigzag", **opts).backward(do)
            el = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(el, op=dist.ReduceOp.MAX)
            if r:
                best[name] = min(best[name], float(el))
    return best


def run(out: pathlib.Path, quick: bool) -> dict:
    S, heads, d = (1024, 4, 64) if quick else (8192, 8, 64)
    chunk, rounds = S // 8, 1 if quick else 2
    times = spawn_collect(_rank, 2, S, heads, d, chunk, rounds)
    base = times["causal"]
    res = {"machine": machine(), "seq_len": S, "ranks": 2, "heads": heads, "head_dim": d, "chunk_size": chunk,
           "layout": "zigzag", "dtype": "float32", "time_s": times,
           "relative_to_causal": {n: t / base for n, t in times.items()}}
    for n in VARIANTS:
        print(f"  {n:<8} {times[n]:.3f}s  x{times[n] / base:.2f} of causal", flush=True)
    return res


def summary(res: dict) -> str:
    lines = [f"Ring attention with each modification vs. plain causal: S = {res['seq_len']}, {res['ranks']} ranks, "
             f"{res['heads']} heads x {res['head_dim']}, zigzag, fp32, forward + backward, same run "
             f"(chunk_size = {res['chunk_size']}, softcap = 30):\n",
             "| variant | fwd+bwd s | relative to causal |", "|---|---|---|"]
    for n, t in res["time_s"].items():
        lines.append(f"| {n} | {t:.3f} | {res['relative_to_causal'][n]:.2f} |")
    return "\n".join(lines) + "\n"
