"""``audit``: the reference run in one process and the ring run on every rank, and what is refused first."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import pathlib
import traceback
from typing import Any

import torch
import torch.distributed as dist

from ... import comm
from ...layouts import check_layout
from ...sharding import unshard
from ...training import launch
from .. import features, positions
from ..batch import shard_batch
from ..features import MIXER_NAMES, UnsupportedModel, check_model
from ..interface import register
from ..loss import causal_lm_loss as lm_loss
from ..loss import sync_gradients
from ..mixers import unknown_functions
from ..prepared import prepare
from .compare import Float64Throughout, Recorder, compare, decoder_layers, gather
from .report import AuditReport, first_line
from .source import Source, resolve

NAME = "ring-audit"  # its own attention-implementation name, so an audit leaves the user's "ring" settings alone


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
        return audit_ranks(*args, group=group)
    if nproc == 1:
        return audit_ranks(*args)
    return launch.spawn_collect(audit_ranks, nproc, *args)


def _structure_refusal(source: Source) -> UnsupportedModel | None:
    # A given model is checked as it is; a config or checkpoint is built without weights.
    model = source.model
    if model is None:
        try:
            model = source.build(_reference_attn(source), 0, "meta")
        except Exception as e:  # noqa: BLE001 - bad input, told as such before any rank starts
            raise ValueError(f"{source.label}: transformers cannot build it as a causal LM "
                             f"({type(e).__name__}: {first_line(e)})") from None
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
    report.refused = f"{type(e).__name__}: {first_line(e)}"
    feature = getattr(e, "feature", None) or first_line(e)
    where = "model"
    if model is None and source is not None:
        with contextlib.suppress(Exception):
            model = source.model if source.model is not None else source.build(_reference_attn(source), 0, "meta")
    layers = decoder_layers(model) if model is not None else []
    path, idx = getattr(e, "module", None), getattr(e, "layer", None)
    if path is not None and any(p.startswith(path + ".") for p, _ in layers):
        # The refused module holds the layers (MambaModel is named like its mixers): name the first layer's part.
        # The token mixer ringattn refused: by what its forward calls where it calls modeling functions, else by name.
        inner = [f"{p}.{q}".rstrip(".") for p, layer in layers for q, m in layer.named_modules()
                 if unknown_functions(m) or MIXER_NAMES.search(type(m).__name__)]
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
    report.culprit = f"{where}: {feature} (refused by ringattn.hf.prepare: {first_line(e)})"
    return report


def audit_ranks(source: Source, layout: str, seq_len: int, batch: int, seed: int, tol: float | None,
                report: AuditReport, refused: bool = False, group=None) -> AuditReport:
    """Every rank: the ring run; rank 0 also the reference and the comparison; the report goes to every rank."""
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
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed + 1))
    sb = shard_batch(ids, group=group, layout=layout)
    rec = Recorder(cp, layers)
    try:
        logits, loss, error = _ring_run(cp, sb, refused, group)
    finally:
        rec.remove()
    if _any_rank(error is not None, group) and error is None:
        # Every rank leaves together: one that went on alone would wait in a collective the others never join.
        error = RuntimeError("another rank's context-parallel run raised")
    if error is not None:
        if isinstance(error, UnsupportedModel) or _raised_by_ringattn(error):
            return _refused(report, error, model=cp)
        report.culprit = (f"the context-parallel run raised {type(error).__name__}: {first_line(error)} "
                          f"(at {_where_raised(error)})")
        return report
    docs = sb.get("cu_seq_lens_q")  # the balanced layout placed the tokens by them: unsharding needs them too
    gathered = gather(rec, sb["input_ids"].shape[1], seq_len, layout, group, docs)
    full_logits = unshard(logits.detach(), group=group, layout=layout, seq_len=seq_len, cu_seqlens=docs)
    if rank == 0:
        report = _compare_on_rank0(report, source, attn, (ref, cp, layers, gathered, full_logits, loss.detach(), ids),
                                   tol, refused)
    return _broadcast(report, group) if world > 1 else report


def _ring_run(cp: torch.nn.Module, sb: dict, refused: bool, group):
    """The ring model's forward, loss, backward and gradient sync on this rank: ``(logits, loss, None)``, or
    ``(None, None, the error)`` (a refusal or a crash is the audit's finding, on every rank alike)."""
    rank = comm.group_rank_world(group)[0]
    try:
        # A class transformers cannot switch (RWKV: no attention at all) is given the name as building it with
        # attn_implementation=NAME would; asked to switch, transformers would log that it cannot, once per rank.
        if getattr(type(cp), "_can_set_attn_implementation", lambda: True)():
            cp.set_attn_implementation(NAME)
        else:
            cp.config._attn_implementation = NAME
        if refused:
            _prepare_unchecked(cp, group)
        else:
            prepare(cp, group=group)
        with Float64Throughout(), _layer_types_unchecked(refused), _quiet_unless(rank == 0):
            # Layouts that place tokens by document hand the model the documents too (one here, the whole row).
            extra = {k: sb[k] for k in ("cu_seq_lens_q",) if k in sb}
            logits = cp(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False, **extra).logits
        loss = lm_loss(logits, sb["shift_labels"], sb["num_items_in_batch"], group=group)
        loss.backward()
        sync_gradients(cp, group=group)
    except Exception as e:  # noqa: BLE001
        return None, None, e
    return logits, loss, None


def _compare_on_rank0(report: AuditReport, source: Source, attn: str, runs: tuple, tol: float | None,
                      refused: bool) -> AuditReport:
    """Rank 0's comparison; with ``compare_refused``, the refusal said first and the comparison after it."""
    try:
        report = compare(report, *runs, tol)
    except Exception as e:  # noqa: BLE001 - still reach the broadcast, which every other rank is in
        report.ok = False
        report.culprit = (f"the single-process reference ({attn}) raised {type(e).__name__}: {first_line(e)} (at "
                          f"{_where_raised(e)}): the model does not run this way even without ringattn")
        return report
    if refused:
        e = _structure_refusal(source)
        said = _refused(dataclasses.replace(report), e, source).culprit
        report.ok, report.refused = False, f"{type(e).__name__}: {first_line(e)}"
        found = report.culprit or "the comparison matches within the tolerance all the same"
        report.culprit = f"{said}; compared anyway: {found}"
    return report


def _broadcast(report: AuditReport, group) -> AuditReport:
    box = [report]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


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
    saved = features._check_layer_types
    if on:
        features._check_layer_types = lambda config: None
    try:
        yield
    finally:
        features._check_layer_types = saved


def _prepare_unchecked(model: torch.nn.Module, group) -> None:
    """What ``prepare`` does but its refusals: the global-position RoPE patch, and the mark that it ran."""
    for m in model.modules():
        positions.patch_dynamic_rope(m, group)
        config = getattr(m, "config", None)
        if config is not None:
            features.mark_prepared(config)


_HERE = os.path.dirname(os.path.abspath(__file__))


def _raise_frame(e: BaseException):
    """The innermost frame that raised ``e``, past the audit's own (the float64 mode calls every op)."""
    tb = [f for f in traceback.extract_tb(e.__traceback__) if os.path.dirname(os.path.abspath(f.filename)) != _HERE]
    return tb[-1] if tb else None


def _raised_by_ringattn(e: BaseException) -> bool:
    f = _raise_frame(e)
    return isinstance(e, ValueError) and f is not None and f"{os.sep}ringattn{os.sep}" in f.filename


def _where_raised(e: BaseException) -> str:
    f = _raise_frame(e)
    return f"{pathlib.Path(f.filename).name}:{f.lineno}" if f is not None else "?"
