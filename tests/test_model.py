"""The BPT model: sharded forward/backward and loss equal the single-process ones (float64)."""

import dataclasses

import pytest
import torch

import ringattn
from ringattn.app.model import LlamaConfig, build
from ringattn.app.model.loss import IGNORE_INDEX, count_labels, loss_sum, shard_batch, sharded_labels, shift_labels

from .reference import TOL, rel_err

# The model packs no documents, so it refuses the balanced layout (tests/test_balanced.py).
MODEL_LAYOUTS = [lay for lay in ringattn.LAYOUTS if lay != "balanced"]

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_chunk=8)
SEQ = 37  # not a multiple of 2W: the tail is padding on every layout


def _tokens(seq=SEQ, batch=2):
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (batch, seq), generator=g)


def _single(cfg, tokens):
    """Full-sequence loss and parameter gradients in one process."""
    model = build(cfg, seed=3, dtype=torch.float64)
    labels = shift_labels(tokens)
    n = int((labels != IGNORE_INDEX).sum())
    loss = loss_sum(model.logits, model.hidden(tokens), labels) / n
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters()}


def _sharded(cfg_dict, tokens):
    """On every rank: its loss share and parameter gradients (to be summed over ranks)."""
    torch.distributed.barrier()
    cfg = LlamaConfig(**cfg_dict)
    model = build(cfg, seed=3, dtype=torch.float64)
    inputs, labels, s = shard_batch(tokens, shift_labels(tokens), layout=cfg.layout)
    n = count_labels(labels)
    logits = model(inputs, seq_len=s)
    loss = loss_sum(lambda h: h, logits, labels) / n
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", MODEL_LAYOUTS)
def test_sharded_forward_backward_matches_single(ranks, world, layout):
    cfg = dataclasses.replace(CFG, layout=layout)
    tokens = _tokens()
    ref_loss, ref_grads = _single(cfg, tokens)
    results = ranks.run(world, _sharded, dataclasses.asdict(cfg), tokens)
    loss = sum(r[0] for r in results)
    assert abs(loss - ref_loss) <= TOL[torch.float64] * abs(ref_loss)
    for name, ref in ref_grads.items():
        got = sum(r[1][name] for r in results)
        assert rel_err(got, ref) <= TOL[torch.float64], name


def test_blockwise_ffn_and_layer_checkpointing_are_exact():
    tokens = _tokens(seq=40)
    plain = dataclasses.replace(CFG, ffn_chunk=0)
    ref_loss, ref_grads = _single(plain, tokens)
    for cfg in (dataclasses.replace(CFG, ffn_chunk=8), dataclasses.replace(CFG, ffn_chunk=7),
                dataclasses.replace(CFG, checkpoint_layers=True), dataclasses.replace(CFG, strategy="dense")):
        loss, grads = _single(cfg, tokens)
        assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss), cfg
        for name, ref in ref_grads.items():
            assert rel_err(grads[name], ref) <= 1e-12, (cfg, name)


def test_blockwise_loss_is_exact():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).double()
    h = torch.randn(2, 30, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 30))
    labels[0, 3] = IGNORE_INDEX
    ref = loss_sum(head, h, labels)
    (gh_ref,) = torch.autograd.grad(ref, h)
    got = loss_sum(head, h, labels, chunk=7)
    (gh,) = torch.autograd.grad(got, h)
    assert rel_err(got.detach(), ref.detach()) <= 1e-13 and rel_err(gh, gh_ref) <= 1e-13


def _labels_worker(tokens, layout):
    inputs, labels, s = shard_batch(tokens, shift_labels(tokens), layout=layout)
    return torch.equal(sharded_labels(inputs, layout=layout, seq_len=s), labels)


@pytest.mark.parametrize("layout", MODEL_LAYOUTS)
def test_sharded_labels_shift_across_ranks(ranks, layout):
    assert all(ranks.run(4, _labels_worker, _tokens(), layout))


def test_rotary_uses_global_positions():
    """A shard fed with its global positions gives the same q/k as the full sequence at those positions."""
    model = build(CFG, dtype=torch.float64)
    x = torch.randn(1, 12, CFG.dim, dtype=torch.float64)
    attn = model.layers[0].attn
    q_full, k_full, _ = attn.qkv(x, model.rope(torch.arange(12), x.dtype))
    pos = ringattn.global_positions("zigzag", 1, 2, 6)  # 3, 4, 5, 6, 7, 8
    q, k, _ = attn.qkv(x[:, pos], model.rope(pos, x.dtype))
    assert torch.allclose(q, q_full[:, pos], rtol=0, atol=1e-14)
    assert torch.allclose(k, k_full[:, pos], rtol=0, atol=1e-14)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="ffn_chunk"):
        LlamaConfig(ffn_chunk=-1)
    with pytest.raises(ValueError, match="dim"):
        LlamaConfig(dim=0)
    with pytest.raises(ValueError, match="backward_exchange"):
        LlamaConfig(backward_exchange="neighbours")
    with pytest.raises(ValueError, match="backward_exchange='direct' is a ring setting"):
        LlamaConfig(strategy="allgather", backward_exchange="direct")
    with pytest.raises(ValueError, match="layout='balanced' places tokens by packed documents"):
        LlamaConfig(layout="balanced")
