"""A ModalModule under random .train()/.eval() calls on random submodules computes what eager computes.

Random models from modeswap.testing; random sequences of mode calls on the
model and its submodules (``modeswap.testing.mode_calls``), each followed by a
forward and a backward under a seed on both, then an SGD step. Made three
ways: ``capture`` of the eager model, ``allow_train_eval`` of a train export,
and ``load`` of a saved capture.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import modeswap
from modeswap.testing import Case, assert_same_run, cases, mode_calls, run_forward_backward

MAKERS = ("capture", "allow_train_eval", "load")


def make(maker: str, case: Case, folder: Path) -> torch.nn.Module:
    model = copy.deepcopy(case.model).train()
    if maker == "allow_train_eval":
        return modeswap.allow_train_eval(torch.export.export(model, case.args).module())
    modal = modeswap.capture(model, case.args)
    if maker == "load":
        path = folder / "modal.pt2"
        modeswap.save(modal, path)
        return modeswap.load(path)
    return modal


def step(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= 0.01 * p.grad


@settings(max_examples=2 * settings.default.max_examples)
@given(case=cases(max_layers=4), maker=st.sampled_from(MAKERS), data=st.data(), seed=st.integers(0, 1000))
def test_submodule_modes_follow_eager(
    case: Case, maker: str, data: st.DataObject, seed: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    eager = copy.deepcopy(case.model).train()
    modal = make(maker, case, tmp_path_factory.mktemp("modes")).train()  # a graph without sites starts in eval
    for call in data.draw(mode_calls(eager)):
        call.apply(eager)
        call.apply(modal)
        flags = {path: m.training for path, m in modal.named_modules()}
        assert all(flags[path] is m.training for path, m in eager.named_modules() if path in flags)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", modeswap.ModeswapWarning)
            got = run_forward_backward(modal, case.args, seed=seed)
        want = run_forward_backward(eager, case.args, seed=seed)
        said = [w for w in caught if issubclass(w.category, modeswap.ModeswapWarning)]
        if said:
            # What no graph holds (a drop path an eval export never ran) is said, a training branch naming a
            # module in another mode than the model's; from there on the module computes as that mode's export.
            other = [repr(path) for path, m in eager.named_modules() if m.training is not eager.training]
            assert all(issubclass(w.category, modeswap.TrainingBranchWarning) for w in said), said
            assert all(any(path in str(w.message) for path in other) for w in said), [str(w.message) for w in said]
            return
        assert_same_run(want, got, atol=1e-5, rtol=1e-4)
        step(eager)
        step(modal)
