"""check and capture: what a swap cannot bring back, named by check and exact with capture, against eager."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeswap
import modeswap.eager.check
import modeswap.eager.running
from modeswap import Cause, Mode
from modeswap.testing import assert_mode_equivalent, assert_trains_like, other
from modeswap.testing.models import (
    Attending,
    Attention,
    AuxiliaryHeads,
    BatchVariance,
    DropPath,
    Noise,
    PinnedMode,
)

# spectral_norm's hook assigns module.weight in every forward, and torch.export says so.
pytestmark = pytest.mark.filterwarnings("ignore:The tensor attribute .* assigned during export:UserWarning")


class GatedDropout(nn.Module):
    """``F.dropout(x, p if self.training else 0.0)``: an eval export writes p=0.0."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p if self.training else 0.0, self.training)


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout2d(0.2), nn.Flatten(), nn.Linear(64, 3)
    )


IMAGE, ROWS, SEQUENCE = (torch.randn(4, 3, 4, 4),), (torch.randn(5, 4),), (torch.randn(2, 3, 8),)

#: name -> (model, inputs, what check must find: per target mode, the (module path, cause) pairs).
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[torch.Tensor, ...], dict[Mode, set[tuple[str, Cause]]]]] = {
    "exact": (conv_net, IMAGE, {Mode.EVAL: set(), Mode.TRAIN: set()}),
    "auxiliary heads": (
        AuxiliaryHeads,
        IMAGE,
        {mode: {("", Cause.TRAINING_BRANCH), ("aux", Cause.TRAINING_BRANCH)} for mode in Mode},
    ),
    "noise": (
        lambda: nn.Sequential(nn.Linear(4, 4), Noise()),
        ROWS,
        {mode: {("1", Cause.TRAINING_BRANCH)} for mode in Mode},
    ),
    "buffer updated in training": (
        lambda: nn.Sequential(nn.Linear(4, 4), BatchVariance(4)),
        ROWS,
        {mode: {("1", Cause.TRAINING_BRANCH)} for mode in Mode},
    ),
    "spectral_norm hook": (
        lambda: nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 4))),
        ROWS,
        {mode: {("0", Cause.TRAINING_BRANCH)} for mode in Mode},
    ),
    "spectral_norm parametrization": (
        lambda: nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4))),
        ROWS,
        {mode: {("0.parametrizations.weight.0", Cause.TRAINING_BRANCH)} for mode in Mode},
    ),
    "drop path": (
        lambda: nn.Sequential(nn.Linear(4, 4), DropPath(0.3, "timm")),
        ROWS,
        {Mode.EVAL: set(), Mode.TRAIN: {("1", Cause.DROP_PATH)}},
    ),
    "multihead attention with weights": (
        Attending,
        SEQUENCE,
        {Mode.EVAL: set(), Mode.TRAIN: {("attention", Cause.TRAINING_BRANCH)}},
    ),
    "batch norm pinned by train()": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), PinnedMode(nn.BatchNorm2d(4), training=False)),
        IMAGE,
        {Mode.EVAL: set(), Mode.TRAIN: {("1.child", Cause.PINNED)}},
    ),
    "attention dropout": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 1), Attention(0.25)),
        IMAGE,
        {Mode.EVAL: set(), Mode.TRAIN: {("1", Cause.ATTENTION_DROPOUT_UNKNOWN)}},
    ),
    "gated dropout": (
        lambda: nn.Sequential(nn.Linear(4, 4), GatedDropout(0.3)),
        ROWS,
        {Mode.EVAL: set(), Mode.TRAIN: {("1", Cause.DROPOUT_UNKNOWN)}},
    ),
}


def model_of(name: str, training: bool = True) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    make, args, _ = CASES[name]
    return make().train(training), args


def found(direction: modeswap.Direction) -> set[tuple[str, Cause]]:
    return {(d.module_path, d.cause) for d in direction.differences}


@pytest.mark.parametrize("name", CASES)
def test_check_names_each_module_a_swap_cannot_reproduce_and_why(name: str) -> None:
    model, args = model_of(name)
    fidelity = modeswap.check(model, args)
    expected = CASES[name][2]
    assert found(fidelity.to_eval) == expected[Mode.EVAL]
    assert found(fidelity.to_train) == expected[Mode.TRAIN]
    assert fidelity.to_eval.exact is not expected[Mode.EVAL]
    assert fidelity.exact is (not expected[Mode.EVAL] and not expected[Mode.TRAIN])
    for difference in (*fidelity.to_eval.differences, *fidelity.to_train.differences):
        assert difference.what
        assert difference.fix


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["from-train", "from-eval"])
def test_capture_trains_and_evaluates_as_eager_at_every_step(name: str, training: bool) -> None:
    model, args = model_of(name, training)
    modal = modeswap.capture(model, args)
    assert modal.training is training
    checked = assert_trains_like(copy.deepcopy(model), modal, args)
    assert checked > 3 * 4 * len(model.state_dict())


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("source", list(Mode))
def test_check_is_right_about_eager(name: str, source: Mode) -> None:
    # A verdict about eager behaviour, not only about graphs: where check calls the swap of the
    # source mode's export exact, it computes what eager does (outputs, buffers, gradients); where not, it does not.
    model, args = model_of(name)
    target = other(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", modeswap.ModeswapWarning)
        if CASES[name][2][target]:
            with pytest.raises(AssertionError):
                assert_mode_equivalent(model, args, target, exported_in=source)
        else:
            assert_mode_equivalent(model, args, target, exported_in=source)


def test_following_the_advice_makes_the_swap_exact() -> None:
    cases = [
        ("batch norm pinned by train()", {"keep": ("1.child",)}),
        ("attention dropout", {"attention_dropout": 0.25}),  # every attention of unknown p has one value
        ("gated dropout", {"dropout": {"1": 0.3}}),
    ]
    for name, suggested in cases:
        model, args = model_of(name)
        fidelity = modeswap.check(model, args)
        (difference,) = fidelity.to_train.differences
        assert difference.options.kwargs() == suggested, name
        assert f"`{difference.options}`" in difference.fix, name
        assert fidelity.suggested == suggested, name
        assert modeswap.check(model, args, **fidelity.suggested).exact, name


def test_the_advice_names_the_exact_direction_when_there_is_one() -> None:
    model, args = model_of("multihead attention with weights")
    (difference,) = modeswap.check(model, args).to_train.differences
    assert "export in train mode" in difference.fix
    assert "runs dropout" in difference.what
    model, args = model_of("noise")
    (difference,) = modeswap.check(model, args).to_train.differences
    assert "export in" not in difference.fix  # neither direction is exact
    assert "randn_like" in difference.what


def test_a_buffer_updated_in_one_mode_is_named() -> None:
    model, args = model_of("buffer updated in training")
    (difference,) = modeswap.check(model, args).to_eval.differences
    assert "updating 1.running_var" in difference.what


@pytest.mark.parametrize("name", ["auxiliary heads", "spectral_norm hook", "batch norm pinned by train()"])
@pytest.mark.parametrize("run", ["check", "capture"])
def test_the_model_is_left_as_it_was(name: str, run: str) -> None:
    model, args = model_of(name, training=False)
    model.get_submodule("0" if name != "auxiliary heads" else "bn").train()  # a mixed model: flags must come back
    flags = [m.training for m in model.modules()]
    state = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    for param in model.parameters():
        param.grad = torch.full_like(param, 7.0)  # check runs backward passes: not on these
    getattr(modeswap, run)(model, args)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters() if p.grad is not None)
    assert all(p.grad is not None for p in model.parameters())
    after = model.state_dict(keep_vars=True)
    assert after.keys() == state.keys()
    for key, (pointer, value) in state.items():
        assert after[key].data_ptr() == pointer, key
        assert torch.equal(after[key], value), key
    copy.deepcopy(model)(*args)  # still an ordinary eager model


def test_capture_holds_one_copy_of_the_state_that_the_model_does_not_share() -> None:
    model, args = model_of("auxiliary heads")
    modal = modeswap.capture(model, args)
    assert list(modal.state_dict()) == list(model.state_dict())
    ours = {t.untyped_storage().data_ptr() for t in modal.state_dict().values()}
    theirs = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert len(ours) == len(theirs)
    assert not ours & theirs
    held = {t.untyped_storage().data_ptr() for t in [*modal.parameters(), *modal.buffers()]}
    assert held == ours  # both modes read these tensors: no second set
    sum(out.sum() for out in modal.train()(*args)).backward()
    assert all(p.grad is not None for p in modal.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_capture_returns_what_each_mode_returns() -> None:
    model, args = model_of("auxiliary heads")
    modal = modeswap.capture(model, args)
    assert isinstance(modal.train()(*args), tuple)
    assert isinstance(model.train()(*args), tuple)
    assert isinstance(modal.eval()(*args), torch.Tensor)
    assert modeswap.mode_of(modal).mode is Mode.EVAL
    assert modeswap.mode_of(modal.train()).mode is Mode.TRAIN


def test_capture_takes_kwargs_and_dynamic_shapes() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.bn(self.fc(x)) * scale
            return out + torch.randn_like(out) if self.training else out

    torch.manual_seed(0)
    model, kwargs = Scaled(), {"scale": torch.tensor(2.0)}
    batch = torch.export.Dim("batch", min=2)
    shapes = {"x": {0: batch}, "scale": None}
    modal = modeswap.capture(model, (torch.randn(3, 4),), kwargs, dynamic_shapes=shapes)
    eager = copy.deepcopy(model)
    x = torch.randn(7, 4)
    for training in (True, False, True):
        eager.train(training), modal.train(training)
        torch.manual_seed(1)
        want = eager(x, **kwargs)
        torch.manual_seed(1)
        torch.testing.assert_close(modal(x, **kwargs), want)
    fidelity = modeswap.check(model, (torch.randn(3, 4),), kwargs, dynamic_shapes=shapes)
    assert found(fidelity.to_train) == {("", Cause.TRAINING_BRANCH)}


def test_a_contiguous_that_only_one_mode_keeps_is_no_difference() -> None:
    # BERT's attention: its train kernel returns other strides, so only the train export keeps a .contiguous().
    class Transposed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.transpose(0, 1)
            return y.contiguous() * 2 if self.training else y * 2

    assert modeswap.check(Transposed(), ROWS).exact
    assert "contiguous" in torch.export.export(Transposed().train(), ROWS).graph_module.code


def test_a_strict_export_is_compared_on_what_both_graphs_hold() -> None:
    # strict=True drops the buffers an eval graph does not read (num_batches_tracked): not a difference
    # in behaviour, but the swap to train has nothing to count batches in, and refuses.
    model, args = model_of("exact")
    fidelity = modeswap.check(model, args, strict=True)
    assert fidelity.to_eval.exact
    (refused,) = fidelity.to_train.differences
    assert refused.cause is Cause.REFUSED
    assert "strict=False" in refused.what
    assert "export in train mode" in refused.fix
    modal = modeswap.capture(model, args, strict=True)
    assert sorted(modal.state_dict()) == sorted(model.state_dict())  # a strict export orders them its own way
    assert_trains_like(copy.deepcopy(model), modal, args)


def test_the_report_reads_as_a_table_and_as_json() -> None:
    model, args = model_of("batch norm pinned by train()")
    fidelity = modeswap.check(model, args)
    assert fidelity.format(width=100).splitlines() == [
        "train -> eval: exact",
        "eval -> train: 1 difference",
        "  1.child: site does not follow the mode",
        "    batch_norm training=True in the swap, False in the train export; the swap runs add_.Tensor,",
        "    updating 1.child.num_batches_tracked; the train export does not",
        "    fix: `keep=('1.child',)` leaves it as the model holds it",
        "suggested: `keep=('1.child',)`",
    ]
    report = json.loads(fidelity.to_json())
    assert report["train -> eval"] == {"exact": True, "differences": [], "unrun": ""}
    (difference,) = report["eval -> train"]["differences"]
    assert difference["module_path"] == "1.child"
    assert difference["cause"] == "site does not follow the mode"
    assert difference["options"] == {"keep": ["1.child"]}
    assert report["suggested"] == {"keep": ["1.child"]}


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (torch.export.export(conv_net(), IMAGE), "take the eager model"),
        (torch.export.export(conv_net(), IMAGE).module(), "take the eager model"),
        (lambda x: x, "not function"),
    ],
    ids=["program", "graph", "function"],
)
@pytest.mark.parametrize("run", ["check", "capture"])
def test_anything_but_an_eager_model_is_refused(model: Any, match: str, run: str) -> None:
    with pytest.raises(modeswap.InvalidOptionError, match=match):
        getattr(modeswap, run)(model, IMAGE)


def test_an_export_that_fails_says_in_which_mode() -> None:
    class TrainOnly(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training and x.sum() > 0:  # data-dependent control flow: export fails
                return x
            return x * 2

    model = TrainOnly().train()
    with pytest.raises(Exception) as caught:  # noqa: PT011 - torch's own error, whatever its type
        modeswap.check(model, ROWS)
    assert any("while exporting the model in eval mode" in note for note in caught.value.__notes__)
    assert model.training is True


@pytest.fixture
def blind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the comparison vouch for nothing, so that the second opinion runs wherever the graphs read the same."""
    monkeypatch.setattr(modeswap.eager.check, "blind_spots", lambda gm: ("every op",))


@pytest.mark.parametrize(
    ("name", "seeds", "runs"),
    [
        ("exact", (0, 1), 2 * 2),  # 2 directions x 2 graphs under the first seed: they draw alike
        ("exact", (), 0),
        ("noise", (0, 1), 0),
    ],
    ids=["random-two-seeds", "skipped", "structure-differs"],
)
@pytest.mark.usefixtures("blind")
def test_the_second_opinion_runs_under_each_seed_only_where_it_can_tell(
    name: str, seeds: tuple[int, ...], runs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = modeswap.eager.running.run_forward_backward
    monkeypatch.setattr(
        modeswap.eager.running, "run_forward_backward", lambda *a, **k: calls.append(k["seed"]) or real(*a, **k)
    )
    model, args = model_of(name)
    modeswap.check(model, args, seeds=seeds)
    assert len(calls) == runs  # none where the graphs already differ


@pytest.mark.usefixtures("blind")
def test_a_graph_that_draws_nothing_runs_under_one_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = modeswap.eager.running.run_forward_backward
    monkeypatch.setattr(
        modeswap.eager.running, "run_forward_backward", lambda *a, **k: calls.append(k["seed"]) or real(*a, **k)
    )
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert modeswap.check(model, ROWS, seeds=(3, 4)).exact
    assert calls == [3] * 4


@pytest.mark.usefixtures("blind")
def test_a_value_that_differs_where_the_graphs_agree_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    # The second opinion's own finding: graphs that read the same yet compute another buffer.
    found = ["buffers['1.running_mean']"]
    monkeypatch.setattr(modeswap.eager.running, "run_differences", lambda *a, **k: found)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    (difference,) = modeswap.check(model, ROWS).to_eval.differences
    assert difference.cause is Cause.VALUES
    assert difference.module_path == "1"
    assert difference.what == "buffers['1.running_mean'] differs from the eval export when both run under seed(s) 0"
