"""The ``ringattn`` command: one sub-command per module, each with ``add_arguments`` and ``run``.

Bad arguments end in a one-line error and a non-zero exit, never a traceback (set
``RINGATTN_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# sub-command -> (module, one-line help)
COMMANDS = {
    "demo": ("ringattn.demo", "ring attention on a long sequence, checked against exact attention"),
    "plan": ("ringattn.plan", "cost model: which context-parallel strategy to use"),
    "train": ("ringattn.train", "context-parallel training of the small LLaMA-style model"),
    "generate": ("ringattn.generate", "long-context generation with a sharded KV cache"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ringattn", description="Exact ring attention and context parallelism.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue  # not built yet
            raise
        p = sub.add_parser(name, help=help_, description=help_)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _version() -> str:
    from . import __version__

    return f"ringattn {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("RINGATTN_DEBUG"):
            raise
        msg = str(e).strip().splitlines()
        print(f"ringattn {args.command}: error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ringattn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
