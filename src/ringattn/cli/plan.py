"""``ringattn plan``: the cost model's table for one problem, on a preset or on this machine (``--measure``)."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time

import torch
import torch.distributed as dist

from .._measure import best_of
from ..comm import TAG_KV, Ring
from ..kernels import select
from ..masks import Kind, MaskSpec, Task
from ..modes import BackwardExchange, Layout
from ..plan import ALIASES, DTYPE_BYTES, PRESETS, Hardware, Problem, hardware, report
from ..training import launch
from .flags import JsonFlag


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", type=int, required=True, help="global sequence length (tokens)")
    p.add_argument("--world", type=int, required=True, help="number of devices sharing the sequence")
    p.add_argument("--heads", type=int, required=True, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: = heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--v-head-dim", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    p.add_argument("--no-causal", dest="causal", action="store_false", help="bidirectional (default: causal)")
    p.add_argument("--window", type=int, nargs=2, metavar=("LEFT", "RIGHT"), default=None,
                   help="sliding window, -1 = unbounded")
    p.add_argument("--layout", choices=list(Layout), default="zigzag")
    p.add_argument("--forward-only", action="store_true", help="inference: no backward pass")
    p.add_argument("--backward-exchange", choices=list(BackwardExchange), default="ring",
                   help="the ring's backward: dK/dV travel with their block, or go straight to the owner")
    p.add_argument("--mesh", type=int, nargs=2, metavar=("RING", "ULYSSES"), default=None,
                   help="hybrid mesh shape (default: Ulysses over a node)")
    p.add_argument("--hardware", default=None, help=f"a preset: {', '.join(PRESETS)} (default: cpu-gloo-loopback; "
                   f"also {', '.join(f'{a} = {n}' for a, n in ALIASES.items())})")
    p.add_argument("--measure", action="store_true", help="measure this machine instead of a preset")
    p.add_argument("--json", action=JsonFlag)


def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "-"
    for unit, f in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if s >= f:
            return f"{s / f:.3g} {unit}"
    return f"{s / 1e-6:.2g} us"


def _fmt_b(b: float) -> str:
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= f:
            return f"{b / f:.3g} {unit}"
    return f"{b:.0f} B"


def run(args) -> int:
    if args.measure and args.hardware:
        raise ValueError("give --hardware or --measure, not both")
    hw = measure() if args.measure else hardware(args.hardware or "cpu-gloo-loopback")
    window = tuple(args.window) if args.window else None
    if window is not None and any(x < -1 for x in window):
        raise ValueError(f"--window values must be >= -1, got {list(window)}")
    p = Problem(seq_len=args.seq_len, world=args.world, heads=args.heads,
                kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim, v_head_dim=args.v_head_dim,
                batch=args.batch, dtype_bytes=DTYPE_BYTES[args.dtype], causal=args.causal, window=window,
                layout=args.layout, backward=not args.forward_only, mesh=tuple(args.mesh) if args.mesh else None,
                backward_exchange=args.backward_exchange)
    rep = report(p, hw)
    if args.json:
        print(json.dumps(rep, indent=2, default=lambda x: None if x is math.inf else str(x)))
        return 0
    print(f"problem: seq_len={p.seq_len} world={p.world} heads={p.heads} kv_heads={p.kv_heads} "
          f"head_dim={p.head_dim} batch={p.batch} {args.dtype} {'causal' if p.causal else 'bidirectional'}"
          f"{f' window={window}' if window else ''} layout={p.layout} "
          f"{'forward' if not p.backward else 'forward+backward'}")
    print(f"hardware: {hw.name}: {hw.flops / 1e12:.3g} TFLOP/s, {hw.bandwidth / 1e9:.3g} GB/s link, "
          f"{hw.latency * 1e6:.3g} us latency, {hw.memory / 1e9:.3g} GB{' (' + hw.note + ')' if hw.note else ''}")
    head = f"{'strategy':<10} {'time':>9} {'compute':>9} {'comm':>9} {'exposed':>9} {'sent/rank':>10} " \
           f"{'memory':>10} {'hidden':>6}  note"
    print(head)
    print("-" * len(head))
    for e in rep["strategies"]:
        if not e["feasible"]:
            print(f"{e['strategy']:<10} {'n/a':>9}  {e['note']}")
            continue
        mem = _fmt_b(e["memory_bytes"]) + ("" if e["fits"] else "!")
        print(f"{e['strategy']:<10} {_fmt_s(e['time_s']):>9} {_fmt_s(e['compute_s']):>9} {_fmt_s(e['comm_s']):>9} "
              f"{_fmt_s(e['exposed_s']):>9} {_fmt_b(e['comm_bytes']):>10} {mem:>10} "
              f"{'yes' if e['hidden'] else 'no':>6}  {e['note']}")
    ov = rep["overlap"]
    print(f"overlap condition (ring): block c = {ov['block']} tokens, needs c >= F/B * kv_heads*bytes/(2*heads) "
          f"= {ov['min_block']:.0f} -> {'hidden' if ov['ring_hidden_by_condition'] else 'NOT hidden'}; "
          f"paper Table 2 for {hw.name}: min block {ov['paper_min_block'] / 1e3:.1f}K, "
          f"min sequence/device {ov['paper_min_sequence'] / 1e3:.1f}K")
    print(f"recommendation: {rep['recommendation']}")
    return 0


def measure(threads: int = 1) -> Hardware:
    """This machine: attention kernel FLOP/s (one rank, ``threads`` threads) and gloo bandwidth/latency."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        dt = torch.bfloat16 if dev == "cuda" else torch.float32
        s, h, d = (4096, 16, 128) if dev == "cuda" else (1024, 8, 64)
        q, k, v = (torch.randn(1, s, h, d, device=dev, dtype=dt) for _ in range(3))
        be = select(q, k, v)
        task, spec = Task(0, s, 0, s, Kind.FULL), MaskSpec(seq_len=s)
        out, lse = be.forward(q, k, v, task, spec, scale=d ** -0.5)

        timed = functools.partial(_timed, cuda=dev == "cuda")
        t_fwd = timed(lambda: be.forward(q, k, v, task, spec, scale=d ** -0.5))
        t_bwd = timed(lambda: be.backward(q, q, k, v, out, lse, task, spec, scale=d ** -0.5))
        flops = 4.0 * s * s * h * d / t_fwd
        # the allgather strategy's reordering: every rank's K out of the gathered [K | V] rows into one
        # sequence (a copy), then into position order (zigzag: a row gather) — two passes
        n = s * h * d
        gathered = torch.randn(4, 2 * n, device=dev, dtype=dt)
        order = torch.randperm(4 * s, device=dev)
        t_copy = timed(lambda: gathered[:, :n].reshape(4, 1, s, h, d).transpose(0, 1).reshape(1, 4 * s, h, d)
                       .index_select(1, order))
        copy_bw = None if dev == "cuda" else 2 * 4 * n * gathered.element_size() / t_copy
    finally:
        torch.set_num_threads(prev)
    link = launch.spawn_collect(_measure_link, 2)
    cores = None if dev == "cuda" else (os.cpu_count() or 1) // threads
    memory = PRESETS["cpu-gloo-loopback"].memory
    return Hardware("measured", flops, link["bandwidth"], link["latency"], memory, 64, None, cores,
                    note=f"measured here: kernel on {dev}, gloo between 2 local ranks", backward_time=t_bwd / t_fwd,
                    key_block=be.caps.causal_key_block, copy_bandwidth=copy_bw)


def _synced(step, cuda: bool) -> None:
    step()
    if cuda:
        torch.cuda.synchronize()


def _timed(step, *, cuda: bool) -> float:
    """The best of 3 wall times of ``step``, waiting for the GPU where there is one."""
    return best_of(functools.partial(_synced, step, cuda), repeats=3)


def _measure_link() -> dict:
    """Latency and bandwidth of one ring step between 2 local gloo ranks."""
    ring = Ring()
    big, small = torch.zeros(1 << 20), torch.zeros(1)

    def swap(t, n):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            ring.exchange((t,), 1, (t,), -1, TAG_KV).wait()
        return (time.perf_counter() - t0) / n

    swap(big, 2)
    lat = min(swap(small, 20) for _ in range(3))
    per = min(swap(big, 5) for _ in range(3))
    return {"latency": lat, "bandwidth": big.numel() * 4 / max(per - lat, 1e-9)}
