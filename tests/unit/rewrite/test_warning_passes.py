"""What no swap can fix, said out loud: the last traces a graph leaves, and lowered graphs; against eager.

The last traces are a mixed graph's minority and state that no node reads.

A train export of a model that keeps a batch norm frozen is mixed: a swap to
train would start updating its running stats, exactly what a pin looks like,
so the swap says so and names the ``keep=`` that leaves it. An eval export of a
model with a head that only training runs (GoogLeNet, Inception-v3) holds the
head's state but no node reads it: a swap to train cannot bring the head back,
and says so, naming the head.

A graph that ``run_decompositions()`` lowered is refused before any swap: its
eval dropouts and batch norms are gone, and no swap can tell what they did.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeswap
from modeswap import Mode, UnsupportedGraphError
from modeswap.table.aliases import exported_as_alias
from modeswap.testing import assert_runs_as, assert_same_run, export, run_forward_backward
from modeswap.testing.models import NormEval

from ..sites import MODES, randn

aten = torch.ops.aten
X = torch.randn(4, 3, 6, 6)


class Functional(nn.Module):
    """``F.batch_norm(training=...)`` written against the mode in one place: a pin that reads like a frozen module."""

    def __init__(self, training: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.norm = nn.BatchNorm1d(5)
        self.drop = nn.Dropout(0.2)
        self.training_stats = training
        self.register_buffer("mean", torch.zeros(5))
        self.register_buffer("var", torch.ones(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(self.fc(x), self.mean, self.var, training=self.training_stats, momentum=0.3)
        return self.drop(self.norm(x))  # type: ignore[no-any-return]


def said(category: type[Warning], call: Any) -> list[Any]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [w.message for w in caught if issubclass(w.category, category)]


def test_a_frozen_batch_norm_in_a_train_export_is_named_by_the_swap_that_would_unfreeze_it() -> None:
    torch.manual_seed(0)
    eager = NormEval().train()
    gm = torch.export.export(copy.deepcopy(eager), (X,)).module()
    assert modeswap.mode_of(gm).mixed
    (warning,) = said(modeswap.MixedModeWarning, lambda: modeswap.to_train(gm))
    assert warning.keep == ("bn",)
    assert "keep=('bn',)" in str(warning)
    # What the warning is for: the swap that follows it trains the batch norm eager keeps frozen.
    with pytest.warns(modeswap.MixedModeWarning):
        swapped = modeswap.to_train(gm)
    want, got = (run_forward_backward(m, (X,), seed=0) for m in (copy.deepcopy(eager), swapped))
    assert not torch.equal(want["buffers"]["bn.running_mean"], got["buffers"]["bn.running_mean"])
    # With the keep= it names, silence, and eager's numbers.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = modeswap.to_train(gm, keep=warning.keep)
    assert_same_run(
        run_forward_backward(copy.deepcopy(eager), (X,), seed=0),
        run_forward_backward(kept, (X,), seed=0),
        atol=1e-6,
        rtol=1e-5,
    )


def test_a_swap_that_leaves_the_minority_as_it_is_says_nothing() -> None:
    torch.manual_seed(0)
    gm = torch.export.export(NormEval().train(), (X,)).module()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modeswap.to_eval(gm)  # the frozen batch norm is in eval already; the rest joins it
        modeswap.to_train(modeswap.to_eval(gm, keep=("bn",)))  # the pin travels with the graph


@pytest.mark.parametrize("exported", list(Mode))
def test_a_functional_batch_norm_against_the_mode_is_the_minority(exported: Mode) -> None:
    # In a train export, F.batch_norm(training=False) is the minority; in an eval export, training=True is.
    torch.manual_seed(0)
    eager = Functional(training=exported is Mode.EVAL).train(exported is Mode.TRAIN)
    program = torch.export.export(copy.deepcopy(eager), (torch.randn(4, 5),))
    (warning,) = said(modeswap.MixedModeWarning, lambda: modeswap.swap(program, exported))
    assert warning.keep == ("",)  # F.batch_norm in the root's forward
    assert "under the root module" in str(warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modeswap.swap(program, exported, keep=("",))


def test_the_command_line_names_the_keep_flag() -> None:
    from modeswap.cli.main import warning_line

    warning = modeswap.MixedModeWarning("the graph mixes modes ... keep=('bn', 'head.1')", keep=("bn", "head.1"))
    line = warning_line(warning)
    assert "--keep bn --keep head.1" in line


class InceptionAux(nn.Module):
    """torchvision's InceptionAux, made small."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1)
        return self.fc(torch.flatten(x, 1))  # type: ignore[no-any-return]


class GoogLeNetLike(nn.Module):
    """Two auxiliary heads that only training runs, and a namedtuple-free return, as GoogLeNet's forward writes it."""

    def __init__(self, aux_logits: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.aux_logits = aux_logits
        self.aux1 = InceptionAux(8, 3) if aux_logits else None
        self.aux2 = InceptionAux(8, 3) if aux_logits else None
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> Any:
        x = self.stem(x)
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        logits = self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))
        if self.training and self.aux_logits:
            return logits, aux2, aux1
        return logits


@pytest.mark.parametrize("form", ["module", "program", "allow_train_eval"])
def test_heads_only_training_runs_are_named_by_subtree_on_the_way_to_train(form: str) -> None:
    torch.manual_seed(0)
    eager = GoogLeNetLike().eval()
    program = torch.export.export(copy.deepcopy(eager), (X,))
    swap: dict[str, Any] = {
        "module": lambda: modeswap.to_train(program.module()),
        "program": lambda: modeswap.to_train(program),
        "allow_train_eval": lambda: modeswap.allow_train_eval(program),
    }
    (warning,) = said(modeswap.TrainingBranchWarning, swap[form])
    assert "2 module(s)" in str(warning)
    assert "'aux1', 'aux2'" in str(warning)  # one entry per head, not one per tensor
    assert "'aux1.conv'" not in str(warning)
    assert "modeswap.capture" in str(warning)
    # What the warning is for: eager train returns the heads' logits, the swap cannot.
    with pytest.warns(modeswap.TrainingBranchWarning):
        trained = modeswap.to_train(program.module())
    assert isinstance(eager.train()(X), tuple)
    assert isinstance(trained(X), torch.Tensor)


def test_state_no_mode_reads_is_the_one_case_where_the_warning_speaks_without_cause() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5))
            self.unused = nn.Linear(5, 5)  # registered, never called

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)  # type: ignore[no-any-return]

    torch.manual_seed(0)
    program = torch.export.export(Unused().eval(), (torch.randn(4, 5),))
    (warning,) = said(modeswap.TrainingBranchWarning, lambda: modeswap.to_train(program))
    assert "'unused'" in str(warning)
    assert "speak without cause" in str(warning)


@pytest.mark.parametrize("mode", list(Mode))
def test_no_warning_where_every_module_that_holds_state_runs(mode: Mode) -> None:
    torch.manual_seed(0)
    eager = GoogLeNetLike(aux_logits=False).train(mode is Mode.TRAIN)
    program = torch.export.export(eager, (X,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modeswap.to_train(program)
        modeswap.to_eval(program)
        modeswap.allow_train_eval(program)


def test_a_train_export_with_heads_has_nothing_unread() -> None:
    torch.manual_seed(0)
    program = torch.export.export(GoogLeNetLike().train(), (X,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modeswap.to_train(program)
        modeswap.to_eval(program)


def test_the_command_line_says_both_traces_in_its_own_words(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from modeswap.cli.main import main

    torch.manual_seed(0)
    torch.export.save(torch.export.export(GoogLeNetLike().eval(), (X,)), tmp_path / "heads.pt2")
    assert main(["inspect", str(tmp_path / "heads.pt2")]) == 0
    said = capsys.readouterr().err
    assert "modeswap inspect: warning:" in said
    assert "'aux1', 'aux2'" in said
    torch.export.save(torch.export.export(NormEval().train(), (X,)), tmp_path / "frozen.pt2")
    assert main(["convert", str(tmp_path / "frozen.pt2"), "--to", "train", "-o", str(tmp_path / "out.pt2")]) == 0
    said = capsys.readouterr().err
    assert "modeswap convert: warning: the graph mixes modes" in said
    assert "--keep bn" in said
    assert (
        main(
            ["convert", str(tmp_path / "frozen.pt2"), "--to", "train", "--keep", "bn", "-o", str(tmp_path / "kept.pt2")]
        )
        == 0
    )
    assert "warning" not in capsys.readouterr().err


# Graphs lowered by run_decompositions(), and what is no sign of lowering.


@pytest.mark.parametrize("exported_in", MODES)
@pytest.mark.parametrize("target", MODES)
def test_decomposed_graphs_are_refused(exported_in: str, target: str) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.2))
    ep = torch.export.export(copy.deepcopy(model).train(exported_in == "train"), (randn(4, 3),))
    with pytest.raises(
        UnsupportedGraphError, match=r"run_decompositions\(\).*Swap the program torch\.export\.export returns"
    ):
        modeswap.swap(ep.run_decompositions().module(), target)


@pytest.mark.parametrize("as_module", [False, True], ids=["program", "module"])
@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_a_lowered_eval_program_is_refused_although_its_dropout_left_no_node(as_module: bool, strict: bool) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).eval()
    lowered = torch.export.export(model, (torch.randn(2, 3),), strict=strict).run_decompositions()
    assert not any("dropout" in str(node.target) for node in lowered.graph.nodes)
    target = lowered.module() if as_module else lowered
    if as_module and exported_as_alias(aten.dropout.default):
        # torch 2.15 exports an eval dropout as its input itself, and lowering leaves no node of it:
        # the module keeps no trace to refuse it by (docs/limitations.md). The program says its dialect.
        assert not any(
            node.meta.get("from_node") and "dropout" in repr(node.meta["from_node"]) for node in target.graph.nodes
        )
        return
    match = r"clone .* comes from aten\.dropout\.default node 'dropout'" if as_module else r"in the ATEN dialect"
    with pytest.raises(modeswap.UnsupportedGraphError, match=match):
        modeswap.to_train(target)


@torch.library.custom_op("modeswap_test::dropout", mutates_args=())
def _custom_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return x * (1.0 - p)


@_custom_dropout.register_fake
def _(x: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty_like(x)


def _custom_dropout_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    return grad * (1.0 - ctx.p), None


def _custom_dropout_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.p = inputs[1]


_custom_dropout.register_autograd(_custom_dropout_backward, setup_context=_custom_dropout_context)


class CustomDropout(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.modeswap_test.dropout(x, 0.5)  # type: ignore[no-any-return]


def test_an_op_named_like_a_site_or_a_node_that_copied_a_sites_meta_is_no_sign_of_lowering() -> None:
    torch.manual_seed(0)
    model, args = (
        nn.Sequential(nn.Linear(3, 3), CustomDropout(), nn.BatchNorm1d(3), nn.Dropout(0.1)),
        (torch.randn(4, 3),),
    )
    gm = export(model, args, "train")
    # A pass inserts an op after the batch norm and gives it the batch norm's meta, provenance included.
    (bn,) = gm.graph.find_nodes(op="call_function", target=aten.batch_norm.default)
    with gm.graph.inserting_after(bn):
        scaled = gm.graph.call_function(aten.mul.Tensor, (bn, 1.0))
    bn.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    scaled.meta = dict(bn.meta)
    gm.recompile()
    assert_runs_as(copy.deepcopy(model).eval(), modeswap.to_eval(gm), args)
