"""ExportedProgram in and out: eager equivalence, purity, the verifier, save/load, decompositions, dynamic shapes."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import ExportedProgram
from torch.export.pt2_archive._package import load_pt2

import modeswap
from modeswap import Mode
from modeswap.testing import assert_same_run, call_signature, export_program, other, run_forward_backward


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, momentum=0.3, eps=1e-3)
        self.drop = nn.Dropout2d(0.25)
        self.offset = torch.ones(1)  # a tensor constant

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # "input" shadows a builtin: names must survive
        x = self.drop(self.bn(self.conv(input)))
        q = x.flatten(2)
        return F.scaled_dot_product_attention(q, q, q, dropout_p=0.2 if self.training else 0.0) + self.offset


x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def model() -> Net:
    torch.manual_seed(0)
    return Net()


def dropout_for(mode: Mode) -> float | None:
    return 0.2 if mode is Mode.TRAIN else None


def saved_and_loaded(ep: ExportedProgram) -> ExportedProgram:
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


@pytest.mark.parametrize("target", list(Mode))
def test_a_swapped_program_behaves_as_eager(model, target):
    swapped = modeswap.swap(export_program(model, (x,), other(target)), target, attention_dropout=dropout_for(target))
    assert isinstance(swapped.module, ExportedProgram)
    swapped.module.validate()  # torch's verifier
    eager = copy.deepcopy(model).train(target is Mode.TRAIN)
    trained = swapped.module.module()
    for step in range(2):  # buffers: running stats, and num_batches_tracked counting only in train
        expected = run_forward_backward(eager, (x,), seed=step)
        actual = run_forward_backward(trained, (x,), seed=step)
        assert_same_run(expected, actual, atol=1e-6, rtol=1e-5)
    assert int(actual["buffers"]["bn.num_batches_tracked"]) == (2 if target is Mode.TRAIN else 0)
    assert modeswap.mode_of(swapped.module).mode is target


@pytest.mark.parametrize("source", list(Mode))
def test_the_input_program_is_untouched(model, source):
    ep = export_program(model, (x,), source)
    code, signature = ep.graph_module.code, str(ep.graph_signature)
    state = {k: (v.data_ptr(), v.clone()) for k, v in ep.state_dict.items()}
    swapped = modeswap.swap(ep, other(source), attention_dropout=dropout_for(other(source))).module
    run_forward_backward(swapped.module(), (x,), seed=0)
    assert (ep.graph_module.code, str(ep.graph_signature)) == (code, signature)
    for name, (ptr, value) in state.items():
        assert ep.state_dict[name].data_ptr() == ptr
        assert torch.equal(ep.state_dict[name], value)
        assert swapped.state_dict[name].data_ptr() != ptr
    assert swapped.constants["offset"].data_ptr() != ep.constants["offset"].data_ptr()


def test_share_weights_aliases_the_state_dict(model):
    ep = export_program(model, (x,), Mode.TRAIN)
    swapped = modeswap.swap(ep, "eval", share_weights=True).module
    assert all(swapped.state_dict[k] is v for k, v in ep.state_dict.items())


def test_placeholder_names_and_the_signature_agree(model):
    swapped = modeswap.to_eval(export_program(model, (x,), Mode.TRAIN))
    placeholders = [n.name for n in swapped.graph.nodes if n.op == "placeholder"]
    assert placeholders == [spec.arg.name for spec in swapped.graph_signature.input_specs]
    assert "input" in placeholders


@pytest.mark.parametrize("source", list(Mode))
def test_round_trip_is_exact(model, source):
    ep = export_program(model, (x,), source)
    away = modeswap.swap(ep, other(source), attention_dropout=dropout_for(other(source))).module
    back = modeswap.swap(away, source, attention_dropout=dropout_for(source)).module
    assert call_signature(back.graph_module) == call_signature(ep.graph_module)


def test_save_and_load_keep_numerics_report_and_memo(model):
    ep = export_program(model, (x,), Mode.TRAIN)
    evaluated = modeswap.to_eval(ep)
    loaded = saved_and_loaded(evaluated)
    assert modeswap.mode_of(loaded) == modeswap.mode_of(evaluated)
    torch.testing.assert_close(loaded.module()(x), copy.deepcopy(model).eval()(x), atol=1e-6, rtol=1e-5)
    back = modeswap.to_train(loaded)  # no attention_dropout needed: the memo came through save/load
    assert call_signature(back.graph_module) == call_signature(ep.graph_module)


def test_a_memo_from_a_program_works_on_its_module(model):
    evaluated = modeswap.to_eval(export_program(model, (x,), Mode.TRAIN))
    trained = modeswap.to_train(evaluated.module())
    expected = run_forward_backward(copy.deepcopy(model).train(), (x,), seed=5)
    assert_same_run(expected, run_forward_backward(trained, (x,), seed=5), atol=1e-6, rtol=1e-5)


def test_run_decompositions_after_a_swap_to_eval_keeps_eager_numerics(model):
    decomposed = modeswap.to_eval(export_program(model, (x,), Mode.TRAIN)).run_decompositions()
    expected = run_forward_backward(copy.deepcopy(model).eval(), (x,), seed=2)
    assert_same_run(expected, run_forward_backward(decomposed.module(), (x,), seed=2), atol=1e-5, rtol=1e-4)


def test_run_decompositions_after_a_swap_to_train_keeps_the_buffer_updates(model):
    # Decomposed dropout draws its random numbers differently, and torch's decomposed train
    # programs cannot run backward (their batch norm writes buffers back in place): compare
    # what the forward does to the buffers.
    decomposed = (
        modeswap.to_train(export_program(model, (x,), Mode.EVAL), attention_dropout=0.2).run_decompositions().module()
    )
    eager = copy.deepcopy(model).train()
    with torch.no_grad():
        for _ in range(2):
            decomposed(x)
            eager(x)
    buffers = dict(decomposed.named_buffers())
    assert buffers["bn.num_batches_tracked"].item() == eager.bn.num_batches_tracked.item() == 2
    torch.testing.assert_close(buffers["bn.running_mean"], eager.bn.running_mean)
    torch.testing.assert_close(buffers["bn.running_var"], eager.bn.running_var)


def test_a_decomposed_program_is_refused(model):
    decomposed = export_program(model, (x,), Mode.TRAIN).run_decompositions()
    with pytest.raises(
        modeswap.UnsupportedGraphError, match=r"ATEN dialect.*Swap the program torch\.export\.export returns"
    ):
        modeswap.to_eval(decomposed)


def test_dynamic_shapes_survive(model):
    batch = torch.export.Dim("batch", min=2, max=8)
    ep = torch.export.export(model.train(), (x,), dynamic_shapes={"input": {0: batch}})
    evaluated = modeswap.to_eval(ep).module()
    for size in (2, 5, 8):
        other_x = torch.randn(size, 3, 5, 5)
        torch.testing.assert_close(evaluated(other_x), copy.deepcopy(model).eval()(other_x), atol=1e-6, rtol=1e-5)
    with pytest.raises(AssertionError, match="Guard failed"):
        evaluated(torch.randn(9, 3, 5, 5))


# The skeleton: a program without its tensors, as a modal module keeps one per mode and save writes it.


class Shifted(nn.Module):
    """A tensor made in forward, of another value in each mode: each program has its own constant, of one name."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = torch.tensor([2.0, 4.0, 6.0]) if self.training else torch.tensor([1.0, 2.0, 3.0])
        return self.linear(x) + shift


def test_a_constant_of_each_mode_is_saved_with_its_program(tmp_path: Path) -> None:
    eager, x = Shifted(), torch.randn(2, 3)
    modeswap.save(modeswap.capture(eager, (x,)), tmp_path / "shifted.pt2")
    programs = load_pt2(tmp_path / "shifted.pt2").exported_programs
    (train,), (evaluated,) = (list(programs[mode].constants.values()) for mode in ("train", "eval"))
    torch.testing.assert_close(train, torch.tensor([2.0, 4.0, 6.0]))
    torch.testing.assert_close(evaluated, torch.tensor([1.0, 2.0, 3.0]))
    loaded = modeswap.load(tmp_path / "shifted.pt2")
    for training in (True, False):
        torch.testing.assert_close(loaded.train(training)(x), eager.train(training)(x), atol=0, rtol=0)


def test_the_file_holds_the_state_once_for_both_programs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.BatchNorm1d(512), nn.Dropout(0.1), nn.Linear(512, 256))
    modal = modeswap.capture(model, (torch.randn(8, 256),))
    modeswap.save(modal, tmp_path / "wide.pt2")
    state = sum(t.untyped_storage().nbytes() for t in modal.state_dict().values())
    size = (tmp_path / "wide.pt2").stat().st_size
    records = modeswap.files.archive.skeletons_of(modal)
    graphs = sum(len(part) for skeleton in records.values() for part in skeleton.records())
    # The state once, the two graphs and their sample inputs, and the tables and zip headers around them.
    assert state + graphs < size < 1.05 * (state + graphs), (size, state, graphs)
