"""The eager oracle's comparison of two runs (modeswap.testing.oracle.assert_same_run)."""

from __future__ import annotations

import pytest
import torch

from modeswap.testing import assert_same_run


def run(output: torch.Tensor) -> dict[str, object]:
    return {"outputs": [output], "input_grads": [None], "buffers": {"bn.running_mean": output}, "grads": {}}


def test_a_nan_agrees_with_a_nan_in_the_same_place():
    # Seen in tests/property/test_modal_submodule_modes.py (CI profile): a Dropout(0.9), two Conv3d and a
    # bidirectional 3-layer RNN trained by the test's SGD steps, whose eager run and modal run both gave NaN.
    nan = torch.tensor([1.0, float("nan"), 3.0])
    assert_same_run(run(nan), run(nan.clone()), atol=0.0, rtol=0.0)


@pytest.mark.parametrize(
    ("expected", "actual"),
    [([1.0, float("nan")], [1.0, 2.0]), ([1.0, 2.0], [float("nan"), 2.0]), ([float("nan"), 2.0], [1.0, float("nan")])],
)
def test_a_nan_on_one_side_only_is_a_difference(expected, actual):
    with pytest.raises(AssertionError, match="outputs"):
        assert_same_run(run(torch.tensor(expected)), run(torch.tensor(actual)), atol=0.0, rtol=0.0)
