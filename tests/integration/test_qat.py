"""The QAT flow with torchao's pt2e API: export in train, prepare_qat_pt2e, train, to_eval, convert_pt2e.

Next to it, the same flow with torchao's own ``move_exported_model_to_eval``
and ``allow_exported_model_train_eval``: equal where torchao is right, and
eager PyTorch as the judge where it is not (custom batch-norm eps and momentum,
dropout p other than 0.5, batch counting in eval).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

pytest.importorskip("torchao")

import torch
from torch import nn
from torchao.quantization.pt2e import (
    allow_exported_model_train_eval,
    move_exported_model_to_eval,
    move_exported_model_to_train,
)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

import modeswap
from modeswap.testing import assert_same_run, run_forward_backward


class Net(nn.Module):
    def __init__(self, *, eps: float = 1e-5, momentum: float = 0.1, p: float = 0.5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8, eps=eps, momentum=momentum)
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.bn(self.conv(x)).relu()).flatten(1))


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def prepared(net: Net) -> torch.fx.GraphModule:
    """``net`` exported in train mode and prepared for QAT with the XNNPACK quantizer."""
    gm = torch.export.export(copy.deepcopy(net).train(), (X,)).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_qat=True))
    return prepare_qat_pt2e(gm, quantizer)


def train_steps(model: nn.Module, steps: int, *, first_seed: int = 0) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for seed in range(first_seed, first_seed + steps):
        torch.manual_seed(seed)
        loss = model(X).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict())


@pytest.fixture
def trained() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = prepared(Net())
    train_steps(model, 3)
    return model


def test_to_eval_then_convert_matches_torchao_where_torchao_is_right(trained: torch.fx.GraphModule) -> None:
    before = copy.deepcopy(tensors(trained))
    evaluated = modeswap.to_eval(trained)
    reference = copy.deepcopy(trained)
    move_exported_model_to_eval(reference)
    assert modeswap.mode_of(evaluated).mode is modeswap.Mode.EVAL
    assert torch.equal(evaluated(X), reference(X))
    # Eager counts batches in train only. The QAT rewrite puts its conv between the counter and the batch norm.
    assert int(evaluated.bn.num_batches_tracked) == 3
    assert int(reference.bn.num_batches_tracked) == 4  # torchao counts eval batches
    converted, converted_reference = convert_pt2e(evaluated), convert_pt2e(reference)
    assert torch.equal(converted(X), converted_reference(X))
    assert "aten.batch_norm.default" not in {str(n.target) for n in converted.graph.nodes}  # folded into the conv
    for key, value in tensors(trained).items():
        assert torch.equal(value, before[key]), f"modeswap touched its input's {key}"


def test_allow_train_eval_runs_the_qat_loop_like_torchao(trained: torch.fx.GraphModule) -> None:
    ours = modeswap.allow_train_eval(trained)
    theirs = copy.deepcopy(trained)
    allow_exported_model_train_eval(theirs)
    for epoch in range(2):
        ours.train(), theirs.train()
        ours_losses = train_steps(ours, 2, first_seed=10 * epoch)
        assert torch.equal(torch.stack(ours_losses), torch.stack(train_steps(theirs, 2, first_seed=10 * epoch)))
        ours.eval(), theirs.eval()
        with torch.no_grad():
            assert torch.equal(ours(X), theirs(X))
    ours_state, theirs_state = tensors(ours), tensors(theirs)
    assert ours_state.keys() == theirs_state.keys()
    for key in ours_state:
        if not key.endswith("num_batches_tracked"):  # torchao counts its eval batches too
            assert torch.equal(ours_state[key], theirs_state[key]), key
    assert int(ours.bn.num_batches_tracked) == 3 + 2 * 2
    converted = convert_pt2e(modeswap.to_eval(trained))  # the input of allow_train_eval is untouched and convertible
    assert converted(X).shape == (4, 4)


def both_ways(net: Net, exported_in: str, target: str) -> tuple[dict[str, Any], ...]:
    """Eager ``net`` in ``target``, and an export of it in ``exported_in`` moved by modeswap and by torchao."""
    gm = torch.export.export(copy.deepcopy(net).train(exported_in == "train"), (X,)).module()
    expected = run_forward_backward(copy.deepcopy(net).train(target == "train"), (X,), seed=0)
    ours = run_forward_backward(modeswap.swap(gm, target).module, (X,), seed=0)
    theirs = copy.deepcopy(gm)
    (move_exported_model_to_train if target == "train" else move_exported_model_to_eval)(theirs)
    return expected, ours, run_forward_backward(theirs, (X,), seed=0)


def test_where_torchao_is_wrong_modeswap_matches_eager() -> None:
    torch.manual_seed(0)
    net = Net(eps=1e-3, momentum=0.3, p=0.2)

    # Train export to eval: torchao resets eps to 1e-5 and counts batches in eval.
    expected, ours, torchao_run = both_ways(net, "train", "eval")
    assert_same_run(expected, ours, atol=0, rtol=0)
    assert not torch.equal(torchao_run["outputs"][0], expected["outputs"][0])
    assert int(torchao_run["buffers"]["bn.num_batches_tracked"]) == 1

    # Eval export to train: torchao gives dropout p=0.5 and batch norm momentum 0.1.
    expected, ours, torchao_run = both_ways(net, "eval", "train")
    assert_same_run(expected, ours, atol=0, rtol=0)
    assert not torch.equal(torchao_run["outputs"][0], expected["outputs"][0])
    assert not torch.equal(torchao_run["buffers"]["bn.running_mean"], expected["buffers"]["bn.running_mean"])
