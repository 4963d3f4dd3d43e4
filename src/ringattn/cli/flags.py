"""Command-line flags declared once, on the config dataclasses: ``field(..., metadata=flag("help"))``.

A field with ``flag`` metadata becomes ``--field-name`` (or the metadata's ``name``); its type and
default come from the field, so a config and its command cannot drift apart. ``add_flags`` declares
them, ``from_args`` builds the config back; the dataclass's ``__post_init__`` is the only validation.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from typing import Any

from ..app.config import flag

__all__ = ["JsonFlag", "add_flags", "flag", "flag_fields", "from_args"]


def flag_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "flag" in f.metadata]


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
              defaults: dict[str, Any] | None = None, skip: Iterable[str] = ()) -> None:
    """One flag per ``flag`` field of ``cls`` (but ``skip``), defaults from the field or ``defaults``."""
    skip = set(skip)
    for f in flag_fields(cls):
        if f.name in skip:
            continue
        m = f.metadata["flag"]
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING
                                       else f.default_factory())
        name = m["name"] or "--" + f.name.replace("_", "-")
        metavar = m["metavar"] or name[2:].upper().replace("-", "_")
        if isinstance(default, bool):
            parser.add_argument(name, dest=f.name, action="store_false" if default else "store_true",
                                default=default, help=m["help"])
            continue
        kind = m["type"] or (type(default) if isinstance(default, (int, float, str)) else str)
        shown = "" if default in (None, "", ()) else f" (default: {default})"
        parser.add_argument(name, dest=f.name, type=kind, default=default, choices=m["choices"], nargs=m["nargs"],
                            metavar=None if m["choices"] else metavar, help=m["help"] + shown)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """``cls`` built from the parsed flags of its ``flag`` fields, and ``overrides``."""
    kw = {f.name: getattr(args, f.name) for f in flag_fields(cls) if hasattr(args, f.name)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    return cls(**{**kw, **overrides})


class JsonFlag(argparse.Action):
    """``--json``: print the result as JSON on stdout, in every command. It takes no value (``main``
    names ``--json-out PATH`` when a path follows it)."""

    def __init__(self, option_strings, dest, **kw):
        kw.setdefault("help", "print the result as JSON on stdout")
        super().__init__(option_strings, dest, nargs=0, default=False, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
