"""State passing (ringattn.mixers.run_fragments) against one process running the same recurrence over the
whole sequence, float64, forward and input gradients: every layout, odd lengths, documents, batch 2."""

from __future__ import annotations

import functools

import pytest
import torch

import ringattn
from ringattn import mixers
from ringattn.layouts import uneven_lengths

B, H, N, P = 2, 2, 3, 2  # diagonal: state (H, N, P)
K, V = 3, 2  # dense: state (H, K, V)


# --- reference recurrences (one step at a time, state None = zero) ----------------------------------

def diag_step(a, b, x, c, h0):
    """h_t = a_t * h_{t-1} + b_t x_t^T (per head, a_t diagonal over N); y_t = c_t^T h_t."""
    h = h0 if h0 is not None else a.new_zeros(a.shape[0], H, N, P)
    ys = []
    for t in range(a.shape[1]):
        h = a[:, t, :, :, None] * h + b[:, t, :, :, None] * x[:, t, :, None, :]
        ys.append(torch.einsum("bhn,bhnp->bhp", c[:, t], h))
    return torch.stack(ys, 1), h


def diag_transition(a, b, x, c):
    return a.prod(1)[..., None]  # (rows, H, N, 1)


def dense_step(q, k, v, alpha, beta, s0):
    """S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T; o_t = S_t^T q_t (Gated DeltaNet)."""
    s = s0 if s0 is not None else q.new_zeros(q.shape[0], H, K, V)
    ys = []
    for t in range(q.shape[1]):
        kt, bt, at = k[:, t], beta[:, t, :, None, None], alpha[:, t, :, None, None]
        s = at * (s - bt * kt[..., None] * torch.einsum("bhk,bhkv->bhv", kt, s)[:, :, None, :]) \
            + bt * kt[..., None] * v[:, t, :, None, :]
        ys.append(torch.einsum("bhkv,bhk->bhv", s, q[:, t]))
    return torch.stack(ys, 1), s


def dense_transition(q, k, v, alpha, beta):
    eye = torch.eye(K, dtype=q.dtype).expand(q.shape[0], H, K, K)
    m = eye
    for t in range(q.shape[1]):
        kt = k[:, t]
        a = alpha[:, t, :, None, None] * (eye - beta[:, t, :, None, None] * kt[..., None] * kt[..., None, :])
        m = a @ m
    return m


def diag_correct(a, b, x, c, h0):
    """The outputs' part due to h0: y_t += c_t^T (prod_{s<=t} a_s * h0)."""
    return torch.einsum("bthn,bhnp->bthp", c * a.cumprod(1), h0)


def dense_correct(q, k, v, alpha, beta, s0):
    """The rule run with v = 0 from s0 (the outputs are linear in the state)."""
    return dense_step(q, k, torch.zeros_like(v), alpha, beta, s0)[0]


def dense_step_aux(q, k, v, alpha, beta, s0):
    """A step that hands out its span's transition (as a kernel reading it off its own pass would)."""
    y, s = dense_step(q, k, v, alpha, beta, s0)
    return y, s, dense_transition(q, k, v, alpha, beta)


EPS = 1e-3  # large enough that an output off by its stabiliser would show


def log_step(k, v, lw, h0):
    """A stabilised recurrence (the shape of xLSTM's mLSTM and RWKV's WKV), per channel of (H, P):
    m_t = max(lw_t + m_{t-1}, k_t); (num, den)_t = exp(lw_t + m_{t-1} - m_t) (num, den)_{t-1} + exp(k_t - m_t) (v_t, 1);
    y_t = num_t / (max(|den_t|, exp(-m_t)) + EPS), which depends on m_t itself. A document starts from
    num = den = 0, m = 0 (h0 None); h0: (rows, 2, 2, H, P), [value (num, den), log scale (m, m)]."""
    if h0 is None:
        num, den, m = (k.new_zeros(k.shape[0], H, P) for _ in range(3))
    else:
        num, den, m = h0[:, 0, 0], h0[:, 0, 1], h0[:, 1, 0]
    ys = []
    for t in range(k.shape[1]):
        top = torch.maximum(lw[:, t] + m, k[:, t])
        keep, add = torch.exp(lw[:, t] + m - top), torch.exp(k[:, t] - top)
        num, den, m = keep * num + add * v[:, t], keep * den + add, top
        ys.append(num / (torch.maximum(den.abs(), torch.exp(-m)) + EPS))
    return torch.stack(ys, 1), torch.stack([torch.stack([num, den], 1), torch.stack([m, m], 1)], 1)


def log_transition(k, v, lw):
    return lw.sum(1)[:, None]  # (rows, 1, H, P): the same decay for num and den


MIXERS = {
    "diagonal": dict(step=diag_step, transition=diag_transition, kind="diagonal", state_shape=(H, N, P),
                     transition_shape=(H, N, 1)),
    "dense": dict(step=dense_step, transition=dense_transition, kind="dense", state_shape=(H, K, V)),
    # the correction path: every piece runs from zero, then adds its incoming state's part of the outputs
    "diagonal-correct": dict(step=diag_step, transition=diag_transition, kind="diagonal", state_shape=(H, N, P),
                             transition_shape=(H, N, 1), correct=diag_correct),
    "dense-correct": dict(step=dense_step_aux, transition=lambda *spans, aux: aux, kind="dense",
                          state_shape=(H, K, V), correct=lambda *a, aux: dense_correct(*a)),
    "log": dict(step=log_step, transition=log_transition, kind="log", state_shape=(2, 2, H, P),
                transition_shape=(1, H, P)),
}


def make_inputs(name, n, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def u(*shape, lo=0.5, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    if name.startswith("diagonal"):
        return [u(B, n, H, N), r(B, n, H, N), r(B, n, H, P), r(B, n, H, N)]
    if name == "log":
        # Keys spread wide, mostly below a document start's log scale (0) and decays mild, so that the
        # stabiliser a document start leaves decides many outputs: a piece's summary that took it for its own
        # start would be off by about EPS.
        return [3 * r(B, n, H, P) - 4, r(B, n, H, P), -u(B, n, H, P, lo=0.01, hi=0.5)]
    k = torch.nn.functional.normalize(r(B, n, H, K), dim=-1)
    return [r(B, n, H, K), k, r(B, n, H, V), u(B, n, H), u(B, n, H, lo=0.1, hi=0.9)]


def reference(name, inputs, rows_bounds):
    """One process, whole sequence, each row's documents from a zero state."""
    step = MIXERS[name.split("-")[0]]["step"]
    out = []
    for b, bounds in enumerate(rows_bounds):
        ys = [step(*[x[b:b + 1, s:e] for x in inputs], None)[0] for s, e in zip(bounds, bounds[1:])]
        out.append(torch.cat(ys, 1))
    return torch.cat(out, 0)


# --- layouts -------------------------------------------------------------------------------------------

def per_row(cu):
    return cu if cu and isinstance(cu[0], list) else [cu] * B


def case_positions(layout, uneven, n, cu, world, rank):
    """(total, local positions (B, L)) of this rank, from ringattn's public layout functions."""
    rows = per_row(cu)
    if uneven:
        lens = uneven_lengths(n, world, layout)
        idx = torch.arange(n).expand(B, n).contiguous()
        pos = ringattn.shard(idx, layout=layout, uneven=True) if world > 1 else idx
        assert pos.shape[1] == lens[rank]
        return n, pos
    c = n // world
    return n, torch.stack([ringattn.global_positions(layout, rank, world, c, cu_seqlens=r) for r in rows])


def cases():
    """(layout, uneven, n, cu_seqlens), the same for W = 1..4: padded layouts at lengths every W splits
    (local lengths 9 to 48, odd ones among them), uneven ones at an odd length."""
    out = []
    for layout in ("contiguous", "zigzag", "striped", "balanced"):
        n = 36 if layout in ("contiguous", "striped") else 48  # zigzag / balanced: a multiple of 2W
        docs = [[0, 5, 17, n], [[0, 11, n], [0, 3, 4, 20, n - 2]]]
        if layout != "balanced":
            docs = [None] + docs
        out += [(layout, False, n, d) for d in docs]
    out += [(layout, True, 37, d) for layout in ("contiguous", "zigzag", "striped") for d in (None, [0, 2, 19, 37])]
    return out


@functools.cache
def expected(name):
    """Per case: inputs, output gradient, and the one-process outputs and input gradients."""
    out = []
    for i, (_, _, n, cu) in enumerate(cases()):
        full = [x.requires_grad_() for x in make_inputs(name, n, seed=i)]
        bounds = [list(r) + ([n] if r[-1] < n else []) if r is not None else [0, n] for r in per_row(cu)]
        ref = reference(name, full, bounds)
        gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
        grads = torch.autograd.grad((ref * gy).sum(), full)
        out.append(([x.detach() for x in full], gy, ref.detach(), grads))
    return out


def rank_check(name, expect, combine="auto"):
    rank, world = _rank_world()
    worst = 0.0
    spec = MIXERS[name]
    for (layout, uneven, n, cu), (full, gy, ref, ref_grads) in zip(cases(), expect):
        _, pos = case_positions(layout, uneven, n, cu, world, rank)

        def mine(t, pos=pos):
            return torch.stack([t[b].index_select(0, pos[b]) for b in range(B)])

        local = [mine(x).requires_grad_() for x in full]
        plan = mixers.fragments(pos.shape[1], layout=layout, cu_seqlens=cu, uneven=uneven,
                                seq_len=n if uneven else None, batch=B)
        y = mixers.run_fragments(spec["step"], spec["transition"], local, plan=plan, kind=spec["kind"],
                                 state_shape=spec["state_shape"], transition_shape=spec.get("transition_shape"),
                                 correct=spec.get("correct"), combine=combine)
        err = (y - mine(ref)).abs().max().item()
        grads = torch.autograd.grad((y * mine(gy)).sum(), local)
        for g, rg in zip(grads, ref_grads):
            err = max(err, (g - mine(rg)).abs().max().item())
        assert err < 1e-11, f"{name} {layout} uneven={uneven} n={n} cu={cu} W={world}: max error {err}"
        worst = max(worst, err)
    return worst


def _rank_world():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_one_process(name):
    assert rank_check(name, expected(name)) < 1e-11


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("name", sorted(MIXERS))
def test_ranks(ranks, name, world):
    assert max(ranks.run(world, rank_check, name, expected(name))) < 1e-11


@pytest.mark.parametrize("name,world", [(n, w) for n in sorted(MIXERS) for w in (1, 3)] + [("dense", 4), ("log", 4)])
def test_ranks_log_depth_scan(ranks, name, world):
    """The same cases with the summaries combined by the log-depth scan (point-to-point rounds) instead of the
    all-gather: the same outputs and gradients."""
    if world == 1:
        assert rank_check(name, expected(name), "scan") < 1e-11
    else:
        assert max(ranks.run(world, rank_check, name, expected(name), "scan")) < 1e-11


# --- mistakes: a clear error on every rank before anyone blocks in a collective ---------------------

def _error(fn):
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def rank_mistakes():
    rank, world = _rank_world()
    spec = MIXERS["diagonal"]
    inputs = [x[:, :18] for x in make_inputs("diagonal", 18, seed=0)]
    plan = mixers.fragments(18, layout="zigzag", batch=B)

    def call(xs=inputs, plan=plan, **kw):
        args = dict(kind="diagonal", state_shape=(H, N, P), transition_shape=(H, N, 1)) | kw
        return mixers.run_fragments(spec["step"], spec["transition"], xs, plan=plan, **args)

    out = {
        # one rank's inputs too short: it names the shapes, its peers say another rank failed
        "short": _error(lambda: call([x[:, :17] if rank == 1 else x for x in inputs])),
        "kind": _error(lambda: call(kind="scalar")),
        # ranks disagreeing on the layout
        "layout": _error(lambda: call(plan=mixers.fragments(18, layout="zigzag" if rank else "contiguous"))),
        # the step returns a state of the wrong shape on one rank only
        "state": _error(lambda: call(state_shape=(H, N, P + (rank == 1)))),
        # the mixer's own step fails on one rank: the others stop too instead of waiting in the gather
        "step": _error(lambda: mixers.run_fragments(
            lambda *a: (_ for _ in ()).throw(ValueError("mixer bug")) if rank == 1 else spec["step"](*a),
            spec["transition"], inputs, plan=plan, kind="diagonal", state_shape=(H, N, P),
            transition_shape=(H, N, 1))),
        "correct": _error(lambda: call(correct="diag_correct")),
        # a correction of the wrong shape (both zigzag ranks hold a piece that continues a document)
        "correct_shape": _error(lambda: call(correct=lambda *a: torch.zeros(1, dtype=torch.float64))),
        "conv": _error(lambda: mixers.causal_conv1d(inputs[0][:, :, 0], torch.ones(H, 1, 2, dtype=torch.float64),
                                                    plan=plan)),
    }
    ok = call()  # the group still works after the errors
    return out, tuple(ok.shape)


def test_mistakes(ranks):
    (r0, shape0), (r1, _) = ranks.run(2, rank_mistakes)
    assert shape0 == (B, 18, H, P)
    assert "inputs[0] has shape (2, 17, 2, 3)" in r1["short"] and "local_len=18" in r1["short"]
    assert "another rank failed its checks" in r0["short"]
    for r in (r0, r1):
        assert "kind must be one of ('diagonal', 'dense', 'log')" in r["kind"]
        assert "ranks disagree on layout" in r["layout"]
        assert "weight must be (channels, k) or (channels, 1, k)" in r["conv"]
        assert "correct must be a callable (*pieces, initial_state) -> y_delta or None, got str" in r["correct"]
    # rank 0's second zigzag chunk continues the first; rank 1's two chunks are one run of 18
    assert "correct's output must have shape (2, 9, 2, 2), got (1,)" in r0["correct_shape"]
    assert "correct's output must have shape (2, 18, 2, 2), got (1,)" in r1["correct_shape"]
    assert "disagree" in r0["state"] and "disagree" in r1["state"]
    assert r1["step"] == "ValueError: mixer bug" and "another rank failed its checks" in r0["step"]


def test_unknown_layout():
    with pytest.raises(ValueError, match=r"layout must be one of .*'contiguous'.* got 'diagonal'"):
        mixers.fragments(8, layout="diagonal")


def rank_weights_and_half():
    """A gradient wanted only for a weight the step holds (inputs need none; the rank holding the start
    has no summary to send but must still run the gather's backward), and bfloat16 inputs with float32
    summaries and states."""
    rank, world = _rank_world()
    n, c = 36, 36 // world
    full = make_inputs("diagonal", n, seed=3)
    pos = ringattn.global_positions("contiguous", rank, world, c)
    scale = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)

    def step(a, b, x, cc, h0):
        return diag_step(a * scale, b, x, cc, h0)

    def transition(a, b, x, cc):
        return diag_transition(a * scale, b, x, cc)

    plan = mixers.fragments(c, layout="contiguous", batch=B)
    y = mixers.run_fragments(step, transition, [x[:, pos] for x in full], plan=plan, kind="diagonal",
                             state_shape=(H, N, P), transition_shape=(H, N, 1))
    (y ** 2).sum().backward()
    grad = scale.grad.clone()
    torch.distributed.all_reduce(grad)
    ref_scale = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    ref = diag_step(full[0] * ref_scale, *full[1:], None)[0]
    (ref ** 2).sum().backward()
    err = max((y - ref[:, pos]).abs().max().item(), (grad - ref_scale.grad).abs().item())

    seen = []

    def half_step(*args):
        if args[-1] is not None:
            seen.append(args[-1].dtype)
        y, h = diag_step(*[a.float() for a in args[:-1]], args[-1])  # as the models do: state math in float32
        return y.bfloat16(), h

    yh = mixers.run_fragments(half_step, diag_transition, [x[:, pos].bfloat16() for x in full], plan=plan,
                              kind="diagonal", state_shape=(H, N, P), transition_shape=(H, N, 1))
    ref0 = diag_step(*full, None)[0][:, pos]
    rel = ((yh.double() - ref0).abs().max() / ref0.abs().max()).item()
    return err, rel, seen


def test_weights_and_half(ranks):
    (err0, rel0, seen0), (err1, rel1, seen1) = ranks.run(2, rank_weights_and_half)
    assert max(err0, err1) < 1e-11 and max(rel0, rel1) < 0.05
    assert seen0 == [] and seen1 == [torch.float32]  # rank 1's piece starts from rank 0's state, in float32


def test_forgotten_init_process_group_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"ringattn.mixers: torch.distributed is not initialised but WORLD_SIZE=2"):
        mixers.fragments(8, layout="zigzag")


def test_a_shard_of_another_layout_is_refused():
    # A zigzag shard given a striped plan would run its tokens at the wrong positions.
    x = ringattn.shard(torch.randn(1, 12, 4, dtype=torch.float64), layout="zigzag")
    plan = mixers.fragments(x.shape[1], layout="striped")
    with pytest.raises(ValueError, match=r"sharded with layout='zigzag'.*plan is for layout='striped'"):
        mixers.causal_conv1d(x, torch.randn(4, 3, dtype=torch.float64), plan=plan)
    step = functools.partial(diag_step)
    a = torch.rand(1, 12, H, N, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sharded with layout='zigzag'"):
        mixers.run_fragments(step, diag_transition, [ringattn.shard(a, layout="zigzag")], plan=plan,
                             kind="diagonal", state_shape=(H, N, P))
    same = mixers.fragments(x.shape[1], layout="zigzag")
    assert mixers.causal_conv1d(x, torch.randn(4, 3, dtype=torch.float64), plan=same).shape == x.shape


def float32_large_keys():
    """Keys whose exp overflows float32 (e^100): a linear summary would be inf; the log fold is not."""
    rank, world = _rank_world()
    n, c = 24, 24 // world
    g = torch.Generator().manual_seed(7)
    k = 100 + 10 * torch.randn(B, n, H, P, generator=g, dtype=torch.float64)
    v = torch.randn(B, n, H, P, generator=g, dtype=torch.float64)
    lw = -0.01 - 0.5 * torch.rand(B, n, H, P, generator=g, dtype=torch.float64)
    ref = log_step(k, v, lw, None)[0]
    local = [x[:, rank * c:(rank + 1) * c].float() for x in (k, v, lw)]
    plan = mixers.fragments(c, layout="contiguous", batch=B)
    y = mixers.run_fragments(log_step, log_transition, local, plan=plan, kind="log", state_shape=(2, 2, H, P),
                             transition_shape=(1, H, P))
    assert torch.isfinite(y).all()
    return ((y.double() - ref[:, rank * c:(rank + 1) * c]).abs() / ref[:, rank * c:(rank + 1) * c].abs().clamp_min(1)
            ).max().item()


def test_log_kind_float32_large_keys(ranks):
    assert max(ranks.run(2, float32_large_keys)) < 1e-5


def test_log_kind_refuses_a_correction_and_a_misshaped_transition():
    plan = mixers.fragments(4, batch=1)
    x = torch.zeros(1, 4, H, P)
    with pytest.raises(ValueError, match="correct= with kind='log'"):
        mixers.run_fragments(log_step, log_transition, [x, x, x], plan=plan, kind="log", state_shape=(2, 2, H, P),
                             transition_shape=(1, H, P), correct=lambda *a: None)
    with pytest.raises(ValueError, match="one dim fewer than the state"):
        mixers.run_fragments(log_step, log_transition, [x, x, x], plan=plan, kind="log", state_shape=(2, 2, H, P),
                             transition_shape=(H, P))


def test_log_depth_scan_messages():
    """The scan's messages per rank grow with log2 of the pieces, not with the ranks: 16 ranks holding 32
    zigzag chunks send and receive at most log2(32) + 1 summaries each (the all-gather: 31 x 2 received)."""
    from ringattn.mixers.fragments import Piece, RowPlan
    from ringattn.mixers.scan import _rounds

    world, n = 16, 32
    owner = [c if c < world else 2 * world - 1 - c for c in range(n)]
    pieces = tuple(Piece(rank=r, local=0 if c < world else 1, start=c, length=1, fresh=c == 0, feeds=c < n - 1,
                         fragment=0 if c < world else 1) for c, r in enumerate(owner))
    rp = RowPlan(rows=None, bounds=(0,), fragments=(), pieces=pieces)
    for rank in range(world):
        rounds = _rounds(rp, rank)
        assert len(rounds) == 6  # log2(32) rounds and the shift
        sent = sum(len(idx) for rnd, _ in rounds for _, idx in rnd.sends)
        got = sum(c for rnd, _ in rounds for _, c in rnd.recvs)
        assert sent <= 2 * 6 and got <= 2 * 6, (rank, sent, got)
