"""Every ```python and ```bash block of README.md runs as written.

A python block that names ``torchrun --nproc-per-node N`` runs on N real gloo ranks of the test pool
(whose process group is already up, so the block's ``init_process_group`` call is a no-op there);
a bash block runs in a fresh folder with the venv's ``bin`` first on ``PATH``. A block right after an
``<!-- not-run: why -->`` line is skipped, with that reason; one after ``<!-- slow: why -->`` runs in
``make test-slow`` only.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->\s*$")
SLOW = re.compile(r"<!--\s*slow:\s*(.*?)\s*-->\s*$")
TORCHRUN = re.compile(r"torchrun --nproc-per-node (\d+)")


def blocks() -> list:
    text = (ROOT / "README.md").read_text()
    out = []
    for m in FENCE.finditer(text):
        lang, code = m.group(1), m.group(2)
        if lang not in ("python", "bash"):
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = NOT_RUN.search(before)
        marks = [pytest.mark.skip(reason=skip.group(1))] if skip else [pytest.mark.slow] if SLOW.search(before) else []
        out.append(pytest.param(lang, code, id=f"{lang}-line{line}", marks=marks))
    return out


def run_python_block(code: str) -> None:
    import torch.distributed as dist

    init = dist.init_process_group
    dist.init_process_group = lambda *args, **kwargs: None
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    finally:
        dist.init_process_group = init


@pytest.mark.parametrize("lang,code", blocks())
def test_readme_block(ranks, tmp_path, lang, code):
    if lang == "python":
        world = TORCHRUN.search(code)
        if world is None:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                               cwd=tmp_path)
            assert r.returncode == 0, r.stderr[-3000:]
        else:
            ranks.run(int(world.group(1)), run_python_block, code)
        return
    for name in ("examples", "benchmarks"):  # what commands name by relative path
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0, f"{code}\n--- stdout ---\n{r.stdout[-3000:]}\n--- stderr ---\n{r.stderr[-3000:]}"


def test_every_block_is_found():
    # A fence the pattern misses would silently go untested.
    text = (ROOT / "README.md").read_text()
    fenced = len(re.findall(r"^```(?:python|bash)\n", text, re.M))
    assert fenced == len(blocks()) > 0
