"""Ring efficiency: 2 ranks x 1 thread vs. one process x 2 threads running torch SDPA, same run.

ratio = single-process time / ring time (slowest rank), forward + backward. Per rank: compute time vs.
time blocked on communication, FLOPs executed (max/mean over ranks: the load balance of the layout),
and the peak memory growth of forward + backward at S = 32768.
"""

from __future__ import annotations

import pathlib
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringattn
from ringattn.training.launch import spawn_collect

from ..common import machine, pyplot, reset_peak_rss, rss_mb, save_figure

CONFIGS = [  # name, layout, causal
    ("non-causal contiguous", "contiguous", False),
    ("causal zigzag", "zigzag", True),
    ("causal striped", "striped", True),
    ("causal contiguous", "contiguous", True),
]


def _inputs(S, heads, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, S, heads, d, generator=g) for _ in range(4)]


def single_time(S: int, heads: int, d: int, causal: bool, repeats: int, threads: int = 2) -> float:
    torch.set_num_threads(threads)
    q, k, v, do = (t.transpose(1, 2).contiguous() for t in _inputs(S, heads, d))
    best = float("inf")
    for i in range(repeats + 1):  # one warm-up, as the ring ranks get
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        t0 = time.perf_counter()
        o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)
        o.backward(do)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def _ring_rank(S, heads, d, layout, causal, repeats, measure_memory=False, exchange="ring") -> list[dict]:
    q, k, v, do = (ringattn.shard(t, layout=layout) for t in _inputs(S, heads, d))
    best, st_best = float("inf"), None
    for i in range(repeats + (0 if measure_memory else 1)):  # one warm-up unless measuring memory
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        dist.barrier()
        if measure_memory:
            base = rss_mb()
            reset_peak_rss()
        with ringattn.profile() as st:
            t0 = time.perf_counter()
            out = ringattn.ring_attention(qq, kk, vv, causal=causal, layout=layout, backward_exchange=exchange)
            out.backward(do)
            el = time.perf_counter() - t0
        t = torch.tensor([el])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank is done
        if (i > 0 or measure_memory) and float(t) < best:
            best, st_best = float(t), st
    rec = {"time_s": best, "compute_s": st_best.compute_s, "wait_s": st_best.wait_s, "flops": st_best.flops,
           "bytes_sent": st_best.bytes_sent, "steps": st_best.steps}
    if measure_memory:
        rec["peak_growth_mb"] = rss_mb("VmHWM") - base
    recs = [None] * dist.get_world_size()
    dist.all_gather_object(recs, rec)
    return recs


def ring_run(S, heads, d, layout, causal, repeats, nproc=2, measure_memory=False, exchange="ring") -> list[dict]:
    return spawn_collect(_ring_rank, nproc, S, heads, d, layout, causal, repeats, measure_memory, exchange)


def run(out: pathlib.Path, quick: bool) -> dict:
    S = 512 if quick else 8192
    # Best of reps x 2 timed runs on each side, interleaved so that drift in machine load hits both alike:
    # on a machine shared with other work single runs vary by several percent, and the best is the stable
    # statistic.
    heads, d, reps = 8, 64, 1 if quick else 5
    res = {"machine": machine(), "seq_len": S, "heads": heads, "head_dim": d, "dtype": "float32", "configs": {},
           "timed_runs_per_side": 2 * reps}
    # --quick: a smoke run of every section, with as few rank launches (seconds each) as it can.
    configs = CONFIGS[:1] if quick else CONFIGS
    for name, layout, causal in configs:
        single, ring = float("inf"), None
        for _ in range(reps):
            single = min(single, single_time(S, heads, d, causal, 2))
            r = ring_run(S, heads, d, layout, causal, 2)
            if ring is None or r[0]["time_s"] < ring[0]["time_s"]:
                ring = r
        flops = [x["flops"] for x in ring]
        row = {"single_s": single, "ring_s": ring[0]["time_s"], "ratio": single / ring[0]["time_s"],
               "flops_max_over_mean": max(flops) / (sum(flops) / len(flops)),
               "per_rank": ring}
        res["configs"][name] = row
        print(f"  {name:<22} single {single:6.2f}s  ring {row['ring_s']:6.2f}s  ratio {row['ratio']:.3f}  "
              f"flops max/mean {row['flops_max_over_mean']:.3f}  "
              + "  ".join(f"r{i}: compute {x['compute_s']:.2f}s wait {x['wait_s']:.3f}s" for i, x in enumerate(ring)),
              flush=True)
    sweep = [S] if quick else [2048, 4096, 8192]
    res["sweep"] = {}
    for name, layout, causal in configs[:2]:
        pts = []
        for s in sweep:
            if s == S:
                pts.append((s, res["configs"][name]["ratio"]))
                continue
            single = single_time(s, heads, d, causal, 1)
            ring = ring_run(s, heads, d, layout, causal, 1)
            pts.append((s, single / ring[0]["time_s"]))
        res["sweep"][name] = pts
        print(f"  sweep {name}: " + ", ".join(f"S={s}: {r:.3f}" for s, r in pts), flush=True)
    # Efficiency vs. ranks: more ranks than cores share them, so the ideal ratio stays 1 (same total CPU).
    # On 4 ranks also with the direct backward exchange (on 2 ranks the two exchanges are the same).
    # Best of 3 per side: 4 ranks on 2 cores vary by +-10 % from run to run. --quick skips it (a launch of 4
    # ranks costs more than the rest of the quick run).
    res["ranks"], res["ranks_direct"] = {}, {}
    rank_reps = 1 if quick else 3
    for name, layout, causal in [] if quick else CONFIGS[:2]:
        single = single_time(S, heads, d, causal, rank_reps)
        pts = []
        for w in (2, 4):
            if w == 2:
                pts.append((w, res["configs"][name]["ratio"]))
                continue
            ring = ring_run(S, heads, d, layout, causal, rank_reps, nproc=w)
            pts.append((w, single / ring[0]["time_s"]))
        res["ranks"][name] = pts
        direct = ring_run(S, heads, d, layout, causal, rank_reps, nproc=4, exchange="direct")
        res["ranks_direct"][name] = [(4, single / direct[0]["time_s"])]
        print(f"  ranks {name}: " + ", ".join(f"W={w}: {r:.3f}" for w, r in pts) +
              f", W=4 direct backward: {res['ranks_direct'][name][0][1]:.3f}", flush=True)
    mem_S = 1024 if quick else 32768
    mem = ring_run(mem_S, 1, 64, "zigzag", True, 1, measure_memory=True)
    res["memory"] = {"seq_len": mem_S, "heads": 1, "head_dim": 64, "ranks": 2,
                     "peak_growth_mb_per_rank": [m["peak_growth_mb"] for m in mem],
                     "dense_scores_mb": mem_S ** 2 * 4 / 2 ** 20}
    print(f"  memory S={mem_S}: peak growth per rank {[round(m['peak_growth_mb']) for m in mem]} MiB "
          f"(dense scores {res['memory']['dense_scores_mb']:.0f} MiB)", flush=True)
    _plot(res, out / "ring.png")
    return res


def _plot(res: dict, path: pathlib.Path) -> None:
    plt = pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    names = list(res["configs"])
    ratios = [res["configs"][n]["ratio"] for n in names]
    a.bar(range(len(names)), ratios, color=["C0", "C1", "C2", "C3"])
    a.axhline(0.95, color="k", ls="--", lw=1, label="goal 0.95")
    a.set_xticks(range(len(names)), [n.replace(" ", "\n") for n in names], fontsize=8)
    a.set_ylabel("single-process time / ring time")
    a.set_title(f"2 ranks x 1 thread vs 1 process x 2 threads\nS={res['seq_len']}, fp32, fwd+bwd")
    a.legend()
    for n, pts in res["sweep"].items():
        b.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n)
    b.axhline(1.0, color="gray", lw=0.8)
    b.set_xscale("log", base=2)
    b.set_xlabel("sequence length")
    b.set_ylabel("ratio")
    b.set_title("ring efficiency vs sequence length (2 ranks)")
    b.legend()
    for i, (n, pts) in enumerate(res.get("ranks", {}).items()):
        c.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n, color=f"C{i}")
        for w, r in res.get("ranks_direct", {}).get(n, []):
            c.plot([w], [r], marker="x", ls="", color=f"C{i}", label=f"{n}, direct backward")
    c.axhline(1.0, color="gray", lw=0.8)
    c.set_xticks([2, 4])
    c.set_xlabel(f"ranks (one thread each, on {res['machine']['cpu_count']} cores)")
    c.set_ylabel("ratio")
    c.set_title(f"ring efficiency vs ranks, S={res['seq_len']}")
    if res.get("ranks"):
        c.legend()
    save_figure(fig, path, res["machine"])


def summary(res: dict) -> str:
    lines = ["| configuration | single (2 threads) s | ring (2 ranks) s | ratio | FLOPs max/mean | "
             "compute s per rank | blocked on comm s per rank |", "|---|---|---|---|---|---|---|"]
    for name, r in res["configs"].items():
        comp = ", ".join(f"{x['compute_s']:.2f}" for x in r["per_rank"])
        wait = ", ".join(f"{x['wait_s']:.3f}" for x in r["per_rank"])
        lines.append(f"| {name} | {r['single_s']:.2f} | {r['ring_s']:.2f} | {r['ratio']:.3f} | "
                     f"{r['flops_max_over_mean']:.3f} | {comp} | {wait} |")
    m = res["memory"]
    lines.append(f"\nS = {res['seq_len']}, {res['heads']} heads x {res['head_dim']}, {res['dtype']}, "
                 "forward + backward. Goals: ratio >= 0.95 for non-causal contiguous and causal zigzag; "
                 "FLOPs max/mean 1.00 for zigzag and striped causal.")
    lines.append(f"\nPeak memory growth of forward + backward at S = {m['seq_len']} ({m['heads']} head x "
                 f"{m['head_dim']}, {m['ranks']} ranks, causal zigzag): "
                 f"{', '.join(f'{x:.0f}' for x in m['peak_growth_mb_per_rank'])} MiB per rank "
                 f"(goal <= 128 MiB; dense scores would be {m['dense_scores_mb']:.0f} MiB).")
    if res.get("ranks"):  # --quick runs no 4-rank section
        lines.append("\nRatio vs. ranks (more ranks than cores share them): " + "; ".join(
            f"{n}: " + ", ".join(f"W={w} {r:.2f}" for w, r in pts) +
            "".join(f", W={w} direct backward {r:.2f}" for w, r in res.get("ranks_direct", {}).get(n, []))
            for n, pts in res["ranks"].items()))
    lines.append("\nRatio vs. sequence length: " + "; ".join(
        f"{n}: " + ", ".join(f"S={s} {r:.2f}" for s, r in pts) for n, pts in res["sweep"].items()))
    return "\n".join(lines) + "\n"
