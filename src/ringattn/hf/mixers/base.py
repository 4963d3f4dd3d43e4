"""The seam between transformers' hybrid-model mixers and ``ringattn.mixers``.

transformers writes every hybrid mixer the same way (Mamba, Mamba2, Gated DeltaNet, KDA, short convolutions): its
forward projects per token, then calls functions of its modeling file that mix tokens -- ``causal_conv1d_forward``
for the short convolution, a scan (``mamba2_scan_forward``, ``torch_chunk_gated_delta_rule``, ...) that takes an
initial state and returns its final state. They are the functions ``kernelize`` may swap for fused kernels, and
the only places such a layer mixes tokens. So a mixer is recognised by what its forward calls, not by its class
name, and its own code runs: ``install`` rebinds each such name in the modeling file to a dispatcher that calls
the original unchanged outside a prepared mixer's forward, and inside one runs the handler registered for that
name, which calls the same original over this rank's pieces with the state or halo passed between the ranks.

A handler is one function in one file of this package (``conv.py``, ``mamba2.py``, ...), registered with
``@handles(name, what)``; adding a family whose mixer calls a new function is one new file.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ... import comm
from ... import mixers as mx
from ...layouts import layout_of
from .. import forward, positions
from ..features import UnsupportedModel, model_name
from ..forward import Batch


@dataclass(frozen=True)
class Handler:
    name: str       # the function's name in transformers' modeling files
    what: str       # what it computes, for messages and the audit
    run: Callable   # run(original, call: MixerCall, *args, **kwargs): the original's result, context-parallel


HANDLERS: dict[str, Handler] = {}


def handles(name: str, what: str):
    """Register ``run`` as the context-parallel form of the modeling files' function ``name``."""
    def register(run: Callable) -> Callable:
        HANDLERS[name] = Handler(name, what, run)
        return run
    return register


# Functions of the modeling files that mixers call and that act on each token alone.
PER_TOKEN = frozenset({"apply_mask_to_padding_states", "l2norm", "rms_norm_gated"})


def calls(cls: type) -> tuple[dict, list[str], list[str]]:
    """``cls.forward``'s globals, the registered functions it calls by name, and the other functions of
    transformers' modeling files it calls (a recurrence ringattn does not know, unless acting per token)."""
    fwd = cls.__dict__.get("forward") or getattr(cls, "forward", None)
    fwd = inspect.unwrap(getattr(fwd, "__func__", fwd))
    code = getattr(fwd, "__code__", None)
    if code is None:
        return {}, [], []
    g = fwd.__globals__
    known = [n for n in code.co_names if n in HANDLERS and n in g]
    other = [n for n in code.co_names
             if n in g and n not in HANDLERS and n not in PER_TOKEN and _modeling_function(g[n])]
    return g, known, other


def _modeling_function(obj) -> bool:
    # Plain functions, and the callables transformers wraps them in for kernelize.
    return callable(obj) and not inspect.isclass(obj) and \
        str(getattr(obj, "__module__", None) or type(obj).__module__).startswith("transformers.models.")


def mixer_functions(module: torch.nn.Module) -> list[str]:
    """The registered token-mixing functions ``module``'s forward calls, where it calls no other function of its
    modeling file (empty: not a mixer ringattn runs; see ``unknown_functions``)."""
    _, known, other = calls(type(module))
    return known if known and not other else []


def unknown_functions(module: torch.nn.Module) -> list[str]:
    """Where ``module``'s forward calls registered token-mixing functions, the functions of its modeling file
    it also calls that ringattn does not run context-parallel (its scan, when only its convolution is known)."""
    _, known, other = calls(type(module))
    return other if known else []


@dataclass
class MixerCall:
    """A prepared mixer's forward in progress: what its handlers need."""

    module: torch.nn.Module
    batch: Batch | None

    @property
    def where(self) -> str:
        config = getattr(self.module, "config", None)
        idx = getattr(self.module, "layer_idx", None)
        name = model_name(config) if config is not None else "model"
        return f"{name}: layer {idx} ({type(self.module).__name__})" if idx is not None else \
            f"{name}: {type(self.module).__name__}"

    def plan(self, local_len: int, batch: int) -> mx.Fragments:
        """Every rank's fragments for this forward (built once per forward and length, shared by its layers)."""
        b = self.batch
        if b is None:
            raise RuntimeError(f"{self.where} was called outside its prepared model's forward: call the model, "
                               "whose forward tells the mixers where each rank's tokens sit")
        key = (local_len, batch)
        if key not in b.plans:
            b.plans[key] = mx.fragments(local_len, group=b.settings.group, layout=str(b.settings.layout),
                                        cu_seqlens=_documents(b, local_len, batch), batch=batch)
        return b.plans[key]


def _documents(b: Batch, local_len: int, batch: int):
    """The packed documents the attention layers see (``cu_seq_lens_q``, else where position_ids restart)."""
    if b.cu_seq_lens is not None:
        return list(b.cu_seq_lens) if isinstance(b.cu_seq_lens, (list, tuple)) else b.cu_seq_lens
    if layout_of(b.settings.layout).needs_documents:
        raise ValueError(f"layout={str(b.settings.layout)!r} places the tokens by document: pass the model the "
                         "cu_seq_lens_q that ringattn.hf.shard_batch returns with them")
    if b.position_ids is None:
        return None
    rows, _ = positions.documents(b.position_ids, batch, b.settings.group, b.settings.layout)
    if all(r is None for r in rows):
        return None
    total = local_len * comm.group_rank_world(b.settings.group)[1]
    return [torch.tensor([0, total], dtype=torch.int32) if r is None else r for r in rows]


_ACTIVE: contextvars.ContextVar[MixerCall | None] = contextvars.ContextVar("ringattn_mixer_call", default=None)


def _dispatcher(name: str, original: Callable) -> Callable:
    @functools.wraps(original)
    def dispatch(*args, **kwargs):
        call = _ACTIVE.get()
        if call is None:
            return original(*args, **kwargs)
        return HANDLERS[name].run(original, call, *args, **kwargs)

    dispatch._ringattn_original = original
    return dispatch


def _patch(cls: type) -> None:
    g, names, _ = calls(cls)
    for n in names:
        if not hasattr(g[n], "_ringattn_original"):
            g[n] = _dispatcher(n, g[n])


def _mixer_pre(module, args, kwargs):
    cache = kwargs.get("cache", kwargs.get("cache_params", kwargs.get("past_key_values")))
    batch = forward.current()
    if batch is None:
        token = _ACTIVE.set(None)  # not running a ring: the module's own code, unchanged
    else:
        if cache is not None:
            raise UnsupportedModel(
                f"{MixerCall(module, batch).where}: a cache given to a context-parallel "
                f"{HANDLERS[mixer_functions(module)[-1]].what} (use_cache=True, or past_key_values): "
                "generation of models with such layers is not supported yet; pass use_cache=False to train or score",
                layer=getattr(module, "layer_idx", None), feature="generation with recurrent or convolution layers")
        token = _ACTIVE.set(MixerCall(module, batch))
    module.__dict__.setdefault("_ringattn_call_tokens", []).append(token)


def _mixer_post(module, args, kwargs, output):
    tokens = module.__dict__.get("_ringattn_call_tokens")
    if tokens:
        _ACTIVE.reset(tokens.pop())


def install(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Make ``model``'s mixers context-parallel; returns them as ``(path, module)``. Idempotent."""
    found = [(p, m) for p, m in model.named_modules() if p and mixer_functions(m)]
    forward.install(model)
    for _, m in found:
        _patch(type(m))
        if "_ringattn_mixer_hooks" not in m.__dict__:
            m.__dict__["_ringattn_mixer_hooks"] = (
                m.register_forward_pre_hook(_mixer_pre, with_kwargs=True),
                m.register_forward_hook(_mixer_post, with_kwargs=True, always_call=True))
    return found


class StateCache:
    """What a transformers scan reads from and writes to its cache, for one span: the initial recurrent state
    (None: zero) in, the final one out. The scan's own code then runs any span from any state."""

    def __init__(self, initial_state: torch.Tensor | None):
        self.initial, self.final = initial_state, None

    def get_recurrent_state(self, layer_idx, state_idx: int = 0):
        return self.initial

    def get_recurrent_states_to_keep(self, layer_idx=None) -> int:
        return 0

    def update_recurrent_state(self, state, layer_idx, state_idx: int = 0):
        self.final = state
        return state

    def has_previous_state(self, layer_idx=None, state_idx=None) -> bool:
        return self.initial is not None
