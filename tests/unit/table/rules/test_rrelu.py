"""The rrelu rows of the semantics table, in both directions, against eager PyTorch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modeswap
from modeswap.testing import assert_mode_equivalent, export

from ...sites import MODES, calls, nodes, randn

aten = torch.ops.aten


RRELUS = [
    pytest.param(nn.RReLU(0.1, 0.3), id="custom"),
    pytest.param(nn.RReLU(), id="default"),
    pytest.param(nn.RReLU(0.1, 0.3, inplace=True), id="custom-inplace"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", RRELUS)
def test_rrelu_matches_eager_and_the_other_export(layer: nn.Module, mode: str) -> None:
    model = nn.Sequential(nn.Linear(3, 3), layer)
    args = (randn(4, 3),)
    swapped = assert_mode_equivalent(model, args, mode)
    # to_train pads the defaults an eval export strips (rrelu(x)); to_eval strips them again.
    assert calls(swapped.module) == calls(export(model, args, mode))
    (node,) = nodes(swapped.module, aten.rrelu.default, aten.rrelu_.default)
    if mode == "train":
        assert node.args[1:] == (layer.lower, layer.upper, True)


def test_rrelu_custom_bounds_kept_in_eval() -> None:
    gm = modeswap.to_eval(export(nn.RReLU(0.1, 0.3), (randn(4, 3),), "train"))
    (node,) = nodes(gm, aten.rrelu.default)
    assert node.args[1:] == (0.1, 0.3)
