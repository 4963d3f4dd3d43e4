"""``ringattn bench SUITE``: benchmark suites, each writing ``SUITE.json`` and ``SUITE.png`` to ``--out``.

A suite is a module ``ringattn.bench.<name>`` with ``run(out: pathlib.Path, quick: bool) -> dict``.
Every figure is measured side by side with its baseline in the same run (this machine is noisy);
results carry the machine description and date (``common.machine()``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import time

SUITES = ["kernel", "ring", "window", "strategies", "memory", "table3", "decode", "multihost"]


def available() -> list[str]:
    out = []
    for s in SUITES:
        try:
            importlib.import_module(f"ringattn.bench.{s}")
            out.append(s)
        except ModuleNotFoundError as e:
            if e.name != f"ringattn.bench.{s}":
                raise
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", nargs="+", help=f"one or more of {SUITES}, or 'all'")
    p.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    p.add_argument("--report", default=None, metavar="MD",
                   help="afterwards, render this markdown file from every result in --out")


def run(args) -> int:
    have = available()
    names = have if args.suite == ["all"] else args.suite
    for n in names:
        if n not in have:
            raise ValueError(f"unknown or unavailable suite {n!r}; available: {', '.join(have)}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        t0 = time.perf_counter()
        print(f"== bench {n} ==", flush=True)
        result = importlib.import_module(f"ringattn.bench.{n}").run(out, args.quick)
        (out / f"{n}.json").write_text(json.dumps(result, indent=2, default=str))
        print(f"== bench {n}: done in {time.perf_counter() - t0:.0f}s -> {out / (n + '.json')}", flush=True)
    if args.report:
        from .report import write_report

        write_report(out, pathlib.Path(args.report), have)
        print(f"== report -> {args.report}")
    return 0
