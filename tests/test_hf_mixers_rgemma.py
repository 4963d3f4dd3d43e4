"""RecurrentGemma (Griffin's RG-LRU, its depthwise Conv1d, local sliding-window attention) context-parallel through
ringattn.hf.prepare: logits and every parameter gradient equal to the same model in one process, float64, 2 and 3
ranks (4 under -m slow), contiguous / zigzag / striped / balanced, an odd length, batch > 1, packed documents."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ringattn import hf  # noqa: E402

from .test_hf_sweep import HYBRIDS_RUN  # noqa: E402

pytestmark = pytest.mark.skipif(not HYBRIDS_RUN, reason="transformers before 5.25")

# One recurrent layer, then one local-attention layer (window 5 < the length: the window is active), then recurrent.
CONFIG = dict(block_types=["recurrent", "attention"], num_hidden_layers=3, conv1d_width=4, lru_width=24,
              attention_window_size=5)
SEQ = 29  # odd, not a multiple of 2W: the layouts' padding is exercised
TOL = 1e-10


@contextlib.contextmanager
def float64_inside():
    """The RG-LRU accumulates in float32 by default (``acc_dtype``) and the RMSNorms compute in float32
    (``.float()``): float64 there, in both runs alike, so that the comparison is held to float64's floor (float32
    rounding alone moves the norms' weight gradients by ~1e-7 between two orders of summing the tokens)."""
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRglru

    fn = RecurrentGemmaRglru._rnn_scan
    fn = getattr(fn, "_ringattn_original", fn)
    old, to_float = fn.__defaults__, torch.Tensor.float

    def keep_float64(t, *args, **kwargs):
        return t if t.dtype == torch.float64 else to_float(t, *args, **kwargs)

    fn.__defaults__, torch.Tensor.float = (torch.float64,), keep_float64
    try:
        yield
    finally:
        fn.__defaults__, torch.Tensor.float = old, to_float


def build(seed: int = 0):
    from .test_hf_sweep import build as sweep_build

    model, _ = sweep_build("recurrent_gemma", CONFIG, seed)
    return model


def case(layout: str, batch: int = 1, packed: list | None = None, use_cache: bool = False,
         float64: bool = True) -> dict:
    """Ring vs. one process (``packed``: each document run alone), on every rank; rank 0's errors."""
    import ringattn

    from .reference import rel_err
    from .test_hf_sweep import VOCAB, float64_softmax

    warnings.filterwarnings("ignore")
    hf.register(layout=layout)
    ref = build()
    cp = build()
    cp.load_state_dict(ref.state_dict())
    cp.set_attn_implementation("ring")
    hf.prepare(cp)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, SEQ), generator=g)
    labels = ids.clone()
    labels[torch.rand(batch, SEQ, generator=g) < 0.2] = hf.IGNORE_INDEX
    bounds = packed or [0, SEQ]
    pos = torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])[None].expand(batch, SEQ)
    for b in bounds[1:-1]:
        labels[:, b] = hf.IGNORE_INDEX
    sb = hf.shard_batch(ids, labels, layout=layout, position_ids=pos)
    kw = {"cu_seq_lens_q": sb["cu_seq_lens_q"]} if "cu_seq_lens_q" in sb else {}
    scan = float64_inside if float64 else contextlib.nullcontext
    with float64_softmax(), scan():
        logits = cp(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=use_cache, **kw).logits
        loss = hf.causal_lm_loss(logits, sb["shift_labels"], sb["num_items_in_batch"])
        loss.backward()
    hf.sync_gradients(cp)
    full = ringattn.unshard(logits.detach(), layout=layout, seq_len=SEQ, cu_seqlens=sb.get("cu_seq_lens_q"))
    with float64_softmax(), scan():
        ref_logits = torch.cat([ref(input_ids=ids[:, a:b], use_cache=False).logits
                                for a, b in zip(bounds[:-1], bounds[1:])], 1)
        ref_loss = torch.nn.functional.cross_entropy(ref_logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                     ignore_index=hf.IGNORE_INDEX)
        ref_loss.backward()
    errs = {"logits": rel_err(full, ref_logits.detach()), "loss": rel_err(loss.detach(), ref_loss.detach())}
    grads = dict(cp.named_parameters())
    for n, p in ref.named_parameters():
        if p.grad is not None:
            errs[f"grad {n}"] = rel_err(grads[n].grad, p.grad)
    errs["n_grads"] = sum(p.grad is not None for p in ref.parameters())
    return errs


def worst(errs: dict) -> tuple[str, float]:
    return max(((k, v) for k, v in errs.items() if k != "n_grads"), key=lambda kv: kv[1])


def check(errs: dict, tol: float = TOL) -> None:
    assert errs["n_grads"] == sum(1 for _ in build().parameters()), errs
    k, v = worst(errs)
    assert v <= tol, (k, v, errs)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_rgemma_exact_2_ranks(ranks, layout):
    check(ranks.run(2, case, layout)[0])
