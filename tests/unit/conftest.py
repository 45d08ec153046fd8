"""The unit tests: one folder per layer of the package, one file per module (tests/unit/<layer>/test_<module>.py).

The folders are packages (``unit.rewrite.test_counters``), so that two layers may
hold test files of one name. This folder itself goes on ``sys.path``:
``archived_models`` and ``registering`` are imported by those names, the names
the archives that the tests write give their output types, as a fresh
interpreter that reads them imports them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from modeswap.testing.models import Net

HERE = str(Path(__file__).parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


@pytest.fixture
def x() -> torch.Tensor:
    """The input of :func:`train_gm`."""
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def train_gm(x: torch.Tensor) -> torch.fx.GraphModule:
    """A train export of conv, batch norm and dropout, then a non-persistent buffer and a tensor constant.

    What the public passes (test_passes.py) and the pass machinery (rewrite/test_base.py) run on.
    """
    torch.manual_seed(0)
    # The tensor constant (offset) is neither parameter nor buffer.
    net = Net(
        padding=0,
        momentum=0.3,
        eps=1e-3,
        p=0.25,
        relu=False,
        pool=False,
        head=None,
        scale=torch.full((4, 1, 1), 2.0),
        offset=torch.ones(4, 1, 1),
    )
    return torch.export.export(net.train(), (x,)).module()
