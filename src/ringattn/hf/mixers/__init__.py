"""Hybrid models' token mixers, context-parallel in the same layout as their attention layers.

``install(model)`` (called by ``ringattn.hf.prepare``) finds every module whose forward calls a token-mixing
function registered here (see ``base.py`` for why that, and not the class name, is how a mixer is recognised)
and runs it over the ranks with ``ringattn.mixers``' state passing and convolution halos. One file per function:
"""

from . import conv, gated_delta, kda, lightning, mamba, mamba2, rglru, rwkv, window, xlstm  # noqa: F401 - each registers its handlers
from .base import (
           HANDLERS,
           MODULE_HANDLERS,
           Handler,
           ModuleHandler,
           handled_modules,
           handles,
           handles_module,
           install,
           mixer_functions,
           mixes,
           module_handler,
           unknown_functions,
)

__all__ = ["HANDLERS", "MODULE_HANDLERS", "Handler", "ModuleHandler", "handled_modules", "handles", "handles_module",
           "install", "mixer_functions", "mixes", "module_handler", "unknown_functions"]
