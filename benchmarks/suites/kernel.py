"""Per-block kernel throughput vs. torch SDPA on the same shapes, same run (fp32, head_dim 64).

"ours" is the whole single-process path users get (``ringattn.ring_attention`` with world size 1:
argument checks, block planning, the fused CPU kernel, the logsumexp accumulator), forward and
forward + backward, for full and causal blocks.
"""

from __future__ import annotations

import pathlib

import torch
import torch.nn.functional as F

import ringattn

from ..common import best_of, machine, pyplot, save_figure


def run(out: pathlib.Path, quick: bool) -> dict:
    torch.set_num_threads(1)  # what one rank of a ring gets
    heads, d = 8, 64
    lengths = [512] if quick else [1024, 2048, 4096]
    reps = 2 if quick else 5
    rows = []
    for S in lengths:
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(1, S, heads, d, generator=g) for _ in range(4))
        qt, kt, vt, dot = (x.transpose(1, 2) for x in (q, k, v, do))
        for causal in (False, True):
            def ours_f():
                ringattn.ring_attention(q, k, v, causal=causal)

            def sdpa_f():
                F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

            def ours_fb():
                qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
                ringattn.ring_attention(qq, kk, vv, causal=causal).backward(do)

            def sdpa_fb():
                qq, kk, vv = (x.detach().requires_grad_() for x in (qt, kt, vt))
                F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal).backward(dot)

            ours_f(), sdpa_f(), ours_fb(), sdpa_fb()  # warm-up
            t = {"ours_fwd": [], "sdpa_fwd": [], "ours_fwdbwd": [], "sdpa_fwdbwd": []}
            for _ in range(reps):  # interleaved, best of
                t["ours_fwd"].append(best_of(ours_f, 1, warmup=0))
                t["sdpa_fwd"].append(best_of(sdpa_f, 1, warmup=0))
                t["ours_fwdbwd"].append(best_of(ours_fb, 1, warmup=0))
                t["sdpa_fwdbwd"].append(best_of(sdpa_fb, 1, warmup=0))
            best = {k_: min(v_) for k_, v_ in t.items()}
            flops = 4 * S * S * heads * d / (2 if causal else 1)
            row = {"seq_len": S, "causal": causal, **best,
                   "ratio_fwd": best["sdpa_fwd"] / best["ours_fwd"],
                   "ratio_fwdbwd": best["sdpa_fwdbwd"] / best["ours_fwdbwd"],
                   "ours_gflops_fwd": flops / best["ours_fwd"] / 1e9}
            rows.append(row)
            print(f"  S={S:5d} {'causal' if causal else 'full  '}  fwd: ours {best['ours_fwd'] * 1e3:7.1f} ms "
                  f"sdpa {best['sdpa_fwd'] * 1e3:7.1f} ms (ratio {row['ratio_fwd']:.3f})   fwd+bwd: ours "
                  f"{best['ours_fwdbwd'] * 1e3:7.1f} ms sdpa {best['sdpa_fwdbwd'] * 1e3:7.1f} ms "
                  f"(ratio {row['ratio_fwdbwd']:.3f})  {row['ours_gflops_fwd']:.1f} GFLOP/s", flush=True)
    res = {"machine": machine(), "threads": 1, "heads": heads, "head_dim": d, "dtype": "float32", "rows": rows,
           "min_ratio": min(min(r["ratio_fwd"], r["ratio_fwdbwd"]) for r in rows)}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for causal, m in ((False, "o"), (True, "s")):
        sel = [r for r in rows if r["causal"] == causal]
        for key, ls in (("ratio_fwd", "-"), ("ratio_fwdbwd", "--")):
            ax.plot([r["seq_len"] for r in sel], [r[key] for r in sel], marker=m, ls=ls,
                    label=f"{'causal' if causal else 'full'} {key[6:]}")
    ax.axhline(0.95, color="k", lw=1, ls=":", label="goal 0.95")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block length")
    ax.set_ylabel("SDPA time / ringattn time")
    ax.set_title("single-block kernel vs torch SDPA (fp32, 1 thread, 8 x 64)")
    ax.legend(fontsize=8)
    save_figure(fig, out / "kernel.png", res["machine"])
    return res


def summary(res: dict) -> str:
    lines = ["| block length | mask | fwd: SDPA / ours | fwd+bwd: SDPA / ours | ours fwd GFLOP/s |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['seq_len']} | {'causal' if r['causal'] else 'full'} | {r['ratio_fwd']:.3f} | "
                     f"{r['ratio_fwdbwd']:.3f} | {r['ours_gflops_fwd']:.1f} |")
    lines.append(f"\nWorst ratio {res['min_ratio']:.3f} (goal: >= 0.95, i.e. within 5 % of SDPA); "
                 f"{res['threads']} thread, {res['heads']} heads x {res['head_dim']}, {res['dtype']}.")
    return "\n".join(lines) + "\n"
