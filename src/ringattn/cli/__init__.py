"""The ``ringattn`` command (also ``python -m ringattn``): one sub-command per module of this package,
each with ``add_arguments`` and ``run``.

Every failure ends in a one-line error, never a traceback (set ``RINGATTN_DEBUG=1`` to see one), with
the same exit status in every sub-command: 2 for a usage error (a bad flag or value, a file or folder
given that is missing or unusable: argparse's own errors and every ``ValueError``/``TypeError``, on
any rank), 1 for a failure at run time (a damaged checkpoint, a dead rank, a full disk, a missing
optional dependency, a result that disagrees), 130 when interrupted.

The benchmark suites are not a sub-command: they live in a source checkout's ``benchmarks/``
(``make bench``, ``python -m benchmarks``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..training.launch import RankError, is_usage_error

# Optional dependencies by import name: the extra that installs each.
OPTIONAL = {"transformers": "hf", "accelerate": "hf", "tqdm": "progress", "matplotlib": "plot"}

# sub-command -> (module, one-line help)
COMMANDS = {
    "demo": ("ringattn.cli.demo", "ring attention on a long sequence, checked against exact attention"),
    "plan": ("ringattn.cli.plan", "cost model: which context-parallel strategy to use"),
    "train": ("ringattn.cli.train", "context-parallel training of the small LLaMA-style model"),
    "eval": ("ringattn.cli.eval", "passkey retrieval accuracy of a trained checkpoint, by needle depth"),
    "generate": ("ringattn.cli.generate", "long-context generation with a sharded KV cache"),
    "audit": ("ringattn.cli.audit", "check a Hugging Face model context-parallel against one process, layer by layer"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ringattn", description="Exact ring attention and context parallelism.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_, description=help_)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _version() -> str:
    from .. import __version__

    return f"ringattn {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        given = sys.argv[1:] if argv is None else list(argv)
        at = given.index(extra[0])
        if at > 0 and given[at - 1] == "--json":
            parser.error(f"--json takes no value (it prints JSON on stdout), got {extra[0]!r}; "
                         "to write the JSON to a file use --json-out PATH")
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except ImportError as e:
        if os.environ.get("RINGATTN_DEBUG"):
            raise
        print(f"ringattn {args.command}: error: {missing_dependency(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one line and an exit status for anything, as documented above
        if os.environ.get("RINGATTN_DEBUG"):
            raise
        msg = str(e).strip().splitlines()
        print(f"ringattn {args.command}: error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print(f"ringattn {args.command}: interrupted", file=sys.stderr)
        return 130


def exit_code(e: BaseException) -> int:
    """2 for a usage error (on every rank that failed, for a ``RankError``), 1 for any other failure."""
    if isinstance(e, RankError):
        return 2 if e.usage else 1
    return 2 if is_usage_error(e) else 1


def missing_dependency(e: ImportError) -> str:
    """One line naming the optional dependency ``e`` is about and how to install it."""
    name = (e.name or "").split(".")[0]
    if name not in OPTIONAL:
        text = str(e)
        name = next((n for n in OPTIONAL if n in text), name)
    if name in OPTIONAL:
        return (f"this needs {name}, an optional dependency that is not installed: "
                f"pip install 'ringattn[{OPTIONAL[name]}]'")
    return f"a module could not be imported: {str(e).strip().splitlines()[0] if str(e).strip() else name}"
