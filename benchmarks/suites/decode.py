"""``python -m benchmarks decode``: sharded KV-cache decoding vs. single-process decoding, by context length.

For each prompt length, the same model and prompt are decoded (greedy) three ways in one run:
W local ranks with the cache sharded (one thread each), and one process holding the whole cache with
1 thread and with W threads (the same cores). Reported: decode tokens/s (from the median step time,
since the machine is shared), prefill time, the bytes each rank sends per decoded token (constant:
one ``(out, lse)`` per layer and head), the bytes of a rank's cache slice (growing with the context:
what a scheme that moves the cache would move), and whether the sharded run produced the same
tokens as the single process.
"""

from __future__ import annotations

import pathlib
from dataclasses import asdict, dataclass

import torch

from ringattn import launch
from ringattn.app.generate import generate
from ringattn.app.model import LlamaConfig, build

from ..common import machine, pyplot, save_figure


@dataclass(frozen=True)
class DecodeBenchConfig:
    contexts: tuple[int, ...] = (1024, 4096, 16384, 32768)
    world: int = 2
    new_tokens: int = 32
    batch: int = 1
    dim: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    layout: str = "zigzag"
    seed: int = 0


QUICK = DecodeBenchConfig(contexts=(256, 512), new_tokens=4)


def _model(cfg: DecodeBenchConfig):
    mc = LlamaConfig(dim=cfg.dim, n_layers=cfg.layers, n_heads=cfg.heads, n_kv_heads=cfg.kv_heads,
                     layout=cfg.layout)
    return build(mc, seed=cfg.seed)


def _prompt(cfg: DecodeBenchConfig, ctx: int) -> torch.Tensor:
    return torch.randint(0, 256, (cfg.batch, ctx), generator=torch.Generator().manual_seed(cfg.seed + ctx))


def _one(cfg: DecodeBenchConfig, model, ctx: int, group=None) -> dict:
    res = generate(model, _prompt(cfg, ctx), cfg.new_tokens, group=group)
    cache_bytes = res.cache_slots * cfg.batch * cfg.kv_heads * (cfg.dim // cfg.heads) * 2 * 4 * cfg.layers
    return {"tokens_per_s": res.median_tokens_per_s, "prefill_s": res.prefill_s,
            "bytes_per_token": res.bytes_per_token, "cache_bytes": cache_bytes, "tokens": res.tokens.tolist()}


def _worker(cfg: DecodeBenchConfig) -> list[dict]:
    """Per context: the sharded run on all ranks, then rank 0 alone (its own one-rank group, so the
    cache is whole) with 1 and W threads while the others wait — baseline and sharded interleaved in
    time, so a load change on the shared machine hits both alike."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    solo = dist.new_group([0])
    model = _model(cfg)
    generate(model, _prompt(cfg, 64), 4)  # warm-up: first-call allocations and thread pools
    rows = []
    for ctx in cfg.contexts:
        row = {"context": ctx, "sharded": _one(cfg, model, ctx)}
        if rank == 0:
            for threads in sorted({1, world}):
                torch.set_num_threads(threads)
                row[f"single_{threads}"] = _one(cfg, model, ctx, group=solo)
            torch.set_num_threads(1)
        dist.barrier()
        rows.append(row)
    return rows


def run(out: pathlib.Path, quick: bool) -> dict:
    cfg = QUICK if quick else DecodeBenchConfig()
    measured = launch.spawn_collect(_worker, cfg.world, cfg)
    rows = []
    for m in measured:
        sh, s1, sw = m["sharded"], m["single_1"], m[f"single_{cfg.world}"]
        row = {"context": m["context"],
               "sharded_tokens_per_s": sh["tokens_per_s"], "single_1thread_tokens_per_s": s1["tokens_per_s"],
               f"single_{cfg.world}threads_tokens_per_s": sw["tokens_per_s"],
               "speedup_vs_1thread": sh["tokens_per_s"] / s1["tokens_per_s"],
               "sharded_prefill_s": sh["prefill_s"], "single_1thread_prefill_s": s1["prefill_s"],
               f"single_{cfg.world}threads_prefill_s": sw["prefill_s"],
               "bytes_per_token_per_rank": sh["bytes_per_token"],
               "cache_bytes_per_rank": sh["cache_bytes"], "cache_bytes_single": s1["cache_bytes"],
               "same_tokens": sh["tokens"] == s1["tokens"] == sw["tokens"]}
        rows.append(row)
        print(f"context {row['context']:6d}: sharded ({cfg.world} ranks) {sh['tokens_per_s']:7.1f} tok/s | "
              f"single 1 thread {s1['tokens_per_s']:7.1f} | single {cfg.world} threads "
              f"{sw['tokens_per_s']:7.1f} | {row['bytes_per_token_per_rank']:.0f} B/token/rank sent, cache "
              f"{row['cache_bytes_per_rank'] / 2**20:.1f} MiB/rank | same tokens {row['same_tokens']}",
              flush=True)
    _plot(out / "decode.png", cfg, rows)
    return {"machine": machine(), "config": asdict(cfg), "rows": rows}


def _plot(path: pathlib.Path, cfg: DecodeBenchConfig, rows: list[dict]) -> None:
    plt = pyplot()
    ctx = [r["context"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(ctx, [r["sharded_tokens_per_s"] for r in rows], "o-", label=f"sharded cache, {cfg.world} ranks")
    a.plot(ctx, [r["single_1thread_tokens_per_s"] for r in rows], "s--", label="single process, 1 thread")
    a.plot(ctx, [r[f"single_{cfg.world}threads_tokens_per_s"] for r in rows], "^--",
           label=f"single process, {cfg.world} threads")
    a.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode tokens/s",
          title="Decode throughput")
    a.legend()
    b.plot(ctx, [r["bytes_per_token_per_rank"] for r in rows], "o-", label="sent per token per rank")
    b.plot(ctx, [r["cache_bytes_per_rank"] for r in rows], "s--", label="KV cache held per rank")
    b.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="bytes",
          title="Per-token communication vs. cache size")
    b.legend()
    fig.suptitle(f"dim {cfg.dim}, {cfg.layers} layers, {cfg.heads} heads, batch {cfg.batch}, float32, "
                 f"{cfg.layout}")
    save_figure(fig, path, machine())


def summary(res: dict) -> str:
    c = res["config"]
    lines = [f"{c['world']} ranks, {c['layout']}, model dim {c['dim']} x {c['layers']} layers, {c['new_tokens']} new "
             "tokens per context, greedy.\n",
             "| context | sharded tok/s | single 1 thread tok/s | single 2 threads tok/s "
             "| bytes sent per token per rank | cache per rank MiB | same tokens |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['context']} | {r['sharded_tokens_per_s']:.0f} | {r['single_1thread_tokens_per_s']:.0f} | "
                     f"{r['single_2threads_tokens_per_s']:.0f} | {r['bytes_per_token_per_rank']:.0f} | "
                     f"{r['cache_bytes_per_rank'] / 2**20:.1f} | {r['same_tokens']} |")
    return "\n".join(lines) + "\n"
