"""RWKV-4 context-parallel through ringattn.hf.prepare (hf/mixers/rwkv.py): the WKV recurrence and the token shifts
of its time and channel mixing. Logits and every parameter gradient equal to the same model in one process, on 2
and 3 ranks (4 under -m slow), every layout, odd lengths, batch > 1, train and eval mode (eval rescales the hidden
states every ``rescale_every`` layers), packed documents against each document run alone; float32 with large keys,
where the stabiliser carries the state."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from ringattn import hf  # noqa: E402

from .test_hf_sweep import HYBRIDS_RUN  # noqa: E402

pytestmark = pytest.mark.skipif(not HYBRIDS_RUN, reason="transformers before 5.25 refuses hybrid mixers")

VOCAB = 61
# transformers' pure-torch WKV rounds each key to float32 (key.float()) and its gradient on the way back, in both
# runs alike; the gradients reaching the keys (so every weight before them) differ by the float32 rounding of
# two float64 sums taken in different orders: ~1e-8. Everything else agrees to float64 rounding.
TOL = 1e-6


def build(dtype=torch.float64, layers: int = 3, seed: int = 0, attn: str = "eager"):
    """A tiny random RWKV: weights perturbed off their structured init (so every time_* parameter takes a real
    gradient), rescale_every=1 (eval mode halves the hidden states after every layer). RWKV takes no
    set_attn_implementation (it has no attention): ``attn="ring"`` builds it so, as from_pretrained would."""
    import transformers

    cfg = transformers.RwkvConfig(vocab_size=VOCAB, hidden_size=32, attention_hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=layers, context_length=128, rescale_every=1,
                                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(dtype)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_((0.5 if "time_" in n else 0.1) * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for p in model.rwkv.embeddings.parameters():
            p.mul_(1e3)  # the init's embeddings are ~1e-4: let the token shift carry something
    return model


def case(layout: str, seq: int, batch: int, train: bool, packed: list | None = None, dtype=torch.float64,
         key_scale: float = 1.0, via: str = "position_ids", checkpoint: bool = False) -> dict:
    """On every rank: the prepared model on this rank's shard against the same model in one process over the whole
    sequence (``packed``: each document alone). Returns rank 0's relative errors: logits, loss, worst gradient."""
    import ringattn

    from .reference import rel_err

    hf.register(layout=layout)
    warnings.filterwarnings("ignore")
    ref = build(dtype)
    if key_scale != 1.0:
        with torch.no_grad():
            for blk in ref.rwkv.blocks:
                blk.attention.key.weight.mul_(key_scale)
    cp = build(dtype, attn="ring")
    cp.load_state_dict(ref.state_dict())
    hf.prepare(cp)
    if checkpoint:
        cp.gradient_checkpointing_enable()
    ref.train(train)
    cp.train(train)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[torch.rand(batch, seq, generator=g) < 0.2] = hf.IGNORE_INDEX
    pos = None
    # One list of document bounds for every row, or one per row.
    rows = None if packed is None else [packed] * batch if isinstance(packed[0], int) else packed
    if rows is not None:
        pos = torch.stack([torch.cat([torch.arange(b - a) for a, b in zip(r[:-1], r[1:])]) for r in rows])
        for i, r in enumerate(rows):
            labels[i, r[1:-1]] = hf.IGNORE_INDEX
    sb = hf.shard_batch(ids, labels, layout=layout, position_ids=pos)
    kw = {}
    if packed is not None and via == "cu_seq_lens":
        kw["cu_seq_lens_q"] = sb.get("cu_seq_lens_q", torch.tensor(packed, dtype=torch.int32))
    elif packed is not None or layout == "balanced":
        kw["position_ids"] = sb["position_ids"]
        if "cu_seq_lens_q" in sb:
            kw["cu_seq_lens_q"] = sb["cu_seq_lens_q"]
    logits = cp(input_ids=sb["input_ids"], use_cache=False, **kw).logits
    loss = hf.causal_lm_loss(logits, sb["shift_labels"], sb["num_items_in_batch"])
    loss.backward()
    hf.sync_gradients(cp)
    full = ringattn.unshard(logits.detach(), layout=layout, seq_len=seq, cu_seqlens=sb.get("cu_seq_lens_q"))
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return {}
    rows = rows or [[0, seq]] * batch
    ref_logits = torch.cat([torch.cat([ref(input_ids=ids[i:i + 1, a:b], use_cache=False).logits
                                       for a, b in zip(r[:-1], r[1:])], 1) for i, r in enumerate(rows)])
    ref_loss = torch.nn.functional.cross_entropy(ref_logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=hf.IGNORE_INDEX)
    ref_loss.backward()
    errs = {"logits": rel_err(full, ref_logits.detach()), "loss": rel_err(loss.detach(), ref_loss.detach())}
    grads = dict(cp.named_parameters())
    worst = ("", 0.0)
    for n, p in ref.named_parameters():
        assert p.grad is not None and grads[n].grad is not None, n
        e = rel_err(grads[n].grad, p.grad)
        if not e <= worst[1]:
            worst = (n, e)
    errs["grad"] = worst[1]
    errs["worst grad"] = worst[0]
    errs["finite"] = bool(torch.isfinite(full).all())
    return errs


def check(errs: dict, tol: float = TOL) -> None:
    assert errs["finite"], errs
    assert errs["logits"] <= tol and errs["loss"] <= tol and errs["grad"] <= tol, errs


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_rwkv_exact_2_ranks(ranks, layout):
    # Odd length (the layout pads the tail), two rows, train mode.
    check(ranks.run(2, case, layout, 29, 2, True)[0])


@pytest.mark.parametrize("layout,train", [("zigzag", False), ("contiguous", True)])
def test_rwkv_exact_3_ranks(ranks, layout, train):
    # Eval mode halves the hidden states after every layer (rescale_every=1).
    check(ranks.run(3, case, layout, 31, 2, train)[0])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_rwkv_exact_4_ranks(ranks, layout):
    check(ranks.run(4, case, layout, 37, 3, False)[0])


def test_rwkv_activation_checkpointing_2_ranks(ranks):
    # Backward recomputes each block, its token shifts and WKV context-parallel again.
    check(ranks.run(2, case, "zigzag", 29, 1, True, checkpoint=True)[0])


@pytest.mark.parametrize("via", ["position_ids", "cu_seq_lens"])
def test_rwkv_packed_documents_2_ranks(ranks, via):
    # A document inside one shard, one across the ranks, one ending in the padding: each as if run alone.
    check(ranks.run(2, case, "zigzag", 29, 2, True, [0, 5, 17, 29], via=via)[0])


def test_rwkv_packed_documents_per_row_3_ranks(ranks):
    # Each row its own documents (position_ids restarting at other places): the rows' pieces differ.
    check(ranks.run(3, case, "zigzag", 29, 2, True, [[0, 5, 17, 29], [0, 9, 10, 24, 29]])[0])


def test_rwkv_packed_documents_balanced_3_ranks(ranks):
    # balanced places tokens by document; a one-token document continues nothing.
    check(ranks.run(3, case, "balanced", 30, 1, True, [0, 11, 12, 30])[0])


# float32 with keys scaled so that exp(k) overflows float32 (k up to ~300): only the stabilised state survives a
# pass between ranks. The runs differ by float32 rounding of the same values carried in different forms (the
# state's (num, den) rescaled to another maximum before it continues): relative errors of a few float32 units in
# the last place through a 3-layer model's logits, more in the gradients (sums of many such terms); 1e-4 sits two
# orders above what they show and far below an error in the state (a state lost or mis-scaled moves the logits
# by O(1)).
TOL_FLOAT32 = 1e-4


@pytest.mark.parametrize("layout", ["contiguous", "striped"])
def test_rwkv_float32_large_keys_2_ranks(ranks, layout):
    errs = ranks.run(2, case, layout, 29, 2, True, dtype=torch.float32, key_scale=30.0)[0]
    check(errs, TOL_FLOAT32)


def test_rwkv_large_keys_overflow_one_process_unstabilised():
    # The keys of the float32 case overflow exp(k) in float32: a linear (unstabilised) state would be inf.
    model = build(torch.float32)
    with torch.no_grad():
        for blk in model.rwkv.blocks:
            blk.attention.key.weight.mul_(30.0)
    keys = []
    hook = model.rwkv.blocks[0].attention.key.register_forward_hook(lambda m, a, out: keys.append(out))
    model(input_ids=torch.randint(3, VOCAB, (1, 29), generator=torch.Generator().manual_seed(1)), use_cache=False)
    hook.remove()
    assert not torch.isfinite(torch.exp(keys[0])).all()


def _prepared(layout: str = "contiguous"):
    hf.register(layout=layout)
    model = build(layers=2, attn="ring")
    hf.prepare(model)
    return model


def test_rwkv_state_refused():
    # RWKV's config defaults to use_cache=True in eval mode: the state after the sequence would be the local
    # shard's on every rank.
    model = _prepared().eval()
    with pytest.raises(hf.UnsupportedModel, match="Pass use_cache=False to train or score"):
        model(input_ids=torch.arange(3, 9)[None])


def test_rwkv_generate_with_cache_refused():
    model = _prepared().eval()
    with pytest.raises(hf.UnsupportedModel, match=r"model.generate\(\) needs RWKV's state after the prompt.*"
                       r"model.generate\(..., use_cache=False\)"):
        model.generate(input_ids=torch.arange(3, 9)[None], max_new_tokens=2, do_sample=False)


def generate_case(layout: str) -> dict:
    """model.generate(use_cache=False): every step one context-parallel forward over the whole sequence."""
    hf.register(layout=layout)
    warnings.filterwarnings("ignore")
    ref = build().eval()
    cp = build(attn="ring")
    cp.load_state_dict(ref.state_dict())
    hf.prepare(cp).eval()
    ids = torch.randint(3, VOCAB, (1, 13), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=4, do_sample=False, use_cache=False, output_scores=True, return_dict_in_generate=True,
              eos_token_id=None, pad_token_id=0)
    a, b = cp.generate(input_ids=ids, **kw), ref.generate(input_ids=ids, **kw)
    from .reference import rel_err

    return {"same": a.sequences.tolist() == b.sequences.tolist(), "new": a.sequences.shape[1] - 13,
            "scores": rel_err(torch.stack(a.scores), torch.stack(b.scores))}


def test_rwkv_generate_without_cache_2_ranks(ranks):
    r = ranks.run(2, generate_case, "zigzag")[0]
    assert r["same"] and r["new"] == 4 and r["scores"] <= 1e-12, r


def test_rwkv_prepared_mixers():
    # Every block's WKV and both of its token shifts (the channel mixing's too) run context-parallel.
    from ringattn.hf.mixers import mixes

    model = _prepared()
    found = {p: mixes(m) for p, m in model.named_modules() if p and mixes(m)}
    assert sorted(found) == sorted(f"rwkv.blocks.{i}.{part}" for i in range(2)
                                   for part in ("attention", "attention.time_shift", "feed_forward.time_shift"))
    assert found["rwkv.blocks.0.attention"] == ["RWKV WKV recurrence"]


def test_token_shift_matched_by_what_it_is():
    from ringattn.hf.mixers import module_handler

    model = build(layers=2)
    blk = model.rwkv.blocks[0]
    assert module_handler(blk.attention.time_shift).name == "token shift"
    assert module_handler(blk.feed_forward.time_shift).name == "token shift"
    assert module_handler(torch.nn.ZeroPad2d((0, 0, 2, -2))) is None
    assert module_handler(torch.nn.ZeroPad2d((1, -1, 0, 0))) is None
