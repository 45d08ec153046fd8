"""Comparing two exported graphs (eager.compare): what differs between them, and the state a graph writes in place.

Where the comparison cannot vouch for the values, check runs both graphs (the second opinion,
eager/test_running.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modeswap import Mode
from modeswap.eager.compare import compare, written_state
from modeswap.eager.running import second_opinion
from modeswap.testing import export

ROWS = (torch.randn(5, 4, generator=torch.Generator().manual_seed(0)),)


class ZeroHead(nn.Module):
    """``trunk(x) + head(x * scale)`` with a zero-initialised head: ``scale`` changes no output, only head's grads.

    ``scale`` is a tensor constant of 32 values, which compare reads by a
    digest of its bytes (it read only its shape and dtype before): the second
    opinion, run by itself, finds the difference as well.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.trunk, self.head = nn.Linear(32, 3), nn.Linear(32, 3)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.scale = torch.full((32,), scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.trunk(x) + self.head(x * self.scale)
        return out


def test_gradients_show_a_difference_that_the_outputs_hide() -> None:
    torch.manual_seed(0)
    one, two = ZeroHead(1.0), ZeroHead(2.0)
    two.load_state_dict(one.state_dict())
    args = (torch.randn(2, 32),)
    expected, actual = export(one, args, Mode.TRAIN), export(two, args, Mode.TRAIN)
    (found,) = compare(expected, actual, Mode.TRAIN)  # the constants' values differ
    assert (found.side, found.ops) == ("both", ("mul.Tensor",))
    torch.testing.assert_close(expected(*args), actual(*args), rtol=0, atol=0)  # and return the same
    found = list(second_opinion(expected, actual, (args, {}), (0, 1)))
    assert [(f.side, f.module_path, f.argument) for f in found] == [("values", "head", "grads['head.weight']")]
    assert found[0].values == ([0], None)  # no random numbers: one seed


@pytest.mark.parametrize(
    ("model", "training", "written"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), True, {"1.running_mean", "1.running_var"}),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), False, set()),
        (nn.Sequential(nn.Embedding(10, 4, max_norm=1.0)), False, {"0.weight"}),
    ],
    ids=["batch-norm-train", "batch-norm-eval", "embedding-max-norm"],
)
def test_written_state_names_what_a_graph_writes_in_place(model: nn.Module, training: bool, written: set[str]) -> None:
    args = (torch.tensor([[1, 2, 3]]),) if isinstance(model[0], nn.Embedding) else ROWS
    found = written_state(export(model, args, Mode.TRAIN if training else Mode.EVAL))
    assert found - {"1.num_batches_tracked"} == written
