"""The semantics table as a whole: a graph with one site of each kind, swapped both ways, against eager PyTorch.

Round trips, idempotence, the changes listed, and purity; each kind has its rows in a file of its own here.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import modeswap
from modeswap import Change, Mode
from modeswap.testing import Snapshot, assert_mode_equivalent, assert_same_run, export, other, run_forward_backward
from modeswap.testing.models import Attention

from ...sites import ATTENTION_P, MODES, InplaceDropout, calls, randn, with_stats

aten = torch.ops.aten
COUNTER = "num_batches_tracked.add_(1)"


def _every_site() -> nn.Module:
    """One of each site the table knows, with non-default literals."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 3, 1),
        with_stats(nn.BatchNorm1d(3, momentum=0.3, eps=1e-3)),
        nn.Dropout(0.3),
        nn.Dropout1d(0.2),
        nn.AlphaDropout(0.25),
        nn.FeatureAlphaDropout(0.15),
        nn.RReLU(),
        nn.RReLU(0.1, 0.2),
        with_stats(nn.InstanceNorm1d(3, momentum=0.2, eps=1e-4, affine=True, track_running_stats=True)),
        Attention(0.35, causal=True, scale=0.7),
        InplaceDropout(0.45),
    )


EVERY_ARGS = (randn(2, 2, 4),)


def _to(mode: str) -> Any:
    return modeswap.to_eval if mode == "eval" else lambda gm: modeswap.to_train(gm, attention_dropout=ATTENTION_P)


@pytest.mark.parametrize("exported_in", MODES)
def test_round_trip_gives_back_the_export(exported_in: str) -> None:
    model = _every_site()
    gm = export(model, EVERY_ARGS, exported_in)
    # From a train export the memo alone restores attention dropout: no attention_dropout=, no warning.
    there = _to(other(exported_in))(gm)
    back = modeswap.to_train(there) if exported_in == "train" else modeswap.to_eval(there)
    assert calls(back) == calls(gm)
    eager = copy.deepcopy(model).train(exported_in == "train")
    assert_same_run(
        run_forward_backward(eager, EVERY_ARGS, seed=0),
        run_forward_backward(back, EVERY_ARGS, seed=0),
        atol=1e-6,
        rtol=1e-5,
    )


@pytest.mark.parametrize("mode", MODES)
def test_every_site_matches_eager(mode: str) -> None:
    swapped = assert_mode_equivalent(
        _every_site(), EVERY_ARGS, mode, attention_dropout=ATTENTION_P if mode == "train" else None
    )
    assert modeswap.mode_of(swapped.module).mode is Mode(mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("exported_in", MODES)
def test_swap_is_idempotent(exported_in: str, mode: str) -> None:
    once = _to(mode)(export(_every_site(), EVERY_ARGS, exported_in))
    twice = modeswap.swap(once, mode)
    assert twice.changes == ()
    assert calls(twice.module) == calls(once)


#: (node, op, field) of every boolean flag swapping _every_site() flips.
EVERY_FLAG = [
    ("batch_norm", "aten.batch_norm.default", "training"),
    ("batch_norm", "aten.batch_norm.default", COUNTER),
    ("dropout", "aten.dropout.default", "train"),
    ("feature_dropout", "aten.feature_dropout.default", "train"),
    ("alpha_dropout", "aten.alpha_dropout.default", "train"),
    ("feature_alpha_dropout", "aten.feature_alpha_dropout.default", "train"),
    ("rrelu", "aten.rrelu.default", "training"),
    ("rrelu_1", "aten.rrelu.default", "training"),
    ("instance_norm", "aten.instance_norm.default", "use_input_stats"),
    ("dropout_", "aten.dropout_.default", "train"),
]


def _every_change(before: bool) -> set[Change]:
    """Every edit swapping _every_site() makes; ``before`` is the flags' value in the source graph."""
    changes = {Change(node, op, field, before, not before) for node, op, field in EVERY_FLAG}
    p = (ATTENTION_P, 0.0) if before else (0.0, ATTENTION_P)
    sdpa = "scaled_dot_product_attention"
    return changes | {Change(sdpa, f"aten.{sdpa}.default", "dropout_p", *p)}


@pytest.mark.parametrize("exported_in", MODES)
def test_changes_list_every_edit(exported_in: str) -> None:
    gm = export(_every_site(), EVERY_ARGS, exported_in)
    target = other(exported_in)
    swapped = modeswap.swap(gm, target, attention_dropout=ATTENTION_P if target == "train" else None)
    assert swapped.mode is Mode(target)
    assert len(swapped.changes) == len(set(swapped.changes))
    assert set(swapped.changes) == _every_change(before=exported_in == "train")


@pytest.mark.parametrize("exported_in", MODES)
def test_swap_leaves_its_input_alone(exported_in: str) -> None:
    gm = export(_every_site(), EVERY_ARGS, exported_in)
    before = Snapshot.of(gm)
    _to(other(exported_in))(gm)
    assert Snapshot.of(gm) == before
