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

import pytest
import torch
from torch import nn

import modeswap


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.drop = nn.Dropout(0.1)
        self.norm = nn.BatchNorm1d(5)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.norm(self.emb(ids))))  # type: ignore[no-any-return]


def tied() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return Tied(), (torch.randint(0, 20, (3, 5)),)


def gpt2() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    pytest.importorskip("transformers")  # the unit tests run on the newest torch without it
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16, use_cache=False)
    return GPT2LMHeadModel(config), (torch.randint(0, 50, (2, 6)),)


def bart() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    pytest.importorskip("transformers")
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=40,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        max_position_embeddings=16,
        tie_word_embeddings=True,
        use_cache=False,
    )
    return BartForConditionalGeneration(config), (torch.randint(3, 40, (2, 6)),)


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {"tied": tied, "gpt2": gpt2, "bart": bart}


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
