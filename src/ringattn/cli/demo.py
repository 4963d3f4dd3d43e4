"""``ringattn demo`` (``make demo``): what a new user runs first.

Spawns local gloo ranks, runs causal ring attention forward + backward on a long sequence, checks it
against exact attention, and prints a short table: length, ranks, time, per-rank peak memory next to
what dense attention would need, and the error. Then, if the model is available, a few steps of
context-parallel training with the loss going down.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringattn

from .._measure import reset_peak_rss, rss_mb
from ..modes import Layout
from ..training.launch import spawn, spawn_collect
from . import memory
from .flags import add_flags, flag, from_args


@dataclass(frozen=True)
class DemoConfig:
    """The demo's problem; validated on construction. Fields with ``flag`` are its flags."""

    seq_len: int = field(default=32768, metadata=flag("global sequence length (tokens)"))
    nproc: int = field(default=4, metadata=flag("local processes (ranks) to spawn"))
    heads: int = field(default=2, metadata=flag("query heads"))
    kv_heads: int = field(default=1, metadata=flag("key/value heads"))
    head_dim: int = field(default=64, metadata=flag("head dimension"))
    layout: str = field(default="zigzag", metadata=flag("which positions each rank holds", choices=Layout))
    check_rows: int = 512
    train_steps: int = field(default=16, metadata=flag("steps of the training part (0 skips it)"))
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("seq_len", "nproc", "heads", "kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.train_steps < 0:
            raise ValueError(f"--train-steps must be >= 0, got {self.train_steps}")
        if self.heads % self.kv_heads:
            raise ValueError(f"--heads ({self.heads}) must be a multiple of --kv-heads ({self.kv_heads})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, DemoConfig)


def run(args: argparse.Namespace) -> int:
    cfg = from_args(DemoConfig, args)
    memory.check("ringattn demo", f"--seq-len {cfg.seq_len:,}", memory.demo_bytes(cfg), cfg.nproc, cfg.nproc)
    print(f"ringattn demo: causal {cfg.layout} ring attention, {cfg.seq_len} tokens on {cfg.nproc} local "
          f"ranks (gloo, 1 thread each), {cfg.heads} heads ({cfg.kv_heads} kv) x {cfg.head_dim}, fp32", flush=True)
    print(f"[0/3] starting {cfg.nproc} ranks (each imports torch, joins the gloo group and makes the inputs) ...",
          flush=True)
    r = spawn_collect(_attention_rank, cfg.nproc, cfg)
    _print_table(cfg, r)
    if cfg.train_steps > 0:
        _train_part(cfg)
    return 0


def _print_table(cfg: DemoConfig, r: dict) -> None:
    dense_mb = cfg.seq_len ** 2 * cfg.heads * 4 / 2 ** 20
    rows = [
        ("sequence length", f"{cfg.seq_len:,} tokens"),
        ("ranks", f"{cfg.nproc} ({cfg.layout} layout)"),
        ("ring fwd+bwd time", f"{r['ring_s']:.1f} s (slowest rank; {cfg.nproc} ranks share this machine's cores)"),
        ("exact single-process fwd+bwd", f"{r['single_s']:.1f} s (torch SDPA, all cores)"),
        ("peak memory growth per rank", f"{r['peak_mb']:.0f} MiB (max over ranks)"),
        ("dense attention scores would need", f"{_human(dense_mb)} (fp32 S x S x heads)"),
        ("error vs float64 exact (out, sampled rows)", f"{r['err_out']:.1e}"),
        ("error vs exact SDPA (out, dq, dk, dv)",
         f"{r['err_sdpa_out']:.1e}, {r['err_dq']:.1e}, {r['err_dk']:.1e}, {r['err_dv']:.1e}"),
    ]
    w = max(len(a) for a, _ in rows)
    print()
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")
    ok = max(r["err_out"], r["err_sdpa_out"], r["err_dq"], r["err_dk"], r["err_dv"]) < 1e-4
    print(f"\n  {'exact: OK' if ok else 'MISMATCH: errors above 1e-4'}\n", flush=True)
    if not ok:
        raise RuntimeError("ring attention disagrees with exact attention")


def _human(mb: float) -> str:
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def _attention_rank(cfg: DemoConfig) -> dict | None:
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(cfg.seed)
    S, h, kvh, d = cfg.seq_len, cfg.heads, cfg.kv_heads, cfg.head_dim
    q = torch.randn(1, S, h, d, generator=g)
    k = torch.randn(1, S, kvh, d, generator=g)
    v = torch.randn(1, S, kvh, d, generator=g)
    dout = torch.randn(1, S, h, d, generator=g)
    lay = cfg.layout
    qs, ks, vs = (ringattn.shard(t, layout=lay).requires_grad_() for t in (q, k, v))
    ds = ringattn.shard(dout, layout=lay)
    if rank == 0:
        print("[1/3] ring attention forward + backward ...", flush=True)
    dist.barrier()
    base = rss_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    out, lse = ringattn.ring_attention(qs, ks, vs, causal=True, layout=lay, seq_len=S, return_lse=True)
    out.backward(ds)
    ring_s = time.perf_counter() - t0
    peak = rss_mb("VmHWM") - base
    stats = torch.tensor([ring_s, peak])
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    full = [ringattn.unshard(t.detach(), layout=lay, seq_len=S) for t in (out, qs.grad, ks.grad, vs.grad)]
    full_lse = ringattn.unshard(lse.detach(), layout=lay, dim=2, seq_len=S)
    if rank == 0:
        print("[2/3] checking against exact attention (float64 on sampled rows, torch SDPA on all) ...",
              flush=True)
        torch.set_num_threads(os.cpu_count() or 1)
        rows = torch.randperm(S, generator=g)[: cfg.check_rows].sort().values
        rep = h // kvh
        kk, vv = k.double().repeat_interleave(rep, 2), v.double().repeat_interleave(rep, 2)
        s = torch.einsum("bihd,bjhd->bhij", q[:, rows].double(), kk) / math.sqrt(d)
        s = s.masked_fill(torch.arange(S)[None, :] > rows[:, None], float("-inf"))
        ref_out = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), vv)
        err_out = max(_rel(full[0][:, rows], ref_out), _rel(full_lse[:, :, rows], s.logsumexp(-1)))
        qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
        t1 = time.perf_counter()
        # Repeated K/V heads rather than enable_gqa, which sends CPU SDPA down its slow unfused path.
        o = F.scaled_dot_product_attention(qt, kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1),
                                           is_causal=True)
        o.backward(dout.transpose(1, 2))
        single_s = time.perf_counter() - t1
        res = {"ring_s": float(stats[0]), "peak_mb": float(stats[1]), "single_s": single_s, "err_out": err_out,
               "err_sdpa_out": _rel(full[0], o.detach().transpose(1, 2)),
               "err_dq": _rel(full[1], qt.grad.transpose(1, 2)), "err_dk": _rel(full[2], kt.grad.transpose(1, 2)),
               "err_dv": _rel(full[3], vt.grad.transpose(1, 2)), "config": asdict(cfg)}
    dist.barrier()
    return res if rank == 0 else None


def _train_part(cfg: DemoConfig) -> None:
    from ..app import train
    from ..app.model import LlamaConfig

    seq = 4096
    print(f"[3/3] context-parallel training: a small LLaMA-style model (blockwise FFN) on passkey retrieval, "
          f"{seq}-token sequences split over {cfg.nproc} ranks ({cfg.layout}), {cfg.train_steps} steps ...",
          flush=True)
    tc = train.TrainConfig(model=LlamaConfig(layout=cfg.layout, ffn_chunk=256), task="passkey", seq_len=seq,
                           batch=2, steps=cfg.train_steps, lr=3e-3, warmup=2, eval_samples=0)
    spawn(_train_rank, cfg.nproc, tc)


def _train_rank(tc) -> None:
    from ..app import train
    from .train import Printer, Show

    s = train.train(tc, progress=Printer(Show(), dist.get_rank()))
    if dist.get_rank() == 0:
        trend = "down" if s["loss_last"] < s["loss_first"] else "NOT down"
        print(f"\n  loss {s['loss_first']:.3f} -> {s['loss_last']:.3f} ({trend}), {s['tokens_per_s']:,.0f} tokens/s, "
              f"peak {s['peak_mem_mb_per_rank']:.0f} MB per rank", flush=True)
