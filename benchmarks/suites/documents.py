"""Packed documents on one rank: ``ring_attention`` with ``cu_seqlens`` vs. the fused op once per document.

The ideal is one ``scaled_dot_product_attention(is_causal=True)`` call per document (no mask, no work
across documents); ``ring_attention`` plans one kernel call per document piece (see ``ringattn/tasks.py``)
and adds its argument checks, planning and logsumexp accumulator. Forward + backward, thread CPU time,
interleaved repetitions, best of each (other load only ever adds time). Goal: ratio ideal / ours >= 0.85.
"""

from __future__ import annotations

import pathlib
import time

import torch
import torch.nn.functional as F

import ringattn

from ..common import machine, pyplot, save_figure

GOAL = 0.85


def _best_interleaved(fns: dict, reps: int) -> dict:
    for fn in fns.values():  # warm-up
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.thread_time()
            fn()
            best[name] = min(best[name], time.thread_time() - t0)
    return best


def _case(S: int, docs: int, dtype: torch.dtype, heads: int, d: int, reps: int) -> dict:
    g = torch.Generator().manual_seed(docs)
    cuts = sorted(torch.randperm(S - 1, generator=g)[: docs - 1].add(1).tolist())
    bounds = [0, *cuts, S]
    q, k, v, do = (torch.randn(1, S, heads, d, generator=g).to(dtype) for _ in range(4))
    cu = torch.tensor(bounds)

    def ours():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        ringattn.ring_attention(qq, kk, vv, causal=True, cu_seqlens=cu).backward(do)

    # The op's own (batch, heads, n, d) storage, made once outside the timing: its best case.
    qt, kt, vt, dot = (t.transpose(1, 2).contiguous() for t in (q, k, v, do))

    def ideal():
        qq, kk, vv = (t.detach().requires_grad_() for t in (qt, kt, vt))
        for a, b in zip(bounds, bounds[1:]):
            F.scaled_dot_product_attention(qq[:, :, a:b], kk[:, :, a:b], vv[:, :, a:b], is_causal=True).backward(
                dot[:, :, a:b])

    best = _best_interleaved({"ours": ours, "ideal": ideal}, reps)
    return {"seq_len": S, "documents": docs, "dtype": str(dtype).removeprefix("torch."),
            "ours_s": best["ours"], "ideal_s": best["ideal"], "ratio": best["ideal"] / best["ours"]}


def run(out: pathlib.Path, quick: bool) -> dict:
    torch.set_num_threads(1)  # what one rank of a ring gets
    heads, d = 8, 64
    S = 512 if quick else 8192
    reps = 1 if quick else 5
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for docs in (4, 8, 16):
            r = _case(S, docs, dtype, heads, d, reps)
            rows.append(r)
            print(f"  S={S} {r['dtype']:<8} {docs:2d} documents: ours {r['ours_s']:.3f}s  per-document op "
                  f"{r['ideal_s']:.3f}s  ratio {r['ratio']:.2f} (goal >= {GOAL})", flush=True)
    res = {"machine": machine(), "heads": heads, "head_dim": d, "goal_ratio": GOAL, "rows": rows,
           "goal_met": all(r["ratio"] >= GOAL for r in rows)}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for dt in ("float32", "bfloat16"):
        sel = [r for r in rows if r["dtype"] == dt]
        ax.plot([r["documents"] for r in sel], [r["ratio"] for r in sel], "o-", label=dt)
    ax.axhline(GOAL, color="gray", ls="--", label=f"goal {GOAL}")
    ax.set_xlabel("packed documents")
    ax.set_ylabel("per-document op time / ring_attention time")
    ax.set_title(f"Packed documents, one rank, S={S}, fwd+bwd")
    ax.legend()
    save_figure(fig, out / "documents.png", res["machine"])
    return res


def summary(result: dict) -> str:
    lines = ["| dtype | documents | ring_attention s | per-document op s | ratio (goal >= "
             f"{result['goal_ratio']}) |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['dtype']} | {r['documents']} | {r['ours_s']:.3f} | {r['ideal_s']:.3f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + f"\n\nGoal met: **{result['goal_met']}** (S={result['rows'][0]['seq_len']}, " \
        f"{result['heads']} heads x {result['head_dim']}, causal, one thread, best of the interleaved runs). " \
        "In bfloat16 the per-document op is slow in its own backward (CPUs without native bf16); ringattn " \
        "runs that backward on float32 copies of each tile (kernels/cpu.py).\n"
