"""Bad input, ranks that disagree, dead peers, numerical stress, determinism, property tests, CLI errors."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ringattn

from .cases import Case, assert_close, run_case
from .dist import free_port

F64 = torch.float64


def qkv(b=1, n=8, h=4, kvh=2, d=8, dv=None, dtype=F64):
    return (torch.randn(b, n, h, d, dtype=dtype), torch.randn(b, n, kvh, d, dtype=dtype),
            torch.randn(b, n, kvh, dv or d, dtype=dtype))


BAD = [
    (lambda: (torch.randn(8, 4, 8), *qkv()[1:]), {}, ValueError, "q must be 4-D"),
    (lambda: ([1, 2], *qkv()[1:]), {}, TypeError, "q must be a torch.Tensor"),
    (lambda: (qkv()[0].int(), *qkv()[1:]), {}, TypeError, "q must be float16"),
    (lambda: (qkv()[0].float(), *qkv()[1:]), {}, TypeError, "share a dtype"),
    (lambda: qkv(h=3, kvh=2), {}, ValueError, "multiple of kv_heads"),
    (lambda: (torch.randn(1, 8, 4, 8, dtype=F64), torch.randn(1, 8, 2, 6, dtype=F64), qkv()[2]), {},
     ValueError, "same head_dim"),
    (lambda: (torch.randn(1, 9, 4, 8, dtype=F64), *qkv()[1:]), {}, ValueError, "local_len"),
    (lambda: (torch.randn(2, 8, 4, 8, dtype=F64), *qkv()[1:]), {}, ValueError, "batch"),
    (lambda: (qkv()[0], qkv()[1], torch.randn(1, 8, 1, 8, dtype=F64)), {}, ValueError, "k and v must have"),
    (qkv, {"layout": "spiral"}, ValueError, "layout must be one of"),
    (qkv, {"window": (3,)}, ValueError, "window must be (left, right)"),
    (qkv, {"window": (-2, 0)}, ValueError, "window must be"),
    (qkv, {"window": (1.5, 0)}, ValueError, "window must be"),
    (qkv, {"seq_len": 9}, ValueError, "seq_len must be in [0, world * local_len = 8]"),
    (qkv, {"seq_len": 4.0}, TypeError, "seq_len must be an int"),
    (qkv, {"causal": "yes"}, TypeError, "causal must be a bool"),
    (qkv, {"softmax_scale": "x"}, TypeError, "softmax_scale"),
    (qkv, {"softmax_scale": float("nan")}, ValueError, "softmax_scale must be finite"),
    (qkv, {"cu_seqlens": torch.tensor([0, 5, 3, 8])}, ValueError, "strictly increasing"),
    (qkv, {"cu_seqlens": torch.tensor([1, 8])}, ValueError, "start at 0"),
    (qkv, {"cu_seqlens": torch.tensor([0, 7])}, ValueError, "end at the valid length"),
    (qkv, {"cu_seqlens": torch.tensor([0.0, 8.0])}, ValueError, "integer tensor"),
    (qkv, {"cu_seqlens": [0, 8]}, TypeError, "cu_seqlens must be an integer torch.Tensor"),
    (lambda: qkv(b=2), {"cu_seqlens": torch.tensor([0, 8])}, ValueError, "one cu_seqlens per batch row"),
    (lambda: qkv(b=2), {"cu_seqlens": [torch.tensor([0, 8])]}, ValueError, "one tensor per batch row"),
    (qkv, {"backward_exchange": "neighbours"}, ValueError, "backward_exchange must be one of"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_is_named(i):
    make, kw, exc, msg = BAD[i]
    with pytest.raises(exc) as e:
        ringattn.ring_attention(*make(), **kw)
    assert msg in str(e.value)


def test_numpy_integers_are_accepted():
    import numpy as np

    q, k, v = qkv()
    a = ringattn.ring_attention(q, k, v, window=(np.int64(2), np.int64(-1)), seq_len=np.int64(8))
    b = ringattn.ring_attention(q, k, v, window=(2, -1), seq_len=8)
    assert torch.equal(a, b)


def test_bad_strategy_and_shard_args():
    with pytest.raises(ValueError, match="strategy"):
        ringattn.attention(*qkv(), strategy="telepathy")
    with pytest.raises(ValueError, match="layout"):
        ringattn.shard(torch.zeros(1, 4), layout="diagonal")
    with pytest.raises(ValueError, match="seq_len"):
        ringattn.unshard(torch.zeros(1, 4), seq_len=5)


# --- ranks that disagree -------------------------------------------------------------------------------

def disagree(what: str):
    rank = dist.get_rank()
    b, n, h, kvh, dtype, kw = 1, 8, 4, 2, F64, {}
    if what == "local_len":
        n = 8 + 2 * rank
    elif what == "dtype":
        dtype = torch.float32 if rank else F64
    elif what == "heads":
        h = 4 if rank else 8
    elif what == "mask":
        kw = {"causal": rank == 0}
    elif what == "layout":
        kw = {"layout": "zigzag" if rank else "striped"}
    elif what == "window":
        kw = {"window": (rank, -1)}
    elif what == "backward_exchange":  # the backward would pair up different peers: must not start
        kw = {"backward_exchange": "direct" if rank else "ring"}
    elif what == "bad_on_one_rank":
        kw = {"window": (-5, 0)} if rank == 1 else {}
    q, k, v = qkv(b, n, h, kvh, dtype=dtype)
    t0 = time.perf_counter()
    try:
        ringattn.ring_attention(q, k, v, **kw)
    except ValueError as e:
        return str(e), time.perf_counter() - t0
    return None, time.perf_counter() - t0


@pytest.mark.parametrize("what", ["local_len", "dtype", "heads", "mask", "layout", "window", "backward_exchange",
                                  "bad_on_one_rank"])
def test_disagreeing_ranks_all_raise(ranks, what):
    results = ranks.run(3, disagree, what)
    for msg, secs in results:
        assert msg is not None, f"a rank did not raise for {what}"
        assert secs < 10
        assert ("disagree" in msg) or ("window" in msg)
    # The group is still usable afterwards: nobody was left inside a collective.
    assert_close(ranks.run(3, run_case, Case(seq_len=20)), Case(seq_len=20))


class _Interrupting(float):
    """A softmax_scale whose conversion is interrupted, as Ctrl-C in a notebook would be on one rank."""

    def __float__(self):
        raise KeyboardInterrupt


def calls_in_step(kind: str):
    """Three calls on every rank; rank 1's first one goes wrong in ``kind``'s way and its caller goes on
    with the next call (a loop that skips a bad batch). After an out-of-step error a rank stops: its peers
    would otherwise wait in a call it never makes. Returns per call: its error, or its output's error."""
    from ringattn import validate

    from .reference import attention_ref, dense_mask

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(5)
    seen = []
    try:
        for i in range(3):
            q, k, v = (torch.randn(1, 8 * world, h, 8, generator=g, dtype=F64) for h in (4, 2, 2))
            ref = ringattn.shard(attention_ref(q, k, v, dense_mask(8 * world, causal=True))[0])
            kw = {}
            if rank == 1 and i == 0:
                kw = {"meta_cu_seqlens": {"cu_seqlens": torch.tensor([0, 8 * world], device="meta")},
                      "huge_scale": {"softmax_scale": 10**400},
                      "interrupted": {"softmax_scale": _Interrupting(0.3)}}[kind]
            try:
                out = ringattn.ring_attention(*(ringattn.shard(t) for t in (q, k, v)), causal=True, **kw)
            except (Exception, KeyboardInterrupt) as e:  # the caller under test skips any failing batch
                seen.append(f"{type(e).__name__}: {e}")
                if "skipped or repeated" in str(e):
                    break
                continue
            seen.append(float((out - ref).abs().max()))
    finally:
        getattr(validate, "_CALLS", {}).clear()  # every rank: the pool's later jobs start in step again
    return seen


@pytest.mark.parametrize("kind", ["meta_cu_seqlens", pytest.param("huge_scale", marks=pytest.mark.slow),
                                  "interrupted"])
def test_a_call_out_of_step_is_an_error_on_every_rank(ranks, kind):
    results = ranks.run(3, calls_in_step, kind)
    for rank, seen in enumerate(results):
        numbers = [x for x in seen if isinstance(x, float)]
        assert all(x < 1e-9 for x in numbers), (rank, seen)  # never a wrong output
        assert isinstance(seen[0], str), (rank, seen)  # the first call is an error on every rank
    if kind != "interrupted":  # all ranks took part in the failed call: the next two are right
        assert all(len(s) == 3 and all(isinstance(x, float) for x in s[1:]) for s in results), results
    else:  # rank 1 left before the agreement: its next call meets its peers' first and all raise
        assert all("skipped or repeated a call" in s[-1] for s in results), results
    assert_close(ranks.run(3, run_case, Case(seq_len=20)), Case(seq_len=20))


def _dying_peer(rank, port, q, where):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    if rank == 1:
        from ringattn import comm, decode

        def die(*a, **k):
            os._exit(3)  # dies in the middle of the call, after the agreement step

        if where == "ring":
            comm.Ring.exchange = die
        else:
            decode.comm.gather_op = lambda: die
    x = torch.randn(1, 64, 2, 8)
    t0 = time.perf_counter()
    try:
        if where == "ring":
            ringattn.ring_attention(x, x, x)
        else:
            from ringattn.decode import decode_attention

            pos = torch.arange(64) + 64 * rank
            decode_attention(x[:, :1], x, x, torch.tensor([200]), pos)
        q.put((rank, "no error", time.perf_counter() - t0))
    except Exception as e:  # noqa: BLE001
        q.put((rank, type(e).__name__ + ": " + str(e)[:200], time.perf_counter() - t0))


@pytest.mark.parametrize("where,says", [("ring", "PeerError: ringattn: ring exchange failed"),
                                        ("decode", "PeerError: ringattn: decoding could not merge")])
def test_dead_peer_ends_in_error_not_hang(where, says):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_dying_peer, args=(r, port, q, where)) for r in range(2)]
    for p in procs:
        p.start()
    rank, msg, secs = q.get(timeout=60)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    assert rank == 0 and msg.startswith(says) and secs < 30, (msg, secs)


# --- numerics ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_does_not_grow_with_ring(ranks, dtype):
    errs = {}
    for world in (1, 2, 4):
        case = Case(seq_len=128, head_dim=32, dtype=dtype, causal=True, layout="zigzag", seed=3)
        res = ranks.run(world, run_case, case)
        assert_close(res, case)
        errs[world] = max(max(r.values()) for r in res)
    # Stated bound: accumulation in float32 keeps the error of a W-rank ring within 2x the single block's.
    assert errs[4] <= 2 * errs[1] and errs[2] <= 2 * errs[1], errs


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_eight_rank_error_bound(ranks, dtype):
    one = ranks.run(1, run_case, Case(seq_len=256, head_dim=32, dtype=dtype, layout="zigzag", seed=3))
    eight = ranks.run(8, run_case, Case(seq_len=256, head_dim=32, dtype=dtype, layout="zigzag", seed=3))
    assert_close(eight, Case(seq_len=256, dtype=dtype))
    assert max(max(r.values()) for r in eight) <= 2 * max(one[0].values())


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-9), ("float32", 4 * 6e-8 * 4e4)])
def test_huge_logits(ranks, dtype, tol):
    # Scores of magnitude ~1e4: float32 can only be as exact as its rounding of the scores themselves
    # (eps * |S|), so the bound scales with the logits; float64 stays at 1e-9.
    case = Case(seq_len=40, dtype=dtype, causal=True, layout="striped", scale_logits=1e4, seed=8)
    assert_close(ranks.run(2, run_case, case), case, tol=tol)


def nonpositive_scale(scale, dtype, layout):
    from .cases import ref_with_grads
    from .reference import dense_mask

    world = dist.get_world_size()
    g = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(1, 32, h, 8, generator=g, dtype=F64).to(dtype) for h in (4, 2, 2, 4))
    ref = ref_with_grads(q, k, v, do, dense_mask(32, causal=True), scale)
    qs, ks, vs = (ringattn.shard(t, layout=layout).requires_grad_() for t in (q, k, v))
    out = ringattn.ring_attention(qs, ks, vs, causal=True, layout=layout, softmax_scale=scale)
    (out.double() * ringattn.shard(do, layout=layout).double()).sum().backward()
    errs = []
    for x, r in zip((out, qs.grad, ks.grad, vs.grad), (ref[0], ref[2], ref[3], ref[4])):
        full = ringattn.unshard(x.detach(), layout=layout, seq_len=32) if world > 1 else x.detach()
        errs.append(float((full.double() - r).abs().max() / r.abs().max().clamp_min(1.0)))
    return errs


@pytest.mark.parametrize("scale,dtype", [(0.0, F64), (-0.4, torch.bfloat16),
                                         pytest.param(-0.4, F64, marks=pytest.mark.slow),
                                         pytest.param(0.0, torch.bfloat16, marks=pytest.mark.slow)])
def test_nonpositive_softmax_scale_is_exact(ranks, scale, dtype):
    # The fused CPU op returns nan for causal scores with a scale <= 0; such calls must be exact anyway.
    tol = 1e-9 if dtype == F64 else 1.6e-2
    for world, layout in ((1, "contiguous"), (2, "zigzag")):
        for errs in ranks.run(world, nonpositive_scale, scale, dtype, layout):
            assert all(e <= tol for e in errs), (world, errs)


def masked_rows():
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randn(1, 6, 2, 4, dtype=F64, requires_grad=True)
    # seq_len 9 of 12 positions with documents: padding rows see nothing at all.
    out = ringattn.ring_attention(x, x, x, seq_len=9, cu_seqlens=torch.tensor([0, 4, 9]), causal=True)
    out.sum().backward()
    pos = ringattn.global_positions("contiguous", rank, world, 6)
    pad = pos >= 9
    return bool(torch.isfinite(out).all() and torch.isfinite(x.grad).all() and (out[:, pad] == 0).all())


def test_fully_masked_rows_are_zero_not_nan(ranks):
    assert all(ranks.run(2, masked_rows))


def deterministic():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 4, 8, requires_grad=True)
    kv = torch.randn(2, 32, 2, 8, requires_grad=True)
    outs = []
    for _ in range(2):
        x.grad = kv.grad = None
        o = ringattn.ring_attention(x, kv, kv, causal=True, layout="zigzag", window=(9, -1))
        (o * o).sum().backward()
        outs.append((o.detach().clone(), x.grad.clone(), kv.grad.clone()))
    return all(torch.equal(a, b) for a, b in zip(outs[0], outs[1])), [t.sum().item() for t in outs[0]]


def test_bitwise_deterministic(ranks):
    first = ranks.run(3, deterministic)
    second = ranks.run(3, deterministic)
    assert all(ok for ok, _ in first)
    assert [s for _, s in first] == [s for _, s in second]


# --- property tests ------------------------------------------------------------------------------------

@st.composite
def cases(draw):
    world = draw(st.sampled_from([1, 2, 3, 4]))
    layout = draw(st.sampled_from(["contiguous", "zigzag", "striped"]))
    n = draw(st.integers(1, 70))
    kvh = draw(st.sampled_from([1, 2, 4]))
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.tuples(st.integers(-1, 40), st.integers(-1, 40))))
    cu = None
    if draw(st.booleans()):
        cuts = draw(st.lists(st.integers(1, max(1, n - 1)), max_size=5, unique=True))
        cu = sorted({0, n, *[c for c in cuts if 0 < c < n]})
    return world, Case(seq_len=n, kv_heads=kvh, layout=layout, causal=causal, window=window, cu_seqlens=cu,
                       batch=1 if cu else 2, head_dim=8, v_head_dim=draw(st.sampled_from([8, 4])),
                       tile=draw(st.sampled_from([None, 4])), chunk=draw(st.sampled_from([None, 3, 7])),
                       seed=draw(st.integers(0, 99)),
                       extra={"backward_exchange": draw(st.sampled_from(["ring", "direct"]))})


@settings(max_examples=int(os.environ.get("RINGATTN_HYPOTHESIS_EXAMPLES", "30")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cases())
def test_property_random_configurations(ranks, wc):
    world, case = wc
    assert_close(ranks.run(world, run_case, case), case)


# --- CLI -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["bench", "nonexistent"], ["frobnicate"], ["demo", "--nproc", "0"],
                                  ["demo", "--seq-len", "abc"]])
def test_cli_bad_arguments_are_one_line(argv):
    r = subprocess.run([sys.executable, "-m", "ringattn", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and err and "error" in err[-1], r.stderr


def backend_tiles_differ():
    """Both ranks name the same backend, but rank 1's plans cut the backward into smaller key tiles."""
    from ringattn.kernels import BACKENDS, retiled

    rank = dist.get_rank()
    backend = retiled(BACKENDS["cpu-flash"], backward_tile=4) if rank else BACKENDS["cpu-flash"]
    q, k, v = (t.requires_grad_() for t in qkv(n=16))
    try:
        out = ringattn.ring_attention(q, k, v, backend=backend)
    except ValueError as e:
        return str(e)
    out.sum().backward()
    return None


def test_backends_with_different_planning_sizes_raise_everywhere(ranks):
    # Otherwise the backward's tile exchanges pair up differently sized messages and the ranks crash or hang.
    for msg in ranks.run(2, backend_tiles_differ, timeout=90):
        assert msg is not None and "disagree" in msg and "backward_tile" in msg
    assert_close(ranks.run(2, run_case, Case(seq_len=20)), Case(seq_len=20))
