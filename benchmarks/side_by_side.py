"""Two checkouts of ringattn measured side by side in one run: ring efficiency and peak memory per rank.

    python benchmarks/side_by_side.py OLD_SRC NEW_SRC [--rounds 3] [--seq-len 8192]

``OLD_SRC`` / ``NEW_SRC`` are the ``src`` folders of the two checkouts (e.g. a ``git worktree`` of an older
commit). Each measurement runs in a fresh process with that ``src`` first on ``PYTHONPATH``, the two
alternating round by round so that drift in machine load hits both alike; the best of the rounds is kept.
Measured: a 2-rank ring (one thread each) against one 2-thread process running SDPA on the whole
sequence, forward + backward, fp32, 8 heads x 64 (the ``ring`` suite's ratio), and the 2-rank ring's peak
memory growth per rank at 4x the length (1 head).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CONFIGS = [("non-causal contiguous", "contiguous", False), ("causal zigzag", "zigzag", True)]

_PROBE = r'''
import json, os, sys, time, tempfile
import torch, torch.nn.functional as F
import torch.distributed as dist
import ringattn
from ringattn import launch
S, layout, causal, mem = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
H, D = (1, 64) if mem else (8, 64)

def peak_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

def rank(path):
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (ringattn.shard(torch.randn(1, S, H, D, generator=g), layout=layout) for _ in range(4))
    best = float("inf")
    for i in range(1 if mem else 3):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        if mem:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = peak_mb()
        dist.barrier()
        t0 = time.perf_counter()
        ringattn.ring_attention(qq, kk, vv, causal=causal, layout=layout).backward(do)
        el = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(el, op=dist.ReduceOp.MAX)
        if i:
            best = min(best, float(el))
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, peak_mb() - base if mem else best)
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(out, f)

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.json")
        launch.spawn(rank, 2, path)
        with open(path) as f:
            ranks = json.load(f)
    if mem:
        print(json.dumps({"peak_growth_mb": max(ranks)}))
        sys.exit(0)
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, H, S, D, generator=g) for _ in range(4))
    single = float("inf")
    for i in range(3):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        t0 = time.perf_counter()
        F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal).backward(do)
        if i:
            single = min(single, time.perf_counter() - t0)
    print(json.dumps({"ring_s": max(ranks), "single_s": single}))
'''


def probe(src: str, *args) -> dict:
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # A file, not -c: the ranks are spawned processes, which import the rank function from it.
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "probe.py")
        with open(script, "w") as f:
            f.write(_PROBE)
        r = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, env=env,
                           timeout=1200)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=8192)
    a = p.parse_args(argv)
    res: dict = {}
    for name, layout, causal in CONFIGS:
        best = {}
        for _ in range(a.rounds):
            for side, src in (("old", a.old), ("new", a.new)):
                r = probe(src, a.seq_len, layout, int(causal), 0)
                ratio = r["single_s"] / r["ring_s"]
                best[side] = max(best.get(side, 0.0), ratio)
        res[name] = best
        print(f"{name:<22} ring efficiency (1-process SDPA time / 2-rank ring time), best of {a.rounds}: "
              f"old {best['old']:.3f}  new {best['new']:.3f}", flush=True)
    mem = {side: probe(src, 4 * a.seq_len, "zigzag", 1, 1)["peak_growth_mb"] for side, src in
           (("old", a.old), ("new", a.new))}
    res["peak_growth_mb_per_rank"] = mem
    print(f"peak memory growth per rank, 2 ranks, S={4 * a.seq_len}, causal zigzag, 1 head: "
          f"old {mem['old']:.1f} MiB  new {mem['new']:.1f} MiB", flush=True)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
