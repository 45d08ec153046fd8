"""Weights shared under several names stay one tensor through save and load, and train as eager's do."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from archived_models import Shared, Tied, bart, gpt2, seeded, t5, tokens
from torch import nn
from torch.export.pt2_archive._package import package_pt2
from torch.utils import _pytree as pytree

import modeswap
from modeswap.cli.main import main
from modeswap.fx.sharing import alias_groups, tie
from modeswap.testing.oracle import assert_same_run, run_forward_backward


def test_alias_groups_are_the_names_of_one_object_in_order() -> None:
    model = seeded(Tied)
    assert alias_groups(dict(model.named_parameters(remove_duplicate=False))) == (("emb.weight", "out.weight"),)
    assert alias_groups({"a": 1.5, "b": 2.5}) == ()


def test_tie_makes_the_recorded_names_one_object_and_leaves_its_input() -> None:
    a, b, c = (nn.Parameter(torch.randn(3)) for _ in range(3))
    given = {"a": a, "b": b, "c": c}
    tied = tie(given, [("b", "a", "gone"), ("c",)])
    assert (tied["a"], tied["b"], tied["c"]) == (b, b, c)
    assert given == {"a": a, "b": b, "c": c}


def test_tie_without_a_record_ties_what_torch_export_load_untied(tmp_path: Path) -> None:
    model = seeded(Tied)
    torch.export.save(torch.export.export(model, (tokens(),)), tmp_path / "tied.pt2")
    state = torch.export.load(tmp_path / "tied.pt2").state_dict
    assert state["emb.weight"] is not state["out.weight"]  # torch's loader unties them
    tied = tie(state)
    assert tied["emb.weight"] is tied["out.weight"]
    assert tied["norm.weight"] is state["norm.weight"]
    assert tied["norm.weight"] is not tied["norm.bias"]


@pytest.mark.parametrize(
    "make",
    [
        lambda w: (nn.Parameter(w), nn.Parameter(w.clone())),  # two storages
        lambda w: (nn.Parameter(w[:2]), nn.Parameter(w[1:])),  # one storage, other views
        lambda w: (nn.Parameter(w), w),  # a Parameter and a plain tensor
        lambda w: (nn.Parameter(w), nn.Parameter(w, requires_grad=False)),
        lambda w: (nn.Parameter(w.to("meta")), nn.Parameter(w.to("meta"))),  # no memory to compare
        lambda w: (w[:0], w[3:]),  # no bytes
    ],
    ids=["storages", "views", "kinds", "requires_grad", "meta", "empty"],
)
def test_tie_without_a_record_leaves_tensors_that_are_not_one_view(make: Callable[[torch.Tensor], Any]) -> None:
    first, second = make(torch.randn(3))
    tied = tie({"first": first, "second": second})
    assert tied["first"] is first
    assert tied["second"] is second


#: Models whose weights are shared under several names, their inputs, and what their forward takes by keyword.
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Any, ...]], Callable[[], dict[str, Any]]]] = {
    "tied": (lambda: seeded(Tied), lambda: (tokens(),), dict),
    "shared_module": (
        lambda: seeded(Shared),
        lambda: (torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),),
        dict,
    ),
    "gpt2": (gpt2, lambda: (tokens(),), dict),
    "bart": (bart, lambda: (tokens(),), dict),
    "t5": (t5, lambda: (tokens(),), lambda: {"decoder_input_ids": tokens(seed=1)}),
}


@pytest.fixture(scope="module", params=list(CASES))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An eager model with shared weights, its capture (in train mode), and the capture saved and loaded."""
    if request.param in ("gpt2", "bart", "t5"):
        pytest.importorskip("transformers")
    build, args, kwargs = CASES[request.param]
    eager = build().train()
    modal = modeswap.capture(copy.deepcopy(eager), args(), kwargs())
    path = tmp_path_factory.mktemp("shared") / f"{request.param}.pt2"
    modeswap.save(modal, path)
    return {"eager": eager, "modal": modal, "path": path, "args": args(), "kwargs": kwargs(), "name": request.param}


def tensor_names(module: nn.Module) -> dict[str, Any]:
    """The names of the parameters and buffers, which of them alias which, and the state dict's keys."""
    every = {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }
    return {
        "parameters": [name for name, _ in module.named_parameters()],
        "buffers": [name for name, _ in module.named_buffers()],
        "state_dict": list(module.state_dict()),
        "aliases": alias_groups(every),
    }


def test_names_and_aliases_are_capture_s_and_eager_s(saved: dict[str, Any]) -> None:
    loaded = modeswap.load(saved["path"])
    want = tensor_names(saved["eager"])
    assert tensor_names(saved["modal"]) == want
    assert tensor_names(loaded) == want
    assert want["aliases"]  # something is shared


def test_a_module_under_two_names_is_one_module_again(saved: dict[str, Any]) -> None:
    loaded = modeswap.load(saved["path"])
    eager_paths = {path for path, _ in saved["eager"].named_modules(remove_duplicate=False)}

    def groups(module: nn.Module) -> tuple[tuple[str, ...], ...]:
        named = dict(module.named_modules(remove_duplicate=False))
        return alias_groups({path: m for path, m in named.items() if path in eager_paths})

    assert groups(loaded) == groups(saved["modal"]) == groups(saved["eager"])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients_land_where_eager_s_land(saved: dict[str, Any], training: bool) -> None:
    loaded = modeswap.load(saved["path"]).train(training)
    eager = copy.deepcopy(saved["eager"]).train(training)
    want = run_forward_backward(eager, saved["args"], saved["kwargs"], seed=3)
    got = run_forward_backward(loaded, saved["args"], saved["kwargs"], seed=3)
    assert list(got["grads"]) == list(want["grads"])
    assert_same_run(want, got, atol=1e-5, rtol=1e-4)


def train_alike(
    eager: nn.Module,
    other: nn.Module,
    inputs: tuple[tuple[Any, ...], dict[str, Any]],
    optimizer: Callable[..., torch.optim.Optimizer],
    *,
    training: bool,
    steps: int = 3,
) -> None:
    """Take ``steps`` steps of ``optimizer`` on both in one mode; compare the loss and every state entry after each."""
    args, kwargs = inputs
    optimizers = [optimizer(m.parameters(), lr=0.01) for m in (eager, other)]
    for step in range(steps):
        losses = []
        for module, opt in zip((eager, other), optimizers, strict=True):
            torch.manual_seed(step)
            outputs = pytree.tree_leaves(module.train(training)(*args, **kwargs))
            loss = sum(o.square().mean() for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point())
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            opt.zero_grad()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-4, msg=lambda m, s=step: f"{s}: {m}")
        want, got = eager.state_dict(), other.state_dict()
        assert list(got) == list(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_training_after_load_matches_eager_step_for_step(
    saved: dict[str, Any], optimizer: Callable[..., torch.optim.Optimizer], training: bool
) -> None:
    eager, loaded = copy.deepcopy(saved["eager"]), modeswap.load(saved["path"])
    train_alike(eager, loaded, (saved["args"], saved["kwargs"]), optimizer, training=training)


def test_names_moved_with_to_stay_one_tensor(saved: dict[str, Any]) -> None:
    loaded = modeswap.load(saved["path"]).double()
    eager = copy.deepcopy(saved["eager"]).double()
    assert tensor_names(loaded)["aliases"] == tensor_names(eager)["aliases"]
    if saved["name"] not in ("tied", "shared_module"):
        return  # transformers' graphs assert the dtype they were exported in
    inputs = pytree.tree_map_only(torch.Tensor, lambda t: t.double() if t.is_floating_point() else t, saved["args"])
    train_alike(eager, loaded, (inputs, saved["kwargs"]), torch.optim.SGD, training=True, steps=2)


def format_1(path: Path, model: nn.Module, args: tuple[Any, ...]) -> None:
    """Write ``model``'s programs as modeswap.save wrote format 1: torch's writer, each program its own tensors."""
    programs = modeswap.eager.check.export_modes(model, args)
    header = json.dumps({"format": "modeswap.ModalModule", "version": 1, "mode": "train", "modeswap": "0.1.0"})
    named = {mode.value: program for mode, program in programs.items()}
    package_pt2(path, exported_programs=named, extra_files={"modeswap.json": header})


def test_an_archive_of_format_1_loads_with_its_tied_weights_tied(tmp_path: Path) -> None:
    eager = seeded(Tied).train()
    format_1(tmp_path / "tied.pt2", copy.deepcopy(eager), (tokens(),))
    loaded = modeswap.load(tmp_path / "tied.pt2")
    assert tensor_names(loaded) == tensor_names(eager)
    train_alike(eager, loaded, ((tokens(),), {}), torch.optim.Adam, training=True)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_writes_the_shared_weights_once(saved: dict[str, Any], tmp_path: Path, mode: str) -> None:
    out = tmp_path / "one.pt2"
    assert main(["convert", str(saved["path"]), "--to", mode, "-o", str(out)]) == 0
    program = torch.export.load(out)
    state = tie(program.state_dict)  # what torch's loader unties, the file holds as one record
    eager = saved["eager"]
    for group in tensor_names(eager)["aliases"]:
        assert len({id(state[name]) for name in group if name in state}) == 1, group
    module = program.module()
    want = run_forward_backward(copy.deepcopy(eager).train(mode == "train"), saved["args"], saved["kwargs"], seed=2)
    got = run_forward_backward(module, saved["args"], saved["kwargs"], seed=2)
    torch.testing.assert_close(got["outputs"], want["outputs"], atol=1e-5, rtol=1e-4)
