"""What an audit found: a row per decoder layer (and the logits, loss and gradients), and its table."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

TOL = 1e-9


TOL_FLOAT32_INSIDE = 1e-5


INPUT_DIFFERS = "its input (an earlier layer differs)"


def first_line(e: BaseException) -> str:
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
    mixes: str | None = None         # its token mixing outside attention that ringattn runs context-parallel, e.g.
    #                                  "mamba: causal short convolution, Mamba2 selective scan (SSD)"


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
                mixes = f"  [{r.mixes}]" if r.mixes else ""
                lines.append(f"{r.name:16}  {r.cls:{w}}  {fmt(r.output_err):>10}  {fmt(r.grad_err):>10}  {status}"
                             f"{mixes}")
        if self.ok:
            worst = max((e for r in self.rows for e in (r.output_err, r.grad_err) if e is not None), default=0.0)
            lines.append(f"exact: every layer output, the logits, the loss and every parameter gradient match "
                         f"(largest relative error {worst:.1e})")
        else:
            lines.append(f"culprit: {self.culprit}")
        return "\n".join(lines)


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"
