"""``python -m benchmarks multihost``: ring attention across "machines" joined by real, shaped network links.

Every host is a network namespace (``benchmarks.harness.netns``); ranks rendezvous over the namespaces' own
addresses with gloo, as under ``torchrun`` on real machines, and the links between hosts are shaped
with ``tc`` (HTB rate; ``netem`` delay where the kernel has it). Three experiments:

1. ``overlap``: two hosts, one rank each, a fixed link rate; sweep the local length ``c`` and compare
   the ring's forward+backward time with the same ranks' kernel (compute-only) time, from
   ``ringattn.profile()``. The length where the exposed communication wait vanishes is compared with
   the Ring Attention paper's condition ``c >= F / B`` adapted to float32 and kv_heads:
   per step ``4 b c^2 h d`` FLOPs against ``2 b c kv_heads d * 4`` bytes of K and V, so
   ``c* = F * kv_heads * 4 / (2 * heads * B)``, with ``F`` the one-thread kernel FLOP/s measured on the
   ranks and ``B`` the gloo bandwidth measured over the shaped link.
2. ``hybrid``: two hosts with two ranks each, a slow link between hosts (loopback inside a host):
   flat ring vs. all-gather vs. hybrid (Ulysses inside a host, ring across), and ``strategy="auto"``.
3. ``scaling``: 8 and 16 ranks (one per host, over-subscribed cores): per-rank compute time and bytes
   moved of each strategy vs. world size at a fixed global length, and the load balance (max / mean
   FLOPs across ranks) of each causal layout.

Jobs (``*_job``) run inside the namespaces via ``python -m benchmarks.harness.netns``; ``run`` drives them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from ..common import machine, pyplot
from ..harness import netns

BYTES_FP32 = 4


# -- configuration ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OverlapConfig:
    # 8 query heads sharing one K/V head (MQA): a 1-thread AVX-512 kernel runs ~80 GFLOP/s, so with
    # kv_heads = heads the threshold would need a link faster than gloo moves data between local ranks.
    rates_mbit: tuple[float, ...] = (150.0, 400.0)
    lengths: tuple[int, ...] = (128, 181, 256, 362, 512, 724, 1024, 1448, 2048, 2896, 4096)
    heads: int = 8
    kv_heads: int = 1
    head_dim: int = 64
    repeats: int = 2
    chain_len: int = 3  # fwd+bwd calls measured back to back per repeat
    kernel_len: int = 512  # block length at which the kernel FLOP/s F is measured (median of 10)
    eps: float = 0.05  # "communication stops showing": forward wait below eps of forward compute


@dataclass(frozen=True)
class HybridConfig:
    rates_mbit: tuple[float | None, ...] = (100.0, 400.0, 1600.0, None)
    local_len: int = 1024
    heads: int = 8
    kv_heads: tuple[int, ...] = (8, 2)  # multi-head, and grouped-query (ring traffic shrinks 4x)
    head_dim: int = 64
    intra_bandwidth: float = 1.4e9  # gloo on loopback inside a host (the cpu preset of ringattn.plan), for the planner
    causal: bool = True
    layout: str = "zigzag"
    repeats: int = 2
    strategies: tuple[str, ...] = ("ring", "allgather", "ulysses", "hybrid", "auto")


@dataclass(frozen=True)
class ScalingConfig:
    worlds: tuple[int, ...] = (2, 4, 8, 16)
    seq_len: int = 4096
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 32
    rate_mbit: float | None = 1000.0
    combos: tuple[tuple[str, str], ...] = (("ring", "contiguous"), ("ring", "zigzag"), ("ring", "striped"),
                                           ("allgather", "contiguous"), ("allgather", "zigzag"),
                                           ("ulysses", "zigzag"))


QUICK_OVERLAP = OverlapConfig(rates_mbit=(200.0,), lengths=(256,), repeats=1, chain_len=1)
QUICK_HYBRID = HybridConfig(rates_mbit=(None,), local_len=128, repeats=1, kv_heads=(2,),
                            strategies=("ring", "ulysses", "hybrid", "auto"))
QUICK_SCALING = ScalingConfig(worlds=(2,), seq_len=512, combos=(("ring", "zigzag"), ("ulysses", "zigzag")))


# -- helpers used inside the workers --------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def _qkv(b: int, n: int, h: int, kvh: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=g).requires_grad_()
    k = torch.randn(b, n, kvh, d, generator=g).requires_grad_()
    v = torch.randn(b, n, kvh, d, generator=g).requires_grad_()
    dout = torch.randn(b, n, h, d, generator=g)
    return q, k, v, dout


def _stats(st) -> dict:
    return {"compute_s": st.compute_s, "wait_s": st.wait_s, "flops": st.flops, "bytes_sent": st.bytes_sent,
            "steps": st.steps}


def kernel_rate(n: int, heads: int, kv_heads: int, head_dim: int, repeats: int = 5) -> dict:
    """This rank's forward and backward FLOP/s of one non-causal ``n x n`` block, no communication:
    the median of ``repeats`` (typical, under whatever else shares the CPU) and the best (peak)."""
    from ringattn.kernels import select

    q, k, v, dout = (t.detach() for t in _qkv(1, n, heads, kv_heads, head_dim, 1))
    be = select(q, k, v)
    scale = head_dim ** -0.5
    flops = 4.0 * n * n * heads * head_dim
    out, lse = be.forward_dense(q, k, v, scale=scale, causal=False, mask=None)
    tf, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out, lse = be.forward_dense(q, k, v, scale=scale, causal=False, mask=None)
        t1 = time.perf_counter()
        be.backward_dense(dout, q, k, v, out, lse, scale=scale, causal=False, mask=None)
        t2 = time.perf_counter()
        tf.append(t1 - t0)
        tb.append(t2 - t1)
    return {"fwd_flops_per_s": flops / statistics.median(tf), "fwd_flops_per_s_best": flops / min(tf),
            "bwd_flops_per_s": 2.5 * flops / statistics.median(tb), "n": n}


def link_bandwidth(sizes: tuple[int, ...] = (1 << 18, 1 << 20, 2 << 20), repeats: int = 5) -> dict:
    """Ring-style exchange (send to rank + 1, receive from rank - 1, both posted at once, as a ring
    step does) of each size; best times, and the fit ``t = alpha + bytes / B`` over the sizes."""
    from ringattn.comm import Ring

    ring = Ring()
    times = []
    for n in sizes:
        x = torch.zeros(n // BYTES_FP32)
        ring.exchange((x,), 1, (x,), -1, 0).wait()
        ts = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            ring.exchange((x,), 1, (x,), -1, 0).wait()
            ts.append(time.perf_counter() - t0)
        times.append(min(ts))  # other load on the shared CPU only ever adds time
    mx, mt = statistics.fmean(sizes), statistics.fmean(times)
    slope = sum((x - mx) * (t - mt) for x, t in zip(sizes, times)) / sum((x - mx) ** 2 for x in sizes)
    return {"sizes": list(sizes), "median_s": times, "bytes_per_s": 1.0 / slope,
            "alpha_s": max(0.0, mt - slope * mx)}


def link_tx_bytes() -> int:
    """Bytes this host's veth has sent so far (its namespace's own /sys view): what really crossed
    the shaped link, TCP/IP headers included, loopback traffic between ranks of one host excluded."""
    import os

    path = pathlib.Path(f"/sys/class/net/{os.environ.get('GLOO_SOCKET_IFNAME', 'eth0')}/statistics/tx_bytes")
    return int(path.read_text()) if path.exists() else 0


def _fwd_bwd(fn, q, k, v, dout, barrier: bool = True) -> dict:
    """One profiled forward and backward; wall and Stats of each phase on this rank."""
    import ringattn

    for t in (q, k, v):
        t.grad = None
    if barrier:
        dist.barrier()
    c0 = time.thread_time()
    with ringattn.profile() as sf:
        t0 = time.perf_counter()
        out = fn(q, k, v)
        t1 = time.perf_counter()
    with ringattn.profile() as sb:
        out.backward(dout)
        t2 = time.perf_counter()
    # CPU time of this rank's (single) compute thread: its work whatever the over-subscription;
    # gloo's transport threads are not included.
    cpu = time.thread_time() - c0
    return {"fwd_wall_s": t1 - t0, "bwd_wall_s": t2 - t1, "cpu_s": cpu, "fwd": _stats(sf), "bwd": _stats(sb)}


# -- experiment 1: overlap threshold ---------------------------------------------------------------------
def overlap_job(lengths: list[int], heads: int, kv_heads: int, head_dim: int, repeats: int,
                chain_len: int, kernel_len: int) -> dict:
    """Inside a host: kernel rate, link bandwidth, then ring fwd+bwd at each local length."""
    import ringattn

    rank, world = _rank_world()
    dist.barrier()
    kr = kernel_rate(kernel_len, heads, kv_heads, head_dim, repeats=10)  # all ranks at once
    bw = link_bandwidth()
    sweep = []
    for n in lengths:
        q, k, v, dout = _qkv(1, n, heads, kv_heads, head_dim, 100 + rank)
        ring = lambda q, k, v: ringattn.ring_attention(q, k, v)  # noqa: E731
        _fwd_bwd(ring, q, k, v, dout)  # warm-up: plan cache, allocator, TCP windows
        runs = []
        for _ in range(repeats):
            # Calls back to back, as layers of a model: the ring's own exchanges keep the ranks in
            # step, so the first call absorbs the skew left by the barrier and is not kept.
            chain = [_fwd_bwd(ring, q, k, v, dout, barrier=i == 0) for i in range(1 + chain_len)]
            runs += chain[1:]
        sweep.append({"local_len": n, "runs": runs})
    return {"rank": rank, "world": world, "kernel": kr, "link": bw, "sweep": sweep}


def predicted_threshold(flops_per_s: float, bytes_per_s: float, heads: int, kv_heads: int,
                        bytes_per_elem: int = BYTES_FP32) -> float:
    """The paper's overlap condition for one ring step, adapted to the element size and kv_heads:
    ``4 c^2 h d / F = 2 c kvh d e / B``  =>  ``c* = F kvh e / (2 h B)`` (``F / B`` for bf16, h = kvh)."""
    return flops_per_s * kv_heads * bytes_per_elem / (2.0 * heads * bytes_per_s)


def predicted_threshold_latency(flops_per_s: float, bytes_per_s: float, alpha_s: float, heads: int,
                                kv_heads: int, head_dim: int, bytes_per_elem: int = BYTES_FP32) -> float:
    """The same condition with a per-message latency: ``4 c^2 h d / F = alpha + 2 c kvh d e / B``."""
    a = 4.0 * heads * head_dim / flops_per_s
    b = 2.0 * kv_heads * head_dim * bytes_per_elem / bytes_per_s
    return (b + math.sqrt(b * b + 4 * a * alpha_s)) / (2 * a)


def measured_threshold(lengths: list[int], exposed: list[float], eps: float) -> float | None:
    """The length (log-interpolated) past which the exposed fraction stays below ``eps``."""
    last_above = max((i for i, e in enumerate(exposed) if e > eps), default=None)
    if last_above is None:
        return None if not lengths else float(lengths[0])  # hidden everywhere measured: at most this
    if last_above == len(lengths) - 1:
        return None  # never hidden in the sweep
    i = last_above
    e0, e1 = exposed[i], exposed[i + 1]
    f = (e0 - eps) / (e0 - e1) if e0 != e1 else 0.0
    return float(math.exp(math.log(lengths[i]) + f * (math.log(lengths[i + 1]) - math.log(lengths[i]))))


def _mean(xs) -> float:
    return float(statistics.fmean(xs))


def run_overlap(cfg: OverlapConfig, quick: bool) -> dict:
    results = []
    for rate in cfg.rates_mbit:
        with netns.Cluster(netns.ClusterSpec(hosts=2, link=netns.Link(rate_mbit=rate))) as c:
            ranks = c.run(f"{__name__}:overlap_job", dict(lengths=list(cfg.lengths), heads=cfg.heads,
                          kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, repeats=cfg.repeats,
                          chain_len=cfg.chain_len, kernel_len=cfg.kernel_len), timeout=900)
        F = _mean(r["kernel"]["fwd_flops_per_s"] for r in ranks)
        B = _mean(r["link"]["bytes_per_s"] for r in ranks)
        rows = []
        for i, n in enumerate(cfg.lengths):
            # Times: each rank's fastest call (other load on the shared CPU only adds time). Exposure:
            # the median call, since interference can also hide communication (a rank descheduled
            # mid-kernel computes "longer" while its transfer runs on).
            runs = [r["sweep"][i]["runs"] for r in ranks]
            per = [min(rs, key=lambda r: r["fwd_wall_s"] + r["bwd_wall_s"]) for rs in runs]
            exposed = [[r["fwd"]["wait_s"] / r["fwd"]["compute_s"] for r in rs] for rs in runs]
            fwd_c = _mean(p["fwd"]["compute_s"] for p in per)
            bwd_c = _mean(p["bwd"]["compute_s"] for p in per)
            rows.append({
                "local_len": n,
                "ring_fwd_bwd_s": _mean(p["fwd_wall_s"] + p["bwd_wall_s"] for p in per),
                "compute_fwd_bwd_s": fwd_c + bwd_c,
                "fwd_wall_s": _mean(p["fwd_wall_s"] for p in per), "fwd_compute_s": fwd_c,
                "fwd_wait_s": _mean(p["fwd"]["wait_s"] for p in per),
                "bwd_wall_s": _mean(p["bwd_wall_s"] for p in per), "bwd_compute_s": bwd_c,
                "bwd_wait_s": _mean(p["bwd"]["wait_s"] for p in per),
                "bytes_sent_per_rank": _mean(p["fwd"]["bytes_sent"] + p["bwd"]["bytes_sent"] for p in per),
                "flops_per_rank": _mean(p["fwd"]["flops"] + p["bwd"]["flops"] for p in per),
                "fwd_exposed": _mean(statistics.median(e) for e in exposed),
                "fwd_exposed_min": _mean(min(e) for e in exposed),
                "fwd_exposed_max": _mean(max(e) for e in exposed),
                "fwd_bwd_overhead": _mean((p["fwd_wall_s"] + p["bwd_wall_s"]) /
                                          (p["fwd"]["compute_s"] + p["bwd"]["compute_s"]) - 1 for p in per),
                "kernel_fwd_flops_per_s": _mean(p["fwd"]["flops"] / p["fwd"]["compute_s"] for p in per),
            })
        pred = predicted_threshold(F, B, cfg.heads, cfg.kv_heads)
        pred_nominal = predicted_threshold(F, rate * 1e6 / 8, cfg.heads, cfg.kv_heads)
        alpha = _mean(r["link"]["alpha_s"] for r in ranks)
        pred_lat = predicted_threshold_latency(F, B, alpha, cfg.heads, cfg.kv_heads, cfg.head_dim)
        # The kernel rate the ranks actually got inside the ring (the CPU is shared), for comparison.
        F_ring = statistics.median(r["kernel_fwd_flops_per_s"] for r in rows)
        pred_ring = predicted_threshold(F_ring, B, cfg.heads, cfg.kv_heads)
        meas = measured_threshold(list(cfg.lengths), [r["fwd_exposed"] for r in rows], cfg.eps)
        ratio = None if meas is None else max(pred, meas) / min(pred, meas)
        results.append({
            "rate_mbit": rate, "kernel_flops_per_s": F,
            "kernel_flops_per_s_best": _mean(r["kernel"]["fwd_flops_per_s_best"] for r in ranks),
            "kernel_bwd_flops_per_s":
                _mean(r["kernel"]["bwd_flops_per_s"] for r in ranks),
            "link_bytes_per_s": B, "link_alpha_s": alpha, "link": [r["link"] for r in ranks],
            "predicted_threshold": pred, "predicted_threshold_nominal_rate": pred_nominal,
            "predicted_threshold_with_latency": pred_lat,
            "ring_kernel_flops_per_s": F_ring, "predicted_threshold_ring_flops": pred_ring,
            "ratio_with_latency": None if meas is None else max(pred_lat, meas) / min(pred_lat, meas),
            "measured_threshold": meas, "ratio": ratio, "within_1_5": ratio is not None and ratio <= 1.5,
            "rows": rows,
        })
        print(f"  overlap @ {rate:g} Mbit/s: F={F / 1e9:.1f} GFLOP/s B={B / 1e6:.1f} MB/s "
              f"alpha={alpha * 1e3:.2f}ms predicted c*={pred:.0f} (with latency {pred_lat:.0f}; with the "
              f"in-ring kernel rate {F_ring / 1e9:.1f} GFLOP/s: {pred_ring:.0f}) "
              f"measured c*={meas if meas is None else round(meas)} "
              f"ratio={ratio if ratio is None else round(ratio, 2)}", flush=True)
    return {"config": asdict(cfg), "results": results}


# -- experiment 3: scaling past 8 ranks -------------------------------------------------------------------
def scaling_job(seq_len: int, heads: int, kv_heads: int, head_dim: int, combos: list) -> dict:
    """Inside a host: causal fwd+bwd of each (strategy, layout) at a fixed global length."""
    import ringattn

    rank, world = _rank_world()
    n = seq_len // world
    out = {"rank": rank, "world": world, "local_len": n, "runs": {}}
    for strategy, layout in combos:
        q, k, v, dout = _qkv(1, n, heads, kv_heads, head_dim, 7 + rank)

        def fn(q, k, v, strategy=strategy, layout=layout):
            return ringattn.attention(q, k, v, strategy=strategy, causal=True, layout=layout)

        dist.barrier()
        tx0 = link_tx_bytes()
        try:
            # A small call first: lazy imports and first-call set-up stay out of the measurement.
            _fwd_bwd(fn, *(t[:, :64].detach().requires_grad_(t.requires_grad) for t in (q, k, v, dout)))
            tx0 = link_tx_bytes()
            res = _fwd_bwd(fn, q, k, v, dout)
            dist.barrier()
            res["link_tx_bytes"] = link_tx_bytes() - tx0
        except Exception as e:  # noqa: BLE001 - argument errors and bugs alike are raised on every rank
            res = {"error": f"{type(e).__name__}: {e}"}
        out["runs"][f"{strategy}/{layout}"] = res
    return out


def theory_bytes_per_rank(strategy: str, world: int, seq_len: int, heads: int, kv_heads: int,
                          head_dim: int) -> float:
    """Bytes one rank sends in a causal fwd+bwd with float32 activations (no skipped steps assumed).

    ring: W-1 K/V blocks forward; backward K/V again plus float32 dK/dV per hop, and the return hop.
    allgather: its K/V share forwarded W-1 times (ring all-gather), again in backward, and the
    reduce-scatter of dK/dV: the same bytes as the ring.
    ulysses: q, k, v, out all-to-all forward, dout and dq, dk, dv backward, (W-1)/W of each, K/V
    replicated when kv_heads < W.
    """
    c, e, W = seq_len // world, BYTES_FP32, world
    kv = 2 * c * kv_heads * head_dim * e
    qo = c * heads * head_dim * e
    if W == 1:
        return 0.0
    if strategy == "ring":
        return (W - 1) * kv + (W - 1) * kv + (W - 1) * kv
    if strategy == "allgather":  # gathered again in backward, then reduce-scatter of dK/dV
        return 3 * (W - 1) * kv
    if strategy == "ulysses":
        # fwd q, k, v, out; bwd dout, dq, dk, dv. With kv_heads < W every K/V head is replicated
        # W / gcd(kv_heads, W) times before the all-to-all (strategies.kv_replication).
        return (W - 1) / W * (4 * qo + 2 * kv * (W // math.gcd(kv_heads, W)))
    return float("nan")


def run_scaling(cfg: ScalingConfig, quick: bool) -> dict:
    worlds = []
    for W in cfg.worlds:
        t0 = time.perf_counter()
        with netns.Cluster(netns.ClusterSpec(hosts=W, link=netns.Link(rate_mbit=cfg.rate_mbit))) as c:
            ranks = c.run(f"{__name__}:scaling_job", dict(seq_len=cfg.seq_len, heads=cfg.heads,
                          kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                          combos=[list(x) for x in cfg.combos]), timeout=900)
        combos = {}
        for key in ranks[0]["runs"]:
            per = [r["runs"][key] for r in ranks]
            if "error" in per[0]:
                combos[key] = {"error": per[0]["error"]}
                continue
            flops = [p["fwd"]["flops"] + p["bwd"]["flops"] for p in per]
            comp = [p["fwd"]["compute_s"] + p["bwd"]["compute_s"] for p in per]
            sent = [p["fwd"]["bytes_sent"] + p["bwd"]["bytes_sent"] for p in per]
            wait = [p["fwd"]["wait_s"] + p["bwd"]["wait_s"] for p in per]
            busy = [p["fwd_wall_s"] + p["bwd_wall_s"] - w for p, w in zip(per, wait)]
            cpu = [p["cpu_s"] for p in per]
            strategy = key.split("/")[0]
            combos[key] = {
                "bytes_sent_per_rank_mean": _mean(sent), "bytes_sent_per_rank_max": max(sent),
                "link_tx_bytes_per_rank_mean": _mean(p["link_tx_bytes"] for p in per),
                "bytes_theory": theory_bytes_per_rank(strategy, W, cfg.seq_len, cfg.heads, cfg.kv_heads,
                                                      cfg.head_dim),
                "flops_max_over_mean": max(flops) / _mean(flops) if _mean(flops) > 0 else None,
                "flops_per_rank_mean": _mean(flops),
                # per-rank CPU time of the compute thread: the compute figure that over-subscription
                # does not distort (kernel wall times include time the core ran other ranks)
                "cpu_s_per_rank_mean": _mean(cpu), "cpu_s_per_rank_max": max(cpu),
                "cpu_max_over_mean": max(cpu) / _mean(cpu),
                "compute_s_per_rank_mean": _mean(comp), "compute_s_per_rank_max": max(comp),
                "compute_max_over_mean": max(comp) / _mean(comp) if _mean(comp) > 0 else None,
                "wait_s_per_rank_mean": _mean(wait),
                # wall minus wait: compute plus local overheads; for strategies that do not time
                # their kernels (compute_s 0) the only per-rank compute figure available
                "busy_s_per_rank_mean": _mean(busy), "busy_s_per_rank_max": max(busy),
                "wall_s_max": max(p["fwd_wall_s"] + p["bwd_wall_s"] for p in per),
            }
        worlds.append({"world": W, "local_len": cfg.seq_len // W, "combos": combos,
                       "harness_s": time.perf_counter() - t0})
        print(f"  scaling W={W}: " + ", ".join(
            f"{k} {v['bytes_sent_per_rank_mean'] / 1e6:.1f}MB lb={v['flops_max_over_mean']:.2f}"
            for k, v in combos.items() if "error" not in v), flush=True)
    return {"config": asdict(cfg), "worlds": worlds}


# -- experiment 2: two hosts x two ranks ----------------------------------------------------------------
def hybrid_available() -> str | None:
    """Why the hybrid experiment cannot run (``None`` when it can)."""
    try:
        from ringattn.strategies import hybrid  # noqa: F401
    except ImportError as e:
        return f"strategy 'hybrid' not available: {e}"
    return None


def _cross_host_bandwidth(ranks_per_host: int, nbytes: int = 4 << 20, repeats: int = 3) -> float:
    """Bytes/s each rank gets exchanging with its counterpart on the other host (all pairs at once,
    both directions, as the ring dimension of the mesh does); the minimum over ranks, on every rank."""
    rank, world = _rank_world()
    peer = (rank + ranks_per_host) % world
    x, y = torch.zeros(nbytes // BYTES_FP32), torch.zeros(nbytes // BYTES_FP32)
    best = math.inf
    for _ in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, y, peer)]):
            w.wait()
        best = min(best, time.perf_counter() - t0)
    bw = torch.tensor([nbytes / best])
    dist.all_reduce(bw, op=dist.ReduceOp.MIN)
    return float(bw)


def hybrid_job(local_len: int, heads: int, kv_heads_list: list[int], head_dim: int, causal: bool,
               layout: str, repeats: int, strategies: list[str], ranks_per_host: int,
               intra_bandwidth: float) -> dict:
    """Inside a host: fwd+bwd of each strategy on a (hosts x ranks_per_host) mesh, ring across hosts.

    Also measures what the planner needs (kernel FLOP/s per rank with every rank busy, the cross-host
    bandwidth), configures ``ringattn.plan`` with it, and records its estimates and choices.
    """
    from torch.distributed.device_mesh import init_device_mesh

    import ringattn
    from ringattn import plan
    from ringattn.call import auto_strategy

    rank, world = _rank_world()
    mesh = init_device_mesh("cpu", (world // ranks_per_host, ranks_per_host),
                            mesh_dim_names=("ring", "ulysses"))
    bw = _cross_host_bandwidth(ranks_per_host)
    out = {"rank": rank, "cross_host_bytes_per_s": bw, "by_kv_heads": {}}
    for kv_heads in kv_heads_list:
        dist.barrier()
        f = torch.tensor([kernel_rate(local_len, heads, kv_heads, head_dim)["fwd_flops_per_s"]])
        dist.all_reduce(f)  # the same Hardware on every rank, so "auto" decides the same everywhere
        hw = plan.Hardware("netns-2-hosts", float(f) / world, bw, latency=2e-4, node_size=ranks_per_host,
                           intra_bandwidth=intra_bandwidth, note="measured inside the namespaces")
        plan.set_hardware(hw)
        problem = plan.Problem(seq_len=world * local_len, world=world, heads=heads, kv_heads=kv_heads,
                               head_dim=head_dim, dtype_bytes=BYTES_FP32, causal=causal, layout=layout,
                               backward=True, mesh=(world // ranks_per_host, ranks_per_host))
        ests = plan.estimate_all(problem, hw)
        res = {"hardware": dataclasses.asdict(hw),
               "planner": {e.strategy: {"time_s": e.time_s, "feasible": e.feasible, "comm_bytes": e.comm_bytes,
                                        "exposed_s": e.exposed_s} for e in ests},
               "planner_recommends": plan.recommend(ests), "runs": {}}
        q, k, v, dout = _qkv(1, local_len, heads, kv_heads, head_dim, 11 + rank)
        for strategy in strategies:
            # "auto" without a mesh: the planner picks among the flat strategies (with a mesh it
            # always answers "hybrid", since the shards were laid out for that mesh).
            kw = {"mesh": mesh} if strategy == "hybrid" else {}

            def fn(q, k, v, strategy=strategy, kw=kw):
                return ringattn.attention(q, k, v, strategy=strategy, causal=causal, layout=layout, **kw)

            dist.barrier()
            tx0 = link_tx_bytes()
            try:
                runs = [_fwd_bwd(fn, q, k, v, dout) for _ in range(repeats + 1)]
            except Exception as e:  # noqa: BLE001 - argument errors and bugs alike are raised on every rank
                res["runs"][strategy] = {"error": f"{type(e).__name__}: {e}"}
                continue
            dist.barrier()
            link = (link_tx_bytes() - tx0) / len(runs)  # per fwd+bwd, whole host (both its ranks)
            best = min(runs[1:], key=lambda r: r["fwd_wall_s"] + r["bwd_wall_s"])
            best["host_link_tx_bytes"] = link
            if strategy == "auto":
                best["chose"] = str(auto_strategy(q, k, v, causal=causal, layout=layout))
            res["runs"][strategy] = best
        plan.set_hardware(None)
        out["by_kv_heads"][str(kv_heads)] = res
    return out


def run_hybrid(cfg: HybridConfig, quick: bool) -> dict:
    why = hybrid_available()
    if why:
        print(f"  hybrid: skipped ({why})", flush=True)
        return {"config": asdict(cfg), "skipped": why}
    rows = []
    with netns.Cluster(netns.ClusterSpec(hosts=2)) as c:
        for rate in cfg.rates_mbit:
            c.shape(netns.Link(rate_mbit=rate))
            ranks = c.run(f"{__name__}:hybrid_job", dict(
                local_len=cfg.local_len, heads=cfg.heads, kv_heads_list=list(cfg.kv_heads), head_dim=cfg.head_dim,
                causal=cfg.causal, layout=cfg.layout, repeats=cfg.repeats, strategies=list(cfg.strategies),
                ranks_per_host=2, intra_bandwidth=cfg.intra_bandwidth), ranks_per_host=2, timeout=900)
            for kvh in cfg.kv_heads:
                res = [r["by_kv_heads"][str(kvh)] for r in ranks]
                row = {"rate_mbit": rate, "kv_heads": kvh, "cross_host_bytes_per_s": ranks[0]["cross_host_bytes_per_s"],
                       "hardware": res[0]["hardware"], "planner": res[0]["planner"],
                       "planner_recommends": res[0]["planner_recommends"], "strategies": {}}
                for s in cfg.strategies:
                    per = [r["runs"][s] for r in res]
                    if "error" in per[0]:
                        row["strategies"][s] = {"error": per[0]["error"]}
                        continue
                    row["strategies"][s] = {
                        "fwd_bwd_s": max(p["fwd_wall_s"] + p["bwd_wall_s"] for p in per),
                        "wait_s_mean": _mean(p["fwd"]["wait_s"] + p["bwd"]["wait_s"] for p in per),
                        "cpu_s_max": max(p["cpu_s"] for p in per),
                        "bytes_sent_per_rank": _mean(p["fwd"]["bytes_sent"] + p["bwd"]["bytes_sent"] for p in per),
                        # counted on the veth: what crossed the slow link, per host (the two ranks of
                        # a host read the same counter, so every other rank)
                        "host_link_tx_bytes": _mean(p["host_link_tx_bytes"] for p in per[::2]),
                        **({"chose": per[0]["chose"]} if "chose" in per[0] else {}),
                    }
                timed = {s: v["fwd_bwd_s"] for s, v in row["strategies"].items() if "error" not in v and s != "auto"}
                row["fastest"] = min(timed, key=timed.get) if timed else None
                flat = {s: t for s, t in timed.items() if s != "hybrid"}
                row["fastest_flat"] = min(flat, key=flat.get) if flat else None
                row["auto_chose"] = row["strategies"].get("auto", {}).get("chose")
                row["auto_picked_fastest_flat"] = (row["auto_chose"] == row["fastest_flat"]
                                                   if row["auto_chose"] else None)
                row["planner_picked_fastest"] = row["planner_recommends"] == row["fastest"]
                rows.append(row)
                print(f"  hybrid @ {f'{rate:g} Mbit/s' if rate else 'unshaped'}, kv_heads={kvh}: " + ", ".join(
                    f"{s} {v['fwd_bwd_s']:.3f}s" for s, v in row["strategies"].items() if "error" not in v)
                    + f"; fastest {row['fastest']} (flat: {row['fastest_flat']}), auto chose {row['auto_chose']},"
                    f" planner recommends {row['planner_recommends']}", flush=True)
    return {"config": asdict(cfg), "rows": rows}


# -- driver ---------------------------------------------------------------------------------------------
def run(out: pathlib.Path, quick: bool) -> dict:
    """Run the three experiments; writes ``multihost*.png`` and ``multihost_<exp>.json`` into ``out``."""
    why = netns.unavailable()
    if why:
        print(f"  multihost: skipped ({why})", flush=True)
        return {"machine": machine(), "skipped": why}
    cfgs = (QUICK_OVERLAP, QUICK_HYBRID, QUICK_SCALING) if quick else \
        (OverlapConfig(), HybridConfig(), ScalingConfig())
    result = {"machine": machine(), "quick": quick, "netem": netns.has_netem()}
    experiments = (("overlap", run_overlap, cfgs[0]), ("scaling", run_scaling, cfgs[2]),
                   ("hybrid", run_hybrid, cfgs[1]))
    # A quick run is a smoke test of the harness: every launch into namespaces costs seconds of start-up,
    # and the hybrid experiment already runs every strategy across two shaped "hosts".
    if quick:
        result["scaling"] = {"config": asdict(cfgs[2]), "worlds": [], "skipped": "not in a quick run"}
    for name, fn, cfg in experiments[::2] if quick else experiments:
        t0, load0 = time.perf_counter(), os.getloadavg()
        result[name] = fn(cfg, quick)
        result[name]["elapsed_s"] = time.perf_counter() - t0
        # Other work may share the cores: record how busy the machine was.
        result[name]["loadavg_1min_before_after"] = [load0[0], os.getloadavg()[0]]
        (out / f"multihost_{name}.json").write_text(json.dumps(result[name], indent=2, default=str))
    plot(result, out)
    left = [n for n in netns.list_namespaces() if n.startswith(netns.BASE_PREFIX)]
    result["namespaces_left"] = left
    return result


def plot(result: dict, out: pathlib.Path) -> None:
    plt = pyplot()
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    ov = result["overlap"]["results"]
    ax, ax2 = axes[0, 0], axes[1, 0]
    for r in ov:
        ls = [row["local_len"] for row in r["rows"]]
        line, = ax.plot(ls, [row["ring_fwd_bwd_s"] * 1e3 for row in r["rows"]], "o-",
                        label=f"ring fwd+bwd, {r['rate_mbit']:g} Mbit/s")
        ax.plot(ls, [row["compute_fwd_bwd_s"] * 1e3 for row in r["rows"]], "x--", color=line.get_color(),
                label="  compute only (same ranks)")
        ax2.plot(ls, [row["fwd_exposed"] for row in r["rows"]], "o-", color=line.get_color(),
                 label=f"{r['rate_mbit']:g} Mbit/s (median call)")
        ax2.fill_between(ls, [row["fwd_exposed_min"] for row in r["rows"]],
                         [row["fwd_exposed_max"] for row in r["rows"]], color=line.get_color(), alpha=0.15)
        ax2.axvline(r["predicted_threshold"], color=line.get_color(), ls=":", lw=1.5)
        if r["measured_threshold"]:
            ax2.axvline(r["measured_threshold"], color=line.get_color(), ls="-", lw=0.8)
    eps = result["overlap"]["config"]["eps"]
    ax2.axhline(eps, color="gray", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="local length c (tokens per rank)", ylabel="ms",
           title="1. ring vs compute-only, 2 hosts")
    ax2.set_yscale("symlog", linthresh=0.01)
    ax2.set_ylim(0, None)
    ax2.set(xscale="log", xlabel="local length c",
            ylabel="forward wait / forward compute (band: min-max)",
            title="exposed comm; dotted: predicted c*, solid: measured")
    ax.legend(fontsize=7)
    ax2.legend(fontsize=7)

    sc = result["scaling"]["worlds"]
    ax, ax2 = axes[0, 1], axes[1, 1]
    keys = sorted({k for w in sc for k, v in w["combos"].items() if "error" not in v})
    for key in keys:
        ws = [w["world"] for w in sc if key in w["combos"] and "error" not in w["combos"][key]]
        vals = [w["combos"][key] for w in sc if key in w["combos"] and "error" not in w["combos"][key]]
        ax.plot(ws, [v["bytes_sent_per_rank_mean"] / 1e6 for v in vals], "o-", label=key)
        ax2.plot(ws, [v["flops_max_over_mean"] for v in vals], "o-", label=key)
    ax.set(xscale="log", xlabel="world size (one rank per host)", ylabel="MB sent per rank (fwd+bwd)",
           title=f"3. communication per rank, S={result['scaling']['config']['seq_len']} causal")
    ax2.set(xscale="log", xlabel="world size", ylabel="max / mean FLOPs over ranks",
            title="3. causal load balance")
    ax.legend(fontsize=7)
    ax2.legend(fontsize=7)
    ax = axes[0, 2]
    for key in keys:
        ws = [w["world"] for w in sc if key in w["combos"] and "error" not in w["combos"][key]]
        vals = [w["combos"][key] for w in sc if key in w["combos"] and "error" not in w["combos"][key]]
        line, = ax.plot(ws, [v["cpu_s_per_rank_max"] for v in vals], "o-", label=f"{key} max")
        ax.plot(ws, [v["cpu_s_per_rank_mean"] for v in vals], "x--", color=line.get_color(), label="  mean")
    ax.set(xscale="log", yscale="log", xlabel="world size", ylabel="CPU s of the rank's compute thread",
           title="3. per-rank compute (thread CPU time, fwd+bwd)")
    ax.legend(fontsize=7)

    ax = axes[1, 2]
    hy = result["hybrid"]
    if "skipped" in hy:
        ax.text(0.5, 0.5, "2. hybrid: " + hy["skipped"], ha="center", va="center", wrap=True, fontsize=8)
        ax.set_axis_off()
    else:
        plot_hybrid(ax, hy)
    for ax in (axes[0, 0], axes[1, 0], axes[0, 1], axes[1, 1], axes[0, 2]):
        ax.xaxis.set_major_locator(LogLocator(base=2))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(out / "multihost.png", dpi=110)
    # One picture per experiment too, cut from the same figure.
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    for name, group in (("overlap", [axes[0, 0], axes[1, 0]]), ("scaling", [axes[0, 1], axes[1, 1], axes[0, 2]]),
                        ("hybrid", [axes[1, 2]])):
        box = Bbox.union([ax.get_tightbbox(renderer) for ax in group]).transformed(fig.dpi_scale_trans.inverted())
        fig.savefig(out / f"multihost_{name}.png", dpi=110, bbox_inches=box.expanded(1.02, 1.02))
    plt.close(fig)


def plot_hybrid(ax, hy: dict) -> None:
    rows = hy["rows"]
    labels = [(f"{r['rate_mbit']:g}" if r["rate_mbit"] else "unshaped") + f"\nkvh={r['kv_heads']}" for r in rows]
    names = [s for s in hy["config"]["strategies"] if s != "auto"]
    width = 0.8 / max(1, len(names))
    for i, s in enumerate(names):
        ys = [r["strategies"].get(s, {}).get("fwd_bwd_s", float("nan")) for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], ys, width, label=s)
    top = max((v["fwd_bwd_s"] for r in rows for v in r["strategies"].values() if "fwd_bwd_s" in v), default=1)
    for x, r in enumerate(rows):
        ax.text(x + 0.4 - width / 2, top * 1.1, f"auto: {r.get('auto_chose')}\nplan: {r['planner_recommends']}",
                ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels, fontsize=7)
    ax.set(xlabel="link between hosts (Mbit/s), kv_heads", ylabel="fwd+bwd s (slowest rank)", yscale="log",
           title="2. two hosts x two ranks (causal, zigzag)", ylim=(None, top * 6))
    ax.legend(fontsize=7, loc="lower left")
