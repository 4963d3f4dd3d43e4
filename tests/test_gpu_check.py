"""benchmarks/gpu_check.py imports, parses its options, and on a machine without CUDA exits 0 saying so."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_help():
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--out" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-device path")
def test_gpu_check_without_cuda(tmp_path, capsys):
    mod = _load()
    assert mod.parse_args(["--out", str(tmp_path / "x.json"), "--no-bench"]).no_bench
    assert mod.main(["--out", str(tmp_path / "x.json")]) == 0
    assert "no CUDA device: nothing to check" in capsys.readouterr().out
    assert not (tmp_path / "x.json").exists()


def test_gpu_check_reference_and_report():
    """The script's own float64 reference and report run on CPU (the parts a GPU run trusts)."""
    mod = _load()
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, 9, 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, 9, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    keep = mod.keep_mask(9, causal=True, seq_len=7, cu_seqlens=[0, 3, 9])
    out, lse, dq, dk, dv = mod.reference(q, k, v, dout, keep, 0.3)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert mod.rel_err(out, out) == 0.0
    from ringattn.kernels import BACKENDS

    ro, rl = BACKENDS["reference"].forward_dense(q, k, v, scale=0.3, causal=False, mask=keep)
    assert mod.rel_err(out, ro) < 1e-12 and mod.rel_err(lse, rl) < 1e-12
    row = dict(path="backend", dtype="bfloat16", case="full", kv_heads=2, errors={"out": 1e-3}, ok=True)
    md = mod.markdown(dict(device="x", torch="y", info={}, correctness=[row], throughput=[]))
    assert "PASS" in md
