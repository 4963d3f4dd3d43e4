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
         float64: bool = True, checkpointing: bool = False) -> dict:
    """Ring vs. one process (``packed``: each document run alone), on every rank; rank 0's errors."""
    import ringattn

    from .reference import grad_errors, rel_err
    from .test_hf_sweep import VOCAB, float64_softmax

    warnings.filterwarnings("ignore")
    hf.register(layout=layout)
    ref = build()
    cp = build()
    cp.load_state_dict(ref.state_dict())
    cp.set_attn_implementation("ring")
    hf.prepare(cp)
    if checkpointing:  # the layers recomputed in backward, outside the model's forward
        cp.gradient_checkpointing_enable()
        cp.train()
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
    errs.update(grad_errors(cp, ref))
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


def cases_2_ranks() -> dict:
    """The 2-rank cases beyond one sequence: batch 2 of packed documents (a document inside one rank's shard, one
    across the ranks, the last ending in the padding) through the model's default use_cache=True path; RG-LRU in
    float32 as the model ships it (its own float32 noise); activation checkpointing."""
    return {"packed-batch2-cache": case("zigzag", batch=2, packed=[0, 5, 17, SEQ], use_cache=True),
            "float32-scan": case("contiguous", float64=False),
            "checkpointing": case("striped", checkpointing=True)}


def test_rgemma_packed_batch_and_float32_scan_2_ranks(ranks):
    r = ranks.run(2, cases_2_ranks)[0]
    check(r["packed-batch2-cache"])
    check(r["checkpointing"])
    check(r["float32-scan"], 1e-5)  # the sweep's TOL_FLOAT32_INSIDE


def test_rgemma_balanced_packed_3_ranks(ranks):
    # A one-token document: a piece of one token continuing nothing; the balanced layout places by document.
    check(ranks.run(3, case, "balanced", 2, [0, 11, 12, SEQ])[0])


def test_rgemma_striped_3_ranks(ranks):
    # Striped: every token its own fragment, regrouped to contiguous for the scan and the convolution.
    check(ranks.run(3, case, "striped", 1, [0, 1, 13, SEQ])[0])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped", "balanced"])
def test_rgemma_exact_4_ranks(ranks, layout):
    check(ranks.run(4, case, layout, 2, [0, 3, 4, 20, SEQ])[0])


def generate_cases() -> dict:
    """Greedy generate, ring vs. one process: (same tokens, the float64 logits' error) per case."""
    from .reference import rel_err
    from .test_hf_generate import generate

    warnings.filterwarnings("ignore")
    out = {}
    # Prompts longer than the attention window (5), one shorter than the convolution (4: its state spans both ranks),
    # batch 2; a second generate on the same model (the block keeps the first one's states); no cache.
    for name, layout, n, batch, kw in [("zigzag", "zigzag", 11, 1, {}), ("short", "contiguous", 3, 1, {}),
                                       ("striped-batch2", "striped", 12, 2, {}), ("again", "zigzag", 9, 1, {}),
                                       ("no-cache", "contiguous", 7, 1, {"use_cache": False})]:
        hf.register(layout=layout)
        ids = torch.randint(3, 61, (batch, n), generator=torch.Generator().manual_seed(n))
        runs = []
        for attn in (None, "ring"):
            model = build()
            if attn:
                hf.prepare(model)
                model.set_attn_implementation(attn)
            with float64_inside():
                if name == "again":
                    generate(model, ids.flip(1), None, max_new_tokens=3, min_new_tokens=3, do_sample=False)
                runs.append(generate(model, ids, None, max_new_tokens=5, min_new_tokens=5, do_sample=False, **kw))
        (want, want_logits, _), (got, logits, _) = runs
        out[name] = (torch.equal(got, want), rel_err(logits, want_logits))
    # A padded batch: the recurrent block takes no padding mask to shard; refused on every rank, by name.
    model = hf.prepare(build())
    model.set_attn_implementation("ring")
    ids = torch.randint(3, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    try:
        generate(model, ids, mask, max_new_tokens=2)
        out["padded"] = "ran"
    except hf.UnsupportedModel as e:
        out["padded"] = str(e)
    return out


def test_rgemma_generate_equals_one_process(ranks):
    # The prefill leaves the prompt's conv inputs and RG-LRU state on every rank; decoding runs the module's own code.
    for r in ranks.run(2, generate_cases):
        padded = r.pop("padded")
        assert all(same and err <= TOL for same, err in r.values()), r
        assert "padded generation with this model is not supported" in padded, padded


# --- the handlers on one process (no group: the plan is one rank's) ---

def _call(module, cu_seq_lens=None, position_ids=None, seq_len: int = 0):
    from ringattn.hf.forward import Batch
    from ringattn.hf.mixers.base import MixerCall
    from ringattn.hf.registry import RingSettings

    return MixerCall(module, Batch(RingSettings(), position_ids, cu_seq_lens), seq_len)


def test_conv_module_handler_causal_with_a_nan_tail():
    from ringattn.hf.mixers import MODULE_HANDLERS, module_handler

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3).double()
    h = module_handler(conv)
    assert h is MODULE_HANDLERS["Conv1d"]
    x = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    y = h.run(conv.forward, _call(conv), x)
    want = conv(x)
    assert y.shape == want.shape == (2, 6, 12)
    torch.testing.assert_close(y[..., :9], want[..., :9], rtol=1e-12, atol=1e-12)
    assert torch.isnan(y[..., 9:]).all()  # where one process reads the padding after the sequence
    # The caller's slice: gradients as one process's.
    g = torch.autograd.grad(y[..., :9].square().sum(), [x, conv.weight])
    g_want = torch.autograd.grad(want[..., :9].square().sum(), [x, conv.weight])
    for a, b in zip(g, g_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Packed documents: the convolution does not reach across a document start.
    cut = h.run(conv.forward, _call(conv, torch.tensor([0, 4, 9], dtype=torch.int32)), x)
    alone = torch.cat([conv(x[..., :4])[..., :4], conv(x[..., 4:])[..., :5]], -1)
    torch.testing.assert_close(cut[..., :9], alone, rtol=1e-12, atol=1e-12)


def test_conv_module_handler_refusals():
    from ringattn.hf.mixers import module_handler

    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3).double()
    h = module_handler(conv)
    with pytest.raises(hf.UnsupportedModel, match=r"one batched input \(batch, channels, len\), got \(6, 9\)"):
        h.run(conv.forward, _call(conv), torch.randn(6, 9, dtype=torch.float64))
    # A generate prefill with no module holding it to keep the prompt's inputs for decoding.
    with pytest.raises(hf.UnsupportedModel, match="generation with this model under context parallelism is not "
                                                  "supported"):
        h.run(conv.forward, _call(conv, seq_len=9), torch.randn(1, 6, 9, dtype=torch.float64))

    class Own(torch.nn.Conv1d):
        def forward(self, x):
            return super().forward(x) * 2

    # Only what the handler runs exactly: a depthwise, stride-1, undilated Conv1d padded by k - 1, its own forward.
    for other in (torch.nn.Conv1d(6, 6, 4, groups=6, padding=1), torch.nn.Conv1d(6, 6, 4, groups=6, padding=3,
                  stride=2), torch.nn.Conv1d(6, 6, 4, groups=6, padding=6, dilation=2),
                  torch.nn.Conv1d(6, 6, 4, padding=3), torch.nn.Conv1d(6, 6, 4, groups=6, padding=3,
                                                                        padding_mode="circular"),
                  torch.nn.Conv1d(6, 6, 1, groups=6), Own(6, 6, 4, groups=6, padding=3)):
        assert module_handler(other) is None, other


def test_non_causal_conv_still_refused():
    # A RecurrentGemma whose convolution is not the causal one (padding k // 2: centred) is refused by the model-wide
    # check, naming it, as before the handler existed.
    from .test_hf_sweep import tiny_config

    with torch.device("meta"):
        model = transformers.RecurrentGemmaForCausalLM(tiny_config("recurrent_gemma", CONFIG, "sdpa"))
    model.model.layers[0].temporal_block.conv_1d = torch.nn.Conv1d(24, 24, 4, groups=24, padding=2)
    model.config._attn_implementation = "ring"
    with pytest.raises(hf.UnsupportedModel, match=r"model.layers.0.temporal_block.conv_1d \(Conv1d\) is a 1-D "
                                                  "convolution along the sequence whose token mixing ringattn does "
                                                  "not know"):
        hf.prepare(model)


def test_mamba_conv1d_stays_part_of_its_mixer():
    # Mamba's conv1d is a depthwise Conv1d padded by k - 1 too, read by causal_conv1d_forward (its mixer's function):
    # a part of that mixer, not a mixer of its own.
    from ringattn.hf.mixers import handled_modules, module_handler

    from .test_hf_sweep import tiny_config

    with torch.device("meta"):
        model = transformers.MambaForCausalLM(tiny_config("mamba", {}, "eager"))
    conv = model.backbone.layers[0].mixer.conv1d
    assert module_handler(conv) is not None
    paths = [p for p, _ in handled_modules(model)]
    assert "backbone.layers.0.mixer" in paths and not any(p.endswith("conv1d") for p in paths), paths


def _rglru(width: int = 6):
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRglru

    from .test_hf_sweep import tiny_config

    return RecurrentGemmaRglru(tiny_config("recurrent_gemma", dict(CONFIG, lru_width=width), "sdpa"))


def test_rglru_scan_handler():
    from ringattn.hf.mixers import HANDLERS

    module = _rglru()
    scan = HANDLERS["_rnn_scan"]
    original = type(module)._rnn_scan
    original = getattr(original, "_ringattn_original", original)
    x, a = torch.randn(1, 9, 6, dtype=torch.float64), torch.rand(1, 9, 6, dtype=torch.float64)
    reset = torch.zeros(1, 9, 1, dtype=torch.bool)
    reset[:, 0] = True
    # One process's scan, through the handler (one rank): the same outputs, and a NaN state for the module to keep.
    y, h = scan.run(original, _call(module), module, x, a, reset, None)
    want, want_h = original(module, x, a, reset, None)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    assert torch.isnan(h).all() and h.shape == (1, 6)
    # A generate prefill: the state after the prompt.
    y, h = scan.run(original, _call(module, seq_len=9), module, x, a, reset, None)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h, want_h, rtol=1e-6, atol=1e-6)
    # A state the module kept from an earlier forward (the NaN one too) is not read where the first position resets.
    for h0 in (torch.ones(1, 6), torch.full((1, 6), float("nan"))):
        y, _ = scan.run(original, _call(module), module, x, a, reset, h0)
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    # Where it does not (a cache continued by a forward of several tokens), refused.
    cont = torch.zeros_like(reset)
    with pytest.raises(hf.UnsupportedModel, match="a recurrent state carried into a context-parallel RG-LRU whose "
                                                  "first position is not 0"):
        scan.run(original, _call(module), module, x, a, cont, torch.ones(1, 6))
    y, _ = scan.run(original, _call(module), module, x, a, cont, torch.zeros(1, 6))  # a fresh cache's zeros
    torch.testing.assert_close(y, original(module, x, a, cont, None)[0], rtol=1e-6, atol=1e-6)
    # Packed documents whose position_ids do not restart at 0 where a document starts: the module would not reset.
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(hf.UnsupportedModel, match="a packed document starts at position 4, where position_ids is "
                                                  "not 0"):
        scan.run(original, _call(module, cu), module, x, a, reset, None)
    reset[:, 4] = True
    y, _ = scan.run(original, _call(module, cu), module, x, a, reset, None)
    torch.testing.assert_close(y, original(module, x, a, reset, None)[0], rtol=1e-6, atol=1e-6)
