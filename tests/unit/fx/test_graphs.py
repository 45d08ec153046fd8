"""Graphs inside a graph (fx.graphs): sites in higher-order-op subgraphs, as a ``torch.no_grad()`` region exports.

Each swap reaches them, and is checked against eager.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import modeswap
from modeswap.testing import assert_same_run, call_signature, export, run_forward_backward


class NoGradRegion(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4, momentum=0.2)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = self.drop(self.bn(x))
        return self.drop(self.fc(x)) + y


@pytest.fixture
def model() -> NoGradRegion:
    torch.manual_seed(0)
    return NoGradRegion()


x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))


def test_the_region_is_a_subgraph(model):
    gm = export(model, (x,), "train")
    assert any(path.startswith("submod") for path, _ in modeswap.fx.graphs.graph_modules(gm))
    nodes = {site.node for site in modeswap.mode_of(gm).sites}
    assert {"submod_1.batch_norm", "submod_1.dropout", "dropout_1"} <= nodes


def test_train_export_swaps_to_eval_inside_the_subgraph(model):
    evaluated = modeswap.to_eval(export(model, (x,), "train"))
    assert modeswap.mode_of(evaluated).mode is modeswap.Mode.EVAL
    expected = run_forward_backward(copy.deepcopy(model).eval(), (x,), seed=0)
    assert_same_run(expected, run_forward_backward(evaluated, (x,), seed=0), atol=1e-6, rtol=1e-5)


def test_round_trip_through_eval_restores_the_subgraph(model):
    gm = export(model, (x,), "train")
    back = modeswap.to_train(modeswap.to_eval(gm))
    for (_, old), (_, new) in zip(
        modeswap.fx.graphs.graph_modules(gm), modeswap.fx.graphs.graph_modules(back), strict=True
    ):
        assert call_signature(new) == call_signature(old)
    for _ in range(2):
        expected = run_forward_backward(model.train(), (x,), seed=3)
        actual = run_forward_backward(back, (x,), seed=3)
        assert_same_run(expected, actual, atol=1e-6, rtol=1e-5)
    assert back.bn.num_batches_tracked.item() == 2


def test_eval_export_cannot_count_batches_inside_a_subgraph(model):
    with pytest.raises(modeswap.UnsupportedGraphError, match=r"submod_1\.batch_norm.*subgraph.*num_batches_tracked"):
        modeswap.to_train(export(model, (x,), "eval"))
