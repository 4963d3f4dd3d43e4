"""``python -m benchmarks SUITE... [--quick] [--out DIR] [--report MD]``: each suite writes ``SUITE.json``
and ``SUITE.png`` to ``--out``; ``--report`` renders a markdown page from every result there.

A suite is a module ``benchmarks.suites.<name>`` with ``run(out: pathlib.Path, quick: bool) -> dict``.
Every figure is measured side by side with its baseline in the same run (timings on a shared machine
drift); results carry the machine description and date (``common.machine()``). Run from the root of a
source checkout (``make bench`` does).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys
import time

SUITES = ["kernel", "documents", "balance", "ring", "prefill", "window", "mods", "strategies", "memory", "table3",
          "decode", "multihost", "mixers", "hybrid"]
# Run by name only, not by 'all' (``make longctx``: it trains a model), but reported like the others.
EXTRA = ["passkey"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", nargs="+", help=f"one or more of {SUITES + EXTRA}, or 'all' (all but {EXTRA})")
    p.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run, under 30 s per suite")
    p.add_argument("--report", default=None, metavar="MD",
                   help="afterwards, render this markdown file from every result in --out")


def run(args: argparse.Namespace) -> int:
    names = SUITES if args.suite == ["all"] else args.suite
    for n in names:
        if n not in SUITES + EXTRA:
            raise ValueError(f"unknown suite {n!r}; suites: {', '.join(SUITES + EXTRA)}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        t0 = time.perf_counter()
        print(f"== bench {n} ==", flush=True)
        result = importlib.import_module(f"benchmarks.suites.{n}").run(out, args.quick)
        result["elapsed_s"] = time.perf_counter() - t0
        (out / f"{n}.json").write_text(json.dumps(result, indent=2, default=str))
        print(f"== bench {n}: done in {result['elapsed_s']:.0f}s -> {out / (n + '.json')}", flush=True)
    if args.report:
        from .report import write_report

        write_report(out, pathlib.Path(args.report), SUITES + EXTRA)
        print(f"== report -> {args.report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"python -m benchmarks: error: {e}", file=sys.stderr)
        return 2
