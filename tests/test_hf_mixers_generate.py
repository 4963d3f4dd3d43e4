"""``model.generate()`` of hybrid models (Mamba and Mamba2 scans, delta rules, short convolutions) with
attn_implementation="ring": the prompt prefilled context-parallel, the conv and recurrent states after it kept on
every rank, each decode step the module's own single-token path. Tokens equal to one process, every step's
float64 logits to rounding, on 2 ranks in the contiguous and zigzag layouts (4 under -m slow), with left and right
padding, seeded sampling and beam search."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ringattn import hf  # noqa: E402
from ringattn.hf.audit.compare import Float64Throughout  # noqa: E402

from . import test_hf_sweep as sw  # noqa: E402
from .reference import rel_err  # noqa: E402
from .test_hf_generate import generate, prompts  # noqa: E402

# A family whose mixer ringattn runs context-parallel joins by one entry here.
FAMILIES = ("mamba2", "lfm2", "granitemoehybrid", "qwen3_next")
# Mamba1's scans (mamba_scan_forward: Mamba, Falcon-Mamba, Jamba; mamba_selective_scan per head: Zamba) and Kimi
# delta attention: in the default run one family per function, unpadded and padded on either side; every family
# and case under -m slow.
MORE_FAMILIES = ("mamba", "zamba", "kimi_linear")
SLOW_FAMILIES = ("falcon_mamba", "jamba", "bailing_hybrid")
PADDED = (0, 1, 2)  # CASES: unpadded, left and right padding
TOL = 1e-9

CASES = [  # (prompt length, batch, padding, generate kwargs)
    (13, 1, None, {"do_sample": False}),
    (16, 2, "left", {"do_sample": False}),
    (11, 2, "right", {"do_sample": False}),
    (3, 1, None, {"do_sample": False}),  # shorter than the convolution: its state starts with zeros
    (14, 1, None, {"do_sample": True, "top_k": 20}),
    (12, 2, None, {"do_sample": False, "num_beams": 2}),
    (10, 1, None, {"do_sample": False, "use_cache": False}),
]


# Families whose tiny config has only mixer layers, which transformers cannot generate with in one process
# (its cache is asked for an attention layer's mask sizes): the same with an attention layer. The MLA attention
# of the Kimi-delta-attention families expands its latents to num_attention_heads keys, but sdpa repeats them by
# num_attention_heads // num_key_value_heads: one process runs it only with as many kv heads as heads.
MIXER_THEN_ATTENTION = ["linear_attention", "full_attention"]
MLA = dict(layer_types=MIXER_THEN_ATTENTION, num_key_value_heads=4)  # the sweep's num_attention_heads
WITH_ATTENTION = {"qwen3_next": dict(layer_types=MIXER_THEN_ATTENTION), "kimi_linear": MLA, "bailing_hybrid": MLA,
                  "jamba": dict(attn_layer_period=2, attn_layer_offset=1)}


def build(family: str, ring: bool):
    extra = {**sw.FEATURES.get(family, {}), **WITH_ATTENTION.get(family, {})}
    model, _ = sw.build(family, extra, seed=0)
    if family == "zamba":
        # Its initialisation draws x_proj (B, C and dt) and out_proj with std 0.02, which leaves what the state after
        # the prompt adds to the logits at ~1e-11 of them, below TOL: scaled, as training moves them, so that a
        # wrong state shows
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "x_proj_weight"):
                    m.x_proj_weight.mul_(50)
                    m.out_proj.weight.mul_(20)
    if ring:
        hf.prepare(model)
        model.set_attn_implementation("ring")
    return model


def case(layout: str, families: tuple[str, ...], which: tuple[int, ...] | None = None) -> dict:
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    hf.register(layout=layout)
    out = {}
    for family in families:
        for i, (n, batch, pad, kw) in enumerate(CASES):
            if which is not None and i not in which:
                continue
            ids, mask = prompts(batch, n, pad)
            results = []
            for ring in (False, True):
                torch.manual_seed(7)  # the same draws for sampling in the reference and on every rank
                # float64 wherever the model asks for float32 (Mamba2's scan keeps its state so), in both runs
                # alike: what is compared is the context parallelism, at float64 noise
                with Float64Throughout():
                    results.append(generate(build(family, ring), ids, mask, max_new_tokens=5, **kw))
            (want, want_logits, _), (got, logits, cache) = results
            out[f"{family} {i}"] = {
                "same_tokens": torch.equal(got, want), "logits_err": rel_err(logits, want_logits),
                "ring_cache": kw.get("use_cache", True) is False or isinstance(cache, hf.RingCache)}
    return out


def check(results: list[dict]) -> None:
    for r in results:
        bad = {k: v for k, v in r.items() if not (v["same_tokens"] and v["logits_err"] <= TOL and v["ring_cache"])}
        assert not bad, bad


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_hybrid_generate_equals_one_process(ranks, layout):
    check(ranks.run(2, case, layout, FAMILIES, timeout=600))


@pytest.mark.slow
def test_hybrid_generate_4_ranks(ranks):
    # 4 ranks: a short prompt's last k conv inputs come from several ranks
    check(ranks.run(4, case, "zigzag", FAMILIES, timeout=900))


def test_mamba1_and_kda_generate_equal_one_process(ranks):
    check(ranks.run(2, case, "zigzag", MORE_FAMILIES, PADDED, timeout=600))


@pytest.mark.slow
@pytest.mark.parametrize("world,layout", [(2, "contiguous"), (4, "zigzag")])
def test_mamba1_and_kda_generate_every_case(ranks, world, layout):
    check(ranks.run(world, case, layout, MORE_FAMILIES + SLOW_FAMILIES, timeout=1800))


def plain_forward_case(use_cache) -> str:
    warnings.filterwarnings("ignore")
    hf.register(layout="zigzag")
    model = build("mamba2", True)
    sb = hf.shard_batch(torch.randint(3, sw.VOCAB, (1, 12)), layout="zigzag")
    kw = {} if use_cache is None else {"use_cache": use_cache}
    try:
        model(input_ids=sb["input_ids"], **kw)
    except hf.UnsupportedModel as e:
        return str(e)
    return "ran"


def test_plain_forward_with_a_cache_says_what_to_do(ranks):
    # Mamba2's config defaults to use_cache=True: a plain forward makes a cache no rank could fill alone.
    for use_cache in (None, True):
        for msg in ranks.run(2, plain_forward_case, use_cache):
            assert all(w in msg for w in ("outside model.generate()", "use_cache=False", "call model.generate()")), msg
    assert ranks.run(2, plain_forward_case, False) == ["ran", "ran"]


def forgetful_case() -> str:
    # A handler that runs context-parallel but keeps no state for decoding (as a new mixer's might): refused.
    from ringattn.hf.mixers import HANDLERS, Handler

    saved = HANDLERS["mamba2_scan_forward"]

    def forgetful(original, call, *args, **kwargs):
        args = list(args)
        args[5] = None  # the cache
        return saved.run(original, call, *args, **kwargs)

    HANDLERS["mamba2_scan_forward"] = Handler(saved.name, saved.what, forgetful)
    warnings.filterwarnings("ignore")
    hf.register(layout="zigzag")
    try:
        generate(build("mamba2", True), *prompts(1, 9, None), max_new_tokens=2)
    except hf.UnsupportedModel as e:
        return str(e)
    finally:
        HANDLERS["mamba2_scan_forward"] = saved
    return "ran"


def test_a_handler_that_keeps_no_state_is_refused(ranks):
    for msg in ranks.run(2, forgetful_case):
        assert "needs the state its Mamba2 selective scan (SSD) leaves after the prompt" in msg, msg
        assert "mamba2_scan_forward does not keep yet" in msg, msg


def test_a_padded_prompt_needs_the_mixers_mask_keyword():
    from ringattn.hf.generation import _Step
    from ringattn.hf.mixers import base

    class Mixer(torch.nn.Module):
        def forward(self, hidden_states, cache=None):
            return hidden_states

    hf.register(layout="zigzag")
    step = _Step(hf.registry.settings("ring"), None, True, [(0, 6), (2, 6)], 6)
    with pytest.raises(hf.UnsupportedModel, match="padded batch needs the mixer's attention_mask as a keyword"):
        base._prefill_mask(Mixer(), (torch.zeros(2, 6, 4),), {}, step)
    kwargs = {}
    base._prefill_mask(Mixer(), (), kwargs, _Step(step.settings, None, True, [(0, 6), (0, 6)], 6))
    assert kwargs == {}  # unpadded: the mixer's call unchanged


def test_a_scan_asked_for_its_final_state_in_a_prefill_must_keep_it():
    # Gated DeltaNet's scans return their final state for the module to store (output_final_state=True): a handler
    # that returns the local shard's instead is refused, as one given the cache that writes none.
    from ringattn.hf.mixers import base

    base.HANDLERS["fake_rule"] = base.Handler("fake_rule", "fake rule",
                                              lambda original, call, *a, **k: original(*a, **k))
    dispatch = base._dispatcher("fake_rule", lambda x, output_final_state=False: (x, x if output_final_state else None))
    token = base._ACTIVE.set(base.MixerCall(torch.nn.Linear(1, 1), None, seq_len=4))
    try:
        with pytest.raises(hf.UnsupportedModel, match="ringattn's context-parallel fake_rule does not keep yet"):
            dispatch(torch.zeros(1), output_final_state=True)
        assert dispatch(torch.zeros(1))[1] is None  # not asked for it: the handler's answer as it is
    finally:
        base._ACTIVE.reset(token)
        del base.HANDLERS["fake_rule"]


def test_a_selective_scan_asked_for_its_last_state_in_a_prefill_must_keep_it():
    # Zamba's per-head scans return their final state for the module to store (return_last_state=True).
    from ringattn.hf.mixers import base

    base.HANDLERS["fake_scan"] = base.Handler("fake_scan", "fake scan",
                                              lambda original, call, *a, **k: original(*a, **k))
    dispatch = base._dispatcher("fake_scan", lambda x, return_last_state=False: (x, x) if return_last_state else x)
    token = base._ACTIVE.set(base.MixerCall(torch.nn.Linear(1, 1), None, seq_len=4))
    try:
        with pytest.raises(hf.UnsupportedModel, match="ringattn's context-parallel fake_scan does not keep yet"):
            dispatch(torch.zeros(1), return_last_state=True)
    finally:
        base._ACTIVE.reset(token)
        del base.HANDLERS["fake_scan"]


def test_a_cache_recording_the_past_is_refused_by_the_mamba_scan():
    # A cache that records the past (assisted decoding) asks the scan for the states after each of the last tokens.
    from ringattn.hf.mixers import HANDLERS, base

    class Recording:
        def get_recurrent_states_to_keep(self, layer_idx=None):
            return 3

    module = torch.nn.Module()
    module.layer_idx = 0
    call = base.MixerCall(module, None, seq_len=4)
    with pytest.raises(hf.UnsupportedModel, match="records the past, for assisted decoding"):
        HANDLERS["mamba_scan_forward"].run(None, call, module, None, None, None, None, None, Recording())
