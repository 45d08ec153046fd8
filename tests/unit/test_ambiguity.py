"""Where the graph cannot tell what eager does: exact, or an error or warning that names the node and module.

Each case is checked against eager PyTorch in both directions.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeswap
from modeswap import Mode, NondeterministicEvalWarning, TrainingBranchWarning, UnsupportedGraphError
from modeswap.table import aliases
from modeswap.testing import assert_mode_equivalent, assert_same_run, export, models, quiet, run_forward_backward

X = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
IMAGE = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))


# --- eval dropouts that return their input ------------------------------------------------


class Residual(nn.Module):
    """``drop(h) + h``: in eval the dropout returns ``h`` itself, so export routes ``+ h`` through it."""

    def __init__(self, drop: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.selu(self.fc(x))
        return self.drop(h) + h


class Skip(nn.Module):
    """A U-Net style skip beside a ``Dropout2d``: the skip reads the undropped features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout2d(0.3)
        self.up = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.up(torch.cat([self.drop(h), h], dim=1))


class Returned(nn.Module):
    """Returns the dropped tensor and the tensor it dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.FeatureAlphaDropout(0.2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.drop(x), x


ALIASING = [
    pytest.param(Residual(nn.AlphaDropout(0.2)), X, "alpha_dropout", id="alpha-dropout-residual"),
    pytest.param(Residual(nn.FeatureAlphaDropout(0.2)), X, "feature_alpha_dropout", id="feature-alpha-residual"),
    pytest.param(Skip(), IMAGE, "feature_dropout", id="dropout2d-skip"),
    pytest.param(Returned(), X, "feature_alpha_dropout", id="returned-beside"),
]


@pytest.mark.parametrize(("model", "x", "op"), ALIASING)
def test_an_eval_dropout_that_aliases_a_reused_input_is_refused(model: nn.Module, x: torch.Tensor, op: str) -> None:
    gm = export(model, (x,), "eval")
    with pytest.raises(UnsupportedGraphError, match=rf"{op} \(aten\.{op}\.default, in module 'drop'\)") as error:
        modeswap.to_train(gm)
    assert "Export the model in train mode" in str(error.value)
    assert isinstance(error.value, ValueError)
    # Not a false alarm: a swap that went ahead would compute something else than eager.
    forced = modeswap.pipeline()(gm)
    for node in forced.graph.nodes:
        if str(node.target) == f"aten.{op}.default":
            node.args = (*node.args[:2], True)
    forced.recompile()
    expected = run_forward_backward(copy.deepcopy(model).train(), (x,), seed=0)
    with pytest.raises(AssertionError):
        assert_same_run(expected, run_forward_backward(forced, (x,), seed=0), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("model", "x", "op"), ALIASING)
def test_a_train_export_keeps_the_uses_apart_both_ways(model: nn.Module, x: torch.Tensor, op: str) -> None:
    with quiet():
        assert_mode_equivalent(model, (x,), "eval")
        gm = export(model, (x,), "train")
        back = modeswap.to_train(modeswap.to_eval(gm))  # the eval swap's memo settles which use is which
    expected = run_forward_backward(copy.deepcopy(model).train(), (x,), seed=3)
    assert_same_run(expected, run_forward_backward(back, (x,), seed=3), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("first", "node"),
    [
        # Shrunk by the hypothesis suite: the skip reads the dropout's output twice, and in an eval
        # export that output is the dropout's input, so the two reads look like a residual around it.
        (lambda: nn.Dropout1d(0.5), r"feature_dropout \(aten\.feature_dropout\.default, in module '0'\)"),
        # Shrunk by the CI profile: nn.FeatureAlphaDropout ignores inplace=True, as nn.AlphaDropout does.
        (
            lambda: nn.Sequential(models.Fresh(), nn.FeatureAlphaDropout(0.5, inplace=True)),
            r"feature_alpha_dropout \(.*in module '0\.1'\)",
        ),
    ],
    ids=["dropout1d", "inplace-feature-alpha"],
)
def test_a_dropout_before_a_skip_is_ambiguous_too(first: Callable[[], nn.Module], node: str) -> None:
    model = nn.Sequential(first(), models.Skip(nn.Dropout(0.5)))
    signal = torch.randn(2, 1, 2, generator=torch.Generator().manual_seed(0))
    # Where torch exports aten.dropout as an alias (2.15), the skip's own dropout is ambiguous too.
    with pytest.raises(UnsupportedGraphError, match=rf"{node}|in module '1\.drop'"):
        modeswap.to_train(export(model, (signal,), "eval"))
    with quiet():
        trained = modeswap.to_train(modeswap.to_eval(export(model, (signal,), "train")))
    expected = run_forward_backward(copy.deepcopy(model).train(), (signal,), seed=0)
    assert_same_run(expected, run_forward_backward(trained, (signal,), seed=0), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "drop",
    [nn.Dropout(0.3, inplace=True), nn.AlphaDropout(0.2)],
    ids=["inplace-dropout-residual", "alpha-dropout-alone"],
)
def test_dropouts_the_graph_is_clear_about_swap_to_train_exactly(drop: nn.Module) -> None:
    # An in-place dropout drops its input for every later use in train mode too: no ambiguity.
    # A lone aliasing dropout has only its own use.
    model = Residual(drop) if not isinstance(drop, nn.AlphaDropout) else nn.Sequential(nn.Linear(4, 4), drop)
    with quiet():
        assert_mode_equivalent(model, (X,), "train")


class Viewed(nn.Module):
    """``drop(h) + h`` beside a view, whose fake value shows that the graph records aliasing."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.selu(self.fc(x)).unsqueeze(0)
        return self.drop(h) + h


@pytest.mark.parametrize("model", [Residual(nn.Dropout(0.3)), Viewed()], ids=["no-view", "view"])
def test_an_eval_dropout_is_refused_exactly_when_this_torch_exports_it_as_an_alias(model: nn.Module) -> None:
    # torch 2.13's export copies in an eval aten.dropout, torch 2.15's returns the input itself.
    aliased = aliases.exported_as_alias(torch.ops.aten.dropout.default)
    gm = export(model, (X,), "eval")
    (node,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.dropout.default]
    assert aliases.returns_input(node) is aliased
    if aliased:
        with pytest.raises(UnsupportedGraphError, match=r"dropout \(aten\.dropout\.default, in module 'drop'\)"):
            modeswap.to_train(gm)
    else:
        with quiet():
            assert_mode_equivalent(model, (X,), "train")


def test_a_loaded_program_whose_values_record_no_aliasing_is_refused_all_the_same() -> None:
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(Residual(nn.AlphaDropout(0.2)).eval(), (X,)), buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    (node,) = [n for n in loaded.graph.nodes if n.target is torch.ops.aten.alpha_dropout.default]
    assert node.meta["val"].untyped_storage()._cdata != node.args[0].meta["val"].untyped_storage()._cdata
    with pytest.raises(UnsupportedGraphError, match="alpha_dropout"):
        modeswap.to_train(loaded)


# --- random ops left in an eval graph ------------------------------------------------------


class Noise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y + 0.1 * torch.randn_like(y) if self.training else y


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.noise = Noise()
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.noise(x))


def test_allow_train_eval_warns_once_for_randomness_its_eval_variant_keeps() -> None:
    gm = export(Noisy(), (X,), "train")
    with pytest.warns(
        NondeterministicEvalWarning, match=r"randn_like \(aten\.randn_like\.default, in module 'noise'\)"
    ):
        modal = modeswap.allow_train_eval(gm)
    modal.eval()
    assert not torch.equal(modal(X), modal(X))  # what the warning is about
    with quiet():
        modeswap.allow_train_eval(export(Noisy(), (X,), "eval"))  # an eval export has no noise to keep


# --- modules an eval export erased -----------------------------------------------------------


class DropPath(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0], 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop_path = DropPath(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fc(x))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def test_to_train_of_a_program_names_drop_paths_its_eval_export_erased() -> None:
    program = torch.export.export(Stack().eval(), (X,))
    with pytest.warns(TrainingBranchWarning, match=r"2 module\(s\).*'blocks\.0\.drop_path'.*'blocks\.1\.drop_path'"):
        trained = modeswap.to_train(program)
    # The warning is right: eager train drops paths, the swapped program does not.
    expected = run_forward_backward(Stack().train(), (X,), seed=0)
    torch.manual_seed(0)
    model = Stack().train()
    expected = run_forward_backward(model, (X,), seed=0)
    program = torch.export.export(copy.deepcopy(model).eval(), (X,))
    with pytest.warns(TrainingBranchWarning):
        trained = modeswap.to_train(program)
    with pytest.raises(AssertionError, match="outputs"):
        assert_same_run(expected, run_forward_backward(trained.module(), (X,), seed=0), atol=1e-6, rtol=1e-5)
    with pytest.warns(TrainingBranchWarning, match="blocks.0.drop_path"):
        modeswap.allow_train_eval(program)


def test_a_program_exported_in_train_keeps_its_drop_paths_and_says_nothing() -> None:
    torch.manual_seed(0)
    model = Stack().train()
    program = torch.export.export(copy.deepcopy(model), (X,))
    with quiet():
        back = modeswap.to_train(modeswap.to_eval(program))
    expected = run_forward_backward(model, (X,), seed=0)
    assert_same_run(expected, run_forward_backward(back.module(), (X,), seed=0), atol=1e-6, rtol=1e-5)


def test_a_graph_module_keeps_no_list_of_modules_so_only_a_program_warns() -> None:
    # ExportedProgram.module() keeps neither module_call_graph nor any other list of the modules
    # export saw: the documented reason the warning needs the program.
    gm = torch.export.export(Stack().eval(), (X,)).module()
    assert not hasattr(gm, "module_call_graph")
    with quiet():
        modeswap.to_train(gm)


# --- functional calls ----------------------------------------------------------------------


class Functional(nn.Module):
    """Calls that hard-code a mode, beside modules that follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.2)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.mean, self.var, training=True)  # always batch statistics
        x = F.dropout(x, 0.1, training=True)  # Monte Carlo dropout
        return self.drop(self.bn(x))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sites_say_which_modes_are_guessed_from_a_functional_call(mode: str) -> None:
    sites = modeswap.mode_of(export(Functional(), (X,), mode)).sites
    assert {(site.kind, site.module_path, site.functional) for site in sites} == {
        ("batch_norm", "", True),
        ("dropout", "", True),
        ("batch_norm", "bn", False),
        ("dropout", "drop", False),
    }


def test_functional_sites_survive_a_swap_in_the_report() -> None:
    evaluated = modeswap.to_eval(export(Functional(), (X,), "train"))
    report = modeswap.mode_of(evaluated)
    assert report.mode is Mode.EVAL
    assert sorted(site.functional for site in report.sites) == [False, False, True, True]


# --- fused eval-only kernels -----------------------------------------------------------------


def test_the_fused_eval_fast_path_is_refused_on_the_way_to_train() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1, batch_first=True).eval()
    layer.requires_grad_(False)
    tokens = torch.randn(2, 3, 8)
    gm = torch.export.export(layer, (tokens,), strict=True).module()
    assert any("_transformer_encoder_layer_fwd" in str(node.target) for node in gm.graph.nodes)
    with pytest.raises(UnsupportedGraphError, match=r"_transformer_encoder_layer_fwd.*strict=False"):
        modeswap.to_train(gm)
    torch.testing.assert_close(modeswap.to_eval(gm)(tokens), layer(tokens))  # eval is what it computes


# --- modules that branch on self.training where no rule reaches -------------------------------


class WeightedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, dropout=0.3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, weights = self.mha(x, x, x, need_weights=True)
        return out, weights


def test_a_drop_path_an_eval_export_left_no_node_of_is_named_as_one() -> None:

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.drop_path = nn.Linear(4, 4), models.DropPath(0.3, "timm")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.drop_path(self.fc(x))

    program = torch.export.export(Block().eval(), (torch.randn(2, 4),))
    with pytest.warns(TrainingBranchWarning, match="'drop_path' \\(named like a drop path") as w:
        modeswap.to_train(program)
    assert "A drop path exported in train mode survives to_eval and back" in str(w[0].message)


def test_attention_weights_exported_in_eval_lose_their_dropout_and_say_so() -> None:
    torch.manual_seed(0)
    model, tokens = WeightedAttention(), torch.randn(3, 2, 4)
    with pytest.warns(TrainingBranchWarning, match=r"'mha' \(with need_weights=True, an eval export has no node") as w:
        trained = modeswap.to_train(export(model, (tokens,), "eval"))
    assert "drop path" not in str(w[0].message)  # it speaks of attention, not of a drop path
    expected = run_forward_backward(copy.deepcopy(model).train(), (tokens,), seed=0)
    with pytest.raises(AssertionError):
        assert_same_run(expected, run_forward_backward(trained, (tokens,), seed=0), atol=1e-6, rtol=1e-5)
    with quiet():  # a train export holds the dropout: both ways are exact and quiet
        assert_mode_equivalent(model, (tokens,), "eval")
        back = modeswap.to_train(modeswap.to_eval(export(model, (tokens,), "train")))
    assert_same_run(expected, run_forward_backward(back, (tokens,), seed=0), atol=1e-6, rtol=1e-5)


class SpectralNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4))
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc(x))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_spectral_norm_warns_both_ways_and_differs_from_eager(mode: str) -> None:
    torch.manual_seed(0)
    model = SpectralNormed()
    gm = export(model, (X,), modeswap.testing.other(mode))
    where = r"'fc\.parametrizations\.weight\.0' \(it updates its power-iteration vectors only in train mode\)"
    with pytest.warns(TrainingBranchWarning, match=where):
        swapped = modeswap.swap(gm, mode).module
    expected = run_forward_backward(copy.deepcopy(model).train(mode == "train"), (X,), seed=0)
    with pytest.raises(AssertionError):
        assert_same_run(expected, run_forward_backward(swapped, (X,), seed=0), atol=1e-6, rtol=1e-5)
