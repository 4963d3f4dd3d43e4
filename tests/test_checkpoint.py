"""Checkpoints: no loss to an older run's folder, checksums, fallback past an unusable one, configuration checks.

Single-process runs go through ``train()`` (the same code path as every rank); resuming on another number
of ranks and the shared hashing go through ``ringattn train --nproc N``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from ringattn.app.model import LlamaConfig
from ringattn.app.train import TrainConfig, train
from ringattn.training import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
TC = TrainConfig(model=LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_chunk=16), task="mqar",
                 seq_len=64, batch=2, steps=4, ckpt_every=2, lr=1e-2, warmup=1, eval_samples=0)


def _names(d: pathlib.Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("step-"))


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4: its folder and its summary."""
    d = tmp_path_factory.mktemp("whole") / "ckpt"
    return d, train(dataclasses.replace(TC, ckpt_dir=str(d)))


def _copy(whole, tmp_path) -> pathlib.Path:
    d = tmp_path / "ckpt"
    shutil.copytree(whole[0], d)
    return d


def test_no_resume_into_an_older_runs_folder_keeps_both(tmp_path, capsys):
    d = tmp_path / "ckpt"
    train(dataclasses.replace(TC, ckpt_dir=str(d), steps=12, ckpt_every=6))  # the old run: steps 6 and 12
    new = dataclasses.replace(TC, ckpt_dir=str(d), seed=1, resume=False)
    s = train(new)
    assert s["start_step"] == 0
    assert _names(d) == ["step-00000002", "step-00000004"]  # the new run's own, none deleted on writing
    assert json.loads((d / "step-00000004" / checkpoint.MANIFEST).read_text())["config"]["seed"] == 1
    previous = [p for p in d.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1 and _names(previous[0]) == ["step-00000006", "step-00000012"]  # not lost
    assert "moved to" in capsys.readouterr().err
    # A restart of the new run resumes the new run, not the old one's step 12.
    assert train(dataclasses.replace(new, resume=True))["start_step"] == 4


@pytest.mark.parametrize("damage", ["flip_bit", pytest.param("flip_64_bytes", marks=pytest.mark.slow), "truncate",
                                    "metadata", pytest.param("manifest", marks=pytest.mark.slow), "incomplete"])
def test_damaged_newest_checkpoint_is_named_and_the_previous_one_used(whole, tmp_path, capsys, damage):
    d = _copy(whole, tmp_path)
    newest = d / "step-00000004"
    shard = newest / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "flip_bit":
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(data)
    elif damage == "flip_64_bytes":
        data[1000:1064] = bytes(b ^ 0xFF for b in data[1000:1064])
        shard.write_bytes(data)
    elif damage == "truncate":
        shard.write_bytes(data[: len(data) // 3])
    elif damage == "metadata":
        meta = bytearray((newest / ".metadata").read_bytes())
        meta[len(meta) // 2] ^= 0x10
        (newest / ".metadata").write_bytes(meta)
    elif damage == "manifest":
        m = newest / checkpoint.MANIFEST
        m.write_text(m.read_text().replace('"samples": 8', '"samples": 9'))
    else:
        (newest / ".metadata").unlink()
        (newest / checkpoint.MANIFEST).unlink()
    named = {"flip_bit": "__0_0.distcp is damaged", "flip_64_bytes": "__0_0.distcp is damaged",
             "truncate": "__0_0.distcp has", "metadata": ".metadata is damaged",
             "manifest": "ringattn.json is damaged", "incomplete": "incomplete"}[damage]
    capsys.readouterr()
    s = train(dataclasses.replace(TC, ckpt_dir=str(d)))
    err = capsys.readouterr().err
    assert named in err and "step-00000004" in err and "resumed from step-00000002" in err, err
    assert s["start_step"] == 2 and s["loss_last"] == whole[1]["loss_last"]  # the same final loss, bit for bit
    assert (d / "unusable-step-00000004").is_dir() and _names(d) == ["step-00000002", "step-00000004"]
    # The next restart finds everything in order: no warning.
    s = train(dataclasses.replace(TC, ckpt_dir=str(d)))
    assert s["start_step"] == 4 and "warning" not in capsys.readouterr().err


def test_no_usable_checkpoint_is_an_error_naming_each(whole, tmp_path):
    d = _copy(whole, tmp_path)
    for step in ("step-00000002", "step-00000004"):
        (d / step / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError) as e:
        train(dataclasses.replace(TC, ckpt_dir=str(d)))
    msg = str(e.value)
    assert "no usable checkpoint" in msg and "step-00000002: __0_0.distcp" in msg and "step-00000004" in msg, msg
    assert "--no-resume" in msg


@pytest.mark.parametrize("change,named", [
    ({"seed": 1}, "seed 0 -> 1"),
    pytest.param({"task": "passkey"}, "task 'mqar' -> 'passkey'", marks=pytest.mark.slow),
    ({"dtype": "bfloat16"}, "dtype 'float32' -> 'bfloat16'"),
    pytest.param({"model": dataclasses.replace(TC.model, dim=64)}, "dim 32 -> 64", marks=pytest.mark.slow)])
def test_resume_with_another_configuration_is_refused(whole, tmp_path, change, named):
    d = _copy(whole, tmp_path)
    with pytest.raises(checkpoint.CheckpointError) as e:
        train(dataclasses.replace(TC, ckpt_dir=str(d), steps=6, **change))
    msg = str(e.value)
    assert named in msg and "allowed are changes of steps, lr" in msg and "--no-resume" in msg, msg
    assert _names(d) == ["step-00000002", "step-00000004"]  # nothing touched


def test_allowed_changes_resume_with_a_warning(whole, tmp_path, capsys):
    d = _copy(whole, tmp_path)
    model = dataclasses.replace(TC.model, layout="zigzag", ffn_chunk=0)
    capsys.readouterr()
    s = train(dataclasses.replace(TC, ckpt_dir=str(d), steps=6, lr=5e-3, model=model))
    err = capsys.readouterr().err
    assert s["start_step"] == 4 and "changed settings (allowed): lr 0.01 -> 0.005, steps 4 -> 6" in err, err
    assert "layout" not in err


def test_checkpoint_past_the_last_step_is_an_error(whole, tmp_path):
    d = _copy(whole, tmp_path)
    with pytest.raises(ValueError, match="past --steps 3"):
        train(dataclasses.replace(TC, ckpt_dir=str(d), steps=3))


RUN = ["--task", "mqar", "--seq-len", "64", "--batch", "2", "--dim", "32", "--layers", "1", "--eval-samples", "0",
       "--no-progress", "--json", "--steps", "2", "--lr", "0.01"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ringattn.cli", "train", *RUN, *args], capture_output=True,
                          text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_resume_on_another_number_of_ranks_continues_the_run(tmp_path):
    # The checkpoint of 2 ranks resumes on 1 and on 4 (2 dp x 2 cp): step 3 equals the uninterrupted
    # 2-rank run's step 3 up to rounding (float64).
    f64 = ("--dtype", "float64", "--batch", "4")
    d = tmp_path / "ckpt"
    whole = _cli("--nproc", "2", "--steps", "3", "--ckpt-dir", str(d), "--ckpt-every", "2", *f64)
    assert whole.returncode == 0, whole.stderr
    want = _last_json(whole.stdout)["losses"][2]
    for i, ranks in enumerate((("--nproc", "1"), ("--nproc", "4", "--dp", "2"))):
        e = tmp_path / f"ckpt{i}"
        shutil.copytree(d, e)
        shutil.rmtree(e / "step-00000003")  # resume from step 2
        r = _cli(*ranks, "--ckpt-dir", str(e), "--steps", "3", *f64)
        assert r.returncode == 0, r.stderr
        assert "ranks 2 -> " in r.stderr and "resharded" in r.stderr, r.stderr
        got = _last_json(r.stdout)
        assert got["start_step"] == 2 and abs(got["losses"][0] - want) <= 1e-12 * abs(want), (ranks, got, want)


def test_two_ranks_hash_and_verify_their_shares(tmp_path):
    d = tmp_path / "ckpt"
    r = _cli("--nproc", "2", "--ckpt-dir", str(d))
    assert r.returncode == 0, r.stderr
    files = json.loads((d / "step-00000002" / checkpoint.MANIFEST).read_text())["files"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(files)
    shard = d / "step-00000002" / "__1_0.distcp"  # rank 1's shard, hashed by rank 1
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x04
    shard.write_bytes(data)
    r = _cli("--nproc", "2", "--ckpt-dir", str(d), "--steps", "3")
    assert r.returncode == 1 and "__1_0.distcp is damaged" in r.stderr and "Traceback" not in r.stderr, r.stderr
