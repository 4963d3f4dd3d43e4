"""``ringattn.hf.audit``: does a transformers model compute the same thing context-parallel as in one process?

The model is built twice with the same weights, in float64: once with ``attn_implementation="ring"`` on every
rank of the group (its input sharded by ``shard_batch``), once with ``sdpa`` (``eager`` where the family has no
sdpa) in one process. One random batch goes forward and backward through both; every decoder layer's output
(forward hooks, the ring shards put back in global order with ``ringattn.unshard``), the logits, the loss and
every parameter gradient (after ``sync_gradients``) are compared. The first decoder layer that disagrees is
narrowed down to the submodule whose input agrees and whose output does not (or to the layer's own code between
its submodules), and named. A model that ``prepare`` refuses is reported with that refusal, naming the layer.

Why: context-parallel mismatches are silent. A layer that mixes tokens outside attention, a mask feature the
attention call never sees, a position computed from the local shard: each gives numbers of the right shape,
slightly off on ranks above 0, and a loss that still falls.

Tolerance: both runs are float64 throughout (where the model asks for float32, as RMSNorm and rotary
embeddings do when they upcast, it gets float64, in both runs alike). Float64's unit roundoff is 1.1e-16. The
ring adds the same terms as the reference in another order (blockwise online softmax, partial gradients summed
over ranks), which moves results by a few roundoffs (measured: 1.2e-15 .. 2.1e-15 for tiny Llama, Mistral,
Qwen2, Gemma 2 and Qwen3 at 256 tokens on 2 ranks); a real context-parallel error (a token seeing the wrong
keys, a state restarted at a shard boundary, a position counted from the shard's start) is of the order of one
token's share, 1e-4 or more (measured: a running mean in one MLP 2.4e-2, FalconH1's mamba mixer 4.5e-4).
``TOL = 1e-9`` sits orders of magnitude from both. Should the reference still compute in float32 somewhere (a
float32 tensor it creates itself, which the reference run detects), float32 noise (~1e-7) is the floor and
``TOL_FLOAT32_INSIDE = 1e-5`` is used instead, and said.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import pathlib
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .. import comm
from .._measure import rel_err
from ..layouts import check_layout, unshard
from ..training import launch
from .features import _MIXER_NAMES, UnsupportedModel, check_model, model_name

TOL = 1e-9
TOL_FLOAT32_INSIDE = 1e-5
INPUT_DIFFERS = "its input (an earlier layer differs)"
NAME = "ring-audit"  # its own attention-implementation name, so an audit leaves the user's "ring" settings alone

# A tiny random config for a model type name: sizes every family understands, set where the config has the field.
TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_layers=2, n_layer=2,
            num_attention_heads=4, n_head=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
            n_positions=1024, tie_word_embeddings=False, num_experts=4, num_local_experts=4, n_routed_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=16, n_embd=32, d_model=32, ffn_dim=48,
            attention_dropout=0.0, hidden_dropout=0.0, dropout=0.0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
            n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
            # state-space mixers of hybrids: their full-size defaults cost seconds per call even at 30 tokens
            mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=8, mamba_expand=1,
            mamba_d_conv=4)
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class Source:
    """Where the model comes from: a config (random weights from ``seed``), a checkpoint folder, or a model."""

    label: str
    config: Any = None
    path: str | None = None
    model: torch.nn.Module | None = None
    trust_remote_code: bool = False

    def build(self, attn: str, seed: int, device: str | torch.device | None = None) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        kw = {"attn_implementation": attn, "trust_remote_code": self.trust_remote_code}
        if self.model is not None:
            model = copy.deepcopy(self.model)
            model.set_attn_implementation(attn)
        elif self.path is not None and _has_weights(self.path) and device is None:
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float64, **kw)
        else:
            torch.manual_seed(seed)  # identical random weights on every rank and in the reference
            with torch.device(device) if device is not None else contextlib.nullcontext():
                model = AutoModelForCausalLM.from_config(self.config, **kw)
            if device is None:
                with torch.no_grad():  # non-trivial norm weights, so their gradients are tested for real
                    g = torch.Generator().manual_seed(seed)
                    for n, p in model.named_parameters():
                        if "norm" in n:
                            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if device is None:
            model = model.double()
        with contextlib.suppress(Exception):  # grouped_mm experts have no float64; the eager loop is the same math
            if type(model)._can_set_experts_implementation():
                model.set_experts_implementation("eager")
        return model.eval()  # no dropout; gradients still flow


def _has_weights(path: str) -> bool:
    return any((pathlib.Path(path) / w).exists() for w in _WEIGHTS)


def resolve(model: str | os.PathLike | Any, *, trust_remote_code: bool = False) -> Source:
    """A :class:`Source` for a config JSON file, a local checkpoint folder, a model type name (a tiny random
    config), a ``PretrainedConfig`` or a model. Raises ``FileNotFoundError`` / ``ValueError`` naming the input."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if isinstance(model, torch.nn.Module):
        if getattr(model, "config", None) is None:
            raise TypeError(f"audit needs a transformers PreTrainedModel, got {type(model).__name__}")
        return Source(type(model).__name__, config=model.config, model=model)
    if isinstance(model, transformers.PretrainedConfig):
        return Source(model_name(model), config=model)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path, a model type name, a PretrainedConfig or a model, "
                        f"got {type(model).__name__}")
    text = os.fspath(model)
    p = pathlib.Path(text).expanduser()
    if p.is_file():
        try:
            cfg = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{text}: not a transformers config JSON ({type(e).__name__}: {_first(e)})") from None
        return Source(f"{model_name(cfg)} from {text}", config=cfg, trust_remote_code=trust_remote_code)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{text}: a folder without config.json (not a transformers checkpoint)")
        try:
            cfg = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{text}/config.json: not a transformers config "
                             f"({type(e).__name__}: {_first(e)})") from None
        weights = "its weights" if _has_weights(str(p)) else "random weights, none in the folder"
        return Source(f"{model_name(cfg)} from {text} ({weights})", config=cfg, path=str(p),
                      trust_remote_code=trust_remote_code)
    if text in CONFIG_MAPPING_NAMES and os.sep not in text:
        try:
            cfg = tiny_config(text)
        except Exception as e:  # noqa: BLE001 - a family whose config checks need more than generic sizes
            raise ValueError(f"no generic tiny config of {text!r} builds ({type(e).__name__}: {_first(e)}); write a "
                             "small config JSON for it and pass its path") from None
        return Source(f"tiny random {text}", config=cfg)
    if os.sep in text or text.endswith(".json") or text.startswith("."):
        raise FileNotFoundError(f"{text}: no such file or folder (hub names are not downloaded: save the "
                                "checkpoint or its config.json locally first)")
    raise ValueError(f"{text!r} is not a file, a folder or a transformers model type (e.g. llama, mistral, "
                     "qwen2)")


def tiny_config(model_type: str):
    """A tiny random config of ``model_type`` (2 layers, hidden size 32, vocabulary 61)."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    kw = {k: v for k, v in TINY.items() if hasattr(base, k) and not isinstance(getattr(type(base), k, None), property)}
    if hasattr(base, "qk_rope_head_dim"):  # multi-head latent attention sizes its heads itself
        kw.pop("head_dim", None)
    if getattr(base, "sliding_window", None) is not None:
        kw["sliding_window"] = 5  # below any audited length, so the window is exercised
    if getattr(base, "attention_chunk_size", None) is not None:
        kw["attention_chunk_size"] = 8
    vocab = kw.get("vocab_size")
    for k, v in base.to_dict().items():
        # The family's special tokens past the tiny vocabulary (GPT-2's 50256): transformers warns about each, on
        # every rank. None where out of range (a model that needs one in range, as an embedding's padding row, has
        # it in range already, or it would not build).
        if vocab is not None and k.endswith("_token_id") and v is not None:
            if isinstance(v, int) and v >= vocab:
                kw[k] = None
            elif isinstance(v, list) and any(isinstance(i, int) and i >= vocab for i in v):
                kw[k] = [i for i in v if not isinstance(i, int) or i < vocab] or None
    return AutoConfig.for_model(model_type, **kw)


def _first(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


@dataclass
class Row:
    """One line of the audit table: a decoder layer, or the logits / loss / parameters outside the layers."""

    name: str                       # "layer 0", "logits", "loss", "other parameters"
    module: str                     # the module's path ("model.layers.0") or "" for logits / loss
    cls: str                        # its class
    output_err: float | None = None  # largest relative error of its output (None: not compared)
    grad_err: float | None = None    # largest relative error of its parameters' gradients
    worst_param: str | None = None   # the parameter with that gradient error
    ok: bool = True
    part: str | None = None          # where in the layer it first differs, e.g. "self_attn (LlamaAttention)"


@dataclass
class AuditReport:
    """What ``audit`` found. ``ok``: every compared number matches within ``tol``; else ``culprit`` names the first
    layer and feature that disagrees (or the refusal)."""

    model: str
    world: int
    layout: str
    seq_len: int
    batch: int
    reference: str = ""
    tol: float = TOL
    float32_inside: bool = False
    ok: bool = False
    rows: list[Row] = field(default_factory=list)
    culprit: str | None = None
    refused: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for r in d["rows"]:
            for k in ("output_err", "grad_err"):
                if r[k] is not None and not math.isfinite(r[k]):
                    r[k] = str(r[k])  # JSON has no inf / nan
        return d

    def table(self) -> str:
        head = (f"audit {self.model}: {self.world} rank(s), layout {self.layout}, {self.seq_len} tokens x "
                f"{self.batch}, float64, reference {self.reference or '-'}, tolerance {self.tol:.0e}"
                + (" (the model computes parts in float32 itself)" if self.float32_inside else ""))
        lines = [head]
        if self.rows:
            w = max(len(r.cls) for r in self.rows)
            lines.append(f"{'':16}  {'class':{w}}  {'output err':>10}  {'grad err':>10}  status")
            for r in self.rows:
                status = "ok" if r.ok else "DIFFERS" + (f" in {r.part}" if r.part else "")
                lines.append(f"{r.name:16}  {r.cls:{w}}  {_fmt(r.output_err):>10}  {_fmt(r.grad_err):>10}  {status}")
        if self.ok:
            worst = max((e for r in self.rows for e in (r.output_err, r.grad_err) if e is not None), default=0.0)
            lines.append(f"exact: every layer output, the logits, the loss and every parameter gradient match "
                         f"(largest relative error {worst:.1e})")
        else:
            lines.append(f"culprit: {self.culprit}")
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def audit(model: str | os.PathLike | Any, *, nproc: int = 2, layout: str = "zigzag", seq_len: int = 256,
          batch: int = 1, seed: int = 0, tol: float | None = None, trust_remote_code: bool = False,
          compare_refused: bool = False, group=None) -> AuditReport:
    """Compare ``model`` context-parallel (``attn_implementation="ring"``) with one process, layer by layer.

    Args:
        model: a transformers config JSON file, a local checkpoint folder (its weights if it has them, else random
            weights), a model type name (``"llama"``: a tiny random config), a ``PretrainedConfig`` or a model.
        nproc: local ranks to spawn; ignored inside an initialised process group (torchrun), which is used.
        layout, seq_len, batch, seed: the sharding and the random batch (and random weights).
        tol: the relative tolerance; None = ``TOL`` (1e-9), or ``TOL_FLOAT32_INSIDE`` where the model computes
            in float32 itself.
        compare_refused: for a model ``prepare`` refuses by its structure (a module's class name, a layer type),
            run the comparison anyway, so the report shows whether and where the refused part really differs; the
            report stays not ``ok`` (in real use ``prepare`` refuses it).
        group: the process group when one is initialised (None = the default group).

    Returns:
        An :class:`AuditReport` (on every rank of the group): ``ok``, the per-layer ``rows``, the ``culprit``.
        Bad input raises ``FileNotFoundError`` / ``ValueError`` / ``TypeError`` before any rank starts.
    """
    check_layout(layout)
    for name, v in (("nproc", nproc), ("seq_len", seq_len), ("batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (the loss scores each token against the next), got {seq_len}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    source = resolve(model, trust_remote_code=trust_remote_code)
    in_group = dist.is_available() and dist.is_initialized()
    world = comm.group_rank_world(group)[1] if in_group else nproc
    report = AuditReport(source.label, world, layout, seq_len, batch)
    limit = getattr(source.config.get_text_config(), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"seq_len {seq_len} is above the model's max_position_embeddings {limit}")
    # Structure first, on the meta device (no weights), before any rank starts or blocks.
    refusal = _structure_refusal(source)
    if refusal is not None and not compare_refused:
        return _refused(report, refusal, source)
    args = (source, layout, seq_len, batch, seed, tol, report, refusal is not None)
    if in_group:
        return _audit_ranks(*args, group=group)
    if nproc == 1:
        return _audit_ranks(*args)
    return launch.spawn_collect(_audit_ranks, nproc, *args)


def _structure_refusal(source: Source) -> UnsupportedModel | None:
    # A given model is checked as it is; a config or checkpoint is built without weights.
    model = source.model
    if model is None:
        try:
            model = source.build(_reference_attn(source), 0, "meta")
        except Exception as e:  # noqa: BLE001 - bad input, told as such before any rank starts
            raise ValueError(f"{source.label}: transformers cannot build it as a causal LM "
                             f"({type(e).__name__}: {_first(e)})") from None
    try:
        check_model(model)
    except UnsupportedModel as e:
        return e
    return None


def _reference_attn(source: Source) -> str:
    if source.model is not None:
        return "sdpa" if type(source.model)._supports_sdpa else "eager"
    from transformers import AutoModelForCausalLM

    try:
        cls = AutoModelForCausalLM._model_mapping[type(source.config)]
    except (KeyError, AttributeError):
        return "eager"
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def decoder_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The decoder layers in forward order: the outermost modules of the classes transformers keeps whole
    (``_no_split_modules``), else the longest ``ModuleList``."""
    keep = set(getattr(model, "_no_split_modules", None) or ())
    found: list[tuple[str, torch.nn.Module]] = []
    for path, m in model.named_modules():
        if type(m).__name__ in keep and not any(path.startswith(p + ".") for p, _ in found):
            found.append((path, m))
    if found:
        return found
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        return []
    path, ml = max(lists, key=lambda x: len(x[1]))
    return [(f"{path}.{i}", m) for i, m in enumerate(ml)]


def _layer_of(path: str | None, layers: list[tuple[str, torch.nn.Module]]) -> int | None:
    if not path:
        return None
    for i, (p, _) in enumerate(layers):
        if path == p or path.startswith(p + "."):
            return i
    return None


def _refused(report: AuditReport, e: BaseException, source: Source | None = None,
             model: torch.nn.Module | None = None) -> AuditReport:
    report.ok = False
    report.refused = f"{type(e).__name__}: {_first(e)}"
    feature = getattr(e, "feature", None) or _first(e)
    where = "model"
    if model is None and source is not None:
        with contextlib.suppress(Exception):
            model = source.model if source.model is not None else source.build(_reference_attn(source), 0, "meta")
    layers = decoder_layers(model) if model is not None else []
    path, idx = getattr(e, "module", None), getattr(e, "layer", None)
    if path is not None and any(p.startswith(path + ".") for p, _ in layers):
        # The refused module holds the layers (MambaModel is named like its mixers): name the first layer's part.
        inner = [f"{p}.{q}".rstrip(".") for p, layer in layers for q, m in layer.named_modules()
                 if _MIXER_NAMES.search(type(m).__name__)]
        path = inner[0] if inner else path
    if idx is None:
        idx = _layer_of(path, layers)
    if path is not None and model is not None:
        cls = type(model.get_submodule(path)).__name__
        where = f"layer {idx} ({cls})" if idx is not None else f"{path} ({cls})"
    elif idx is not None:
        cls = type(layers[idx][1]).__name__ if idx < len(layers) else "?"
        where = f"layer {idx} ({cls})"
    elif model is not None:
        where = f"model ({type(model).__name__})"
    report.culprit = f"{where}: {feature} (refused by ringattn.hf.prepare: {_first(e)})"
    return report


class _Recorder:
    """Forward hooks on the decoder layers and their direct children: each call's first input and output tensor,
    by module path, in the order the calls finish."""

    def __init__(self, model: torch.nn.Module, layers: list[tuple[str, torch.nn.Module]]):
        self.calls: list[tuple[str, int, str, torch.Tensor | None, torch.Tensor | None]] = []
        self.handles = []
        self.counts: dict[str, int] = {}
        for path, layer in layers:
            self._hook(path, layer)
            for name, child in layer.named_children():
                self._hook(f"{path}.{name}", child)

    def _hook(self, path: str, module: torch.nn.Module) -> None:
        def hook(mod, args, kwargs, output):
            n = self.counts.get(path, 0)
            self.counts[path] = n + 1
            self.calls.append((path, n, type(mod).__name__, _first_tensor((args, kwargs)), _first_tensor(output)))

        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _first_tensor(x) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x.detach() if x.is_floating_point() else None
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


class _Float64Throughout(torch.overrides.TorchFunctionMode):
    """Float64 wherever the model asks for float32 (RMSNorm and rotary embeddings upcast with ``.float()`` /
    ``.to(torch.float32)``, eager attention softmaxes in float32): in both runs alike, so what is compared is the
    context parallelism, at float64 noise, not float32 rounding of inputs that differ in their last bits."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.float:
            return args[0].double()
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        kwargs = {k: torch.float64 if v is torch.float32 else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


class Float32Seen(torch.utils._python_dispatch.TorchDispatchMode):
    """Whether an op of the float64 reference produced a float32 tensor (the model computing in float32)."""

    seen = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.seen:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() > 1:
                    self.seen = True
        return out


def _audit_ranks(source: Source, layout: str, seq_len: int, batch: int, seed: int, tol: float | None,
                 report: AuditReport, refused: bool = False, group=None) -> AuditReport:
    """Every rank: the ring run; rank 0 also the reference and the comparison; the report goes to every rank."""
    from . import causal_lm_loss as lm_loss
    from . import prepare, register, shard_batch, sync_gradients

    rank, world = comm.group_rank_world(group)
    report = dataclasses.replace(report, world=world, rows=[])
    register(group=group, layout=layout, name=NAME)
    attn = _reference_attn(source)
    report.reference = attn
    with _quiet_unless(rank == 0):
        ref = source.build(attn, seed)
    cp = copy.deepcopy(ref)
    layers = decoder_layers(cp)
    vocab = cp.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    sb = shard_batch(ids, group=group, layout=layout)
    rec = _Recorder(cp, layers)
    error = None
    try:
        # A class transformers cannot switch keeps its attention (prepare refuses it below); asked anyway,
        # transformers logs that it cannot, once per rank.
        if getattr(type(cp), "_can_set_attn_implementation", lambda: True)():
            cp.set_attn_implementation(NAME)
        if refused:
            _prepare_unchecked(cp, group)
        else:
            prepare(cp, group=group)
        with _Float64Throughout(), _layer_types_unchecked(refused), _quiet_unless(rank == 0):
            # Layouts that place tokens by document hand the model the documents too (one here, the whole row).
            extra = {k: sb[k] for k in ("cu_seq_lens_q",) if k in sb}
            logits = cp(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False, **extra).logits
        loss = lm_loss(logits, sb["shift_labels"], sb["num_items_in_batch"], group=group)
        loss.backward()
        sync_gradients(cp, group=group)
    except Exception as e:  # noqa: BLE001 - a refusal or a crash is the audit's finding, on every rank alike
        error = e
    finally:
        rec.remove()
    if _any_rank(error is not None, group) and error is None:
        # Every rank leaves together: one that went on alone would wait in a collective the others never join.
        error = RuntimeError("another rank's context-parallel run raised")
    if error is not None:
        if isinstance(error, UnsupportedModel) or _raised_by_ringattn(error):
            return _refused(report, error, model=cp)
        report.culprit = (f"the context-parallel run raised {type(error).__name__}: {_first(error)} "
                          f"(at {_where_raised(error)})")
        return report
    docs = sb.get("cu_seq_lens_q")  # the balanced layout placed the tokens by them: unsharding needs them too
    gathered = _gather(rec, sb["input_ids"].shape[1], seq_len, layout, group, docs)
    full_logits = unshard(logits.detach(), group=group, layout=layout, seq_len=seq_len, cu_seqlens=docs)
    if rank == 0:
        try:
            report = _compare(report, ref, cp, layers, gathered, full_logits, loss.detach(), ids, tol)
        except Exception as e:  # noqa: BLE001 - still reach the broadcast below, which every other rank is in
            report.ok = False
            report.culprit = (f"the single-process reference ({attn}) raised {type(e).__name__}: {_first(e)} (at "
                              f"{_where_raised(e)}): the model does not run this way even without ringattn")
            refused = False
        if refused:
            e = _structure_refusal(source)
            said = _refused(dataclasses.replace(report), e, source).culprit
            report.ok, report.refused = False, f"{type(e).__name__}: {_first(e)}"
            found = report.culprit or "the comparison matches within the tolerance all the same"
            report.culprit = f"{said}; compared anyway: {found}"
    if world > 1:
        box = [report]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        report = box[0]
    return report


def _any_rank(flag: bool, group) -> bool:
    if comm.group_rank_world(group)[1] == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


@contextlib.contextmanager
def _quiet_unless(loud: bool):
    """Every rank runs the same model, so what transformers logs or warns about it (a kernel's slow fallback, a
    deprecation) is the same text on every rank: said by rank 0 only."""
    if loud:
        yield
        return
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


@contextlib.contextmanager
def _layer_types_unchecked(on: bool):
    """For ``compare_refused``: the first call's check of config.layer_types (the lazy path's refusal) off, in
    this process, for the audit's own run only."""
    from . import features

    saved = features._check_layer_types
    if on:
        features._check_layer_types = lambda config: None
    try:
        yield
    finally:
        features._check_layer_types = saved


def _prepare_unchecked(model: torch.nn.Module, group) -> None:
    """What ``prepare`` does but its refusals: the global-position RoPE patch, and the mark that it ran."""
    from . import features, positions

    for m in model.modules():
        positions.patch_dynamic_rope(m, group)
        config = getattr(m, "config", None)
        if config is not None:
            features.mark_prepared(config)


def _raise_frame(e: BaseException):
    """The innermost frame that raised ``e``, past this file's own (the float64 mode calls every op)."""
    tb = [f for f in traceback.extract_tb(e.__traceback__) if f.filename != __file__]
    return tb[-1] if tb else None


def _raised_by_ringattn(e: BaseException) -> bool:
    f = _raise_frame(e)
    return isinstance(e, ValueError) and f is not None and f"{os.sep}ringattn{os.sep}" in f.filename


def _where_raised(e: BaseException) -> str:
    f = _raise_frame(e)
    return f"{pathlib.Path(f.filename).name}:{f.lineno}" if f is not None else "?"


def _seq_dim(t: torch.Tensor, local_len: int) -> int | None:
    dims = [d for d in range(1, t.dim()) if t.shape[d] == local_len]
    return None if not dims else (1 if 1 in dims else dims[-1])


def _gather(rec: _Recorder, local_len: int, seq_len: int, layout: str, group, docs=None) -> dict:
    """(path, call) -> (class, full input or None, full output or None), the shards in global order.

    Each rank describes what it recorded first, and only what every rank recorded alike is gathered: a module
    whose outputs differ in shape between ranks (routed experts) is left out rather than desynchronising."""
    desc = []
    for path, n, cls, x, y in rec.calls:
        desc.append((path, n, cls, *[None if t is None else (tuple(t.shape), _seq_dim(t, local_len)) for t in (x, y)]))
    world = comm.group_rank_world(group)[1]
    if world > 1:
        all_desc = [None] * world
        dist.all_gather_object(all_desc, desc, group=group)
        same = [all(d[i] == desc[i] for d in all_desc) if all(len(d) == len(desc) for d in all_desc) else False
                for i in range(len(desc))]
    else:
        same = [True] * len(desc)
    out = {}
    for (path, n, cls, x, y), d, ok in zip(rec.calls, desc, same):
        full = []
        for t, meta in ((x, d[3]), (y, d[4])):
            if not ok or t is None or meta[1] is None:
                full.append(None)
                continue
            full.append(unshard(t.contiguous(), group=group, layout=layout, dim=meta[1], seq_len=seq_len,
                                cu_seqlens=docs))
        out[(path, n)] = (cls, *full)
    return out


def _grad_errs(ref: torch.nn.Module, cp: torch.nn.Module) -> dict[str, float]:
    """Per parameter: the relative gradient error. A gradient zero in exact arithmetic (a key bias: softmax ignores
    a per-row constant) is measured against the largest gradient instead, so rounding there is not a mismatch."""
    grads = dict(cp.named_parameters())
    scale = max((float(p.grad.norm()) for p in ref.parameters() if p.grad is not None), default=1.0) or 1.0
    errs = {}
    for n, p in ref.named_parameters():
        a, b = grads[n].grad, p.grad
        if a is None and b is None:
            continue
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        if float(b.norm()) <= 1e-6 * scale:
            errs[n] = float((a - b).norm()) / scale
        else:
            errs[n] = rel_err(a, b)
    return errs


def _compare(report: AuditReport, ref, cp, layers, gathered: dict, full_logits, loss, ids, tol) -> AuditReport:
    ref_layers = dict(decoder_layers(ref))
    rec = _Recorder(ref, list(ref_layers.items()))
    try:
        with _Float64Throughout(), Float32Seen() as f32:
            logits = ref(input_ids=ids, use_cache=False).logits
        labels = ids[:, 1:]
        ref_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten())
        ref_loss.backward()
    finally:
        rec.remove()
    report.float32_inside = bool(f32.seen)
    report.tol = tol if tol is not None else (TOL_FLOAT32_INSIDE if f32.seen else TOL)
    tol = report.tol
    ref_calls = {(path, n): (x, y) for path, n, _, x, y in rec.calls}
    order = [(path, n) for path, n, *_ in rec.calls]  # the order calls finished: children before their layer
    gerrs = _grad_errs(ref, cp)

    def err(key, which: int) -> float | None:
        mine = gathered.get(key)
        theirs = ref_calls.get(key)
        if mine is None or theirs is None or mine[1 + which] is None or theirs[which] is None:
            return None
        return rel_err(mine[1 + which], theirs[which])

    first_bad = first_forward = None
    for i, (path, layer) in enumerate(layers):
        keys = [k for k in order if k[0] == path]
        out_errs = [e for e in (err(k, 1) for k in keys) if e is not None]
        mine = {n: e for n, e in gerrs.items() if n.startswith(path + ".")}
        worst = max(mine, key=lambda n: _nan_big(mine[n])) if mine else None
        row = Row(f"layer {i}", path, type(layer).__name__, max(out_errs, key=_nan_big) if out_errs else None,
                  mine[worst] if worst else None, worst)
        row.ok = all(_nan_big(e) <= tol for e in (row.output_err, row.grad_err) if e is not None)
        in_errs = [e for e in (err(k, 0) for k in keys) if e is not None]
        if not _nan_big(row.output_err or 0.0) <= tol:
            if in_errs and not _nan_big(max(in_errs, key=_nan_big)) <= tol:
                row.part = INPUT_DIFFERS
            else:
                row.part = _part(path, layer, keys, order, err, tol)
                if first_forward is None:
                    first_forward = row  # a forward difference explains the gradients of every layer before it
        report.rows.append(row)
        if not row.ok and first_bad is None:
            first_bad = row
    in_layers = tuple(p + "." for p, _ in layers)
    other = {n: e for n, e in gerrs.items() if not n.startswith(in_layers)}
    logits_err = rel_err(full_logits, logits.detach())
    loss_err = rel_err(loss.reshape(()), ref_loss.detach().reshape(()))
    report.rows.append(Row("logits", "", "", logits_err, None, None, _nan_big(logits_err) <= tol))
    report.rows.append(Row("loss", "", "", loss_err, None, None, _nan_big(loss_err) <= tol))
    if other:
        worst = max(other, key=lambda n: _nan_big(other[n]))
        report.rows.append(Row("other parameters", "", "embeddings, final norm, head", None, other[worst], worst,
                               _nan_big(other[worst]) <= tol))
    report.ok = all(r.ok for r in report.rows) and len(layers) > 0
    if report.ok:
        return report
    if not layers:
        report.culprit = "no decoder layers found to compare (neither _no_split_modules nor a ModuleList)"
    elif first_forward is not None:
        report.culprit = _culprit_forward(first_forward, layers, tol)
    elif first_bad is not None:
        report.culprit = (f"{first_bad.name} ({first_bad.cls}): forward outputs match but the gradient of "
                          f"{first_bad.worst_param} differs (relative error {first_bad.grad_err:.1e}): the "
                          "context-parallel backward or gradient sync misses a part of it")
    else:
        bad = next(r for r in report.rows if not r.ok)
        what = f"the gradient of {bad.worst_param}" if bad.worst_param else bad.name
        report.culprit = (f"{bad.name}: {what} differs (relative error "
                          f"{_fmt(bad.output_err if bad.output_err is not None else bad.grad_err)}) while every "
                          "decoder layer matches: the model's code after its layers depends on the sharding")
    return report


def _nan_big(x: float | None) -> float:
    if x is None:
        return 0.0
    return float("inf") if x != x else x


def _part(path: str, layer, keys, order, err, tol) -> str | None:
    """Where in the layer the difference starts: the first child (in the order calls finished) whose input agrees
    and output does not, or the layer's own code between its children when a child's input already differs."""
    children = {f"{path}.{name}": child for name, child in layer.named_children()}
    for key in order:
        if key[0] not in children:
            continue
        x_err, y_err = err(key, 0), err(key, 1)
        cls = type(children[key[0]]).__name__
        name = key[0][len(path) + 1:]
        if x_err is not None and not _nan_big(x_err) <= tol:
            return f"the layer's own forward before {name} ({cls})"
        if y_err is not None and not _nan_big(y_err) <= tol:
            return f"{name} ({cls})"
    return "the layer's own forward (outside its submodules)"


def _culprit_forward(row: Row, layers, tol) -> str:
    err = f"relative error {row.output_err:.1e}"
    part = row.part or ""
    if part.startswith("the layer's own forward"):
        return (f"{row.name} ({row.cls}): {part} differs ({err}) while its submodules agree: token mixing "
                "outside attention is not context-parallel (each rank mixes its own shard alone)")
    name, _, cls = part.partition(" (")
    cls = cls.rstrip(")")
    layer = dict(layers)[row.module]
    child = layer.get_submodule(name)
    if _is_attention(child):
        return (f"{row.name} ({cls}): attention output differs from the single-process reference ({err}) with "
                f"its input equal: the ring call computes something else (a mask feature it does not see, or a "
                "ringattn bug: please report it with this audit)")
    return (f"{row.name} ({cls}): {name} output differs ({err}) with its input equal: it mixes tokens outside "
            "attention or depends on the rank's local shard, which is not context-parallel")


def _is_attention(module: torch.nn.Module) -> bool:
    cls = type(module).__name__.lower()
    return "attention" in cls or "attn" in cls or hasattr(module, "is_causal")
