"""``ringattn audit`` / ``ringattn.hf.audit``: an exact model passes with a row per layer; a model that really
disagrees context-parallel fails naming the layer and the part, whether ``prepare`` refuses it or only the
comparison can tell; bad input is exit 2 with one line."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from ringattn import cli, hf  # noqa: E402

from .test_hf_sweep import needs_hybrids  # noqa: E402

auditing = importlib.import_module("ringattn.hf.audit")  # the module (ringattn.hf.audit is the function)

SEQ = 30  # not a multiple of 2W: the padded tail is part of every audit here


def llama_config(**kw):
    return transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    attention_dropout=0.0, tie_word_embeddings=False, **kw)


class CumsumMLP(torch.nn.Module):
    """An MLP followed by a running mean over the sequence: token mixing outside attention, under a name that no
    refusal knows, so only the comparison can catch it."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x)
        n = torch.arange(1, y.shape[1] + 1, dtype=y.dtype, device=y.device).view(1, -1, 1)
        return y.cumsum(1) / n


def perturb_above_rank_0(module, args, output):
    """A stand-in for a context-parallel bug: attention slightly off on ranks above 0 only."""
    if dist.is_initialized() and dist.get_rank() > 0:
        return (output[0] * (1 + 1e-6), *output[1:])
    return output


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config()).double()


def cli_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def exact_case(path: str) -> dict:
    """Every rank: the CLI on a config JSON (JSON and table), and the function on a config object."""
    code, out, _ = cli_main(["audit", "--model", path, "--seq-len", str(SEQ), "--json"])
    table_code, table, _ = cli_main(["audit", "--model", path, "--seq-len", str(SEQ), "--layout", "contiguous"])
    report = hf.audit(llama_config(), seq_len=SEQ, layout="striped", batch=2)
    return {"code": code, "out": out, "table_code": table_code, "table": table, "report": report}


def test_exact_llama(ranks, tmp_path):
    path = tmp_path / "config.json"
    llama_config().to_json_file(path)
    results = ranks.run(2, exact_case, str(path))
    r0 = results[0]
    assert r0["code"] == 0 and r0["table_code"] == 0, r0
    d = json.loads(r0["out"])
    assert d["ok"] and d["culprit"] is None and d["refused"] is None
    assert d["world"] == 2 and d["layout"] == "zigzag" and d["seq_len"] == SEQ and d["reference"] == "sdpa"
    assert d["tol"] == auditing.TOL == 1e-9 and not d["float32_inside"]
    names = [r["name"] for r in d["rows"]]
    assert names == ["layer 0", "layer 1", "logits", "loss", "other parameters"]
    for r in d["rows"]:
        assert r["ok"] and r["part"] is None, r
        assert all(r[k] is None or r[k] <= 1e-9 for k in ("output_err", "grad_err")), r
    assert all(r["grad_err"] <= 1e-9 and r["worst_param"] for r in d["rows"][:2])
    assert d["rows"][0]["cls"] == "LlamaDecoderLayer" and d["rows"][0]["module"] == "model.layers.0"
    assert "layer 1" in r0["table"] and "exact:" in r0["table"] and "contiguous" in r0["table"]
    assert r0["report"].ok and r0["report"].batch == 2 and r0["report"].layout == "striped"
    assert results[1]["code"] == 0 and results[1]["out"] == ""  # rank 0 prints, every rank gets the status
    assert results[1]["report"].ok  # the report reaches every rank


def checkpoint_case(path: str) -> hf.AuditReport:
    return hf.audit(path, seq_len=SEQ, layout="contiguous")


def test_checkpoint_folder(ranks, tmp_path):
    # A saved checkpoint is audited with its own weights (from_pretrained in float64), not random ones.
    tiny_llama(seed=3).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "bare").mkdir()
    llama_config().to_json_file(tmp_path / "bare" / "config.json")
    with_weights, bare = (ranks.run(2, checkpoint_case, str(tmp_path / d))[0] for d in ("ckpt", "bare"))
    assert with_weights.ok and with_weights.model.endswith("(its weights)"), with_weights
    assert bare.ok and bare.model.endswith("(random weights, none in the folder)"), bare


def balanced_case() -> hf.AuditReport:
    return hf.audit(llama_config(), seq_len=SEQ, layout="balanced")


def test_balanced_layout(ranks):
    # The balanced layout places tokens by the documents shard_batch found: the audit unshards by them too.
    for report in ranks.run(2, balanced_case):
        assert report.ok and report.layout == "balanced", report


def disagreeing_case() -> dict:
    cumsum = tiny_llama()
    cumsum.model.layers[1].mlp = CumsumMLP(cumsum.model.layers[1].mlp)
    off = tiny_llama()
    off.model.layers[0].self_attn.register_forward_hook(perturb_above_rank_0)
    return {"cumsum": hf.audit(cumsum, seq_len=SEQ), "off": hf.audit(off, seq_len=SEQ)}


def test_disagreeing_models_are_named(ranks):
    r = ranks.run(2, disagreeing_case)[0]
    cumsum, off = r["cumsum"], r["off"]
    assert not cumsum.ok and cumsum.refused is None  # prepare does not know it: the comparison caught it
    assert cumsum.culprit.startswith("layer 1 (CumsumMLP): mlp output differs"), cumsum.culprit
    assert "mixes tokens outside attention" in cumsum.culprit
    # Layer 0's output matches (its gradients do not: they flow back through layer 1).
    assert cumsum.rows[0].output_err <= 1e-9 and cumsum.rows[0].part is None and not cumsum.rows[1].ok
    assert cumsum.rows[1].part == "mlp (CumsumMLP)"
    assert cumsum.rows[1].output_err > 1e-3
    assert not off.ok and off.culprit.startswith("layer 0 (LlamaAttention): attention output differs"), off.culprit
    assert off.rows[0].part == "self_attn (LlamaAttention)" and 1e-8 < off.rows[0].output_err < 1e-4
    assert "culprit: layer 0 (LlamaAttention)" in off.table()


def hybrid_case() -> dict:
    """Every rank: the CLI on a model type (Mamba2: its mixers alone), the function on configs whose layers
    alternate a mixer and attention (Granite-4.0-H's Mamba2 layer, LFM2's short convolution)."""
    code, out, _ = cli_main(["audit", "--model", "mamba2", "--seq-len", str(SEQ), "--json"])
    configs = {"granitemoehybrid": dict(layer_types=["mamba", "attention"]),
               "lfm2": dict(layer_types=["conv", "full_attention"])}
    reports = {k: hf.audit(auditing.tiny_config(k, **kw), seq_len=SEQ, layout="contiguous")
               for k, kw in configs.items()}
    return {"code": code, "out": out, **reports}


@needs_hybrids
def test_hybrids_compare_mixer_layers_like_attention_layers(ranks):
    r = ranks.run(2, hybrid_case)[0]
    d = json.loads(r["out"])
    assert r["code"] == 0 and d["ok"] and d["tol"] == 1e-9 and not d["float32_inside"], d
    assert [row["name"] for row in d["rows"]] == ["layer 0", "layer 1", "logits", "loss", "other parameters"]
    for row in d["rows"][:2]:
        assert row["cls"] == "Mamba2Block" and "Mamba2 selective scan (SSD)" in row["mixes"], row
        assert "causal short convolution" in row["mixes"] and row["output_err"] <= 1e-9 and row["grad_err"] <= 1e-9
    granite, lfm2 = r["granitemoehybrid"], r["lfm2"]
    assert granite.ok and lfm2.ok and granite.tol == lfm2.tol == 1e-9, (granite.table(), lfm2.table())
    assert granite.rows[0].mixes.startswith("mamba: ") and granite.rows[1].mixes is None, granite.table()
    assert lfm2.rows[0].mixes == "conv: causal short convolution" and lfm2.rows[1].mixes is None, lfm2.table()
    assert all(row.output_err <= 1e-9 and row.grad_err <= 1e-9 for rep in (granite, lfm2) for row in rep.rows[:2])
    assert "[conv: causal short convolution]" in lfm2.table()


def broken_mixer_case() -> hf.AuditReport:
    # A stand-in for a bug in a mixer ringattn runs: the scan over the local shard alone, from a zero state.
    from ringattn.hf.mixers import HANDLERS, Handler

    saved = HANDLERS["mamba2_scan_forward"]
    HANDLERS["mamba2_scan_forward"] = Handler(saved.name, saved.what, lambda original, call, *a, **k: original(*a, **k))
    try:
        return hf.audit("mamba2", seq_len=SEQ)
    finally:
        HANDLERS["mamba2_scan_forward"] = saved


@needs_hybrids
def test_a_wrong_mixer_is_named(ranks):
    r = ranks.run(2, broken_mixer_case)[0]
    assert not r.ok and r.refused is None and r.rows[0].part == "mixer (Mamba2Mixer)", r.table()
    assert r.culprit.startswith("layer 0 (Mamba2Mixer): mixer output differs"), r.culprit
    assert "ringattn runs its token mixing context-parallel (" in r.culprit and "ringattn bug" in r.culprit


@contextlib.contextmanager
def without_handlers(*names):
    """RWKV as a family whose token mixing ringattn does not know would meet it: its handlers taken away."""
    from ringattn.hf.mixers import HANDLERS, MODULE_HANDLERS

    saved = {n: (t, t.pop(n)) for n in names for t in (HANDLERS, MODULE_HANDLERS) if n in t}
    try:
        yield
    finally:
        for n, (t, h) in saved.items():
            t[n] = h


RWKV_HANDLERS = ("token shift", "rwkv_linear_attention")


def test_refused_hybrids_name_the_layer(tmp_path):
    # Refusals come from the structure alone (meta device): no rank is started, so this runs in the test process.
    path = tmp_path / "rwkv.json"
    auditing.tiny_config("rwkv").to_json_file(path)
    with without_handlers(*RWKV_HANDLERS):
        code, out, _ = cli_main(["audit", "--model", str(path), "--nproc", "2"])
    assert code == 1, out
    culprit = out.strip().splitlines()[-1]
    assert culprit.startswith("culprit: layer 0 (RwkvSelfAttention): token mixing outside attention that "
                              "ringattn does not know"), culprit
    with without_handlers("xLSTMBackend"):
        xl = hf.audit("xlstm")
    assert xl.culprit.startswith("layer 0 (xLSTMBackend): token mixing outside attention"), xl.culprit
    assert "UnsupportedModel" in xl.refused and xl.rows == []
    # Refused by the name of a layer type only (config.layer_types), not by any module: still the layer.
    # (transformers reads "mamba" there as "linear_attention").
    named = hf.audit(llama_config(layer_types=["full_attention", "mamba"]), nproc=2)
    assert named.culprit.startswith("layer 1 (LlamaDecoderLayer): a 'linear_attention' layer: token mixing"), \
        named.culprit
    assert "config.layer_types" in named.refused
    code, out, _ = cli_main(["audit", "--model", "bloom", "--json"])
    d = json.loads(out)
    assert code == 1 and d["culprit"].startswith("model (BloomForCausalLM): attention off transformers' "
                                                 "attention interface"), d


def compare_refused_case() -> dict:
    with without_handlers(*RWKV_HANDLERS):
        return hf.audit("rwkv", seq_len=SEQ, compare_refused=True)


def test_compare_refused_shows_where(ranks):
    # The refusal is by structure (a mixer's class name); compared anyway, the numbers agree with it.
    r = ranks.run(2, compare_refused_case)[0]
    assert not r.ok and "RwkvSelfAttention" in r.refused
    assert r.culprit.startswith("layer 0 (RwkvSelfAttention): token mixing outside attention that ringattn "
                                "does not know")
    assert "compared anyway: layer 0 (RwkvSelfAttention): attention output differs" in r.culprit, r.culprit
    assert any("(RwkvSelfAttention)" in (row.part or "") for row in r.rows), [row.part for row in r.rows]


def test_bad_input_is_exit_2(tmp_path):
    missing = tmp_path / "nope" / "config.json"
    code, out, err = cli_main(["audit", "--model", str(missing)])
    assert code == 2 and out == "" and err.startswith("ringattn audit: error: ") and "no such file" in err, err
    assert len(err.strip().splitlines()) == 1
    code, _, err = cli_main(["audit"])
    assert code == 2 and "--model is required" in err
    code, _, err = cli_main(["audit", "--model", "not-a-model-type"])
    assert code == 2 and "not a file, a folder or a transformers model type" in err
    (tmp_path / "empty").mkdir()
    code, _, err = cli_main(["audit", "--model", str(tmp_path / "empty")])
    assert code == 2 and "without config.json" in err
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = cli_main(["audit", "--model", str(tmp_path / "bad.json")])
    assert code == 2 and "not a transformers config" in err
    code, _, err = cli_main(["audit", "--model", "llama", "--seq-len", "1"])
    assert code == 2 and "seq_len" in err
    code, _, err = cli_main(["audit", "--model", "llama", "--seq-len", "100000"])
    assert code == 2 and "max_position_embeddings" in err
    code, _, err = cli_main(["audit", "--model", "vit"])  # a vision encoder: no causal LM to build
    assert code == 2 and "cannot build it as a causal LM" in err, err
    with pytest.raises(ValueError, match="layout"):
        hf.audit("llama", layout="diagonal")


@pytest.mark.slow
def test_cli_spawns_ranks(tmp_path):
    """The command as a user runs it: its own 2 spawned ranks, a checkpoint folder with weights."""
    tiny_llama().save_pretrained(tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    r = subprocess.run([sys.executable, "-m", "ringattn", "audit", "--model", str(tmp_path / "ckpt"), "--nproc", "2",
                        "--seq-len", "64"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(its weights)" in r.stdout and "exact:" in r.stdout and "layer 1" in r.stdout
