"""transformers' Trainer with context parallelism (ringattn.hf.RingTrainer) on gloo ranks equals a plain
single-process Trainer on the same data, float64: the loss and gradient norm Trainer logs at every step and the
final weights. Plain SGD without clipping, so that a gradient off by any factor shows in the weights."""

from __future__ import annotations

import contextlib
import os
import tempfile

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from ringattn import hf  # noqa: E402

from .reference import rel_err  # noqa: E402
from .test_hf import tiny_model  # noqa: E402
from .test_hf_sweep import needs_hybrids  # noqa: E402

TOL = 1e-10
TOL_FLOAT32_INSIDE = 1e-5  # as the HF sweep's, where Mamba2's scan keeps its float32 decays
TOL_LOG = 1e-6  # Trainer sums the logged loss in float32
# Built as the HF sweep builds them; prepared (their mixers need it).
HYBRIDS = ("mamba2", "granitemoehybrid", "qwen3_next")
# Qwen3-Next's tiny config has only Gated DeltaNet layers: one of each kind, as the model mixes them.
HYBRID_LAYERS = {"qwen3_next": dict(layer_types=["linear_attention", "full_attention"])}
SEQ, STEPS = 29, 3  # 29 tokens: padded on every layout


class Rows(torch.utils.data.Dataset):
    """Random rows with some labels not scored, so that micro-batches and ranks score different counts."""

    def __init__(self, n: int, vocab: int, seed: int = 7):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, SEQ), generator=g)
        self.labels = self.ids.clone()
        self.labels[torch.rand(n, SEQ, generator=g) < 0.3] = hf.IGNORE_INDEX

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _args(batch: int, accum: int, checkpointing: bool, clip: float):
    return transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="ringattn-trainer-"), max_steps=STEPS, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum, activation_checkpointing=checkpointing, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=clip, logging_steps=1, save_strategy="no",
        report_to="none", seed=0, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)


def _float64_loss(outputs, labels, num_items_in_batch):
    # transformers' own causal-LM loss computes in float32; the reference keeps float64.
    logits = outputs["logits"][:, :-1].flatten(0, 1)
    loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=hf.IGNORE_INDEX,
                                             reduction="sum")
    return loss / num_items_in_batch


class Recording:
    """Keeps each micro-batch's loss as training_step returns it, in float64: Trainer sums them for its log in a
    float32 tensor, which is exact only to ~1e-7."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.micro_losses.append(loss.detach().double().clone())
        return loss

    def step_losses(self) -> list[float]:
        per_step = torch.stack(self.micro_losses).view(STEPS, -1).sum(1)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world > 1:  # as Trainer's log: the mean over every rank of what each returned
            torch.distributed.all_reduce(per_step)
        return (per_step / world).tolist()


class ReferenceTrainer(Recording, transformers.Trainer):
    micro_losses: list


def _result(trainer) -> dict:
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == STEPS
    return {"logged": [h["loss"] for h in logs], "loss": trainer.step_losses(),
            "grad_norm": [h.get("grad_norm") for h in logs],
            "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "checkpointing": trainer.model.is_gradient_checkpointing}


def model_for(family: str):
    if family in HYBRIDS:
        from . import test_hf_sweep as sw

        return sw.build(family, {**sw.FEATURES.get(family, {}), **HYBRID_LAYERS.get(family, {})}, seed=0)[0].train()
    return tiny_model(family)


def reference(family: str, batch: int, accum: int, checkpointing: bool = False, clip: float = 0.0) -> dict:
    """One process, the whole sequences, transformers' Trainer as it ships (sdpa)."""
    model = model_for(family)
    trainer = ReferenceTrainer(model=model, args=_args(batch, accum, checkpointing, clip),
                                   train_dataset=Rows(64, model.config.vocab_size),
                                   compute_loss_func=_float64_loss)
    trainer.micro_losses = []
    with _float64(family, checkpointing):
        trainer.train()
    return _result(trainer)


def _float64(family: str, checkpointing: bool):
    # Mamba2's scan computes its decays in float32 even in a float64 model (the delta rule its whole recurrence):
    # float64 there too, in both runs alike
    # (not where activation checkpointing replays the layer in backward, outside the mode: the model's own float32)
    from ringattn.hf.audit.compare import Float64Throughout

    return Float64Throughout() if family in HYBRIDS and not checkpointing else contextlib.nullcontext()


class RingRecording(Recording, hf.RingTrainer):
    micro_losses: list


def ring_run(family: str, layout: str, cp: int, batch: int, accum: int, checkpointing: bool = False,
             clip: float = 0.0) -> dict:
    env = dict(os.environ)
    try:
        hf.setup_context_parallel(cp, layout=layout)
        model = model_for(family)
        model.set_attn_implementation("ring")
        if family in HYBRIDS:
            hf.prepare(model)
        trainer = RingRecording(model=model, args=_args(batch, accum, checkpointing, clip),
                                 train_dataset=Rows(64, model.config.vocab_size))
        trainer.micro_losses = []
        with _float64(family, checkpointing):
            trainer.train()
        return _result(trainer)
    finally:  # accelerate writes RANK, WORLD_SIZE, ... into the environment of this (pooled) process
        os.environ.clear()
        os.environ.update(env)


def compare(got: dict, want: dict) -> dict:
    assert len(got["loss"]) == len(want["loss"]) == STEPS
    errs = {}
    for key in ("loss", "grad_norm"):
        errs |= {f"{key} {i}": rel_err(torch.tensor(a), torch.tensor(b))
                 for i, (a, b) in enumerate(zip(got[key], want[key]))}
    errs |= {k: rel_err(v, want["weights"][k]) for k, v in got["weights"].items()}
    return errs


def check(results: list[dict], want: dict, family: str = "llama", tol: float = TOL) -> float:
    worst = 0.0
    for rank, got in enumerate(results):
        errs = compare(got, want)
        bad = {k: v for k, v in errs.items() if not v <= tol}
        assert not bad, f"rank {rank}: {bad}"
        logged = [rel_err(torch.tensor(a), torch.tensor(b)) for a, b in zip(got["logged"], want["logged"])]
        assert max(logged) <= TOL_LOG, f"rank {rank}: logged losses {got['logged']} vs {want['logged']}"
        worst = max(worst, *errs.values())
    # The weights moved: the comparison is of training, not of the initial model.
    init = model_for(family).state_dict()
    assert max(rel_err(v, init[k]) for k, v in want["weights"].items() if k in init) > 1e-3
    return worst


@pytest.mark.parametrize("family,layout", [("llama", "zigzag"), ("mistral", "contiguous"), ("qwen2", "striped")])
def test_trainer_context_parallel(ranks, family, layout):
    # Mistral: a sliding window of 7 over 29 tokens; Qwen2: one full and one sliding (5) layer.
    worst = check(ranks.run(2, ring_run, family, layout, 2, 2, 1), reference(family, 2, 1))
    print(f"{family} {layout}: max rel err {worst:.2e}")


@needs_hybrids
@pytest.mark.parametrize("family,layout", [("granitemoehybrid", "zigzag"), ("mamba2", "contiguous")])
def test_trainer_hybrid(ranks, family, layout):
    # Granite-4.0-H: a Mamba2 layer (convolution and scan, context-parallel) and an attention layer.
    worst = check(ranks.run(2, ring_run, family, layout, 2, 2, 1), reference(family, 2, 1), family)
    print(f"{family} {layout}: max rel err {worst:.2e}")


@needs_hybrids
def test_trainer_gated_deltanet(ranks):
    # Qwen3-Next: a Gated DeltaNet layer (its short convolution and delta rule, context-parallel) and an attention
    # layer, in float64 throughout (the delta rule computes in float32 otherwise, in both runs alike).
    worst = check(ranks.run(2, ring_run, "qwen3_next", "zigzag", 2, 2, 1), reference("qwen3_next", 2, 1),
                  "qwen3_next")
    print(f"qwen3_next zigzag: max rel err {worst:.2e}")


@needs_hybrids
@pytest.mark.slow
def test_trainer_hybrid_activation_checkpointing(ranks):
    # The replay of each layer in backward runs its mixers context-parallel with the forward's documents.
    results = ranks.run(2, ring_run, "granitemoehybrid", "zigzag", 2, 1, 2, True)
    want = reference("granitemoehybrid", 1, 2, True)
    assert want["checkpointing"] and all(r["checkpointing"] for r in results)
    worst = check(results, want, "granitemoehybrid", TOL_FLOAT32_INSIDE)
    print(f"hybrid checkpointing: max rel err {worst:.2e}")


def test_trainer_gradient_accumulation(ranks):
    # Two micro-batches of one row each, scoring different numbers of tokens: normalised by their sum.
    worst = check(ranks.run(2, ring_run, "llama", "zigzag", 2, 1, 2), reference("llama", 1, 2))
    print(f"accumulation: max rel err {worst:.2e}")


def test_trainer_activation_checkpointing(ranks):
    results = ranks.run(2, ring_run, "mistral", "zigzag", 2, 1, 2, True)
    want = reference("mistral", 1, 2, True)
    assert want["checkpointing"] and all(r["checkpointing"] for r in results)
    worst = check(results, want)
    print(f"checkpointing: max rel err {worst:.2e}")


def test_trainer_data_times_context_parallel(ranks):
    # 2 dp rows x 2 cp ranks: each row one row of the batch, the reference both; clipping at 1 (the norms are ~1.4).
    worst = check(ranks.run(4, ring_run, "llama", "zigzag", 2, 1, 2, False, 1.0), reference("llama", 2, 2, False, 1.0))
    print(f"dp x cp: max rel err {worst:.2e}")


def test_trainer_refusals():
    hf.register(layout="zigzag")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="registered ring attention"):
        hf.RingTrainer(model=model, args=_args(1, 1, False, 0.0), train_dataset=Rows(4, 61))
    model.set_attn_implementation("ring")
    trainer = hf.RingTrainer(model=model, args=_args(1, 1, False, 0.0), train_dataset=Rows(4, 61))
    ids = torch.arange(6)[None]
    right = torch.tensor([[1, 1, 1, 1, 0, 0]])
    _, inputs = trainer._prepare_context_parallel_inputs(model, {"input_ids": ids, "labels": ids,
                                                                 "attention_mask": right})
    assert "attention_mask" not in inputs and inputs["shift_labels"].tolist() == [[1, 2, 3, 4, 5, -100]]
    with pytest.raises(ValueError, match="right padding"):
        trainer._prepare_context_parallel_inputs(model, {"input_ids": ids, "labels": ids,
                                                         "attention_mask": right.flip(1)})
    with pytest.raises(ValueError, match="unshifted"):
        trainer._prepare_context_parallel_inputs(model, {"input_ids": ids, "labels": ids, "shift_labels": ids})
    with pytest.raises(ValueError, match="labels"):
        trainer._prepare_context_parallel_inputs(model, {"input_ids": ids})


@pytest.mark.parametrize("name", ["fsdp", "deepspeed"])
def test_trainer_refuses_fsdp_and_deepspeed(monkeypatch, name):
    # Both need a GPU world to switch on here; what RingTrainer sees of them is Trainer's flag.
    init = transformers.Trainer.__init__

    def enabled(self, *args, **kwargs):
        init(self, *args, **kwargs)
        setattr(self, f"is_{name}_enabled", True)

    monkeypatch.setattr(transformers.Trainer, "__init__", enabled)
    hf.register(layout="zigzag")
    model = tiny_model("llama")
    model.set_attn_implementation("ring")
    with pytest.raises(ValueError, match=f"Trainer's {name} is not supported yet"):
        hf.RingTrainer(model=model, args=_args(1, 1, False, 0.0), train_dataset=Rows(4, 61))


def two_forwards_case() -> str:
    from . import test_hf_sweep as sw

    hf.register(layout="zigzag")
    model = sw.build("lfm2", sw.FEATURES["lfm2"], seed=0)[0].train()
    model.set_attn_implementation("ring")
    hf.prepare(model)
    model.gradient_checkpointing_enable()
    sb = hf.shard_batch(torch.randint(3, sw.VOCAB, (1, 12), generator=torch.Generator().manual_seed(0)),
                        layout="zigzag")
    run = lambda: model(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False).logits.sum()  # noqa: E731
    loss = run() + run()  # two forwards of every layer before one backward: which one a replay is of is unknown
    try:
        loss.backward()
    except hf.UnsupportedModel as e:
        return str(e)
    return "ran"


@needs_hybrids
def test_checkpointing_replays_of_several_pending_forwards_are_refused(ranks):
    for msg in ranks.run(2, two_forwards_case):
        assert "cannot tell which forward it replays (2 forwards of its layer are awaiting backward)" in msg, msg
