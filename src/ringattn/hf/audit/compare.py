"""The two runs side by side: hooks that record every module's input and output, the float64 modes, the ring's
shards put back in global order, and the first layer (and submodule) whose output differs."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ... import comm
from ..._measure import rel_err
from ...sharding import unshard
from .report import INPUT_DIFFERS, TOL, TOL_FLOAT32_INSIDE, AuditReport, Row, fmt


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


class Recorder:
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


class Float64Throughout(torch.overrides.TorchFunctionMode):
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


def _seq_dim(t: torch.Tensor, local_len: int) -> int | None:
    dims = [d for d in range(1, t.dim()) if t.shape[d] == local_len]
    return None if not dims else (1 if 1 in dims else dims[-1])


def gather(rec: Recorder, local_len: int, seq_len: int, layout: str, group, docs=None) -> dict:
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


def compare(report: AuditReport, ref, cp, layers, gathered: dict, full_logits, loss, ids, tol) -> AuditReport:
    """Rank 0: the reference run of ``ref`` on the whole batch beside the ring run's ``gathered`` calls,
    ``full_logits``, ``loss`` and ``cp``'s gradients; a row per layer, then the culprit of the first mismatch."""
    logits, ref_loss, calls, f32_seen = _reference_run(ref, ids)
    report.float32_inside = f32_seen
    report.tol = tol = tol if tol is not None else (TOL_FLOAT32_INSIDE if f32_seen else TOL)
    errs = _CallErrors(gathered, calls)
    gerrs = _grad_errs(ref, cp)
    first_bad = first_forward = None
    for i, (path, layer) in enumerate(layers):
        row, forward = _layer_row(i, path, layer, errs, gerrs, tol)
        if forward and first_forward is None:
            first_forward = row  # a forward difference explains the gradients of every layer before it
        report.rows.append(row)
        if not row.ok and first_bad is None:
            first_bad = row
    report.rows += _model_rows(layers, gerrs, rel_err(full_logits, logits.detach()),
                               rel_err(loss.reshape(()), ref_loss.detach().reshape(())), tol)
    report.ok = all(r.ok for r in report.rows) and len(layers) > 0
    if not report.ok:
        report.culprit = _culprit(report, layers, first_forward, first_bad, tol)
    return report


def _reference_run(ref, ids) -> tuple[torch.Tensor, torch.Tensor, list, bool]:
    """The reference's logits and mean loss (after its backward), its recorded calls, and whether float32
    appeared inside it."""
    rec = Recorder(ref, list(decoder_layers(ref)))
    try:
        with Float64Throughout(), Float32Seen() as f32:
            logits = ref(input_ids=ids, use_cache=False).logits
        labels = ids[:, 1:]
        ref_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten())
        ref_loss.backward()
    finally:
        rec.remove()
    return logits, ref_loss, rec.calls, bool(f32.seen)


class _CallErrors:
    """Relative errors of the ring run's module calls against the reference's, by ``(path, call number)``."""

    def __init__(self, gathered: dict, calls: list):
        self.gathered = gathered
        self.ref_calls = {(path, n): (x, y) for path, n, _, x, y in calls}
        self.order = [(path, n) for path, n, *_ in calls]  # the order calls finished: children before their layer

    def err(self, key, which: int) -> float | None:
        """``which`` 0: the input's error, 1: the output's; None where either run has no tensor there."""
        mine = self.gathered.get(key)
        theirs = self.ref_calls.get(key)
        if mine is None or theirs is None or mine[1 + which] is None or theirs[which] is None:
            return None
        return rel_err(mine[1 + which], theirs[which])


def _layer_row(i: int, path: str, layer, errs: _CallErrors, gerrs: dict, tol: float) -> tuple[Row, bool]:
    """Layer ``i``'s row, and whether its own forward differs (its input agrees, its output does not)."""
    keys = [k for k in errs.order if k[0] == path]
    out_errs = [e for e in (errs.err(k, 1) for k in keys) if e is not None]
    mine = {n: e for n, e in gerrs.items() if n.startswith(path + ".")}
    worst = max(mine, key=lambda n: _nan_big(mine[n])) if mine else None
    row = Row(f"layer {i}", path, type(layer).__name__, max(out_errs, key=_nan_big) if out_errs else None,
              mine[worst] if worst else None, worst, mixes=mixes(layer))
    row.ok = all(_nan_big(e) <= tol for e in (row.output_err, row.grad_err) if e is not None)
    if _nan_big(row.output_err or 0.0) <= tol:
        return row, False
    in_errs = [e for e in (errs.err(k, 0) for k in keys) if e is not None]
    if in_errs and not _nan_big(max(in_errs, key=_nan_big)) <= tol:
        row.part = INPUT_DIFFERS
        return row, False
    row.part = _part(path, layer, keys, errs.order, errs.err, tol)
    return row, True


def mixes(layer: torch.nn.Module) -> str | None:
    """What the layer's token mixers outside attention compute, as ringattn runs them context-parallel (None: none):
    ``"mamba: causal short convolution, Mamba2 selective scan (SSD)"``. Found by what each module's forward calls
    (``ringattn.hf.mixers``), as ``prepare`` finds them."""
    from ..mixers import handled_modules
    from ..mixers import mixes as whats

    found = []
    for name, m in handled_modules(layer):
        found.append(f"{name or type(m).__name__}: " + ", ".join(whats(m)))
    return "; ".join(found) or None


def _model_rows(layers, gerrs: dict, logits_err, loss_err, tol: float) -> list[Row]:
    """The rows after the layers: logits, loss, and the parameters outside every layer."""
    rows = [Row("logits", "", "", logits_err, None, None, _nan_big(logits_err) <= tol),
            Row("loss", "", "", loss_err, None, None, _nan_big(loss_err) <= tol)]
    in_layers = tuple(p + "." for p, _ in layers)
    other = {n: e for n, e in gerrs.items() if not n.startswith(in_layers)}
    if other:
        worst = max(other, key=lambda n: _nan_big(other[n]))
        rows.append(Row("other parameters", "", "embeddings, final norm, head", None, other[worst], worst,
                        _nan_big(other[worst]) <= tol))
    return rows


def _culprit(report: AuditReport, layers, first_forward: Row | None, first_bad: Row | None, tol: float) -> str:
    if not layers:
        return "no decoder layers found to compare (neither _no_split_modules nor a ModuleList)"
    if first_forward is not None:
        return _culprit_forward(first_forward, layers, tol)
    if first_bad is not None:
        return (f"{first_bad.name} ({first_bad.cls}): forward outputs match but the gradient of "
                f"{first_bad.worst_param} differs (relative error {first_bad.grad_err:.1e}): the "
                "context-parallel backward or gradient sync misses a part of it")
    bad = next(r for r in report.rows if not r.ok)
    what = f"the gradient of {bad.worst_param}" if bad.worst_param else bad.name
    return (f"{bad.name}: {what} differs (relative error "
            f"{fmt(bad.output_err if bad.output_err is not None else bad.grad_err)}) while every "
            "decoder layer matches: the model's code after its layers depends on the sharding")


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
    known = mixes(child)
    if known:
        return (f"{row.name} ({cls}): {name} output differs ({err}) with its input equal, though ringattn runs its "
                f"token mixing context-parallel ({known.partition(': ')[2]}): the context-parallel mixer computes "
                "something else (a ringattn bug: please report it with this audit)")
    if _is_attention(child):
        return (f"{row.name} ({cls}): attention output differs from the single-process reference ({err}) with "
                f"its input equal: the ring call computes something else (a mask feature it does not see, or a "
                "ringattn bug: please report it with this audit)")
    return (f"{row.name} ({cls}): {name} output differs ({err}) with its input equal: it mixes tokens outside "
            "attention or depends on the rank's local shard, which is not context-parallel")


def _is_attention(module: torch.nn.Module) -> bool:
    cls = type(module).__name__.lower()
    return "attention" in cls or "attn" in cls or hasattr(module, "is_causal")
