"""Submodules in modes of their own on the transformers zoo: frozen batch norms and Monte Carlo dropout, as eager.

Fine-tuning with frozen batch norms (``model.train()``, then ``.eval()`` on each
batch norm) and Monte Carlo dropout (``model.eval()``, then ``.train()`` on each
dropout) are everyday eager code. A ModalModule from ``capture`` of each model,
and from ``allow_train_eval`` of its train export, runs them as eager does:
outputs, buffers and gradients of two forward and backward passes, a step apart.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest

pytest.importorskip("transformers")

import torch
from torch import nn

import modeswap
from modeswap.testing import assert_same_run, run_forward_backward

from .models import CASES, Case


def frozen_norms(model: nn.Module) -> tuple[bool, type[nn.Module], bool]:
    """Fine-tuning: the model in train mode, its batch norms in eval."""
    return True, nn.modules.batchnorm._BatchNorm, False


def monte_carlo_dropout(model: nn.Module) -> tuple[bool, type[nn.Module], bool]:
    """Monte Carlo dropout: the model in eval mode, its dropouts in train."""
    return False, nn.Dropout, True


SETUPS: dict[str, Callable[[nn.Module], tuple[bool, type[nn.Module], bool]]] = {
    "frozen_norms": frozen_norms,
    "monte_carlo": monte_carlo_dropout,
}


def sgd(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= 0.01 * p.grad


@pytest.mark.parametrize("how", ["capture", "allow_train_eval"])
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_submodule_modes_of_real_models_match_eager(case: Case, setup: str, how: str) -> None:
    eager, args = case.build().train(), case.inputs()
    if how == "capture":
        modal = modeswap.capture(copy.deepcopy(eager), args)
    else:
        with warnings.catch_warnings():
            # A drop path of rate 0 leaves no node, and from one graph it cannot be told from a drop path an
            # eval export erased: allow_train_eval says so for its train graph.
            warnings.filterwarnings("ignore", ".*named like a drop path", modeswap.TrainingBranchWarning)
            modal = modeswap.allow_train_eval(torch.export.export(copy.deepcopy(eager), args))
    root, kind, training = SETUPS[setup](eager)
    # By path: the ModalModule's submodules are placeholders and containers, not the eager classes.
    paths = [path for path, m in eager.named_modules() if isinstance(m, kind)]
    for module in (eager, modal):
        module.train(root)
        for path in paths:
            module.get_submodule(path).train(training)
    if not paths:
        pytest.skip(f"{case.name} has no {kind.__name__} module")
    assert {site.mode for site in modeswap.mode_of(modal).sites} != {
        modeswap.Mode.TRAIN if root else modeswap.Mode.EVAL
    }
    for seed in (0, 1):
        want = run_forward_backward(eager, args, seed=seed)
        got = run_forward_backward(modal, args, seed=seed)
        assert_same_run(want, got, atol=1e-5, rtol=1e-4)
        sgd(eager)
        sgd(modal)
