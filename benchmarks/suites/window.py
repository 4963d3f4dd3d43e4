"""Sliding window on the ring: steps and bytes per rank vs. full attention, and cost vs. length.

With the contiguous layout the ring stops after ceil(left / local_len) + 1 steps, so at a fixed
window the per-rank cost grows linearly with the sequence instead of quadratically.
"""

from __future__ import annotations

import pathlib
import time

import torch
import torch.distributed as dist

import ringattn
from ringattn.training.launch import spawn_collect

from ..common import machine, pyplot, save_figure


def _rank(runs, heads, d, causal) -> list[list[dict]]:
    """Per ``(S, window)`` run: every rank's time, steps, bytes, FLOPs and wait of its best fwd+bwd."""
    out = []
    for S, window in runs:
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (ringattn.shard(torch.randn(1, S, heads, d, generator=g)) for _ in range(4))
        out.append(_one(q, k, v, do, window, causal))
    return out


def _one(q, k, v, do, window, causal) -> list[dict]:
    best, st_best = float("inf"), None
    for _ in range(2):  # warm-up + measured
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        dist.barrier()
        with ringattn.profile() as st:
            t0 = time.perf_counter()
            ringattn.ring_attention(qq, kk, vv, causal=causal, window=window).backward(do)
            el = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(el, op=dist.ReduceOp.MAX)
        if float(el) < best or st_best is None:
            best, st_best = float(el), st
    recs = [None] * dist.get_world_size()
    dist.all_gather_object(recs, {"time_s": best, "steps": st_best.steps, "bytes_sent": st_best.bytes_sent,
                                  "flops": st_best.flops, "wait_s": st_best.wait_s})
    return recs


def measure(nproc, runs, heads, d, causal=True) -> list[list[dict]]:
    """All ``(S, window)`` runs in one launch of ``nproc`` ranks (a launch costs seconds)."""
    return spawn_collect(_rank, nproc, list(runs), heads, d, causal)


def run(out: pathlib.Path, quick: bool) -> dict:
    heads, d, left = 4, 64, 512
    res = {"machine": machine(), "heads": heads, "head_dim": d, "window": [left, -1], "layout": "contiguous"}
    # 1. Steps and bytes per rank, 4 ranks.
    S = 1024 if quick else 8192
    comp = {}
    named = (("full causal", None), (f"window ({left}, -1)", (left, -1)))
    for (name, _), recs in zip(named, measure(4, [(S, w) for _, w in named], heads, d)):
        comp[name] = {"steps_per_rank": recs[0]["steps"], "bytes_sent_per_rank": [r["bytes_sent"] for r in recs],
                      "time_s": recs[0]["time_s"]}
        print(f"  S={S} 4 ranks {name:<18} steps {recs[0]['steps']}  bytes/rank "
              f"{max(r['bytes_sent'] for r in recs) / 2**20:.1f} MiB  time {recs[0]['time_s']:.2f}s", flush=True)
    res["steps_and_bytes"] = {"seq_len": S, "ranks": 4, **comp}
    # 2. Time vs. length at a fixed window, 2 ranks, next to full causal attention.
    lengths = [512, 1024] if quick else [4096, 8192, 16384, 32768, 65536]
    full_max = 512 if quick else 16384
    runs = [(s, w) for s in lengths for w in ((left, -1), None) if w is not None or s <= full_max]
    times = {run: recs[0]["time_s"] for run, recs in zip(runs, measure(2, runs, heads, d))}
    curve = []
    for s in lengths:
        w, f = times[(s, (left, -1))], times.get((s, None))
        curve.append({"seq_len": s, "window_s": w, "full_causal_s": f})
        print(f"  S={s:6d} 2 ranks: window {w:.2f}s" + (f"  full causal {f:.2f}s" if f else ""), flush=True)
    res["time_vs_length"] = curve
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([c["seq_len"] for c in curve], [c["window_s"] for c in curve], "o-", label=f"window ({left}, -1)")
    full = [c for c in curve if c["full_causal_s"]]
    ax.plot([c["seq_len"] for c in full], [c["full_causal_s"] for c in full], "s--", label="full causal")
    s0, t0 = curve[0]["seq_len"], curve[0]["window_s"]
    ax.plot([c["seq_len"] for c in curve], [t0 * c["seq_len"] / s0 for c in curve], ":", color="gray",
            label="linear in S")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("fwd+bwd time, slowest rank (s)")
    ax.set_title("sliding-window ring attention, 2 ranks, contiguous, fp32")
    ax.legend()
    save_figure(fig, out / "window.png", res["machine"])
    return res


def summary(res: dict) -> str:
    sb = res["steps_and_bytes"]
    lines = [f"Steps and bytes sent per rank at S = {sb['seq_len']}, {sb['ranks']} ranks (contiguous, causal):\n",
             "| attention | ring steps | MiB sent per rank (max) | fwd+bwd s |", "|---|---|---|---|"]
    for name in (k for k in sb if k not in ("seq_len", "ranks")):
        r = sb[name]
        lines.append(f"| {name} | {r['steps_per_rank']} | {max(r['bytes_sent_per_rank']) / 2**20:.1f} | "
                     f"{r['time_s']:.2f} |")
    lines += ["\nTime vs. sequence length at a fixed window (2 ranks):\n",
              "| S | window s | full causal s |", "|---|---|---|"]
    for c in res["time_vs_length"]:
        f = f"{c['full_causal_s']:.2f}" if c["full_causal_s"] else "—"
        lines.append(f"| {c['seq_len']} | {c['window_s']:.2f} | {f} |")
    return "\n".join(lines) + "\n"
