"""Weights reachable under several names stay one tensor in allow_train_eval, as in eager, whatever untied them.

``torch.export.load`` gives tied weights back as several Parameters over one
memory; ``allow_train_eval`` makes them one again, so that gradients land
where eager's land and training matches eager step for step.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import archived_models
import pytest
import torch
from torch import nn

import modeswap


def transformers_model(
    build: Callable[[], nn.Module], *, decoder: bool = False
) -> Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    def made() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        pytest.importorskip("transformers")  # the unit tests run on the newest torch without it
        ids = archived_models.tokens()
        return build(), ((ids, torch.ones_like(ids), ids) if decoder else (ids,))  # T5: decoder_input_ids

    return made


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "tied": lambda: (archived_models.seeded(archived_models.Tied), (archived_models.tokens(),)),
    "shared": lambda: (archived_models.seeded(archived_models.Shared), (torch.randn(4, 8),)),
    "gpt2": transformers_model(archived_models.gpt2),
    "bart": transformers_model(archived_models.bart),
    "t5": transformers_model(archived_models.t5, decoder=True),
}


def reloaded(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


def groups(module: nn.Module) -> set[frozenset[str]]:
    """Which names are one tensor: the sets of names of each parameter and buffer."""
    named: dict[int, set[str]] = {}
    for name, t in (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)):
        named.setdefault(id(t), set()).add(name)
    return {frozenset(names) for names in named.values()}


def first(outputs: Any) -> torch.Tensor:
    return outputs if isinstance(outputs, torch.Tensor) else outputs[0]  # a transformers ModelOutput


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
@pytest.mark.parametrize("source", ["exported", "torch.export.load"])
@pytest.mark.parametrize("name", MODELS)
def test_tied_weights_train_as_eager_after_allow_train_eval(name: str, source: str, optimizer: Any) -> None:
    eager, args = MODELS[name]()
    eager.train()
    program = torch.export.export(copy.deepcopy(eager), args)
    if source == "torch.export.load":
        program = reloaded(program)
        assert len(groups(program.module())) > len(groups(eager))  # what torch's loader does to them
    modal = modeswap.allow_train_eval(program)
    assert groups(modal) == groups(eager)
    assert [n for n, _ in modal.named_parameters()] == [n for n, _ in eager.named_parameters()]
    assert list(modal.state_dict()) == list(eager.state_dict())
    steps = [optimizer(m.parameters(), lr=0.01) for m in (eager, modal)]
    for i, training in enumerate((True, True, False, True)):
        for module, step in zip((eager, modal), steps, strict=True):
            module.train(training)
            torch.manual_seed(i)
            loss = first(module(*args)).square().mean()
            if training:
                loss.backward()
                step.step()
                step.zero_grad()
        torch.testing.assert_close(modal.state_dict(), eager.state_dict(), atol=1e-5, rtol=1e-4)
    moved = copy.deepcopy(modal).double()
    assert groups(moved) == groups(eager)  # .double() moves the one tensor once
