"""The swap primitive (modeswap.forms.swap): lift each input form, edit it once, lower it back to its kind."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.export import ExportedProgram
from torch.fx import GraphModule

import modeswap
from modeswap import Mode
from modeswap.forms.swap import Lifted, Weights, lift, swapped
from modeswap.records.options import Options
from modeswap.testing import Net, assert_same_run, export_program, run_forward_backward


def model() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 8, 8)


@pytest.mark.parametrize("form", ["graph", "program"])
@pytest.mark.parametrize("target", list(Mode))
def test_each_form_comes_back_as_its_kind_and_runs_as_eager(form, target):
    program = export_program(model(), (x(),), target.other)
    module = program if form == "program" else program.module()
    result, changes = swapped(module, target, Options.of(target))
    kind = ExportedProgram if form == "program" else GraphModule
    assert isinstance(result, kind)
    assert result is not module
    assert changes
    runnable = result.module() if isinstance(result, ExportedProgram) else result
    expected = run_forward_backward(copy.deepcopy(model()).train(target is Mode.TRAIN), (x(),), seed=2)
    assert_same_run(expected, run_forward_backward(runnable, (x(),), seed=2), atol=1e-6, rtol=1e-5)


def test_lifting_a_program_reads_its_signature_and_module_paths():
    program = export_program(model(), (x(),), "train")
    lifted = lift(program, Weights())
    assert lifted.module is not program.graph_module
    assert lifted.modules == tuple(entry.fqn for entry in program.module_call_graph)
    assert dict(lifted.state["buffers"]) == program.graph_signature.inputs_to_buffers
    assert dict(lifted.state["parameters"]) == program.graph_signature.inputs_to_parameters


@pytest.mark.parametrize(("share", "same"), [(True, True), (False, False)])
def test_weights_say_whether_the_lifted_copy_shares_the_tensors(share, same):
    gm = export_program(model(), (x(),), "train").module()
    lifted = lift(gm, Weights(share_weights=share))
    assert (lifted.module.get_parameter("conv.weight") is gm.get_parameter("conv.weight")) is same


def test_a_lowering_of_its_own_replaces_the_kind_and_the_input_is_untouched():
    gm = export_program(model(), (x(),), "train").module()
    code = gm.code
    seen: list[Lifted] = []
    result, changes = swapped(gm, Mode.EVAL, Options.of(Mode.EVAL), lowered=seen.append)
    assert result is None
    assert len(seen) == 1
    assert modeswap.mode_of(seen[0].module).mode is Mode.EVAL  # edited; the code is not regenerated here
    assert {change.after for change in changes if change.field == "train"} == {False}
    assert gm.code == code
    assert modeswap.mode_of(gm).mode is Mode.TRAIN


@pytest.mark.parametrize(
    ("value", "error", "says"),
    [
        (nn.Linear(2, 2), modeswap.NotExportedError, "torch.export.export"),
        ("model.pt2", modeswap.NotExportedError, "torch.export.load"),
    ],
)
def test_what_is_not_an_exported_form_is_refused(value, error, says):
    with pytest.raises(error, match=says):
        lift(value, Weights())


def test_a_modal_module_is_refused_by_name():
    modal = modeswap.allow_train_eval(export_program(model(), (x(),), "train").module())
    with pytest.raises(modeswap.NotExportedError, match="allow_train_eval"):
        modeswap.to_eval(modal)
