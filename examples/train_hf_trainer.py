"""Train a tiny Hugging Face model with transformers' Trainer, each sequence split over the ranks (ring attention).

    python -m torch.distributed.run --nproc-per-node 2 examples/train_hf_trainer.py --steps 4
    python examples/train_hf_trainer.py --nproc 4 --cp 2 --steps 4    # 2 data-parallel rows x 2 context ranks

``ringattn.hf.setup_context_parallel`` groups the ranks and registers ``attn_implementation="ring"``;
``ringattn.hf.RingTrainer`` is transformers' ``Trainer`` that shards each batch over its group, normalises the
loss by every rank's scored tokens and leaves the rest (DDP, gradient accumulation, clipping, logging,
activation checkpointing) to Trainer and accelerate. For a real checkpoint replace ``tiny_model`` with
``AutoModelForCausalLM.from_pretrained(path, attn_implementation="ring")`` (``attention_dropout`` must be 0).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from ringattn import hf, launch
from ringattn.modes import Layout


def tiny_model(family: str, seed: int):
    import transformers

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1 << 16, attention_dropout=0.0)
    if family == "mistral":  # a sliding window: torch's context_parallel (accelerate's cp_size) refuses it
        cfg, cls = transformers.MistralConfig(**common, sliding_window=64), transformers.MistralForCausalLM
    else:
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg)
    model.set_attn_implementation("ring")
    return model


class Repeats(torch.utils.data.Dataset):
    """A random block of ``period`` tokens repeated to ``seq_len``, from a pool of ``pool`` blocks: after the first
    block every token is predictable by attending ``period`` positions back, across shard boundaries."""

    def __init__(self, n: int, seq_len: int, vocab: int, period: int = 32, pool: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        blocks = torch.randint(0, vocab, (pool, period), generator=g)
        self.ids = blocks[torch.randint(0, pool, (n,), generator=g)].repeat(1, -(-seq_len // period))[:, :seq_len]
        self.period = period

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[:self.period] = hf.IGNORE_INDEX  # the first block cannot be predicted: not scored
        return {"input_ids": self.ids[i], "labels": labels}


def train(args) -> None:
    import transformers

    cp = hf.setup_context_parallel(args.cp, layout=args.layout)  # before TrainingArguments: accelerate reads it
    model = tiny_model(args.family, args.seed)
    targs = transformers.TrainingArguments(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="ringattn-trainer-"), max_steps=args.steps,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.grad_accum,
        activation_checkpointing=args.checkpointing, learning_rate=args.lr, logging_steps=1, save_strategy="no",
        report_to="none", seed=args.seed, use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    data = Repeats(64, args.seq_len, model.config.vocab_size, seed=args.seed)
    trainer = hf.RingTrainer(model=model, args=targs, train_dataset=data)
    if trainer.is_world_process_zero():
        print(f"{cp.dp} data-parallel x {cp.cp} context-parallel ranks, {args.seq_len} tokens per sequence, "
              f"layout {args.layout}", flush=True)
    trainer.train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2, help="local ranks to spawn (ignored under torchrun)")
    p.add_argument("--cp", type=int, default=None, help="ranks per context-parallel group (default: all)")
    p.add_argument("--family", choices=["llama", "mistral"], default="llama")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="sequences per data-parallel row and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true", help="activation (gradient) checkpointing")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--layout", choices=list(Layout), default="zigzag")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None)
    args = p.parse_args()
    if launch.under_torchrun():
        train(args)
    else:
        launch.spawn(train, args.nproc, args)


if __name__ == "__main__":
    main()
