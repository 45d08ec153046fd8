"""A ModalModule whose submodules are in modes of their own computes what eager computes, or says why not.

``model.train(); model.bn.eval()`` freezes a batch norm while fine-tuning;
``model.eval(); model.drop.train()`` is Monte Carlo dropout. Each site of a
ModalModule follows the ``.training`` of the module that owns it, for every
maker: ``allow_train_eval`` of a train export, and ``capture``.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeswap
from modeswap import Mode
from modeswap.testing import assert_same_run, export, run_forward_backward
from modeswap.testing.models import Attention, AuxiliaryHeads, DropPath, Net, Noise, NormEval, SharedBatchNorm

MAKERS = ["allow_train_eval", "capture"]


X = torch.randn(4, 3, 5, 5)


def make(model: nn.Module, how: str, args: tuple[Any, ...] = (X,), **options: Any) -> modeswap.ModalModule:
    if how == "capture":
        return modeswap.capture(copy.deepcopy(model), args)
    return modeswap.allow_train_eval(export(model, args, Mode.TRAIN), **options)


def mlp_head(channels: int, classes: int) -> nn.Module:
    """Linear, batch norm, dropout, linear: a head with sites of its own."""
    return nn.Sequential(
        nn.Linear(channels, channels), nn.BatchNorm1d(channels), nn.Dropout(0.5), nn.Linear(channels, classes)
    )


def net() -> nn.Module:
    torch.manual_seed(0)
    return Net(momentum=0.2, p=0.3, head=mlp_head).train()


def same(eager: nn.Module, modal: nn.Module, args: tuple[Any, ...] = (X,), seed: int = 3) -> None:
    """A forward and a backward of each, under ``seed``: outputs, buffers, gradients, input gradients."""
    assert_same_run(
        run_forward_backward(eager, args, seed=seed), run_forward_backward(modal, args, seed=seed), atol=1e-6, rtol=1e-5
    )


def flags(module: nn.Module) -> dict[str, bool]:
    return {path: m.training for path, m in module.named_modules()}


def sgd(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad


PATHS = ("bn", "drop", "head.1", "head.2")


@pytest.mark.parametrize("how", MAKERS)
@pytest.mark.parametrize("modes", list(itertools.product((True, False), repeat=len(PATHS) + 1)))
def test_every_combination_of_submodule_modes_is_eager(how: str, modes: tuple[bool, ...]) -> None:
    eager = net()
    modal = make(eager, how)
    for module in (eager, modal):
        module.train(modes[0])
        for path, training in zip(PATHS, modes[1:], strict=True):
            module.get_submodule(path).train(training)
    assert {p: f for p, f in flags(modal).items() if p in flags(eager)} == {
        p: f for p, f in flags(eager).items() if p in flags(modal)
    }
    for seed in (3, 4):  # a second pass reads what the first one updated
        same(eager, modal, seed=seed)
        sgd(eager)
        sgd(modal)
    assert modeswap.mode_of(modal).mixed is (len(set(modes[1:])) > 1)  # the root owns no site


@pytest.mark.parametrize("how", MAKERS)
def test_a_batch_norm_frozen_while_fine_tuning_trains_as_eager(how: str) -> None:
    eager = net()
    modal = make(eager, how)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, modal)]
    for epoch in range(2):
        for module in (eager, modal):
            module.train()
            module.get_submodule("bn").eval()
        for step in range(3):
            for module, optimizer in zip((eager, modal), optimizers, strict=True):
                torch.manual_seed(10 * epoch + step)
                module(X).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
        for module in (eager, modal):
            module.eval()
        same(eager, modal)
    torch.testing.assert_close(modal.state_dict(), eager.state_dict(), atol=1e-6, rtol=1e-5)
    assert int(modal.bn.num_batches_tracked) == 0  # frozen throughout, as eager's
    assert int(modal.get_submodule("head.1").num_batches_tracked) == 6


@pytest.mark.parametrize("how", MAKERS)
def test_a_module_without_state_is_a_placeholder_with_a_flag(how: str) -> None:
    eager = net()
    modal = make(eager, how)
    assert type(modal.get_submodule("drop")) is nn.Module
    assert list(modal.state_dict()) == list(eager.state_dict())
    modal.eval()
    modal.get_submodule("drop").train()  # Monte Carlo dropout
    eager.eval()
    eager.drop.train()
    same(eager, modal)
    assert not modeswap.mode_of(modal).mode
    modal.eval()
    assert modeswap.mode_of(modal).mode is Mode.EVAL


@pytest.mark.parametrize("how", MAKERS)
def test_switching_back_to_a_combination_met_before_generates_no_code(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    eager = net()
    modal = make(eager, how)
    modal.get_submodule("bn").eval()
    modal(X)
    generated: list[str] = []
    python_code = torch.fx.Graph.python_code
    monkeypatch.setattr(
        torch.fx.Graph, "python_code", lambda self, *a, **k: generated.append("") or python_code(self, *a, **k)
    )
    for i in range(20):
        modal.train()
        if i % 2:
            modal.get_submodule("bn").eval()
        modal(X)
    assert generated == []


def test_capture_starts_in_the_eager_models_exact_state() -> None:
    eager = net()
    eager.bn.eval()
    eager.head[2].eval()
    modal = modeswap.capture(copy.deepcopy(eager), (X,))
    assert flags(eager) == {p: f for p, f in flags(modal).items() if p in flags(eager)}
    assert modal.training is True
    assert modeswap.mode_of(modal).mixed
    same(eager, modal)
    modal.train()
    eager.train()
    same(eager, modal)


def test_a_train_override_of_the_eager_model_is_reproduced_by_train() -> None:
    torch.manual_seed(0)
    eager = NormEval().train()
    modal = modeswap.capture(copy.deepcopy(eager), (X,))
    assert modal.bn.training is False
    for call in (
        lambda m: m.train(),
        lambda m: m.eval(),
        lambda m: m.train(),
        lambda m: m.bn.train(),
        lambda m: m.eval(),
    ):
        call(eager)
        call(modal)
        assert flags(eager) == {p: f for p, f in flags(modal).items() if p in flags(eager)}
        same(eager, modal)
    assert int(modal.bn.num_batches_tracked) == 1  # the one pass with bn.train() called on it


class Pinned(nn.Module):
    """A dropout that stays on whatever the mode, as ``F.dropout(x, training=True)`` writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.fc(x), 0.3, training=True)


def test_a_site_the_model_pins_stays_as_it_is_in_any_combination() -> None:
    torch.manual_seed(0)
    eager = nn.Sequential(Pinned(), nn.BatchNorm1d(5), nn.Dropout(0.2)).train()
    rows = (torch.randn(4, 5),)
    modal = modeswap.capture(copy.deepcopy(eager), rows)
    for modes in itertools.product((True, False), repeat=3):
        for module in (eager, modal):
            module.train(modes[0])
            module.get_submodule("0").train(modes[1])
            module.get_submodule("2").train(modes[2])
        same(eager, modal, rows)


class Gated(nn.Module):
    """Attention with its dropout gated on the mode, as transformers writes it, beside a batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(3)
        self.attention = Attention(0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.norm(x))  # type: ignore[no-any-return]


def test_attention_in_train_mode_inside_an_eval_model_gets_its_training_p() -> None:
    torch.manual_seed(0)
    eager = Gated().eval()
    rows = (torch.randn(2, 3, 6),)
    modal = modeswap.capture(copy.deepcopy(eager), rows)  # starts from the eval export: dropout_p=0.0 there
    eager.attention.train()
    modal.get_submodule("attention").train()
    same(eager, modal, rows)
    assert "0.4" in modal.code
    # From one graph the value is stated, as for a swap; unstated, it is said.
    gm = torch.export.export(copy.deepcopy(eager).eval(), rows).module()
    stated = modeswap.allow_train_eval(gm, attention_dropout=0.4)
    stated.get_submodule("attention").train()
    same(eager, stated, rows)
    with pytest.warns(modeswap.UnknownTrainingValueWarning):
        blind = modeswap.allow_train_eval(gm)
    blind.get_submodule("attention").train()
    with pytest.warns(modeswap.UnknownTrainingValueWarning, match="attention"):
        blind(*rows)


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.noise = Noise(0.5)
        self.norm = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.noise(self.fc(x)))  # type: ignore[no-any-return]


@pytest.mark.parametrize("root", [True, False], ids=["train", "eval"])
def test_a_module_whose_own_branch_no_export_holds_is_named(root: bool) -> None:
    torch.manual_seed(0)
    eager = Noisy().train(root)
    rows = (torch.randn(4, 5),)
    modal = modeswap.capture(copy.deepcopy(eager), rows)
    for module in (eager, modal):
        module.get_submodule("noise").train(not root)
    with pytest.warns(modeswap.TrainingBranchWarning, match=r"'noise' \(the exports differ in randn_like"):
        got = run_forward_backward(modal, rows, seed=1)
    want = run_forward_backward(eager, rows, seed=1)
    assert not torch.allclose(got["outputs"][0], want["outputs"][0])  # what the warning is for
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modal(*rows)  # said once, for that combination


def test_a_drop_path_an_eval_export_never_ran_is_named_when_trained() -> None:
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(5, 5), DropPath(0.5, "timm"), nn.BatchNorm1d(5)).eval()
    rows = (torch.randn(4, 5),)
    modal = modeswap.capture(copy.deepcopy(eager), rows)
    modal.get_submodule("1").train()
    with pytest.warns(modeswap.TrainingBranchWarning, match=r"'1' \(the exports differ in"):
        modal(*rows)
    modal.eval().train()
    modal.get_submodule("1").eval()  # from the train export: the swap removes the drop path
    eager.train()
    eager[1].eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same(eager, modal, rows)


def test_a_branch_of_the_model_around_a_module_is_not_the_modules() -> None:
    # GoogLeNet's auxiliary head: the root decides whether it runs, so its own mode changes nothing.
    torch.manual_seed(0)
    eager = AuxiliaryHeads().train()
    images = (torch.randn(2, 3, 6, 6),)
    modal = modeswap.capture(copy.deepcopy(eager), images)
    for module in (eager, modal):
        module.get_submodule("aux").eval()
        module.get_submodule("bn").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same(eager, modal, images)


@pytest.mark.parametrize("how", MAKERS)
def test_a_module_under_two_names_is_one_module(how: str) -> None:
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(5, 5), SharedBatchNorm(nn.BatchNorm1d, 5, 0.2, same_module=True)).train()
    rows = (torch.randn(4, 5),)
    modal = make(eager, how, rows)
    assert modal.get_submodule("1.first") is modal.get_submodule("1.second")
    assert list(modal.state_dict()) == list(eager.state_dict())
    for module in (eager, modal):
        module.get_submodule("1.second").eval()
    same(eager, modal, rows)


def test_allow_train_eval_warns_about_a_branch_module_its_graph_shows_in_another_mode() -> None:
    torch.manual_seed(0)

    class Attending(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(4, 2, dropout=0.3, batch_first=True)
            self.norm = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.attention(x, x, x, need_weights=True)[0])

    eager = Attending().eval()
    rows = (torch.randn(2, 3, 4),)
    gm = torch.export.export(copy.deepcopy(eager), rows).module()
    with pytest.warns(modeswap.TrainingBranchWarning, match="'attention'"):
        modal = modeswap.allow_train_eval(gm)  # its train graph, as a swap to train says
    modal.get_submodule("attention").train()
    with pytest.warns(modeswap.TrainingBranchWarning, match="'attention'"):
        modal(*rows)


@pytest.mark.parametrize("how", MAKERS)
def test_deepcopy_and_to_keep_each_modules_mode(how: str) -> None:
    eager = net()
    modal = make(eager, how)
    modal.get_submodule("bn").eval()
    eager.bn.eval()
    same(eager, modal)
    copied = copy.deepcopy(modal).to(torch.float64)
    assert copied.get_submodule("bn").training is False
    copied.get_submodule("bn").train()
    assert modal.get_submodule("bn").training is False
    same(eager.to(torch.float64), copy.deepcopy(modal).to(torch.float64), (X.double(),))


@pytest.mark.parametrize("how", MAKERS)
def test_torch_compile_follows_submodule_modes(how: str) -> None:
    torch._dynamo.reset()
    eager = net()
    modal = make(eager, how)
    compiled = torch.compile(modal, backend="aot_eager")
    for frozen in (True, False, True):
        for module in (eager, modal):
            module.train()
            if frozen:
                module.get_submodule("bn").eval()
        torch.manual_seed(5)
        got = compiled(X)
        torch.manual_seed(5)
        torch.testing.assert_close(got, eager(X))
    torch.testing.assert_close(modal.state_dict(), eager.state_dict())


@pytest.mark.parametrize("how", MAKERS)
def test_a_saved_module_loads_with_every_modules_mode_and_follows_eager(how: str, tmp_path: Any) -> None:
    eager = net()
    if how == "capture":
        modal = make(eager, how)
    else:
        modal = modeswap.allow_train_eval(torch.export.export(copy.deepcopy(eager), (X,)))
    for module in (eager, modal):
        module.train()
        module.get_submodule("bn").eval()
        module.get_submodule("head.2").eval()
    modeswap.save(modal, tmp_path / "mixed.pt2")
    loaded = modeswap.load(tmp_path / "mixed.pt2")
    assert {p: f for p, f in flags(loaded).items() if p in flags(eager)} == flags(eager)
    same(eager, loaded)
    for module in (eager, loaded):
        module.eval()
        module.get_submodule("drop").train()  # Monte Carlo dropout after the load
    same(eager, loaded)


def test_a_loaded_capture_still_names_a_branch_no_graph_holds(tmp_path: Any) -> None:
    torch.manual_seed(0)
    eager = Noisy().train()
    rows = (torch.randn(4, 5),)
    modeswap.save(modeswap.capture(copy.deepcopy(eager), rows), tmp_path / "noisy.pt2")
    loaded = modeswap.load(tmp_path / "noisy.pt2")
    loaded.get_submodule("noise").eval()
    with pytest.warns(modeswap.TrainingBranchWarning, match=r"'noise' \(the exports differ in randn_like"):
        loaded(*rows)


def test_a_module_keeps_no_attribute_of_its_own_but_its_bookkeeping() -> None:
    # _editable hands every other attribute to the graph modules it derives variants from.
    modal = make(net(), "capture")
    state = torch.export.export(net().train(), (X,)).module()
    own = set(vars(modal)) - set(vars(state)) - set(vars(torch.nn.Module()))
    assert own - {"_guards_fn_train", "_guards_fn_eval"} == set(modeswap.ModalModule._BOOKKEEPING)


def test_the_first_forwards_of_a_loaded_module_may_come_from_several_threads(tmp_path: Any) -> None:
    import threading

    eager = net()
    modeswap.save(make(eager, "capture"), tmp_path / "served.pt2")  # saved in train: eval is built on first use
    loaded = modeswap.load(tmp_path / "served.pt2").eval()
    errors: list[BaseException] = []
    outputs: list[torch.Tensor] = []

    def serve() -> None:
        try:
            with torch.no_grad():
                outputs.append(loaded(X))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=serve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    want = copy.deepcopy(eager).eval()(X)
    assert all(torch.allclose(out, want, atol=1e-6) for out in outputs)


class Detector(nn.Module):
    """A detector whose backbone keeps its batch norm frozen whenever the backbone is put in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = NormEval()
        self.head = nn.Sequential(nn.Dropout(0.2), nn.BatchNorm1d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # type: ignore[no-any-return]


@pytest.mark.parametrize("saved", [False, True], ids=["captured", "loaded"])
def test_a_train_override_of_a_submodule_is_reproduced_by_its_own_train(saved: bool, tmp_path: Any) -> None:
    torch.manual_seed(0)
    eager = Detector().train()
    modal: nn.Module = modeswap.capture(copy.deepcopy(eager), (X,))
    if saved:
        modeswap.save(modal, tmp_path / "detector.pt2")
        modal = modeswap.load(tmp_path / "detector.pt2")
    calls = (
        lambda m: (m.eval(), m.backbone.train()),  # the backbone's own train() keeps its batch norm frozen
        lambda m: m.train(),
        lambda m: m.get_submodule("backbone").eval(),
        lambda m: copy.deepcopy(m).backbone.train() and m.backbone.train(),
    )
    for call in calls:
        call(eager)
        call(modal)
        assert {p: f for p, f in flags(modal).items() if p in flags(eager)} == flags(eager)
        same(eager, modal)
