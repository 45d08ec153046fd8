"""The batch norm rows of the semantics table, in both directions, against eager PyTorch.

Its batch counter (``num_batches_tracked``) has tests of its own: rewrite/test_counters.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modeswap
from modeswap import UnsupportedGraphError
from modeswap.testing import assert_mode_equivalent, export, other

from ...sites import MODES, arg, calls, nodes, randn, with_stats

aten = torch.ops.aten


BATCH_NORMS = [
    pytest.param(nn.BatchNorm1d, (4, 3), id="1d-NC"),
    pytest.param(nn.BatchNorm1d, (2, 3, 5), id="1d-NCL"),
    pytest.param(nn.BatchNorm2d, (2, 3, 2, 3), id="2d"),
    pytest.param(nn.BatchNorm3d, (2, 3, 2, 2, 2), id="3d"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize(("cls", "shape"), BATCH_NORMS)
def test_batchnorm_matches_eager_and_keeps_literals(cls: type, shape: tuple[int, ...], affine: bool, mode: str) -> None:
    model = nn.Sequential(nn.ReLU(), with_stats(cls(3, eps=1e-3, momentum=0.3, affine=affine)))
    swapped = assert_mode_equivalent(model, (randn(*shape),), mode)
    (node,) = nodes(swapped.module, aten.batch_norm.default)
    assert (arg(node, "training"), arg(node, "momentum"), arg(node, "eps")) == (mode == "train", 0.3, 1e-3)
    assert (arg(node, "weight") is None) is not affine
    counters = nodes(swapped.module, aten.add_.Tensor)
    assert len(counters) == (mode == "train")


@pytest.mark.parametrize("exported_in", MODES)
@pytest.mark.parametrize(
    ("norm", "shape"),
    [
        pytest.param(nn.BatchNorm2d(3, momentum=0.3, eps=1e-3, track_running_stats=False), (2, 3, 2, 2), id="batch"),
        pytest.param(nn.InstanceNorm2d(3, affine=True), (2, 3, 2, 3), id="instance"),
    ],
)
def test_norm_without_running_stats_is_untouched(norm: nn.Module, shape: tuple[int, ...], exported_in: str) -> None:
    model = nn.Sequential(nn.ReLU(), norm)
    args = (randn(*shape),)
    gm = export(model, args, exported_in)
    swapped = modeswap.swap(gm, other(exported_in))
    assert swapped.changes == ()
    assert calls(swapped.module) == calls(gm)
    for mode in MODES:
        assert_mode_equivalent(model, args, mode, exported_in=exported_in)


def test_cumulative_momentum_cannot_go_to_train() -> None:
    gm = export(nn.BatchNorm1d(3, momentum=None), (randn(4, 3),), "eval")
    with pytest.raises(UnsupportedGraphError, match=r"momentum=None") as info:
        modeswap.to_train(gm)
    message = str(info.value)
    assert "batch_norm" in message
    assert "numeric momentum" in message
