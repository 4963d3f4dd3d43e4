"""``model.generate()`` with attn_implementation="ring": every rank passes the whole prompt, ringattn shards it,
prefills with ring attention and decodes over a KV cache sharded across ranks. Greedy tokens and every step's
logits equal single-process sdpa (float64) on 1, 2 and 4 ranks, every layout, odd and even prompts, batch 2
with right and with left padding, seeded sampling, beam search, and use_cache=False."""

from __future__ import annotations

import pytest
import torch

import ringattn

transformers = pytest.importorskip("transformers")

from ringattn import hf  # noqa: E402

from .reference import rel_err  # noqa: E402
from .test_hf import tiny_model  # noqa: E402

LAYOUTS = ("contiguous", "zigzag", "striped")
TOL = 1e-9


def prompts(batch: int, n: int, pad: str | None):
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(1, 61, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    if pad == "right":
        mask[1, n - 3:] = 0
    elif pad == "left":
        mask[1, :4] = 0
    return ids, (None if pad is None else mask)


def generate(model, ids, mask, **kw):
    """(sequences, the float64 last-position logits of every step, cache): generate's own logits are float32,
    whose rounding would hide (or, at a rounding boundary, magnify) a float64 difference."""
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out[:, -1].clone()))
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, pad_token_id=0, **kw)
    finally:
        hook.remove()
    return out.sequences, torch.stack(seen, 1), out.cache


def run(model, ids, mask, **kw):
    torch.manual_seed(7)  # the same seed on every rank and in the reference: sampling draws alike
    return generate(model, ids, mask, max_new_tokens=5, **kw)


def case(family: str, layout: str, n: int, batch: int, pad: str | None, kw: dict) -> dict:
    ids, mask = prompts(batch, n, pad)
    model = tiny_model(family)
    want_seq, want_logits, _ = run(model, ids, mask, **kw)  # sdpa, one process
    hf.register(layout=layout)
    model = hf.prepare(tiny_model(family))
    model.set_attn_implementation("ring")
    seq, logits, cache = run(model, ids, mask, **kw)
    world = ringattn.comm.group_rank_world(None)[1]
    slots = None
    if kw.get("use_cache", True):
        # the cache is sharded: this rank's prompt shard (padded to the layout) and every world-th new token
        assert isinstance(cache, hf.RingCache), type(cache)
        slots = [layer.keys.shape[2] for layer in cache.layers]
    local = ringattn.layouts.padded_len(n, world, layout) // world
    return {"same_tokens": torch.equal(seq, want_seq), "logits_err": rel_err(logits, want_logits), "slots": slots,
            "local": local, "rank": ringattn.comm.group_rank_world(None)[0]}


CASES = [  # (family, n, batch, pad, generate kwargs)
    ("llama", 9, 1, None, {"do_sample": False}),
    ("llama", 16, 2, "right", {"do_sample": False}),
    ("mistral", 21, 2, "left", {"do_sample": False}),
    ("qwen2", 12, 1, None, {"do_sample": True, "top_k": 20}),
    ("llama", 11, 1, None, {"do_sample": False, "use_cache": False}),
    ("llama", 10, 1, None, {"do_sample": True, "num_return_sequences": 2}),
    ("qwen2", 14, 2, "left", {"do_sample": False, "num_beams": 3}),
]


SLOW = pytest.mark.slow


@pytest.mark.parametrize("world,layout", [(1, "contiguous"), *((2, lay) for lay in LAYOUTS), (4, "zigzag"),
                                          pytest.param(4, "contiguous", marks=SLOW),
                                          pytest.param(4, "striped", marks=SLOW)])
def test_generate_equals_one_process(ranks, world, layout):
    for family, n, batch, pad, kw in CASES:
        results = ranks.run(world, case, family, layout, n, batch, pad, kw)
        for r in results:
            assert r["same_tokens"], (family, n, pad, kw)
            assert r["logits_err"] <= TOL, (family, n, pad, kw, r)
        if kw.get("use_cache", True):
            # 5 new tokens: 4 decode steps keep a key each (the last token is never fed back), round robin
            kept = [sum(1 for t in range(4) if (n + t) % world == r["rank"]) for r in results]
            assert [r["slots"] for r in results] == [[r["local"] + k] * 2 for r, k in zip(results, kept)]


def sweep_case(layout: str) -> dict:
    """Greedy generate of every family the every-layer sweep must find exact, ring vs. the sweep's reference."""
    import warnings

    from ringattn.hf.audit.compare import Float64Throughout

    from . import test_hf_sweep as sw

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    hf.register(layout=layout)
    ids = torch.randint(3, sw.VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on one row
    out = {}
    for name, model_type, extra in sw.entries():
        if name not in sw.MUST_BE_EXACT + (sw.MUST_BE_EXACT_HYBRIDS if sw.HYBRIDS_RUN else ()):
            continue
        results = []
        for attn in (None, "ring"):
            model, ref = sw.build(model_type, extra, seed=0)
            if attn:
                hf.prepare(model)
                if type(model)._can_set_attn_implementation():
                    model.set_attn_implementation(attn)
                else:  # RWKV (no attention): what building it with attn_implementation="ring" sets
                    model.config._attn_implementation = attn
            # A hybrid's mixers may compute in float32 in a float64 model (Mamba2's scan): float64 there too, in
            # both runs alike
            hybrid = any(hf.mixers.mixes(m) for m in model.modules())
            try:
                with Float64Throughout() if hybrid else sw.float64_softmax() if ref == "eager" else torch.no_grad():
                    results.append(generate(model, ids, mask, max_new_tokens=4, do_sample=False))
            except hf.UnsupportedModel as e:
                if not attn:
                    raise
                results.append(f"refused: {e}")
            except ValueError as e:
                if attn:
                    raise
                results.append(f"{type(e).__name__}: {e}")  # one process cannot generate it: nothing to compare
        if isinstance(results[1], str):
            out[name] = {"refused": results[1]}
            continue
        if isinstance(results[0], str):
            out[name] = {"reference": results[0]}
            continue
        (want, want_logits, _), (got, logits, _) = results
        out[name] = {"same_tokens": torch.equal(got, want), "logits_err": rel_err(logits, want_logits)}
    return out


def test_generate_every_exact_family(ranks):
    from .test_hf_sweep import HYBRIDS_RUN, MUST_BE_EXACT, MUST_BE_EXACT_HYBRIDS, installed

    hybrids = MUST_BE_EXACT_HYBRIDS if HYBRIDS_RUN else ()
    r = ranks.run(2, sweep_case, "zigzag", timeout=600)[0]
    assert set(r) == set(installed(MUST_BE_EXACT + hybrids)), set(MUST_BE_EXACT) ^ set(r)
    # A hybrid whose scan keeps no decoding state would be refused by name, never generated from a zero state.
    refused = {k: v["refused"] for k, v in r.items() if "refused" in v}
    assert set(refused) == set(installed(hybrids)) - set(GENERATE_HYBRIDS), refused
    assert all("not supported" in v or "does not keep" in v or "pass use_cache=False" in v
               for v in refused.values()), refused
    r = {k: v for k, v in r.items() if k not in refused}
    no_reference = {k: v["reference"] for k, v in r.items() if "reference" in v}
    assert set(no_reference) == set(REFERENCE_CANNOT_GENERATE) & set(hybrids), no_reference
    assert all(REFERENCE_CANNOT_GENERATE[k] in v for k, v in no_reference.items()), no_reference
    bad = {k: v for k, v in r.items() if k not in no_reference and (not v["same_tokens"] or v["logits_err"] > TOL)}
    assert not bad, bad


# Families whose one-process generate fails in the sweep's tiny configuration (the error it raises): Bamba's and
# Jamba's have only Mamba layers, the delta-rule families' only linear-attention layers, and transformers asks such
# a cache for an attention layer's mask sizes (test_hf_mixers_generate.py compares them with an attention layer).
REFERENCE_CANNOT_GENERATE = {name: "can only be called on Attention layers" for name in (
    "bamba", "jamba", "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "qwen4_exp_text", "kimi_linear",
    "bailing_hybrid")}
# The hybrids that generate here: their convolutions, Mamba and Mamba2 scans, delta rules and Zaya's CCA leave the
# states decoding needs on every rank. The others are refused by name: MiniMax, RWKV and xLSTM with a cache (they
# generate with use_cache=False), RecurrentGemma with the left-padded prompts used here.
GENERATE_HYBRIDS = ("mamba2", "lfm2", "lfm3", "granitemoehybrid", "bamba", "falcon_h1", "zamba2", "nemotron_h",
                    "mamba", "falcon_mamba", "jamba", "jamba-attention", "zamba", "zaya",
                    "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "qwen4_exp_text", "olmo_hybrid", "lara_mini",
                    "kimi_linear", "bailing_hybrid")


def refusal_case() -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    ids, _ = prompts(1, 12, None)
    out = {}
    for name, kw in [("chunked prefill", dict(prefill_chunk_size=4)),
                     ("hidden", dict(output_hidden_states=True, return_dict_in_generate=True)),
                     ("assisted", dict(assistant_model=tiny_model("llama"))), ("balanced", {}),
                     ("unprepared", {})]:
        hf.register(layout="balanced" if name == "balanced" else "zigzag")
        model = tiny_model("llama") if name == "unprepared" else hf.prepare(tiny_model("llama"))
        model.set_attn_implementation("ring")
        try:
            model.generate(ids, max_new_tokens=3, pad_token_id=0, **kw)
            out[name] = "ran"
        except (ValueError, NotImplementedError) as e:
            out[name] = str(e)
    return out


def test_generate_refuses_what_it_cannot_do_on_every_rank(ranks):
    expected = {"chunked prefill": "prefill chunking", "hidden": "output_hidden_states",
                "assisted": "assisted or speculative decoding", "balanced": "layout='balanced'",
                "unprepared": "ringattn.hf.prepare(model) first"}
    for r in ranks.run(2, refusal_case):
        assert {k: expected[k] in v for k, v in r.items()} == dict.fromkeys(expected, True), r


def test_generate_refuses_a_per_token_input_it_does_not_shard(monkeypatch):
    # transformers itself drops token_type_ids for Llama; a model that takes one would meet a shard of the
    # tokens beside the whole per-token tensor. The decoder, called as generate calls it:
    monkeypatch.setattr(hf.generation, "in_generate", lambda: True)
    hf.register(layout="zigzag")
    model = hf.prepare(tiny_model("llama"))
    model.set_attn_implementation("ring")
    ids = torch.randint(1, 61, (1, 9))
    with pytest.raises(ValueError, match="token_type_ids would stay whole"):
        model.model(input_ids=ids, token_type_ids=torch.zeros_like(ids), use_cache=True)
