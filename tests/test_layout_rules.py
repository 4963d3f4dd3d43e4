"""``layouts.layout_of``: the one place a layout's rules live (documents, halves, padding, rank order)."""

from __future__ import annotations

import pytest
import torch

from ringattn import Layout
from ringattn.layouts import Uneven, global_positions, layout_of, padded_len, uneven_lengths


def test_rules_by_layout():
    assert [n for n in Layout if layout_of(n).needs_documents] == [Layout.BALANCED]
    assert {n for n in Layout if layout_of(n).in_halves} == {Layout.ZIGZAG, Layout.BALANCED}
    assert [n for n in Layout if layout_of(n).strided] == [Layout.STRIPED]
    assert layout_of("zigzag") is layout_of(Layout.ZIGZAG)
    assert all(layout_of(n).in_order(1) for n in Layout) and not layout_of("striped").in_order(4)
    with pytest.raises(ValueError, match="layout must be one of"):
        layout_of("diagonal")


@pytest.mark.parametrize("layout", list(Layout))
def test_padding_and_lengths_match_shard(layout):
    rule = layout_of(layout)
    for world in (1, 2, 3, 4):
        for n in (1, 7, 100, 1001, 4096):
            assert rule.padded_len(n, world) == padded_len(n, world, layout)
            assert rule.padded_len(n, world) % rule.pad_multiple(world, n) == 0
        if layout != Layout.BALANCED:
            assert rule.uneven_lengths(37, world) == uneven_lengths(37, world, layout)
    assert layout_of("zigzag").pad_multiple(4) == 8 and layout_of("striped").pad_multiple(4) == 4


def test_even_length_and_documents_rules():
    with pytest.raises(ValueError, match=r"layout='zigzag' needs an even q local_len, got 5"):
        layout_of("zigzag").check_local_len(2, 5, "q local_len")
    layout_of("zigzag").check_local_len(1, 5)
    layout_of("striped").check_local_len(2, 5)
    with pytest.raises(ValueError, match="places the tokens by the documents"):
        layout_of("balanced").check_documents(2, None)
    layout_of("balanced").check_documents(1, None)


def test_rank_order():
    bounds = (0, 5, 32)
    for layout in Layout:
        order = layout_of(layout).rank_order(4, 8, bounds=bounds)
        want = torch.cat([global_positions(layout, r, 4, 8, None, bounds) for r in range(4)])
        if layout == Layout.CONTIGUOUS:
            assert order is None and torch.equal(want, torch.arange(32))
        else:
            assert torch.equal(order, want)
    uneven = layout_of(Uneven(Layout.ZIGZAG, 30))
    assert uneven.name == "zigzag" and not uneven.in_halves and not uneven.in_order(2)
