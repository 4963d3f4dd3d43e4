"""Where the audited model comes from: a config, a saved folder, a hub name or a model type with a tiny config."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any

import torch

from ..features import model_name
from .report import first_line

# A tiny random config for a model type name: sizes every family understands, set where the config has the field.
TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_layers=2, n_layer=2,
            num_attention_heads=4, n_head=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
            n_positions=1024, tie_word_embeddings=False, num_experts=4, num_local_experts=4, n_routed_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=16, n_embd=32, d_model=32, ffn_dim=48,
            attention_dropout=0.0, hidden_dropout=0.0, dropout=0.0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
            n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
            # state-space mixers of hybrids: their full-size defaults cost seconds per call even at 30 tokens
            mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=8, mamba_expand=1,
            mamba_d_conv=4)


_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class Source:
    """Where the model comes from: a config (random weights from ``seed``), a checkpoint folder, or a model."""

    label: str
    config: Any = None
    path: str | None = None
    model: torch.nn.Module | None = None
    trust_remote_code: bool = False

    def build(self, attn: str, seed: int, device: str | torch.device | None = None) -> torch.nn.Module:
        """The model with attention ``attn``; in float64 unless ``device`` (a meta build, for its structure)."""
        if self.model is not None:
            model = copy.deepcopy(self.model)
            model.set_attn_implementation(attn)
        elif self.path is not None and _has_weights(self.path) and device is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float64, **self._load_kwargs(attn))
        else:
            model = self._random(attn, seed, device)
        if device is None:
            model = model.double()
        _eager_experts(model)
        return model.eval()  # no dropout; gradients still flow

    def _load_kwargs(self, attn: str) -> dict:
        return {"attn_implementation": attn, "trust_remote_code": self.trust_remote_code}

    def _random(self, attn: str, seed: int, device) -> torch.nn.Module:
        """Random weights from ``seed``: identical on every rank and in the reference."""
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        # Built in float64: tables a module computes once when it is built (MiniMax's decay per position) are then
        # float64 too, not float32 values widened.
        kw = self._load_kwargs(attn) if device is not None else {**self._load_kwargs(attn), "dtype": torch.float64}
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(self.config, **kw)
        if device is None:
            _perturb_norms(model, seed)
        return model


@torch.no_grad()
def _perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial norm weights, so that their gradients are tested for real."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "norm" in n:
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _eager_experts(model: torch.nn.Module) -> None:
    # grouped_mm experts have no float64; the eager loop is the same math
    with contextlib.suppress(Exception):
        if type(model)._can_set_experts_implementation():
            model.set_experts_implementation("eager")


def _has_weights(path: str) -> bool:
    return any((pathlib.Path(path) / w).exists() for w in _WEIGHTS)


def resolve(model: str | os.PathLike | Any, *, trust_remote_code: bool = False) -> Source:
    """A :class:`Source` for a config JSON file, a local checkpoint folder, a model type name (a tiny random
    config), a ``PretrainedConfig`` or a model. Raises ``FileNotFoundError`` / ``ValueError`` naming the input."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if isinstance(model, torch.nn.Module):
        if getattr(model, "config", None) is None:
            raise TypeError(f"audit needs a transformers PreTrainedModel, got {type(model).__name__}")
        return Source(type(model).__name__, config=model.config, model=model)
    if isinstance(model, transformers.PretrainedConfig):
        return Source(model_name(model), config=model)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path, a model type name, a PretrainedConfig or a model, "
                        f"got {type(model).__name__}")
    text = os.fspath(model)
    p = pathlib.Path(text).expanduser()
    if p.is_file():
        try:
            cfg = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{text}: not a transformers config JSON ({type(e).__name__}: {first_line(e)})") from None
        return Source(f"{model_name(cfg)} from {text}", config=cfg, trust_remote_code=trust_remote_code)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{text}: a folder without config.json (not a transformers checkpoint)")
        try:
            cfg = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{text}/config.json: not a transformers config "
                             f"({type(e).__name__}: {first_line(e)})") from None
        weights = "its weights" if _has_weights(str(p)) else "random weights, none in the folder"
        return Source(f"{model_name(cfg)} from {text} ({weights})", config=cfg, path=str(p),
                      trust_remote_code=trust_remote_code)
    if text in CONFIG_MAPPING_NAMES and os.sep not in text:
        try:
            cfg = tiny_config(text)
        except Exception as e:  # noqa: BLE001 - a family whose config checks need more than generic sizes
            raise ValueError(f"no generic tiny config of {text!r} builds ({type(e).__name__}: {first_line(e)}); "
                             "write a small config JSON for it and pass its path") from None
        return Source(f"tiny random {text}", config=cfg)
    if os.sep in text or text.endswith(".json") or text.startswith("."):
        raise FileNotFoundError(f"{text}: no such file or folder (hub names are not downloaded: save the "
                                "checkpoint or its config.json locally first)")
    raise ValueError(f"{text!r} is not a file, a folder or a transformers model type (e.g. llama, mistral, "
                     "qwen2)")


def tiny_config(model_type: str, **overrides):
    """A tiny random config of ``model_type`` (2 layers, hidden size 32, vocabulary 61); ``overrides`` set last
    (e.g. ``layer_types=["conv", "full_attention"]``)."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    kw = {k: v for k, v in TINY.items() if hasattr(base, k) and not isinstance(getattr(type(base), k, None), property)}
    if hasattr(base, "qk_rope_head_dim"):  # multi-head latent attention sizes its heads itself
        kw.pop("head_dim", None)
    if getattr(base, "sliding_window", None) is not None:
        kw["sliding_window"] = 5  # below any audited length, so the window is exercised
    if getattr(base, "attention_chunk_size", None) is not None:
        kw["attention_chunk_size"] = 8
    if all(hasattr(base, k) for k in ("num_heads", "head_dim", "expand", "n_groups", "state_size", "chunk_size")):
        # Mamba2's geometry: heads x head_dim = expand x hidden; chunks shorter than the audited length
        kw.update(num_heads=base.expand * kw.get("hidden_size", base.hidden_size) // kw.get("head_dim", base.head_dim),
                  n_groups=1, state_size=8, chunk_size=8)
    vocab = kw.get("vocab_size")
    for k, v in base.to_dict().items():
        # The family's special tokens past the tiny vocabulary (GPT-2's 50256): transformers warns about each, on
        # every rank. None where out of range (a model that needs one in range, as an embedding's padding row, has
        # it in range already, or it would not build).
        if vocab is not None and k.endswith("_token_id") and v is not None:
            if isinstance(v, int) and v >= vocab:
                kw[k] = None
            elif isinstance(v, list) and any(isinstance(i, int) and i >= vocab for i in v):
                kw[k] = [i for i in v if not isinstance(i, int) or i < vocab] or None
    return AutoConfig.for_model(model_type, **{**kw, **overrides})
