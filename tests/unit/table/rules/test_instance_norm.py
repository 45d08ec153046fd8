"""The instance norm rows of the semantics table, in both directions, against eager PyTorch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modeswap.testing import assert_mode_equivalent

from ...sites import MODES, arg, nodes, randn, with_stats

aten = torch.ops.aten


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("cls", "shape"), [(nn.InstanceNorm1d, (2, 3, 5)), (nn.InstanceNorm2d, (2, 3, 2, 3))])
def test_instance_norm_with_running_stats(cls: type, shape: tuple[int, ...], mode: str) -> None:
    norm = with_stats(cls(3, eps=1e-3, momentum=0.3, affine=True, track_running_stats=True))
    swapped = assert_mode_equivalent(nn.Sequential(nn.ReLU(), norm), (randn(*shape),), mode)
    (node,) = nodes(swapped.module, aten.instance_norm.default)
    assert (arg(node, "use_input_stats"), arg(node, "momentum"), arg(node, "eps")) == (mode == "train", 0.3, 1e-3)
    assert nodes(swapped.module, aten.add_.Tensor) == []  # eager InstanceNorm never counts batches
