"""``check`` on the transformers zoo: no difference where a swap is known exact, only the drop paths where it is not.

Every swap of these models matches eager (``test_transformers.py``), except
``to_train`` of an eval export with a drop path, which never ran it. With the
``dropout=`` mapping that ``to_train`` suggests for attention, ``check`` must
say so and nothing more.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers")

import torch

import modeswap

from .models import CASES, Case
from .test_transformers import suggested


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_check_finds_only_the_drop_paths(case: Case) -> None:
    model = case.build()
    args = case.inputs()
    dropout = None
    if case.attention_dropout is not None:
        dropout = suggested(torch.export.export(copy.deepcopy(model).eval(), args).module(), case.attention_dropout)
    fidelity = modeswap.check(model, args, dropout=dropout)
    assert fidelity.to_eval.exact, fidelity
    if not case.drop_path:
        assert fidelity.to_train.exact, fidelity
        return
    differences = fidelity.to_train.differences
    assert differences, fidelity
    assert {d.cause for d in differences} == {modeswap.Cause.DROP_PATH}, fidelity
    assert all(path.endswith("drop_path") for d in differences for path in d.paths), fidelity


@pytest.mark.parametrize("name", ["gpt2", "convnext"])
def test_capture_trains_as_eager(name: str) -> None:
    # Real architectures: attention dropout an eval export writes as 0.0 (gpt2), drop path (convnext).
    case = next(case for case in CASES if case.name == name)
    model, args = case.build(), case.inputs()
    modal = modeswap.capture(model, args)
    assert modeswap.testing.assert_trains_like(copy.deepcopy(model), modal, args) > 0
