"""Context-parallel training: exact steps on 2 and 4 ranks, resume after a kill, and learning."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from ringattn.app.model import LlamaConfig
from ringattn.app.train import Parallel, TrainConfig, local_batch, make_optimizer, setup_parallel, train, train_step
from ringattn.training import checkpoint

from .reference import TOL, rel_err

# Without documents the balanced layout places tokens as zigzag does (tests/test_balanced.py has it).
CLASSIC_LAYOUTS = ("contiguous", "zigzag", "striped")

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_chunk=16)
# seq_len 101 is not a multiple of 2W: padding is exercised on every layout; clip 0.05 is active.
TC = TrainConfig(model=MODEL, seq_len=101, batch=2, steps=4, lr=1e-2, warmup=2, clip=0.05, dtype="float64",
                 eval_samples=0)


def _one_step(tc: TrainConfig, par: Parallel | None = None):
    """Loss, clipped gradients and updated parameters after step 1 (step 0 fills Adam's state first)."""
    from ringattn.app.data import make_task
    from ringattn.app.model import build

    par = par or setup_parallel(tc.dp, tc.ulysses)
    task = make_task(tc.task, seed=tc.seed)
    model = build(tc.model, seed=tc.seed, dtype=torch.float64)
    opt = make_optimizer(model, tc)
    out = []
    for step in range(2):
        batch = local_batch(task, tc, par, step * tc.batch, tc.seq_len, tc.batch)
        out.append(train_step(model, opt, batch, par, tc, step))
    return (out, {k: p.grad.clone() for k, p in model.named_parameters()},
            {k: p.detach().clone() for k, p in model.named_parameters()})


def _reference(tc: TrainConfig):
    """The single-process step on the full sequences, with vanilla (materialised) attention."""
    model = dataclasses.replace(tc.model, strategy="dense", backward_exchange="ring")
    return _one_step(dataclasses.replace(tc, model=model, dp=1, ulysses=0), Parallel())


@pytest.mark.parametrize("world,dp", [(2, 1), (4, 1), (4, 2)])
@pytest.mark.parametrize("layout", CLASSIC_LAYOUTS)
def test_train_step_matches_single_process(ranks, world, dp, layout):
    tc = dataclasses.replace(TC, model=dataclasses.replace(MODEL, layout=layout), dp=dp)
    ref_losses, ref_grads, ref_params = _reference(tc)
    results = ranks.run(world, _one_step, tc)
    tol = TOL[torch.float64]
    for rank, (losses, grads, params) in enumerate(results):
        for (loss, norm), (ref_loss, ref_norm) in zip(losses, ref_losses):
            assert abs(loss - ref_loss) <= tol * ref_loss, (rank, loss, ref_loss)
            assert abs(norm - ref_norm) <= tol * ref_norm, (rank, norm, ref_norm)
        for name in ref_params:
            assert rel_err(grads[name], ref_grads[name]) <= tol, (rank, name)
            assert rel_err(params[name], ref_params[name]) <= tol, (rank, name)
            # every rank holds bitwise the same parameters: the replicas never drift apart
            assert torch.equal(params[name], results[0][2][name]), (rank, name)


@pytest.mark.parametrize("strategy,ulysses,dp,exchange", [("allgather", 0, 1, "ring"), ("ulysses", 0, 2, "ring"),
                                                           ("hybrid", 2, 1, "ring"), ("ring", 0, 1, "direct"),
                                                           ("hybrid", 2, 1, "direct")])
def test_train_step_other_strategies(ranks, strategy, ulysses, dp, exchange):
    model = dataclasses.replace(MODEL, layout="zigzag", strategy=strategy, backward_exchange=exchange)
    tc = dataclasses.replace(TC, model=model, dp=dp, ulysses=ulysses)
    ref_losses, ref_grads, ref_params = _reference(tc)
    tol = TOL[torch.float64]
    for losses, grads, params in ranks.run(4, _one_step, tc):
        assert all(abs(a[0] - b[0]) <= tol * b[0] for a, b in zip(losses, ref_losses))
        for name in ref_params:
            assert rel_err(grads[name], ref_grads[name]) <= tol, name
            assert rel_err(params[name], ref_params[name]) <= tol, name


def _travelling_gradients(tc: TrainConfig) -> bool:
    from ringattn.comm import TAG_GRAD

    from .cases import recorded_exchanges

    with recorded_exchanges() as tags:
        _one_step(tc)
    return TAG_GRAD in tags


@pytest.mark.parametrize("strategy,ulysses", [("ring", 0), ("hybrid", 1)])
def test_backward_exchange_reaches_the_ring(ranks, strategy, ulysses):
    # Both exchanges give the same step (above); this checks the model's setting is the one that runs:
    # on a ring of 4, dK/dV travel between neighbours with "ring" and never with "direct".
    for exchange, travels in (("ring", True), ("direct", False)):
        model = dataclasses.replace(MODEL, layout="zigzag", strategy=strategy, backward_exchange=exchange)
        tc = dataclasses.replace(TC, model=model, ulysses=ulysses)
        assert ranks.run(4, _travelling_gradients, tc) == [travels] * 4, exchange


def test_short_run_learns_passkey():
    tc = TrainConfig(model=LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_chunk=64),
                     task="passkey", seq_len=128, batch=4, steps=40, lr=3e-3, warmup=5,
                     eval_lens=(128,), eval_samples=4)
    s = train(tc)
    assert s["loss_last"] < 0.5 * s["loss_first"], s
    assert s["tokens_per_s"] > 0 and s["peak_mem_mb_per_rank"] > 0
    assert set(s["eval_accuracy"]) == {"128"} and 0.0 <= s["eval_accuracy"]["128"] <= 1.0


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "ringattn", "train", *args]


RUN = ["--nproc", "2", "--layout", "zigzag", "--task", "mqar", "--seq-len", "64", "--batch", "2",
       "--steps", "6", "--ckpt-every", "2", "--dim", "32", "--layers", "1", "--eval-samples", "2",
       "--no-progress", "--json"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def _final_state(ckpt_dir: pathlib.Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    last = checkpoint.latest(ckpt_dir)
    out = ckpt_dir.parent / (ckpt_dir.name + ".pt")
    dcp_to_torch_save(str(last), str(out))
    return last.name, torch.load(out, weights_only=False)


def _assert_same(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    else:
        assert a == b, path


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    r = subprocess.run(_cli(*RUN, "--ckpt-dir", str(whole)), capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert r.returncode == 0, r.stderr

    # Same run, killed (SIGKILL to its whole process group: the parent and its rank processes) once
    # the step-2 checkpoint is complete, while it is still training.
    p = subprocess.Popen(_cli(*RUN, "--ckpt-dir", str(broken), "--throttle", "0.5"), env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while checkpoint.latest(broken) is None and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        assert checkpoint.latest(broken) is not None and p.poll() is None, "no checkpoint before the kill"
        os.killpg(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    killed_at = checkpoint.latest(broken).name
    assert killed_at in ("step-00000002", "step-00000004"), killed_at
    # A half-written save (as a kill mid-save leaves it) must be ignored by resume.
    (broken / ".tmp-step-00000099").mkdir()
    (broken / ".tmp-step-00000099" / "__0_0.distcp").write_bytes(b"garbage")

    r2 = subprocess.run(_cli(*RUN, "--ckpt-dir", str(broken)), capture_output=True, text=True, env=_env(),
                        timeout=120)
    assert r2.returncode == 0, r2.stderr
    s1, s2 = json.loads(r.stdout.splitlines()[-1]), json.loads(r2.stdout.splitlines()[-1])
    assert s2["start_step"] == int(killed_at.split("-")[1]) and s2["loss_last"] == s1["loss_last"]
    assert f"resumed from {killed_at} in {broken}" in r2.stderr and s2["resumed_from"] == str(broken / killed_at)
    assert "resumed" not in r.stderr and s1["resumed_from"] is None
    name1, st1 = _final_state(whole)
    name2, st2 = _final_state(broken)
    assert name1 == name2 == "step-00000006"
    _assert_same(st1, st2)  # parameters, optimizer state, data position and RNG, bit for bit
    assert not list(broken.glob(".tmp-*"))


def test_cli_rejects_bad_arguments():
    r = subprocess.run(_cli("--nproc", "3", "--dp", "2", "--steps", "1"), capture_output=True, text=True,
                       env=_env(), timeout=60)
    assert r.returncode == 2 and "dp (2) must divide" in r.stderr, r.stderr
    r = subprocess.run(_cli("--heads", "3", "--steps", "1"), capture_output=True, text=True, env=_env(),
                       timeout=60)
    assert r.returncode == 2 and "n_heads" in r.stderr, r.stderr
    r = subprocess.run(_cli("--strategy", "ulysses", "--backward-exchange", "direct", "--steps", "1"),
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 2 and "backward_exchange" in r.stderr, r.stderr


def test_curriculum_sets_length_steps_and_batch_per_step():
    from ringattn.app.train import parse_curriculum

    tc = TrainConfig(curriculum=parse_curriculum("96:3:8,256:2:2"), eval_samples=0)
    assert (tc.seq_len, tc.steps) == (256, 5)
    assert [tc.stage(s) for s in range(5)] == [(96, 8)] * 3 + [(256, 2)] * 2
    for bad, words in (("96:3", "LEN:STEPS:BATCH"), ("96:0:8", "must be >= 1"), ("32:3:8", ">= 96")):
        with pytest.raises(ValueError, match=words):
            TrainConfig(curriculum=parse_curriculum(bad))
    with pytest.raises(ValueError, match="multiple of dp"):
        TrainConfig(curriculum=((96, 1, 3),), dp=2, batch=2)


def test_recipe_parses_and_flags_override_it():
    from ringattn.app.train import RECIPES
    from ringattn.cli import build_parser
    from ringattn.cli.train import apply_recipe, config_from_args

    args = build_parser().parse_args(["train", "--recipe", "passkey-long"])
    tc = config_from_args(args)
    r = RECIPES["passkey-long"]
    assert tc.task == "passkey-place" and tc.curriculum == r["curriculum"] and tc.model.rope_theta == 1e6
    assert tc.seq_len == r["curriculum"][-1][0] and tc.steps == sum(st[1] for st in r["curriculum"])
    assert (tc.model.dim, tc.model.n_layers, tc.model.layout) == (r["dim"], r["n_layers"], r["layout"])
    assert apply_recipe(args).nproc == 4
    tc.check_world(4)
    tc = config_from_args(build_parser().parse_args(["train", "--recipe", "passkey-long", "--lr", "1e-3",
                                                     "--curriculum", "128:2:2"]))
    assert tc.lr == 1e-3 and (tc.seq_len, tc.steps) == (128, 2) and tc.task == "passkey-place"


def test_eval_explains_a_falling_loss_with_no_retrieval():
    from ringattn.app.data import make_task
    from ringattn.app.train import eval_hint

    tc = TrainConfig(seq_len=2048, eval_samples=4)
    hint = eval_hint(make_task("passkey"), tc, 5.59, 0.85, {"2048": 0.0}, {"2048": 2.4})
    assert "filler" in hint and "passkey-place" in hint and "2.40 nats" in hint
    assert "place" in eval_hint(make_task("passkey-random"), tc, 5.5, 2.2, {"2048": 0.0}, {"2048": 2.2})
    assert "train longer" in eval_hint(make_task("passkey-place"), tc, 5.5, 2.2, {"2048": 0.0}, {"2048": 2.2})
    assert eval_hint(make_task("passkey"), tc, 5.59, 0.85, {"2048": 0.25}, {"2048": 1.0}) is None
    assert eval_hint(make_task("passkey"), tc, 5.59, 5.0, {"2048": 0.0}, {"2048": 2.3}) is None
    assert eval_hint(make_task("mqar"), tc, 5.59, 0.85, {"2048": 0.0}, {"2048": 2.3}) is None


@pytest.mark.parametrize("task", ["passkey-random", "passkey-place"])
def test_passkey_random_scores_the_key_only(task):
    from ringattn.app.data import KEY_DIGITS, PLACE_TOKENS, make_task
    from ringattn.app.model.loss import IGNORE_INDEX

    b = make_task(task).batch(0, 3, 300)
    assert ((b.labels != IGNORE_INDEX) == b.answer).all() and (b.answer.sum(1) == KEY_DIGITS).all()
    digits = (b.inputs >= ord("0")) & (b.inputs <= ord("9")) if task == "passkey-random" else \
        b.inputs >= PLACE_TOKENS
    assert (digits.sum(1) == 2 * KEY_DIGITS - 1).all()  # the needle's key, and the answer's inputs
