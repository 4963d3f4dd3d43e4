"""``ringattn eval`` and the scoring under it: right answers score 1, wrong ones 0, on one rank and on a
ring; the command's JSON; its errors; and (slow) the shipped checkpoint retrieves on 4 ranks."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import ringattn
from ringattn.app.data import KEY_DIGITS, PLACE_TOKENS, make_task
from ringattn.app.model import LlamaConfig
from ringattn.app.train import Parallel, TrainConfig, score, setup_parallel, train
from ringattn.cli.eval import depth_points, evaluate_depths

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "examples" / "checkpoints" / "passkey"


class Oracle(torch.nn.Module):
    """A stand-in model that reads the key from the needle and predicts it at the answer positions (and
    the key with its last digit changed, if ``wrong``), wherever the ranks hold the tokens."""

    def __init__(self, layout: str = "contiguous", wrong: bool = False):
        super().__init__()
        self.cfg = LlamaConfig(layout=layout)
        self.wrong = wrong

    def forward(self, tokens, *, seq_len=None, group=None, mesh=None, **kw):
        full = ringattn.unshard(tokens, layout=self.cfg.layout, seq_len=seq_len, group=group)
        logits = torch.zeros(*full.shape, 256)
        for b, row in enumerate(full.tolist()):
            # the needle's key: the first run of key tokens (ASCII digits or place tokens; no haystack has them)
            m = re.search(rb"[0-9]{%d}|[%c-%c]{%d}" % (KEY_DIGITS, PLACE_TOKENS, PLACE_TOKENS + 10 * KEY_DIGITS - 1,
                                                        KEY_DIGITS), bytes(row))
            key = list(m.group())
            if self.wrong:
                zero = ord("0") if key[-1] < PLACE_TOKENS else PLACE_TOKENS + 10 * (KEY_DIGITS - 1)
                key[-1] = zero + (key[-1] - zero + 1) % 10
            # the labels of the last KEY_DIGITS inputs are the key's digits
            for i, d in enumerate(key):
                logits[b, full.shape[1] - KEY_DIGITS + i, d] = 1.0
        return ringattn.shard(logits, layout=self.cfg.layout, group=group)


@pytest.mark.parametrize("task", ["passkey", "passkey-random", "passkey-place"])
def test_score_counts_a_key_right_only_if_every_digit_is(task):
    t = make_task(task)
    right = score(Oracle(), t, Parallel(), "contiguous", 300, range(5))
    assert (right.samples, right.right, right.tokens, right.tokens_right) == (5, 5, 25, 25)
    assert right.accuracy(per_token=False) == 1.0 and right.mean_answer_loss() < 5.0
    wrong = score(Oracle(wrong=True), t, Parallel(), "contiguous", 300, range(5))
    assert wrong.accuracy(per_token=False) == 0.0 and wrong.accuracy(per_token=True) == 0.8
    # logits 1 on one of 256 tokens: the loss of a right digit is log(255 + e) - 1
    assert abs(right.mean_answer_loss() - (torch.log(torch.tensor(255 + torch.e)) - 1)) < 1e-5


def _oracle_on_ranks(layout: str, wrong: bool) -> dict:
    return evaluate_depths(Oracle(layout, wrong), make_task("passkey-place"), 203, depth_points(4), 2)


@pytest.mark.parametrize("layout", [lay for lay in ringattn.LAYOUTS if lay != "balanced"])  # the model refuses it
def test_eval_on_a_ring_aligns_answers_with_predictions(ranks, layout):
    # 203 tokens do not divide 2 or 4 ranks: the padded shards must still put each answer mask on its label.
    for wrong, acc in ((False, 1.0), (True, 0.0)):
        for r in ranks.run(2, _oracle_on_ranks, layout, wrong):
            assert r["accuracy"] == acc and set(r["by_depth"].values()) == {acc}, (layout, wrong, r)
            assert r["digit_accuracy"] == (1.0 if not wrong else 0.8)
            assert list(r["by_depth"]) == ["0.000", "0.333", "0.667", "1.000"] and r["seq_len"] == 203


def test_depths_place_the_needle():
    t = make_task("passkey-random")
    first = bytes(t.at_depth(7, 1, 400, 0.0).inputs[0].tolist())
    last = bytes(t.at_depth(7, 1, 400, 1.0).inputs[0].tolist())
    assert first.startswith(b" The pass key is ") and last.index(b"The pass key is") < last.index(b"What is")
    assert last.index(b"Remember it. ") + len(b"Remember it. ") == last.index(b" What is")
    assert not any(48 <= c < 58 for c in first[first.index(b"Remember"):first.index(b"What")])  # digits: key only
    with pytest.raises(ValueError, match="depth"):
        t.at_depth(0, 1, 400, 1.5)


def test_place_tokens_mark_the_key_and_nothing_else():
    t = make_task("passkey-place")
    for depth in (0.0, 0.5, 1.0):
        b = t.at_depth(11, 1, 400, depth)
        seq = b.inputs[0].tolist() + [int(b.labels[0, -1])]  # the whole text, the last key token too
        text = bytes(seq)
        key = b.labels[0][b.answer[0]].tolist()
        assert all(PLACE_TOKENS + 10 * k <= x < PLACE_TOKENS + 10 * (k + 1) for k, x in enumerate(key))
        ascii_key = make_task("passkey-random").at_depth(11, 1, 400, depth).labels[0, -KEY_DIGITS:].tolist()
        assert [(x - PLACE_TOKENS) % 10 for x in key] == [c - ord("0") for c in ascii_key]  # the same key drawn
        assert [i for i, c in enumerate(seq) if c >= PLACE_TOKENS] == [
            *range(text.index(b"=") + 1, text.index(b"=") + 1 + KEY_DIGITS), *range(401 - KEY_DIGITS, 401)]
        assert text.count(b"=") == 2 and text.endswith(b" What is the pass key? pass key=" + bytes(key))
        assert re.search(rb" pass key=[\x80-\xff]{5}\. ", text)
    # the needle's key is the answer, and neighbouring samples draw other keys
    assert len({tuple(t.batch(i, 1, 200).labels[0, -KEY_DIGITS:].tolist()) for i in range(20)}) == 20


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def _eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringattn", "eval", *args], capture_output=True, text=True,
                          env=_env(), timeout=120)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("tiny") / "ckpt"
    torch.set_num_threads(1)
    train(TrainConfig(model=LlamaConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1), task="passkey-random",
                      seq_len=96, batch=2, steps=1, warmup=1, eval_samples=0, ckpt_dir=str(d)))
    return d


def test_eval_command_json(tiny_ckpt):
    r = _eval("--ckpt", str(tiny_ckpt), "--seq-len", "128", "--depths", "3", "--samples", "2", "--json",
              "--no-progress")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["seq_len"] == 128 and out["task"] == "passkey-random" and out["samples_per_depth"] == 2
    assert list(out["by_depth"]) == ["0.000", "0.500", "1.000"]
    assert 0.0 <= out["accuracy"] <= 1.0 and all(0.0 <= a <= 1.0 for a in out["by_depth"].values())
    assert "every answer token" in out["accuracy_means"]
    r = _eval("--ckpt", str(tiny_ckpt), "--task", "passkey", "--depths", "2", "--samples", "1")
    assert r.returncode == 0, r.stderr
    assert "depth 100.0%" in r.stdout and "accuracy = share of held-out samples" in r.stdout


@pytest.mark.parametrize("args,words", [
    (["--ckpt", "no-such-folder"], "checkpoint folder not found"),
    (["--seq-len", "50"], "needs --seq-len >= 96"),
    (["--samples", "0"], "--samples must be >= 1"),
    ([], "--ckpt DIR is required"),
])
def test_eval_command_errors(tiny_ckpt, args, words):
    argv = args if not args or args[0] == "--ckpt" else ["--ckpt", str(tiny_ckpt), *args]
    r = _eval(*argv)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_eval_needs_a_checkpoint_in_the_folder(tmp_path):
    r = _eval("--ckpt", str(tmp_path))
    assert r.returncode == 2 and "no checkpoint in" in r.stderr, r.stderr


def _shipped_on_ranks(seq_len: int, depths: int, samples: int) -> dict:
    from ringattn.cli.eval import find_checkpoint, load_model, model_config, saved_config

    path = find_checkpoint(SHIPPED)
    config = saved_config(path)
    par = setup_parallel(1)
    model = load_model(path, model_config(config, par.world), torch.float32)
    return evaluate_depths(model, make_task(config["task"], seed=config["seed"]), seq_len, depth_points(depths),
                           samples)


SHIPPED_MISSING = pytest.mark.skipif(not SHIPPED.is_dir(), reason="no shipped checkpoint (make longctx writes it)")


@pytest.mark.slow
@SHIPPED_MISSING
def test_shipped_checkpoint_reproduces_its_recorded_accuracy(ranks):
    # The same cells as recipe.json's headline (same held-out keys), on 4 ranks.
    recipe = json.loads((SHIPPED / "recipe.json").read_text())
    assert recipe["seq_len"] > recipe["single_process_max_len"]
    r = ranks.run(4, _shipped_on_ranks, recipe["seq_len"], recipe["depths"], recipe["samples_per_depth"])[0]
    assert abs(r["accuracy"] - recipe["accuracy_at_seq_len"]) < 1e-9, r
    assert min(r["by_depth"].values()) == recipe["min_depth_accuracy_at_seq_len"], r


@pytest.mark.slow
@SHIPPED_MISSING
def test_shipped_checkpoint_retrieves_at_every_depth_on_four_ranks(ranks):
    # Issue #19's goal: at the recipe's length, longer than one process trains on in the same memory.
    recipe = json.loads((SHIPPED / "recipe.json").read_text())
    assert recipe["seq_len"] == 8192 > recipe["single_process_max_len"]
    r = ranks.run(4, _shipped_on_ranks, recipe["seq_len"], 10, 10)[0]
    assert r["seq_len"] == 8192 and len(r["by_depth"]) == 10
    assert min(r["by_depth"].values()) >= 0.95, r
