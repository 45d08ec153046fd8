"""The dropout rows of the semantics table, in both directions, against eager PyTorch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from modeswap.testing import assert_mode_equivalent

from ...sites import MODES, InplaceDropout, arg, nodes, randn

aten = torch.ops.aten


DROPOUTS = [
    pytest.param(nn.Dropout(0.3), (4, 3), aten.dropout.default, id="Dropout"),
    pytest.param(nn.Dropout(0.3, inplace=True), (4, 3), aten.dropout_.default, id="Dropout-inplace"),
    pytest.param(nn.Dropout1d(0.3), (2, 3, 4), aten.feature_dropout.default, id="Dropout1d"),
    pytest.param(nn.Dropout1d(0.3, inplace=True), (2, 3, 4), aten.feature_dropout_.default, id="Dropout1d-inplace"),
    pytest.param(nn.Dropout2d(0.3), (2, 3, 2, 4), aten.feature_dropout.default, id="Dropout2d"),
    pytest.param(nn.Dropout2d(0.3, inplace=True), (2, 3, 2, 4), aten.feature_dropout_.default, id="Dropout2d-inplace"),
    pytest.param(nn.Dropout3d(0.3), (2, 3, 2, 2, 4), aten.feature_dropout.default, id="Dropout3d"),
    pytest.param(nn.Dropout3d(0.3, inplace=True), (2, 3, 2, 2, 4), aten.feature_dropout_.default, id="Dropout3d-inp"),
    pytest.param(nn.AlphaDropout(0.3), (4, 3), aten.alpha_dropout.default, id="AlphaDropout"),
    pytest.param(nn.AlphaDropout(0.3, inplace=True), (4, 3), aten.alpha_dropout.default, id="AlphaDropout-inplace"),
    pytest.param(nn.FeatureAlphaDropout(0.3), (2, 3, 2, 4), aten.feature_alpha_dropout.default, id="FeatureAlpha"),
    pytest.param(InplaceDropout(0.3), (4, 3), aten.dropout_.default, id="F.dropout-inplace"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("layer", "shape", "op"), DROPOUTS)
def test_dropout_matches_eager_and_keeps_p(layer: nn.Module, shape: tuple[int, ...], op: Any, mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(shape[-1], shape[-1]), layer)
    swapped = assert_mode_equivalent(model, (randn(*shape),), mode)
    (node,) = nodes(swapped.module, op)
    assert arg(node, "p") == 0.3
    assert type(arg(node, "p")) is float
    assert arg(node, "train") is (mode == "train")
