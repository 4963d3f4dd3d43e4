"""The command line: flags declared once on the config dataclasses, ``--json`` alike everywhere, plain
progress lines without tqdm, ``python -m ringattn``."""

from __future__ import annotations

import builtins
import dataclasses
import pathlib
import subprocess
import sys

import pytest

from ringattn.app.generate import SamplingConfig
from ringattn.app.model import LlamaConfig
from ringattn.app.train import TrainConfig
from ringattn.cli import build_parser
from ringattn.cli.flags import flag_fields
from ringattn.cli.train import MODEL_DEFAULTS, Printer, Show, config_from_args


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_train_flags_are_the_config_fields():
    args = parse("train")
    assert config_from_args(args) == TrainConfig(model=LlamaConfig(**MODEL_DEFAULTS))
    for cls in (TrainConfig, LlamaConfig):
        for f in flag_fields(cls):
            assert hasattr(args, f.name), f.name
    # Presentation stays out of the config.
    assert not {"progress", "json", "throttle"} & {f.name for f in dataclasses.fields(TrainConfig)}


def test_train_flags_reach_the_config():
    tc = config_from_args(parse("train", "--layers", "3", "--heads", "8", "--kv-heads", "4", "--dim", "64",
                                "--layout", "striped", "--strategy", "hybrid", "--ulysses", "2", "--no-resume",
                                "--eval-lens", "128,256", "--checkpoint-layers", "--dtype", "float64"))
    assert (tc.model.n_layers, tc.model.n_heads, tc.model.n_kv_heads, tc.model.dim) == (3, 8, 4, 64)
    assert tc.model.layout == "striped" and tc.model.checkpoint_layers and tc.ulysses == 2
    assert tc.resume is False and tc.eval_lens == (128, 256) and tc.dtype == "float64"


@pytest.mark.parametrize("argv,words", [
    (["--seq-len", "0"], "seq_len must be >= 1"),
    (["--batch", "3", "--dp", "2"], "multiple of dp"),
    (["--strategy", "hybrid"], "ulysses"),
    (["--ulysses", "2"], "ulysses"),
    (["--heads", "3"], "model: dim"),
    (["--seq-len", "32"], "needs sequences of >= 96"),
])
def test_train_config_checks_name_the_value(argv, words):
    with pytest.raises(ValueError, match=words):
        config_from_args(parse("train", *argv))


def test_generate_flags_are_the_config_fields():
    args = parse("generate", "--temperature", "0.7", "--top-k", "5", "--layers", "1")
    assert SamplingConfig(temperature=0.7, top_k=5) == SamplingConfig(
        **{f.name: getattr(args, f.name) for f in flag_fields(SamplingConfig)})
    assert args.n_layers == 1 and args.layout == "zigzag" and not hasattr(args, "ffn_chunk")


@pytest.mark.parametrize("command", [["train"], ["generate"], ["audit", "--model", "llama"],
                                     ["plan", "--seq-len", "64", "--world", "2", "--heads", "2"]])
def test_json_is_a_flag_everywhere(command, capsys):
    from ringattn.cli import main

    assert parse(*command, "--json").json is True and parse(*command).json is False
    with pytest.raises(SystemExit) as e:
        main([*command, "--json", "out.json"])
    assert e.value.code == 2 and "--json-out PATH" in capsys.readouterr().err


def test_progress_lines_without_tqdm(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError("no tqdm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    p = Printer(Show(), rank=0)
    p.start(2, 4, pathlib.Path("ckpt/step-00000002"))
    p.step(2, 1.5, 0.3, 1000.0)
    p.step(3, 1.25, 0.2, 1000.0)
    p.close()
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "resumed from step-00000002 in ckpt"
    assert err[-1].startswith("train step 4/4: loss 1.2500")
    quiet = Printer(Show(), rank=1)
    quiet.start(0, 4, None)
    quiet.step(0, 1.0, 0.1, 1.0)
    assert capsys.readouterr().err == ""


def test_python_dash_m_ringattn():
    r = subprocess.run([sys.executable, "-m", "ringattn", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ringattn ")


def test_warnings_printed_once_not_per_rank(tmp_path):
    """A warning every rank would raise (same code) is printed by rank 0 only; generation's merge uses the
    non-deprecated all-gather."""
    code = ("import warnings, torch.distributed as dist\n"
            "from ringattn import launch\n"
            "def fn():\n"
            "    warnings.warn('same on every rank', FutureWarning)\n"
            "if __name__ == '__main__':\n"
            "    launch.spawn(fn, 2)\n")
    script = tmp_path / "warn.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("FutureWarning: same on every rank") == 1, r.stderr
    g = subprocess.run([sys.executable, "-m", "ringattn", "generate", "--nproc", "2", "--prompt-len", "32",
                        "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert g.returncode == 0, g.stderr
    assert "deprecated" not in g.stderr, g.stderr
