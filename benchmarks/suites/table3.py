"""The paper's Table 3 in miniature: the longest sequence one training step fits in a memory budget.

For a small LLaMA-style model, one full training step (forward, backward, AdamW) at batch 1, fp32,
with: vanilla attention (materialised scores), memory-efficient (blockwise) attention, blockwise
attention + blockwise FFN (BPT), and ring attention (BPT on each rank) on 2 and 4 ranks. The loss is
blockwise in every configuration, so the columns differ only in attention and FFN.

Memory is measured, not modelled: every configuration runs in fresh processes (one per rank) with
glibc told to return freed memory (``MALLOC_MMAP_THRESHOLD_``, ``malloc_trim``); before each probe
the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), and the probe's cost is
``VmHWM - VmRSS before`` — everything the step allocates (activations, gradients, communication
buffers, optimizer temporaries), the maximum over ranks. The length is found by doubling and then
bisection; "fits" means that growth is within the per-rank budget.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import torch

from ringattn._measure import reset_peak_rss, rss_mb

from ..common import machine, pyplot, save_figure

GRANULE = 256  # lengths are multiples of GRANULE * world


def _configs(chunk: int) -> list[dict]:
    return [
        {"name": "vanilla", "nproc": 1, "strategy": "dense", "ffn_chunk": 0},
        {"name": "memory-efficient attn", "nproc": 1, "strategy": "ring", "ffn_chunk": 0},
        {"name": "BPT (blockwise attn + FFN)", "nproc": 1, "strategy": "ring", "ffn_chunk": chunk},
        {"name": "ring attention, 2 ranks", "nproc": 2, "strategy": "ring", "ffn_chunk": chunk},
        {"name": "ring attention, 4 ranks", "nproc": 4, "strategy": "ring", "ffn_chunk": chunk},
        # The same ring whose backward streams each block from its owner and returns dK/dV straight to
        # it (``backward_exchange="direct"``): no travelling gradients or whole block in flight. On 2 ranks
        # the two are the same exchange (every direction is one step long), so only 4 ranks are shown.
        {"name": "ring attention, 4 ranks, direct bwd", "nproc": 4, "strategy": "ring", "ffn_chunk": chunk,
         "backward_exchange": "direct"},
    ]


# -- inside a measuring process ---------------------------------------------------------------------
def _reset_peak() -> float:
    """Free what can be freed, reset the peak-RSS mark; returns the current RSS in MiB."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if not reset_peak_rss():
        raise RuntimeError("table3 needs Linux's /proc/self/clear_refs to reset the peak-RSS mark")
    return rss_mb()


def _measure(spec: dict) -> dict:
    """Run the length search for one configuration on this rank; the same result on every rank."""
    import torch.distributed as dist

    from ringattn.app.model import LlamaConfig, build
    from ringattn.app.model.loss import shard_batch
    from ringattn.app.train import Parallel, TrainConfig, make_optimizer, setup_parallel, train_step

    par = setup_parallel(1) if dist.is_initialized() else Parallel()
    cfg = LlamaConfig(dim=spec["dim"], n_layers=spec["layers"], n_heads=spec["heads"], n_kv_heads=spec["kv_heads"],
                      strategy=spec["strategy"], ffn_chunk=spec["ffn_chunk"],
                      backward_exchange=spec.get("backward_exchange", "ring"))
    tc = TrainConfig(model=cfg, batch=1, steps=10**6, warmup=1, loss_chunk=spec["chunk"])
    model = build(cfg, seed=0)
    opt = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(0)
    world = par.world

    def step(total: int) -> None:
        tokens = torch.randint(0, cfg.vocab_size, (1, total + 1), generator=gen)
        inputs, labels, s = shard_batch(tokens[:, :-1], tokens[:, 1:], group=par.cp_group)
        train_step(model, opt, (inputs, labels, s), par, tc, 1)

    def fits(total: int) -> tuple[bool, float, float]:
        base = _reset_peak()
        t0 = time.perf_counter()
        step(total)
        dt = time.perf_counter() - t0
        grow = torch.tensor([rss_mb("VmHWM") - base, dt], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(grow, op=dist.ReduceOp.MAX)
        return bool(grow[0] <= spec["budget_mb"]), float(grow[0]), float(grow[1])

    step(GRANULE * world)  # warm-up: optimizer state, allocator pools, communication buffers
    g = GRANULE * world
    probes, lo, hi = [], 0, None
    n = g
    while n <= spec["max_len"]:  # doubling
        ok, mb, dt = fits(n)
        probes.append({"len": n, "mb": round(mb, 1), "s": round(dt, 2), "fits": ok})
        if not ok:
            hi = n
            break
        lo, n = n, 2 * n
    for _ in range(spec["bisect"] if hi is not None and lo else 0):
        mid = (lo + hi) // 2 // g * g
        if mid in (lo, hi):
            break
        ok, mb, dt = fits(mid)
        probes.append({"len": mid, "mb": round(mb, 1), "s": round(dt, 2), "fits": ok})
        lo, hi = (mid, hi) if ok else (lo, mid)
    return {"max_len": lo, "first_fail": hi, "capped": hi is None, "probes": probes}


def _entry(specs: list[dict], out: str) -> None:
    """Measure configurations one after another (single-rank ones share a process; each probe resets
    the peak mark, and each configuration builds its model afresh); their results go to ``out``."""
    from ringattn import launch

    torch.set_num_threads(1)
    results = [launch.spawn_collect(_measure, s["nproc"], s) if s["nproc"] > 1 else _measure(s) for s in specs]
    pathlib.Path(out).write_text(json.dumps(results))


# -- the suite ------------------------------------------------------------------------------------
def _run_configs(specs: list[dict]) -> list[dict]:
    """Measure ``specs`` in a fresh Python process; returns their results in order."""
    with tempfile.TemporaryDirectory() as d:
        out = str(pathlib.Path(d) / "results.json")
        root = str(pathlib.Path(__file__).resolve().parents[2])  # the checkout holding benchmarks/
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        code = ("import json; from benchmarks.suites.table3 import _entry; "
                f"_entry(json.loads({json.dumps(specs)!r}), {out!r})")
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"table3 {[s['name'] for s in specs]} failed:\n{r.stderr[-3000:]}")
        return json.loads(pathlib.Path(out).read_text())


def run(out: pathlib.Path, quick: bool) -> dict:
    """Max sequence length per configuration within the per-rank budget; writes table3.png."""
    size = {"dim": 128, "layers": 1 if quick else 4, "heads": 4, "kv_heads": 2, "chunk": 256}
    budget = 16 if quick else 128
    search = {"budget_mb": budget, "max_len": 2**11 if quick else 2**17, "bisect": 0 if quick else 4}
    # --quick: one ring configuration, and one measuring process for all (each takes seconds to start).
    configs = [{**size, **search, **c} for c in _configs(size["chunk"])[:4 if quick else None]]
    batches = [configs] if quick else \
        [[c for c in configs if c["nproc"] == 1]] + [[c] for c in configs if c["nproc"] > 1]
    rows = []
    for batch in batches:
        t0 = time.perf_counter()
        for c, res in zip(batch, _run_configs(batch)):
            rows.append({**c, **res})
            print(f"  {c['name']:<36} max {res['max_len']:>7,} tokens{' (cap)' if res['capped'] else ''}",
                  flush=True)
        print(f"  [{time.perf_counter() - t0:.0f}s]", flush=True)
    bpt = next(r["max_len"] for r in rows if r["name"].startswith("BPT"))
    print(f"\nTable 3: max tokens for one training step, {budget} MiB per rank, "
          f"model dim {size['dim']} x {size['layers']} layers, fp32")
    print(f"  {'configuration':<36} {'max length':>11} {'x BPT':>6}")
    for r in rows:
        r["x_bpt"] = round(r["max_len"] / bpt, 2) if bpt else None
        print(f"  {r['name']:<36} {r['max_len']:>11,} {r['x_bpt'] if r['x_bpt'] is not None else '-':>6}")

    plot(rows, budget, out / "table3.png", machine())
    return {"machine": machine(), "budget_mb_per_rank": budget, "model": size, "search": search,
            "quick": quick, "rows": rows,
            "paper": {"8x A100 NVLink 7B (K tokens)": {"vanilla": 2, "mem-eff": 16, "BPT": 32, "ring": 256}}}


def plot(rows: list[dict], budget: float, path: pathlib.Path, mach: dict) -> None:
    """Bars of the max length per configuration (K tokens); BPT green, the ring rows red."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    names = [r["name"] for r in rows]
    vals = [r["max_len"] / 1024 for r in rows]
    colors = ["#55a868" if n.startswith("BPT") else "#c44e52" if r["nproc"] > 1 else "#4c72b0"
              for n, r in zip(names, rows)]
    bars = ax.barh(names[::-1], vals[::-1], color=colors[::-1])
    for b, r in zip(bars, rows[::-1]):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {r['max_len'] / 1024:.1f}K", va="center")
    ax.set_xlabel(f"max sequence length (K tokens) within {budget} MiB per rank")
    ax.set_title("One training step: vanilla vs blockwise vs ring (Table 3 in miniature)")
    ax.set_xlim(0, max(vals) * 1.2 if max(vals) else 1)
    save_figure(fig, path, mach)


def _pow2_max(row: dict) -> int:
    """The longest length that fit among the doubling probes only (the paper's power-of-two granularity)."""
    return max((p["len"] for p in row["probes"] if p["fits"] and p["len"] & (p["len"] - 1) == 0), default=0)


def summary(res: dict) -> str:
    m = res["model"]
    rows = res["rows"]
    bpt = next(r for r in rows if r["name"].startswith("BPT"))
    lines = [f"Budget {res['budget_mb_per_rank']} MiB of peak-memory growth per rank; model dim {m['dim']} x "
             f"{m['layers']} layers, {m['heads']} heads ({m['kv_heads']} kv), fp32, batch 1. Lengths found by "
             "doubling from 256 x ranks, then bisection to 1/16 of the last doubling.\n",
             "| configuration | max tokens | x BPT | max tokens, powers of two only | x BPT, powers of two |",
             "|---|---|---|---|---|"]
    p2_bpt = _pow2_max(bpt)
    for r in rows:
        p2 = _pow2_max(r)
        lines.append(f"| {r['name']} | {r['max_len']:,}{' (cap)' if r['capped'] else ''} | {r['x_bpt']} | "
                     f"{p2:,} | {round(p2 / p2_bpt, 2) if p2_bpt else '-'} |")
    # Per-rank peak of the ring at BPT's longest local length, where the ring's probes reached it.
    local = bpt["max_len"]
    bpt_mb = next((p["mb"] for p in bpt["probes"] if p["len"] == local), None)
    extra = []
    for r in rows:
        if r["nproc"] > 1:
            mb = next((p["mb"] for p in r["probes"] if p["len"] == local * r["nproc"]), None)
            if mb is not None and bpt_mb is not None:
                how = ", direct bwd" if r.get("backward_exchange") == "direct" else ""
                extra.append(f"{r['nproc']} ranks{how} {mb:.1f} MiB (+{mb - bpt_mb:.1f})")
    if extra:
        lines.append(f"\nPeak per rank at BPT's longest local length ({local:,} tokens per rank): BPT "
                     f"{bpt_mb:.1f} MiB, ring " + ", ".join(extra) + ". On 2 ranks the visiting block streams in "
                     "key tiles and the ring needs a few tiles more than one process at the same local length; "
                     "on more ranks, dK/dV travel with their block and the next block is in flight, about two "
                     "blocks more for the layer in backward, unless the backward exchange is direct (each block "
                     "streamed from its owner, dK/dV returned to it tile by tile: a few tiles at any world "
                     "size). The ring reaches N x BPT where that extra fits in what BPT leaves of the budget.")
    p = next(iter(res["paper"].items()))
    lines.append(f"\nThe paper, {p[0]}: " + ", ".join(f"{k} {v}" for k, v in p[1].items()) +
                 " (ring = devices x BPT; powers of two).")
    return "\n".join(lines) + "\n"
