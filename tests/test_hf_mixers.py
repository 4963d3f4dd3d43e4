"""Hybrid models (Mamba2, short convolutions, ...) context-parallel through ringattn.hf.prepare: logits and every
parameter gradient equal to the same model in one process, on 2 and 4 ranks, every layout, odd lengths, packed
documents."""

from __future__ import annotations

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


def packed_case(families: tuple[str, ...], layout: str, packed: list[int], via: str) -> dict:
    """Packed documents against each document run alone in one process (every document from a zero state, as
    the fused kernels and ringattn run them; transformers' pure-torch scans in one process carry the state across
    documents). ``via``: "position_ids" (restarts) or "cu_seq_lens" (the model is given cu_seq_lens_q)."""
    import torch

    import ringattn

    from .reference import rel_err
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
        grads = dict(cp.named_parameters())
        for n, p in ref.named_parameters():
            if p.grad is not None:
                errs[f"grad {n}"] = rel_err(grads[n].grad, p.grad)
        out[fam] = max(errs.items(), key=lambda kv: kv[1])
    return out


# transformers' Mamba2 scan computes in float32 inside (its own noise floor, as the sweep's TOL_FLOAT32_INSIDE).
PACKED_TOL = 1e-5


@pytest.mark.parametrize("via", ["position_ids", "cu_seq_lens"])
def test_hybrids_packed_documents_2_ranks(ranks, via):
    # Odd boundaries: a document inside one rank's shard, one across the ranks, one ending in the padding.
    r = ranks.run(2, packed_case, FAMILIES, "zigzag", [0, 5, 17, 30], via)[0]
    bad = {k: v for k, v in r.items() if not v[1] <= PACKED_TOL}
    assert not bad, r


def test_hybrids_packed_documents_balanced_3_ranks(ranks):
    r = ranks.run(3, packed_case, FAMILIES, "balanced", [0, 11, 12, 30], "cu_seq_lens")[0]
    bad = {k: v for k, v in r.items() if not v[1] <= PACKED_TOL}
    assert not bad, r
