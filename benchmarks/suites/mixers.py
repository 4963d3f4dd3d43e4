"""Token mixers of hybrid models, context-parallel: W ranks x 1 thread vs 1 process x 2 threads running the
same code over the whole sequence (``ringattn.mixers`` with one rank), same run, forward + backward.

Mixers, each transformers' own pure-torch code path as the step: Mamba2 / SSD (``mamba2_chunk_scan``),
Gated DeltaNet (``torch_chunk_gated_delta_rule``), Mamba1 (``mamba_selective_scan``: it takes no initial
state, so only the correction path can pass one; forward only, its sequential loop's backward is
quadratic in the length), and a depthwise causal convolution (``causal_conv1d``).
ratio = single-process time / slowest rank's time. Per rank: the forward's parts (the local pass from a
zero state, the transition, the correction, the rest: exchange and fold), bytes each rank puts into
collectives per layer (measured by counting what is handed to torch.distributed), peak memory growth.
"""

from __future__ import annotations

import math
import os
import pathlib
import tempfile
import time

import torch
import torch.distributed as dist

from ringattn import mixers as mx

from ..common import best_of, machine, pyplot, reset_peak_rss, rss_mb, save_figure

NAMES = ("mamba2", "gdn", "mamba1", "conv")
GOAL = {"mamba2": 0.85, "mamba1": 0.85, "conv": 0.85, "gdn": 0.7}
LABEL = {"mamba2": "Mamba2 / SSD", "gdn": "Gated DeltaNet", "mamba1": "Mamba1", "conv": "causal conv k=4"}
SIZES = {  # per token: Mamba2 heads x head_dim x state; GDN heads x K = V; Mamba1 channels x state; conv channels
    "mamba2": dict(H=4, P=32, N=32, chunk=256),
    "gdn": dict(H=1, K=64, chunk=64),
    "mamba1": dict(D=32, N=8),
    "conv": dict(C=256, k=4),
}
# Mamba1's step is transformers' sequential loop, whose backward re-allocates the whole sequence's
# gradient at every token (quadratic): forward only.
FORWARD_ONLY = ("mamba1",)
TINY = {"mamba2": dict(H=2, P=4, N=3, chunk=8), "gdn": dict(H=2, K=4, chunk=4), "mamba1": dict(D=3, N=2),
        "conv": dict(C=3, k=4)}

PARTS: dict[str, float] = {}


def _timed(key, fn):
    def wrapped(*a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        PARTS[key] = PARTS.get(key, 0.0) + time.perf_counter() - t0
        return out
    return wrapped


def inputs(name: str, S: int, size: dict, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """The per-token inputs of one layer over the whole sequence (batch 1), the same on every rank."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    def u(*shape, lo, hi):
        return (lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)).to(dtype)

    if name == "mamba2":
        return [r(1, S, size["H"], size["P"]), u(1, S, size["H"], lo=0.001, hi=0.1),
                r(1, S, 1, size["N"]), r(1, S, 1, size["N"])]
    if name == "gdn":
        k = torch.nn.functional.normalize(r(1, S, size["H"], size["K"]), dim=-1)
        return [r(1, S, size["H"], size["K"]), k, r(1, S, size["H"], size["K"]),
                u(1, S, size["H"], lo=-0.1, hi=-0.001), u(1, S, size["H"], lo=0.1, hi=0.9)]
    if name == "mamba1":
        return [r(1, S, size["D"]), u(1, S, size["D"], lo=0.001, hi=0.1), r(1, S, size["N"]), r(1, S, size["N"])]
    return [r(1, S, size["C"])]


def weights(name: str, size: dict, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(1)
    if name == "mamba2":
        return {"A": -torch.linspace(0.5, 4.0, size["H"], dtype=torch.float64).to(dtype)}
    if name == "mamba1":
        return {"A": -torch.rand(size["D"], size["N"], generator=g, dtype=torch.float64).add(0.5).to(dtype)}
    if name == "conv":
        return {"w": torch.randn(size["C"], size["k"], generator=g, dtype=torch.float64).to(dtype),
                "b": torch.randn(size["C"], generator=g, dtype=torch.float64).to(dtype)}
    return {}


def layer(name: str, xs: list[torch.Tensor], plan: mx.Fragments, size: dict, wts: dict, mode: str = "correct"):
    """One mixer layer on this rank's shard. ``mode``: "correct" (zero-state pass, exchange, correction)
    or "rerun" (pieces that continue a document run again from their true state)."""
    if name == "conv":
        return mx.causal_conv1d(xs[0], wts["w"], wts["b"], plan=plan)
    if mode == "rerun":
        (step, transition, kw), correct = _rerun_callables(name, size, wts), None
    else:
        step, transition, correct, kw = _callables(name, size, wts)
    return mx.run_fragments(_timed("step", step), _timed("transition", transition), xs, plan=plan,
                            correct=None if correct is None else _timed("correct", correct), **kw)


def _callables(name, size, wts):
    if name == "mamba2":
        from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

        A, H, P, N = wts["A"], size["H"], size["P"], size["N"]

        def step(x, dt, b, c, h0):
            return mamba2_chunk_scan(x, dt, A, b, c, size["chunk"], initial_states=h0, return_final_states=True)

        def transition(x, dt, b, c):  # a scalar per head: exp(sum A dt)
            return torch.exp((dt * A).sum(1))[..., None, None]

        def correct(x, dt, b, c, h0):  # y_t += exp(cumsum A dt)_t C_t . h0 (state (H, P, N))
            decay = torch.exp(torch.cumsum(dt * A, 1))
            return torch.einsum("btn,bhpn->bthp", c[:, :, 0].to(h0.dtype), h0) * decay[..., None]

        return step, transition, correct, dict(kind="diagonal", state_shape=(H, P, N), transition_shape=(H, 1, 1))
    if name == "mamba1":
        from transformers.models.mamba.modeling_mamba import mamba_selective_scan

        A, D, N = wts["A"], size["D"], size["N"]

        def step(x, dt, b, c, h0):
            if h0 is not None:
                raise ValueError("mamba_selective_scan takes no initial state: pass correct=")
            y, h = mamba_selective_scan(x.transpose(1, 2), dt.transpose(1, 2), A, b.transpose(1, 2),
                                        c.transpose(1, 2), return_last_state=True)
            return y.transpose(1, 2), h

        def transition(x, dt, b, c):  # diagonal per channel and state: exp(A sum dt)
            return torch.exp(A * dt.sum(1)[..., None])

        def correct(x, dt, b, c, h0):  # y_t[d] += sum_n C_t[n] exp(A[d, n] cumsum(dt)_t[d]) h0[d, n]
            decay = torch.exp(A * torch.cumsum(dt, 1)[..., None])
            return torch.einsum("btdn,btn->btd", decay * h0[:, None], c.to(h0.dtype))

        return step, transition, correct, dict(kind="diagonal", state_shape=(D, N))
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule as rule

    H, K = size["H"], size["K"]

    def step(q, k, v, g, beta, h0):
        # One pass of the rule with K more value columns, zero values and the identity as their initial
        # state: those columns' state ends as the span's transition M, and their outputs are P_t with
        # y_t's part due to an initial state h equal to P_t^T h. The rule acts on each value column alike.
        if h0 is not None:
            return rule(q, k, v, g, beta, chunk_size=size["chunk"], initial_state=h0, output_final_state=True)
        n = q.shape[0]
        eye = torch.eye(K, dtype=torch.float32).expand(n, H, K, K)
        y, s = rule(q, k, torch.cat([v, v.new_zeros(v.shape)], -1), g, beta, chunk_size=size["chunk"],
                    initial_state=torch.cat([eye.new_zeros(n, H, K, K), eye], -1), output_final_state=True)
        return y[..., :K], s[..., :K], (s[..., K:], y[..., K:])

    def transition(*spans, aux):
        return aux[0]

    def correct(*spans_and_state, aux):
        return torch.einsum("bthj,bhjv->bthv", aux[1].to(spans_and_state[-1].dtype), spans_and_state[-1])

    return step, transition, correct, dict(kind="dense", state_shape=(H, K, K))


def _rerun_callables(name, size, wts):
    """The callables of the rerun path (no correction): the step runs from any state; Gated DeltaNet's
    transition is the rule run from the identity with zero values."""
    step, transition, _, kw = _callables(name, size, wts)
    if name != "gdn":
        return step, transition, kw
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule as rule

    def plain(q, k, v, g, beta, h0):
        return rule(q, k, v, g, beta, chunk_size=size["chunk"], initial_state=h0, output_final_state=True)

    def transition_from_eye(q, k, v, g, beta):
        eye = torch.eye(size["K"], dtype=torch.float32).expand(q.shape[0], size["H"], size["K"], size["K"])
        return rule(q, k, torch.zeros_like(v), g, beta, chunk_size=size["chunk"], initial_state=eye,
                    output_final_state=True)[1]

    return plain, transition_from_eye, kw


class CountTraffic:
    """Bytes through torch.distributed on this rank: an all-gather's whole gathered buffer, an all-reduce's
    buffer, and every point-to-point message sent or received."""

    def __init__(self):
        self.bytes, self.saved = 0, {}

    def __enter__(self):
        def count(fn, pick):
            f = self.saved[fn] = getattr(dist, fn)

            def counted(*a, **kw):
                for t in pick(a):
                    self.bytes += t.numel() * t.element_size()
                return f(*a, **kw)
            setattr(dist, fn, counted)

        for fn in ("all_gather_into_tensor", "all_gather_single"):
            if hasattr(dist, fn):
                count(fn, lambda a: [a[0]])
        count("all_reduce", lambda a: [a[0]] if a[0].numel() != 4 else [])  # not the 4-int agreements
        count("batch_isend_irecv", lambda a: [o.tensor for o in a[0]])
        return self

    def __exit__(self, *exc):
        for fn, f in self.saved.items():
            setattr(dist, fn, f)


class CountBytes:
    """Bytes this rank hands to torch.distributed's collectives (payload only), by phase."""

    def __init__(self):
        self.phase, self.bytes, self.control = "forward", {"forward": 0, "backward": 0}, 0
        self.saved = {}

    def __enter__(self):
        for fn in ("all_gather_into_tensor", "all_reduce", "all_to_all_single", "all_gather_single"):
            if hasattr(dist, fn):
                self.saved[fn] = getattr(dist, fn)
                setattr(dist, fn, self._wrap(self.saved[fn], fn))
        return self

    def _wrap(self, f, fn):
        def counted(*a, **kw):
            t = a[1] if fn in ("all_gather_into_tensor", "all_to_all_single", "all_gather_single") else a[0]
            n = t.numel() * t.element_size()
            if t.dtype == torch.int64 and t.numel() == 4:
                self.control += n  # the agreement on shapes and failures
            else:
                self.bytes[self.phase] += n
            return f(*a, **kw)
        return counted

    def __exit__(self, *exc):
        for fn, f in self.saved.items():
            setattr(dist, fn, f)


def _rank_jobs(jobs, layout) -> list[list[dict]]:
    """Every job ``(name, S, mode, size, reps, single)`` on this group (one launch for all: a launch costs
    seconds)."""
    solo = dist.new_group([0])  # rank 0's one-process baseline: a plan of one rank, no collectives
    return [_rank_run(name, S, layout, reps, mode, size, solo if single else None)
            for name, S, mode, size, reps, single in jobs]


def _pass(name, xs, plan, size, wts, mode, gy, cb=None) -> tuple[float, float]:
    t0 = time.perf_counter()
    y = layer(name, xs, plan, size, wts, mode)
    t1 = time.perf_counter()
    if cb is not None:
        cb.phase = "backward"
    if name not in FORWARD_ONLY:
        y.backward(gy)
    return t1 - t0, time.perf_counter() - t0


def _rank_run(name, S, layout, reps, mode, size, solo=None) -> dict:
    """This group's best of ``reps`` timed runs (after a warm-up; the first measures memory). With
    ``solo``, rank 0 runs the one-process baseline (2 threads, the others idle at a barrier) right after
    each group run, so that both see the same machine load."""
    import ringattn

    rank, world = dist.get_rank(), dist.get_world_size()
    full = inputs(name, S, size)
    pos = ringattn.global_positions(layout, rank, world, S // world)
    local = [x.index_select(1, pos) for x in full]
    wts = weights(name, size)
    gy_full = torch.randn(1, S, *_out_tail(name, size), generator=torch.Generator().manual_seed(5))
    gy = gy_full.index_select(1, pos)
    plan = mx.fragments(S // world, layout=layout, batch=1)
    grad = name not in FORWARD_ONLY
    best, single, peak, single_peak = None, None, float("nan"), float("nan")
    for i in range(reps + 1):
        xs = [x.clone().requires_grad_(grad) for x in local]
        PARTS.clear()
        dist.barrier()
        if i == 1:
            base = rss_mb()
            reset_peak_rss()
        with CountBytes() as cb:
            fwd, total = _pass(name, xs, plan, size, wts, mode, gy, cb)
        del xs
        if i == 1:
            peak = rss_mb("VmHWM") - base
        rec = {"fwd_s": fwd, "total_s": total, "parts": dict(PARTS), "bytes": dict(cb.bytes),
               "control_bytes": cb.control}
        if i and (best is None or total < best["total_s"]):
            best = rec
        dist.barrier()
        flag = f"{tempfile.gettempdir()}/ringattn-mixers-{os.getppid()}-{name}-{S}-{mode}-{i}"
        if solo is not None and rank != 0:
            # Idle asleep, not in a collective: a waiting collective may spin on a core the baseline's
            # two threads need.
            while not os.path.exists(flag):
                time.sleep(0.01)
        if solo is not None and rank == 0:
            torch.set_num_threads(2)
            xs = [x.clone().requires_grad_(grad) for x in full]
            if i == 1:
                base = rss_mb()
                reset_peak_rss()
            fwd, total = _pass(name, xs, mx.fragments(S, layout="contiguous", batch=1, group=solo), size, wts,
                               "correct", gy_full)
            del xs
            if i == 1:
                single_peak = rss_mb("VmHWM") - base
            torch.set_num_threads(1)
            if i and (single is None or total < single["total_s"]):
                single = {"fwd_s": fwd, "total_s": total}
            open(flag, "w").close()
        dist.barrier()
        if solo is not None and rank == 0:
            os.remove(flag)
    best["peak_growth_mb"] = peak
    recs = [None] * world
    dist.all_gather_object(recs, best)
    if single is not None:
        single["peak_growth_mb"] = single_peak
    return {"per_rank": recs, "single": single}


def _out_tail(name, size):
    return tuple(size[k] for k in {"mamba2": ("H", "P"), "gdn": ("H", "K"), "mamba1": ("D",), "conv": ("C",)}[name])


def ranks_run(jobs, world, layout="zigzag") -> list[dict]:
    from ringattn.training.launch import spawn_collect

    return spawn_collect(_rank_jobs, world, jobs, layout)


def run(out: pathlib.Path, quick: bool, names=NAMES, sizes=None, lengths=None, reps: int | None = None) -> dict:
    sizes = sizes or SIZES
    lengths = lengths or ([1024, 2048] if quick else [16384, 32768])
    reps = reps or (1 if quick else 2)
    worlds = [2] if quick else [2, 4]
    res = {"machine": machine(), "lengths": lengths, "sizes": {n: sizes[n] for n in names}, "dtype": "float32",
           "layout": "zigzag", "timed_runs_per_side": reps, "mixers": {n: {} for n in names}}
    ranked = {}
    for w in worlds:
        jobs = [(n, S, "correct", sizes[n], reps, True) for n in names for S in lengths]
        if w == 2 and not quick:  # Mamba1's step takes no initial state: it has only the correction path
            jobs += [(n, lengths[-1], "rerun", sizes[n], reps, False) for n in names if n not in ("conv", "mamba1")]
        for job, got in zip(jobs, ranks_run(jobs, w)):
            ranked[(w, job[0], job[1], job[2])] = got
    for name in names:
        for S in lengths:
            row = {"ranks": {}}
            for w in worlds:
                got = ranked[(w, name, S, "correct")]
                recs, single = got["per_rank"], got["single"]
                row["ranks"][w] = {"time_s": max(r["total_s"] for r in recs),
                                   "fwd_s": max(r["fwd_s"] for r in recs),
                                   "single": single,
                                   "ratio": single["total_s"] / max(r["total_s"] for r in recs),
                                   "fwd_ratio": single["fwd_s"] / max(r["fwd_s"] for r in recs),
                                   "per_rank": recs}
            row["single"] = row["ranks"][2]["single"]
            if (2, name, S, "rerun") in ranked:
                recs = ranked[(2, name, S, "rerun")]["per_rank"]
                row["rerun_2"] = {"time_s": max(r["total_s"] for r in recs),
                                  "ratio": row["single"]["total_s"] / max(r["total_s"] for r in recs),
                                  "per_rank": recs}
            res["mixers"][name][S] = row
            print(f"  {name:<7} S={S:<6} " + "  ".join(
                f"W={w}: single {r['single']['total_s']:6.2f}s ranks {r['time_s']:6.2f}s ratio {r['ratio']:.3f} "
                f"(fwd {r['fwd_ratio']:.3f}) bytes/rank {_kib(r['per_rank'])}"
                for w, r in row["ranks"].items())
                + (f"  rerun W=2 ratio {row['rerun_2']['ratio']:.3f}" if "rerun_2" in row else ""), flush=True)
    res["fold"] = fold_table(worlds=(2, 4) if quick else (2, 4, 8, 16, 32, 64), reps=1 if quick else 3)
    res["combine"] = combine_table(worlds=(4,) if quick else (4, 8), heads=2 if quick else 16,
                                   k=16 if quick else 128, reps=1 if quick else 2)
    _plot(res, out / "mixers.png")
    return res


def fold_table(worlds=(2, 4, 8, 16, 32, 64), heads: int = 16, k: int = 128, slots: int = 2,
               reps: int = 3) -> list[dict]:
    """All-gather + fold vs a Hillis-Steele scan for Gated DeltaNet-size summaries (``heads`` x K x K
    transitions, K x K states, float32), one thread: bytes per rank (computed from the buffer sizes) and
    the time of the local work each does for the last rank (measured): the fold applies every earlier
    summary to the state (``W * slots`` products ``M h``), the scan composes a pair per round (``M2 M1``
    and ``M2 S1``, ``ceil(log2 W)`` rounds). Forward + backward through autograd, as in training."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    unit = heads * (k * k + k * k) * 4  # one summary's bytes
    out = []
    for w in worlds:
        n = w * slots
        ms = (torch.randn(n, heads, k, k, generator=g) / k ** 0.5).requires_grad_()
        ss = torch.randn(n, heads, k, k, generator=g).requires_grad_()

        def fold():  # as scan_states reads the gathered buffer: one unbind
            mu, su = ms.unbind(0), ss.unbind(0)
            h = su[0]
            for i in range(1, n):
                h = mu[i] @ h + su[i]
            h.sum().backward()

        rounds = math.ceil(math.log2(w))
        # a scan holds one summary per round, not W of them
        mr, sr = (t[:rounds + 1].detach().clone().requires_grad_() for t in (ms, ss))

        def scan():
            m, st = mr[0], sr[0]
            for i in range(rounds):
                m, st = mr[i + 1] @ m, mr[i + 1] @ st + sr[i + 1]
            (m.sum() + st.sum()).backward()

        out.append({"world": w, "gather_received_mib": (w - 1) * slots * unit / 2 ** 20,
                    "gather_held_mib": w * slots * unit / 2 ** 20, "fold_s": best_of(fold, reps),
                    "scan_moved_mib": rounds * slots * unit / 2 ** 20, "scan_rounds": rounds,
                    "scan_s": best_of(scan, reps)})
        print(f"  fold W={w}: all-gather {out[-1]['gather_received_mib']:.0f} MiB received, fold "
              f"{out[-1]['fold_s'] * 1e3:.0f} ms; scan {out[-1]['scan_moved_mib']:.0f} MiB in {rounds} rounds, "
              f"{out[-1]['scan_s'] * 1e3:.0f} ms", flush=True)
    return out


def _combine_rank(worlds_reps: tuple[int, int], heads: int, k: int, local_len: int) -> list[dict]:
    """On this group: ``scan_states`` with the all-gather and with the log-depth scan, forward + backward,
    Gated DeltaNet-size summaries (one piece per rank, contiguous), best time and bytes this rank sends."""
    _, reps = worlds_reps
    rank, world = dist.get_rank(), dist.get_world_size()
    plan = mx.fragments(local_len, layout="contiguous", batch=1)
    g = torch.Generator().manual_seed(rank)
    m = (torch.randn(1, heads, k, k, generator=g) / k ** 0.5).requires_grad_()
    st = torch.randn(1, heads, k, k, generator=g).requires_grad_()
    out = []
    for combine in ("gather", "scan"):
        best, sent = float("inf"), 0
        for i in range(reps + 1):
            with CountTraffic() as ct:
                dist.barrier()
                t0 = time.perf_counter()
                states, tie = mx.scan_states([(m, st) if rank < world - 1 else None], plan, kind="dense",
                                             state_shape=(heads, k, k), batch=1, anchor=m, combine=combine)
                loss = tie.sum() * 0 + sum(s.sum() for s in states if s is not None) + m.sum() * 0 + st.sum() * 0
                loss.backward()
                el = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(el, op=dist.ReduceOp.MAX)
            if i:
                best = min(best, float(el))
            sent = ct.bytes
        mine = torch.tensor([float(sent)])
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        out.append({"world": world, "combine": combine, "time_s": best, "max_sent_mib": float(mine) / 2 ** 20})
    return out


def combine_table(worlds=(4, 8), heads: int = 16, k: int = 128, reps: int = 2) -> list[dict]:
    """The all-gather against the log-depth scan (``combine=``), measured on ``worlds`` local ranks: the most
    bytes through one rank (``CountTraffic``) and the time, forward + backward."""
    from ringattn.training.launch import spawn_collect

    rows = []
    for w in worlds:
        for r in spawn_collect(_combine_rank, w, (w, reps), heads, k, 8):
            rows.append(r)
            print(f"  combine W={w} {r['combine']:<6}: {r['max_sent_mib']:.1f} MiB through the busiest rank, "
                  f"{r['time_s'] * 1e3:.0f} ms", flush=True)
    return rows


def _kib(recs) -> str:
    return "/".join(f"{(r['bytes']['forward'] + r['bytes']['backward']) / 1024:.1f}" for r in recs) + " KiB"


def _plot(res: dict, path: pathlib.Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(res["mixers"])
    S = res["lengths"][-1]
    worlds = sorted({int(w) for n in names for w in res["mixers"][n][S]["ranks"]})
    width = 0.8 / (len(worlds) + 1)
    for j, w in enumerate(worlds):
        a.bar([i + j * width for i in range(len(names))],
              [res["mixers"][n][S]["ranks"][w]["ratio"] for n in names], width, label=f"{w} ranks (correction)")
    rerun = [(i, n) for i, n in enumerate(names) if "rerun_2" in res["mixers"][n][S]]
    if rerun:
        a.bar([i + len(worlds) * width for i, _ in rerun], [res["mixers"][n][S]["rerun_2"]["ratio"] for _, n in rerun],
              width, label="2 ranks (rerun instead of correction)", color="gray")
    for i, n in enumerate(names):
        a.plot([i - width / 2, i + (len(worlds) + 0.5) * width], [GOAL[n]] * 2, "k--", lw=1)
    a.set_xticks([i + width * (len(worlds) - 1) / 2 for i in range(len(names))], [LABEL[n] for n in names],
                 fontsize=8)
    a.set_ylabel("single-process time / slowest rank's time")
    a.set_title(f"W ranks x 1 thread vs 1 process x 2 threads, S={S}\nfp32, fwd+bwd (Mamba1 fwd), zigzag "
                "(dashed: goal)")
    a.legend(fontsize=8)
    for i, n in enumerate(names):
        pts = [(s, res["mixers"][n][s]["single"]["total_s"], res["mixers"][n][s]["ranks"][2]["time_s"])
               for s in res["lengths"]]
        b.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=f"{LABEL[n]}: 1 process")
        b.plot([p[0] for p in pts], [p[2] for p in pts], marker="x", ls="--", color=f"C{i}",
               label=f"{LABEL[n]}: 2 ranks")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("sequence length")
    b.set_ylabel("fwd+bwd time, s")
    b.set_title("time vs sequence length")
    b.legend(fontsize=7)
    save_figure(fig, path, res["machine"])


def summary(res: dict) -> str:
    lines = ["| mixer | S | single (2 threads) s | W | ranks s | ratio (fwd+bwd) | ratio (fwd) | goal | "
             "fwd parts per rank: local pass / transition / correction / rest, s | bytes per rank per layer "
             "(fwd + bwd) | peak growth per rank MiB (single) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in res["mixers"].items():
        for S, row in rows.items():
            for w, r in row["ranks"].items():
                parts = "; ".join(
                    f"{p['parts'].get('step', 0):.2f} / {p['parts'].get('transition', 0):.2f} / "
                    f"{p['parts'].get('correct', 0):.2f} / "
                    f"{p['fwd_s'] - sum(p['parts'].values()):.2f}" for p in r["per_rank"])
                by = ", ".join(f"{p['bytes']['forward'] / 1024:.0f} + {p['bytes']['backward'] / 1024:.0f} KiB"
                               for p in r["per_rank"][:2])
                mem = ", ".join(f"{p['peak_growth_mb']:.0f}" for p in r["per_rank"])
                lines.append(f"| {LABEL[name]} | {S} | {r['single']['total_s']:.2f} | {w} | {r['time_s']:.2f} | "
                             f"{r['ratio']:.3f} | {r['fwd_ratio']:.3f} | {GOAL[name]} | {parts} | {by} | "
                             f"{mem} ({r['single']['peak_growth_mb']:.0f}) |")
            if "rerun_2" in row:
                lines.append(f"| {LABEL[name]}, rerun instead of correction | {S} | {row['single']['total_s']:.2f} "
                             f"| 2 | {row['rerun_2']['time_s']:.2f} | {row['rerun_2']['ratio']:.3f} | | | | | |")
    if res.get("fold"):
        lines.append("\nAll-gather + fold vs a Hillis-Steele scan, Gated DeltaNet-size summaries (16 heads, K = V = "
                     "128, float32, 2 per rank: 4 MiB each), one thread, forward + backward of the local work "
                     "(`fold_table`; bytes computed from the buffer sizes, times measured):\n")
        lines.append("| W | all-gather: MiB received / held per rank | fold s (the last rank: W x 2 products) | "
                     "scan: MiB moved per rank, rounds | scan s (local compose) |")
        lines.append("|---|---|---|---|---|")
        for f in res["fold"]:
            lines.append(f"| {f['world']} | {f['gather_received_mib']:.0f} / {f['gather_held_mib']:.0f} | "
                         f"{f['fold_s']:.3f} | {f['scan_moved_mib']:.0f}, {f['scan_rounds']} | {f['scan_s']:.3f} |")
    if res.get("combine"):
        lines.append("\nThe two combines measured (`combine_table`: `scan_states` with `combine=\"gather\"` and "
                     "`\"scan\"`, one Gated DeltaNet-size summary per rank, contiguous, forward + backward; W local "
                     "ranks x 1 thread, so W above the core count shares cores):\n")
        lines.append("| W | combine | MiB through the busiest rank (all-gather: the gathered buffer; all-reduce: its "
                     "buffer; point-to-point: sent + received) | ms |")
        lines.append("|---|---|---|---|")
        for c in res["combine"]:
            lines.append(f"| {c['world']} | {c['combine']} | {c['max_sent_mib']:.1f} | {c['time_s'] * 1e3:.0f} |")
    lines.append("\nWhere the time goes (2 ranks, the longest length, forward; the slowest rank's parts):\n")
    for name, rows in res["mixers"].items():
        keys = sorted(rows, key=int)
        big, small = rows[keys[-1]], rows[keys[0]]
        r = big["ranks"].get(2) or big["ranks"].get("2")
        p = max(r["per_rank"], key=lambda x: x["fwd_s"])
        parts = p["parts"]
        rest = p["fwd_s"] - sum(parts.values())
        one = r["single"]
        growth = one["total_s"] / (small["ranks"].get(2) or small["ranks"].get("2"))["single"]["total_s"]
        ranks_growth = r["time_s"] / (small["ranks"].get(2) or small["ranks"].get("2"))["time_s"]
        if name == "conv":
            lines.append(f"- {LABEL[name]}: one process {one['fwd_s']:.2f} s forward, {one['total_s']:.2f} s with "
                         f"backward; the rank {p['fwd_s']:.2f} s forward (halo gather and the taps, not split "
                         f"further). From S = {keys[0]} to {keys[-1]} (2x) the one-process time grows "
                         f"{growth:.1f}x and the ranks' {ranks_growth:.1f}x.")
            continue
        lines.append(
            f"- {LABEL[name]}: one process {one['fwd_s']:.2f} s forward, {one['total_s']:.2f} s with backward; "
            f"the rank {p['fwd_s']:.2f} s forward = local pass from zero {parts.get('step', 0):.2f} + transition "
            f"{parts.get('transition', 0):.2f} + correction {parts.get('correct', 0):.2f} + the rest (agreement, "
            f"exchange, fold, waiting for the other rank) {rest:.2f}; 2 x that local pass is "
            f"{2 * parts.get('step', 0):.2f} s against the one process's {one['fwd_s']:.2f} s forward. "
            f"From S = {keys[0]} to {keys[-1]} (2x) the "
            f"one-process time grows {growth:.1f}x and the ranks' {ranks_growth:.1f}x"
            + (f"; the rerun path instead: {big['rerun_2']['ratio']:.2f}" if "rerun_2" in big else "") + ".")
    lines.append(
        "\nRead the ratios with the machine in mind: where the one-process baseline's forward takes many times "
        "2 x a rank's local pass over half the tokens (above), the baseline, not the ranks, is off: 2 threads "
        "of one process on cores shared with other work, and transformers' pure-torch steps whose time grows "
        "faster than the length (Gated DeltaNet's above; Mamba1's backward is left out for it). Measured "
        "without those effects, the cost of context parallelism is the parts listed: the correction and the "
        "exchange against the local pass.")
    pairs = [(n, rows[max(rows, key=int)]) for n, rows in res["mixers"].items()]
    pairs = [(n, r) for n, r in pairs if "rerun_2" in r]
    if pairs:
        beats = [n for n, r in pairs if (r["ranks"].get(2) or r["ranks"].get("2"))["ratio"] > r["rerun_2"]["ratio"]]
        lines.append(f" The correction path beat the rerun path in the same run for {len(beats)} of {len(pairs)} "
                     f"mixers ({', '.join(LABEL[n] for n in beats) or 'none'}).")
    sz = "; ".join(f"{LABEL[n]}: " + ", ".join(f"{k}={v}" for k, v in s.items()) for n, s in res["sizes"].items())
    lines.append(f"\nSizes (batch 1, float32, zigzag): {sz}. ratio = single-process time / slowest rank's time; "
                 f"{res['machine']['cpu_count']} cores, so 4 ranks x 1 thread oversubscribe them (the ideal "
                 "ratio stays 1: the same total CPU). Bytes are what each rank hands to the collectives "
                 "(the first two ranks shown; the 4-int agreements not counted).")
    return "\n".join(lines) + "\n"


__all__ = ["NAMES", "TINY", "combine_table", "fold_table", "inputs", "layer", "run", "summary", "weights"]
