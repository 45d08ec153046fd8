"""What the user states that the graph does not record: ``dropout=`` per module, ``keep=`` pins.

Each behaviour is checked against the eager model the graph was exported from.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeswap
from modeswap import InvalidOptionError, Mode, UnknownTrainingValueWarning
from modeswap.records.options import Options, decide, matches
from modeswap.testing import assert_mode_equivalent, assert_runs_as, call_signature, export
from modeswap.testing.models import Attention, DropPath, PinnedMode

aten = torch.ops.aten


@contextlib.contextmanager
def silent() -> Iterator[None]:
    """A block in which any warning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


class Gated(nn.Module):
    """Two dropouts in one forward, as transformers' layers write them: one gated on training, one not."""

    def __init__(self, gated: float, plain: float) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.gated, self.plain = gated, plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(self.fc(x), p=self.gated if self.training else 0.0, training=self.training)
        return F.dropout(x, p=self.plain, training=self.training)


class Layer(nn.Module):
    def __init__(self, attention: float, activation: float) -> None:
        super().__init__()
        self.attention = Gated(attention, 0.1)
        self.mlp = Gated(activation, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attention(x))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(0.3, 0.0), Layer(0.3, 0.0)])
        self.head = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)  # type: ignore[no-any-return]


STACK_ARGS = (torch.randn(3, 8),)
STACK_TRAINING = {"layers.*.attention": 0.3, "layers.*.mlp": 0.0}


# -- how patterns match -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("encoder", "encoder", True),
        ("encoder", "encoder.layers.0.attention", True),  # an enclosing module's path
        ("encoder", "encoder_norm", False),
        ("encoder.layers.*", "encoder.layers.0", True),
        ("encoder.layers.*", "encoder.layers.0.attention", True),
        ("*.attention", "encoder.layers.0.attention", False),  # * stays within a component
        ("**.attention", "encoder.layers.0.attention", True),
        ("**.attention", "encoder.layers.0.attention.dropout", True),
        ("**.attention", "attention", True),
        ("encoder.**.dropout", "encoder.dropout", True),
        ("", "anything.at.all", True),  # the root encloses everything
        ("**", "", True),
        ("*", "", False),
        ("*", "encoder.layers", True),
        ("layers.?", "layers.3", True),
        ("Layers", "layers", False),  # case matters, as in module paths
    ],
)
def test_a_pattern_matches_a_module_or_one_enclosing_it(pattern: str, path: str, expected: bool) -> None:
    assert matches(pattern, path) is expected


def test_the_pattern_matching_the_innermost_module_wins_then_the_more_literal_one() -> None:
    mapping = (("encoder", 0.1), ("**.attention", 0.2), ("encoder.layers.1.attention", 0.3), ("**", 0.4), ("*", 0.5))
    assert decide(mapping, "encoder.layers.0.attention") == ("**.attention", 0.2)
    assert decide(mapping, "encoder.layers.1.attention") == ("encoder.layers.1.attention", 0.3)
    assert decide(mapping, "encoder.layers.0") == ("encoder", 0.1)  # a trailing ** is the root: it ranks last
    assert decide(mapping[:3], "encoder.layers.0") == ("encoder", 0.1)
    assert decide((*mapping[:3], ("*", 0.5)), "encoder.layers.0") == ("encoder", 0.1)  # more literal, same depth
    assert decide(mapping[:3], "decoder") is None
    assert decide((("encoder", 0.1),), "decoder") is None


def test_a_catch_all_never_outranks_a_specific_pattern() -> None:
    mapping = (("**", 0.0), ("encoder", 0.1), ("encoder.layers.*.attn", 0.3), ("decoder.**", 0.4))
    assert decide(mapping, "encoder.layers.0") == ("encoder", 0.1)
    assert decide(mapping, "encoder.layers.0.attn.drop") == ("encoder.layers.*.attn", 0.3)
    assert decide(mapping, "decoder.layers.0") == ("decoder.**", 0.4)
    assert decide(mapping, "head") == ("**", 0.0)


def test_equally_specific_patterns_with_different_values_are_an_error() -> None:
    with pytest.raises(InvalidOptionError, match=r"'a\.\*' \(p=0\.1\) and '\*\.b' \(p=0\.2\) are equally specific"):
        decide((("a.*", 0.1), ("*.b", 0.2)), "a.b")
    assert decide((("a.*", 0.1), ("*.b", 0.1)), "a.b") == ("a.*", 0.1)  # they agree


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"dropout": {"a": 1.5}}, r"dropout\['a'\] must be a probability in \[0, 1\], got 1\.5"),
        ({"dropout": {"a": True}}, r"got True"),
        ({"dropout": {3: 0.1}}, r"patterns are module paths .* got 3"),
        ({"dropout": [("a", 0.1)]}, r"dropout takes a mapping"),
        ({"keep": "encoder"}, r"keep takes a sequence .* write keep=\('encoder',\)"),
        ({"keep": [None]}, r"keep patterns are module paths"),
        ({"attention_dropout": -0.1}, r"attention_dropout must be a probability"),
    ],
)
def test_bad_options_are_refused_before_the_graph_is_read(options: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        Options.of(Mode.TRAIN, **options)


@pytest.mark.parametrize("option", ["dropout", "attention_dropout"])
def test_training_values_are_refused_for_a_swap_to_eval(option: str) -> None:
    gm = export(Stack(), STACK_ARGS, "train")
    value = {"layers": 0.1} if option == "dropout" else 0.1
    with pytest.raises(InvalidOptionError, match=rf"{option}=.* only applies when swapping to train mode"):
        modeswap.swap(gm, "eval", **{option: value})


# -- dropout= -----------------------------------------------------------------------------------------------


def test_an_eval_export_warns_with_a_mapping_that_states_its_unknown_sites() -> None:
    gm = export(Stack(), STACK_ARGS, "eval")
    with pytest.warns(UnknownTrainingValueWarning) as caught:
        trained = modeswap.to_train(gm)
    (warning,) = [w.message for w in caught]
    assert isinstance(warning, UnknownTrainingValueWarning)
    # The gated dropouts only: the plain ones record their p, the nn.Dropout(0.0) is a module's own p.
    assert warning.groups == {"Gated": ("layers.0.attention", "layers.0.mlp", "layers.1.attention", "layers.1.mlp")}
    assert warning.suggestion == {"layers.*.attention": 0.0, "layers.*.mlp": 0.0}
    text = str(warning)
    assert "Gated: 4 site(s) in 'layers.0.attention', 'layers.0.mlp', 'layers.1.attention', ... (4 modules)" in text
    assert "modeswap.to_train(gm, dropout={\n      'layers.*.attention': 0.0,\n      'layers.*.mlp': 0.0,\n  })" in text
    assert [s.known for s in modeswap.mode_of(gm).sites] == [False, True, False, True] * 2 + [True]
    assert [s.params["p"] for s in modeswap.mode_of(trained).sites] == [0.0, 0.1, 0.0, 0.2] * 2 + [0.0]


def test_the_suggested_mapping_with_its_values_filled_in_matches_eager_train() -> None:
    torch.manual_seed(0)
    model = Stack()
    gm = export(model, STACK_ARGS, "eval")
    with silent():
        swapped = modeswap.swap(gm, "train", dropout=STACK_TRAINING)
    assert sorted({(c.field, c.before, c.after) for c in swapped.changes}) == [
        ("p", 0.0, 0.3),
        ("train", False, True),
    ]
    assert_runs_as(copy.deepcopy(model).train(), swapped.module, STACK_ARGS, seed=3)
    back = modeswap.to_eval(swapped.module)
    assert_runs_as(copy.deepcopy(model).eval(), back, STACK_ARGS)
    with silent():  # the eval swap remembered the stated values
        again = modeswap.to_train(back)
    assert call_signature(again) == call_signature(swapped.module)


def test_a_mapping_never_changes_a_value_the_graph_records() -> None:
    # "layers" matches the plain dropouts (0.1, 0.2) and the nn.Dropout(0.0) too; only unknown sites take 0.3.
    torch.manual_seed(0)
    model = Stack()
    model.layers[0].mlp.gated = model.layers[1].mlp.gated = 0.3
    with silent():
        trained = modeswap.to_train(export(model, STACK_ARGS, "eval"), dropout={"layers": 0.3})
    assert [s.params["p"] for s in modeswap.mode_of(trained).sites] == [0.3, 0.1, 0.3, 0.2] * 2 + [0.0]
    assert_runs_as(copy.deepcopy(model).train(), trained, STACK_ARGS, seed=1)


def test_a_mapping_that_contradicts_a_train_literal_names_both_values() -> None:
    gm = export(Stack(), STACK_ARGS, "train")
    with pytest.raises(
        InvalidOptionError,
        match=r"dropout=\{'layers\.\*\.mlp': 0\.1\} contradicts the graph: .*'layers\.0\.mlp'.* records a "
        r"training p of 0\.0",
    ):
        modeswap.to_train(gm, dropout={"layers.*.mlp": 0.1})
    with silent():  # stating what the graph records is fine
        modeswap.to_train(gm, dropout=STACK_TRAINING)


def test_a_mapping_that_contradicts_a_remembered_attention_value_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), Attention(0.3))
    evaluated = modeswap.to_eval(export(model, (torch.randn(2, 3, 4),), "train"))
    with pytest.raises(InvalidOptionError, match=r"dropout=\{'1': 0\.2\} contradicts .* dropout_p of 0\.3"):
        modeswap.to_train(evaluated, dropout={"1": 0.2})


def test_a_nn_dropout_with_p_zero_records_it() -> None:
    gm = export(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0)), (torch.randn(2, 3),), "eval")
    with pytest.raises(InvalidOptionError, match=r"module '1'.* records a training p of 0\.0"):
        modeswap.to_train(gm, dropout={"1": 0.5})


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"dropout": {"layers.*.atention": 0.3}}, r"dropout pattern 'layers\.\*\.atention' matches no dropout or"),
        ({"dropout": {"layers.0.attention.fc": 0.3}}, r"matches no dropout or attention site"),
        ({"dropout": {"head.0": 0.3}}, r"matches no dropout or attention site"),
        ({"keep": ["head.2"]}, r"keep pattern 'head\.2' matches no site of this graph"),
    ],
)
def test_a_pattern_that_matches_no_site_is_an_error_listing_the_modules_that_have_one(
    options: dict[str, Any], match: str
) -> None:
    gm = export(Stack(), STACK_ARGS, "eval")
    with pytest.raises(InvalidOptionError, match=match) as raised:
        modeswap.to_train(gm, **options)
    assert "'layers.*.attention'" in str(raised.value)


def test_a_batch_norm_without_running_stats_is_no_site_to_keep() -> None:
    # Shrunk by hypothesis: it computes batch statistics in both modes, so no swap touches it.
    model = nn.Sequential(nn.Conv1d(1, 1, 1), nn.BatchNorm1d(1, affine=False, track_running_stats=False))
    gm = export(model, (torch.randn(2, 1, 2),), "train")
    with pytest.raises(InvalidOptionError, match=r"keep pattern '1' matches no site of this graph"):
        modeswap.to_eval(gm, keep=["1"])


class Plain(nn.Module):
    """``F.dropout(x, p, training=self.training)``: its graph holds ``p`` in both modes, so it records it."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, p=self.p, training=self.training)


def test_a_pattern_that_contradicts_a_functional_dropouts_recorded_p_is_an_error() -> None:
    # The graph holds p=0.1 in both modes: it records the training value, and 0.5 contradicts it.
    torch.manual_seed(0)
    model, args = nn.Sequential(nn.Linear(3, 3), Plain(0.1)), (torch.randn(2, 3),)
    gm = export(model, args, "eval")
    with pytest.raises(InvalidOptionError, match=r"'1'\) records a training p of 0\.1\. .*or state 0\.1$"):
        modeswap.to_train(gm, dropout={"1": 0.5})
    with silent():
        trained = modeswap.to_train(gm, dropout={"1": 0.1})
    assert_runs_as(copy.deepcopy(model).train(), trained, args, seed=1)


HEADS = (nn.Linear(8, 8), nn.Dropout(0.0), nn.Dropout(0.2))
HEADS_CONTRADICTION = (
    "dropout={'2': 0.5} contradicts the graph: dropout_1 (aten.dropout.default, in module '2') records a "
    "training p of 0.2. Leave that module out of the pattern (add a more specific pattern for it), or state 0.2"
)


def _to_train_by(way: str, gm: torch.fx.GraphModule, args: tuple[Any, ...], **options: Any) -> nn.Module:
    """``gm`` swapped to train by one of the ways a user has: ``to_train``, a program, ``allow_train_eval``, a pass."""
    if way == "module":
        return modeswap.to_train(gm, **options)
    if way == "program":
        return modeswap.to_train(torch.export.export(gm, args), **options).module()
    if way == "modal":
        return modeswap.allow_train_eval(gm, **options).train()
    return modeswap.passes.swap_dropout("train", **options)(gm)


@pytest.mark.parametrize("way", ["module", "program", "modal", "pass"])
def test_a_pattern_that_contradicts_an_nn_dropouts_p_is_an_error(way: str) -> None:
    # The case: the nn.Dropout(0.2) used to keep 0.2 unremarked; nn.Dropout(0.0) raised already.
    torch.manual_seed(0)
    model, args = nn.Sequential(*copy.deepcopy(HEADS)), (torch.randn(2, 8),)
    gm = export(model, args, "eval")
    with pytest.raises(InvalidOptionError) as raised:
        _to_train_by(way, gm, args, dropout={"2": 0.5})
    assert str(raised.value) == HEADS_CONTRADICTION
    with pytest.raises(InvalidOptionError, match=r"dropout=\{'': 0\.2\} contradicts .*'1'.* p of 0\.0"):
        _to_train_by(way, gm, args, dropout={"": 0.2})
    with silent():  # the value it records, and a pattern of its own for the nn.Dropout(0.0)
        trained = _to_train_by(way, gm, args, dropout={"2": 0.2, "": 0.2, "1": 0.0})
    assert_runs_as(copy.deepcopy(model).train(), trained, args, seed=1)


def test_a_pattern_holds_for_a_module_where_it_sets_one_site_and_the_others_keep_their_p() -> None:
    # Gated runs F.dropout(p=0.2 if self.training else 0.0) and F.dropout(p=0.1): no pattern tells the two apart.
    torch.manual_seed(0)
    model, args = nn.Sequential(Gated(0.2, 0.1)), STACK_ARGS
    gm = export(model, args, "eval")
    with silent():
        trained = modeswap.to_train(gm, dropout={"0": 0.2})
    assert [s.params["p"] for s in modeswap.mode_of(trained).sites] == [0.2, 0.1]
    assert_runs_as(copy.deepcopy(model).train(), trained, args, seed=2)
    # In a train export both record their p: a value that neither holds is an error.
    with pytest.raises(InvalidOptionError, match=r"dropout=\{'0': 0\.3\} contradicts .* p of 0\.2"):
        modeswap.to_train(export(model, args, "train"), dropout={"0": 0.3})


def test_a_pattern_that_decides_a_p_the_graph_computes_is_an_error() -> None:
    # A pass computes p in the graph: modeswap neither sets nor checks it, so it refuses a statement of it.
    torch.manual_seed(0)
    model, args = nn.Sequential(nn.Linear(3, 3), Plain(0.3)), (torch.randn(2, 3),)
    gm = export(model, args, "eval")
    (dropout,) = gm.graph.find_nodes(op="call_function", target=aten.dropout.default)
    with gm.graph.inserting_before(dropout):
        computed = gm.graph.call_function(operator.mul, (0.15, 2.0))
    computed.meta["val"] = 0.3
    dropout.update_arg(1, computed)
    gm.recompile()
    with pytest.raises(InvalidOptionError, match=r"dropout=\{'1': 0\.3\} cannot hold for dropout .* \(mul\) instead"):
        modeswap.to_train(gm, dropout={"1": 0.3})
    (site,) = modeswap.mode_of(gm).sites
    assert (site.params["p"], site.known) == ("mul", True)
    with silent():
        trained = modeswap.to_train(gm)
    assert_runs_as(copy.deepcopy(model).train(), trained, args, seed=1)


def test_attention_dropout_that_contradicts_a_remembered_value_is_an_error() -> None:
    torch.manual_seed(0)
    model, args = nn.Sequential(nn.Linear(4, 4), Attention(0.3)), (torch.randn(2, 3, 4),)
    evaluated = modeswap.to_eval(export(model, args, "train"))
    with pytest.raises(InvalidOptionError) as raised:
        modeswap.to_train(evaluated, attention_dropout=0.2)
    assert str(raised.value) == (
        "attention_dropout=0.2 contradicts the graph: scaled_dot_product_attention "
        "(aten.scaled_dot_product_attention.default, in module '1') records a training dropout_p of 0.3. "
        "Give that module a pattern of its own (dropout={'1': 0.3}), or state 0.3"
    )
    with silent():
        trained = modeswap.to_train(evaluated, attention_dropout=0.3)
    assert_runs_as(copy.deepcopy(model).train(), trained, args, seed=4)


def test_attention_dropout_that_reaches_no_attention_node_is_an_error() -> None:
    torch.manual_seed(0)
    model, args = nn.Sequential(Attention(0.2), Attention(0.4)), (torch.randn(2, 3, 4),)
    gm = export(model, args, "eval")
    with pytest.raises(InvalidOptionError, match=r"attention_dropout=0\.3 is for .* decides every one \(in '0', '1'\)"):
        modeswap.to_train(gm, dropout={"0": 0.2, "1": 0.4}, attention_dropout=0.3)
    with pytest.raises(InvalidOptionError, match=r"attention_dropout=0\.2 is for .* decides every one \(in '0', '1'\)"):
        modeswap.to_train(gm, dropout={"1": 0.4}, keep=["0"], attention_dropout=0.2)
    with silent():
        trained = modeswap.to_train(gm, dropout={"0": 0.2, "1": 0.4})
    assert_runs_as(copy.deepcopy(model).train(), trained, args, seed=5)


class ProjectedAttention(nn.Module):
    """timm's attention: SDPA gated on training with its attn_drop's p, then a projection and an nn.Dropout."""

    def __init__(self, attention: float, projection: float) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
        self.attn_drop, self.proj_drop = nn.Dropout(attention), nn.Dropout(projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x))  # type: ignore[no-any-return]


@pytest.mark.parametrize("projection", [0.0, 0.2])
def test_capture_states_what_it_learned_of_a_module_for_that_module_alone(projection: float) -> None:
    # capture reads the attention's training p (0.1) off the train export, as a value for module 'blocks.0';
    # as a dropout= pattern it would reach blocks.0.proj_drop too, and contradict the p it records.
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("blocks", nn.Sequential(ProjectedAttention(0.1, projection), ProjectedAttention(0.3, projection)))
    args = (torch.randn(2, 5, 8),)
    modal = modeswap.capture(copy.deepcopy(model).eval(), args)
    modal.get_submodule("blocks.0").train()
    eager = copy.deepcopy(model).eval()
    eager.get_submodule("blocks.0").train()
    assert_runs_as(eager, modal, args, seed=6)


@pytest.mark.parametrize("projection", [0.0, 0.2])
def test_the_suggested_mapping_gives_the_sites_it_reaches_their_recorded_p(projection: float) -> None:
    # GPT-2's and timm's attention: a pattern for the attention reaches the nn.Dropout inside its module,
    # which records its p. The suggestion states that p beside it, so the value filled in contradicts nothing.
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("blocks", nn.Sequential(ProjectedAttention(0.1, projection), ProjectedAttention(0.1, projection)))
    args = (torch.randn(2, 5, 8),)
    gm = export(model, args, "eval")
    with pytest.warns(UnknownTrainingValueWarning) as caught:
        modeswap.to_train(gm)
    (warning,) = [w.message for w in caught if isinstance(w.message, UnknownTrainingValueWarning)]
    assert warning.suggestion == {"blocks.*": 0.0, "blocks.*.proj_drop": projection}
    assert f"'blocks.*.proj_drop': {projection},  # what the graph records: leave it" in str(warning)
    with pytest.raises(InvalidOptionError, match=rf"'blocks\.0\.proj_drop'\) records a training p of {projection}"):
        modeswap.to_train(gm, dropout={"blocks.*": 0.1})
    with silent():
        trained = modeswap.to_train(gm, dropout={**warning.suggestion, "blocks.*": 0.1})
    assert_runs_as(copy.deepcopy(model).train(), trained, args, seed=7)


@pytest.mark.parametrize("pinned", ["told", "recorded"])
def test_a_pattern_that_matches_only_kept_sites_is_an_error(pinned: str) -> None:
    model, args = WithMonteCarlo(), (torch.randn(4, 6),)
    if pinned == "told":
        gm, options = export(model, args, "eval"), {"keep": ["mc"]}
    else:
        gm, options = modeswap.swap(export(model, args, "train"), "eval", keep=["mc"]).module, {}
    with pytest.raises(InvalidOptionError, match=r"dropout pattern 'mc' matches only sites that this swap leaves"):
        modeswap.to_train(gm, dropout={"mc": 0.3}, **options)


def test_a_pattern_that_matches_only_a_batch_norm_or_a_drop_path_is_an_error() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), DropPath(0.3, "timm"), nn.Dropout(0.1))
    args = (torch.randn(2, 2, 3, 3),)
    exports = {
        "eval export": export(model, args, "eval"),  # its drop path left no node
        "swapped train export": modeswap.to_eval(export(model, args, "train")),  # a drop path site, remembered
    }
    assert [s.kind for s in modeswap.mode_of(exports["swapped train export"]).sites] == [
        "batch_norm",
        "dropout",
        "drop_path",
    ]
    for gm in exports.values():
        for pattern in ("1", "2"):
            with pytest.raises(
                InvalidOptionError, match=rf"dropout pattern '{pattern}' matches no dropout or attention"
            ):
                modeswap.to_train(gm, dropout={pattern: 0.3})


def test_dropout_states_attention_per_module_and_attention_dropout_the_rest() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Attention(0.2), Attention(0.4))
    args = (torch.randn(2, 3, 4),)
    gm = export(model, args, "eval")
    with pytest.warns(UnknownTrainingValueWarning, match=r"attention_dropout=p") as caught:
        modeswap.to_train(gm)
    assert caught[0].message.suggestion == {"*": 0.0}  # type: ignore[union-attr]
    with silent():
        trained = modeswap.to_train(gm, dropout={"1": 0.4}, attention_dropout=0.2)
    assert_runs_as(copy.deepcopy(model).train(), trained, args, seed=5)


def test_the_exported_program_and_allow_train_eval_take_the_mapping() -> None:
    torch.manual_seed(0)
    model = Stack()
    ep = torch.export.export(copy.deepcopy(model).eval(), STACK_ARGS)
    with silent():
        program = modeswap.to_train(ep, dropout=STACK_TRAINING)
        modal = modeswap.allow_train_eval(ep, dropout=STACK_TRAINING)
    assert_runs_as(copy.deepcopy(model).train(), program.module(), STACK_ARGS, seed=2)
    assert_runs_as(copy.deepcopy(model).train(), modal.train(), STACK_ARGS, seed=2)
    assert_runs_as(copy.deepcopy(model).eval(), modal.eval(), STACK_ARGS)


# -- keep= --------------------------------------------------------------------------------------------------


class MonteCarlo(nn.Module):
    """Dropout on in both modes: Monte Carlo dropout for uncertainty estimates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, p=0.3, training=True)


class WithMonteCarlo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.2)
        self.mc = MonteCarlo()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mc(self.drop(self.fc(x)))  # type: ignore[no-any-return]


def test_monte_carlo_dropout_is_kept_on_in_eval_and_stays_kept() -> None:
    torch.manual_seed(0)
    model, args = WithMonteCarlo(), (torch.randn(4, 6),)
    gm = export(model, args, "train")
    evaluated = modeswap.swap(gm, "eval", keep=["mc"])
    assert [c.node for c in evaluated.changes] == ["dropout"]  # the kept one is not listed
    assert_runs_as(copy.deepcopy(model).eval(), evaluated.module, args, seed=1)
    report = modeswap.mode_of(evaluated.module)
    assert [(s.module_path, s.mode, s.kept) for s in report.sites] == [
        ("drop", Mode.EVAL, False),
        ("mc", Mode.TRAIN, True),
    ]
    assert report.mode is Mode.EVAL  # kept sites do not make a graph mixed
    assert not report.mixed
    # Later swaps keep it without being told again, both ways.
    assert_runs_as(copy.deepcopy(model).train(), modeswap.to_train(evaluated.module), args, seed=2)
    assert_runs_as(copy.deepcopy(model).eval(), modeswap.to_eval(evaluated.module), args, seed=3)
    # Without keep=, it follows the mode as every other site, and eager eval disagrees.
    plain = modeswap.to_eval(gm)
    with pytest.raises(AssertionError):
        assert_runs_as(copy.deepcopy(model).eval(), plain, args, seed=1)


@pytest.mark.parametrize("idiom", DropPath.IDIOMS)
def test_a_kept_drop_path_stays_in_an_eval_swap_and_after(idiom: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), PinnedMode(DropPath(0.5, idiom), training=True), nn.Dropout(0.1))
    args = (torch.randn(6, 4),)
    evaluated = modeswap.swap(export(model, args, "train"), "eval", keep=["1"])
    assert [c.field for c in evaluated.changes] == ["train"]  # the dropout only
    assert [(s.kind, s.mode, s.kept) for s in modeswap.mode_of(evaluated.module).sites] == [
        ("dropout", Mode.EVAL, False),
        ("drop_path", Mode.TRAIN, True),
    ]
    assert_runs_as(copy.deepcopy(model).eval(), evaluated.module, args, seed=1)
    assert_runs_as(copy.deepcopy(model).eval(), modeswap.to_eval(modeswap.to_train(evaluated.module)), args, seed=2)


def test_a_kept_site_survives_save_and_load(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model, args = WithMonteCarlo(), (torch.randn(4, 6),)
    ep = modeswap.to_eval(torch.export.export(copy.deepcopy(model).train(), args), keep=["mc"])
    torch.export.save(ep, tmp_path / "kept.pt2")
    loaded = torch.export.load(tmp_path / "kept.pt2")
    assert [s.kept for s in modeswap.mode_of(loaded).sites] == [False, True]
    assert_runs_as(copy.deepcopy(model).train(), modeswap.to_train(loaded).module(), args, seed=4)


class Backbone(nn.Module):
    """A detection backbone's ``norm_eval``: its batch norm stays in eval mode while the model trains."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        self.bn.eval()
        return self


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.neck = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))  # type: ignore[no-any-return]


@pytest.mark.parametrize("exported_in", ["train", "eval"])
def test_a_norm_eval_batch_norm_stays_in_eval_in_a_train_swap(exported_in: str) -> None:
    torch.manual_seed(0)
    model, args = Detector(), (torch.randn(2, 3, 6, 6),)
    model.backbone.bn.running_mean.uniform_()  # not the initial statistics, so a train-mode norm would differ
    gm = export(model, args, exported_in)
    with silent():
        trained = modeswap.swap(gm, "train", keep=["backbone.bn"])
    assert not any(c.node == "batch_norm" for c in trained.changes)
    back = modeswap.to_eval(trained.module)  # before a train forward updates the running stats
    assert_runs_as(copy.deepcopy(model).train(), trained.module, args, seed=1)
    assert_runs_as(copy.deepcopy(model).eval(), back, args)
    # The graph of a train export mixes the modes; keeping the frozen norm makes it say train.
    if exported_in == "train":
        assert modeswap.mode_of(gm).mixed
        assert modeswap.mode_of(trained.module).mode is Mode.TRAIN


def test_allow_train_eval_of_a_norm_eval_train_export_starts_in_train() -> None:
    torch.manual_seed(0)
    model, args = Detector(), (torch.randn(2, 3, 6, 6),)
    model.backbone.bn.running_mean.uniform_()
    modal = modeswap.allow_train_eval(export(model, args, "train"), keep=["backbone.bn"])
    assert modal.training
    assert modeswap.mode_of(modal).mode is Mode.TRAIN
    assert_runs_as(copy.deepcopy(model).eval(), modal.eval(), args)  # eval first: train updates running stats
    assert_runs_as(copy.deepcopy(model).train(), modal.train(), args, seed=1)


class WithDropPath(Detector):
    """A drop path at rate 0 is an ``nn.Identity``: a train export leaves no node of it, and loses nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(super().forward(x))  # type: ignore[no-any-return]


def test_kept_sites_do_not_make_a_train_export_look_captured_in_eval() -> None:
    # The frozen batch norm is in eval mode; the graph was captured in train, so nothing branched the other way.
    model, args = WithDropPath(), (torch.randn(2, 3, 6, 6),)
    program = torch.export.export(copy.deepcopy(model).train(), args)
    with (
        pytest.warns(modeswap.MixedModeWarning, match=r"keep=\('backbone.bn',\)"),
        pytest.warns(modeswap.TrainingBranchWarning, match="'drop_path'"),
    ):
        modeswap.to_train(program)  # the frozen batch norm would train: the graph's minority is said
    with silent():
        trained = modeswap.to_train(program, keep=["backbone.bn"])
    assert modeswap.mode_of(trained).mode is Mode.TRAIN


class BatchStatistics(nn.Module):
    """``F.batch_norm(..., training=True)`` on purpose: batch statistics in both modes, running stats updated."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mean, self.var, training=True, momentum=0.2)


def test_a_hard_coded_training_batch_norm_is_kept() -> None:
    torch.manual_seed(0)
    model, args = nn.Sequential(nn.Linear(4, 4), BatchStatistics(), nn.Dropout(0.1)), (torch.randn(5, 4),)
    gm = export(model, args, "train")
    evaluated = modeswap.swap(gm, "eval", keep=["1"])
    assert [c.node for c in evaluated.changes] == ["dropout"]
    back = modeswap.to_train(evaluated.module)
    assert_runs_as(copy.deepcopy(model).eval(), evaluated.module, args)
    assert_runs_as(copy.deepcopy(model).train(), back, args, seed=1)


def test_allow_train_eval_keeps_in_both_modes() -> None:
    torch.manual_seed(0)
    model, args = WithMonteCarlo(), (torch.randn(4, 6),)
    modal = modeswap.allow_train_eval(export(model, args, "eval"), keep=["mc"])
    assert_runs_as(copy.deepcopy(model).train(), modal.train(), args, seed=1)
    assert_runs_as(copy.deepcopy(model).eval(), modal.eval(), args, seed=2)
    assert [s.kept for s in modeswap.mode_of(modal).sites] == [False, True]


# -- first-run fixes in the library ------------------------------------------------------------------------


def test_mode_of_a_swap_record_points_at_its_module() -> None:
    swapped = modeswap.swap(export(Stack(), STACK_ARGS, "train"), "eval")
    with pytest.raises(modeswap.NotExportedError, match=r"^got a modeswap\.Swap record; .*\(swapped\.module\)$"):
        modeswap.mode_of(swapped)  # type: ignore[arg-type]


def test_a_kept_attention_at_zero_stays_although_mode_of_cannot_place_it() -> None:
    # Shrunk by hypothesis: an attention pinned to eval, in an eval export, tells mode_of no mode
    # (dropout_p=0.0), but keep= still reaches it and attention_dropout= leaves it alone.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 1, 1), PinnedMode(Attention(0.5), training=False), Attention(0.5))
    args = (torch.randn(2, 1, 2),)
    gm = export(model, args, "eval")
    report = modeswap.mode_of(gm)
    assert [(s.module_path, s.mode, s.known) for s in report.sites] == [
        ("1.child", Mode.EVAL, False),
        ("2", Mode.EVAL, False),
    ]
    assert report.mode is None  # neither tells a mode
    with silent():
        trained = modeswap.to_train(gm, keep=["1"], attention_dropout=0.5)
    assert_runs_as(copy.deepcopy(model).train(), trained, args, seed=1)


class AlwaysOnDropoutBeforeAttention(nn.Module):
    """``F.dropout(training=True)`` makes an eval export look captured in train mode; its attention is gated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, 0.3, training=True)
        return F.scaled_dot_product_attention(x, x, x, dropout_p=0.5 if self.training else 0.0)


@pytest.mark.parametrize("stated", [{"attention_dropout": 0.5}, {"dropout": {"": 0.5}}], ids=["attention", "dropout"])
def test_a_stated_value_wins_over_the_mode_the_graph_seems_to_be_in(stated: dict[str, Any]) -> None:
    # The graph reads as a train graph, where dropout_p=0.0 would be the training value; the user knows better.
    x = torch.randn(2, 2, 4, 4)
    model = AlwaysOnDropoutBeforeAttention()
    assert modeswap.mode_of(torch.export.export(model.eval(), (x,)).module()).mode is Mode.TRAIN
    swapped = assert_mode_equivalent(model, (x,), "train", exported_in="eval", **stated)
    assert [(c.field, c.after) for c in swapped.changes] == [("dropout_p", 0.5)]
