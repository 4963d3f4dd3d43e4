"""xLSTM (mLSTM cells) context-parallel through ringattn.hf.prepare: logits and every parameter gradient equal to the
same model in one process (float64), on 2 and 3 ranks (4 under -m slow), every layout, odd lengths, batch > 1, packed
documents; the backend's ``train`` mode (chunked kernel) and ``inference`` mode (chunked, then token by token)."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ringattn import hf  # noqa: E402

from .reference import grad_errors, rel_err  # noqa: E402
from .test_hf_sweep import HYBRIDS_RUN, VOCAB  # noqa: E402

pytestmark = pytest.mark.skipif(not HYBRIDS_RUN or not hasattr(transformers, "xLSTMForCausalLM"),
                                reason="xLSTM's mLSTM runs context-parallel under transformers 5.25's xLSTM")

TOL = 1e-10
CHUNK = 8


def build(mode: str = "train", seed: int = 0, hidden: int = 32, qk_dim_factor: float = 0.5):
    """A tiny float64 xLSTM: 2 blocks of 4 heads (K = hidden * qk_dim_factor / 4, V = hidden / 4)."""
    cfg = transformers.xLSTMConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_heads=4,
                                   chunk_size=CHUNK, mode=mode, qk_dim_factor=qk_dim_factor,
                                   ffn_round_up_to_multiple_of=16, use_cache=False, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2)
    # Its token-by-token kernel keeps the state in float32 unless told otherwise, which the config's validation
    # refuses: float64 in the reference and on every rank alike, so that the context parallelism is what is compared.
    object.__setattr__(cfg, "inference_state_dtype", "float64")
    torch.manual_seed(seed)
    model = transformers.xLSTMForCausalLM(cfg).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "gate_preact" in n or "norm" in n:
                p.add_(0.5 * torch.randn_like(p))
            if "igate_preact.bias" in n:
                # Input gates per head from the init's -10 (the stabiliser is the decayed start, m_0 = 0: a summary
                # that counted it would be wrong) to around 0 (it is a token's input gate; the normaliser sometimes
                # |q.n|, sometimes exp(-m)).
                p.copy_(torch.tensor([-10.0, -6.0, -1.0, 1.0], dtype=p.dtype) + 0.3 * torch.randn_like(p))
    return model


def case(layout: str, mode: str, seq: int, batch: int = 1, packed: list | None = None, via: str = "") -> dict:
    """On every rank: the prepared model's logits and gradients against one process (rank 0 compares). Packed
    documents against each document run alone."""
    import ringattn

    hf.register(layout=layout)
    warnings.filterwarnings("ignore")
    ref = build(mode)
    cp = build(mode)
    cp.load_state_dict(ref.state_dict())
    cp.config._attn_implementation = "ring"
    hf.prepare(cp)
    if mode == "train":
        ref.train()
        cp.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[torch.rand(batch, seq, generator=g) < 0.2] = hf.IGNORE_INDEX
    pos, kw = None, {}
    if packed is not None:
        pos = torch.cat([torch.arange(b - a) for a, b in zip(packed[:-1], packed[1:])])[None]
        for b in packed[1:-1]:
            labels[:, b] = hf.IGNORE_INDEX
    sb = hf.shard_batch(ids, labels, layout=layout, position_ids=pos)
    if via == "cu_seq_lens" or "cu_seq_lens_q" in sb:  # the balanced layout places tokens by document
        kw["cu_seq_lens_q"] = sb["cu_seq_lens_q"] if "cu_seq_lens_q" in sb else torch.tensor(packed, dtype=torch.int32)
    # xLSTM returns float32 logits (its head's output .float()): the losses sum them in float64, in one order.
    logits = cp(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False, **kw).logits.double()
    loss = hf.causal_lm_loss(logits, sb["shift_labels"], sb["num_items_in_batch"])
    loss.backward()
    hf.sync_gradients(cp)
    full = ringattn.unshard(logits.detach(), layout=layout, seq_len=seq, cu_seqlens=sb.get("cu_seq_lens_q"))
    if packed is None:
        ref_logits = ref(input_ids=ids, use_cache=False).logits.double()
    else:
        ref_logits = torch.cat([ref(input_ids=ids[:, a:b], use_cache=False).logits
                                for a, b in zip(packed[:-1], packed[1:])], 1)
    ref_logits = ref_logits.double()
    ref_loss = torch.nn.functional.cross_entropy(ref_logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=hf.IGNORE_INDEX)
    ref_loss.backward()
    errs = {"logits": rel_err(full, ref_logits.detach()), "loss": rel_err(loss.detach(), ref_loss.detach())}
    errs.update(grad_errors(cp, ref))
    return errs


def exact(errs: dict) -> None:
    worst = max(errs, key=lambda k: errs[k] if errs[k] == errs[k] else float("inf"))
    assert errs[worst] <= TOL, (worst, errs[worst], errs)


# train: 24 tokens, whole chunks of 8 in one process; on the ranks spans of 12, 6 and 4 (a chunk and a shorter one,
# one shorter chunk). inference: 29 tokens, its chunked kernel then its token-by-token one, batch 2.
MODES = {"train": (24, 1), "inference": (29, 2)}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_xlstm_exact_2_ranks(ranks, layout, mode):
    exact(ranks.run(2, case, layout, mode, *MODES[mode])[0])


@pytest.mark.parametrize("mode,layout", [("train", "zigzag"), ("inference", "contiguous")])
def test_xlstm_exact_3_ranks(ranks, mode, layout):
    exact(ranks.run(3, case, layout, mode, *MODES[mode])[0])


@pytest.mark.slow
@pytest.mark.parametrize("mode,layout", [("train", "zigzag"), ("inference", "striped"), ("train", "balanced")])
def test_xlstm_exact_4_ranks(ranks, mode, layout):
    exact(ranks.run(4, case, layout, mode, *MODES[mode])[0])


@pytest.mark.parametrize("via", ["position_ids", "cu_seq_lens"])
def test_xlstm_packed_documents_2_ranks(ranks, via):
    # A document inside one rank's shard, one across the ranks, one ending in the padding; each from m_0 = 0.
    exact(ranks.run(2, case, "zigzag", "inference", 30, 1, [0, 5, 17, 30], via)[0])


def test_xlstm_packed_documents_balanced_3_ranks(ranks):
    # A one-token document: a piece of one token continuing a state.
    exact(ranks.run(3, case, "balanced", "inference", 30, 1, [0, 11, 12, 30], "cu_seq_lens")[0])


# --- recognised by what it does, refusals ---

def test_xlstm_backend_is_the_mixer_prepare_runs():
    from ringattn.hf.mixers import mixes

    model = build()
    model.config._attn_implementation = "ring"
    hf.register(layout="contiguous")
    hf.prepare(model)
    found = {p: mixes(m) for p, m in model.named_modules() if p and mixes(m)}
    assert found == {f"backbone.blocks.{i}.mlstm_layer.mlstm_backend": ["mLSTM (xLSTM) matrix memory"]
                     for i in range(2)}, found


def test_xlstm_cache_outside_generate_refused():
    # xLSTM's config defaults to use_cache=True: a cache of each rank's own shard would be silently wrong.
    hf.register(layout="contiguous")
    model = build("inference")
    model.config._attn_implementation = "ring"
    hf.prepare(model)
    with pytest.raises(hf.UnsupportedModel, match="Pass use_cache=False to train or score"):
        model(input_ids=torch.arange(3, 9)[None], use_cache=True)
    # Evaluating a shard longer than max_inference_chunksize, xLSTM runs it in chunks through a cache of its own.
    model.eval().config.max_inference_chunksize = 4
    with torch.no_grad(), pytest.raises(hf.UnsupportedModel, match="max_inference_chunksize at least"):
        model(input_ids=torch.arange(3, 9)[None], use_cache=False)


def test_xlstm_train_with_padding_refused():
    hf.register(layout="contiguous")
    model = build("train_with_padding")
    model.config._attn_implementation = "ring"
    hf.prepare(model)
    with pytest.raises(hf.UnsupportedModel, match="mode 'train_with_padding'"):
        model(input_ids=torch.arange(3, 11)[None], use_cache=False)


# --- model.generate() ---

def generate_case(layout: str, n: int, kw: dict) -> dict:
    """Tokens and every step's float64 logits against one process. transformers' generate runs xLSTM over the whole
    sequence at every step (its cache is not carried between steps), so every step is a context-parallel prefill that
    keeps the state after its last position. A padded batch is refused: xLSTM's mixer takes no padding mask."""
    from .test_hf_generate import generate, prompts

    warnings.filterwarnings("ignore")
    hf.register(layout=layout)
    ids, _ = prompts(1, n, None)
    runs = []
    for ring in (False, True):
        # The cache's state widths follow config.qk_head_dim (rounded up to 64 channels): a layer that matches it.
        model = build("inference", hidden=64, qk_dim_factor=1.0)
        if ring:
            model.config._attn_implementation = "ring"
            hf.prepare(model)
        torch.manual_seed(7)  # the same draws for sampling in the reference and on every rank
        runs.append(generate(model, ids, None, max_new_tokens=4, **kw))
    (want, want_logits, _), (got, logits, _) = runs
    ids2, mask = prompts(2, n, "left")
    with pytest.raises(hf.UnsupportedModel, match="generate one unpadded prompt at a time"):
        generate(model, ids2, mask, max_new_tokens=2, do_sample=False)
    # The refusal leaves no mixer call active in this thread (the next model's forward would run as its prefill).
    from ringattn.hf.mixers.base import _ACTIVE

    assert _ACTIVE.get() is None
    return {"same_tokens": torch.equal(got, want), "logits_err": rel_err(logits, want_logits)}


@pytest.mark.parametrize("layout,n,kw", [("zigzag", 13, {"do_sample": False}),
                                         ("contiguous", 10, {"do_sample": True, "top_k": 20})])
def test_xlstm_generate_2_ranks(ranks, layout, n, kw):
    for r in ranks.run(2, generate_case, layout, n, kw):
        assert r["same_tokens"] and r["logits_err"] <= TOL, r


def half_case(layout: str) -> tuple[float, float]:
    """A bfloat16 model (train mode: the chunked kernel multiplies the passed state with bfloat16 inputs): the
    logits' error against float64, context-parallel and in one process."""
    import ringattn

    hf.register(layout=layout)
    warnings.filterwarnings("ignore")
    f64, ref, cp = build(), build().bfloat16(), build().bfloat16()
    cp.config._attn_implementation = "ring"
    hf.prepare(cp)
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    sb = hf.shard_batch(ids, layout=layout)
    with torch.no_grad():
        logits = cp(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False).logits
        full = ringattn.unshard(logits.double(), layout=layout, seq_len=24)
        want = f64(input_ids=ids, use_cache=False).logits.double()
        return rel_err(full, want), rel_err(ref(input_ids=ids, use_cache=False).logits.double(), want)


def test_xlstm_bfloat16_2_ranks(ranks):
    cp, one = ranks.run(2, half_case, "zigzag")[0]
    assert cp <= 3 * one, (cp, one)


def test_feed_forward_per_token_only_where_its_parts_are():
    # xLSTM's feed-forward is named after the family but acts per token; RWKV's holds a token shift and stays a
    # suspect of the model-wide check.
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ringattn.hf import features

    from .test_hf_sweep import FEATURES, tiny_config

    seen = {}
    for family in ("xlstm", "rwkv"):
        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family])
        with torch.device("meta"):
            model = cls(tiny_config(family, FEATURES.get(family, {}), "eager"))
        seen.update({type(m).__name__: features._per_token_feed_forward(m) for m in model.modules()
                     if "FeedForward" in type(m).__name__})
    assert seen == {"xLSTMFeedForward": True, "RwkvFeedForward": False}, seen


def test_feed_forward_with_a_token_mixing_part_or_call_is_a_suspect():
    """Named like a feed-forward, but holding attention or a softmax over some dim, or calling a roll in its forward:
    not per token (the model-wide check then refuses or handles it)."""
    from ringattn.hf import features

    class XlstmFeedForward(torch.nn.Module):  # noqa: N801 - named as the families name theirs
        def __init__(self, part):
            super().__init__()
            self.up, self.part = torch.nn.Linear(4, 4), part

        def forward(self, x):
            return self.part(self.up(x))

    class RollingFeedForward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.roll(self.up(x), 1, dims=1)

    assert features._per_token_feed_forward(XlstmFeedForward(torch.nn.SiLU()))
    assert not features._per_token_feed_forward(XlstmFeedForward(torch.nn.Softmax(dim=1)))
    assert not features._per_token_feed_forward(XlstmFeedForward(torch.nn.MultiheadAttention(4, 1)))
    assert not features._per_token_feed_forward(RollingFeedForward())
