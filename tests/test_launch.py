"""The local launcher (``--nproc``): signals to it stop every rank, a killed rank is named, settings are checked.

Real processes and real signals: ``ringattn train`` is started as a subprocess and signalled.
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ["--nproc", "2", "--layout", "zigzag", "--task", "mqar", "--seq-len", "64", "--batch", "2",
       "--dim", "32", "--layers", "1", "--eval-samples", "0", "--no-progress", "--json"]


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "ringattn.cli", "train", *RUN, *args]


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), **extra}


def _ranks_of(pid: int) -> list[int]:
    """The rank processes (multiprocessing spawn children, not its resource tracker) of process ``pid``."""
    found = []
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and "spawn_main" in cmd and "resource_tracker" not in cmd:
            found.append(int(d.name))
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _start_and_wait_for_checkpoint(ckpt: pathlib.Path):
    p = subprocess.Popen(_cli("--steps", "60", "--ckpt-every", "2", "--ckpt-dir", str(ckpt), "--throttle", "0.5"),
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 120
    while checkpoint.latest(ckpt) is None and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert checkpoint.latest(ckpt) is not None and p.poll() is None, p.stderr.read() if p.poll() else "slow"
    ranks = _ranks_of(p.pid)
    assert len(ranks) == 2, ranks
    return p, ranks


def _wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(r) for r in pids):
        time.sleep(0.1)
    return [r for r in pids if _alive(r)]


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 128 + signal.SIGTERM),
                                      pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),
                                      (signal.SIGKILL, -signal.SIGKILL)])
def test_signal_to_the_launcher_stops_every_rank(tmp_path, sig, code):
    ckpt = tmp_path / "ckpt"
    p, ranks = _start_and_wait_for_checkpoint(ckpt)
    try:
        t0 = time.time()
        os.kill(p.pid, sig)  # the launcher alone, not its process group
        p.wait(timeout=30)
        assert p.returncode == code, (p.returncode, p.stderr.read())
        assert time.time() - t0 < 20
        assert not _wait_gone(ranks, 15), "rank processes outlived the launcher"
    finally:
        for r in ranks:
            if _alive(r):
                os.kill(r, signal.SIGKILL)
        if p.poll() is None:
            p.kill()
    if sig == signal.SIGKILL:  # a restart on the same folder resumes from the last checkpoint
        step = int(checkpoint.latest(ckpt).name.split("-")[1])
        r = subprocess.run(_cli("--steps", str(step + 2), "--ckpt-dir", str(ckpt)), capture_output=True,
                           text=True, env=_env(), timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.splitlines()[-1])["start_step"] == step


def test_a_rank_killed_by_a_signal_is_named(tmp_path):
    p, ranks = _start_and_wait_for_checkpoint(tmp_path / "ckpt")
    try:
        os.kill(ranks[1], signal.SIGKILL)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "was killed by SIGKILL" in last, err


@pytest.mark.parametrize("value", ["abc", pytest.param("0", marks=pytest.mark.slow),
                                   pytest.param("-5", marks=pytest.mark.slow),
                                   pytest.param("nan", marks=pytest.mark.slow)])
def test_bad_pg_timeout_is_one_clear_error(value):
    env = _env(RINGATTN_PG_TIMEOUT=value)
    r = subprocess.run([sys.executable, "-c", "import ringattn, ringattn.launch, ringattn.train"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr  # importing never fails on it
    r = subprocess.run(_cli("--steps", "1"), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "RINGATTN_PG_TIMEOUT must be a positive number of seconds" in r.stderr, r.stderr
