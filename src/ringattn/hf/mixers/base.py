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
``@handles(name, what)``; adding a family whose mixer calls a new function is one new file. The name may also be a
method of the mixer's own class that its forward calls (RecurrentGemma's ``_rnn_scan``): the class attribute is
rebound the same way.

Some mixers keep their recurrence inline in their forward, or mix tokens in a submodule (a token shift, a
``Conv1d``), with no function to rebind. Such a module is recognised by what it is or calls, through a ``match``
predicate registered with ``@handles_module(name, what, match)``; each matched instance gets a forward of its
own (its class, torch's included, is left alone) that inside its ring forward runs the handler with the module's
own forward to call over this rank's pieces (with a state it reads from a cache, or a halo of the tokens before
each piece).

``model.generate()``: the prompt's forward (prefill) runs the mixers context-parallel as any forward, and each
handler given the generation cache also leaves in it what the module's own single-token path reads next, on
every rank: a convolution the conv inputs of the prompt's last ``k`` positions (``MixerCall.save_conv_state``),
a scan its state after the prompt's last position (``MixerCall.run_fragments(..., keep_final=True)``, written to
the cache, or returned where the function returns its final state for the module to store, as
``output_final_state=True`` or ``return_last_state=True`` asks). Every decode step then runs the module's own
code, unchanged and alike on every rank, on those states. A handler that is given a cache (or asked for the
final state) in a prefill and keeps none is refused, naming its function.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers.cache_utils import Cache

from ... import comm
from ... import mixers as mx
from ...layouts import global_positions, padded_len
from ...sharding import shard
from .. import forward, generation, positions
from ..forward import Batch
from ..refusals import UnsupportedModel, layer_index, layer_of, model_name, where
from ..registry import SETTINGS, RingSettings


@dataclass(frozen=True)
class Handler:
    name: str       # the function's name in transformers' modeling files
    what: str       # what it computes, for messages and the audit
    run: Callable   # run(original, call: MixerCall, *args, **kwargs): the original's result, context-parallel


HANDLERS: dict[str, Handler] = {}


def handles(name: str, what: str):
    """Register ``run`` as the context-parallel form of the modeling files' function ``name`` (or the mixer class's
    method ``name``, which gets the module as its first argument)."""
    def register(run: Callable) -> Callable:
        HANDLERS[name] = Handler(name, what, run)
        return run
    return register


@dataclass(frozen=True)
class ModuleHandler:
    name: str                                   # for messages and the audit
    what: str                                   # what it computes
    match: Callable[[torch.nn.Module], bool]    # whether a module is one this handler runs (by what it does)
    run: Callable   # run(forward, call: MixerCall, *args, **kwargs): the module's forward's result, context-parallel;
    #                 forward(*args, **kwargs) is the module's own forward, bound
    prepare: Callable[[torch.nn.Module], None] | None = None  # prepare(model), once per model holding a match
    # A match inside a mixer that ringattn runs by its functions is that mixer's part (its functions read the
    # match's weights: Mamba's conv1d), not a mixer of its own; False: it runs on its own wherever it is (a token
    # shift the mixer's module calls itself).
    part_of_function_mixers: bool = False


MODULE_HANDLERS: dict[str, ModuleHandler] = {}


def handles_module(name: str, what: str, match: Callable[[torch.nn.Module], bool],
                   prepare: Callable[[torch.nn.Module], None] | None = None, *, part_of_function_mixers: bool = False):
    """Register ``run`` as the context-parallel forward of every module ``match`` accepts: a mixer whose
    recurrence is inline in its forward, or a submodule that mixes tokens (a token shift, a convolution). ``match``
    must not accept a module it cannot run exactly: the rest of the model is checked for token mixing it leaves.
    ``prepare(model)``: what the model around such modules needs (``install`` calls it; it must be idempotent)."""
    def register(run: Callable) -> Callable:
        MODULE_HANDLERS[name] = ModuleHandler(name, what, match, run, prepare, part_of_function_mixers)
        return run
    return register


def cached_generate_refusal(where: str, what: str, why: str) -> UnsupportedModel:
    return UnsupportedModel(
        f"{where}: model.generate() with a cache: this model's {what} keeps its state in a cache of its own ({why}), "
        "which ringattn's sharded generation cache is not; pass use_cache=False to generate (each step then runs the "
        "whole sequence context-parallel, exactly), or generate without context parallelism",
        feature=f"model.generate() with a cache through {what}")


def refuse_cached_generate(what: str, why: str) -> Callable[[torch.nn.Module], None]:
    """A module handler's ``prepare``: ``model.generate()`` with a cache refused before the decoder runs, for a
    mixer whose model keeps its state in a cache of its own that ringattn's sharded generation cache cannot stand
    in for (``why``). Without a cache every step runs the whole sequence context-parallel, exactly."""
    def prepare(model: torch.nn.Module) -> None:
        decoder = generation._decoder(model)
        if decoder is None or "_ringattn_cached_generate" in decoder.__dict__:
            return

        def check(module, args, kwargs):
            if generation._settings(module) is None:
                return
            use = kwargs.get("use_cache")
            use = getattr(getattr(module, "config", None), "use_cache", False) if use is None else use
            if use or any(kwargs.get(k) is not None for k in ("cache", "past_key_values", "cache_params")):
                config = getattr(module, "config", None)
                raise cached_generate_refusal(model_name(config) if config is not None else type(module).__name__,
                                              what, why)

        decoder.__dict__["_ringattn_cached_generate"] = decoder.register_forward_pre_hook(check, with_kwargs=True,
                                                                                          prepend=True)
    return prepare


def module_handler(module: torch.nn.Module) -> ModuleHandler | None:
    """The module handler that runs ``module`` context-parallel, if one matches it."""
    return next((h for h in MODULE_HANDLERS.values() if h.match(module)), None)


def handled_modules(root: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``root``'s submodules (``root`` itself as ``""``) that ringattn runs context-parallel, as ``(path, module)``.
    A module matched whole inside a mixer whose functions ringattn runs is that mixer's part where its handler
    says so (``part_of_function_mixers``): the mixer's functions mix what it holds (Mamba's ``conv1d``, whose
    weights ``causal_conv1d_forward`` reads). Others run on their own (RWKV's token shift, which its mixer's
    module calls before the WKV function)."""
    found = [(p, m) for p, m in root.named_modules() if mixes(m)]
    by_function = [p for p, m in found if module_handler(m) is None]
    return [(p, m) for p, m in found if module_handler(m) is None or not module_handler(m).part_of_function_mixers
            or not any(p.startswith(q + ".") or (q == "" and p) for q in by_function)]


def mixes(module: torch.nn.Module) -> list[str]:
    """What ``module`` mixes that ringattn runs context-parallel, one ``what`` per handler (empty: it is not such
    a mixer, or it also calls a function ringattn does not know: see ``unknown_functions``)."""
    h = module_handler(module)
    return [h.what] if h is not None else list(dict.fromkeys(HANDLERS[n].what for n in mixer_functions(module)))


# Functions of the modeling files that mixers call and that act on each token alone.
PER_TOKEN = frozenset({"apply_mask_to_padding_states", "l2norm", "rms_norm_gated"})


def arguments(fn: Callable, args: tuple, kwargs: dict, *, defaults: bool = False) -> dict:
    """``fn(*args, **kwargs)``'s arguments by name, its ``**kwargs`` flattened in (with ``defaults``, the unpassed
    ones at their defaults): what a handler reads of the call it stands in for."""
    sig = inspect.signature(fn)
    bound = sig.bind(*args, **kwargs)
    if defaults:
        bound.apply_defaults()
    params = dict(bound.arguments)
    for name, p in sig.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            params.update(params.pop(name, {}))
    return params


def forward_of(cls: type):
    """``cls.forward`` under its decorators (``deprecate_kwarg``, accelerate's hooks), or None where it has no
    code of its own to read."""
    fwd = cls.__dict__.get("forward") or getattr(cls, "forward", None)
    fwd = inspect.unwrap(getattr(fwd, "__func__", fwd))
    return fwd if getattr(fwd, "__code__", None) is not None else None


def calls(cls: type) -> tuple[dict, list[str], list[str]]:
    """``cls.forward``'s globals, the registered functions it calls by name (or registered methods of its own
    class), and the other functions of transformers' modeling files it calls (a recurrence ringattn does not know,
    unless acting per token)."""
    fwd = forward_of(cls)
    if fwd is None:
        return {}, [], []
    code, g = fwd.__code__, fwd.__globals__
    known = [n for n in code.co_names if n in HANDLERS and (n in g or _own_method(cls, n) is not None)]
    other = [n for n in code.co_names
             if n in g and n not in HANDLERS and n not in PER_TOKEN and _modeling_function(g[n])]
    return g, known, other


def _own_method(cls: type, name: str):
    """``cls``'s method ``name`` where a transformers modeling file defines it (the class that does), else None."""
    owner = next((c for c in cls.__mro__ if name in c.__dict__), None)
    fn = owner.__dict__[name] if owner is not None else None
    return owner if inspect.isfunction(fn) and _modeling_function(fn) else None


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
    """A prepared mixer's forward in progress: what its handlers need.

    ``seq_len``: in the prefill of ``model.generate()``, the prompt's length (the states after its last position
    are the ones decoding continues from); 0 otherwise."""

    module: torch.nn.Module
    batch: Batch | None
    seq_len: int = 0
    kept: int = 0  # states this forward's handlers left in a generation cache

    @property
    def where(self) -> str:
        return where(self.module, getattr(self.module, "config", None) or self.module.__dict__.get("_ringattn_config"))

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

    def run_fragments(self, step: Callable, transition: Callable, inputs: list[torch.Tensor], *, keep_final: bool,
                      correct: Callable | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``ringattn.mixers.run_fragments`` over this forward's plan: ``(outputs, final)``. With ``keep_final``
        (the handler was given a cache, which only a generate prefill may) ``final`` is the state after the
        prompt's last position, ``(batch, *state_shape)`` on every rank (else None): the piece ending there is the
        only one that sees that position last (the prefill's plan ends a document at it), and one sum over the
        ranks brings its state from whichever rank ran it. ``correct`` (and the ``aux`` a step returns with it)
        pass through as ``run_fragments`` takes them; that piece's state is then ``M h_in`` plus its zero-state
        run's, ``M`` its transition."""
        b, n = inputs[0].shape[:2]
        plan = self.plan(n, b)
        if not keep_final:
            return mx.run_fragments(step, transition, inputs, plan=plan, correct=correct, **kwargs), None
        self._need_prompt("a recurrent state")
        s = self.batch.settings
        rank, world = comm.group_rank_world(s.group)
        # Each token's global position rides along as one more input: the step learns which span it runs even
        # where the layout is regrouped for the mixer.
        where = global_positions(str(s.layout), rank, world, n, inputs[0].device)
        where = where.view(1, n, 1).expand(b, n, 1).contiguous()
        last, seen = self.seq_len - 1, {}

        def tracked(*args):
            *pieces, pos, initial = args
            res = step(*pieces, initial)
            if initial is None:
                seen["dtype"] = res[1].dtype
            if int(pos[0, -1, 0]) == last:
                seen["final"] = res[1]
            return res

        def corrected(*args, **aux):
            *pieces, pos, initial = args
            if int(pos[0, -1, 0]) == last:
                m = transition(*pieces, **aux)
                zero = seen["final"]
                seen["final"] = zero + mx.apply(kwargs["kind"], m.to(initial.dtype), initial).to(zero.dtype)
            return correct(*pieces, initial, **aux)

        y = mx.run_fragments(tracked, lambda *a, **aux: transition(*a[:-1], **aux), [*inputs, where], plan=plan,
                             correct=None if correct is None else corrected, **kwargs)
        final = seen.get("final")
        shape = kwargs["state_shape"]
        # The state's dtype as the scan leaves it from a zero state, as one process keeps it (a scan may promote a
        # state it was given in the summaries' dtype): rank 0 runs the sequence's first piece so.
        code = torch.tensor(_DTYPES.index(seen["dtype"]) if "dtype" in seen else -1, device=inputs[0].device)
        if world > 1:
            dist.all_reduce(code, op=dist.ReduceOp.MAX, group=s.group)
        out = torch.zeros(b, *shape, dtype=_DTYPES[int(code)], device=inputs[0].device)
        if final is not None:
            out = out + final.detach().reshape(b, *shape).to(out.dtype)
        if world > 1:
            dist.all_reduce(out, group=s.group)
        self.kept += 1
        return y, out

    def save_conv_state(self, cache, x: torch.Tensor, layer_idx: int, state_idx: int, k: int) -> None:
        """Write into ``cache`` the conv inputs of the prompt's last ``k`` positions (zeros before position 0),
        what transformers' single-token convolution reads next: ``x`` is this rank's ``(batch, channels,
        local_len)``; each position comes from the rank that holds it (one sum over the ranks)."""
        cache.update_conv_state(self.conv_tail(x, k), layer_idx, state_idx=state_idx, conv_kernel_size=k)

    def conv_tail(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The conv inputs of the prompt's last ``k`` positions (zeros before position 0), ``(batch, channels,
        k)`` on every rank, from this rank's ``x`` ``(batch, channels, local_len)`` (one sum over the ranks)."""
        tail = self.prompt_tail(x.transpose(1, 2), k).transpose(1, 2)
        self.kept += 1
        return torch.nn.functional.pad(tail, (k - tail.shape[-1], 0))

    def prompt_tail(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The prompt's last ``min(k, prompt length)`` positions of ``x``, this rank's ``(batch, local_len, ...)``,
        on every rank (each position from the rank that holds it: one sum over the ranks), detached: what a
        module's own forward reads to write the states decoding continues from."""
        self._need_prompt("the prompt's last tokens")
        s = self.batch.settings
        rank, world = comm.group_rank_world(s.group)
        b, n = x.shape[:2]
        pos = global_positions(str(s.layout), rank, world, n, x.device)
        lo = max(self.seq_len - k, 0)
        mine = torch.nonzero((pos >= lo) & (pos < self.seq_len)).flatten()
        flag = x.dtype == torch.bool
        src = x.detach().to(torch.uint8) if flag else x.detach()
        tail = src.new_zeros(b, self.seq_len - lo, *x.shape[2:])
        tail[:, pos[mine] - lo] = src[:, mine]
        if world > 1:
            dist.all_reduce(tail, group=s.group)
        return tail.bool() if flag else tail

    def _need_prompt(self, what: str) -> None:
        if self.seq_len <= 0 or self.batch is None:
            raise RuntimeError(f"{self.where}: {what} for a cache is kept only in the prefill of model.generate()")


_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _documents(b: Batch, local_len: int, batch: int):
    """The packed documents the attention layers see (``cu_seq_lens_q``, else where position_ids restart)."""
    rows, _ = positions.packed_documents(b.cu_seq_lens, b.position_ids, batch, b.settings.group, b.settings.layout)
    if all(r is None for r in rows):
        return None
    if len(rows) == 1:
        return rows[0]
    total = local_len * comm.group_rank_world(b.settings.group)[1]
    return [torch.tensor([0, total], dtype=torch.int32) if r is None else r for r in rows]


_ACTIVE: contextvars.ContextVar[MixerCall | None] = contextvars.ContextVar("ringattn_mixer_call", default=None)


def _dispatcher(name: str, original: Callable) -> Callable:
    @functools.wraps(original)
    def dispatch(*args, **kwargs):
        call = _ACTIVE.get()
        if call is None:
            return original(*args, **kwargs)
        handler = HANDLERS[name]
        kept = call.kept
        out = handler.run(original, call, *args, **kwargs)
        wants_state = kwargs.get("output_final_state") is True or kwargs.get("return_last_state") is True or \
            any(isinstance(a, Cache) for a in (*args, *kwargs.values()))
        if call.seq_len and call.kept == kept and wants_state:
            # The module's decode steps would read a state this prefill never wrote (or the local shard's, returned
            # to the module to store): refused, on every rank alike
            raise UnsupportedModel(
                f"{call.where}: model.generate() needs the state its {handler.what} leaves after the prompt, which "
                f"ringattn's context-parallel {name} does not keep yet; generate with this model without context "
                "parallelism", layer=layer_index(call.module),
                feature=f"generation through {name} is not supported yet")
        return out

    dispatch._ringattn_original = original
    return dispatch


def _module_forward(self, *args, **kwargs):
    """The forward ``install`` gives each module a module handler matches, on the instance (no class is changed:
    other instances, of torch's own classes too, keep theirs): its own forward, or inside its ring forward the
    handler with that forward to call."""
    inner = self.__dict__.get("_ringattn_inner_forward")
    run = inner if inner is not None else functools.partial(type(self).forward, self)
    call = _ACTIVE.get()
    h = MODULE_HANDLERS.get(self.__dict__.get("_ringattn_handler")) if call is not None and call.module is self \
        else None
    if h is None:
        return run(*args, **kwargs)
    self.__dict__["_ringattn_ran"] = True
    return h.run(run, call, *args, **kwargs)


def _holder_pre(holder, args, kwargs):
    for part in holder.__dict__["_ringattn_parts"]:
        part.__dict__["_ringattn_ran"] = False


def _holder_post(holder, args, kwargs, output):
    """A part whose weights a function may read instead of its forward (a ``Conv1d``) must have run through its
    forward in the holder's ring forward: a holder that convolved with the weights another way would have mixed
    this rank's shard alone. Every rank runs the same code, so every rank raises here alike."""
    gen = generation.active()
    if forward.current() is None or (gen is not None and not gen.prefill):
        return
    for part in holder.__dict__["_ringattn_parts"]:
        if not part.__dict__.get("_ringattn_ran"):
            raise UnsupportedModel(
                f"{where(holder, holder.__dict__.get('_ringattn_config'))}: its {type(part).__name__} did not run "
                "through its forward in this context-parallel forward, so the holder mixed the tokens with its "
                "weights some other way, on this rank's shard alone; not supported (run this model without context "
                "parallelism)", layer=layer_index(holder) or layer_index(part),
                feature=f"a {type(part).__name__} whose weights its holder uses directly")


def _watch_holder(model: torch.nn.Module, path: str, part: torch.nn.Module) -> None:
    holder_path = path.rsplit(".", 1)[0] if "." in path else ""
    holder = model.get_submodule(holder_path)
    if holder_path and layer_index(holder) is None:
        holder.__dict__["_ringattn_layer_idx"] = layer_of(model, holder_path)
    parts = holder.__dict__.setdefault("_ringattn_parts", [])
    if any(p is part for p in parts):
        return
    parts.append(part)
    holder.__dict__.setdefault("_ringattn_config", getattr(model, "config", None))
    if "_ringattn_holder_hooks" not in holder.__dict__:
        holder.__dict__["_ringattn_holder_hooks"] = (
            holder.register_forward_pre_hook(_holder_pre, with_kwargs=True),
            holder.register_forward_hook(_holder_post, with_kwargs=True))


def _dispatch_module(m: torch.nn.Module, handler: ModuleHandler) -> None:
    m.__dict__["_ringattn_handler"] = handler.name
    current = m.__dict__.get("forward")
    if isinstance(current, types.MethodType) and current.__func__ is _module_forward:
        return
    # A forward already set on the instance (accelerate's hooks) stays the one that runs.
    m.__dict__["_ringattn_inner_forward"] = current
    m.forward = types.MethodType(_module_forward, m)


def _patch(cls: type) -> None:
    g, names, _ = calls(cls)
    for n in names:
        owner = _own_method(cls, n) if n not in g else None
        if owner is not None:
            if not hasattr(owner.__dict__[n], "_ringattn_original"):
                setattr(owner, n, _dispatcher(n, owner.__dict__[n]))
        elif not hasattr(g[n], "_ringattn_original"):
            g[n] = _dispatcher(n, g[n])


def _settings(module) -> RingSettings | None:
    # A mixer without a config of its own (Granite-4.0-H's) reads its model's, kept by install.
    config = getattr(module, "config", None) or module.__dict__.get("_ringattn_config")
    impl = getattr(config, "_attn_implementation", None)
    return SETTINGS.get(impl) if isinstance(impl, str) else None


def _mixer_pre(module, args, kwargs):
    cache = kwargs.get("cache", kwargs.get("cache_params", kwargs.get("past_key_values")))
    batch = forward.current()
    gen = generation.active()
    if gen is not None and not gen.prefill:
        # A decode step: every rank runs the token through the module's own single-token path, on the states the
        # prefill left in the cache (alike on every rank).
        token = _ACTIVE.set(None)
    elif gen is not None:
        # The mask first: a refusal raised here must leave no call active (the forward hook that resets it does
        # not run after a failed pre-hook), or the next forward in this thread would run as this prefill.
        args = _prefill_mask(module, args, kwargs, gen)
        token = _ACTIVE.set(MixerCall(module, _prefill_batch(gen), gen.seq_len))
    elif batch is None and _settings(module) is None:
        token = _ACTIVE.set(None)  # not running a ring: the module's own code, unchanged
    elif batch is None and torch._C._current_graph_task_id() != -1:
        # Inside backward: activation checkpointing recomputing the layer, after the model's forward is over.
        token = _ACTIVE.set(MixerCall(module, _recomputed_batch(module)))
    else:
        if cache is not None:
            where = MixerCall(module, batch).where
            raise UnsupportedModel(
                f"{where}: a cache given to a context-parallel {mixes(module)[-1]} outside "
                "model.generate() (use_cache=True, which this model's config defaults to, or past_key_values): each "
                "rank holds a shard of the sequence, so no rank's cache would hold the state after it. Pass "
                "use_cache=False to train or score (model(input_ids=..., use_cache=False)); to generate, call "
                "model.generate(), which keeps every layer's states after the prompt on every rank",
                layer=layer_index(module), feature="a cache outside model.generate() with recurrent or "
                "convolution layers")
        token = _ACTIVE.set(MixerCall(module, batch))
    module.__dict__.setdefault("_ringattn_call_tokens", []).append(token)
    return args, kwargs


def _layer_pre(layer, args, kwargs):
    """A checkpointed layer's forward: what its input is, with the batch it belongs to, for the recompute."""
    batch = forward.current()
    x = args[0] if args else kwargs.get("hidden_states")
    if batch is None or not isinstance(x, torch.Tensor) or not torch.is_grad_enabled():
        return
    # Forwards whose input is gone were replayed (or never will be); one fed the same tensor again stays, so that
    # its replay is refused rather than guessed.
    alive = [(r, b) for r, b in layer.__dict__.get("_ringattn_inputs", []) if r() is not None]
    layer.__dict__["_ringattn_inputs"] = [*alive, (weakref.ref(x), batch)]


def _recomputed_batch(module) -> Batch:
    """The batch of the forward that activation checkpointing replays: the checkpoint keeps the layer's input
    alive until the replay, so the one forward whose input is still alive is the one. Several (forwards whose
    backward has not run yet): refused, since which one this replay belongs to is not known."""
    layer = module.__dict__.get("_ringattn_layer")
    live = [b for r, b in (layer.__dict__.get("_ringattn_inputs", []) if layer is not None else []) if r() is not None]
    if len(live) == 1:
        return live[0]
    why = ("its layer is not transformers' GradientCheckpointingLayer" if layer is None else
           f"{len(live)} forwards of its layer are awaiting backward" if live else "its layer's input is gone")
    raise UnsupportedModel(
        f"{MixerCall(module, None).where}: activation checkpointing recomputes this layer during backward, outside "
        "the model's forward that tells its context-parallel mixer where each rank's tokens sit, and ringattn "
        f"cannot tell which forward it replays ({why}); run backward after each forward, or train without "
        "activation (gradient) checkpointing", layer=layer_index(module),
        feature="activation checkpointing of layers with recurrent or convolution mixers")


def _prefill_batch(gen) -> Batch:
    """The plan of a generate prefill, shared by its layers: the prompt one document ending at its last position
    (the layout's padding after it another), so that the piece holding that position ends there."""
    b = gen.__dict__.get("mixer_batch")
    if b is None:
        s = gen.settings
        total = padded_len(gen.seq_len, comm.group_rank_world(s.group)[1], s.layout)
        cu = torch.tensor([0, gen.seq_len] + ([total] if total > gen.seq_len else []), dtype=torch.int32)
        b = gen.__dict__["mixer_batch"] = Batch(s, None, cu)
    return b


# The mixers' parameters for the 2-D padding mask (1: a real token), as transformers names them.
_MASK_PARAMS = ("attention_mask", "conv_mask")


def _prefill_mask(module, args: tuple, kwargs: dict, gen) -> tuple:
    """A padded prompt: the mixer gets this rank's shard of the padding mask, as one process gives it the whole
    mask (its own code zeroes the padded positions' inputs): in ``kwargs``, or in the returned ``args`` where the
    mask is passed by position."""
    if all(r == (0, gen.seq_len) for r in gen.ranges):
        return args
    # The class's forward: a module handler's instance forward takes (*args, **kwargs)
    params = [p for p in inspect.signature(type(module).forward).parameters if p != "self"]
    name = next((n for n in _MASK_PARAMS if n in params), None)
    if name is None:
        raise UnsupportedModel(
            f"{MixerCall(module, None).where}: model.generate() with a padded batch needs the mixer's attention_mask "
            "as a keyword argument, which ringattn replaces by this rank's shard of the padding mask; this layer "
            "takes none, so padded generation with this model is not supported: generate one unpadded prompt at a "
            "time", layer=layer_index(module),
            feature="padded generation with recurrent or convolution layers")
    s = gen.settings
    mask = gen.__dict__.get("mixer_mask")
    if mask is None:
        world = comm.group_rank_world(s.group)[1]
        total = padded_len(gen.seq_len, world, s.layout)
        full = torch.zeros(len(gen.ranges), total, dtype=torch.long)
        for i, (lo, hi) in enumerate(gen.ranges):
            full[i, lo:hi] = 1
        mask = gen.__dict__["mixer_mask"] = shard(full, group=s.group, layout=s.layout)
    mask = mask.to(_device(module))
    i = params.index(name)
    if i < len(args):
        return (*args[:i], mask, *args[i + 1:])
    kwargs[name] = mask
    return args


def _device(module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _mixer_post(module, args, kwargs, output):
    tokens = module.__dict__.get("_ringattn_call_tokens")
    if tokens:
        _ACTIVE.reset(tokens.pop())


def install(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Make ``model``'s mixers context-parallel; returns them as ``(path, module)``. Idempotent."""
    found = [(p, m) for p, m in handled_modules(model) if p]
    forward.install(model)
    if not found:
        return found
    layers = _checkpointed_layers(model)
    for h in dict.fromkeys(module_handler(m) for _, m in found):
        if h is not None and h.prepare is not None:
            h.prepare(model)
    for path, m in found:
        handler = module_handler(m)
        if handler is not None:
            _dispatch_module(m, handler)
            if handler.part_of_function_mixers:
                _watch_holder(model, path, m)
        else:
            _patch(type(m))
        m.__dict__["_ringattn_config"] = getattr(model, "config", None)
        if layer_index(m) is None:  # messages name the layer of a mixer that keeps no index (RecurrentGemma's)
            m.__dict__["_ringattn_layer_idx"] = layer_of(model, path)
        layer = next((lay for p, lay in layers if path.startswith(p + ".")), None)
        if layer is not None:
            m.__dict__["_ringattn_layer"] = layer
            if "_ringattn_layer_hook" not in layer.__dict__:
                layer.__dict__["_ringattn_layer_hook"] = layer.register_forward_pre_hook(_layer_pre, with_kwargs=True)
        if "_ringattn_mixer_hooks" not in m.__dict__:
            m.__dict__["_ringattn_mixer_hooks"] = (
                m.register_forward_pre_hook(_mixer_pre, with_kwargs=True),
                m.register_forward_hook(_mixer_post, with_kwargs=True, always_call=True))
    return found


def _checkpointed_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """The modules activation checkpointing replays whole (transformers' GradientCheckpointingLayer)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - other transformers versions
        return []
    return [(p, m) for p, m in model.named_modules() if p and isinstance(m, GradientCheckpointingLayer)]


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
