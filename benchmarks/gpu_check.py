"""One-GPU check of ringattn's CUDA path: exactness of every task kind and dtype, then throughput.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--no-bench]

1. Correctness against a float64 dense reference (out, lse, dq, dk, dv; errors relative to the
   reference's largest magnitude), for full, causal, windows, documents, striped and padding masks x
   float16 / bfloat16 / float32 x MHA and GQA: through ``ringattn.ring_attention`` on world size 1 (no
   process group) and through the selected backend directly on single block pairs (striped positions
   included), planned by ``tasks.block_tasks``. It also reports which backend ``kernels.select`` chose
   (the CUDA backend must pass its self-check for every dtype) and which flash impl is active.
   The kernel seam's other paths run on the device too: the same block pairs planned for a backend that
   takes BAND tasks (windows, chunks, documents as one task each, masked from the band's own
   parameters) and all of a pair's tasks in one call ("seam"), and ALiBi planned as FULL/CAUSAL/BAND
   tasks with positions for a backend that applies it on any task ("alibi").
2. Per-block throughput (TFLOP/s, forward and forward+backward) of ringattn's backend and of
   ``ring_attention`` against ``scaled_dot_product_attention`` on its flash backend: bfloat16, head dim
   128, S in {4096, 8192}, H in {16, 32}, causal and not.
3. A JSON summary at ``--out`` and a markdown table next to it (``.md``); the exit status is 1 if any
   check failed, and 0 with "no CUDA device: nothing to check" where there is no GPU.

Self-contained apart from ringattn itself; sized to finish well within 8 minutes on one device.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch

TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json", help="JSON summary path (a .md table goes next to it)")
    p.add_argument("--no-bench", action="store_true", help="correctness only")
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192], help="sequence lengths to time")
    p.add_argument("--heads", type=int, nargs="+", default=[16, 32], help="head counts to time")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per variant (median)")
    return p.parse_args(argv)


# --- float64 reference ---------------------------------------------------------------------------------

def reference(q, k, v, dout, keep, scale, bias=None):
    """Dense float64 attention with autograd: (out, lse, dq, dk, dv); rows that see nothing: 0 / -inf.
    ``bias``: an additive ``(heads, nq, nk)`` score term (ALiBi)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    g = q.shape[2] // k.shape[2]
    kr, vr = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, kr) * scale
    if bias is not None:
        s = s + bias.double()
    rows = keep.any(-1)
    # Empty rows get finite scores so softmax has a gradient; the keep factor then zeroes them.
    s = torch.where(keep, s, torch.where(rows[:, None], float("-inf"), 0.0))
    out = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1) * keep, vr)
    (out * dout.double()).sum().backward()
    with torch.no_grad():
        lse = torch.logsumexp(s, -1).masked_fill(~rows, float("-inf"))
    return out.detach(), lse, q.grad, k.grad, v.grad


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    fin = torch.isfinite(ref)
    if x.shape != ref.shape or not torch.equal(fin, torch.isfinite(x)) or not torch.equal(x[~fin], ref[~fin]):
        return math.inf
    if not fin.any():
        return 0.0
    return float((x[fin] - ref[fin]).abs().max() / ref[fin].abs().max().clamp_min(1e-12))


def keep_mask(n: int, *, causal=False, window=None, seq_len=None, cu_seqlens=None, device=None) -> torch.Tensor:
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    keep = torch.ones(n, n, dtype=torch.bool, device=device)
    if seq_len is not None:
        keep &= j < seq_len
    if causal:
        keep &= j <= i
    if window is not None:
        if window[0] >= 0:
            keep &= j >= i - window[0]
        if window[1] >= 0:
            keep &= j <= i + window[1]
    if cu_seqlens is not None:
        doc = torch.full((n,), -1, dtype=torch.long, device=device)
        for d, (a, b) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
            doc[a:b] = d
        keep &= (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)
    return keep


# --- 1. correctness ------------------------------------------------------------------------------------

S_CHECK = 1000
RING_CASES = {
    "full": dict(),
    "causal": dict(causal=True),
    "windows": dict(window=(128, 32)),
    "documents": dict(causal=True, cu_seqlens=[0, 300, 301, 720, S_CHECK]),
    "striped": dict(causal=True, layout="striped"),
    "padding": dict(causal=True, seq_len=S_CHECK - 77),
}


def check_ring(dtype, kv_heads, name, kw, device, backend) -> dict:
    import ringattn

    g = torch.Generator(device=device).manual_seed(zlib.crc32(f"{name}/{kv_heads}".encode()))
    docs = "cu_seqlens" in kw
    b, h, d = (1 if docs else 2), 8, 64

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float64, generator=g).to(dtype)

    q, k, v, dout = rand(b, S_CHECK, h, d), rand(b, S_CHECK, kv_heads, d), rand(b, S_CHECK, kv_heads, d), \
        rand(b, S_CHECK, h, d)
    seq_len = kw.get("seq_len")
    if seq_len is not None:
        dout[:, seq_len:] = 0  # padding rows: nothing flows back from them
    keep = keep_mask(S_CHECK, causal=kw.get("causal", False), window=kw.get("window"), seq_len=seq_len,
                     cu_seqlens=kw.get("cu_seqlens"), device=device)
    ref = reference(q, k, v, dout, keep, d ** -0.5)
    opts = dict(kw)
    if docs:
        opts["cu_seqlens"] = torch.tensor(kw["cu_seqlens"], dtype=torch.int32, device=device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = ringattn.ring_attention(*leaves, return_lse=True, backend=backend, **opts)
    (out.double() * dout.double()).sum().backward()
    valid = slice(0, seq_len)
    errs = {"out": rel_err(out[:, valid], ref[0][:, valid]), "lse": rel_err(lse[:, :, valid], ref[1][:, :, valid]),
            "dq": rel_err(leaves[0].grad, ref[2]), "dk": rel_err(leaves[1].grad, ref[3]),
            "dv": rel_err(leaves[2].grad, ref[4])}
    return errs


def direct_pairs():
    """(name, MaskSpec, query segments, key segments): one block pair of every task kind."""
    from ringattn.masks import MaskSpec, Segment

    n = 700
    return [
        ("full", MaskSpec(4 * n), (Segment(n, n),), (Segment(0, n),)),
        ("causal", MaskSpec(4 * n, causal=True), (Segment(0, n),), (Segment(0, n),)),
        ("causal-offdiag", MaskSpec(4 * n, causal=True), (Segment(300, n),), (Segment(0, n),)),
        ("windows", MaskSpec(4 * n, window=(200, 50)), (Segment(n, n),), (Segment(400, n),)),
        ("documents", MaskSpec(2 * n, causal=True, doc_bounds=(0, 150, 151, 600, 1000, 2 * n)),
         (Segment(0, n),), (Segment(0, n),)),
        ("chunks", MaskSpec(4 * n, causal=True, chunk=256), (Segment(n, n),), (Segment(n, n),)),
        ("window-docs", MaskSpec(2 * n, causal=True, window=(100, -1), doc_bounds=(0, 150, 151, 600, 2 * n)),
         (Segment(n, n),), (Segment(300, n),)),
        ("striped", MaskSpec(4 * n, causal=True), (Segment(1, n, 4),), (Segment(0, n, 4),)),
        ("striped-docs", MaskSpec(4 * n, causal=True, doc_bounds=(0, 999, 2000, 4 * n)),
         (Segment(3, n, 4),), (Segment(0, n, 4),)),
        # Keys from 1033 on are padding; query rows 300-499 see no key of this block.
        ("padding", MaskSpec(n + 333, causal=True), (Segment(300, n),), (Segment(500, n),)),
    ]


def seam_backend(base):
    """``base`` declaring BAND native and the task-list entry: each BAND task goes through its dense-mask
    path with the mask built from the band's own parameters, and a block pair's tasks come in one call
    (run there one by one). Exercises the seam's planning and bookkeeping with the device's kernels."""
    import copy
    import dataclasses

    from ringattn.kernels.block import backward_each, forward_each
    from ringattn.masks import Kind

    b = copy.copy(base)
    b.caps = dataclasses.replace(base.caps, native=base.caps.native | {Kind.BAND}, takes_task_lists=True)
    b.forward_tasks = lambda *args, **kw: forward_each(base, *args, **kw)
    b.backward_tasks = lambda *args, **kw: backward_each(base, *args, **kw)
    return b


def alibi_backend():
    """The reference backend applying ALiBi on every task kind (given positions), BAND native."""
    import copy
    import dataclasses

    from ringattn.kernels import BACKENDS
    from ringattn.masks import Kind
    from ringattn.scores import ALIBI

    b = copy.copy(BACKENDS["reference"])
    b.caps = dataclasses.replace(b.caps, native=b.caps.native | {Kind.BAND}, native_score_mods=frozenset({ALIBI}))
    return b


def check_direct(dtype, kv_heads, name, spec, qsegs, ksegs, device, backend, alibi=False) -> dict:
    import dataclasses

    from ringattn.kernels import acc_dtype
    from ringattn.kernels.block import GradAccumulator, OutLseAccumulator, run_backward, run_forward
    from ringattn.scores import ScoreMod
    from ringattn.tasks import block_tasks

    g = torch.Generator(device=device).manual_seed(zlib.crc32(f"direct/{name}/{kv_heads}".encode()))
    nq, nk = sum(s.length for s in qsegs), sum(s.length for s in ksegs)
    b, h, d = 2, 8, 64

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float64, generator=g).to(dtype)

    q, k, v, dout = rand(b, nq, h, d), rand(b, nk, kv_heads, d), rand(b, nk, kv_heads, d), rand(b, nq, h, d)
    qpos = torch.cat([s.positions(device) for s in qsegs])
    kpos = torch.cat([s.positions(device) for s in ksegs])
    keep = spec.visible(qpos[:, None], kpos[None, :])
    scale = d ** -0.5
    scores = bias = None
    if alibi:
        slopes = 2.0 ** -torch.arange(1, h + 1, device=device, dtype=torch.float64)
        scores = ScoreMod(alibi_slopes=slopes)
        spec = dataclasses.replace(spec, positional=True)
        bias = -slopes[:, None, None] * (qpos[:, None] - kpos[None, :]).double()
    ref = reference(q, k, v, dout, keep, scale, bias)
    tasks = block_tasks(spec, qsegs, ksegs, backend.caps)
    acc = OutLseAccumulator(q, d)
    run_forward(backend, q, k, v, tasks, spec, scale, acc, scores)
    grads = [GradAccumulator(x.shape, acc_dtype(dtype), device) for x in (q, k, v)]
    run_backward(backend, dout, q, k, v, acc.out, acc.lse, tasks, spec, scale, *grads, None, scores)
    got = (acc.out, acc.lse, *(x.get() for x in grads))
    kinds = sorted({t.kind.name for t in tasks})
    return {**{n: rel_err(x, y) for n, x, y in zip(("out", "lse", "dq", "dk", "dv"), got, ref)}, "kinds": kinds}


def correctness(device) -> tuple[list[dict], dict]:
    from ringattn import kernels
    from ringattn.kernels import cuda as cuda_mod

    rows, chosen = [], {}
    for dname, dtype in DTYPES.items():
        probe = torch.zeros(1, 8, 8, 64, device=device, dtype=dtype)
        backend = kernels.select(probe, probe[:, :, :2], probe[:, :, :2])
        chosen[dname] = backend.name
        rows.append(dict(path="select", dtype=dname, case=f"backend={backend.name}", kv_heads=None, errors={},
                         ok=backend.name == "cuda-flash"))
        # Small tiles: PARTIAL tiles are the efficient kernel's, FULL/CAUSAL ones flash's (half precision).
        tiled = kernels.retiled(kernels.BACKENDS["cuda-flash"], max_dense_tile=256, backward_tile=512)
        for kvh in (8, 2):
            for name, kw in RING_CASES.items():
                errs = check_ring(dtype, kvh, name, kw, device, tiled)
                rows.append(dict(path="ring_attention", dtype=dname, case=name, kv_heads=kvh, errors=errs,
                                 ok=all(e <= TOL[dtype] for e in errs.values())))
            seam = (("backend", tiled, False), ("seam", seam_backend(tiled), False),
                    ("alibi", alibi_backend(), True))
            for path, backend, alibi in seam:
                for name, spec, qsegs, ksegs in direct_pairs():
                    errs = check_direct(dtype, kvh, name, spec, qsegs, ksegs, device, backend, alibi)
                    kinds = errs.pop("kinds")
                    rows.append(dict(path=path, dtype=dname, case=f"{name} {'/'.join(kinds)}", kv_heads=kvh,
                                     errors=errs, ok=all(e <= TOL[dtype] for e in errs.values())))
        torch.cuda.synchronize(device)
    info = {"select": chosen, "flash_impl": cuda_mod._current_impl(),
            "flash_hardware": cuda_mod._flash_hardware(torch.device(device))}
    return rows, info


# --- 2. throughput -------------------------------------------------------------------------------------

def _time(fn, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs, after two warm-up runs (CUDA events)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def throughput(device, seqs, heads_list, d, reps) -> list[dict]:
    rows = []
    for S in seqs:
        for H in heads_list:
            for causal in (False, True):
                rows += _bench_case(device, S, H, d, causal, reps)
                torch.cuda.empty_cache()
    return rows


def _bench_case(device, S: int, H: int, d: int, causal: bool, reps: int) -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import ringattn
    from ringattn.kernels import BACKENDS
    from ringattn.kernels.block import GradAccumulator, OutLseAccumulator, run_backward, run_forward
    from ringattn.masks import MaskSpec, Segment
    from ringattn.tasks import block_tasks

    backend = BACKENDS["cuda-flash"]
    g = torch.Generator(device=device).manual_seed(S + H)
    q, k, v, do = (torch.randn(1, S, H, d, device=device, dtype=torch.bfloat16, generator=g) for _ in range(4))
    spec = MaskSpec(S, causal=causal)
    tasks = block_tasks(spec, (Segment(0, S),), (Segment(0, S),), backend.caps)
    scale = d ** -0.5

    def block_fwd():
        acc = OutLseAccumulator(q, d)
        run_forward(backend, q, k, v, tasks, spec, scale, acc)
        return acc

    def block_fwd_bwd():
        acc = block_fwd()
        gs = [GradAccumulator(x.shape, torch.float32, device) for x in (q, k, v)]
        run_backward(backend, do, q, k, v, acc.out, acc.lse, tasks, spec, scale, *gs)

    qt, kt, vt, dot = (x.transpose(1, 2) for x in (q, k, v, do))
    leaves = [x.detach().clone().requires_grad_() for x in (qt, kt, vt)]

    def sdpa_fwd():
        with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    def sdpa_fwd_bwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(*leaves, is_causal=causal).backward(dot)

    ring_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

    def ring_fwd():
        with torch.no_grad():
            ringattn.ring_attention(q, k, v, causal=causal)

    def ring_fwd_bwd():
        ringattn.ring_attention(*ring_leaves, causal=causal).backward(do)

    flops = 4.0 * S * S * H * d * (0.5 if causal else 1.0)
    rows = []
    for impl, fwd, both in (("ringattn backend", block_fwd, block_fwd_bwd),
                            ("ring_attention (world 1)", ring_fwd, ring_fwd_bwd),
                            ("sdpa flash", sdpa_fwd, sdpa_fwd_bwd)):
        row = dict(impl=impl, S=S, H=H, D=d, causal=causal)
        try:
            tf, tb = _time(fwd, reps), _time(both, reps)
            row.update(fwd_ms=tf * 1e3, fwd_bwd_ms=tb * 1e3, fwd_tflops=flops / tf / 1e12,
                       fwd_bwd_tflops=3.5 * flops / tb / 1e12)  # backward = 2.5 forwards of FLOPs
        except Exception as e:  # noqa: BLE001 - a missing kernel is a result to report
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


# --- 3. report -----------------------------------------------------------------------------------------

def markdown(summary: dict) -> str:
    lines = [f"# ringattn GPU check: {summary['device']}", "",
             f"torch {summary['torch']}, flash impl {summary['info'].get('flash_impl')}, "
             f"select: {summary['info'].get('select')}", "",
             "| path | dtype | case | kv heads | out | lse | dq | dk | dv | result |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["correctness"]:
        e = r["errors"]
        cells = [f"{e[n]:.1e}" if n in e else "" for n in ("out", "lse", "dq", "dk", "dv")]
        lines.append(f"| {r['path']} | {r['dtype']} | {r['case']} | {r['kv_heads'] or ''} | " + " | ".join(cells)
                     + f" | {'PASS' if r['ok'] else 'FAIL'} |")
    if summary["throughput"]:
        lines += ["", "| impl | S | H | D | causal | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in summary["throughput"]:
            if "error" in r:
                lines.append(f"| {r['impl']} | {r['S']} | {r['H']} | {r['D']} | {r['causal']} | {r['error']} |||")
                continue
            lines.append(f"| {r['impl']} | {r['S']} | {r['H']} | {r['D']} | {r['causal']} | {r['fwd_ms']:.2f} | "
                         f"{r['fwd_tflops']:.0f} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_tflops']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    device = "cuda:0"
    t0 = time.time()
    rows, info = correctness(device)
    for r in rows:
        errs = " ".join(f"{n}={e:.1e}" for n, e in r["errors"].items())
        print(f"{'PASS' if r['ok'] else 'FAIL'}  {r['path']:<15} {r['dtype']:<9} kvh={r['kv_heads']}  {r['case']:<28} "
              f"{errs}", flush=True)
    print(f"correctness: {sum(r['ok'] for r in rows)}/{len(rows)} passed in {time.time() - t0:.0f} s; {info}")
    bench = [] if args.no_bench else throughput(device, args.seq, args.heads, args.head_dim, args.reps)
    for r in bench:
        if "error" in r:
            print(f"{r['impl']:<25} S={r['S']} H={r['H']} causal={r['causal']}: {r['error']}")
        else:
            print(f"{r['impl']:<25} S={r['S']} H={r['H']} causal={r['causal']!s:<5} fwd {r['fwd_tflops']:6.1f} "
                  f"TFLOP/s  fwd+bwd {r['fwd_bwd_tflops']:6.1f} TFLOP/s", flush=True)
    summary = dict(device=torch.cuda.get_device_name(device), torch=torch.__version__, info=info,
                   correctness=rows, throughput=bench, seconds=time.time() - t0,
                   passed=all(r["ok"] for r in rows))
    out = Path(args.out)
    out.write_text(json.dumps(summary, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(summary))
    print(f"wrote {out} and {out.with_suffix('.md')}; {'PASS' if summary['passed'] else 'FAIL'}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
