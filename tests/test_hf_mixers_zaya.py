"""Zaya (CCA: q/k through two stacked causal convolutions, half of each value head from the previous token)
context-parallel through ringattn.hf.prepare: logits and every parameter gradient equal to the same model in one
process, float64, on 2 and 3 ranks (4 under -m slow), every layout, odd lengths, batch 2, packed documents from
position_ids restarts and cu_seq_lens_q (against each document alone); generate() and RingTrainer (activation
checkpointing included) equal to one process. ringattn.mixers.causal_windows alone. Inkling: refused, naming its
learned position bias."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ringattn import hf  # noqa: E402

from .test_hf_sweep import FEATURES, HYBRIDS_RUN  # noqa: E402

pytestmark = pytest.mark.skipif(not HYBRIDS_RUN or not hasattr(transformers, "ZayaForCausalLM"),
                                reason="Zaya's CCA needs transformers 5.25")
TOL = 1e-9
# The default CCA (kernels 2 and 2: 2 tokens of reach), and one whose reach (2 + 3 = 5 tokens) spans several ranks'
# fragments, beside a sliding-window layer.
CONFIGS = {"default": dict(FEATURES["zaya"]),
           "wide": dict(FEATURES["zaya"], cca_time0=3, cca_time1=4, layer_types=["hybrid", "hybrid_sliding"],
                        sliding_window=5)}


def case(layout: str, config: str, n: int, batch: int, packed: list | None = None, via: str = "position_ids") -> float:
    """The worst relative error of the logits, the loss and every parameter gradient (rank 0; 0 elsewhere).
    ``via``: how the model learns of the packed documents, "position_ids" (restarts) or "cu_seq_lens" (the model
    is given cu_seq_lens_q too)."""
    import ringattn

    from .reference import rel_err
    from .test_hf_sweep import VOCAB, build, float64_softmax

    hf.register(layout=layout)
    warnings.filterwarnings("ignore")
    ref, _ = build("zaya", CONFIGS[config], 0)
    cp, _ = build("zaya", CONFIGS[config], 0)
    cp.load_state_dict(ref.state_dict())
    cp.set_attn_implementation("ring")
    hf.prepare(cp)
    g = torch.Generator().manual_seed(n + batch)
    ids = torch.randint(3, VOCAB, (batch, n), generator=g)
    labels = ids.clone()
    labels[torch.rand(batch, n, generator=g) < 0.2] = hf.IGNORE_INDEX
    pos = None
    if packed is not None:
        pos = torch.cat([torch.arange(b - a) for a, b in zip(packed[:-1], packed[1:])])[None]
        labels[:, packed[1:-1]] = hf.IGNORE_INDEX
    sb = hf.shard_batch(ids, labels, layout=layout, position_ids=pos)
    kw = {}
    if via == "cu_seq_lens":
        kw["cu_seq_lens_q"] = sb.get("cu_seq_lens_q", torch.tensor(packed, dtype=torch.int32))
    with float64_softmax():
        logits = cp(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False, **kw).logits
    loss = hf.causal_lm_loss(logits, sb["shift_labels"], sb["num_items_in_batch"])
    loss.backward()
    hf.sync_gradients(cp)
    full = ringattn.unshard(logits.detach(), layout=layout, seq_len=n, cu_seqlens=sb.get("cu_seq_lens_q"))
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return 0.0
    with float64_softmax():
        if packed is None:
            ref_logits = ref(input_ids=ids, use_cache=False).logits
        else:  # each document alone: the convolutions and the delayed value start from zeros at its first token
            ref_logits = torch.cat([ref(input_ids=ids[:, a:b], use_cache=False).logits
                                    for a, b in zip(packed[:-1], packed[1:])], 1)
    ref_loss = torch.nn.functional.cross_entropy(ref_logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=hf.IGNORE_INDEX)
    ref_loss.backward()
    errs = [rel_err(full, ref_logits.detach()), rel_err(loss.detach(), ref_loss.detach())]
    grads = dict(cp.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is not None:
            errs.append(rel_err(grads[name].grad, p.grad))
    return max(errs)


def cases(layouts: tuple[str, ...], configs: tuple[str, ...], n: int, batch: int, packed=None,
          via: str = "position_ids") -> dict:
    return {(layout, c): case(layout, c, n, batch, packed, via) for layout in layouts for c in configs}


def exact(results: dict) -> None:
    bad = {k: v for k, v in results.items() if not v <= TOL}
    assert not bad, results


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_zaya_exact_2_ranks(ranks, layout):
    # 29 tokens: odd, padded on every layout; batch 2
    exact(ranks.run(2, cases, (layout,), ("default", "wide"), 29, 2)[0])


def test_zaya_exact_3_ranks(ranks):
    # Striped over 3 ranks: the 5 tokens before a position lie on every other rank
    exact(ranks.run(3, cases, ("zigzag", "striped"), ("wide",), 31, 1)[0])


@pytest.mark.slow
def test_zaya_exact_4_ranks(ranks):
    exact(ranks.run(4, cases, ("contiguous", "zigzag", "striped"), ("default", "wide"), 29, 2)[0])


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_zaya_packed_documents_2_ranks(ranks, layout):
    # Restarts of position_ids: a 5-token document (shorter than the wide CCA's reach plus one), one across the
    # ranks, one ending in the padding.
    exact(ranks.run(2, cases, (layout,), ("default", "wide"), 29, 1, [0, 5, 17, 29])[0])


def test_zaya_packed_documents_balanced_3_ranks(ranks):
    # The balanced layout places tokens by the documents (cu_seq_lens_q); a one-token document continues none.
    exact(ranks.run(3, cases, ("balanced",), ("wide",), 30, 1, [0, 11, 12, 30], "cu_seq_lens")[0])


def _model(config: str = "default"):
    from .test_hf_sweep import build

    hf.register(layout="contiguous")
    model, _ = build("zaya", CONFIGS[config], 0)
    model.set_attn_implementation("ring")
    hf.prepare(model)
    return model


def test_zaya_cca_is_run_whole_by_what_it_does():
    from ringattn.hf.mixers import window

    model = _model("wide")
    cca = model.model.layers[0].self_attn.qkv_proj
    assert window.matches(cca) and window.history(cca) == 5 == cca.conv_kernel_size
    assert not window.matches(model.model.layers[0].self_attn)  # the attention around it
    # Padded by the Conv1d itself, not by the forward: not this handler's (the model-wide check names it)
    cca.conv_qk_grouped.padding = (1,)
    assert not window.matches(cca)


def test_zaya_cache_outside_generate_refused():
    # The cache reaches the CCA positionally; no rank's cache would hold the states after the sequence.
    model = _model()
    with pytest.raises(hf.UnsupportedModel, match="a cache given to a context-parallel causal convolutions .*"
                                                  "Pass use_cache=False"):
        model(input_ids=torch.arange(3, 9)[None], use_cache=True)


def test_window_refuses_a_longer_recurrent_state():
    # A module whose outputs reach further back than its convolutions (a running sum standing for a recurrent
    # state that carries more than the previous token) is refused before its first context-parallel forward.
    from ringattn.hf.mixers import window
    from ringattn.hf.mixers.base import Batch, MixerCall
    from ringattn.hf.registry import RingSettings

    call = MixerCall(torch.nn.Module(), Batch(RingSettings(), None, None))
    x = torch.randn(1, 6, 4, dtype=torch.float64)
    window._check_delay(lambda h, cache, mask: h.roll(1, 1) + h, call, x, 1)  # reaches 1 back (and wraps: padded)
    with pytest.raises(hf.UnsupportedModel, match="depend on tokens more than 2 positions back"):
        window._check_delay(lambda h, cache, mask: h.cumsum(1), call, x, 2)


@pytest.mark.parametrize("family", ["inkling_text", "inkling2_text"])
def test_inkling_refused_naming_its_position_bias(family):
    # Its attention calls the interface with a learned, hidden-state-conditioned relative bias (position_bias,
    # (batch, heads, q_len, kv_len) built from the positions a rank holds) that sdpa adds to the scores and the ring
    # would drop: refused at prepare, naming the module that makes it.
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .test_hf_sweep import tiny_config

    if family not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip(f"{family} is not in this transformers")
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family])
    with torch.device("meta"):
        model = cls(tiny_config(family, {}, "sdpa" if cls._supports_sdpa else "eager"))
    model.config._attn_implementation = "ring"
    with pytest.raises(hf.UnsupportedModel, match=r"self_attn \(\w+Attention\) adds a learned position bias to its "
                                                  r"attention scores \(position_bias, from \w+ \(\w+(Logits|Bias)\)"):
        hf.prepare(model)


def test_position_bias_at_the_interface_refused():
    # Unprepared, or a model whose attention the model-wide check passes: the call itself is refused, never
    # run without its bias.
    from ringattn.hf.attention import attention_forward

    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    with pytest.raises(hf.UnsupportedModel, match="passes a position_bias to the attention interface"):
        attention_forward(torch.nn.Module(), q, q, q, None, position_bias=torch.zeros(1, 2, 4, 4))


# --- model.generate(): the prompt prefilled context-parallel; the CCA's conv inputs and delayed value after it
# written by its own forward on the prompt's last tokens, on every rank; each decode step its own one-token path.
GENERATE_CASES = [  # (config, prompt length, batch, padding, generate kwargs)
    ("default", 13, 1, None, {"do_sample": False}),
    ("wide", 3, 1, None, {"do_sample": False}),  # shorter than the wide CCA's reach: its conv state starts with zeros
    ("wide", 14, 1, None, {"do_sample": True, "top_k": 20}),
    ("wide", 12, 2, None, {"do_sample": False, "num_beams": 2}),
    # The CCA zeroes the padding through its conv_mask (passed by position), given this rank's shard of it
    ("wide", 16, 2, "left", {"do_sample": False}),
    ("wide", 11, 2, "right", {"do_sample": False}),
    ("default", 10, 1, None, {"do_sample": False, "use_cache": False}),  # every step a context-parallel forward
]


def generate_case(layout: str) -> dict:
    from ringattn.hf.audit.compare import Float64Throughout

    from .reference import rel_err
    from .test_hf_generate import generate, prompts
    from .test_hf_sweep import build

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    hf.register(layout=layout)
    out = {}
    for config, n, batch, pad, kw in GENERATE_CASES:
        ids, mask = prompts(batch, n, pad)
        results = []
        for ring in (False, True):
            model, _ = build("zaya", CONFIGS[config], 0)
            if ring:
                hf.prepare(model)
                model.set_attn_implementation("ring")
            torch.manual_seed(7)  # the same draws for sampling in the reference and on every rank
            with Float64Throughout():
                results.append(generate(model, ids, mask, max_new_tokens=5, **kw))
        (want, want_logits, _), (got, logits, _) = results
        out[(config, n, batch, pad)] = (torch.equal(got, want), rel_err(logits, want_logits))
    return out


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_zaya_generate_equals_one_process(ranks, layout):
    for r in ranks.run(2, generate_case, layout):
        bad = {k: v for k, v in r.items() if not (v[0] and v[1] <= TOL)}
        assert not bad, r


# --- ringattn.mixers.causal_windows alone: a function of whole sequences against itself on each document of each
# row, every layout, uneven shards, documents shared and per row, batch 2, float64, outputs and every gradient.
HISTORIES = (1, 7)  # 7 > the shortest fragments: the tokens before a piece span several ranks


def window_fn(w, v0):
    """Tokens mixed only within ``len(w[0]) - 1`` back: a depthwise convolution of the masked input, which it pads
    itself, and the input delayed by one token (a learned row before the first)."""
    import torch.nn.functional as F

    def fn(x, mask):
        xm = x * mask[..., None].to(x.dtype)
        conv = F.conv1d(F.pad(xm.transpose(1, 2), (w.shape[1] - 1, 0)), w[:, None], groups=w.shape[0])
        delayed = torch.cat([v0.expand(x.shape[0], 1, -1), x[:, :-1]], 1)
        return conv.transpose(1, 2), delayed
    return fn


@functools.cache
def window_expected():
    from .test_state_passing import B, cases, per_row

    out = []
    for i, (_, _, n, cu) in enumerate(cases()):
        for h in HISTORIES:
            g = torch.Generator().manual_seed(10 * i + h)
            x = torch.randn(B, n, 3, generator=g, dtype=torch.float64, requires_grad=True)
            mask = (torch.rand(B, n, generator=g) > 0.2).long()
            w = torch.randn(3, h + 1, generator=g, dtype=torch.float64, requires_grad=True)
            v0 = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
            fn = window_fn(w, v0)
            ys = []
            for b, r in enumerate(per_row(cu)):
                bounds = list(r) + ([n] if r[-1] < n else []) if r is not None else [0, n]
                parts = [fn(x[b:b + 1, s:e], mask[b:b + 1, s:e]) for s, e in zip(bounds, bounds[1:])]
                ys.append([torch.cat(p, 1) for p in zip(*parts)])
            ys = [torch.cat(p, 0) for p in zip(*ys)]
            gys = [torch.randn(y.shape, generator=g, dtype=torch.float64) for y in ys]
            grads = torch.autograd.grad(sum((y * gy).sum() for y, gy in zip(ys, gys)), (x, w, v0))
            out.append((i, h, x.detach(), mask, w.detach(), v0.detach(), gys, [y.detach() for y in ys], grads))
    return out


def window_check(expect) -> float:
    import torch.distributed as dist

    from ringattn import mixers

    from .test_state_passing import B, _rank_world, case_positions, cases

    rank, world = _rank_world()
    worst = 0.0
    for i, h, x, mask, w, v0, gys, refs, (gx, gw, gv) in expect:
        layout, uneven, n, cu = cases()[i]
        _, pos = case_positions(layout, uneven, n, cu, world, rank)

        def mine(t, pos=pos):
            return torch.stack([t[b].index_select(0, pos[b]) for b in range(B)])

        xl = mine(x).requires_grad_()
        wl, vl = w.clone().requires_grad_(), v0.clone().requires_grad_()
        plan = mixers.fragments(pos.shape[1], layout=layout, cu_seqlens=cu, uneven=uneven,
                                seq_len=n if uneven else None, batch=B)
        ys = mixers.causal_windows(window_fn(wl, vl), [xl, mine(mask)], h, plan=plan)
        err = max((y - mine(r)).abs().max().item() for y, r in zip(ys, refs))
        dx, dw, dv = torch.autograd.grad(sum((y * mine(gy)).sum() for y, gy in zip(ys, gys)), (xl, wl, vl))
        if world > 1:  # each rank holds its tokens' part of a weight's gradient
            dist.all_reduce(dw)
            dist.all_reduce(dv)
        err = max(err, (dx - mine(gx)).abs().max().item(), (dw - gw).abs().max().item(),
                  (dv - gv).abs().max().item())
        assert err < 1e-11, f"{layout} uneven={uneven} n={n} cu={cu} history={h} W={world}: max error {err}"
        worst = max(worst, err)
    return worst


def test_causal_windows_one_process():
    assert window_check(window_expected()) < 1e-11


@pytest.mark.parametrize("world", [2, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_causal_windows_ranks(ranks, world):
    assert max(ranks.run(world, window_check, window_expected())) < 1e-11


def bad_history() -> str:
    from ringattn import mixers

    plan = mixers.fragments(4, layout="zigzag")
    try:
        mixers.causal_windows(lambda x: x, [torch.zeros(1, 4, 2)], -1 if plan.rank == 0 else 2, plan=plan)
    except ValueError as e:
        return str(e)
    return "ran"


def test_causal_windows_bad_input_raises_on_every_rank(ranks):
    # Rank 0's history is wrong: it says why, the other rank stops too rather than wait in the gather.
    msgs = ranks.run(2, bad_history)
    assert "history must be a non-negative int, got -1" in msgs[0], msgs
    assert "another rank failed its checks" in msgs[1], msgs


def trainer_run(checkpointing: bool) -> dict:
    from . import test_hf_trainer as t

    t.HYBRIDS = (*t.HYBRIDS, "zaya") if "zaya" not in t.HYBRIDS else t.HYBRIDS
    return t.ring_run("zaya", "zigzag", 2, 1, 2, checkpointing)


@pytest.mark.parametrize("checkpointing", [pytest.param(False, marks=pytest.mark.slow), True])
def test_zaya_ring_trainer(ranks, checkpointing):
    # RingTrainer, 3 float64 steps with gradient accumulation: loss, gradient norm and weights equal to transformers'
    # Trainer in one process; with activation checkpointing the replay of each layer in backward runs the CCA
    # context-parallel with its forward's documents.
    from . import test_hf_trainer as t

    t.HYBRIDS = (*t.HYBRIDS, "zaya") if "zaya" not in t.HYBRIDS else t.HYBRIDS
    results = ranks.run(2, trainer_run, checkpointing)
    want = t.reference("zaya", 1, 2, checkpointing)
    assert want["checkpointing"] == checkpointing and all(r["checkpointing"] == checkpointing for r in results)
    t.check(results, want, "zaya", TOL)


def audit_case():
    from ringattn.hf.audit import source as auditing

    warnings.filterwarnings("ignore")
    return hf.audit(auditing.tiny_config("zaya", **CONFIGS["wide"]), seq_len=23, layout="zigzag")


def test_zaya_audit_compares_the_cca_layers(ranks):
    r = ranks.run(2, audit_case)[0]
    assert r.ok and r.tol == 1e-9, r.table()
    assert all(row.mixes == "self_attn.qkv_proj: causal convolutions and a one-token delay it pads itself"
               and row.output_err <= 1e-9 and row.grad_err <= 1e-9 for row in r.rows[:2]), r.table()
