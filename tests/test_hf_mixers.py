"""Hybrid models (Mamba2, short convolutions, ...) context-parallel through ringattn.hf.prepare: logits and every
parameter gradient equal to the same model in one process, on 2 and 4 ranks, every layout, odd lengths, packed
documents."""

from __future__ import annotations

import functools
import warnings

import pytest

pytest.importorskip("transformers")

from ringattn import hf  # noqa: E402

from .test_hf_sweep import FEATURES, compare  # noqa: E402

FAMILIES = ("mamba2", "lfm2", "granitemoehybrid", "bamba")


def run(families: tuple[str, ...], layout: str, packed: list | None = None) -> dict:
    hf.register(layout=layout)
    warnings.filterwarnings("ignore")
    return {f: compare(f, f, FEATURES.get(f, {}), layout, packed=packed) for f in families}


def exact(results: dict) -> None:
    bad = {k: r for k, r in results.items() if r["status"] != "exact"}
    assert not bad, bad


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_hybrids_exact_2_ranks(ranks, layout):
    exact(ranks.run(2, run, FAMILIES, layout)[0])


def test_hybrids_exact_3_ranks(ranks):
    exact(ranks.run(3, run, FAMILIES, "contiguous")[0])


# --- Gated DeltaNet and Kimi delta attention --------------------------------------------------------------
# compare runs these families' modeling files in float64 (test_hf_sweep.float64_inside: transformers' delta rules
# cast to float32 themselves), so they are held to float64 rounding.

DELTA_FAMILIES = ("qwen3_next", "kimi_linear")  # the sweep covers the others that call the same rules


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_delta_rules_exact_2_ranks(ranks, layout):
    exact(ranks.run(2, run, DELTA_FAMILIES, layout)[0])


def test_delta_rules_exact_3_ranks(ranks):
    exact(ranks.run(3, run, DELTA_FAMILIES, "zigzag")[0])


def test_delta_rules_exact_4_ranks(ranks):
    exact(ranks.run(4, run, ("qwen3_next",), "zigzag")[0])


def run_beside_attention(layout: str) -> dict:
    """The delta rules in models that also have softmax-attention layers, which run ring attention."""
    import transformers

    hf.register(layout=layout)
    warnings.filterwarnings("ignore")
    # transformers leaves _supports_attention_backend unset on these families although their attention layers
    # call the attention interface, and prepare refuses on the flag; set here for the test only. OLMo-hybrid's
    # beta reaches 2 (allow_neg_eigval); LaRA-mini's attention layers slide.
    attention = {"qwen3_next": "full_attention", "kimi_linear": "full_attention", "olmo_hybrid": "full_attention",
                 "lara_mini": "sliding_attention"}
    classes = (transformers.Qwen3NextForCausalLM, transformers.KimiLinearForCausalLM,
               transformers.OlmoHybridForCausalLM, transformers.LaraMiniForCausalLM)
    for cls in classes:
        cls._supports_attention_backend = True
    try:
        return {f: compare(f, f, dict(FEATURES[f], layer_types=["linear_attention", t]), layout)
                for f, t in attention.items()}
    finally:
        for cls in classes:
            del cls._supports_attention_backend


def test_delta_rules_beside_ring_attention(ranks):
    exact(ranks.run(2, run_beside_attention, "zigzag")[0])


# --- the handlers alone: a random call of the rule against the same rule over the whole sequence -----------

B = 2
RULES = {  # name: (family whose modeling file defines it, whether its gate is per key channel)
    "torch_chunk_gated_delta_rule": ("qwen3_next", False),
    "torch_recurrent_gated_delta_rule": ("qwen3_next", False),
    "chunk_kimi_delta_attention": ("kimi_linear", True),
    "recurrent_kimi_delta_attention": ("kimi_linear", True),
}
# layout, uneven, length, documents: every W of 1-4 splits 24 (zigzag: 2W chunks); 23 is split unevenly. chunk_size
# 4 puts chunk boundaries inside the fragments and fragments of 3 tokens (zigzag, W=4) end mid-chunk. Documents
# that differ per row make the pieces' rows a subset of the batch.
RULE_CASES = [("contiguous", False, 24, None), ("zigzag", False, 24, None), ("striped", False, 24, None),
              ("zigzag", True, 23, None), ("zigzag", False, 24, [[0, 5, 17, 24], [0, 11, 24]])]


def rule(name: str):
    import importlib

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    family = RULES[name][0]
    module = importlib.import_module(getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family]).__module__)
    fn = getattr(module, name)
    return getattr(fn, "_ringattn_original", fn)  # prepare rebinds the name to a dispatcher


def rule_inputs(name: str, n: int, seed: int) -> list:
    """query, key (B, n, 2, 4), value (B, n, 4, 3) (grouped: 2 value heads per key head, not for KDA), g < 0,
    beta in (0, 1), float64."""
    import torch

    per_channel = RULES[name][1]
    hk, hv = (4, 4) if per_channel else (2, 4)
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    g = -0.5 * torch.rand(B, n, hv, *((4,) if per_channel else ()), generator=gen, dtype=torch.float64)
    beta = 0.1 + 0.8 * torch.rand(B, n, hv, generator=gen, dtype=torch.float64)
    return [r(B, n, hk, 4), r(B, n, hk, 4), r(B, n, hv, 3), g, beta]


def call_rule(fn, name: str, xs: list):
    q, k, v, g, beta = xs
    kw = dict(g=g, beta=beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=True,
              cu_seqlens=None)
    if name.startswith(("torch_chunk", "chunk")):
        kw["chunk_size"] = 4
    out, final = fn(q, k, v, **kw)
    assert final is None
    return out


class DirectCall:
    """What a handler reads of its MixerCall, for a call of the rule outside any model."""

    module = None
    where = "direct call"

    def __init__(self, layout: str, uneven: bool, n: int, cu: list | None):
        self.layout, self.uneven, self.n, self.cu = layout, uneven, n, cu

    def plan(self, local_len: int, batch: int):
        from ringattn import mixers

        return mixers.fragments(local_len, layout=self.layout, uneven=self.uneven, cu_seqlens=self.cu,
                                seq_len=self.n if self.uneven else None, batch=batch)


def rule_reference(name: str, float64: bool) -> list:
    """Per case: inputs, output gradient, the whole-sequence outputs (each document of each row alone) and input
    gradients (the rule in float64, or as transformers runs it, in float32)."""
    import contextlib

    import torch

    from .test_hf_sweep import float64_inside

    out = []
    for i, (_, _, n, cu) in enumerate(RULE_CASES):
        full = [x.requires_grad_() for x in rule_inputs(name, n, seed=i)]
        with float64_inside(RULES[name][0]) if float64 else contextlib.nullcontext():
            if cu is None:
                y = call_rule(rule(name), name, full)
            else:
                y = torch.cat([torch.cat([call_rule(rule(name), name, [x[b:b + 1, s:e] for x in full])
                                          for s, e in zip(row, row[1:])], 1) for b, row in enumerate(cu)], 0)
            gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
            grads = torch.autograd.grad((y * gy).sum(), full)
        out.append(([x.detach() for x in full], gy, y.detach(), grads))
    return out


def rank_rule(name: str, expect: list, float64: bool = True) -> float:
    """The worst error over RULE_CASES of the handler on this rank's tokens against ``expect``."""
    import contextlib

    import torch

    from ringattn.hf.mixers import HANDLERS

    from .test_hf_sweep import float64_inside
    from .test_state_passing import _rank_world, case_positions

    rank, world = _rank_world()
    worst = 0.0
    for (layout, uneven, n, cu), (full, gy, ref, ref_grads) in zip(RULE_CASES, expect):
        _, pos = case_positions(layout, uneven, n, cu, world, rank)

        def mine(t, pos=pos):
            return torch.stack([t[b].index_select(0, pos[b]) for b in range(B)])

        local = [mine(x).requires_grad_() for x in full]
        handler = functools.partial(HANDLERS[name].run, rule(name), DirectCall(layout, uneven, n, cu))
        with float64_inside(RULES[name][0]) if float64 else contextlib.nullcontext():
            y = call_rule(handler, name, local)
            grads = torch.autograd.grad((y * mine(gy)).sum(), local)
        err = (y - mine(ref)).abs().max().item()
        for g, rg in zip(grads, ref_grads):
            err = max(err, (g - mine(rg)).abs().max().item())
        worst = max(worst, err)
    return worst


@functools.cache
def rule_expected(name: str, float64: bool = True) -> list:
    return rule_reference(name, float64)


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_one_process(name):
    assert rank_rule(name, rule_expected(name)) < 1e-10


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_ranks(ranks, name, world):
    assert max(ranks.run(world, rank_rule, name, rule_expected(name))) < 1e-10


@pytest.mark.parametrize("name", ["torch_chunk_gated_delta_rule", "chunk_kimi_delta_attention"])
def test_rule_float32_inside(ranks, name):
    """The rules as transformers runs them, in float32 inside: the handler on 2 ranks is as close to the float64
    rule over the whole sequence as the float32 rule over the whole sequence is (its own rounding, measured on the
    same inputs), within a factor 10."""
    exact64 = rule_expected(name)
    floor = 0.0
    for (_, _, ref, grads), (_, _, ref32, grads32) in zip(exact64, rule_expected(name, False)):
        floor = max([floor, (ref32 - ref).abs().max().item()] + [(a - b).abs().max().item()
                                                                 for a, b in zip(grads32, grads)])
    assert 1e-9 < floor < 1e-4
    assert max(ranks.run(2, rank_rule, name, exact64, False)) < 10 * floor


def test_rule_refuses_a_carried_state():
    """A state carried in or out (what a cache does) has no place on a rank's pieces: refused, naming it."""
    import torch

    from ringattn.hf.mixers import HANDLERS

    name = "torch_chunk_gated_delta_rule"
    q, k, v, g, beta = rule_inputs(name, 8, seed=0)
    run = functools.partial(HANDLERS[name].run, rule(name), DirectCall("contiguous", False, 8, None))
    with pytest.raises(hf.UnsupportedModel, match="recurrent state carried into or out of a context-parallel "
                                                  "Gated DeltaNet delta rule .*pass use_cache=False"):
        run(q, k, v, g=g, beta=beta, output_final_state=True)
    with pytest.raises(hf.UnsupportedModel, match="recurrent state carried into"):
        run(q, k, v, g=g, beta=beta, initial_state=torch.zeros(B, 4, 4, 3, dtype=torch.float64))
