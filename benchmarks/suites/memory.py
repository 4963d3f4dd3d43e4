"""Per-rank peak memory of attention forward + backward vs. sequence length (log scale).

Measured as peak-RSS growth of a fresh process (Linux ``clear_refs``), for: dense attention
(materialised scores, measured while it fits, then the S^2 formula), single-process blockwise
attention (torch's fused flash SDPA), and ring attention per rank on 2 and 4 ranks. 1 head x 64, fp32.
"""

from __future__ import annotations

import pathlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringattn
from ringattn.training.launch import spawn_collect

from ..common import machine, pyplot, reset_peak_rss, rss_mb, save_figure


def _rank(kind, S) -> float:
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, S, 1, 64, generator=g) for _ in range(4)]
    if kind == "ring":
        q, k, v, do = (ringattn.shard(t, layout="zigzag") for t in full)
    else:
        q, k, v, do = (t.transpose(1, 2).contiguous() for t in full)
    del full
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dist.barrier()
    base = rss_mb()
    reset_peak_rss()
    if kind == "ring":
        ringattn.ring_attention(q, k, v, causal=True, layout="zigzag").backward(do)
    elif kind == "blockwise":
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)
    else:  # dense: the textbook formula, S x S scores and probabilities kept for backward
        s = (q @ k.transpose(-1, -2)) / 8.0
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        (s.softmax(-1) @ v).backward(do)
    peak = torch.tensor([rss_mb("VmHWM") - base])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak)


def _ranks(kinds, S) -> list[float]:
    return [_rank(kind, S) for kind in kinds]


def measure(kind, nproc, S) -> float:
    return spawn_collect(_rank, nproc, kind, S)


def run(out: pathlib.Path, quick: bool) -> dict:
    lengths = [1024] if quick else [4096, 8192, 16384, 32768, 65536]  # one fresh process per point
    dense_max = 4096 if quick else 8192
    rows = []
    for S in lengths:
        row = {"seq_len": S, "dense_formula_mb": 3 * S * S * 4 / 2 ** 20}  # scores, probs, their grad
        if quick:
            # A smoke run: every launch costs seconds, so one process for both single-process kinds
            # (the second then starts from the first's allocator state) and no 4-rank ring.
            row["dense_mb"], row["blockwise_mb"] = spawn_collect(_ranks, 1, ["dense", "blockwise"], S)
        else:
            row["dense_mb"] = None if S > dense_max else measure("dense", 1, S)
            row["blockwise_mb"] = measure("blockwise", 1, S)
        row["ring2_mb"] = measure("ring", 2, S)
        row["ring4_mb"] = None if quick else measure("ring", 4, S)
        rows.append(row)
        print("  " + "  ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    res = {"machine": machine(), "heads": 1, "head_dim": 64, "causal": True, "rows": rows}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [r["seq_len"] for r in rows]
    ax.plot(xs, [r["dense_formula_mb"] for r in rows], ":", color="gray", label="dense (3 S^2 fp32, formula)")
    m = [r for r in rows if r["dense_mb"] is not None]
    ax.plot([r["seq_len"] for r in m], [r["dense_mb"] for r in m], "x-", label="dense (measured)")
    ax.plot(xs, [r["blockwise_mb"] for r in rows], "o-", label="blockwise, 1 process")
    ax.plot(xs, [r["ring2_mb"] for r in rows], "s-", label="ring, per rank (2 ranks)")
    r4 = [r for r in rows if r["ring4_mb"] is not None]
    ax.plot([r["seq_len"] for r in r4], [r["ring4_mb"] for r in r4], "^-", label="ring, per rank (4 ranks)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("peak memory growth, fwd+bwd (MiB)")
    ax.set_title("attention memory per process (1 head x 64, fp32, causal)")
    ax.legend(fontsize=8)
    save_figure(fig, out / "memory.png", res["machine"])
    return res


def summary(res: dict) -> str:
    lines = ["| S | dense formula MiB | dense measured MiB | blockwise 1 process MiB | ring per rank, 2 ranks | "
             "ring per rank, 4 ranks |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        d, r4 = (f"{r[k]:.0f}" if r[k] is not None else "—" for k in ("dense_mb", "ring4_mb"))
        lines.append(f"| {r['seq_len']} | {r['dense_formula_mb']:.0f} | {d} | {r['blockwise_mb']:.0f} | "
                     f"{r['ring2_mb']:.0f} | {r4} |")
    lines.append("\nPeak-RSS growth of a fresh process includes a fixed allocator/thread-pool overhead of a few "
                 "tens of MiB, visible at short lengths.")
    return "\n".join(lines) + "\n"
