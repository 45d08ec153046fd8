"""The compilers after the swap: run_decompositions, AOTInductor, ExecuTorch and torchao's convert_pt2e.

A swap's output must be a program every downstream tool accepts. Each tool
gets two of them: ``modeswap.to_eval`` (or ``to_train``) of an export in the
other mode, and what ``modeswap convert`` wrote for a saved export, loaded
back; eager PyTorch is the judge. The model drops, normalizes over the batch
and attends with dropout, so a swap that changed nothing computes something
else: each check first asserts that the two modes differ by more than its
tolerance.

What the tools cannot take, they reject for a train export as well: a
decomposed train program runs forward but not backward, and ExecuTorch does
not lower training batch norm. Those tests assert that the swapped program
fails exactly as torch's own export does.

QAT starts from a train graph: an eval export moved to train prepares and
trains as a train export does, and converts to int8. A prepared model
exported again swaps to its fake-quantized eval, but ``convert_pt2e`` finds
nothing to convert in it (see the last test).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch._export.verifier import SpecViolationError
from torch.export import ExportedProgram

import modeswap
from modeswap.cli.main import main
from modeswap.records.modes import Mode
from modeswap.testing import (
    assert_same_run,
    assert_same_state,
    call_signature,
    export_program,
    other,
    quiet,
    run_forward_backward,
)

ATTENTION_P = 0.25
X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
SEED = 3
ROUTES = ("swapped", "converted")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8, eps=1e-3, momentum=0.3)
        self.drop = nn.Dropout(0.2)
        self.attn = nn.MultiheadAttention(8, 2, dropout=ATTENTION_P, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.drop(self.bn(self.conv(x)).relu()).flatten(2).transpose(1, 2)
        attended, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.fc(attended.mean(1))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def net() -> Net:
    torch.manual_seed(0)
    return Net()


def moved(exported: ExportedProgram, target: Mode, route: str, tmp_path: Path) -> ExportedProgram:
    """``exported`` moved to ``target`` by ``modeswap.to_eval`` or ``to_train``, or by ``modeswap convert``.

    The ``"converted"`` route saves ``exported``, runs the command line on it
    and loads what it wrote. An eval export records attention dropout as 0.0:
    the move to train is told ``ATTENTION_P``.
    """
    if route == "swapped":
        with quiet():
            if target is Mode.EVAL:
                return modeswap.to_eval(exported)
            return modeswap.to_train(exported, attention_dropout=ATTENTION_P)
    torch.export.save(exported, tmp_path / "in.pt2")
    flags = ["--attention-dropout", str(ATTENTION_P)] if target is Mode.TRAIN else []
    command = ["convert", str(tmp_path / "in.pt2"), "--to", target.value, "-o", str(tmp_path / "out.pt2"), *flags]
    assert main(command) == 0
    return torch.export.load(tmp_path / "out.pt2")


def moved_export(net: nn.Module, target: Mode, route: str, tmp_path: Path) -> ExportedProgram:
    """An export of ``net`` in the other mode, moved to ``target`` (see :func:`moved`)."""
    return moved(export_program(net, (X,), other(target)), target, route, tmp_path)


def eager(net: nn.Module, mode: Mode) -> dict[str, Any]:
    """Eager ``net`` in ``mode``: one forward and backward under ``SEED`` (see ``run_forward_backward``)."""
    return run_forward_backward(copy.deepcopy(net).train(mode is Mode.TRAIN), (X,), seed=SEED)


def assert_eval_output(net: nn.Module, output: torch.Tensor, *, atol: float, rtol: float) -> None:
    """Assert that ``output`` is eager ``net``'s in eval mode within the tolerance, which tells the modes apart."""
    want, in_train = eager(net, Mode.EVAL)["outputs"][0], eager(net, Mode.TRAIN)["outputs"][0]
    assert not torch.allclose(in_train, want, atol=atol, rtol=rtol), "the modes agree: this check could not fail"
    torch.testing.assert_close(output, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("route", ROUTES)
def test_an_eval_program_decomposed_runs_as_eager_eval(net: Net, route: str, tmp_path: Path) -> None:
    decomposed = moved_export(net, Mode.EVAL, route, tmp_path).run_decompositions()
    assert_eval_output(net, decomposed.module()(X).detach(), atol=1e-6, rtol=1e-5)
    assert_same_run(
        eager(net, Mode.EVAL), run_forward_backward(decomposed.module(), (X,), seed=SEED), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("route", ROUTES)
def test_a_train_program_decomposed_runs_forward_as_eager_train(net: Net, route: str, tmp_path: Path) -> None:
    decomposed = moved_export(net, Mode.TRAIN, route, tmp_path).run_decompositions()
    expected, actual = eager(net, Mode.TRAIN), run_forward_backward(decomposed.module(), (X,), seed=SEED, catch=True)
    # Same seed, same dropout masks; batch norm updates its running statistics and counts the batch.
    assert not torch.allclose(expected["outputs"][0], eager(net, Mode.EVAL)["outputs"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(actual["outputs"], expected["outputs"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(actual["buffers"], expected["buffers"], atol=1e-6, rtol=1e-5)
    assert int(actual["buffers"]["bn.num_batches_tracked"]) == 1
    # torch's own decomposed train export cannot backward either: its module copy_()s the new running
    # statistics into the buffers that _native_batch_norm_legit_functional saved for its backward.
    torch_own = export_program(net, (X,), "train").run_decompositions()
    failed = run_forward_backward(torch_own.module(), (X,), seed=SEED, catch=True)["failed"]
    assert actual["failed"] == failed
    assert failed.startswith("backward: RuntimeError: one of the variables needed for gradient computation")


@pytest.mark.parametrize("route", ROUTES)
def test_aoti_compiles_an_eval_program_that_runs_as_eager_eval(net: Net, route: str, tmp_path: Path) -> None:
    program = moved_export(net, Mode.EVAL, route, tmp_path)
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "aoti.pt2"))
    compiled = torch._inductor.aoti_load_package(package)
    assert_eval_output(net, compiled(X), atol=1e-5, rtol=1e-4)


@pytest.fixture
def executorch_runtime() -> Any:
    pytest.importorskip("executorch")
    from executorch.runtime import Runtime

    return Runtime.get()


def lowered(program: ExportedProgram) -> bytes:
    """``program`` lowered to ExecuTorch's portable operators: the bytes of a ``.pte`` file."""
    from executorch.exir import to_edge

    return bytes(to_edge(program).to_executorch().buffer)


@pytest.mark.parametrize("route", ROUTES)
def test_executorch_runs_an_eval_program_as_eager_eval(
    net: Net, route: str, tmp_path: Path, executorch_runtime: Any
) -> None:
    pte = lowered(moved_export(net, Mode.EVAL, route, tmp_path))
    (output,) = executorch_runtime.load_program(pte).load_method("forward").execute([X])
    assert_eval_output(net, output, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("route", ROUTES)
def test_executorch_refuses_a_train_program_as_it_refuses_a_train_export(
    net: Net, route: str, tmp_path: Path, executorch_runtime: Any
) -> None:
    with pytest.raises(SpecViolationError) as torch_own:
        lowered(export_program(net, (X,), "train"))
    with pytest.raises(SpecViolationError) as swapped:
        lowered(moved_export(net, Mode.TRAIN, route, tmp_path))
    assert "_native_batch_norm_legit_functional.default is not in Core ATen opset" in str(torch_own.value)
    assert str(swapped.value) == str(torch_own.value)


@pytest.fixture(scope="module")
def quantizer() -> Any:
    pytest.importorskip("torchao")
    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_qat=True))


def qat_trained(gm: torch.fx.GraphModule, quantizer: Any) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """``gm`` prepared for QAT and trained three steps (SGD, seeds 0 to 2); and the losses."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    prepared = prepare_qat_pt2e(gm, quantizer)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05)
    losses = []
    for seed in range(3):
        torch.manual_seed(seed)
        loss = prepared(X).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return prepared, torch.stack(losses)


@pytest.fixture(scope="module")
def qat(net: Net, quantizer: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """QAT from a train export ("exported", the usual start), and from an eval export moved to train by each route.

    Each is prepared and trained three steps (:func:`qat_trained`); the tests copy what they run.
    """
    starts = {"exported": export_program(net, (X,), "train")}
    for route in ROUTES:
        starts[route] = moved_export(net, Mode.TRAIN, route, tmp_path_factory.mktemp(route))
    return {name: qat_trained(program.module(), quantizer) for name, program in starts.items()}


def in_both_modes(prepared: torch.fx.GraphModule) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of a copy of ``prepared`` in train mode under ``SEED``, and of ``modeswap.to_eval(prepared)``."""
    with torch.no_grad():
        torch.manual_seed(SEED)
        in_train = copy.deepcopy(prepared)(X)
        return in_train, modeswap.to_eval(prepared)(X)


@pytest.mark.parametrize("route", ROUTES)
def test_qat_from_a_train_program_trains_as_from_a_train_export(route: str, qat: dict[str, Any]) -> None:
    (prepared, losses), (reference, reference_losses) = qat[route], qat["exported"]
    # prepare_qat_pt2e found the conv and batch norm pair of the moved program as of the export.
    assert call_signature(prepared) == call_signature(reference)
    assert torch.equal(losses, reference_losses)
    assert_same_state(reference, prepared)
    in_train, fake = in_both_modes(prepared)
    assert not torch.allclose(in_train, fake, atol=0.02), "the modes agree: this check could not fail"
    assert torch.equal(fake, in_both_modes(reference)[1])


def test_convert_pt2e_quantizes_qat_from_a_converted_program(qat: dict[str, Any]) -> None:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    prepared, _ = qat["converted"]
    in_train, fake = in_both_modes(prepared)
    with torch.no_grad():
        converted = convert_pt2e(modeswap.to_eval(prepared))
        output = converted(X)
    ops = {str(n.target) for n in converted.graph.nodes}
    assert "aten.batch_norm.default" not in ops  # folded into the convolution
    assert "quantized_decomposed.quantize_per_tensor.default" in ops
    assert not torch.allclose(in_train, fake, atol=0.02), "the modes agree: this check could not fail"
    torch.testing.assert_close(output, fake, atol=0.02, rtol=0)  # int8 against fake quantization


@pytest.mark.parametrize("route", ROUTES)
def test_a_program_of_a_qat_model_moves_to_its_fake_quantized_eval(
    route: str, tmp_path: Path, qat: dict[str, Any]
) -> None:
    """A QAT model exported again is a program modeswap swaps, but past what ``convert_pt2e`` can convert.

    ``torch.export`` inlines the fake-quantize modules that ``convert_pt2e``
    looks for into ``fused_moving_avg_obs_fake_quant`` ops: on such a program
    it converts nothing. Swap and convert the prepared ``GraphModule`` (above).
    """
    prepared, _ = qat["exported"]
    evaluated = moved(torch.export.export(copy.deepcopy(prepared), (X,)), Mode.EVAL, route, tmp_path).module()
    calls = {str(n.target) for n in evaluated.graph.nodes if n.op == "call_module"}
    assert not any(call.startswith("activation_post_process") for call in calls)  # what convert_pt2e looks for
    in_train, fake = in_both_modes(prepared)
    assert not torch.allclose(in_train, fake, atol=0.02), "the modes agree: this check could not fail"
    with torch.no_grad():
        assert torch.equal(evaluated(X), fake)
