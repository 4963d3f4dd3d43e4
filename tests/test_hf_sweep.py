"""Every causal-LM architecture of the installed transformers, tiny and random in float64, with
attn_implementation="ring" on 2 ranks (4 under -m slow), zigzag, against the same model with sdpa (eager where
the model has no sdpa) in one process: logits and every parameter gradient exact, or a clear refusal
(``ringattn.hf.UnsupportedModel`` or a ``ValueError`` raised by ringattn, naming the feature). Anything else,
a silent mismatch or a crash from inside transformers, fails the sweep.

One process group runs every model in turn, so the sweep costs one spawn, not one per model.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import traceback
import warnings

import pytest
import torch

import ringattn

transformers = pytest.importorskip("transformers")

from ringattn import hf  # noqa: E402
from ringattn.hf.audit import Float32Seen  # noqa: E402

from .reference import rel_err  # noqa: E402

TOL = 1e-9


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:2])


# transformers 5.25 gives every hybrid mixer the module-level convolution and scan functions ringattn runs
# context-parallel (ringattn.hf.mixers); before, the mixers inline them and are refused, by name.
HYBRIDS_RUN = _version(transformers.__version__) >= (5, 25)
needs_hybrids = pytest.mark.skipif(not HYBRIDS_RUN, reason="transformers before 5.25: hybrid mixers inline their "
                                   "scans and are refused by name (the sweep checks that)")
TOL_FLOAT32_INSIDE = 1e-5  # models that compute parts in float32 themselves
SEQ = 30          # not a multiple of 2W: the padded tail is exercised on every model
VOCAB = 61

# Sizes every family understands, set where the config has the field.
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_layers=2, n_layer=2,
            num_attention_heads=4, n_head=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
            n_positions=128, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
            v_head_dim=8, d_model=32, n_embd=32, ffn_dim=48, decoder_layers=2, decoder_attention_heads=4,
            decoder_ffn_dim=48, num_decoder_layers=2, attention_dropout=0.0, hidden_dropout=0.0, dropout=0.0,
            attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
            embd_pdrop=0.0, activation_dropout=0.0, rotary_dim=4)

# What makes each family's special features active at SEQ tokens (windows, chunks and thresholds below SEQ).
FEATURES = {
    "mistral": dict(sliding_window=7),
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "qwen2_moe": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "phimoe": dict(sliding_window=5),
    "gemma2": dict(sliding_window=5, attn_logit_softcapping=20.0, final_logit_softcapping=10.0),
    "vaultgemma": dict(sliding_window=5, attn_logit_softcapping=20.0, final_logit_softcapping=10.0),
    "gpt_oss": dict(sliding_window=5),
    "llama4_text": dict(attention_chunk_size=8, no_rope_layers=[1, 0], attn_temperature_tuning=True,
                        floor_scale=4, attn_scale=0.5, interleave_moe_layer_step=1),
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    "axk1": dict(n_group=1, topk_group=1),
    "longcat_flash": dict(n_group=1, topk_group=1),
    "bamba": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8),
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                             layer_types=["mamba", "attention"]),
    "mamba2": dict(num_heads=4, head_dim=16, state_size=8, n_groups=1),
    # Gated DeltaNet: grouped (2 value heads per key head), key and value widths apart
    **{f: dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=6)
       for f in ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "qwen4_exp_text", "olmo_hybrid", "lara_mini")},
    "kimi_linear": dict(linear_num_heads=4, linear_head_dim=8),
    "zamba": dict(layers_block_type=["mamba", "hybrid"], attn_layer_period=2, attn_layer_offset=1),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], mamba_headdim=8, n_mamba_heads=8),
    "zaya": dict(num_experts_per_tok=1),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=5),
    "phi3": dict(rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                      short_factor=[1.0 + i / 8 for i in range(4)],
                                      long_factor=[2.0 + i / 4 for i in range(4)], original_max_position_embeddings=25),
                 original_max_position_embeddings=25),
    "roc_bert": dict(pronunciation_embed_dim=8, shape_embed_dim=8, pronunciation_vocab_size=10, shape_vocab_size=10),
}
# Extra entries: (name, model_type, extra config) for features a family's default config leaves off.
VARIANTS = [
    ("llama-dynamic-ntk", "llama", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
                                        max_position_embeddings=20)),
    # The tiny Jamba has no attention layer (one every attn_layer_period = 8): one with both kinds.
    ("jamba-attention", "jamba", dict(attn_layer_period=2, attn_layer_offset=1)),
]
# Families whose tiny config this sweep cannot build; each says why.
SKIP = {
    "blt": "byte-latent model with its own patcher sub-models: no small config builds in seconds",
    "fuyu": "multimodal wrapper (image patches); its decoder is persimmon, swept",
    "gemma3": "multimodal wrapper; its decoder gemma3_text is swept",
    "gemma3n": "multimodal wrapper (needs timm); gemma3n_text is swept",
    "gemma4": "multimodal wrapper; gemma4_text is swept",
    "gemma4_unified": "multimodal wrapper; gemma4_unified_text is swept",
    "gemma4_unified_assistant": "multimodal assistant wrapper",
    "got_ocr2": "multimodal wrapper (vision encoder)",
    "mllama": "multimodal wrapper (vision encoder, cross-attention)",
    "moss_transcribe_diarize": "multimodal wrapper (audio encoder)",
    "phi4_multimodal": "multimodal wrapper (vision and audio encoders)",
    "llama4": "multimodal wrapper; llama4_text is swept",
    "qwen3_5": "multimodal wrapper; qwen3_5_text is swept",
    "qwen3_5_moe": "multimodal wrapper; qwen3_5_moe_text is swept",
    "qwen4_exp": "multimodal wrapper; qwen4_exp_text is swept",
    "emu3": "multimodal wrapper (VQ image tokenizer)",
    "dots3_note": "multimodal wrapper",
    "xmod": "needs a language adapter chosen per input (set_default_language)",
    "reformer": "LSH / local attention of its own, off the attention interface; needs is_decoder and axial sizes",
    "dbrx": "its attention sub-config (DbrxAttentionConfig) takes no generic sizes",
    "cohere_compass_text": "its layer_types do not follow num_hidden_layers in a generic tiny config",
    "dots3_note_text": "per-layer attention sizes (per_layer_config) take no generic sizes",
    "gemma3n_text": "KV-sharing layers whose cache layout does not follow a generic tiny config",
    "gemma4_text": "per-layer head sizes (per_layer_config) take no generic sizes",
    "gemma4_unified_text": "per-layer head sizes (per_layer_config) take no generic sizes",
    "gemma4_assistant": "a draft model tied to a gemma4 target's per-layer inputs",
    "longcat_flash": "its MLA rope sizes do not follow a generic tiny config",
    "lfm2_moe": "its config derives layer_types from full-size defaults that a generic tiny config breaks",
    "musicgen": "text-to-audio decoder over codebook streams, not token ids",
    "musicgen_melody": "text-to-audio decoder over codebook streams, not token ids",
}
# The families that must be exact (the rest may be exact or refused, never silently wrong).
MUST_BE_EXACT = ("llama", "mistral", "qwen2", "qwen2_moe", "phimoe", "gemma2", "gpt_oss", "llama4_text", "phi3",
                 "llama-dynamic-ntk", "mixtral", "qwen3", "gemma", "starcoder2")
# Hybrids whose scans and short convolutions run context-parallel (ringattn.hf.mixers). Jamba: the tiny config's
# two layers are Mamba layers (jamba-attention has both kinds).
MUST_BE_EXACT_HYBRIDS = ("mamba2", "lfm2", "granitemoehybrid", "bamba", "mamba", "falcon_mamba", "jamba", "zamba",
                         "falcon_h1", "zamba2", "nemotron_h", "lfm3", "jamba-attention",
                         # Gated DeltaNet and Kimi delta attention
                         "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "qwen4_exp_text", "kimi_linear",
                         "bailing_hybrid", "olmo_hybrid", "lara_mini",
                         # stabilised states (kind="log") and one-token shifts; mixers run whole by module handlers
                         "rwkv", "xlstm", "minimax", "recurrent_gemma", "zaya")
MUST_BE_REFUSED = ("bloom", "mpt", "falcon", "deepseek_v32")


def entries() -> list[tuple[str, str, dict]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = [(mt, mt, FEATURES.get(mt, {})) for mt in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) if mt not in SKIP]
    return out + VARIANTS


def tiny_config(model_type: str, extra: dict, attn: str):
    base = transformers.AutoConfig.for_model(model_type)
    kw = {}
    for k, v in TINY.items():
        if hasattr(base, k) and not isinstance(getattr(type(base), k, None), property):
            kw[k] = v
    if hasattr(base, "qk_rope_head_dim"):  # multi-head latent attention: head_dim is the rope part
        kw.pop("head_dim", None)
    if getattr(base, "sliding_window", None) is not None:
        kw["sliding_window"] = 5
    if getattr(base, "attention_chunk_size", None) is not None:
        kw["attention_chunk_size"] = 8
    kw.update(extra)
    cfg = transformers.AutoConfig.for_model(model_type, **kw)
    cfg._attn_implementation = attn
    with contextlib.suppress(Exception):
        cfg._experts_implementation = "eager"  # grouped_mm has no float64
    return cfg


@contextlib.contextmanager
def float64_softmax():
    """The eager reference in float64: transformers' eager attention softmaxes in float32."""
    f = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        if x.dtype == torch.float64 and dtype == torch.float32:
            dtype = None
        return f(x, dim=dim, dtype=dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = f


# Families whose linear-attention rule casts to float32 itself (transformers' torch delta rules): their float32
# rounding alone moves the A_log / dt_bias gradients by ~5e-5 between two chunkings of the same sequence (one
# process, float32 rule against the same rule in float64), past TOL_FLOAT32_INSIDE; both runs compute their
# modeling file in float64 instead (float64_inside), so they are held to TOL.
FLOAT64_INSIDE = frozenset({"qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "qwen4_exp_text", "olmo_hybrid",
                            "lara_mini", "kimi_linear", "bailing_hybrid"})


class _Float64Torch:
    """``torch`` as a modeling file sees it in float64_inside: its float32 is float64."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def float64_inside(model_type: str):
    """The family's modeling file computes what it casts to float32 in float64 (``torch.float32`` and
    ``Tensor.float()`` leave float64 alone), where the family is in FLOAT64_INSIDE; else nothing."""
    if model_type not in FLOAT64_INSIDE:
        yield
        return
    import importlib

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    module = importlib.import_module(getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]).__module__)
    torch_, to_float = module.torch, torch.Tensor.float

    def keep_float64(t, *args, **kwargs):
        return t if t.dtype == torch.float64 else to_float(t, *args, **kwargs)

    module.torch, torch.Tensor.float = _Float64Torch(), keep_float64
    try:
        yield
    finally:
        module.torch, torch.Tensor.float = torch_, to_float


def build(model_type: str, extra: dict, seed: int):
    """(reference model, reference attn implementation): sdpa where the family has it, else eager."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    attn = "sdpa" if cls._supports_sdpa else "eager"
    cfg = tiny_config(model_type, extra, attn)
    torch.manual_seed(seed)
    model = cls(cfg).double().eval()
    with torch.no_grad():  # non-trivial norms, so their gradients are tested for real
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model, attn


def ringattn_error(e: BaseException) -> bool:
    """A refusal: UnsupportedModel anywhere, or a ValueError raised inside ringattn."""
    if isinstance(e, hf.UnsupportedModel):
        return True
    if not isinstance(e, ValueError):
        return False
    tb = traceback.extract_tb(e.__traceback__)
    return bool(tb) and f"{os.sep}ringattn{os.sep}" in tb[-1].filename


def compare(name: str, model_type: str, extra: dict, layout: str, seed: int = 0, packed: list | None = None,
            prepare: bool = True) -> dict:
    """Run on every rank; -> {"status": exact | refused | mismatch | crash | build, ...} (rank 0 compares).

    ``prepare=False`` leaves out ``hf.prepare``: the checks of the first attention call only."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # The model-wide checks look at structure only: on the meta device they cost no weights.
    try:
        if not prepare:
            raise LookupError

        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        with torch.device("meta"):
            meta = cls(tiny_config(model_type, extra, "sdpa" if cls._supports_sdpa else "eager"))
    except LookupError:
        pass
    except Exception as e:  # noqa: BLE001 - reported as a failed build
        return {"status": "build", "error": f"{type(e).__name__}: {str(e)[:300]}"}
    else:
        try:
            meta.set_attn_implementation("ring")
            hf.prepare(meta)
        except Exception as e:  # noqa: BLE001
            return refusal_or_crash(e, "")
        del meta
    try:
        ref, attn = build(model_type, extra, seed)
    except Exception as e:  # noqa: BLE001
        return {"status": "build", "error": f"{type(e).__name__}: {str(e)[:300]}"}
    try:
        cp = copy.deepcopy(ref)
    except RuntimeError:
        cp, _ = build(model_type, extra, seed)
        cp.load_state_dict(ref.state_dict())
    if type(cp)._can_set_attn_implementation():
        cp.set_attn_implementation("ring")
    else:  # RWKV (no attention): what building it with attn_implementation="ring" sets
        cp.config._attn_implementation = "ring"
    if prepare:
        hf.prepare(cp)

    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, VOCAB, (1, SEQ), generator=g)
    labels = ids.clone()
    labels[torch.rand(1, SEQ, generator=g) < 0.2] = hf.IGNORE_INDEX
    pos = None
    if packed is not None:
        pos = torch.cat([torch.arange(b - a) for a, b in zip(packed[:-1], packed[1:])])[None]
        for b in packed[1:-1]:
            labels[:, b] = hf.IGNORE_INDEX
    sb = hf.shard_batch(ids, labels, layout=layout, position_ids=pos)
    try:
        with float64_softmax(), float64_inside(model_type):
            logits = cp(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False).logits
            loss = hf.causal_lm_loss(logits, sb["shift_labels"], sb["num_items_in_batch"])
            loss.backward()
        hf.sync_gradients(cp)
    except Exception as e:  # noqa: BLE001
        return refusal_or_crash(e, attn)
    full = ringattn.unshard(logits.detach(), layout=layout, seq_len=SEQ)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return {"status": "ran"}

    try:
        with float64_softmax(), float64_inside(model_type), Float32Seen() as f32:
            out = ref(input_ids=ids, position_ids=pos if pos is not None else torch.arange(SEQ)[None],
                      use_cache=False)
        with float64_inside(model_type):
            ref_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                         ignore_index=hf.IGNORE_INDEX)
            ref_loss.backward()
    except Exception as e:  # noqa: BLE001 - the tiny config does not run even without ringattn
        return {"status": "build", "error": f"reference: {type(e).__name__}: {str(e)[:300]}"}
    # The model's own noise floor: float64 throughout, or float32 where the model itself computes in float32
    # (e.g. norms that upcast with .float()).
    tol = TOL_FLOAT32_INSIDE if f32.seen and model_type not in FLOAT64_INSIDE else TOL
    errs = {"logits": rel_err(full, out.logits.detach()), "loss": rel_err(loss.detach(), ref_loss.detach())}
    grads = dict(cp.named_parameters())
    scale = max((float(p.grad.norm()) for p in ref.parameters() if p.grad is not None), default=1.0)
    for n, p in ref.named_parameters():
        a, b = grads[n].grad, p.grad
        if a is None and b is None:
            continue
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        if float(b.norm()) <= 1e-10 * scale:
            # A gradient that is zero in exact arithmetic (e.g. a key bias: softmax ignores a per-row
            # constant): both runs must leave it at rounding level.
            errs[f"grad {n}"] = float((a - b).norm()) / scale * 1e-3
        else:
            errs[f"grad {n}"] = rel_err(a, b)
    worst = max(errs, key=lambda k: errs[k] if errs[k] == errs[k] else float("inf"))
    ok = all(v <= tol for v in errs.values())
    return {"status": "exact" if ok else "mismatch", "worst": f"{worst}: {errs[worst]:.2e}", "n": len(errs),
            "reference": attn, "tol": tol}


def refusal_or_crash(e: BaseException, attn: str) -> dict:
    if ringattn_error(e):
        return {"status": "refused", "error": f"{type(e).__name__}: {e}", "reference": attn}
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return {"status": "crash", "error": f"{type(e).__name__}: {str(e)[:300]}", "where": "".join(tb[-3:])[-600:]}


def sweep(layout: str, only: tuple | None = None) -> dict:
    hf.register(layout=layout)
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    results = {}
    for name, model_type, extra in entries():
        if only is not None and name not in only:
            continue
        t = time.perf_counter()
        results[name] = compare(name, model_type, extra, layout)
        results[name]["s"] = round(time.perf_counter() - t, 2)
    # Packed documents marked only by position_ids restarts (the usual HF packing collator), odd boundaries.
    for name in ("llama", "mistral", "qwen2_moe"):
        if only is None or name in only:
            results[f"{name}-packed"] = compare(name, name, FEATURES.get(name, {}), layout, packed=[0, 5, 17, SEQ])
    return results


def installed(names: tuple[str, ...]) -> tuple[str, ...]:
    """The names whose family this transformers ships (older releases lack the newest families)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_types = dict((name, mt) for name, mt, _ in VARIANTS)
    return tuple(n for n in names if model_types.get(n, n) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def check(results: dict) -> None:
    bad = {k: r for k, r in results.items() if r["status"] in ("mismatch", "crash", "ran")}
    assert not bad, "\n".join(f"{k}: {r}" for k, r in bad.items())
    # A tiny config this transformers cannot build (a new release's own config checks) is reported, not
    # failed: the sweep tests ringattn, and the families that must be exact or refused are checked below.
    unbuilt = {k: r["error"] for k, r in results.items() if r["status"] == "build"}
    if unbuilt:
        warnings.warn("HF sweep: tiny configs transformers could not build, skipped:\n"
                      + "\n".join(f"  {k}: {e}" for k, e in sorted(unbuilt.items())), stacklevel=2)
    hybrids = MUST_BE_EXACT_HYBRIDS if HYBRIDS_RUN else ()
    # Before 5.25: refused where the mixers inline their scans (Zaya's differ too); exact where ringattn runs the
    # module itself (RecurrentGemma, RWKV, MiniMax, ...): a mismatch or a crash fails above either way.
    for k in set(MUST_BE_EXACT_HYBRIDS) - set(hybrids):
        assert results.get(k, {}).get("status") in ("refused", "exact", None), (k, results.get(k))
    not_exact = [k for k in installed(MUST_BE_EXACT + hybrids) if results.get(k, {}).get("status") != "exact"]
    assert not not_exact, {k: results.get(k) for k in not_exact}
    not_refused = [k for k in installed(MUST_BE_REFUSED) if results.get(k, {}).get("status") != "refused"]
    assert not not_refused, {k: results.get(k) for k in not_refused}
    for k in ("llama-packed", "mistral-packed", "qwen2_moe-packed"):
        assert results[k]["status"] == "exact", (k, results[k])


def test_hf_sweep_2_ranks(ranks):
    check(ranks.run(2, sweep, "zigzag", timeout=600)[0])


@pytest.mark.slow
def test_hf_sweep_4_ranks(ranks):
    check(ranks.run(4, sweep, "zigzag", timeout=1200)[0])


def unprepared(layout: str) -> dict:
    """Without prepare(): what the first attention call (and the mask function before it) can see."""
    hf.register(layout=layout)
    warnings.filterwarnings("ignore")
    cases = {"phimoe": "phimoe", "llama4_text": "llama4_text", "gpt_oss": "gpt_oss", "phi3": "phi3", "lfm2": "lfm2",
             "llama-dynamic-ntk": "llama"}
    extra = dict(VARIANTS[0][2])
    return {name: compare(name, mt, extra if name == "llama-dynamic-ntk" else FEATURES.get(mt, {}), layout,
                          prepare=False) for name, mt in cases.items()}


def test_hf_without_prepare_exact_or_refused(ranks):
    r = ranks.run(2, unprepared, "zigzag")[0]
    assert {k: v["status"] for k, v in r.items()} == {
        "phimoe": "exact", "llama4_text": "exact", "gpt_oss": "exact", "phi3": "refused", "lfm2": "refused",
        "llama-dynamic-ntk": "refused"}, r
    assert "prepare(model)" in r["phi3"]["error"] and "longrope" in r["phi3"]["error"]
    assert "'conv' layer" in r["lfm2"]["error"]
