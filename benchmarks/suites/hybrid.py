"""A whole hybrid model's training step, context-parallel: W ranks x 1 thread vs 1 process x 2 threads.

The model is Granite-4.0-H's architecture (transformers' ``GraniteMoeHybridForCausalLM``: Mamba2 layers with
their short convolutions, and one attention layer in four), float32, random weights, the same on every rank. One
step = forward over the sequence, the causal-LM loss (``ringattn.hf.causal_lm_loss``), backward, and on the ranks
the gradient sum (``ringattn.hf.sync_gradients``), as a training loop runs it. The one process runs the same model
with ``sdpa`` over the whole sequence; the ranks run it after ``ringattn.hf.prepare`` with ``"ring"`` attention,
zigzag. ratio = single-process time / slowest rank's time (best of the timed steps on each side). The loss of each
side is reported too (they agree to float32 rounding; the exactness itself is tested in float64 in
tests/test_hf_mixers.py).
"""

from __future__ import annotations

import pathlib
import time

import torch
import torch.distributed as dist

from ..common import machine, pyplot, save_figure

GOAL = 0.85
SIZE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, shared_intermediate_size=512,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, num_local_experts=0,
            mamba_n_heads=8, mamba_d_head=64, mamba_d_state=64, mamba_n_groups=1, mamba_chunk_size=256)
TINY = dict(SIZE, hidden_size=32, intermediate_size=64, shared_intermediate_size=64, num_attention_heads=2,
            num_key_value_heads=2, mamba_n_heads=2, mamba_d_head=32, mamba_d_state=8, mamba_chunk_size=32)


def build(size: dict, attn: str):
    from transformers import AutoModelForCausalLM, GraniteMoeHybridConfig

    cfg = GraniteMoeHybridConfig(**size, layer_types=["mamba", "mamba", "mamba", "attention"],
                                 position_embedding_type="rope", use_cache=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)


def tokens(S: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, S), generator=torch.Generator().manual_seed(1))


def _single(S: int, size: dict, reps: int) -> dict:
    from ringattn import hf

    torch.set_num_threads(2)
    model = build(size, "sdpa").train()
    ids = tokens(S, size["vocab_size"])
    best, loss = float("inf"), None
    for i in range(reps + 1):  # one warm-up
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits
        labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
        out = hf.causal_lm_loss(logits, labels, torch.tensor(S - 1))
        out.backward()
        el = time.perf_counter() - t0
        if i:
            best = min(best, el)
        loss = float(out.detach())
    return {"time_s": best, "loss": loss}


def _rank(S: int, size: dict, reps: int, layout: str) -> dict:
    from ringattn import hf

    torch.set_num_threads(1)
    hf.register(layout=layout)
    model = hf.prepare(build(size, "ring").train())
    sb = hf.shard_batch(tokens(S, size["vocab_size"]), layout=layout)
    best, loss = float("inf"), None
    for i in range(reps + 1):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        t0 = time.perf_counter()
        logits = model(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False).logits
        out = hf.causal_lm_loss(logits, sb["shift_labels"], sb["num_items_in_batch"])
        out.backward()
        hf.sync_gradients(model)
        el = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(el, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank is done
        if i:
            best = min(best, float(el))
        loss = float(out.detach())
    return {"time_s": best, "loss": loss}


def run(out: pathlib.Path, quick: bool, lengths=None, worlds=None, reps: int | None = None,
        size: dict | None = None) -> dict:
    from ringattn.training.launch import spawn_collect

    size = size or (TINY if quick else SIZE)
    lengths = lengths or ([1024] if quick else [8192, 16384])
    worlds = worlds or ([2] if quick else [2, 4])
    reps = reps or (1 if quick else 2)
    layout = "zigzag"
    rows = []
    for S in lengths:
        single = _single(S, size, reps)
        for w in worlds:
            ranks = spawn_collect(_rank, w, S, size, reps, layout)  # rank 0's: times already the slowest rank's
            if not quick:  # again after the ranks, the best kept: drift in the machine's load hits both sides
                again = _single(S, size, reps)
                single = min(single, again, key=lambda r: r["time_s"])
            rank_s = ranks["time_s"]
            rows.append({"seq_len": S, "world": w, "single_s": single["time_s"], "ranks_s": rank_s,
                         "ratio": single["time_s"] / rank_s, "single_loss": single["loss"],
                         "ranks_loss": ranks["loss"], "loss_diff": abs(single["loss"] - ranks["loss"])})
            r = rows[-1]
            print(f"  S={S:<6} W={w}: single {r['single_s']:7.2f}s  ranks {r['ranks_s']:7.2f}s  ratio "
                  f"{r['ratio']:.3f}  |loss diff| {r['loss_diff']:.1e}", flush=True)
    res = {"machine": machine(), "size": size, "layer_types": ["mamba", "mamba", "mamba", "attention"],
           "dtype": "float32", "layout": layout, "timed_steps_per_side": reps, "goal": GOAL, "rows": rows}
    _plot(res, out / "hybrid.png")
    return res


def _plot(res: dict, path: pathlib.Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    lengths = sorted({r["seq_len"] for r in res["rows"]})
    worlds = sorted({r["world"] for r in res["rows"]})
    width = 0.8 / len(worlds)
    for j, w in enumerate(worlds):
        ax.bar([i + j * width for i in range(len(lengths))],
               [next(r["ratio"] for r in res["rows"] if r["seq_len"] == s and r["world"] == w) for s in lengths],
               width, label=f"{w} ranks")
    ax.axhline(res["goal"], color="k", ls="--", lw=1, label="goal")
    ax.set_xticks([i + width * (len(worlds) - 1) / 2 for i in range(len(lengths))], [f"S={s}" for s in lengths])
    ax.set_ylabel("single-process time / slowest rank's time")
    ax.set_title("Granite-4.0-H-shaped hybrid, training step (fwd + loss + bwd)\n"
                 "W ranks x 1 thread vs 1 process x 2 threads, fp32, zigzag")
    ax.legend(fontsize=8)
    save_figure(fig, path, res["machine"])


def summary(res: dict) -> str:
    lines = ["| S | W | single (2 threads) s | ranks s | ratio | goal | loss, single / ranks |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['seq_len']} | {r['world']} | {r['single_s']:.2f} | {r['ranks_s']:.2f} | {r['ratio']:.3f} | "
                     f"{res['goal']} | {r['single_loss']:.6f} / {r['ranks_loss']:.6f} |")
    s = res["size"]
    lines.append(f"\nModel: {s['num_hidden_layers']} layers ({', '.join(res['layer_types'])}), hidden "
                 f"{s['hidden_size']}, Mamba2 {s['mamba_n_heads']} heads x {s['mamba_d_head']}, state "
                 f"{s['mamba_d_state']}, chunk {s['mamba_chunk_size']}; attention {s['num_attention_heads']} heads; "
                 f"vocab {s['vocab_size']}; batch 1, {res['dtype']}, {res['layout']}; best of "
                 f"{res['timed_steps_per_side']} steps per side. {res['machine']['cpu_count']} cores: 4 ranks x 1 "
                 "thread oversubscribe them (the ideal ratio stays 1, the same total CPU).\n")
    return "\n".join(lines)


__all__ = ["GOAL", "SIZE", "TINY", "build", "run", "summary"]
