"""FSDP2 over dp x ring attention over cp (2 x 2 on 4 ranks), against one process in float64, and a
checkpoint written on that mesh resumed on another (2 ranks, dp 1 x cp 2) through DCP's resharding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ringattn import comm, hf
from ringattn.app.model import LlamaConfig, build
from ringattn.app.model.loss import IGNORE_INDEX, loss_sum, shard_batch, shift_labels
from ringattn.training import checkpoint, fsdp

from .cases import raised
from .reference import TOL, rel_err

CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, layout="zigzag")
SEQ, BATCH, LR = 23, 4, 1e-2  # 23 tokens: padding on every mesh


def _tokens(step: int) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))


def _identity(x):
    return x


def _reference(steps: int) -> list[tuple[float, dict]]:
    """(loss, parameters after the step) of each step in one process."""
    model = build(CFG, seed=0, dtype=torch.float64)
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    out = []
    for step in range(steps):
        tokens = _tokens(step)
        labels = shift_labels(tokens)[:, :SEQ]
        loss = loss_sum(_identity, model(tokens[:, :SEQ]), labels) / (labels != IGNORE_INDEX).sum()
        optim.zero_grad()
        loss.backward()
        optim.step()
        out.append((float(loss.detach()), {k: p.detach().clone() for k, p in model.named_parameters()}))
    return out


def _step(model, optim, mesh, step: int) -> float:
    """One step on this rank: its dp share of the batch, its cp shard of each sequence."""
    dp, dp_rank, cp_group = mesh["dp"].size(), mesh["dp"].get_local_rank(), mesh["cp"].get_group()
    tokens = _tokens(step)
    labels = shift_labels(tokens)[:, :SEQ]
    total = (labels != IGNORE_INDEX).sum()  # the loss is a mean over every rank's scored tokens
    mine = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    inputs, local_labels, s = shard_batch(tokens[mine, :SEQ], labels[mine], group=cp_group, layout=CFG.layout)
    # Through the model's forward: FSDP2 gathers the root's own parameters (embedding, head) in its hooks.
    loss = loss_sum(_identity, model(inputs, group=cp_group, seq_len=s), local_labels) / total
    optim.zero_grad()
    loss.backward()
    fsdp.sync_context_gradients(model, mesh)
    optim.step()
    value = loss.detach().clone()
    torch.distributed.all_reduce(value)
    return float(value)


def _full(model) -> dict:
    return {k: p.full_tensor().detach().clone() for k, p in model.named_parameters()}


def _sharded(dp: int, cp: int):
    mesh = fsdp.context_mesh(dp, cp)
    model = fsdp.shard_model(build(CFG, seed=0, dtype=torch.float64), mesh)
    return mesh, model, torch.optim.AdamW(model.parameters(), lr=LR)


def _train_and_save(ckpt_dir: str) -> list[tuple[float, dict]]:
    mesh, model, optim = _sharded(2, 2)
    out = []
    for step in range(2):
        loss = _step(model, optim, mesh, step)
        out.append((loss, _full(model)))
        if step == 0:
            checkpoint.save(ckpt_dir, model, optim, step=1, samples=BATCH)
    return out


def _resume(ckpt_dir: str) -> tuple[dict, float, dict]:
    mesh, model, optim = _sharded(1, comm.group_rank_world()[1])
    checkpoint.load(checkpoint.latest(ckpt_dir), model, optim)
    resumed = _full(model)
    loss = _step(model, optim, mesh, 1)
    return resumed, loss, _full(model)


def _close(got: dict, ref: dict) -> dict:
    return {k: e for k in ref if (e := rel_err(got[k], ref[k])) > TOL[torch.float64]}


def test_fsdp_times_ring_matches_one_process_and_resumes_on_another_mesh(ranks, tmp_path):
    ref = _reference(2)
    for rank, steps in enumerate(ranks.run(4, _train_and_save, str(tmp_path))):
        for i, ((loss, params), (ref_loss, ref_params)) in enumerate(zip(steps, ref)):
            assert abs(loss - ref_loss) <= TOL[torch.float64] * abs(ref_loss), (rank, i, loss, ref_loss)
            assert not _close(params, ref_params), (rank, i, _close(params, ref_params))
    # The checkpoint of step 1, written by 2 x 2 ranks, read by 1 x 2: the same parameters (and
    # optimizer state: the next step matches one process's second step).
    for rank, (resumed, loss, params) in enumerate(ranks.run(2, _resume, str(tmp_path))):
        assert not _close(resumed, ref[0][1]), rank
        assert abs(loss - ref[1][0]) <= TOL[torch.float64] * abs(ref[1][0]), (rank, loss, ref[1][0])
        assert not _close(params, ref[1][1]), (rank, _close(params, ref[1][1]))


def _hf_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double()


def _hf_step(model, ids, labels, *, mesh=None) -> tuple[float, dict]:
    optim = torch.optim.SGD(model.parameters(), lr=LR)
    if mesh is None:
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=IGNORE_INDEX)
    else:
        dp, dp_rank, cp_group = mesh["dp"].size(), mesh["dp"].get_local_rank(), mesh["cp"].get_group()
        mine = slice(dp_rank * ids.shape[0] // dp, (dp_rank + 1) * ids.shape[0] // dp)
        sb = hf.shard_batch(ids[mine], labels[mine], group=cp_group, layout="zigzag")
        logits = model(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False).logits
        total = (labels[:, 1:] != IGNORE_INDEX).sum()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), sb["shift_labels"].flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum") / total
    loss.backward()
    if mesh is not None:
        fsdp.sync_context_gradients(model, mesh)
    optim.step()
    params = {k: (p.full_tensor() if mesh is not None else p).detach().clone() for k, p in model.named_parameters()}
    value = loss.detach().clone()
    if mesh is not None:
        torch.distributed.all_reduce(value)
    return float(value), params


def _hf_inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (4, 21), generator=g)
    labels = ids.clone()
    labels[torch.rand(4, 21, generator=g) < 0.2] = IGNORE_INDEX
    return ids, labels


def _hf_sharded():
    mesh = fsdp.context_mesh(2, 2)
    hf.register(layout="zigzag", group=mesh["cp"].get_group())
    try:
        model = _hf_model()
        model.set_attn_implementation("ring")
        fsdp.shard_model(model, mesh)
        return _hf_step(model, *_hf_inputs(), mesh=mesh)
    finally:
        hf.register()  # the default settings again, for the next job of this worker


def test_fsdp_times_ring_hf_model(ranks):
    ref_loss, ref_params = _hf_step(_hf_model(), *_hf_inputs())
    for rank, (loss, params) in enumerate(ranks.run(4, _hf_sharded)):
        assert abs(loss - ref_loss) <= TOL[torch.float64] * abs(ref_loss), (rank, loss, ref_loss)
        assert not _close(params, ref_params), (rank, _close(params, ref_params))


def test_context_mesh_checks_its_shape(ranks):
    msgs = ranks.run(2, raised, fsdp.context_mesh, 2, 2)
    assert all("dp x cp must be the number of ranks" in m for m in msgs), msgs


def test_decoder_layers_found():
    assert fsdp.decoder_layers(build(dataclasses.replace(CFG, n_layers=3))) is not None
    with pytest.raises(ValueError, match="no decoder-layer ModuleList"):
        fsdp.decoder_layers(torch.nn.Linear(2, 2))
