"""Skeletons: each program of a ModalModule without its tensors, rebuilt around the module's tensors when saved.

A constant of each mode goes back into its own program, and the file holds the state once for both.
The rest of saving and loading: files/test_archive.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.export.pt2_archive._package import load_pt2

import modeswap


class Shifted(nn.Module):
    """A tensor made in forward, of another value in each mode: each program has its own constant, of one name."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = torch.tensor([2.0, 4.0, 6.0]) if self.training else torch.tensor([1.0, 2.0, 3.0])
        return self.linear(x) + shift


def test_a_constant_of_each_mode_is_saved_with_its_program(tmp_path: Path) -> None:
    eager, x = Shifted(), torch.randn(2, 3)
    modeswap.save(modeswap.capture(eager, (x,)), tmp_path / "shifted.pt2")
    programs = load_pt2(tmp_path / "shifted.pt2").exported_programs
    (train,), (evaluated,) = (list(programs[mode].constants.values()) for mode in ("train", "eval"))
    torch.testing.assert_close(train, torch.tensor([2.0, 4.0, 6.0]))
    torch.testing.assert_close(evaluated, torch.tensor([1.0, 2.0, 3.0]))
    loaded = modeswap.load(tmp_path / "shifted.pt2")
    for training in (True, False):
        torch.testing.assert_close(loaded.train(training)(x), eager.train(training)(x), atol=0, rtol=0)


def test_the_file_holds_the_state_once_for_both_programs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.BatchNorm1d(512), nn.Dropout(0.1), nn.Linear(512, 256))
    modal = modeswap.capture(model, (torch.randn(8, 256),))
    modeswap.save(modal, tmp_path / "wide.pt2")
    state = sum(t.untyped_storage().nbytes() for t in modal.state_dict().values())
    size = (tmp_path / "wide.pt2").stat().st_size
    records = modeswap.files.archive.skeletons_of(modal)
    graphs = sum(len(part) for skeleton in records.values() for part in skeleton.records())
    # The state once, the two graphs and their sample inputs, and the tables and zip headers around them.
    assert state + graphs < size < 1.05 * (state + graphs), (size, state, graphs)
