"""The dependency bounds pyproject.toml declares are the ones `make test-compat` runs (.ci/oldest.txt)."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _oldest() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def _lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra, items in project["optional-dependencies"].items():
        if extra != "test":  # test tools are not the package's dependencies
            reqs += items
    bounds = {}
    for req in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)(,.*)?", req.strip())
        assert m, f"{req!r}: every dependency needs a lower bound that make test-compat installs"
        name, version = m.group(1).lower(), m.group(2)
        assert bounds.get(name, version) == version, f"{name}: two lower bounds"
        bounds[name] = version
    return bounds


def _same(a: str, b: str) -> bool:
    pad = lambda v: [int(x) for x in v.split(".")] + [0] * (3 - len(v.split(".")))
    return pad(a) == pad(b)


def test_oldest_pins_are_the_declared_lower_bounds():
    oldest, bounds = _oldest(), _lower_bounds()
    assert set(oldest) == set(bounds), (oldest, bounds)
    for name, version in bounds.items():
        assert _same(oldest[name], version), f"{name}: declared >={version}, compat run installs {oldest[name]}"


def test_compat_run_has_the_oldest_versions():
    if not os.environ.get("RINGATTN_COMPAT"):
        pytest.skip("the default run tests the newest releases; make test-compat sets RINGATTN_COMPAT")
    for name, version in _oldest().items():
        installed = importlib.metadata.version(name).split("+")[0]
        assert _same(installed, version), f"{name} {installed} installed, {version} expected"
