"""The generic swap of a flag: a dropout's training p, recorded by the graph, lost by an eval export, or stated.

Each checked against eager.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeswap
from modeswap import Mode
from modeswap.testing import assert_runs_as, call_signature, export


class EagerAttention(nn.Module):
    """Attention as transformers' eager implementation writes its dropout: p gated on self.training."""

    def __init__(self, p: float = 0.25) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = (q @ k.transpose(-1, -2)).softmax(-1)
        weights = F.dropout(weights, p=self.p if self.training else 0.0, training=self.training)
        return weights @ v


def test_a_gated_dropout_p_lost_by_an_eval_export_warns_and_can_be_given() -> None:
    torch.manual_seed(0)
    model, x = EagerAttention(), torch.randn(2, 5, 8)
    gm = export(model, (x,), Mode.EVAL)
    with pytest.warns(
        modeswap.UnknownTrainingValueWarning, match=r"(?s)EagerAttention: 1 site\(s\) in ''.*dropout=\{\n *'': 0\.0,"
    ) as caught:
        silent = modeswap.to_train(gm)
    (warning,) = [w.message for w in caught if isinstance(w.message, modeswap.UnknownTrainingValueWarning)]
    assert warning.suggestion == {"": 0.0}
    assert warning.groups == {"EagerAttention": ("",)}
    assert [(s.params["p"], s.known) for s in modeswap.mode_of(silent).sites] == [(0.0, False)]
    # attention_dropout is for attention nodes, and this graph has none.
    with pytest.raises(modeswap.InvalidOptionError, match=r"attention_dropout=0\.25 is for attention nodes"):
        modeswap.to_train(gm, attention_dropout=0.25)
    swapped = modeswap.swap(gm, "train", dropout={"": 0.25})
    assert [(c.field, c.before, c.after) for c in swapped.changes] == [("train", False, True), ("p", 0.0, 0.25)]
    assert_runs_as(model.train(), swapped.module, (x,), seed=2)
    # The blind swap remembers that p is unknown, so it can be stated later.
    stated = modeswap.swap(silent, "train", dropout={"": 0.25})
    assert [(c.field, c.before, c.after) for c in stated.changes] == [("p", 0.0, 0.25)]
    assert_runs_as(model.train(), stated.module, (x,), seed=2)


def test_a_dropout_module_with_p_zero_is_not_gated() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0))
    gm = export(model, (torch.randn(2, 3),), Mode.EVAL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swapped = modeswap.swap(gm, "train")
    assert [(c.field, c.after) for c in swapped.changes] == [("train", True)]
    with pytest.raises(modeswap.InvalidOptionError, match=r"attention_dropout=0\.5 is for attention nodes .* has none"):
        modeswap.swap(gm, "train", attention_dropout=0.5)


def test_a_gated_dropout_from_a_train_graph_round_trips_without_warning() -> None:
    torch.manual_seed(0)
    model, x = EagerAttention(p=0.0), torch.randn(2, 5, 8)
    gm = export(model, (x,), Mode.TRAIN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = modeswap.to_train(modeswap.to_eval(gm))
    assert call_signature(back) == call_signature(gm)
