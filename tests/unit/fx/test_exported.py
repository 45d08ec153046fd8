"""Telling exported graphs from everything else, and the errors for everything else."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch
from torch import nn

import modeswap
from modeswap import ModeswapError, NotExportedError

ARGS = (torch.ones(2, 3),)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.3))


def _program() -> torch.export.ExportedProgram:
    return torch.export.export(_model().train(), ARGS)


def test_exported_graphs_are_exported() -> None:
    program = _program()
    assert modeswap.is_exported(program)
    assert modeswap.is_exported(program.module())
    assert modeswap.is_exported(modeswap.to_eval(program.module()))


NOT_EXPORTED = [
    pytest.param(lambda: nn.Linear(3, 3), ("nn.Linear", "torch.export.export"), id="nn.Linear"),
    pytest.param(
        lambda: torch.fx.symbolic_trace(_model()), ("symbolic_trace", "torch.export.export"), id="symbolic_trace"
    ),
    pytest.param(lambda: "model.pt2", ("'model.pt2'", "torch.export.load"), id="str-path"),
    pytest.param(lambda: pathlib.Path("model.pt2"), ("'model.pt2'", "torch.export.load"), id="Path"),
    pytest.param(lambda: None, ("NoneType", "torch.export.export"), id="None"),
]


@pytest.mark.parametrize(("make", "_hints"), NOT_EXPORTED)
def test_others_are_not_exported(make: Any, _hints: tuple[str, ...]) -> None:
    assert modeswap.is_exported(make()) is False


@pytest.mark.parametrize("call", [modeswap.to_eval, modeswap.to_train, lambda m: modeswap.swap(m, "eval")])
@pytest.mark.parametrize(("make", "hints"), NOT_EXPORTED)
@pytest.mark.parametrize("catch", [NotExportedError, TypeError, ModeswapError])
def test_swapping_the_unexported_says_what_to_do(catch: type, make: Any, hints: tuple[str, ...], call: Any) -> None:
    with pytest.raises(catch) as info:
        call(make())
    assert type(info.value) is NotExportedError
    for hint in hints:
        assert hint in str(info.value)


@pytest.mark.parametrize(("make", "hints"), NOT_EXPORTED)
def test_mode_of_the_unexported_says_what_to_do(make: Any, hints: tuple[str, ...]) -> None:
    with pytest.raises(NotExportedError) as info:
        modeswap.mode_of(make())
    for hint in hints:
        assert hint in str(info.value)


def test_unexported_input_is_left_alone() -> None:
    model = _model().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotExportedError):
        modeswap.to_eval(model)
    assert model.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key])


def test_to_eval_takes_an_exported_program() -> None:
    program = _program()
    evaluated = modeswap.to_eval(program)
    assert isinstance(evaluated, torch.export.ExportedProgram)
    torch.testing.assert_close(evaluated.module()(*ARGS), _model().eval()(*ARGS))
