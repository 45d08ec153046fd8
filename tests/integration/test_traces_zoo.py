"""No false alarm from the last traces on real models: the transformers zoo, T5, and torch.nn's own.

Every model here runs every module that holds state in both modes, and puts
every site in the model's mode: ``to_train`` of its eval export and ``to_eval``
of its train export must say nothing of unread state or of a mixed graph's
minority. (``dinov2`` holds a mask token that no mode reads without a mask: its
module runs, so it is not named.)
"""

from __future__ import annotations

import copy
import warnings

import pytest

pytest.importorskip("transformers")

import torch
import transformers

import modeswap
from modeswap import Mode

from .models import CASES, Case, Output


def t5() -> Case:
    config = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.2, use_cache=False
    )
    model = transformers.T5ForConditionalGeneration(config)
    ids = torch.randint(0, 64, (2, 8))
    return Case("t5", lambda: config, lambda c: model, lambda: (ids, torch.ones(2, 8, dtype=torch.long), ids))


def traces(model: torch.nn.Module, args: tuple[torch.Tensor, ...], exported: Mode) -> list[str]:
    """The warnings of a swap of ``model``'s ``exported`` export to the other mode about unread state or a minority."""
    program = torch.export.export(copy.deepcopy(model).train(exported is Mode.TRAIN), args)
    target = Mode.EVAL if exported is Mode.TRAIN else Mode.TRAIN
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", modeswap.ModeswapWarning)
        modeswap.swap(program, target)  # attention's unknown training values are another warning
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, modeswap.MixedModeWarning) or "no node reads" in str(w.message)
    ]


@pytest.mark.parametrize("exported", list(Mode))
@pytest.mark.parametrize("case", [*CASES, t5()], ids=[case.name for case in (*CASES, t5())])
def test_real_models_leave_no_trace_to_warn_about(case: Case, exported: Mode) -> None:
    if case.name == "t5":
        torch.manual_seed(0)
        model = Output(case.model_class(case.config()))
    else:
        model = case.build()
    assert traces(model, case.inputs(), exported) == []
