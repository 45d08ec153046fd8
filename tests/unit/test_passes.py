"""The public passes: one swap per kind of site, the pipeline they make, and the training flags it sets.

The pass machinery they run on has its tests in rewrite/test_base.py; the fixtures ``x`` and ``train_gm``
are tests/unit/conftest.py's.
"""

from __future__ import annotations

import pytest

import modeswap
from modeswap import Mode, passes
from modeswap.testing import assert_same_run, call_signature, run_forward_backward


def test_swap_dropout_touches_only_dropout(train_gm):
    evaluated = passes.swap_dropout("eval")(train_gm)
    assert modeswap.mode_of(evaluated).mixed
    assert {s.kind: s.mode for s in modeswap.mode_of(evaluated).sites} == {
        "batch_norm": Mode.TRAIN,
        "dropout": Mode.EVAL,
    }


def test_pipeline_of_single_passes_equals_the_swap(train_gm, x):
    by_hand = modeswap.pipeline(
        passes.eliminate_dead_code,
        passes.swap_dropout(Mode.EVAL),
        passes.swap_batchnorm(Mode.EVAL),
        passes.recompile,
    )(train_gm)
    assert call_signature(by_hand) == call_signature(modeswap.to_eval(train_gm))
    assert_same_run(
        run_forward_backward(by_hand, (x,), seed=1),
        run_forward_backward(modeswap.to_eval(train_gm), (x,), seed=1),
        atol=0,
        rtol=0,
    )


def test_to_eval_keeps_training_flags_honest(train_gm):
    assert not modeswap.to_eval(train_gm).training
    assert modeswap.to_train(modeswap.to_eval(train_gm)).training


def test_the_default_pipeline_has_one_swap_pass_per_rule_kind():
    steps = passes.swap_pipeline("eval").name.removeprefix("pipeline(").removesuffix(")").split(", ")
    assert len([step for step in steps if step.startswith("swap_")]) == len(modeswap.table.rules.KINDS)
    assert "swap_batch_norm(eval)" in steps


def test_swaps_are_idempotent_to_the_letter(train_gm):
    once = modeswap.to_eval(train_gm)
    assert modeswap.to_eval(once).code == once.code
    back = modeswap.to_train(once)
    assert modeswap.to_train(back).code == back.code


def test_the_pipeline_sets_training_flags_so_it_equals_the_swap(train_gm, x):
    by_pipeline = passes.swap_pipeline("eval")(train_gm)
    assert [m.training for m in by_pipeline.modules()] == [False] * len(list(by_pipeline.modules()))
    assert call_signature(by_pipeline) == call_signature(modeswap.to_eval(train_gm))
    assert all(m.training for m in passes.swap_pipeline("train")(by_pipeline).modules())


def test_a_kind_the_table_does_not_know_is_refused_with_the_kinds_it_does():
    with pytest.raises(modeswap.InvalidOptionError, match=r"unknown kind of site 'dropout2d'.*batch_norm.*rnn"):
        passes.swap_kind("dropout2d", "eval")
