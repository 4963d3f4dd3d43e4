"""``python -m benchmarks strategies``: measured time of each strategy vs. the planner's prediction.

On 2 and 4 local gloo ranks (one thread each), every strategy runs causal forward+backward on the
same zigzag-sharded problem; the planner predicts each from the kernel FLOP/s and gloo bandwidth
measured in the same run (what ``ringattn plan --measure`` measures). The ratio measured / predicted
and its error calibrate the model. Ranks share the machine's cores, which the measured hardware
accounts for (``shared_cores``).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time

from ringattn import plan
from ringattn.cli.plan import measure
from ringattn.training.launch import spawn_collect

from ..common import machine, pyplot, save_figure


def _job(cfg: dict) -> dict:
    import torch
    import torch.distributed as dist

    import ringattn

    world = dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    s, h, kvh, d = cfg["run_len"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    full = [torch.randn(1, s, n, d, generator=g) for n in (h, kvh, kvh)]
    dout_full = torch.randn(1, s, h, d, generator=g)
    results = {}
    for strat in cfg["strategies"][str(world)]:
        mesh = None
        if strat == "hybrid":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", tuple(cfg["mesh"]), mesh_dim_names=("ring", "ulysses"))
        q, k, v = (ringattn.shard(t, layout="zigzag", mesh=mesh).requires_grad_() for t in full)
        dout = ringattn.shard(dout_full, layout="zigzag", mesh=mesh)

        def step(q=q, k=k, v=v, dout=dout, strat=strat, mesh=mesh):
            out = ringattn.attention(q, k, v, strategy=strat, mesh=mesh, causal=True, layout="zigzag")
            out.backward(dout)

        step()
        best = (math.inf, math.inf)
        for _ in range(cfg["repeats"]):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.thread_time()
            step()
            # a call is as slow as its slowest rank; the main thread's CPU time shows what sharing cores added
            t = torch.tensor([time.perf_counter() - t0, time.thread_time() - c0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            best = min(best, (float(t[0]), float(t[1])))
        results[strat] = best
    return results


def run(out: pathlib.Path, quick: bool) -> dict:
    cfg = dict(seq_lens=(512,), heads=4, kv_heads=2, head_dim=32, repeats=1) if quick else \
        dict(seq_lens=(4096, 8192), heads=8, kv_heads=4, head_dim=64, repeats=3)
    cfg["mesh"] = (2, 2)
    cfg["strategies"] = {"2": ["ring", "allgather", "ulysses"], "4": ["ring", "allgather", "ulysses", "hybrid"]}
    print("measuring this machine (kernel FLOP/s, gloo bandwidth) ...", flush=True)
    hw = measure(threads=1)
    print(f"  {hw.flops / 1e9:.1f} GFLOP/s per thread, backward {hw.backward_time:.2f}x its forward, "
          f"{hw.bandwidth / 1e9:.2f} GB/s, "
          f"{hw.latency * 1e6:.0f} us latency, {hw.shared_cores} cores shared", flush=True)
    rows = []
    # --quick: one launch (seconds each), on 4 ranks, where every strategy runs.
    for seq_len in cfg["seq_lens"]:
        for world in (4,) if quick else (2, 4):
            measured = spawn_collect(_job, world, dict(cfg, run_len=seq_len))
            for strat, (t, cpu) in measured.items():
                p = plan.Problem(seq_len=seq_len, world=world, heads=cfg["heads"], kv_heads=cfg["kv_heads"],
                                 head_dim=cfg["head_dim"], dtype_bytes=4, causal=True, layout="zigzag",
                                 backward=True, mesh=tuple(cfg["mesh"]) if strat == "hybrid" else None)
                est = next(e for e in plan.estimate_all(p, hw) if e.strategy == strat)
                # CPU time against the compute the model predicts for one core per rank
                cores = 1.0 if hw.shared_cores is None else min(1.0, hw.shared_cores / world)
                rows.append({"seq_len": seq_len, "world": world, "strategy": strat, "measured_s": t,
                             "predicted_s": est.time_s, "ratio": t / est.time_s, "predicted_compute_s": est.compute_s,
                             "predicted_exposed_comm_s": est.exposed_s, "rank_cpu_s": cpu,
                             "cpu_ratio": cpu / (est.compute_s * cores)})
                print(f"  S={seq_len} W={world} {strat:<10} measured {t * 1e3:8.1f} ms  predicted "
                      f"{est.time_s * 1e3:8.1f} ms  ratio {t / est.time_s:.2f}  (rank CPU / compute "
                      f"{cpu / (est.compute_s * cores):.2f})", flush=True)
    errors = [abs(r["ratio"] - 1) for r in rows]
    _plot(out / "strategies.png", rows, cfg)
    ratios = [r["ratio"] for r in rows]
    return {
        "machine": machine(),
        "hardware": dataclasses.asdict(hw),
        "config": {k: v for k, v in cfg.items() if k != "strategies"},
        "results": rows,
        "mean_abs_prediction_error": sum(errors) / len(errors),
        "max_abs_prediction_error": max(errors),
        # A constant factor is calibration; the spread of the ratios is what the model gets wrong.
        "ratio_spread": max(ratios) / min(ratios),
        "note": "ratio = measured / predicted, fwd+bwd, causal zigzag fp32, one thread per rank; rank CPU = the "
                "slowest rank's main-thread CPU time, against the predicted compute at a whole core per rank",
    }


def _plot(path: pathlib.Path, rows: list[dict], cfg: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12, 4))
    labels = [f"{r['strategy']}\nW={r['world']} S={r.get('seq_len', cfg.get('seq_len'))}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["measured_s"] * 1e3 for r in rows], 0.4, label="measured")
    ax.bar([i + 0.2 for i in x], [r["predicted_s"] * 1e3 for r in rows], 0.4, label="planner")
    for i, r in enumerate(rows):
        ax.text(i, max(r["measured_s"], r["predicted_s"]) * 1e3, f"{r['ratio']:.2f}x", ha="center", va="bottom",
                fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("fwd+bwd time (ms)")
    ax.set_title(f"strategies vs. planner: h={cfg['heads']} kv={cfg['kv_heads']} "
                 f"d={cfg['head_dim']} causal zigzag fp32")
    ax.legend()
    save_figure(fig, path, machine())


def summary(res: dict) -> str:
    hw = res["hardware"]
    lines = [f"Hardware measured in the same run: {hw['flops'] / 1e9:.0f} GFLOP/s per rank (a backward "
             f"{hw.get('backward_time', 2.5):.2f}x its forward), "
             f"{hw['bandwidth'] / 1e9:.2f} GB/s, latency {hw['latency'] * 1e3:.2f} ms, copies "
             f"{(hw.get('copy_bandwidth') or 0) / 1e9:.2f} GB/s. {res.get('note', '')}.\n",
             "| tokens | ranks | strategy | measured ms | predicted ms | measured / predicted | rank CPU / predicted "
             "compute |", "|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        cpu = f"{r['cpu_ratio']:.2f}" if "cpu_ratio" in r else "-"
        lines.append(f"| {r.get('seq_len', res['config'].get('seq_len'))} | {r['world']} | {r['strategy']} | "
                     f"{r['measured_s'] * 1e3:.0f} | {r['predicted_s'] * 1e3:.0f} | {r['ratio']:.2f} | {cpu} |")
    lines.append(f"\nMean absolute prediction error {res['mean_abs_prediction_error']:.2f}, largest "
                 f"{res['max_abs_prediction_error']:.2f}.")
    return "\n".join(lines) + "\n"
