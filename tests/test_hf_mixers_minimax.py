"""MiniMax's lightning attention (hf/mixers/lightning.py) context-parallel through ringattn.hf.prepare, beside ring
attention in the same model: logits and every parameter gradient equal to the same model in one process (float64),
on 2 and 3 ranks (4 under -m slow), contiguous, zigzag, striped and balanced, odd lengths, batch > 1, packed
documents from position_ids restarts (against each document run alone: the module's own forward carries its state
across them)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ringattn import hf  # noqa: E402

from . import test_hf_sweep as sw  # noqa: E402
from .reference import grad_errors  # noqa: E402

pytestmark = pytest.mark.skipif(not sw.HYBRIDS_RUN, reason="transformers before 5.25 refuses hybrid models")

# Lightning layer first, so that its decay is the strong one (the slope shrinks with the layer index to ~0 at the
# last layer) and ring attention reads its output. Blocks of 4 put the forward's block boundaries inside every
# rank's pieces.
EXTRA = dict(layer_types=["linear_attention", "full_attention"], block_size=4)
TOL = 1e-10


@contextlib.contextmanager
def float64_minimax():
    """MiniMax's modeling file in float64 throughout (its RMSNorm casts to float32), in both runs alike."""
    saved = sw.FLOAT64_INSIDE
    sw.FLOAT64_INSIDE = saved | {"minimax"}
    try:
        with sw.float64_inside("minimax"), sw.float64_softmax():
            yield
    finally:
        sw.FLOAT64_INSIDE = saved


def build():
    """The tiny model, its lightning layers' decay tables in float64: transformers computes them in float32 when it
    builds the module, and the two runs cut the sequence into blocks at different places, so each would apply a
    different mix of float32-rounded and float64 decays (the module's blocked and token-by-token paths differ by as
    much, ~1e-8, in one process)."""
    model, _ = sw.build("minimax", EXTRA, 0)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for m in model.modules():
            if hasattr(m, "decay_factors"):
                slope = m.get_slope_rate()
                for name, t in zip(("slope_rate", "query_decay", "key_decay", "diagonal_decay"),
                                   (slope, *m.decay_factors(slope))):
                    getattr(m, name).copy_(t)
    finally:
        torch.set_default_dtype(dtype)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def case(ref, cp, layout: str, batch: int, seq: int, docs: list[list[int]] | None = None) -> dict:
    """Every rank: the prepared model on this rank's shard against the model in one process; rank 0 returns the
    errors (logits, loss, the worst parameter gradient). ``docs``: each row's document boundaries (packed documents,
    marked by position_ids restarts), the reference running each document alone."""
    import ringattn

    hf.register(layout=layout)
    ref.zero_grad(set_to_none=True)
    cp.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(seq + batch)
    ids = torch.randint(3, sw.VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[torch.rand(batch, seq, generator=g) < 0.2] = hf.IGNORE_INDEX
    pos = None
    if docs is not None:
        for r, row in enumerate(docs):
            labels[r, row[1:-1]] = hf.IGNORE_INDEX
        pos = torch.stack([torch.cat([torch.arange(b - a) for a, b in zip(row, row[1:])]) for row in docs])
    sb = hf.shard_batch(ids, labels, layout=layout, position_ids=pos)
    # balanced places tokens by document: the model is given the documents too
    extra = {k: sb[k] for k in ("cu_seq_lens_q",) if k in sb}
    with float64_minimax():
        logits = cp(input_ids=sb["input_ids"], position_ids=sb["position_ids"], use_cache=False, **extra).logits
        loss = hf.causal_lm_loss(logits, sb["shift_labels"], sb["num_items_in_batch"])
        loss.backward()
    hf.sync_gradients(cp)
    full = ringattn.unshard(logits.detach(), layout=layout, seq_len=seq, cu_seqlens=sb.get("cu_seq_lens_q"))
    if torch.distributed.get_rank() != 0:
        return {}
    with float64_minimax():
        if docs is None:
            want = ref(input_ids=ids, use_cache=False).logits
        else:
            want = torch.cat([torch.cat([ref(input_ids=ids[r:r + 1, a:b], use_cache=False).logits
                                         for a, b in zip(row, row[1:])], 1) for r, row in enumerate(docs)])
        ref_loss = torch.nn.functional.cross_entropy(want[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                     ignore_index=hf.IGNORE_INDEX)
        ref_loss.backward()
    errs = {"logits": rel(full, want.detach()), "loss": rel(loss.detach(), ref_loss.detach())}
    errs.update(grad_errors(cp, ref, rel))
    return errs


def cases(layouts: tuple[str, ...], shapes: tuple[tuple, ...], checkpointed: bool = False) -> dict:
    warnings.filterwarnings("ignore")
    hf.register(layout=layouts[0])
    ref = build()
    cp = build()
    cp.load_state_dict(ref.state_dict())
    cp.set_attn_implementation("ring")
    hf.prepare(cp)
    if checkpointed:  # backward recomputes each layer, the lightning layer's pieces and state passing included
        cp.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        cp.train()
    return {(layout, *shape[:2], shape[2] is not None): case(ref, cp, layout, *shape)
            for layout in layouts for shape in shapes}


def exact(results: dict) -> None:
    bad = {k: max(v.items(), key=lambda kv: kv[1]) for k, v in results.items() if max(v.values()) > TOL}
    assert not bad, bad
    assert all(len(v) > 10 for v in results.values())  # every parameter's gradient was compared


# (batch, length, documents): an odd length (the layout pads it), and two rows of packed documents that differ per
# row: one inside a rank's shard, one across ranks, one of one token, one ending in the padding.
SHAPES = ((2, 29, None), (2, 30, [[0, 5, 17, 30], [0, 11, 12, 30]]))


LAYOUTS = ("contiguous", "zigzag", "striped", "balanced")


def test_minimax_exact_2_ranks(ranks):
    # One job for every layout: the models are built once.
    exact(ranks.run(2, cases, LAYOUTS, SHAPES)[0])


def test_minimax_exact_3_ranks(ranks):
    exact(ranks.run(3, cases, ("zigzag", "balanced"), SHAPES[1:])[0])  # packed rows: pieces of 1-5 tokens


def test_minimax_activation_checkpointing(ranks):
    exact(ranks.run(2, cases, ("zigzag",), SHAPES[:1], True)[0])


@pytest.mark.slow
def test_minimax_exact_4_ranks(ranks):
    exact(ranks.run(4, cases, LAYOUTS, SHAPES)[0])


def generate_case(layout: str) -> dict:
    """model.generate() on every rank: with a cache refused (MiniMax's decoder takes only its own cache class);
    without one, every step runs the whole sequence context-parallel, the tokens and float64 logits of one process."""
    from .reference import rel_err
    from .test_hf_generate import generate, prompts

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    hf.register(layout=layout)
    ref = build()
    cp = build()
    cp.load_state_dict(ref.state_dict())
    hf.prepare(cp)
    cp.set_attn_implementation("ring")
    out = {}
    with float64_minimax():
        # Left padding: the mixer gets this rank's shard of the padding mask, which zeroes the padded tokens'
        # queries, keys and values (the inherited state's part included). The reference generates without a cache
        # too: in one process, a left-padded row's logits with a cache differ from those without by 4e-3.
        for pad in (None, "left"):
            ids, mask = prompts(2, 13, pad)
            want, want_logits, _ = generate(ref, ids, mask, max_new_tokens=4, do_sample=False, use_cache=False)
            got, logits, _ = generate(cp, ids, mask, max_new_tokens=4, do_sample=False, use_cache=False)
            out[pad] = (torch.equal(got, want), rel_err(logits, want_logits))
        try:
            generate(cp, ids, None, max_new_tokens=2, do_sample=False)
        except hf.UnsupportedModel as e:
            out["refused"] = str(e)
    return out


def test_minimax_generate(ranks):
    for r in ranks.run(2, generate_case, "zigzag"):
        assert all(r[pad][0] and r[pad][1] < 1e-12 for pad in (None, "left")), r
        assert "model.generate() with a cache" in r.get("refused", ""), r
        assert "pass use_cache=False to generate" in r["refused"], r


def test_the_match_takes_lightning_attention_only():
    # Matched by what its forward does (a linear state from the cache, the decay buffers), not by its class name:
    # every other module of MiniMax and of other hybrids is left to the other checks, and a module whose forward
    # reads the same names but whose decay is not one scalar per head is not taken.
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ringattn.hf.mixers import MODULE_HANDLERS
    from ringattn.hf.mixers.lightning import is_lightning

    assert MODULE_HANDLERS["lightning_attention"].match is is_lightning
    taken = []
    for family in ("minimax", "qwen3_next", "mamba2", "rwkv", "llama"):
        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family])
        with torch.device("meta"):
            model = cls(sw.tiny_config(family, dict(sw.FEATURES.get(family, {}), **(EXTRA if family == "minimax"
                                                                                  else {})), "eager"))
        taken += [(family, p) for p, m in model.named_modules() if is_lightning(m)]
    assert taken == [("minimax", "model.layers.0.self_attn")], taken

    layer = build().model.layers[0].self_attn
    odd = type(layer).__new__(type(layer))  # a decay per head and key channel
    odd.__dict__.update(layer.__dict__)
    odd._buffers = dict(layer._buffers, slope_rate=torch.ones(layer.num_attention_heads, 2, 1))
    assert is_lightning(layer) and not is_lightning(odd)

    class Renamed(torch.nn.Module):  # the same attributes, a forward that reads no linear state
        def __init__(self):
            super().__init__()
            self.__dict__.update(layer.__dict__)

        def forward(self, hidden_states):
            return self.norm(hidden_states)

    assert not is_lightning(Renamed())


def test_a_cache_reaching_the_handler_is_refused():
    # A cache is refused before the module runs (a plain forward's, a generate's); one given to the handler directly
    # would get no state: refused alike, not ignored.
    from ringattn.hf.mixers import MODULE_HANDLERS
    from ringattn.hf.mixers.base import MixerCall

    layer = build().model.layers[0].self_attn
    x = torch.zeros(1, 4, layer.norm.weight.numel(), dtype=torch.float64)
    with pytest.raises(hf.UnsupportedModel, match=r"model.generate\(\) with a cache: .* pass use_cache=False"):
        MODULE_HANDLERS["lightning_attention"].run(layer.forward, MixerCall(layer, None), x, None, None, cache=object())
