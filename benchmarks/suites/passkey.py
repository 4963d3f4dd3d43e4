"""Long context learned (the goal: >= 95 % passkey retrieval at every depth): a small LLaMA-style model
trained with ring attention on 4 ranks at a context longer than one process can train on in the same
per-rank memory, evaluated by needle depth and context length.

``make longctx`` (``python -m benchmarks passkey --out docs/bench --report docs/benchmarks.md``) does it
all and ships the result: (1) the longest sequence one process can train on (BPT: blockwise attention
and feed-forward, the best single-process configuration) within the per-rank budget, measured by
Table 3's search (``benchmarks/suites/table3.py``: fresh processes, peak-RSS growth of one training
step) for the recipe's model; the same search for the recipe's 4-rank ring, up to the recipe's length;
(2) ``ringattn train --recipe passkey-long`` on 4 ranks; (3) ``ringattn eval`` of the result at several
context lengths and 10 needle depths (the heatmap); (4) the checkpoint and ``recipe.json`` to
``examples/checkpoints/passkey/``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

from ringattn.app.train import RECIPES

from ..common import machine, pyplot, save_figure
from . import table3

RECIPE = "passkey-long"
BUDGET_MB = 16  # per rank: small, so that the lengths stay cheap on a CPU
SHIP = pathlib.Path(__file__).resolve().parents[2] / "examples" / "checkpoints" / "passkey"


def _env() -> dict:
    src = str(pathlib.Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}


def _ringattn(*args: str) -> dict:
    """``ringattn ARGS --json`` in a fresh process; its JSON line."""
    cmd = [sys.executable, "-m", "ringattn", *args, "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def memory_specs(recipe: dict, max_len: int) -> list[dict]:
    """Table 3 configurations for the recipe's model: BPT in one process, the recipe's ring."""
    size = {"dim": recipe["dim"], "layers": recipe["n_layers"], "heads": recipe["n_heads"],
            "kv_heads": recipe["n_kv_heads"], "chunk": recipe["loss_chunk"]}
    search = {"budget_mb": BUDGET_MB, "bisect": 4}
    bpt, ring = table3._configs(recipe["ffn_chunk"])[2], table3._configs(recipe["ffn_chunk"])[4]
    return [{**size, **search, **bpt, "max_len": max_len},
            {**size, **search, **ring, "max_len": max_len, "bisect": 0}]


def run(out: pathlib.Path, quick: bool) -> dict:
    recipe = dict(RECIPES[RECIPE])
    if quick:  # a smoke run of every piece: tiny lengths, a few steps, nothing shipped
        recipe.update(curriculum=((128, 4, 4), (256, 2, 1)))
    final_len = recipe["curriculum"][-1][0]
    lens = sorted({final_len // 8, final_len // 4, final_len // 2, final_len})
    # 20 samples per depth at the training length (the headline), fewer at the shorter ones (time)
    depths, samples, fewer = (3, 1, 1) if quick else (10, 20, 5)
    t_start = time.perf_counter()

    work = out / "passkey-run"  # kept if a later step fails: running again reuses what is done
    bpt, ring = measure_memory(work, recipe)
    single_max = bpt["max_len"]
    ring_at = next((p for p in ring["probes"] if p["len"] == final_len), None)
    print(f"  BPT, one process: {single_max:,} tokens; ring on {recipe['nproc']} ranks at {final_len:,}: "
          f"{ring_at}", flush=True)
    if not quick and final_len <= single_max:
        raise RuntimeError(f"the recipe's length {final_len} does not exceed the single-process maximum "
                           f"{single_max} at {BUDGET_MB} MiB: raise the recipe's length or lower the budget")

    ckpt = work / "ckpt"
    summary, train_s = train_recipe(work, recipe if quick else None)
    print(f"  trained in {train_s:.0f} s: loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}", flush=True)
    grid = {}
    for n in lens:
        t0 = time.perf_counter()
        r = _ringattn("eval", "--ckpt", str(ckpt), "--seq-len", str(n), "--nproc", str(recipe["nproc"]),
                      "--depths", str(depths), "--samples", str(samples if n == final_len else fewer),
                      "--no-progress")
        grid[str(n)] = {k: r[k] for k in ("accuracy", "by_depth", "digit_accuracy", "answer_loss",
                                          "samples_per_depth")}
        print(f"  eval {n:>6,} tokens: accuracy {r['accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)

    result = {
        "machine": machine(), "quick": quick, "recipe": RECIPE, "budget_mb_per_rank": BUDGET_MB,
        "nproc": recipe["nproc"], "seq_len": final_len, "single_process_max_len": single_max,
        "single_process_first_fail": bpt["first_fail"], "single_process_probes": bpt["probes"],
        "ring_probes": ring["probes"], "ring_mb_at_seq_len": ring_at["mb"] if ring_at else None,
        "curriculum": [list(st) for st in recipe["curriculum"]], "train_wall_s": round(train_s, 1),
        "losses": summary["losses"], "train_history": summary.get("history"),
        "train_summary": {k: v for k, v in summary.items() if k not in ("losses", "history")},
        "depths": depths, "samples_per_depth": samples, "grid": grid,
        "accuracy_at_seq_len": grid[str(final_len)]["accuracy"],
        "min_depth_accuracy_at_seq_len": min(grid[str(final_len)]["by_depth"].values()),
    }
    plot_heatmap(result, out / "passkey.png")
    plot_loss(result, out / "passkey_loss.png")
    if not quick:
        ship(ckpt, result)
    shutil.rmtree(work)
    result["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    return result


def measure_memory(work: pathlib.Path, recipe: dict) -> tuple[dict, dict]:
    """Table 3's search for the recipe's model: BPT in one process (up to twice the recipe's length), the
    recipe's ring (doubling up to its length); kept in ``work/memory.json`` for the same model and length."""
    record = work / "memory.json"
    final_len = recipe["curriculum"][-1][0]
    specs = memory_specs(recipe, 2 * final_len)[:1] + memory_specs(recipe, final_len)[1:]
    if record.is_file() and json.loads(record.read_text())["specs"] == specs:
        print(f"  reusing the memory measurement in {record}", flush=True)
        return tuple(json.loads(record.read_text())["results"])
    print(f"  single-process maximum within {BUDGET_MB} MiB per rank (Table 3's search) ...", flush=True)
    results = [table3._run_configs([spec])[0] for spec in specs]
    work.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"specs": specs, "results": results}))
    return tuple(results)


def train_recipe(work: pathlib.Path, quick: dict | None = None) -> tuple[dict, float]:
    """``ringattn train --recipe passkey-long`` into ``work/ckpt`` (``quick``: its tiny curriculum);
    returns its summary and wall time, kept in ``work/train.json``: a finished run is not repeated."""
    record = work / "train.json"
    want = {"recipe": RECIPE, "quick": quick is not None,
            "curriculum": [list(st) for st in (quick or RECIPES[RECIPE])["curriculum"]]}
    if record.is_file():
        done = json.loads(record.read_text())
        if {k: done.get(k) for k in want} == want:
            print(f"  reusing the finished training in {work}", flush=True)
            return {**done["summary"], "history": done.get("history")}, done["wall_s"]
    shutil.rmtree(work / "ckpt", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    print(f"  ringattn train --recipe {RECIPE} ...", flush=True)
    args = ["train", "--recipe", RECIPE, "--ckpt-dir", str(work / "ckpt"), "--no-resume", "--no-progress"]
    if quick:
        args += ["--curriculum", ",".join(":".join(map(str, st)) for st in quick["curriculum"]),
                 "--eval-lens", "256", "--eval-samples", "2"]
    t0 = time.perf_counter()
    summary = _ringattn(*args)
    wall = time.perf_counter() - t0
    record.write_text(json.dumps({**want, "summary": summary, "wall_s": wall}))
    return summary, wall


def ship(ckpt: pathlib.Path, result: dict) -> None:
    """The final checkpoint (model, optimizer, manifest) and recipe.json to examples/checkpoints/passkey/."""
    from ringattn.training.checkpoint import latest

    last = latest(ckpt)
    shutil.rmtree(SHIP, ignore_errors=True)
    SHIP.mkdir(parents=True)
    shutil.copytree(last, SHIP / last.name)
    (SHIP / "recipe.json").write_text(json.dumps(recipe_meta(result), indent=1) + "\n")


def recipe_meta(result: dict) -> dict:
    """What recipe.json records of a run: the recipe, the memory measurement, the training, the eval."""
    keep = ("recipe", "nproc", "seq_len", "single_process_max_len", "budget_mb_per_rank", "ring_mb_at_seq_len",
            "curriculum", "train_wall_s", "train_history", "depths", "samples_per_depth", "accuracy_at_seq_len",
            "min_depth_accuracy_at_seq_len")
    meta = {k: result[k] for k in keep}
    meta["by_depth_at_seq_len"] = result["grid"][str(result["seq_len"])]["by_depth"]
    meta["grid"] = {n: {k: g[k] for k in ("accuracy", "by_depth", "samples_per_depth")}
                    for n, g in result["grid"].items()}
    meta["measured"] = result["machine"]["date"]
    meta["eval"] = (f"ringattn eval --ckpt examples/checkpoints/passkey --seq-len {result['seq_len']} --nproc "
                    f"{result['nproc']} --depths {result['depths']} --samples {result['samples_per_depth']}")
    return meta


def plot_heatmap(res: dict, path: pathlib.Path) -> None:
    """Depth (rows) x context length (columns), accuracy as colour, like LWM's needle figure."""
    plt = pyplot()
    lens = sorted(res["grid"], key=int)
    depths = list(res["grid"][lens[0]]["by_depth"])
    acc = [[res["grid"][n]["by_depth"][d] for n in lens] for d in depths]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lens)):
            ax.text(j, i, f"{acc[i][j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lens)), [f"{int(n) // 1024}K" if int(n) >= 1024 else n for n in lens])
    ax.set_yticks(range(len(depths)), [f"{float(d) * 100:.0f}%" for d in depths])
    ax.set_xlabel(f"context length (tokens; trained at {res['seq_len']:,} on {res['nproc']} ranks)")
    ax.set_ylabel("needle depth")
    per = sorted({g["samples_per_depth"] for g in res["grid"].values()})
    ax.set_title(f"Passkey retrieval ({' or '.join(map(str, per))} held-out samples per cell)")
    fig.colorbar(im, ax=ax, label="accuracy (whole key right)")
    save_figure(fig, path, res["machine"])


def plot_loss(res: dict, path: pathlib.Path) -> None:
    """Training loss per step (the loss is on the key's digits only), stages marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.semilogy(range(1, len(res["losses"]) + 1), res["losses"], lw=0.8)
    end = 0
    for n, steps, batch in res["curriculum"]:
        ax.axvline(end + 0.5, color="gray", lw=0.6, ls=":")
        ax.text(end + 4, 0.98, f"{n} tokens x {batch}", fontsize=7, va="top", rotation=90,
                transform=ax.get_xaxis_transform())
        end += steps
    if (res.get("train_history") or {}).get("resumed_at"):
        ax.axvline(res["train_history"]["resumed_at"] + 0.5, color="#c44e52", lw=0.8,
                   label="resumed with the later stages added")
    ax.axhline(2.302585, color="#c44e52", lw=0.6, ls="--", label="guessing (ln 10 per digit)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per key digit)")
    ax.set_title(f"ringattn train --recipe {res['recipe']} ({res['nproc']} ranks)")
    ax.legend(fontsize=8)
    save_figure(fig, path, res["machine"])


WHY = (
    "Why this recipe. (1) The haystack: `passkey` repeats one sentence and scores every token, so the loss "
    "can fall to ~0 on the filler while the key is never retrieved (measured: loss 0.036 and accuracy 0.0 after "
    "200 steps at 1024; `ringattn train` says why). The recipe's task, `passkey-place`, fills the haystack with "
    "random lowercase letters and spaces (nothing a model can predict) and scores only the key's 5 tokens "
    "after the question, so the loss falls only as far as the model retrieves. (2) The key's tokens: in "
    "`passkey-place` the needle is ` pass key=KEY. ` and the question ` What is the pass key? pass key=KEY`, "
    "and digit d at place k of the key is token 128 + 10 k + d (a byte no text uses), so each answer token "
    "is the one token of its place before the question: found by what it is, at any distance, among any "
    "number of haystack tokens. With ASCII digits (`passkey-random`) a digit can only be found by the ones "
    "before it (an induction match on the previous tokens), and repeated digits make that ambiguous: "
    "matching the previous two tokens still leaves 5.5 % of keys with two continuations (the trigram 0.3 %; "
    "counted over all 100,000 keys): a model that copies by the previous two tokens misses more keys than the "
    "goal's 5 % allows. Measured "
    "in one process with this model and RoPE base: ASCII digits after a marker, trained 96:500:32, "
    "512:300:8, 2048:150:2, retrieved at most 0.10 of whole keys at any depth from 96 to 8192 tokens (digits "
    "right 0.36-0.68; 10 samples at each of 3 depths); place tokens learned the key at 96 tokens in 300 "
    "steps (loss 0.05). (3) The "
    "curriculum: the retrieval forms at 96 tokens, where 32 keys per step cost what 3K tokens do; the "
    "model does not extrapolate to distances it has not seen (place tokens trained only to 512 tokens: "
    "1.00 at 512, but 0.10 at depth 0 of 2048 and 0.00 at depths 0 and 50 % of 8192, 1.00 with the needle "
    "next to the question), so each later stage shows the distances up to its length, 8192 last. One cosine "
    "learning-rate schedule runs over all stages. (4) RoPE base 1e6: with head_dim 16 the two slowest "
    "rotary pairs turn 0.26 and 0.05 rad over 8192 positions (base 10000: 8.2 and 2.6), a nearly "
    "position-free part of each head for matching by content at any distance (chosen by this reasoning; "
    "base 10000 was not compared). (5) Depth d puts the needle's first byte at d x (haystack length): 0% "
    "right at the start, 100% just before the question; every cell uses its own held-out keys (sample "
    "indices training never reaches).")


def summary(res: dict) -> str:
    n, single = res["seq_len"], res["single_process_max_len"]
    cells = res["grid"][str(n)]["by_depth"]
    lines = [
        f"Budget {res['budget_mb_per_rank']} MiB of peak-memory growth per rank (Table 3's measure). One process "
        f"(BPT) trains at most **{single:,}** tokens (first failing probe: {res['single_process_first_fail']:,}); "
        f"the recipe trains at **{n:,}** tokens on {res['nproc']} ranks with ring attention"
        + (f" ({res['ring_mb_at_seq_len']:.1f} MiB per rank at that length)." if res["ring_mb_at_seq_len"] else "."),
        "",
        f"Curriculum (length:steps:batch): {', '.join(':'.join(map(str, st)) for st in res['curriculum'])}; "
        f"trained in {res['train_wall_s'] / 60:.1f} min of wall time on the machine the results record "
        f"(loss {res['train_summary']['loss_first']:.3f} -> {res['train_summary']['loss_last']:.3f} nats per "
        "key digit).",
        "",
        *([f"How it ran: {res['train_history']['note']}", ""] if res.get("train_history") else []),
        f"Accuracy at {n:,} tokens: **{res['accuracy_at_seq_len']:.3f}** overall, lowest depth "
        f"**{res['min_depth_accuracy_at_seq_len']:.3f}** ({res['samples_per_depth']} held-out samples per depth; "
        "a sample counts only if every digit of its key is the argmax, i.e. greedy decoding writes the key; "
        f"digits right: {res['grid'][str(n)]['digit_accuracy']:.3f}, mean key-digit loss "
        f"{res['grid'][str(n)]['answer_loss']:.2f} nats, guessing gives 0.1 and 2.30)."
        + ("" if res["min_depth_accuracy_at_seq_len"] >= 0.95 else
           " **The goal (>= 0.95 at every depth) is not reached.**"),
        "",
        "| context | " + " | ".join(f"{float(d) * 100:.0f}%" for d in cells) + " | overall | samples per depth |",
        "|---|" + "---|" * (len(cells) + 2),
    ]
    for length, g in sorted(res["grid"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {int(length):,} | " + " | ".join(f"{a:.2f}" for a in g["by_depth"].values())
                     + f" | {g['accuracy']:.3f} | {g['samples_per_depth']} |")
    lines += ["", "![loss](bench/passkey_loss.png)", "", WHY]
    return "\n".join(lines) + "\n"
