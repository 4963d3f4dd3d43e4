"""A new user's mistakes at the command line end in one clear line and the documented exit status.

Each test makes the mistake (two runs on one checkpoint folder, a full disk, a kill while loading, a file
given as the checkpoint folder, a length that cannot fit, a bad value in every sub-command, a missing
optional dependency, ``--top-p`` without ``--temperature``) and asserts the message.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from ringattn.app.generate import SamplingConfig, generate
from ringattn.app.model import LlamaConfig, build
from ringattn.app.train import TrainConfig, make_optimizer, train
from ringattn.cli import main
from ringattn.modes import BackwardExchange, Layout, Strategy, choose
from ringattn.training import checkpoint, launch

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--task", "mqar", "--seq-len", "64", "--batch", "2", "--dim", "32", "--layers", "1", "--heads", "4",
        "--kv-heads", "2", "--eval-samples", "0", "--no-progress", "--json"]
TC = TrainConfig(model=LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_chunk=16), task="mqar",
                 seq_len=64, batch=2, steps=4, ckpt_every=2, lr=1e-2, warmup=1, eval_samples=0)


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", **extra}


def _train(*argv: str) -> list[str]:
    return ["train", "--nproc", "1", *TINY, *argv]


# -- 1. one writer per checkpoint folder -------------------------------------------------------------

HOLD = ("import sys, time\nfrom ringattn.training.checkpoint import DirLock\n"
        "DirLock(sys.argv[1], command='ringattn train --the-first-run').acquire()\n"
        "print('held', flush=True)\ntime.sleep(600)\n")


def test_second_writer_is_refused_naming_the_first_and_a_killed_ones_lock_is_taken_over(tmp_path, capsys):
    d = tmp_path / "ckpt"
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        code = main(_train("--steps", "2", "--ckpt-dir", str(d)))
        err = capsys.readouterr().err
        assert code == 1, err
        assert f"checkpoint folder {d} is in use by another run (pid {first.pid} on host " in err, err
        assert "started 20" in err and "ringattn train --the-first-run" in err and "another --ckpt-dir" in err
        assert len(err.strip().splitlines()) == 1 and not checkpoint.latest(d)  # refused before any step
    finally:
        first.send_signal(signal.SIGKILL)  # the kernel drops its flock: no false refusal afterwards
        first.wait(timeout=30)
    assert main(_train("--steps", "2", "--ckpt-dir", str(d))) == 0
    err = capsys.readouterr().err
    assert f"took over the lock of {d} from a run that is gone (pid {first.pid} on host" in err, err
    assert checkpoint.latest(d).name == "step-00000002"
    assert (d / checkpoint.LOCK).read_bytes() == b""  # released: the next run takes it without a note
    assert main(_train("--steps", "3", "--ckpt-dir", str(d))) == 0
    assert "took over" not in capsys.readouterr().err


# -- 2. a failed save names the folder and the cause, and keeps the complete checkpoints -------------

def _fail_second_save(monkeypatch, error: BaseException) -> None:
    real, calls = checkpoint.dcp.save, []

    def save(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 1:
            return real(state, checkpoint_id=checkpoint_id)
        (pathlib.Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise error

    monkeypatch.setattr(checkpoint.dcp, "save", save)


def test_full_disk_without_errno_is_named_and_complete_checkpoints_kept(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    # What torch's zip writer raises on a full disk: no errno, no path.
    _fail_second_save(monkeypatch, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4224 "
                                                "vs 4130"))
    monkeypatch.setattr(checkpoint, "_free_bytes", lambda path: 12 << 10)
    with pytest.raises(checkpoint.CheckpointError) as e:
        train(dataclasses.replace(TC, ckpt_dir=str(d)))
    msg = str(e.value)
    assert f"could not write checkpoint step 4 in {d}: no space left on device (12.0 KiB free there" in msg, msg
    assert "complete checkpoints are kept (step-00000002)" in msg and "free space there" in msg
    assert [p.name for p in d.iterdir() if not p.name.startswith(".ringattn")] == ["step-00000002"]
    model = build(TC.model, seed=0)
    assert checkpoint.resume(d, model, make_optimizer(model, TC))["step"] == 2  # the kept one is whole


def test_one_process_checkpoints_do_not_warn(tmp_path, recwarn):
    train(dataclasses.replace(TC, ckpt_dir=str(tmp_path / "ckpt"), steps=2))
    train(dataclasses.replace(TC, ckpt_dir=str(tmp_path / "ckpt"), steps=3))  # and resume
    assert not [w for w in recwarn if "torch.distributed is disabled" in str(w.message)]


def test_enospc_from_the_writer_names_errno_and_exits_1(tmp_path, monkeypatch, capsys):
    d = tmp_path / "ckpt"
    _fail_second_save(monkeypatch, OSError(errno.ENOSPC, "No space left on device", str(d / ".tmp-step-00000004")))
    assert main(_train("--steps", "4", "--ckpt-every", "2", "--ckpt-dir", str(d))) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ringattn train: error: could not write checkpoint step 4 in {d}: No space left on "
                          "device (ENOSPC;"), err
    assert "step-00000002" in err and len(err.strip().splitlines()) == 1
    assert checkpoint.latest(d).name == "step-00000002" and not list(d.glob(".tmp-*"))


# -- 3. a load cut short by a dead peer is not a damaged checkpoint ----------------------------------

def test_peer_lost_while_loading_is_not_called_damage(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    train(dataclasses.replace(TC, ckpt_dir=str(d), steps=2))

    def load(state, checkpoint_id):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                           "[127.0.0.1]:41235")

    monkeypatch.setattr(checkpoint.dcp, "load", load)
    with pytest.raises(checkpoint.LoadInterrupted) as e:
        train(dataclasses.replace(TC, ckpt_dir=str(d)))
    msg = str(e.value)
    assert msg.startswith(f"interrupted while loading checkpoint {d / 'step-00000002'}: a peer rank stopped") \
        and "not at fault" in msg and "damaged" not in msg, msg
    assert checkpoint.latest(d).name == "step-00000002" and not list(d.glob("unusable-*"))


KILL_IN_LOAD = """
import os, signal, sys
import torch, torch.distributed as dist
from ringattn.training import checkpoint, launch
from ringattn.app.model import LlamaConfig, build

def rank(d):
    model = build(LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2), seed=0)
    optim = torch.optim.AdamW(model.parameters())
    checkpoint.save(d, model, optim, step=1, samples=0)
    if dist.get_rank() == 1:  # killed while the checkpoint is being read
        checkpoint.dcp.load = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.resume(d, model, optim)

if __name__ == "__main__":
    launch.spawn(rank, 2, sys.argv[1])
"""


def test_rank_killed_during_resume_is_told_as_such(tmp_path):
    script = tmp_path / "kill_in_load.py"
    script.write_text(KILL_IN_LOAD)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], env=_env(), capture_output=True,
                       text=True, timeout=300)
    first = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    head = next((line for line in r.stderr.splitlines() if line.startswith("ringattn.launch.RankError")), "")
    assert r.returncode != 0 and "rank 1 was killed by SIGKILL" in head, r.stderr[-3000:]
    # rank 0 sees its peer's connection close at once (the launcher gives it 2 s before stopping it)
    assert "rank 0: ringattn.checkpoint.LoadInterrupted: interrupted while loading checkpoint" in head, head
    assert "a peer rank stopped" in head and "damaged" not in head and "This is typically" not in head, head
    assert (tmp_path / "ckpt" / "step-00000001").is_dir() and not list((tmp_path / "ckpt").glob("unusable-*")), first


# -- 4. a checkpoint folder that cannot be one is refused at start -----------------------------------

def test_ckpt_dir_that_is_a_file_is_refused_at_start(tmp_path, capsys):
    f = tmp_path / "ckpt"
    f.write_text("not a folder")
    t0 = time.perf_counter()
    assert main(_train("--steps", "50", "--ckpt-dir", str(f))) == 2
    err = capsys.readouterr().err
    assert err == f"ringattn train: error: --ckpt-dir {f} is a file, not a folder: give a folder for the checkpoints\n"
    assert main(_train("--steps", "50", "--ckpt-dir", str(f / "sub"))) == 2
    assert f"--ckpt-dir {f / 'sub'} cannot be written: Not a directory (ENOTDIR)" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 30  # no training steps ran first


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_ckpt_dir_not_writable_is_refused_at_start(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(_train("--steps", "50", "--ckpt-dir", str(ro / "ckpt"))) == 2
    finally:
        ro.chmod(0o700)
    assert "cannot be written: Permission denied" in capsys.readouterr().err


# -- 5. a length no rank can hold is refused before allocating ----------------------------------------

@pytest.mark.parametrize("argv,words", [
    (["train", "--seq-len", "67108864"], "a step of 4 x 67,108,864 tokens (268,435,456 per rank) needs about "),
    (["train", "--seq-len", "4194304", "--batch", "1", "--nproc", "2"], "(2,097,152 per rank)"),
    (["generate", "--prompt-len", "400000000"], "a prompt of 1 x 400,000,000 tokens needs about "),
    (["demo", "--seq-len", "100000000"], "--seq-len 100,000,000 needs about "),
])
def test_length_that_cannot_fit_is_refused_at_once(argv, words, capsys, monkeypatch):
    monkeypatch.delenv("RINGATTN_SKIP_MEMORY_CHECK", raising=False)
    t0 = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - t0 < 20  # refused, not minutes of set-up and an allocator error
    assert words in err and "per rank on " in err and "but a rank has " in err and "MemAvailable" in err, err
    assert "--nproc N" in err and "`ringattn plan`" in err and len(err.strip().splitlines()) == 1


def test_estimate_stays_under_what_a_run_measures():
    """The default model in float32 measured 456 MB and 1125 MB peak per rank at 4096 and 32768 tokens (one
    rank, batch 1): the estimate may be lower (a refusal must never be a false one), not far off."""
    from ringattn.cli import build_parser, memory
    from ringattn.cli.train import config_from_args

    for n, measured in ((4096, 456), (32768, 1125)):
        tc = config_from_args(build_parser().parse_args(["train", "--seq-len", str(n), "--batch", "1"]))
        est = (memory.train_bytes(tc, 1)[0] + memory.BASE) / 2**20
        assert 0.6 * measured < est < measured, (n, est)


def test_long_step_is_announced(monkeypatch, capsys):
    from ringattn.cli import build_parser, memory
    from ringattn.cli.train import _check_memory, config_from_args

    monkeypatch.setattr(memory, "available", lambda local, cuda: (float(2**50), "plenty"))
    tc = config_from_args(build_parser().parse_args(["train", "--seq-len", "1048576", "--batch", "1"]))
    _check_memory(tc, 4, 4, False, True)
    err = capsys.readouterr().err
    assert err.startswith("ringattn train: note: a step of 1 x 1,048,576 tokens (262,144 per rank) needs about ")
    assert "progress shows after the first" in err
    _check_memory(config_from_args(build_parser().parse_args(["train"])), 1, 1, False, True)
    assert capsys.readouterr().err == ""  # a short run says nothing


# -- 6. exit status: 2 for usage errors, 1 for failures, in every sub-command ------------------------

@pytest.mark.parametrize("argv,words", [
    (["demo", "--nproc", "0"], "--nproc must be >= 1"),
    (["plan", "--seq-len", "64", "--world", "2", "--heads", "2", "--window", "-3", "0"], "--window"),
    (["train", "--nproc", "3", "--dp", "2", "--steps", "1"], "dp (2) must divide"),
    (["train", "--heads", "3"], "n_heads"),
    (["eval", "--ckpt", "no-such-folder"], "checkpoint folder not found"),
    (["generate", "--batch", "0"], "--batch must be >= 1"),
    (["generate", "--temperature", "0", "--top-p", "0.9"], "temperature 0 is greedy decoding, which ignores top_p"),
    (["audit", "--model", "no/such/config.json"], "no such file"),
])
def test_usage_errors_exit_2_in_every_subcommand(argv, words, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (code, err)
    assert err.startswith(f"ringattn {argv[0]}: error: ")


def bad_value_on_each_rank() -> None:
    raise ValueError("a bad value, seen by the rank")


def failure_on_each_rank() -> None:
    raise RuntimeError("a failure at run time")


def test_rank_errors_keep_their_kind():
    with pytest.raises(launch.RankError) as bad:
        launch.spawn(bad_value_on_each_rank, 2)
    with pytest.raises(launch.RankError) as failed:
        launch.spawn(failure_on_each_rank, 2)
    from ringattn.cli import exit_code

    assert bad.value.usage and exit_code(bad.value) == 2
    assert not failed.value.usage and exit_code(failed.value) == 1


# -- 7. values, not enum reprs -----------------------------------------------------------------------

def test_choices_and_messages_show_values(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--layout", "diagonal"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "(choose from 'contiguous', 'zigzag', 'striped', 'balanced')" in err, err
    assert "<Layout" not in err
    assert repr(Layout.ZIGZAG) == "'zigzag'" and f"{Strategy.RING}" == "ring" and str(BackwardExchange.DIRECT) == \
        "direct"
    assert f"{[Layout.STRIPED]}" == "['striped']"
    with pytest.raises(ValueError, match=r"layout must be one of \('contiguous', 'zigzag', 'striped', 'balanced'\)"):
        choose(Layout, "diagonal", "layout")


# -- 8. a missing optional dependency is one line ----------------------------------------------------

def test_audit_without_transformers_is_one_line():
    code = ("import sys\nsys.modules['transformers'] = None\nfrom ringattn.cli import main\n"
            "sys.exit(main(['audit', '--model', 'llama']))\n")
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr == ("ringattn audit: error: this needs transformers, an optional dependency that is not "
                        "installed: pip install 'ringattn[hf]'\n"), r.stderr


def test_missing_dependency_names_the_extra():
    from ringattn.cli import missing_dependency

    assert missing_dependency(ModuleNotFoundError("No module named 'tqdm'", name="tqdm")).endswith(
        "pip install 'ringattn[progress]'")
    assert missing_dependency(ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")).endswith(
        "pip install 'ringattn[plot]'")


# -- 9, 10. top-p / top-k sample; generate's figures have units and say the weights are random -------

def test_top_p_without_temperature_samples():
    assert SamplingConfig().temperature == 0.0  # greedy by default
    assert SamplingConfig(top_p=0.95).temperature == 1.0 and SamplingConfig(top_k=5).temperature == 1.0
    assert SamplingConfig(temperature=0.5, top_p=0.9).temperature == 0.5
    with pytest.raises(ValueError, match="temperature 0 is greedy decoding, which ignores top_k=5 and top_p=0.9"):
        SamplingConfig(temperature=0, top_k=5, top_p=0.9)
    model = build(LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2), seed=0)
    prompt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    greedy = generate(model, prompt, 12).tokens
    nucleus = generate(model, prompt, 12, sampling=SamplingConfig(top_p=0.95)).tokens
    assert not torch.equal(greedy, nucleus)  # it sampled


def test_generate_output_has_units_and_says_the_weights_are_random():
    r = subprocess.run([sys.executable, "-m", "ringattn", "generate", "--nproc", "2", "--prompt-len", "32",
                        "--max-new-tokens", "3", "--dim", "32", "--layers", "1", "--top-p", "0.95"], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "note:" in line]
    assert len(notes) == 2, r.stderr  # once, not once per rank
    assert "the weights are random (--model-seed 0; no trained checkpoint)" in notes[0]
    assert "top_p=0.95 given without --temperature: sampling at temperature 1.0" in notes[1]
    assert "tokens/s overall (first step " in r.stdout and " ms, median step " in r.stdout, r.stdout
    assert " ms = " in r.stdout and "tokens/s" in r.stdout, r.stdout
    assert "median step:" not in r.stdout
    assert "bytes sent per token per rank" in r.stdout and "prefill" in r.stdout and " s, " in r.stdout
    assert r.stderr.count("warning") == 0, r.stderr


def test_generate_json_is_unchanged_by_the_notes():
    r = subprocess.run([sys.executable, "-m", "ringattn", "generate", "--nproc", "1", "--prompt-len", "16",
                        "--max-new-tokens", "2", "--dim", "32", "--layers", "1", "--json"], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["new_tokens"] == 2  # notes go to stderr


# -- 11. what is the same on every rank is printed once ----------------------------------------------

def test_two_rank_resume_prints_each_line_once(tmp_path):
    d = tmp_path / "ckpt"
    train(dataclasses.replace(TC, ckpt_dir=str(d), steps=2))  # one process wrote it: 2 ranks reshard it
    r = subprocess.run([sys.executable, "-m", "ringattn", "train", *TINY, "--nproc", "2", "--steps", "3",
                        "--lr", "0.01", "--warmup", "1", "--ckpt-dir", str(d)], env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert any("changed settings (allowed)" in line and "ranks 1 -> 2" in line for line in lines), r.stderr
    assert f"resumed from step-00000002 in {d}" in lines, r.stderr
    assert len(lines) == len(set(lines)), r.stderr  # no line once per rank
    assert "UserWarning" not in r.stderr and "Warning:" not in r.stderr, r.stderr
