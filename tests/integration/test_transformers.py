"""Real architectures from transformers, every dropout on, swapped both ways and checked against eager PyTorch.

The models come from ``models.py``: tiny configs with random weights, nothing
downloaded. Each is exported in one mode, swapped to the other and run beside
the eager model in that mode under one seed (``modeswap.testing.assert_mode_equivalent``).

Two things an eval export loses, and what modeswap does about each:

- attention dropout (SDPA's ``dropout_p``, eager attention's ``p``) is recorded
  as 0.0: ``to_train`` warns, and takes the value from ``attention_dropout=``;
- drop path runs as the identity, so no node of the graph comes from it and
  nothing can bring it back. ``to_train`` of an eval export trains without it,
  and these tests pin that down; a train export keeps it through ``to_eval``
  and back.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers")

import torch

import modeswap
from modeswap.testing import assert_mode_equivalent
from modeswap.testing.oracle import assert_same_run, run_forward_backward

from .models import CASES, Case, drop_probabilities

ERASED_ATTENTION = [case for case in CASES if case.attention_dropout is not None]
DROP_PATH_CASES = [case for case in CASES if case.drop_path]


def _ids(cases: list[Case] | tuple[Case, ...]) -> list[str]:
    return [case.name for case in cases]


def _swap_cases() -> list[object]:
    return [
        pytest.param(case, mode, id=f"{case.name}-to_{mode}")
        for case in CASES
        for mode in ("eval", "train")
        if not (case.drop_path and mode == "train")  # see test_an_eval_export_has_no_drop_path_to_restore
    ]


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_every_dropout_is_on(case: Case) -> None:
    model = case.build()
    config = model.model.config
    assert all(p > 0 for p in drop_probabilities(config).values()), drop_probabilities(config)
    assert case.drop_path == any("drop_path" in key for key in drop_probabilities(config))


@pytest.mark.parametrize(("case", "mode"), _swap_cases())
def test_swap_matches_eager(case: Case, mode: str) -> None:
    """Export in the other mode, swap to ``mode``: outputs, buffers and gradients as eager in ``mode``."""
    model = case.build()
    attention_dropout = case.attention_dropout if mode == "train" else None
    swapped = assert_mode_equivalent(model, case.inputs(), mode, attention_dropout=attention_dropout)
    report = modeswap.mode_of(swapped.module)
    assert not report.mixed
    assert report.mode in (modeswap.Mode.parse(mode), None)
    if mode == "eval":
        assert report.stochastic == ()


@pytest.mark.parametrize("case", ERASED_ATTENTION, ids=_ids(ERASED_ATTENTION))
def test_eval_export_warns_that_attention_dropout_is_lost(case: Case) -> None:
    """An eval export records attention dropout as 0.0: ``to_train`` warns and keeps it unless told the value."""
    gm = torch.export.export(case.build().eval(), case.inputs()).module()
    with pytest.warns(modeswap.UnknownTrainingValueWarning, match="attention_dropout=p"):
        modeswap.to_train(gm)

    told = modeswap.to_train(gm, attention_dropout=case.attention_dropout)
    sites = modeswap.mode_of(told).sites
    attention = {site.params["dropout_p"] for site in sites if site.kind == "attention"}
    dropout = {site.params["p"] for site in sites if site.kind == "dropout"}
    assert attention | dropout
    assert attention <= {case.attention_dropout}
    assert 0.0 not in dropout


@pytest.mark.parametrize("case", DROP_PATH_CASES, ids=_ids(DROP_PATH_CASES))
def test_drop_path_round_trips(case: Case) -> None:
    """Train export, to_eval, to_train: trains as eager does, drop path included, random numbers in order."""
    model = case.build()
    args = case.inputs()
    gm = torch.export.export(copy.deepcopy(model).train(), args).module()
    evaluated = modeswap.to_eval(gm)
    kinds = [site.kind for site in modeswap.mode_of(gm).sites]
    assert kinds.count("drop_path") == [site.kind for site in modeswap.mode_of(evaluated).sites].count("drop_path") > 0
    trainable = modeswap.to_train(evaluated, attention_dropout=case.attention_dropout)
    expected = run_forward_backward(copy.deepcopy(model).train(), args, seed=0)
    actual = run_forward_backward(trainable, args, seed=0)
    assert_same_run(expected, actual, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", DROP_PATH_CASES, ids=_ids(DROP_PATH_CASES))
def test_an_eval_export_has_no_drop_path_to_restore(case: Case) -> None:
    """The documented limit: an eval export never ran the drop path, so to_train cannot add it back."""
    model = case.build()
    args = case.inputs()
    gm = torch.export.export(copy.deepcopy(model).eval(), args).module()
    assert "drop_path" not in {site.kind for site in modeswap.mode_of(gm).sites}
    trainable = modeswap.to_train(gm, attention_dropout=case.attention_dropout)
    assert "drop_path" not in {site.kind for site in modeswap.mode_of(trainable).sites}
    expected = run_forward_backward(copy.deepcopy(model).train(), args, seed=0)
    actual = run_forward_backward(trainable, args, seed=0)
    with pytest.raises(AssertionError, match="output"):
        assert_same_run(expected, actual, atol=1e-6, rtol=1e-5)
