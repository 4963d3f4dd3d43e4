"""The short import paths of modules that live in a subpackage: ``ringattn.train`` is
``ringattn.app.train``, ``ringattn.model.loss`` is ``ringattn.app.model.loss``, and so on.

One finder on ``sys.meta_path`` answers for the names in ``ALIASES`` and everything under them with the
module of the real path: one module object under two names, never a second copy, so a patch or an
``isinstance`` through either name sees the same thing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

ALIASES = {
    "ringattn.model": "ringattn.app.model",
    "ringattn.train": "ringattn.app.train",
    "ringattn.data": "ringattn.app.data",
    "ringattn.generate": "ringattn.app.generate",
    "ringattn.fsdp": "ringattn.training.fsdp",
    "ringattn.checkpoint": "ringattn.training.checkpoint",
    "ringattn.launch": "ringattn.training.launch",
}


def target(name: str) -> str | None:
    """The real module path of ``name``, or None when ``name`` is no alias."""
    for short, real in ALIASES.items():
        if name == short or name.startswith(short + "."):
            return real + name[len(short):]
    return None


def short_path(cls: type) -> type:
    """Class decorator: name ``cls`` by its documented short path (``ringattn.launch.RankError``), as
    tracebacks and the launcher's error reports print it; it pickles through the alias all the same."""
    for short, real in ALIASES.items():
        if cls.__module__ == real or cls.__module__.startswith(real + "."):
            cls.__module__ = short + cls.__module__[len(real):]
    return cls


class _Loader(importlib.abc.Loader):
    def __init__(self, real: str):
        self.real = real
        self.spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.real)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system stamped the alias's spec on the module: give it back its own.
        module.__spec__ = self.spec


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target_module=None):
        real = target(name)
        if real is None:
            return None
        return importlib.util.spec_from_loader(name, _Loader(real))


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
