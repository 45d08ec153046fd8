"""Batch counters: the ``num_batches_tracked`` a train graph adds to, found, removed and made, against eager."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeswap
from modeswap import UnsupportedGraphError
from modeswap.testing import (
    assert_mode_equivalent,
    assert_same_run,
    call_signature,
    export,
    other,
    quiet,
    run_forward_backward,
)

from ..sites import MODES, nodes, randn, with_stats

aten = torch.ops.aten
X = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))


class SharedNorm(nn.Module):
    """One BatchNorm called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = with_stats(nn.BatchNorm1d(3, momentum=0.3, eps=1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.bn(x)))


@pytest.mark.parametrize("mode", MODES)
def test_batch_counter_over_several_forwards(mode: str) -> None:
    model = with_stats(nn.BatchNorm2d(3, momentum=0.3, eps=1e-3))
    gm = modeswap.swap(export(model, (randn(2, 3, 2, 2),), other(mode)), mode).module
    eager = copy.deepcopy(model).train(mode == "train")
    for seed in range(3):
        x = randn(2, 3, 2, 2, seed=seed)
        torch.testing.assert_close(gm(x), eager(x))
    buffers = dict(gm.named_buffers())
    assert buffers["num_batches_tracked"].item() == eager.num_batches_tracked.item() == (10 if mode == "train" else 7)
    torch.testing.assert_close(buffers["running_mean"], eager.running_mean)
    torch.testing.assert_close(buffers["running_var"], eager.running_var)


def test_shared_batchnorm_counts_twice_in_train() -> None:
    args = (randn(4, 3),)
    gm = modeswap.to_train(export(SharedNorm(), args, "eval"))
    assert len(nodes(gm, aten.add_.Tensor)) == 2
    eager = SharedNorm().train()
    for seed in range(3):
        x = randn(4, 3, seed=seed)
        torch.testing.assert_close(gm(x), eager(x))
    assert dict(gm.named_buffers())["bn.num_batches_tracked"].item() == eager.bn.num_batches_tracked.item() == 13
    assert_mode_equivalent(SharedNorm(), args, "train")


def test_shared_batchnorm_to_eval() -> None:
    # Regression: export chains the second counter on the first (add_(add_, 1)).
    swapped = assert_mode_equivalent(SharedNorm(), (randn(4, 3),), "eval")
    assert nodes(swapped.module, aten.add_.Tensor) == []


def test_shared_batchnorm_round_trips_its_chained_counters() -> None:
    args = (randn(4, 3),)
    gm = export(SharedNorm(), args, "train")
    assert call_signature(modeswap.to_train(modeswap.to_eval(gm))) == call_signature(gm)


def test_a_counter_away_from_its_batch_norm_is_found() -> None:
    # prepare_qat_pt2e rewrites conv + batch norm, and leaves the counter before the new conv ops.
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, momentum=0.2), nn.Dropout(0.3))
    args = (randn(4, 3),)
    gm = export(model, args, "train")
    (counter,) = nodes(gm, aten.add_.Tensor)
    (linear,) = nodes(gm, aten.linear.default)
    linear.prepend(counter)
    gm.recompile()
    assert counter.next is linear
    evaluated = modeswap.to_eval(gm)
    assert nodes(evaluated, aten.add_.Tensor) == []
    expected = run_forward_backward(copy.deepcopy(model).eval(), args, seed=0)
    assert_same_run(expected, run_forward_backward(evaluated, args, seed=0), atol=0, rtol=0)


class FunctionalNormAfterUserIncrement(nn.Module):
    """A user's own add_(t, 1) right before a functional batch norm: not a batch counter."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rm", torch.zeros(3))
        self.register_buffer("rv", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2
        x.add_(1)
        return F.batch_norm(x, self.rm, self.rv, training=self.training)


class FunctionalNormOnModuleBuffers(nn.Module):
    """F.batch_norm on a BatchNorm's buffers: eager never touches num_batches_tracked."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.bn.running_mean, self.bn.running_var, training=self.training)


@pytest.mark.parametrize("mode", MODES)
def test_a_user_add_before_a_functional_batch_norm_is_kept(mode: str) -> None:
    swapped = assert_mode_equivalent(FunctionalNormAfterUserIncrement(), (randn(4, 3),), mode)
    assert len(nodes(swapped.module, aten.add_.Tensor)) == 1
    assert all(change.field != "num_batches_tracked.add_(1)" for change in swapped.changes)


def test_a_functional_batch_norm_on_module_buffers_never_counts() -> None:
    args = (randn(4, 3),)
    swapped = assert_mode_equivalent(FunctionalNormOnModuleBuffers(), args, "train")
    assert nodes(swapped.module, aten.add_.Tensor) == []
    gm = export(FunctionalNormOnModuleBuffers(), args, "train")
    assert call_signature(modeswap.to_train(modeswap.to_eval(gm))) == call_signature(gm)


def test_a_strict_eval_export_without_its_batch_counter_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    gm = torch.export.export(model.eval(), (randn(4, 3),), strict=True).module()
    assert "1.num_batches_tracked" not in gm.state_dict()
    with pytest.raises(UnsupportedGraphError, match=r"no 1\.num_batches_tracked .*strict=True"):
        modeswap.to_train(gm)


# --- one batch norm under two names, two batch norms sharing buffers -----------------------


class Aliased(nn.Module):
    """One BatchNorm under two attribute names, called twice: eager counts two batches."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn_a = nn.BatchNorm1d(4, momentum=0.3)
        self.bn_b = self.bn_a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_b(self.fc(self.bn_a(x)))


class SharedStats(nn.Module):
    """Two BatchNorms that share running stats but count batches apart."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn_a = nn.BatchNorm1d(4, momentum=0.3)
        self.bn_b = nn.BatchNorm1d(4, momentum=0.2)
        self.bn_b.running_mean = self.bn_a.running_mean
        self.bn_b.running_var = self.bn_a.running_var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_b(self.fc(self.bn_a(x)))


SHARED = [pytest.param(Aliased, id="one-module-two-names"), pytest.param(SharedStats, id="shared-running-stats")]


@pytest.mark.parametrize("make", SHARED)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_shared_batch_norms_count_what_eager_counts(make: type[nn.Module], mode: str) -> None:
    model = make()
    with quiet():
        swapped = assert_mode_equivalent(model, (X,), mode)
    trained = modeswap.to_train(swapped.module)
    eager = copy.deepcopy(model).train()
    counted = [_counts(module, lambda m: m(X)) for module in (trained, eager)]
    assert counted[0] == counted[1]
    assert max(counted[1].values()) >= 1


def _counts(module: nn.Module, run: Any) -> dict[str, int]:
    """How many batches one call of ``run`` adds to each ``num_batches_tracked``."""

    def read() -> dict[str, int]:
        return {k: int(v) for k, v in module.state_dict().items() if k.endswith("num_batches_tracked")}

    before = read()
    run(module)
    return {k: v - before[k] for k, v in read().items()}


@pytest.mark.parametrize("make", SHARED)
def test_shared_batch_norms_in_an_exported_program(make: type[nn.Module]) -> None:
    model = make()
    program = torch.export.export(copy.deepcopy(model).eval(), (X,))
    trained = modeswap.to_train(program).module()
    eager = copy.deepcopy(model).train()
    assert_same_run(
        run_forward_backward(eager, (X,), seed=0), run_forward_backward(trained, (X,), seed=0), atol=1e-6, rtol=1e-5
    )
