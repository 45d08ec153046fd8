"""The traces a graph leaves, on random models: heads only training runs, and pinned batch norms.

An eval export of a model with heads that only training runs
(``modeswap.testing.models.TrainOnlyHead``, as GoogLeNet's auxiliary heads)
holds their state, unread: ``to_train`` names exactly those heads. The pinned
layers of ``cases(mixed=True)`` make mixed graphs, whose minority a swap names
(``tests/property/test_properties.py``, ``test_mode_of_agrees_with_the_eager_modules``).
"""

from __future__ import annotations

import copy
import re
import warnings

import torch
from hypothesis import given, strategies as st

import modeswap
from modeswap import Mode
from modeswap.testing import Case, cases

KINDS = ("conv", "linear", "batch_norm", "dropout", "relu", "attention", "rrelu", "aux_head")


def unread(case: Case, mode: Mode, target: Mode) -> list[set[str]]:
    """The module paths each unread-state warning of a swap to ``target`` of ``case``'s ``mode`` export names."""
    program = torch.export.export(copy.deepcopy(case.model).train(mode is Mode.TRAIN), case.args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", modeswap.ModeswapWarning)
        modeswap.swap(program, target, attention_dropout=case.attention_dropout if target is Mode.TRAIN else None)
    messages = [str(w.message) for w in caught if issubclass(w.category, modeswap.TrainingBranchWarning)]
    named = [m.partition("no node reads: ")[2].partition(". A module")[0] for m in messages if "no node reads" in m]
    return [set(re.findall(r"'([^']*)'", text)) for text in named]


@given(case=cases(kinds=KINDS), target=st.sampled_from(Mode))
def test_to_train_of_an_eval_export_names_exactly_the_heads_only_training_runs(case: Case, target: Mode) -> None:
    heads = {str(i) for i, layer in enumerate(case.layers) if layer.kind == "aux_head"}
    assert unread(case, Mode.EVAL, Mode.TRAIN) == ([heads] if heads else [])
    assert unread(case, Mode.TRAIN, target) == []  # a train export runs them: nothing unread
