"""Sharded KV-cache decoding: the decode-attention merge against the float64 dense reference, and
generation on 1, 2 and 4 ranks against single-process decoding that recomputes the whole sequence."""

from __future__ import annotations

import json

import pytest
import torch

from ringattn import comm
from ringattn.app.generate import SamplingConfig, generate, sample
from ringattn.app.model import LlamaConfig, build
from ringattn.decode import decode_attention
from ringattn.masks import takes_four

from .reference import TOL, attention_ref, rel_err, slices_mask
from .test_mask_mods import checker, per_row_head

# -- the decode-attention primitive -------------------------------------------------------------


def decode_case(n: int, t: int, window, seed: int = 0, docs: list[int] | None = None, mods: bool = False,
                masks: dict | None = None) -> dict:
    """Every rank holds a random subset of a cache of n positions (some slots empty); t new queries."""
    rank, world = comm.group_rank_world()
    g = torch.Generator().manual_seed(seed)
    b, h, kvh, d, dv = 1 if docs is not None else 2, 4, 2, 8, 6
    k = torch.randn(b, n, kvh, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, n, kvh, dv, generator=g, dtype=torch.float64)
    q = torch.randn(b, t, h, d, generator=g, dtype=torch.float64) * 2
    q_pos = torch.arange(n - t, n)
    # mods: sinks, softcap, chunks and ALiBi all at once (drawn before the per-rank draws).
    kw = dict(softcap=3.0, sinks=torch.randn(h, generator=g, dtype=torch.float64), chunk_size=8,
              alibi_slopes=torch.rand(h, generator=g, dtype=torch.float64)) if mods else {}
    owner = torch.randint(0, world, (n,), generator=g)  # uneven, arbitrary ownership
    mine = (owner == rank).nonzero().flatten()
    # Local slice in shuffled order, plus two empty slots that must be ignored.
    mine = mine[torch.randperm(len(mine), generator=g)]
    kp = torch.cat([mine, torch.tensor([-1, -1])])
    kl = torch.cat([k[:, mine], torch.randn(b, 2, kvh, d, dtype=torch.float64)], 1)
    vl = torch.cat([v[:, mine], torch.randn(b, 2, kvh, dv, dtype=torch.float64)], 1)
    cu = None if docs is None else torch.tensor(docs)
    masks = masks or {}
    out, lse = decode_attention(q, kl, vl, q_pos, kp, group=None, window=window, cu_seqlens=cu, return_lse=True,
                                **kw, **masks)

    i, j = q_pos[:, None], torch.arange(n)[None, :]
    keep = j <= i
    if window is not None:
        keep &= j >= i - window[0]
    if docs is not None:  # positions past the last boundary continue the last document
        bounds = torch.tensor(docs[:-1])
        keep &= torch.bucketize(i, bounds, right=True) == torch.bucketize(j, bounds, right=True)
    if mods:
        keep &= (i // kw.pop("chunk_size")) == (j // 8)
    if "slices" in masks:
        keep = keep & slices_mask(n, masks["slices"])[n - t:]
    fn = masks.get("mask_mod")
    if fn is not None:  # (batch, heads, t, n) for the 4-argument form
        keep = keep & (fn(torch.arange(b)[:, None, None, None], torch.arange(h)[None, :, None, None], i, j)
                       if takes_four(fn) else fn(i, j))
    r_out, r_lse = attention_ref(q, k, v, keep, **kw)
    return {"out": rel_err(out, r_out), "lse": rel_err(lse, r_lse.transpose(1, 2))}


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("window", [None, (5, 0)])
def test_decode_attention_exact(ranks, world, window):
    for errs in ranks.run(world, decode_case, 23, 3, window):
        assert errs["out"] <= TOL[torch.float64] and errs["lse"] <= TOL[torch.float64], errs


@pytest.mark.parametrize("world", [1, 2])
def test_decode_attention_packed_documents(ranks, world):
    """Each new query sees only the cached keys of its own document (the shared mask predicate)."""
    for errs in ranks.run(world, decode_case, 23, 3, None, 1, [0, 6, 15, 21]):
        assert errs["out"] <= TOL[torch.float64] and errs["lse"] <= TOL[torch.float64], errs


@pytest.mark.parametrize("world", [1, 3])
def test_decode_attention_score_mods(ranks, world):
    """Sinks, softcap, chunked attention and ALiBi merge across ranks as in ring_attention."""
    for errs in ranks.run(world, decode_case, 23, 3, None, 2, None, True):
        assert errs["out"] <= TOL[torch.float64] and errs["lse"] <= TOL[torch.float64], errs


@pytest.mark.parametrize("world", [1, 2])
def test_decode_attention_user_masks(ranks, world):
    """mask_mod (2 and 4 arguments) and slices on the cache, with and without score modifications."""
    for masks, mods in ((dict(mask_mod=checker), False), (dict(mask_mod=per_row_head), True),
                        (dict(slices=[((0, 23), (0, 9), "full"), ((20, 23), (15, 23), "causal")]), False)):
        for errs in ranks.run(world, decode_case, 23, 3, None, 4, None, mods, masks):
            assert errs["out"] <= TOL[torch.float64] and errs["lse"] <= TOL[torch.float64], (masks, errs)


def test_decode_attention_single_process():
    errs = decode_case(17, 1, None, seed=3)
    assert errs["out"] <= TOL[torch.float64] and errs["lse"] <= TOL[torch.float64], errs


# -- generation ----------------------------------------------------------------------------------


def tiny(layout: str = "contiguous"):
    cfg = LlamaConfig(vocab_size=53, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                      layout=layout, init_std=0.3)
    return build(cfg, seed=1, dtype=torch.float64)


def prompt(batch: int = 2, length: int = 21, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 53, (batch, length), generator=torch.Generator().manual_seed(seed))


def dense_causal(q, k, v):
    """Independent single-process attention (float64, materialised causal softmax)."""
    s = q.shape[1]
    keep = torch.ones(s, s, dtype=torch.bool).tril()
    return attention_ref(q, k, v, keep)[0].to(q.dtype)


def reference_generate(model, tokens: torch.Tensor, n_new: int, sampling: SamplingConfig):
    """Decoding without any cache: the whole sequence is recomputed for every new token."""
    gen = torch.Generator().manual_seed(sampling.seed)
    seq, all_logits = tokens, []
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(seq, positions=torch.arange(seq.shape[1]), attend=dense_causal)[:, -1]
            all_logits.append(logits)
            seq = torch.cat([seq, sample(logits, sampling, gen)[:, None]], 1)
    return seq[:, tokens.shape[1]:], torch.stack(all_logits, 1)


def generate_case(layout: str, n_new: int, sampling: SamplingConfig, plen: int = 21) -> dict:
    model = tiny(layout)
    p = prompt(length=plen)
    res = generate(model, p, n_new, sampling=sampling, return_logits=True)
    ref_tokens, ref_logits = reference_generate(model, p, n_new, sampling)
    return {"tokens": res.tokens.tolist(), "ref_tokens": ref_tokens.tolist(),
            "logits": rel_err(res.logits, ref_logits), "cache_slots": res.cache_slots,
            "bytes_per_token": res.bytes_per_token, "tokens_per_s": res.tokens_per_s}


def check_generation(results: list[dict], world: int, plen: int, n_new: int) -> None:
    for r in results:
        assert r["tokens"] == r["ref_tokens"]
        assert r["logits"] <= TOL[torch.float64], r["logits"]
        assert r["tokens"] == results[0]["tokens"]  # every rank generated the same tokens
        assert r["tokens_per_s"] > 0
    if world > 1:
        # Balanced and sharded: no rank holds more than its share (+ padding and one extra slot).
        total = plen + n_new - 1
        slots = [r["cache_slots"] for r in results]
        assert max(slots) <= -(-plen // (2 * world)) * 2 + -(-(n_new - 1) // world) + 1, slots
        assert max(slots) < total
        # Per-token traffic: one (out, lse) per layer, batch and head: 2 * 2 * 4 * (8 + 1) float64.
        assert all(r["bytes_per_token"] == 2 * 2 * 4 * 9 * 8 for r in results)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("world", [2, 4])
def test_greedy_generation_matches_single_process(ranks, world, layout):
    results = ranks.run(world, generate_case, layout, 7, SamplingConfig())
    check_generation(results, world, 21, 7)


def test_greedy_generation_one_process():
    results = [generate_case("zigzag", 7, SamplingConfig())]
    check_generation(results, 1, 21, 7)


SAMPLED = SamplingConfig(temperature=0.9, top_k=20, top_p=0.9, seed=11)


def test_sampled_generation_matches_single_process(ranks):
    results = ranks.run(2, generate_case, "zigzag", 9, SAMPLED, 16)
    check_generation(results, 2, 16, 9)
    single = generate_case("zigzag", 9, SAMPLED, 16)
    assert single["tokens"] == results[0]["tokens"]


def test_sample_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingConfig(), g).unique().tolist() == [1]
    assert sample(logits, SamplingConfig(temperature=1.0, top_k=1), g).unique().tolist() == [1]
    assert set(sample(logits, SamplingConfig(temperature=1.0, top_k=2), g).tolist()) == {1, 3}
    # top_p: p(1) ~ 0.53, p(3) ~ 0.32 -> 0.8 needs both, 0.5 only the first.
    assert set(sample(logits, SamplingConfig(temperature=1.0, top_p=0.8), g).tolist()) == {1, 3}
    assert set(sample(logits, SamplingConfig(temperature=1.0, top_p=0.5), g).tolist()) == {1}
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)


def bad_prompt_case() -> str:
    rank, _ = comm.group_rank_world()
    p = prompt(length=8)
    if rank == 1:
        p = p.float()  # only one rank is wrong: every rank must raise, nobody hangs
    try:
        generate(tiny(), p, 3)
    except ValueError as e:
        return str(e)
    return "no error"


def test_bad_prompt_rejected_on_every_rank(ranks):
    msgs = ranks.run(2, bad_prompt_case)
    assert all("prompt" in m for m in msgs), msgs


def test_cli_generate(tmp_path, capsys):
    from ringattn.cli import main

    out = tmp_path / "gen.json"
    code = main(["generate", "--nproc", "2", "--prompt-len", "40", "--max-new-tokens", "4", "--dim", "32",
                 "--layers", "1", "--check", "--json", "--json-out", str(out)])
    assert code == 0
    s = json.loads(out.read_text())
    assert s["check_same_tokens"] and len(s["tokens"][0]) == 4 and s["decode_tokens_per_s"] > 0
    assert json.loads(capsys.readouterr().out) == s  # --json: the same summary on stdout


def test_cli_generate_json_takes_no_path(capsys):
    from ringattn.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--json", "out.json"])
    assert e.value.code == 2 and "--json-out PATH" in capsys.readouterr().err


def bad_decode_case() -> str:
    rank, _ = comm.group_rank_world()
    q = torch.randn(1, 1, 4, 8)
    k = torch.randn(1, 5, 2, 8)
    kp = torch.arange(5) if rank == 0 else torch.arange(4)  # rank 1: wrong number of positions
    try:
        decode_attention(q, k, k, torch.tensor([5]), kp)
    except ValueError as e:
        return str(e)
    return "no error"


def test_decode_attention_bad_input_rejected_on_every_rank(ranks):
    msgs = ranks.run(2, bad_decode_case)
    assert "k_pos" in msgs[1] and "another rank" in msgs[0], msgs
