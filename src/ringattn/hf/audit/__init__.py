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

from .compare import Float32Seen, decoder_layers
from .report import INPUT_DIFFERS, TOL, TOL_FLOAT32_INSIDE, AuditReport, Row
from .run import audit
from .source import TINY, Source, resolve, tiny_config

__all__ = ["INPUT_DIFFERS", "TINY", "TOL", "TOL_FLOAT32_INSIDE", "AuditReport", "Float32Seen", "Row", "Source",
           "audit", "decoder_layers", "resolve", "tiny_config"]
