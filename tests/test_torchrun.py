"""Restarts under torchrun: a rank killed after every new checkpoint, torchrun restarting the group each time.

The recipe of the README: ``torchrun --max-restarts N -m ringattn.cli train --ckpt-dir D ...``. Each
restart must join a fresh group (no stale rendezvous keys of the dead attempt), resume from the newest
checkpoint, and the run must end bit-identical to one that was never interrupted.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from ringattn.training import checkpoint

from .test_train import _assert_same, _final_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ["-m", "ringattn.cli", "train", "--task", "mqar", "--seq-len", "64", "--batch", "2", "--dim", "32",
         "--layers", "1", "--eval-samples", "0", "--no-progress", "--json", "--ckpt-every", "1", "--lr", "0.01"]


def _children(pid: int) -> list[int]:
    out = []
    for d in pathlib.Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return sorted(out)


def restart_rounds(tmp: pathlib.Path, rounds: int, steps: int) -> dict:
    """Kill rank 1 once per new checkpoint, ``rounds`` times, under torchrun; returns what happened."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    whole = tmp / "whole"
    r = subprocess.run([sys.executable, *TRAIN, "--nproc", "2", "--steps", str(steps), "--ckpt-dir", str(whole)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ckpt = tmp / "restarted"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(rounds + 2), *TRAIN, "--steps", str(steps), "--ckpt-dir", str(ckpt),
           "--throttle", "0.3"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    kills, seen, t0 = [], None, time.time()
    try:
        while p.poll() is None and time.time() - t0 < 120 + 60 * rounds:
            last = checkpoint.latest(ckpt)
            if len(kills) < rounds and last is not None and last != seen:
                workers = _children(p.pid)
                if len(workers) == 2:  # both ranks are up: kill the second
                    seen = last
                    os.kill(workers[1], signal.SIGKILL)
                    kills.append(last.name)
            time.sleep(0.1)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    summary = json.loads(out.strip().splitlines()[-1]) if p.returncode == 0 else None
    same = False
    if p.returncode == 0:
        (n1, s1), (n2, s2) = _final_state(whole), _final_state(ckpt)
        _assert_same(s1, s2)
        same = n1 == n2
    return {"rc": p.returncode, "kills": kills, "summary": summary, "bit_identical": same,
            "loss_last": (json.loads(r.stdout.splitlines()[-1])["loss_last"], summary and summary["loss_last"]),
            "seconds": time.time() - t0, "stderr": err[-3000:]}


@pytest.mark.slow
def test_ten_kill_and_restart_rounds_under_torchrun(tmp_path):
    res = restart_rounds(tmp_path, rounds=10, steps=14)
    assert res["rc"] == 0, res["stderr"]
    assert len(res["kills"]) == 10, res
    assert res["bit_identical"] and res["loss_last"][0] == res["loss_last"][1], res


if __name__ == "__main__":  # python -m tests.test_torchrun DIR ROUNDS: the figure in the README
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        r = restart_rounds(pathlib.Path(d), int(sys.argv[1]) if len(sys.argv) > 1 else 10, 14)
    print(json.dumps({k: v for k, v in r.items() if k != "stderr"}))
