"""Fine-tune a tiny Hugging Face Llama on long sequences, the sequence split over 2 local processes.

Each process holds 1/W of every sequence: ring attention (``attn_implementation="ring"``) lets its
tokens attend to the whole sequence, the loss labels are shifted across shard boundaries, and the
ranks' partial gradients are summed before the optimiser step — the same update a single process with
the whole sequence would make.

    python examples/finetune_hf.py --nproc 2 --seq-len 4096 --steps 20

Replace ``tiny_model`` with ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="ring")`` for a
real checkpoint (``use_cache=False`` in training; ``config.attention_dropout`` must be 0).
"""

from __future__ import annotations

import argparse
import time

import torch

import ringattn
from ringattn import hf, launch
from ringattn.modes import Layout


def tiny_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 16)
    torch.manual_seed(seed)  # identical initial weights on every rank
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation("ring")
    return model


def batches(seq_len: int, batch: int, vocab: int, period: int, pool: int, seed: int):
    """Synthetic long sequences: a random block of ``period`` tokens repeated to the full length, drawn
    from a fixed pool of ``pool`` blocks (so a short run shows the loss falling). Every token after the
    first block is predictable by attending back ``period`` positions, across shard boundaries."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, vocab, (pool, period), generator=g)
    while True:
        block = blocks[torch.randint(0, pool, (batch,), generator=g)]
        ids = block.repeat(1, -(-seq_len // period))[:, :seq_len]
        labels = ids.clone()
        labels[:, :period] = hf.IGNORE_INDEX  # the first block is unpredictable: do not score it
        yield ids, labels


def train(args) -> None:
    rank, world = ringattn.comm.group_rank_world()
    hf.register(layout=args.layout)
    model = tiny_model(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = batches(args.seq_len, args.batch, model.config.vocab_size, args.period, args.pool, args.seed)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, labels = next(data)  # every rank draws the same batch, then keeps its shard
        sb = hf.shard_batch(ids, labels, layout=args.layout)
        logits = model(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False).logits
        loss = hf.causal_lm_loss(logits, sb["shift_labels"], sb["num_items_in_batch"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        hf.sync_gradients(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if rank == 0 and (step % args.log_every == 0 or step == 1):
            tok_s = step * args.batch * args.seq_len / (time.perf_counter() - t0)
            print(f"step {step:4d}  loss {loss.item():.4f}  {tok_s:,.0f} tokens/s  "
                  f"({world} ranks x {sb['input_ids'].shape[1]} tokens)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--period", type=int, default=64, help="length of the repeated random block")
    p.add_argument("--pool", type=int, default=4, help="number of distinct sequences")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--layout", choices=list(Layout), default="zigzag")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=5)
    args = p.parse_args()
    if launch.under_torchrun():
        launch.init_from_env()
        train(args)
    else:
        launch.spawn(train, args.nproc, args)


if __name__ == "__main__":
    main()
