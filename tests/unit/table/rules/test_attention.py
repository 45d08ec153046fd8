"""The attention row of the semantics table (scaled_dot_product_attention), both ways, against eager PyTorch."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.fx import GraphModule, Node

import modeswap
from modeswap import Memo, UnknownTrainingValueWarning
from modeswap.records.modes import memo_of
from modeswap.testing import assert_mode_equivalent, assert_same_run, export, run_forward_backward
from modeswap.testing.models import Attention

from ...sites import ATTENTION_P, MODES, arg, nodes, randn

aten = torch.ops.aten


def _attention_nodes(gm: GraphModule) -> list[Node]:
    return nodes(gm, aten.scaled_dot_product_attention.default)


def test_attention_to_eval_zeroes_dropout_and_remembers_it() -> None:
    model = nn.Sequential(nn.Linear(4, 4), Attention(ATTENTION_P))
    swapped = assert_mode_equivalent(model, (randn(2, 3, 4),), "eval")
    (node,) = _attention_nodes(swapped.module)
    assert arg(node, "dropout_p") == 0.0
    assert memo_of(node) == Memo({"dropout_p": ATTENTION_P})


def test_attention_to_train_with_attention_dropout_matches_eager() -> None:
    model = nn.Sequential(nn.Linear(4, 4), Attention(ATTENTION_P))
    swapped = assert_mode_equivalent(model, (randn(2, 3, 4),), "train", attention_dropout=ATTENTION_P)
    (node,) = _attention_nodes(swapped.module)
    assert arg(node, "dropout_p") == ATTENTION_P


def test_attention_to_train_without_value_warns_once_and_keeps_zero() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(3), Attention(ATTENTION_P, calls=2))
    gm = export(model, (randn(2, 3, 4),), "eval")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained = modeswap.to_train(gm)
    assert [w.category for w in caught] == [UnknownTrainingValueWarning]
    names = [n.name for n in _attention_nodes(gm)]
    assert len(names) == 2
    for name in names:
        assert name in str(caught[0].message)
    assert "attention_dropout" in str(caught[0].message)
    assert [arg(n, "dropout_p") for n in _attention_nodes(trained)] == [0.0, 0.0]
    (bn,) = nodes(trained, aten.batch_norm.default)
    assert arg(bn, "training") is True


@pytest.mark.parametrize("mode", MODES)
def test_attention_keeps_is_causal_and_scale(mode: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), Attention(ATTENTION_P, causal=True, scale=0.7))
    swapped = assert_mode_equivalent(
        model, (randn(2, 3, 4),), mode, attention_dropout=ATTENTION_P if mode == "train" else None
    )
    (node,) = _attention_nodes(swapped.module)
    assert arg(node, "is_causal") is True
    assert node.kwargs["scale"] == 0.7
    assert arg(node, "dropout_p") == (ATTENTION_P if mode == "train" else 0.0)


def test_attention_dropout_applies_to_a_graph_already_swapped_without_it() -> None:
    model = nn.Sequential(nn.Dropout(0.1), Attention(0.3))
    args = (randn(2, 3, 4),)
    with pytest.warns(UnknownTrainingValueWarning):
        guessed = modeswap.to_train(export(model, args, "eval"))
    fixed = modeswap.swap(guessed, "train", attention_dropout=0.3)
    assert [(c.field, c.before, c.after) for c in fixed.changes] == [("dropout_p", 0.0, 0.3)]
    assert_same_run(
        run_forward_backward(copy.deepcopy(model).train(), args, seed=4),
        run_forward_backward(fixed.module, args, seed=4),
        atol=1e-6,
        rtol=1e-5,
    )


def test_attention_dropout_of_one_is_accepted() -> None:
    gm = export(Attention(0.5), (randn(2, 3, 4),), "eval")
    (node,) = nodes(modeswap.to_train(gm, attention_dropout=1.0), aten.scaled_dot_product_attention.default)
    assert arg(node, "dropout_p") == 1.0
