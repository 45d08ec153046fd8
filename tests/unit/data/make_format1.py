"""Write ``format1.pt2``: a modal archive as modeswap.save wrote it at format version 1 (commit 8d5e9b5).

Kept to show how the file was made; run it with that commit checked out. The
archive holds the capture of ``AuxiliaryHeads`` with the weights
:func:`format1_weights` gives (no random numbers, so that any torch rebuilds the
eager model exactly), saved in eval mode after a batch-norm update.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import modeswap
from modeswap.testing.models import AuxiliaryHeads

X = torch.linspace(-2, 2, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)


def format1_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Give ``model`` weights that no random number generator made; returns it."""
    with torch.no_grad():
        for index, (_, tensor) in enumerate(model.state_dict(keep_vars=True).items()):
            if tensor.is_floating_point():
                tensor.copy_(torch.linspace(-0.5, 0.5 + index / 10, tensor.numel()).reshape(tensor.shape).cos())
            else:
                tensor.fill_(3)
    return model


def main(path: Path) -> None:
    modal = modeswap.capture(format1_weights(AuxiliaryHeads(channels=2, classes=2)).train(), (X,))
    modeswap.save(modal.eval(), path)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("format1.pt2"))
