"""Hybrid models (Mamba2, short convolutions, ...) context-parallel through ringattn.hf.prepare: logits and every
parameter gradient equal to the same model in one process, on 2 and 4 ranks, every layout, odd lengths, packed
documents."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

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


# Mamba1's selective scan (hf/mixers/mamba.py). Zamba's shared attention block follows its Mamba layer.
MAMBA1 = ("mamba", "falcon_mamba", "jamba", "zamba")
GROUPS = {"mamba2-conv": FAMILIES, "mamba1": MAMBA1}


@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_hybrids_exact_2_ranks(ranks, layout, group):
    exact(ranks.run(2, run, GROUPS[group], layout)[0])


@pytest.mark.parametrize("group,layout", [("mamba2-conv", "contiguous"), ("mamba1", "zigzag")])
def test_hybrids_exact_3_ranks(ranks, group, layout):
    exact(ranks.run(3, run, GROUPS[group], layout)[0])


def packed_case(families: tuple[str, ...], layout: str, packed: list[int], via: str) -> dict:
    """Packed documents against each document run alone in one process (every document from a zero state, as
    the fused kernels and ringattn run them; transformers' pure-torch scans in one process carry the state across
    documents). ``via``: "position_ids" (restarts) or "cu_seq_lens" (the model is given cu_seq_lens_q)."""
    import torch

    import ringattn

    from .reference import grad_errors, rel_err
    from .test_hf_sweep import SEQ, VOCAB, build, float64_softmax

    hf.register(layout=layout)
    warnings.filterwarnings("ignore")
    out = {}
    for fam in families:
        ref, _ = build(fam, FEATURES.get(fam, {}), 0)
        cp, _ = build(fam, FEATURES.get(fam, {}), 0)
        cp.load_state_dict(ref.state_dict())
        cp.set_attn_implementation("ring")
        hf.prepare(cp)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, VOCAB, (1, SEQ), generator=g)
        labels = ids.clone()
        for b in packed[1:-1]:
            labels[:, b] = hf.IGNORE_INDEX
        pos = torch.cat([torch.arange(b - a) for a, b in zip(packed[:-1], packed[1:])])[None]
        cu = torch.tensor(packed, dtype=torch.int32)
        sb = hf.shard_batch(ids, labels, layout=layout, position_ids=pos)
        kw = {"cu_seq_lens_q": sb.get("cu_seq_lens_q", cu)} if via == "cu_seq_lens" else {}
        with float64_softmax():
            logits = cp(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False, **kw).logits
        loss = hf.causal_lm_loss(logits, sb["shift_labels"], sb["num_items_in_batch"])
        loss.backward()
        hf.sync_gradients(cp)
        full = ringattn.unshard(logits.detach(), layout=layout, seq_len=SEQ, cu_seqlens=sb.get("cu_seq_lens_q"))
        with float64_softmax():
            ref_logits = torch.cat([ref(input_ids=ids[:, a:b], use_cache=False).logits
                                    for a, b in zip(packed[:-1], packed[1:])], 1)
        ref_loss = torch.nn.functional.cross_entropy(ref_logits[0, :-1], labels[0, 1:], ignore_index=hf.IGNORE_INDEX)
        ref_loss.backward()
        errs = {"logits": rel_err(full, ref_logits.detach()), "loss": rel_err(loss.detach(), ref_loss.detach())}
        errs.update(grad_errors(cp, ref))
        out[fam] = max(errs.items(), key=lambda kv: kv[1])
    return out


# transformers' Mamba2 scan computes in float32 inside (its own noise floor, as the sweep's TOL_FLOAT32_INSIDE).
PACKED_TOL = 1e-5


@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("via", ["position_ids", "cu_seq_lens"])
def test_hybrids_packed_documents_2_ranks(ranks, via, group):
    # Odd boundaries: a document inside one rank's shard, one across the ranks, one ending in the padding.
    r = ranks.run(2, packed_case, GROUPS[group], "zigzag", [0, 5, 17, 30], via)[0]
    bad = {k: v for k, v in r.items() if not v[1] <= PACKED_TOL}
    assert not bad, r


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_hybrids_packed_documents_balanced_3_ranks(ranks, group):
    # A one-token document: a piece of one token continuing a state.
    r = ranks.run(3, packed_case, GROUPS[group], "balanced", [0, 11, 12, 30], "cu_seq_lens")[0]
    bad = {k: v for k, v in r.items() if not v[1] <= PACKED_TOL}
    assert not bad, r


# A mixer ringattn has no handler for is refused by the model-wide check, naming the module and why. Every family
# of transformers 5.25 has a handler; these run with theirs taken away, as a family that mixes tokens in a way
# ringattn does not know yet would meet prepare.
UNKNOWN_MIXERS = {
    "minimax": (("lightning_attention",), "model.layers.1.self_attn (MiniMaxLightningAttention) is a recurrent / "
                "state-space / linear-attention mixer"),
    "recurrent_gemma": (("Conv1d", "_rnn_scan"), "model.layers.0.temporal_block.conv_1d (Conv1d) is a 1-D convolution "
                        "along the sequence"),
    "xlstm": (("xLSTMBackend",), "backbone.blocks.0.mlstm_layer.mlstm_backend (xLSTMBackend) is a recurrent / "
              "state-space / linear-attention mixer"),
    "rwkv": (("token shift", "rwkv_linear_attention"), "rwkv.blocks.0.attention (RwkvSelfAttention) is a recurrent / "
             "state-space / linear-attention mixer"),
}


@pytest.mark.parametrize("family", sorted(UNKNOWN_MIXERS))
def test_unknown_mixers_refused_naming_the_module(family, monkeypatch):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ringattn.hf.mixers import HANDLERS, MODULE_HANDLERS

    from .test_hf_sweep import tiny_config

    handlers, message = UNKNOWN_MIXERS[family]
    for name in handlers:
        monkeypatch.delitem(MODULE_HANDLERS if name in MODULE_HANDLERS else HANDLERS, name)
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family])
    with torch.device("meta"):
        model = cls(tiny_config(family, FEATURES.get(family, {}), "sdpa" if cls._supports_sdpa else "eager"))
    model.config._attn_implementation = "ring"
    with pytest.raises(hf.UnsupportedModel) as e:
        hf.prepare(model)
    assert message in str(e.value), str(e.value)
    assert "whose token mixing ringattn does not know" in str(e.value)
    assert "each rank would mix its own shard alone" in str(e.value)


def test_mamba1_cache_refused():
    # Decoding carries the recurrent state in the cache, which under context parallelism only the rank holding
    # the last token would have.
    from .test_hf_sweep import build

    hf.register(layout="contiguous")
    model, _ = build("mamba", {}, 0)
    model.set_attn_implementation("ring")
    hf.prepare(model)
    with pytest.raises(hf.UnsupportedModel, match="Pass use_cache=False to train or score"):
        model(input_ids=torch.arange(3, 9)[None], use_cache=True)


def test_mamba1_fused_kernel_left_for_the_unfused_path(monkeypatch):
    # Training without a cache, the mixer first tries the fused kernel (a hub kernel where installed), which would
    # convolve and scan this rank's shard alone: under a ring it must get None and take the unfused path.
    from transformers.models.mamba import modeling_mamba as mm

    from .test_hf_sweep import build

    def kernel(*args, **kwargs):
        raise AssertionError("the fused kernel ran under context parallelism")

    monkeypatch.setattr(mm, "mamba_inner_fn", kernel)
    hf.register(layout="contiguous")
    model, _ = build("mamba", {}, 0)
    model.set_attn_implementation("ring")
    hf.prepare(model)
    model.train()
    assert model(input_ids=torch.arange(3, 9)[None], use_cache=False).logits.shape == (1, 6, model.config.vocab_size)


def test_mamba1_scan_asked_for_its_final_state_refused():
    from transformers.models.mamba import modeling_mamba as mm

    from ringattn.hf.mixers import HANDLERS
    from ringattn.hf.mixers.base import Batch, MixerCall
    from ringattn.hf.registry import RingSettings

    call = MixerCall(torch.nn.Module(), Batch(RingSettings(), None, None))
    x = torch.randn(1, 2, 4, dtype=torch.float64)
    b_ = torch.randn(1, 3, 4, dtype=torch.float64)
    with pytest.raises(hf.UnsupportedModel, match="asked for its final state"):
        HANDLERS["mamba_selective_scan"].run(mm.mamba_selective_scan, call, x, x, -torch.ones(2, 3), b_, b_,
                                             return_last_state=True)
    with pytest.raises(hf.UnsupportedModel, match="one-token step from a cached recurrent state"):
        HANDLERS["mamba_selective_state_update"].run(mm.mamba_selective_state_update, call)


# --- Mamba1's selective scan (hf/mixers/mamba.py) called directly, no model ---

SCAN_LEN = 24  # every W in 1..4 splits it (2W for zigzag)
# transformers' scans cast x and B (and, in mamba_scan_forward, A_log, D and dt_proj.bias) to float32 on the way
# in, so the gradients reaching those tensors are float32 sums, which the two runs add in different orders: the
# outputs and the other gradients agree to ~1e-16, these to ~1e-7.
SCAN_TOL = 1e-6
SCANS = ("mamba_scan_forward", "mamba_selective_scan", "mamba_selective_scan bare")  # bare: no D, gate, bias, softplus


def _scan_case(name: str, batch: int):
    """(original, module or None, inputs as (tensor, its sequence dim), weights that take a gradient)."""
    from transformers import MambaConfig
    from transformers.models.mamba import modeling_mamba as mm

    g = torch.Generator().manual_seed(1)
    d, n, L = 6, 4, SCAN_LEN
    x, dt, z = (torch.randn(batch, d, L, generator=g, dtype=torch.float64) for _ in range(3))
    fn = getattr(mm, name.split()[0])
    original = getattr(fn, "_ringattn_original", fn)
    if name == "mamba_scan_forward":
        torch.manual_seed(0)
        m = mm.MambaMixer(MambaConfig(hidden_size=4, intermediate_size=d, state_size=n, time_step_rank=2,
                                      num_hidden_layers=1), layer_idx=0).double()
        with torch.no_grad():
            m.A_log.add_(0.3 * torch.randn(d, n, generator=g, dtype=torch.float64))
            m.D.add_(torch.randn(d, generator=g, dtype=torch.float64))
            m.dt_proj.bias.add_(torch.randn(d, generator=g, dtype=torch.float64))
        b_, c = (torch.randn(batch, L, n, generator=g, dtype=torch.float64) for _ in range(2))
        return original, m, [(x, 2), (dt, 2), (b_, 1), (c, 1), (z, 2)], [m.A_log, m.D, m.dt_proj.bias]
    b_, c = (torch.randn(batch, n, L, generator=g, dtype=torch.float64) for _ in range(2))
    if name.endswith("bare"):  # dt as given, so positive
        a = -torch.rand(d, n, generator=g, dtype=torch.float64) - 0.5
        return original, None, [(x, 2), (dt.abs(), 2), (b_, 2), (c, 2)], [a.requires_grad_()]
    weights = [-torch.rand(d, n, generator=g, dtype=torch.float64) - 0.5,  # A, D, delta_bias
               torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)]
    return original, None, [(x, 2), (dt, 2), (b_, 2), (c, 2), (z, 2)], [w.requires_grad_() for w in weights]


def _scan_call(name, fn, module, xs, weights):
    if name == "mamba_scan_forward":
        return fn(module, *xs, None)
    if name.endswith("bare"):
        return fn(*xs[:2], weights[0], *xs[2:])
    x, dt, b_, c, z = xs
    a, d, bias = weights
    return fn(x, dt, a, b_, c, D=d, z=z, delta_bias=bias, delta_softplus=True)


def scan_direct(name: str, layouts: tuple[str, ...], batch: int) -> float:
    """The handler on this rank's tokens against the original over the whole sequence: the output and the
    gradients of every input and weight (summed over the ranks). Returns the worst relative error."""
    import functools

    import torch.distributed as dist

    import ringattn
    from ringattn.hf.mixers import HANDLERS
    from ringattn.hf.mixers.base import Batch, MixerCall
    from ringattn.hf.registry import RingSettings

    from .reference import rel_err

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    worst = 0.0
    for layout in layouts:
        original, module, inputs, weights = _scan_case(name, batch)
        full = [t.clone().requires_grad_() for t, _ in inputs]
        ref = _scan_call(name, original, module, full, weights)
        gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        expect = torch.autograd.grad((ref * gy).sum(), full + weights)

        pos = ringattn.global_positions(layout, rank, world, SCAN_LEN // world)
        local = [t.index_select(dim, pos).requires_grad_() for t, dim in inputs]
        call = MixerCall(module or torch.nn.Module(), Batch(RingSettings(layout=layout), None, None))
        y = _scan_call(name, functools.partial(HANDLERS[name.split()[0]].run, original, call), module, local, weights)
        got = torch.autograd.grad((y * gy.index_select(2, pos)).sum(), local + weights)
        errs = [rel_err(y.detach(), ref.detach().index_select(2, pos))]
        errs += [rel_err(a, b.index_select(dim, pos)) for a, b, (_, dim) in zip(got, expect, inputs)]
        for a, b in zip(got[len(local):], expect[len(local):]):
            if world > 1:  # each rank holds its tokens' part of a weight's gradient
                dist.all_reduce(a)
            errs.append(rel_err(a, b))
        worst = max(worst, *errs)
    return worst


@pytest.mark.parametrize("name", SCANS)
def test_mamba_scan_handler_one_process(name):
    assert scan_direct(name, ("contiguous",), batch=2) < SCAN_TOL


@pytest.mark.parametrize("world", [2, 3, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", SCANS)
def test_mamba_scan_handler_ranks(ranks, name, world):
    layouts = ("contiguous", "zigzag", "striped") if world != 3 else ("contiguous", "striped")
    assert max(ranks.run(world, scan_direct, name, layouts, 2)) < SCAN_TOL


def scans_per_rank(layout: str) -> int:
    """How many times the handler ran transformers' scan on this rank for one call."""
    from transformers.models.mamba import modeling_mamba as mm

    original, module, inputs, _ = _scan_case("mamba_scan_forward", 1)
    counted = [0]
    scan = mm.mamba_selective_scan

    def counting(*args, **kwargs):
        counted[0] += 1
        return scan(*args, **kwargs)

    import ringattn
    from ringattn.hf.mixers import HANDLERS
    from ringattn.hf.mixers.base import Batch, MixerCall
    from ringattn.hf.registry import RingSettings

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    pos = ringattn.global_positions(layout, rank, world, SCAN_LEN // world)
    call = MixerCall(module, Batch(RingSettings(layout=layout), None, None))
    mm.mamba_selective_scan = counting
    try:
        HANDLERS["mamba_scan_forward"].run(original, call, module, *[t.index_select(d, pos) for t, d in inputs], None)
    finally:
        mm.mamba_selective_scan = scan
    return counted[0]


def test_mamba1_scan_runs_once_per_piece(ranks):
    # A piece continuing another reuses its zero-start run (the summary's) and adds the inherited state's part.
    # Zigzag on 2 ranks: rank 0 holds quarters 0 and 3 (two pieces, one of them first), rank 1 quarters 1 and 2
    # (one piece, which continues rank 0's and feeds it): rerunning it would make [2, 2].
    assert ranks.run(2, scans_per_rank, "zigzag") == [2, 1]


def mamba2_scans_per_rank(layout: str) -> tuple[int, float]:
    """How many times the handler ran transformers' Mamba2 scan on this rank for one call, and its outputs' worst
    error against the scan over the whole sequence."""
    from transformers import Mamba2Config
    from transformers.models.mamba2 import modeling_mamba2 as mm

    import ringattn
    from ringattn.hf.audit.compare import Float64Throughout
    from ringattn.hf.mixers import HANDLERS
    from ringattn.hf.mixers.base import Batch, MixerCall
    from ringattn.hf.registry import RingSettings

    from .reference import rel_err

    torch.manual_seed(0)
    heads, head_dim, groups, n = 4, 2, 2, 3
    module = mm.Mamba2Mixer(Mamba2Config(hidden_size=4, expand=2, num_heads=heads, head_dim=head_dim,
                                         n_groups=groups, state_size=n, chunk_size=4, num_hidden_layers=1),
                            layer_idx=0).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        module.A_log.add_(0.3 * torch.randn(heads, generator=g, dtype=torch.float64))
        module.D.add_(torch.randn(heads, generator=g, dtype=torch.float64))
    inputs = [torch.randn(1, SCAN_LEN, w, generator=g, dtype=torch.float64)
              for w in (heads * head_dim, groups * n, groups * n, heads)]
    fn = mm.mamba2_scan_forward
    original = getattr(fn, "_ringattn_original", fn)
    # float64 where the scan computes in float32, in both runs alike
    with Float64Throughout():
        want = original(module, *inputs, None)
    counted = [0]

    def counting(*args, **kwargs):
        counted[0] += 1
        return original(*args, **kwargs)

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    pos = ringattn.global_positions(layout, rank, world, SCAN_LEN // world)
    call = MixerCall(module, Batch(RingSettings(layout=layout), None, None))
    with Float64Throughout():
        y = HANDLERS["mamba2_scan_forward"].run(counting, call, module, *[t.index_select(1, pos) for t in inputs],
                                                None)
    return counted[0], rel_err(y, want.index_select(1, pos))


def test_mamba2_scan_runs_once_per_piece(ranks):
    # Every piece runs the scan once from a zero state; one that continues another adds what the state it inherits
    # contributes (C_t . exp(cumsum A dt)_t h_in) instead of running again from it. Zigzag on 2 ranks: rank 0
    # holds quarters 0 and 3, rank 1 quarters 1 and 2 (one piece, which continues rank 0's and feeds it): running
    # the continuing pieces again would make [2, 2].
    results = ranks.run(2, mamba2_scans_per_rank, "zigzag")
    assert [c for c, _ in results] == [2, 1]
    assert max(e for _, e in results) < 1e-12, results
# --- Gated DeltaNet and Kimi delta attention --------------------------------------------------------------
# compare runs these families' modeling files in float64 (test_hf_sweep.float64_inside: transformers' delta rules
# cast to float32 themselves), so they are held to float64 rounding.

DELTA_FAMILIES = ("qwen3_next", "kimi_linear")  # the sweep covers the others that call the same rules


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_delta_rules_exact_2_ranks(ranks, layout):
    exact(ranks.run(2, run, DELTA_FAMILIES, layout)[0])


def test_delta_rules_exact_3_ranks(ranks):
    exact(ranks.run(3, run, DELTA_FAMILIES, "zigzag")[0])


@pytest.mark.slow
def test_delta_rules_exact_4_ranks(ranks):
    exact(ranks.run(4, run, ("qwen3_next",), "zigzag")[0])


def run_beside_attention(layout: str) -> dict:
    """The delta rules in models that also have softmax-attention layers, which run ring attention (transformers
    leaves these families off _supports_attention_backend; prepare knows their attention is on the interface).
    OLMo-hybrid's beta reaches 2 (allow_neg_eigval); LaRA-mini's attention layers slide."""
    hf.register(layout=layout)
    warnings.filterwarnings("ignore")
    attention = {"qwen3_next": "full_attention", "kimi_linear": "full_attention", "olmo_hybrid": "full_attention",
                 "lara_mini": "sliding_attention"}
    return {f: compare(f, f, dict(FEATURES[f], layer_types=["linear_attention", t]), layout)
            for f, t in attention.items()}


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

    def run_fragments(self, step, transition, inputs, *, keep_final: bool, **kwargs):
        from ringattn import mixers

        assert not keep_final  # a direct call keeps no decoding state
        return mixers.run_fragments(step, transition, inputs, plan=self.plan(*inputs[0].shape[1::-1]), **kwargs), None


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


@pytest.mark.parametrize("world", [2, 3, pytest.param(4, marks=pytest.mark.slow)])
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
    """A state carried in (a cache continued by more than one token) has no place on a rank's pieces: refused,
    naming it. (A state carried out is what a generate prefill keeps: tests/test_hf_mixers_generate.py.)"""
    import torch

    from ringattn.hf.mixers import HANDLERS

    name = "torch_chunk_gated_delta_rule"
    q, k, v, g, beta = rule_inputs(name, 8, seed=0)
    run = functools.partial(HANDLERS[name].run, rule(name), DirectCall("contiguous", False, 8, None))
    with pytest.raises(hf.UnsupportedModel, match="recurrent state carried into a context-parallel Gated DeltaNet "
                                                  "delta rule .*prefill the whole prompt at once"):
        run(q, k, v, g=g, beta=beta, initial_state=torch.zeros(B, 4, 4, 3, dtype=torch.float64))


def test_module_handlers_leave_classes_alone():
    """A module run whole by a module handler gets a forward of its own: torch's classes (RWKV's token shift is a
    ZeroPad2d, RecurrentGemma's convolution a Conv1d) keep theirs for every other instance, and a copy of the model
    dispatches its own modules."""
    import copy

    import transformers

    from .test_hf_sweep import tiny_config

    pad, conv = torch.nn.modules.padding._ConstantPadNd.forward, torch.nn.Conv1d.forward
    hf.register(layout="zigzag")
    model = transformers.RwkvForCausalLM(tiny_config("rwkv", {}, "eager"))
    model.config._attn_implementation = "ring"
    hf.prepare(model)
    assert torch.nn.modules.padding._ConstantPadNd.forward is pad and torch.nn.Conv1d.forward is conv
    torch.jit.script(torch.nn.Sequential(torch.nn.ConstantPad1d(1, 0.0)))  # torch's own forward, scriptable
    shift = copy.deepcopy(model).rwkv.blocks[0].attention.time_shift
    assert shift.forward.__self__ is shift


def _short_conv_fn(x, weight, bias):  # a modeling file's own convolution function, as LFM2's before 5.25
    return torch.nn.functional.conv1d(x, weight, bias, padding=weight.shape[-1] - 1, groups=x.shape[1])


_short_conv_fn.__module__ = "transformers.models.fake.modeling_fake"


class FakeShortConv(torch.nn.Module):
    """Holds a Conv1d that the Conv1d module handler would run, but hands its weights to a function of its own."""

    def __init__(self, c: int = 4, k: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv1d(c, c, k, groups=c, padding=k - 1)

    def forward(self, x):
        return _short_conv_fn(x.transpose(1, 2), self.conv.weight, self.conv.bias)[..., :x.shape[1]].transpose(1, 2)


def test_a_conv_whose_holder_calls_its_own_function_is_refused():
    """The Conv1d looks handled, but its holder convolves with the weights in a function of its modeling file (LFM2
    under transformers 5.24): refused naming the function, never run on each shard alone."""
    from .test_hf_sweep import build

    model, _ = build("llama", {}, 0)
    model.model.layers[0].mixer = FakeShortConv()
    model.config._attn_implementation = "ring"
    hf.register(layout="zigzag")
    with pytest.raises(hf.UnsupportedModel, match=r"model.layers.0.mixer \(FakeShortConv\) mixes tokens in "
                                                  r"_short_conv_fn"):
        hf.prepare(model)


class TorchShortConv(torch.nn.Module):
    """Holds a Conv1d that the Conv1d module handler runs, but convolves with its weights through torch directly."""

    def __init__(self, c: int = 32, k: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv1d(c, c, k, groups=c, padding=k - 1)

    def forward(self, x):
        y = torch.nn.functional.conv1d(x.transpose(1, 2), self.conv.weight, self.conv.bias, padding=2, groups=32)
        return x + y[..., :x.shape[1]].transpose(1, 2)


def bypassed_conv_case() -> str:
    from .test_hf_sweep import build

    hf.register(layout="zigzag")
    model, _ = build("llama", {}, 0)
    layer = model.model.layers[0]
    layer.mixer = TorchShortConv().to(next(model.parameters()).dtype)
    inner = layer.mlp.forward
    layer.mlp.forward = lambda x: inner(layer.mixer(x))
    model.config._attn_implementation = "ring"
    hf.prepare(model)
    sb = hf.shard_batch(torch.randint(3, 50, (1, 16)), layout="zigzag")
    with pytest.raises(hf.UnsupportedModel) as e:
        model(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False)
    return str(e.value)


def test_a_conv_bypassed_by_its_holder_is_refused_at_the_forward(ranks):
    """The holder's forward convolves with the Conv1d's weights through torch (no modeling function to see):
    refused on every rank at the first forward, since the Conv1d never ran through its forward."""
    for msg in ranks.run(2, bypassed_conv_case):
        assert "layer 0 (TorchShortConv): its Conv1d did not run through its forward" in msg, msg
