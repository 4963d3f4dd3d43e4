"""Hybrid models (Mamba2, short convolutions, ...) context-parallel through ringattn.hf.prepare: logits and every
parameter gradient equal to the same model in one process, on 2 and 4 ranks, every layout, odd lengths, packed
documents."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("transformers")

from ringattn import hf  # noqa: E402

from .test_hf_sweep import FEATURES, compare  # noqa: E402

FAMILIES = ("mamba2", "lfm2", "granitemoehybrid", "bamba")


def run(families: tuple[str, ...], layout: str, packed: list | None = None) -> dict:
    hf.register(layout=layout)
    warnings.filterwarnings("ignore")
    return {f: compare(f, f, FEATURES.get(f, {}), layout, packed=packed) for f in families}


def exact(results: dict) -> None:
    bad = {k: r for k, r in results.items() if r["status"] != "exact"}
    assert not bad, bad


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_hybrids_exact_2_ranks(ranks, layout):
    exact(ranks.run(2, run, FAMILIES, layout)[0])


def test_hybrids_exact_3_ranks(ranks):
    exact(ranks.run(3, run, FAMILIES, "contiguous")[0])
