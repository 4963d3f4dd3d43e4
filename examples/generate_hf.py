"""Generate with a Hugging Face model whose prompt and KV cache are split over local processes.

Every rank calls ``model.generate`` with the same whole prompt, as one process would; after
``ringattn.hf.prepare(model)`` the prompt is sharded, prefilled with ring attention, and each new token
attends to a KV cache that stays split across the ranks (``ringattn.hf.RingCache``). With ``--check`` rank
0 also generates in one process with sdpa and compares the tokens.

    python examples/generate_hf.py --nproc 2 --prompt-len 1000 --max-new-tokens 16 --check
    torchrun --nproc-per-node 2 examples/generate_hf.py --prompt-len 1000 --check

Replace ``tiny_model`` with ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="ring")`` for a
real checkpoint (``config.attention_dropout`` must be 0; ``model.eval()``).
"""

from __future__ import annotations

import argparse
import time

import torch

import ringattn
from ringattn import hf, launch


def tiny_model(seed: int, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 16)
    torch.manual_seed(seed)  # identical weights on every rank
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def run(args) -> None:
    rank, world = ringattn.comm.group_rank_world()
    hf.register(layout=args.layout)
    model = hf.prepare(tiny_model(args.seed, "ring"))
    # token 0 is the pad token: generate would mask it inside the prompt
    prompt = torch.randint(1, 256, (1, args.prompt_len), generator=torch.Generator().manual_seed(args.seed))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - t0
    if rank != 0:
        return
    new = out[0, args.prompt_len:].tolist()
    print(f"{world} ranks, {args.layout}: {args.prompt_len}-token prompt -> {new} ({seconds:.2f} s)", flush=True)
    if args.check:
        with torch.no_grad():
            want = tiny_model(args.seed, "sdpa").generate(prompt, max_new_tokens=args.max_new_tokens,
                                                          do_sample=False, pad_token_id=0)
        same = torch.equal(out, want)
        print("one process (sdpa) generates the same tokens" if same else
              f"MISMATCH: one process (sdpa) generates {want[0, args.prompt_len:].tolist()}", flush=True)
        if not same:
            raise SystemExit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=1000)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--layout", choices=("contiguous", "zigzag", "striped"), default="zigzag")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="compare with one process (sdpa) on rank 0")
    args = p.parse_args()
    if launch.under_torchrun():
        launch.init_from_env()
        run(args)
    else:
        launch.spawn(run, args.nproc, args)


if __name__ == "__main__":
    main()
