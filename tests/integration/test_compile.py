"""torch.compile of modal and swapped modules, against the eager model compiled with the same backend.

The oracle is eager PyTorch under ``torch.compile``: with ``backend="eager"``
a compiled modal module runs bit for bit as the compiled eager model (outputs
under one seed, buffers, gradients, a training loop); with inductor, within
inductor's tolerance of it. inductor draws dropout masks from its own random
numbers, not eager's: the compiled eager model draws the same ones, so the
dropout model is compared in train mode too.

dynamo guards on every module's ``.training``, so the compiled eager model
compiles one graph per combination of modes; a modal module compiles no more,
and switching back and forth recompiles nothing (``error_on_recompile``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import modeswap
from modeswap.testing import Net, assert_same_run, assert_trains_like, export, export_program, run_forward_backward

# dynamo reads .grad of each input to see whether it has one, and hides the warning that reading it off a
# non-leaf tensor (the clone run_forward_backward passes, so that the leaf gets the gradient) gives, by
# replacing warnings.showwarning: a warning turned into an error never gets there.
pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")

Args = tuple[torch.Tensor, ...]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    # Each test counts the graphs it compiles: none cached by an earlier one.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def net() -> tuple[nn.Module, Args]:
    """A conv, a batch norm, a dropout and a linear head, in train mode, and its input."""
    torch.manual_seed(0)
    return Net(p=0.3), (torch.randn(4, 3, 6, 6),)


def _loaded(model: nn.Module, args: Args, path: Path) -> modeswap.ModalModule:
    modeswap.save(modeswap.capture(copy.deepcopy(model), args), path / "net.pt2")
    return modeswap.load(path / "net.pt2")


#: Each way to a ModalModule, from the eager model, its input and a folder to save in.
MAKERS: dict[str, Callable[[nn.Module, Args, Path], modeswap.ModalModule]] = {
    "capture": lambda model, args, _: modeswap.capture(copy.deepcopy(model), args),
    "train-graph": lambda model, args, _: modeswap.allow_train_eval(export(model, args, "train")),
    "eval-graph": lambda model, args, _: modeswap.allow_train_eval(export(model, args, "eval")),
    "train-program": lambda model, args, _: modeswap.allow_train_eval(export_program(model, args, "train")),
    "eval-program": lambda model, args, _: modeswap.allow_train_eval(export_program(model, args, "eval")),
    "load": _loaded,
}

#: How close a compiled modal module runs to the compiled eager model, per backend: inductor's own tolerance
#: for float32 (that of torch.testing.assert_close), though the two have run bit for bit alike so far.
TOLERANCE = {"eager": {"atol": 0.0, "rtol": 0.0}, "inductor": {"atol": 1e-5, "rtol": 1.3e-6}}

#: The modes a test steps through: the model's own, and train with its batch norm frozen.
FROZEN = "train, bn frozen"


def set_mode(module: nn.Module, mode: str) -> None:
    """Put ``module`` (the one compiled, not its ``OptimizedModule``) in ``mode``, as a user would."""
    module.train(mode != "eval")
    if mode == FROZEN:
        module.get_submodule("body.bn" if isinstance(module, Outer) else "bn").eval()


class Compiled:
    """A module compiled with a backend that counts the graphs it is given."""

    def __init__(self, module: nn.Module, backend: str, **options: Any) -> None:
        self.module = module
        self.counter = CompileCounterWithBackend(backend)
        self.compiled = torch.compile(module, backend=self.counter, **options)

    @property
    def graphs(self) -> int:
        return self.counter.frame_count

    def run(self, mode: str, args: Args, seed: int) -> dict[str, Any]:
        set_mode(self.module, mode)
        return run_forward_backward(self.compiled, args, seed=seed)


def both(how: str, tmp_path: Path, backend: str = "eager", **options: Any) -> tuple[Compiled, Compiled, Args]:
    """The eager model and the ModalModule ``how`` makes of it, each compiled with ``backend``; and the input."""
    model, args = net()
    modal = MAKERS[how](model, args, tmp_path)
    return Compiled(copy.deepcopy(model), backend, **options), Compiled(modal, backend, **options), args


# -- backend="eager": bit for bit ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", MAKERS)
def test_it_runs_as_the_compiled_eager_model_in_every_mode(how: str, tmp_path: Path) -> None:
    eager, modal, args = both(how, tmp_path)
    runs = {}
    for seed, mode in enumerate(["train", "eval", FROZEN, "train", "eval", FROZEN]):
        expected = eager.run(mode, args, seed)
        assert_same_run(expected, modal.run(mode, args, seed), atol=0.0, rtol=0.0)
        runs.setdefault(mode, expected)
    # Each mode computes something else: a graph run in the wrong one would not pass.
    train, evaluated, frozen = (runs[mode]["outputs"][0] for mode in ("train", "eval", FROZEN))
    assert not torch.equal(train, evaluated)
    assert not torch.equal(frozen, train)
    assert not torch.equal(frozen, evaluated)


@pytest.mark.parametrize("how", MAKERS)
def test_it_trains_as_the_compiled_eager_model(how: str, tmp_path: Path) -> None:
    eager, modal, args = both(how, tmp_path)
    assert assert_trains_like(eager.compiled, modal.compiled, args, atol=0.0, rtol=0.0) > 0
    assert int(modal.module.get_buffer("bn.num_batches_tracked")) == 9  # 3 epochs x 3 steps
    assert modal.graphs == eager.graphs == 2


@pytest.mark.parametrize("how", MAKERS)
def test_one_graph_per_combination_of_modes_and_no_recompile_on_switching(how: str, tmp_path: Path) -> None:
    eager, modal, args = both(how, tmp_path)
    counts: dict[str, list[int]] = {"eager": [], "modal": []}
    for seed, mode in enumerate(["train", "eval", FROZEN]):
        for side, compiled in (("eager", eager), ("modal", modal)):
            compiled.run(mode, args, seed)
            counts[side].append(compiled.graphs)
    assert counts["modal"] == counts["eager"] == [1, 2, 3]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed, mode in enumerate(["train", "eval", "train", FROZEN, "eval", FROZEN, "train"] * 2):
            modal.run(mode, args, seed)
    assert modal.graphs == 3


def test_modules_compiled_one_by_one_each_get_their_graphs() -> None:
    # Compiled in forward, every ModalModule's graphs would share one cache and its recompile limit of 8:
    # the fifth module compiled in both modes would run uncompiled.
    model, args = net()
    gm = export(model, args, "train")
    counter = CompileCounterWithBackend("eager")
    modals = [modeswap.allow_train_eval(gm) for _ in range(5)]
    for modal in modals:
        compiled = torch.compile(modal, backend=counter)
        for mode in ("train", "eval"):
            set_mode(modal, mode)
            compiled(*args)
    assert counter.frame_count == 2 * len(modals)
    assert torch._dynamo.config.recompile_limit < 2 * len(modals)


def test_copies_of_one_module_share_their_graphs() -> None:
    model, args = net()
    modal = modeswap.capture(model, args)
    counts = {}
    for name, module in (("eager", model), ("modal", modal)):
        counter = CompileCounterWithBackend("eager")
        for copied in (copy.deepcopy(module) for _ in range(3)):
            compiled = torch.compile(copied, backend=counter)
            for mode in ("train", "eval"):
                set_mode(copied, mode)
                compiled(*args)
        counts[name] = counter.frame_count
    assert counts == {"eager": 2, "modal": 2}


@pytest.mark.parametrize("how", MAKERS)
def test_fullgraph_holds_in_every_mode_and_combination(how: str, tmp_path: Path) -> None:
    eager, modal, args = both(how, tmp_path, fullgraph=True)
    # The frozen combination is built on its first run: as Python, ahead of the compiled graph.
    for seed, mode in enumerate(["train", FROZEN, "eval", FROZEN, "train"]):
        assert_same_run(eager.run(mode, args, seed), modal.run(mode, args, seed), atol=0.0, rtol=0.0)
    assert modal.graphs == eager.graphs == 3


def test_a_frozen_batch_norm_compiles_once_and_stays_frozen() -> None:
    model, args = net()
    eager = Compiled(copy.deepcopy(model), "eager")
    modal = Compiled(modeswap.capture(model, args), "eager")
    for seed, mode in enumerate(["train", FROZEN]):
        assert_same_run(eager.run(mode, args, seed), modal.run(mode, args, seed), atol=0.0, rtol=0.0)
    frozen = {name: modal.module.get_buffer(f"bn.{name}").clone() for name in ("running_mean", "num_batches_tracked")}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            assert_same_run(eager.run(FROZEN, args, seed), modal.run(FROZEN, args, seed), atol=0.0, rtol=0.0)
    for name, before in frozen.items():
        assert torch.equal(modal.module.get_buffer(f"bn.{name}"), before), name
    assert modal.graphs == eager.graphs == 2


# -- inside a compiled model -----------------------------------------------------------------------------------


class Outer(nn.Module):
    """An eager stem, a body (eager, exported or modal), an eager head: compiled as one model."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.stem = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
            self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(2, 2))
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))  # type: ignore[no-any-return]


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_a_modal_body_switches_inside_a_compiled_model(backend: str) -> None:
    model, args = net()
    eager = Compiled(Outer(copy.deepcopy(model)), backend)
    modal = Compiled(Outer(modeswap.capture(model, args)), backend)
    for seed, mode in enumerate(["train", "eval"]):
        assert_same_run(eager.run(mode, args, seed), modal.run(mode, args, seed), **TOLERANCE[backend])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed, mode in enumerate(["train", "eval", "train", "eval"], start=2):
            assert_same_run(eager.run(mode, args, seed), modal.run(mode, args, seed), **TOLERANCE[backend])
    assert modal.graphs == eager.graphs == 2


@pytest.mark.parametrize("how", ["capture", "load"])
def test_modes_first_met_inside_a_compiled_model_are_built_into_its_graph(how: str, tmp_path: Path) -> None:
    # A loaded module reads the mode it was not saved in (eval) on first use, which gives it modules of its own.
    model, args = net()
    eager = Compiled(Outer(copy.deepcopy(model)), "eager", fullgraph=True)
    modal = Compiled(Outer(MAKERS[how](model, args, tmp_path)), "eager", fullgraph=True)
    # Each new graph is built while the compiled model is traced, which then starts again: one graph, no break.
    for seed, mode in enumerate(["train", FROZEN, "eval", FROZEN, "train", "eval"]):
        assert_same_run(eager.run(mode, args, seed), modal.run(mode, args, seed), atol=0.0, rtol=0.0)
    assert modal.graphs == eager.graphs == 3


def _set_training(outer: Outer, training: bool) -> Outer:
    # An exported GraphModule refuses .train() and .eval(): the modules around it are set one by one.
    for module in (outer, *outer.stem, *outer.head):
        module.training = training
    return outer


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_swapped_graph_module_runs_inside_a_compiled_model(mode: str) -> None:
    model, args = net()
    exported = export(model, args, "eval" if mode == "train" else "train")
    training = mode == "train"
    eager = torch.compile(_set_training(Outer(copy.deepcopy(model).train(training)), training), backend="eager")
    counter = CompileCounterWithBackend("eager")
    swapped = torch.compile(_set_training(Outer(modeswap.swap(exported, mode).module), training), backend=counter)
    unswapped = torch.compile(_set_training(Outer(exported), training), backend="eager")
    for seed in range(3):
        expected = run_forward_backward(eager, args, seed=seed)
        assert_same_run(expected, run_forward_backward(swapped, args, seed=seed), atol=0.0, rtol=0.0)
        assert not torch.equal(run_forward_backward(unswapped, args, seed=seed)["outputs"][0], expected["outputs"][0])
    assert counter.frame_count == 1


# -- backend="inductor" ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", MAKERS)
def test_inductor_compiles_it_as_it_compiles_the_eager_model(how: str, tmp_path: Path) -> None:
    eager, modal, args = both(how, tmp_path, "inductor")
    # The dropout's masks come from inductor's random numbers, as the compiled eager model's do.
    assert assert_trains_like(eager.compiled, modal.compiled, args, **TOLERANCE["inductor"]) > 0
    assert modal.graphs == eager.graphs == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert_trains_like(eager.compiled, modal.compiled, args, **TOLERANCE["inductor"])
