"""Chunked prefill on the ring: the last ``Lq`` of ``S`` positions attend (bottom-right causal) to all keys.

``ring_attention(..., seq_len=S, q_seq_len=Lq)`` on 2 ranks x 1 thread, q and k sharded with the same
layout, vs. one process x 2 threads running torch SDPA with its own bottom-right mask
(``torch.nn.attention.bias.causal_lower_right``), forward + backward. ratio = single-process time / ring
time (slowest rank). Also: the FLOP balance over the ranks (max/mean), the largest difference of the
ring's output from SDPA's, and the single process's time for the whole square causal attention (what
recomputing the prefix's queries would cost).
"""

from __future__ import annotations

import pathlib
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringattn
from ringattn.training.launch import spawn_collect

from ..common import machine, pyplot, save_figure


def _inputs(S: int, Lq: int, heads: int, d: int):
    g = torch.Generator().manual_seed(Lq)
    k, v = (torch.randn(1, S, heads, d, generator=g) for _ in range(2))
    q, do = (torch.randn(1, Lq, heads, d, generator=g) for _ in range(2))
    return q, k, v, do


def _single(S: int, Lq: int, heads: int, d: int, reps: int) -> tuple[float, float, torch.Tensor]:
    """(best fwd+bwd time with the bottom-right mask, best time of square causal attention over all S
    queries, the bottom-right output) in one process with 2 threads."""
    from torch.nn.attention.bias import causal_lower_right

    torch.set_num_threads(2)
    q, k, v, do = (t.transpose(1, 2).contiguous() for t in _inputs(S, Lq, heads, d))
    qsq = torch.randn(1, heads, S, d)
    bias = causal_lower_right(Lq, S)
    best, square, out = float("inf"), float("inf"), None
    for i in range(reps + 1):  # one warm-up
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        t0 = time.perf_counter()
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=bias)
        o.backward(do)
        el = time.perf_counter() - t0
        qq, kk, vv = (t.clone().requires_grad_() for t in (qsq, k, v))
        t0 = time.perf_counter()
        F.scaled_dot_product_attention(qq, kk, vv, is_causal=True).sum().backward()
        el_sq = time.perf_counter() - t0
        if i:
            best, square = min(best, el), min(square, el_sq)
        out = o.detach().transpose(1, 2)
    return best, square, out


def _rank(S: int, runs: list[tuple[int, str]], heads: int, d: int, reps: int) -> list[dict]:
    recs = []
    for Lq, layout in runs:
        q, k, v, do = (ringattn.shard(t, layout=layout) for t in _inputs(S, Lq, heads, d))
        best, st_best, out = float("inf"), None, None
        for i in range(reps + 1):  # one warm-up
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            dist.barrier()
            with ringattn.profile() as st:
                t0 = time.perf_counter()
                o = ringattn.ring_attention(qq, kk, vv, causal=True, layout=layout, seq_len=S, q_seq_len=Lq)
                o.backward(do)
                el = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(el, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank is done
            if i and float(el) < best:
                best, st_best = float(el), st
            out = o.detach()
        flops = [None] * dist.get_world_size()
        dist.all_gather_object(flops, st_best.flops)
        recs.append({"q_len": Lq, "layout": layout, "ring_s": best, "flops_max_over_mean":
                     max(flops) / (sum(flops) / len(flops)), "wait_s": st_best.wait_s, "steps": st_best.steps,
                     "out": ringattn.unshard(out, layout=layout, seq_len=Lq)})
    return recs


def run(out: pathlib.Path, quick: bool) -> dict:
    heads, d = 8, 64
    S = 1024 if quick else 8192
    q_lens = [S // 4] if quick else [S // 16, S // 4, S // 2]
    layouts = ["contiguous", "zigzag"] if quick else ["contiguous", "zigzag", "striped"]
    reps = 1 if quick else 3
    runs = [(lq, lay) for lq in q_lens for lay in layouts]
    singles = {lq: _single(S, lq, heads, d, reps) for lq in q_lens}
    # One launch of the ranks for every run (a launch costs seconds); the single process is timed again
    # afterwards (not in --quick) and the best kept, so that drift in the machine's load hits both sides
    # alike.
    recs = spawn_collect(_rank, 2, S, runs, heads, d, reps)
    for lq in [] if quick else q_lens:
        again = _single(S, lq, heads, d, reps)
        singles[lq] = (min(singles[lq][0], again[0]), min(singles[lq][1], again[1]), singles[lq][2])
    rows = []
    for r in recs:
        single, square, ref = singles[r["q_len"]]
        row = {k: val for k, val in r.items() if k != "out"}
        row.update(single_s=single, single_square_s=square, ratio=single / r["ring_s"],
                   max_abs_diff=float((r["out"] - ref).abs().max()))
        rows.append(row)
        print(f"  S={S} Lq={r['q_len']:<5} {r['layout']:<10} single {single:6.3f}s  ring {r['ring_s']:6.3f}s  "
              f"ratio {row['ratio']:.3f}  flops max/mean {row['flops_max_over_mean']:.3f}  "
              f"square single {square:6.3f}s  |out - sdpa| {row['max_abs_diff']:.1e}", flush=True)
    res = {"machine": machine(), "seq_len": S, "heads": heads, "head_dim": d, "dtype": "float32", "ranks": 2,
           "timed_runs_per_side": reps, "rows": rows}
    _plot(res, out / "prefill.png")
    return res


def _plot(res: dict, path: pathlib.Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    q_lens = sorted({r["q_len"] for r in res["rows"]})
    layouts = list(dict.fromkeys(r["layout"] for r in res["rows"]))
    width = 0.8 / len(layouts)
    for j, lay in enumerate(layouts):
        ratios = [next(r["ratio"] for r in res["rows"] if r["q_len"] == lq and r["layout"] == lay) for lq in q_lens]
        ax.bar([i + j * width for i in range(len(q_lens))], ratios, width, label=lay)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([i + width * (len(layouts) - 1) / 2 for i in range(len(q_lens))], [f"Lq={lq}" for lq in q_lens])
    ax.set_ylabel("single-process time / ring time")
    ax.set_title(f"Bottom-right causal, S={res['seq_len']} keys, 2 ranks vs 1 process x 2 threads")
    ax.legend()
    save_figure(fig, path, res["machine"])


def summary(res: dict) -> str:
    lines = ["| queries Lq | layout | single (2 threads) s | ring (2 ranks) s | ratio | FLOPs max/mean | "
             "square causal, single s | max abs diff vs SDPA |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['q_len']} | {r['layout']} | {r['single_s']:.3f} | {r['ring_s']:.3f} | {r['ratio']:.3f} | "
                     f"{r['flops_max_over_mean']:.3f} | {r['single_square_s']:.3f} | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines) + (f"\n\nS = {res['seq_len']} keys, {res['heads']} heads x {res['head_dim']}, "
                               f"{res['dtype']}, causal, forward + backward, best of {res['timed_runs_per_side']} "
                               "per side.\n")
