"""``ringattn.Mask``: one value for the mask keywords, the same call as the flat keywords on every path
(ring, attention, decode, the cost model), a field given both ways refused; and static signatures."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import ringattn
from ringattn import Mask, comm
from ringattn.cost_model import Problem
from ringattn.decode import decode_attention

from .reference import attention_ref, dense_mask, rel_err

MASK_KEYWORDS = ("causal", "window", "cu_seqlens", "chunk_size", "slices", "mask_mod", "seq_len")


def qkv(n: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, n, 4, 8, generator=g, dtype=dtype), torch.randn(1, n, 2, 8, generator=g, dtype=dtype),
            torch.randn(1, n, 2, 6, generator=g, dtype=dtype))


def test_mask_is_the_flat_keywords():
    q, k, v = qkv(24)
    cu = torch.tensor([0, 7, 19, 22])
    flat = dict(causal=True, window=(5, 0), cu_seqlens=cu, chunk_size=8, seq_len=22)
    mask = Mask(causal=True, window=(5, 0), documents=cu, chunk_size=8, seq_len=22)
    for fn in (ringattn.ring_attention, ringattn.attention):
        a = fn(q, k, v, **flat, return_lse=True)
        b = fn(q, k, v, mask=mask, return_lse=True)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # Fields the mask leaves out combine with the flat keywords of other fields.
    a = ringattn.ring_attention(q, k, v, causal=True, window=(5, 0))
    assert torch.equal(a, ringattn.ring_attention(q, k, v, mask=Mask(causal=True), window=(5, 0)))


def test_mask_and_flat_keyword_for_one_field_is_an_error():
    q, k, v = qkv(8)
    with pytest.raises(ValueError, match=r"window is given twice, as mask=Mask\(window=...\) and as the keyword"):
        ringattn.ring_attention(q, k, v, mask=Mask(window=(2, 0)), window=(3, 0))
    with pytest.raises(ValueError, match=r"cu_seqlens is given twice, as mask=Mask\(documents=...\)"):
        ringattn.attention(q, k, v, mask=Mask(documents=torch.tensor([0, 8])), cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="causal is given twice"):
        ringattn.ring_attention(q, k, v, mask=Mask(causal=True), causal=True)
    with pytest.raises(TypeError, match="mask must be a ringattn.Mask"):
        ringattn.ring_attention(q, k, v, mask={"causal": True})


def _mask_on_two_ranks():
    n = 26
    q, k, v = qkv(n, seed=3)
    cu = torch.tensor([0, 9, 17, 24])
    mask = Mask(causal=True, window=(6, -1), documents=cu, seq_len=24)
    keep = dense_mask(n, causal=True, window=(6, -1), seq_len=24, cu_seqlens=cu)
    ref, ref_lse = attention_ref(q, k, v, keep)
    out = {}
    for layout in ("contiguous", "zigzag", "balanced"):
        qs, ks, vs = (ringattn.shard(t, layout=layout, cu_seqlens=cu) for t in (q, k, v))
        got = ringattn.ring_attention(qs, ks, vs, mask=mask)
        out[layout] = rel_err(ringattn.unshard(got)[:, :24], ref[:, :24])
    return comm.group_rank_world()[0], out


def test_mask_float64_on_two_ranks_matches_the_reference(ranks):
    for rank, errs in ranks.run(2, _mask_on_two_ranks):
        assert all(e < 1e-12 for e in errs.values()), (rank, errs)


def test_decode_takes_a_mask_and_softmax_scale():
    q, k, v = qkv(12, seed=5)
    qd, pos = q[:, -2:], torch.arange(12)
    flat = decode_attention(qd, k, v, pos[-2:], pos, window=(4, 0), softmax_scale=0.3)
    assert torch.equal(flat, decode_attention(qd, k, v, pos[-2:], pos, mask=Mask(causal=True, window=(4, 0)),
                                              softmax_scale=0.3))
    # The mask says what it says: without causal=True it is not causal.
    both = decode_attention(qd, k, v, pos[-2:], pos, causal=False, window=(4, 4), softmax_scale=0.3)
    assert torch.equal(both, decode_attention(qd, k, v, pos[-2:], pos, mask=Mask(window=(4, 4)), softmax_scale=0.3))
    with pytest.warns(DeprecationWarning, match="softmax_scale"):
        old = decode_attention(qd, k, v, pos[-2:], pos, window=(4, 0), scale=0.3)
    assert torch.equal(old, flat)
    with pytest.raises(ValueError, match="window is given twice"):
        decode_attention(qd, k, v, pos[-2:], pos, mask=Mask(window=(4, 0)), window=(4, 0))
    with pytest.raises(ValueError, match="no padding"):
        decode_attention(qd, k, v, pos[-2:], pos, mask=Mask(seq_len=12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_attention(qd, k, v, pos[-2:], pos, softmax_scale=0.3)


def test_problem_takes_a_mask():
    kw = dict(seq_len=4096, world=4, heads=8, kv_heads=2)
    cu = (0, 1000, 3000, 4096)
    flat = Problem(**kw, causal=True, window=(256, 0), documents=cu, chunk_size=512)
    one = Problem(**kw, mask=Mask(causal=True, window=(256, 0), documents=torch.tensor(cu), chunk_size=512))
    assert one == flat and one.spec() == flat.spec()
    assert Problem(**kw, mask=Mask(window=(8, 8))).causal is False
    with pytest.raises(ValueError, match="window is given twice"):
        Problem(**kw, window=(4, 0), mask=Mask(window=(4, 0)))
    # causal=True beside a mask stands, as it does at the call
    assert Problem(**kw, causal=True, mask=Mask(window=(8, 0))).causal is True
    assert Problem(**kw).causal is True


def test_auto_plans_calls_of_one_shape_with_other_masks_apart():
    from ringattn.cost_model import hardware
    from ringattn.masks import MaskSpec
    from ringattn.strategies.auto import estimate_all

    kw = dict(seq_len=4096, world=4, heads=8, kv_heads=8)
    plain = Problem(**kw, mask=MaskSpec(seq_len=4096, causal=True))
    docs = Problem(**kw, mask=MaskSpec(seq_len=4096, causal=True, doc_bounds=tuple(range(0, 4097, 32))))
    assert plain != docs
    hw = hardware("cpu")
    assert estimate_all(plain, hw) != estimate_all(docs, hw)  # not one cached answer for both


@pytest.mark.parametrize("fn", [ringattn.ring_attention, ringattn.attention, decode_attention])
def test_signatures_are_static_and_list_the_keywords(fn):
    assert "__signature__" not in vars(fn)
    params = inspect.signature(fn).parameters
    assert "mask" in params and all(params[p].kind is inspect.Parameter.KEYWORD_ONLY for p in params
                                    if p not in ("q", "k", "v", "q_pos", "k_pos"))
    names = set(MASK_KEYWORDS) - ({"seq_len"} if fn is decode_attention else set())
    assert names <= set(params)
    if fn is not decode_attention:
        from ringattn.callspec import Options

        assert {f for f in Options.__dataclass_fields__} <= set(params)
        assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
