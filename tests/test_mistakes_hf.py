"""A new user's mistakes with the Hugging Face integration end in a clear error on every rank, never a number:
a "ring" model not passed to ``ringattn.hf.prepare`` whose attention is its own code, ``shard_batch`` and
``register`` given different layouts. ``generate`` and ``audit`` say nothing once per rank."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch

import ringattn

transformers = pytest.importorskip("transformers")

from ringattn import hf  # noqa: E402
from ringattn.hf.prepared import first_forward  # noqa: E402

from .reference import rel_err  # noqa: E402
from .test_hf import tiny_model  # noqa: E402


def tiny_bloom(attn: str | None = None):
    cfg = transformers.BloomConfig(vocab_size=61, hidden_size=32, n_layer=2, n_head=4, attention_dropout=0.0,
                                   hidden_dropout=0.0)
    torch.manual_seed(0)
    return transformers.BloomForCausalLM._from_config(cfg, attn_implementation=attn).double().eval()


def unprepared_bloom_case() -> dict:
    # Bloom computes its own attention (alibi from the local key count) and never calls the ring: run unprepared
    # on 2 ranks its logits came out 6.7e-3 off the one-process model, without a word.
    hf.register(layout="zigzag")
    model = tiny_bloom("ring")
    ids = torch.randint(0, 61, (1, 32), generator=torch.Generator().manual_seed(1))
    sb = hf.shard_batch(ids, layout="zigzag")
    out = {}
    try:
        model(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False)
        out["forward"] = "ran"
    except hf.UnsupportedModel as e:
        out["forward"] = str(e)
    try:
        model(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False)
        out["again"] = "ran"
    except hf.UnsupportedModel as e:
        out["again"] = str(e)
    try:
        hf.prepare(model)
        out["prepare"] = "ran"
    except hf.UnsupportedModel as e:
        out["prepare"] = str(e)
    return out


def test_unprepared_model_off_the_interface_refused_on_every_rank(ranks):
    for r in ranks.run(2, unprepared_bloom_case):
        for key in ("forward", "again"):
            assert r[key].startswith("BloomForCausalLM runs with attn_implementation='ring' without "
                                     "ringattn.hf.prepare(model)"), r
            assert "not supporting custom attention backends" in r[key], r
        assert "not supporting custom attention backends" in r["prepare"], r


def first_forward_hooked(module) -> bool:
    return "_ringattn_first_forward" in module.__dict__ or first_forward in module._forward_pre_hooks.values()


def unprepared_llama_case(via: str) -> dict:
    hf.register(layout="zigzag")
    ref = tiny_model("llama").eval()
    if via == "set_attn_implementation":
        cp = copy.deepcopy(ref)
        cp.set_attn_implementation("ring")
    else:
        cp = type(ref)._from_config(copy.deepcopy(ref.config), attn_implementation="ring").double().eval()
        cp.load_state_dict(ref.state_dict())
    hooked = [type(m).__name__ for m in cp.modules() if "_ringattn_first_forward" in m.__dict__]
    ids = torch.randint(0, 61, (1, 30), generator=torch.Generator().manual_seed(1))
    sb = hf.shard_batch(ids, layout="zigzag")
    errs = []
    for _ in range(2):
        logits = cp(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False).logits
        got = ringattn.unshard(logits.detach(), layout="zigzag", seq_len=30)
        errs.append(rel_err(got, ref(input_ids=ids).logits.detach()))
    left = [type(m).__name__ for m in cp.modules() if first_forward_hooked(m)]
    return {"hooked": hooked, "errs": errs, "left": left}


@pytest.mark.parametrize("via", ["set_attn_implementation", "from_config"])
def test_unprepared_model_on_the_interface_runs_as_before(ranks, via):
    for r in ranks.run(2, unprepared_llama_case, via):
        assert r["hooked"], r  # checked at its first forward...
        assert max(r["errs"]) <= 1e-9, r  # ... exact, as prepared ...
        assert r["left"] == [], r  # ... and the check leaves no hook behind


def test_unprepared_model_copied_and_prepared_later():
    hf.register(layout="zigzag")
    model = tiny_bloom("ring")
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 61, (1, 8))
    for m in (model, twin):
        with pytest.raises(hf.UnsupportedModel, match="without ringattn.hf.prepare"):
            m(input_ids=ids, use_cache=False)
    llama = tiny_model("llama")
    llama.set_attn_implementation("ring")
    hf.prepare(llama)
    llama(input_ids=ids, use_cache=False)  # one rank: prepared, not asked again
    assert not any(first_forward_hooked(m) for m in llama.modules())


def generate_logs_case() -> dict:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    root = transformers.utils.logging.get_logger()
    root.addHandler(handler)
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hf.register(layout="zigzag")
            model = hf.prepare(tiny_model("qwen2"))
            model.set_attn_implementation("ring")
            ids = torch.randint(1, 61, (2, 9), generator=torch.Generator().manual_seed(0))
            mask = torch.ones_like(ids)
            mask[1, :3] = 0
            for kw in (dict(do_sample=False), dict(num_beams=2), dict(use_cache=False)):
                with torch.no_grad():
                    model.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0, **kw)
    finally:
        root.removeHandler(handler)
    return {"logged": buf.getvalue(), "warned": [str(w.message) for w in caught]}


def test_generate_logs_no_deprecation_on_any_rank(ranks):
    # The generation hooks asked the decoder's output for "past_key_values", which transformers 5 answers with a
    # deprecation warning: once per rank.
    for r in ranks.run(2, generate_logs_case):
        assert "deprecated" not in r["logged"], r
        assert not [w for w in r["warned"] if "deprecated" in w], r


def config_set_by_hand_case() -> str:
    # Switched by hand, past transformers' set_attn_implementation: the model asking the mask interface is checked.
    hf.register(layout="zigzag")
    model = tiny_bloom()
    model.config._attn_implementation = "ring"
    sb = hf.shard_batch(torch.randint(0, 61, (1, 32), generator=torch.Generator().manual_seed(1)), layout="zigzag")
    try:
        model(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False)
        return "ran"
    except hf.UnsupportedModel as e:
        return str(e)


def test_config_set_by_hand_checked_on_every_rank(ranks):
    for msg in ranks.run(2, config_set_by_hand_case):
        assert msg.startswith("BloomModel runs with attn_implementation='ring' without ringattn.hf.prepare(model)"), msg


def layouts_case(registered: str, sharded: str, moved: bool = False, n: int = 32, packed: bool = False) -> str:
    hf.register(layout=registered)
    model = tiny_model("llama")
    model.set_attn_implementation("ring")
    pos = torch.cat([torch.arange(9), torch.arange(n - 9)])[None] if packed else None
    sb = hf.shard_batch(torch.randint(0, 61, (1, n), generator=torch.Generator().manual_seed(1)), layout=sharded,
                        position_ids=pos)
    try:
        # moved: new tensors (as .to(device) makes), which shard_batch never saw
        model(input_ids=sb["input_ids"], position_ids=sb["position_ids"].clone() if moved else sb["position_ids"],
              use_cache=False)
        return "ran"
    except ValueError as e:
        return str(e)


@pytest.mark.parametrize("registered,sharded", [("zigzag", "contiguous"), ("contiguous", "striped")])
def test_shard_batch_and_register_layouts_differ_refused_on_every_rank(ranks, registered, sharded):
    # Llama's logits came out 0.75 (zigzag registered, contiguous sharded) and 0.40 off, without a word.
    for msg in ranks.run(2, layouts_case, registered, sharded):
        assert msg.startswith(f"the batch was sharded by ringattn.hf.shard_batch with layout={sharded!r} over 2 "
                              f"ranks, but the ring attention was registered with layout={registered!r}"), msg
        assert "pass the same layout and group" in msg, msg
    for msg in ranks.run(2, layouts_case, registered, sharded, True):
        assert msg.startswith(f"ring attention was registered with layout={registered!r}, but the position_ids look "
                              f"sharded with layout={sharded!r}"), msg


def test_packed_documents_in_the_registered_layout_still_run(ranks):
    # Read back the registered way, packed documents restart: not mistaken for another layout's shards.
    for layout in ("zigzag", "striped", "contiguous"):
        assert ranks.run(2, layouts_case, layout, layout, True, 29, True) == ["ran", "ran"], layout


def test_shard_batch_layout_on_one_rank_is_any_layout():
    # On one rank every layout places the tokens alike: nothing to refuse.
    assert layouts_case("zigzag", "contiguous") == "ran"


def audit_logs_case(model: str) -> dict:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    root = transformers.utils.logging.get_logger()
    root.addHandler(handler)
    try:
        report = hf.audit(model, seq_len=24, compare_refused=True)
    finally:
        root.removeHandler(handler)
    return {"rank": ringattn.comm.group_rank_world(None)[0], "logged": buf.getvalue(), "ok": report.ok}


@pytest.mark.parametrize("model,ok", [("bloom", False), ("falcon_h1", True), ("gpt2", True)])
def test_audit_says_transformers_warnings_once(ranks, model, ok):
    # Every rank logged "BloomForCausalLM does not support setting its attention implementation dynamically"
    # (audit asked anyway), FalconH1's slow-kernel fallbacks, and GPT-2's special tokens past the tiny
    # vocabulary, each the same text on every rank.
    results = ranks.run(2, audit_logs_case, model)
    assert all(r["ok"] == ok for r in results)
    assert "does not support setting its attention implementation" not in results[0]["logged"], results
    assert "vocabulary" not in results[0]["logged"], results
    assert [r["logged"] for r in results if r["rank"] != 0] == [""], results


def pooled_head_case() -> dict:
    # LlamaForSequenceClassification pools each row's last real token: rank 0 took its own shard's last one, and
    # its logits came out 0.17 off; rank 1 (which holds the last token) was right.
    hf.register(layout="contiguous")
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    model = transformers.LlamaForSequenceClassification._from_config(cfg, attn_implementation="ring")
    sb = hf.shard_batch(torch.randint(1, 61, (1, 32), generator=torch.Generator().manual_seed(1)))
    out = {}
    for name, call in (("forward", lambda: model(input_ids=sb["input_ids"], position_ids=sb["position_ids"])),
                       ("prepare", lambda: hf.prepare(model))):
        try:
            call()
            out[name] = "ran"
        except hf.UnsupportedModel as e:
            out[name] = str(e)
    return out


def test_pooling_head_refused_on_every_rank(ranks):
    for r in ranks.run(2, pooled_head_case):
        assert r["forward"].startswith("LlamaForSequenceClassification runs with attn_implementation='ring' without "
                                       "ringattn.hf.prepare(model)"), r
        for msg in r.values():
            assert "LlamaForSequenceClassification pools one position of each row" in msg, r


def ring_forgotten_case() -> dict:
    # Prepared, sharded, but still sdpa: every rank attended within its own shard, no word.
    hf.register(layout="zigzag")
    model = hf.prepare(tiny_model("llama"))
    sb = hf.shard_batch(torch.randint(0, 61, (1, 32), generator=torch.Generator().manual_seed(1)), layout="zigzag")
    out = {}
    for name in ("sdpa", "ring"):
        model.set_attn_implementation(name)
        try:
            model(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False)
            out[name] = "ran"
        except ValueError as e:
            out[name] = str(e)
    try:
        model.set_attn_implementation("sdpa")
        model(sb["input_ids"], use_cache=False)
        out["positional"] = "ran"
    except ValueError as e:
        out["positional"] = str(e)
    return out


def test_sharded_batch_without_ring_refused_on_every_rank(ranks):
    for r in ranks.run(2, ring_forgotten_case):
        assert r["ring"] == "ran", r
        for key in ("sdpa", "positional"):
            assert r[key].startswith("LlamaForCausalLM was given this rank's shard of a batch (ringattn.hf.shard_batch "
                                     "over 2 ranks) but runs with attn_implementation='sdpa'"), r


def batch_per_rank_case(what: str) -> str:
    # A data loader sharded over the context-parallel ranks: each rank sharded its own batch, the ring took the
    # shards for one sequence, and the loss came out as a number.
    hf.register(layout="zigzag")
    rank = ringattn.comm.group_rank_world(None)[0]
    ids = torch.randint(0, 61, (2, 32), generator=torch.Generator().manual_seed(1))
    labels, pos = None, None
    if what == "input_ids":
        ids = torch.randint(0, 61, (2, 32), generator=torch.Generator().manual_seed(rank))
    elif what == "length":
        ids = ids[:, :32 - rank]
    elif what == "labels":
        labels = ids.clone()
        labels[0, 3 + rank] = hf.IGNORE_INDEX
    elif what == "position_ids":
        pos = torch.arange(32)[None] + rank
    try:
        hf.shard_batch(ids, labels, layout="zigzag", position_ids=pos)
        return "ran"
    except ValueError as e:
        return str(e)


@pytest.mark.parametrize("what", ["input_ids", "length", "labels", "position_ids", "same"])
def test_a_different_batch_on_each_rank_refused_on_every_rank(ranks, what):
    for msg in ranks.run(2, batch_per_rank_case, what):
        if what == "same":
            assert msg == "ran"
        else:
            assert msg.startswith("ringattn.hf.shard_batch got a different batch on each rank of the group"), msg


def test_a_shared_layer_is_not_named_layer_minus_one():
    """Zamba2's attention block, shared by several layers, carries layer_idx=-1: messages name no layer for it
    rather than "layer -1" (and its layer type is not read from the end of layer_types)."""
    from ringattn.hf.refusals import layer_index, where

    class Shared(torch.nn.Module):
        layer_idx = -1

    class Own(torch.nn.Module):
        layer_idx = 3

    assert layer_index(Shared()) is None and where(Shared()) == "model: Shared"
    assert layer_index(Own()) == 3 and where(Own()) == "model: layer 3 (Own)"
