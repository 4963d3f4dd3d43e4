"""Flag metadata for the demo's config dataclasses: ``field(..., metadata=flag("help"))``.

Pure data, so a config declares its command-line flag where the field is defined without the library
importing the CLI; ``ringattn.cli.flags`` turns these fields into argparse flags and back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def flag(help: str, *, name: str | None = None, choices: Iterable | None = None,
         type: Callable[[str], Any] | None = None, nargs: int | str | None = None,
         metavar: str | tuple[str, ...] | None = None) -> dict:
    """Field metadata that exposes the field as a flag. A bool field is a switch: ``--name`` sets it when
    it defaults to False; give ``name="--no-..."`` for one that defaults to True."""
    return {"flag": {"help": help, "name": name, "choices": None if choices is None else list(choices),
                     "type": type, "nargs": nargs, "metavar": metavar}}
