"""The semantics table, row by row, in both directions, against eager PyTorch."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

import modeswap
from modeswap import Change, Memo, Mode, UnknownTrainingValueWarning, UnsupportedGraphError
from modeswap.fx.graphs import memo_of
from modeswap.testing import (
    Snapshot,
    assert_mode_equivalent,
    assert_same_run,
    call_signature,
    export,
    other,
    run_forward_backward,
)
from modeswap.testing.models import Attention

aten = torch.ops.aten
COUNTER = "num_batches_tracked.add_(1)"
MODES = ("train", "eval")


# --- helpers -----------------------------------------------------------------


def _nodes(gm: GraphModule, *targets: Any) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def _arg(node: Node, name: str) -> Any:
    """Argument ``name`` of a call, or its schema default where the graph leaves it out (as export does)."""
    if name in node.kwargs:
        return node.kwargs[name]
    schema = node.target._schema.arguments
    index = next(i for i, a in enumerate(schema) if a.name == name)
    return node.args[index] if index < len(node.args) else schema[index].default_value


def _calls(gm: GraphModule) -> list[tuple[Any, Any]]:
    """``call_function`` nodes in order as (target, literal args/kwargs); node arguments by position, not name."""
    position: dict[Node, int] = {}

    def literal(a: Any) -> Any:
        if not isinstance(a, Node):
            return (type(a).__name__, a)
        if a.op == "call_function":
            return ("call", position[a])
        if a.op == "get_attr":
            return ("attr", a.target)
        return (a.op, a.name)

    calls = []
    for node in gm.graph.nodes:
        if node.op == "call_function":
            calls.append((node.target, pytree.tree_map(literal, (node.args, node.kwargs))))
            position[node] = len(position)
    return calls


def _with_stats(norm: nn.Module) -> nn.Module:
    """Give a norm layer non-default running stats and batch count, so eval and train differ visibly."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norm.running_mean.copy_(torch.rand(norm.running_mean.shape, generator=g) - 0.5)
        norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=g) + 0.5)
        norm.num_batches_tracked.fill_(7)
    return norm


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class InplaceDropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x * 2, self.p, self.training, inplace=True)


class SharedNorm(nn.Module):
    """One BatchNorm called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = _with_stats(nn.BatchNorm1d(3, momentum=0.3, eps=1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.bn(x)))


def _every_site() -> nn.Module:
    """One of each site the table knows, with non-default literals."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 3, 1),
        _with_stats(nn.BatchNorm1d(3, momentum=0.3, eps=1e-3)),
        nn.Dropout(0.3),
        nn.Dropout1d(0.2),
        nn.AlphaDropout(0.25),
        nn.FeatureAlphaDropout(0.15),
        nn.RReLU(),
        nn.RReLU(0.1, 0.2),
        _with_stats(nn.InstanceNorm1d(3, momentum=0.2, eps=1e-4, affine=True, track_running_stats=True)),
        Attention(0.35, causal=True, scale=0.7),
        InplaceDropout(0.45),
    )


EVERY_ARGS = (_randn(2, 2, 4),)
ATTENTION_P = 0.35


# --- dropout -----------------------------------------------------------------

DROPOUTS = [
    pytest.param(nn.Dropout(0.3), (4, 3), aten.dropout.default, id="Dropout"),
    pytest.param(nn.Dropout(0.3, inplace=True), (4, 3), aten.dropout_.default, id="Dropout-inplace"),
    pytest.param(nn.Dropout1d(0.3), (2, 3, 4), aten.feature_dropout.default, id="Dropout1d"),
    pytest.param(nn.Dropout1d(0.3, inplace=True), (2, 3, 4), aten.feature_dropout_.default, id="Dropout1d-inplace"),
    pytest.param(nn.Dropout2d(0.3), (2, 3, 2, 4), aten.feature_dropout.default, id="Dropout2d"),
    pytest.param(nn.Dropout2d(0.3, inplace=True), (2, 3, 2, 4), aten.feature_dropout_.default, id="Dropout2d-inplace"),
    pytest.param(nn.Dropout3d(0.3), (2, 3, 2, 2, 4), aten.feature_dropout.default, id="Dropout3d"),
    pytest.param(nn.Dropout3d(0.3, inplace=True), (2, 3, 2, 2, 4), aten.feature_dropout_.default, id="Dropout3d-inp"),
    pytest.param(nn.AlphaDropout(0.3), (4, 3), aten.alpha_dropout.default, id="AlphaDropout"),
    pytest.param(nn.AlphaDropout(0.3, inplace=True), (4, 3), aten.alpha_dropout.default, id="AlphaDropout-inplace"),
    pytest.param(nn.FeatureAlphaDropout(0.3), (2, 3, 2, 4), aten.feature_alpha_dropout.default, id="FeatureAlpha"),
    pytest.param(InplaceDropout(0.3), (4, 3), aten.dropout_.default, id="F.dropout-inplace"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("layer", "shape", "op"), DROPOUTS)
def test_dropout_matches_eager_and_keeps_p(layer: nn.Module, shape: tuple[int, ...], op: Any, mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(shape[-1], shape[-1]), layer)
    swapped = assert_mode_equivalent(model, (_randn(*shape),), mode)
    (node,) = _nodes(swapped.module, op)
    assert _arg(node, "p") == 0.3
    assert type(_arg(node, "p")) is float
    assert _arg(node, "train") is (mode == "train")


# --- batch norm --------------------------------------------------------------

BATCH_NORMS = [
    pytest.param(nn.BatchNorm1d, (4, 3), id="1d-NC"),
    pytest.param(nn.BatchNorm1d, (2, 3, 5), id="1d-NCL"),
    pytest.param(nn.BatchNorm2d, (2, 3, 2, 3), id="2d"),
    pytest.param(nn.BatchNorm3d, (2, 3, 2, 2, 2), id="3d"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize(("cls", "shape"), BATCH_NORMS)
def test_batchnorm_matches_eager_and_keeps_literals(cls: type, shape: tuple[int, ...], affine: bool, mode: str) -> None:
    model = nn.Sequential(nn.ReLU(), _with_stats(cls(3, eps=1e-3, momentum=0.3, affine=affine)))
    swapped = assert_mode_equivalent(model, (_randn(*shape),), mode)
    (node,) = _nodes(swapped.module, aten.batch_norm.default)
    assert (_arg(node, "training"), _arg(node, "momentum"), _arg(node, "eps")) == (mode == "train", 0.3, 1e-3)
    assert (_arg(node, "weight") is None) is not affine
    counters = _nodes(swapped.module, aten.add_.Tensor)
    assert len(counters) == (mode == "train")


@pytest.mark.parametrize("mode", MODES)
def test_batch_counter_over_several_forwards(mode: str) -> None:
    model = _with_stats(nn.BatchNorm2d(3, momentum=0.3, eps=1e-3))
    gm = modeswap.swap(export(model, (_randn(2, 3, 2, 2),), other(mode)), mode).module
    eager = copy.deepcopy(model).train(mode == "train")
    for seed in range(3):
        x = _randn(2, 3, 2, 2, seed=seed)
        torch.testing.assert_close(gm(x), eager(x))
    buffers = dict(gm.named_buffers())
    assert buffers["num_batches_tracked"].item() == eager.num_batches_tracked.item() == (10 if mode == "train" else 7)
    torch.testing.assert_close(buffers["running_mean"], eager.running_mean)
    torch.testing.assert_close(buffers["running_var"], eager.running_var)


@pytest.mark.parametrize("exported_in", MODES)
@pytest.mark.parametrize(
    ("norm", "shape"),
    [
        pytest.param(nn.BatchNorm2d(3, momentum=0.3, eps=1e-3, track_running_stats=False), (2, 3, 2, 2), id="batch"),
        pytest.param(nn.InstanceNorm2d(3, affine=True), (2, 3, 2, 3), id="instance"),
    ],
)
def test_norm_without_running_stats_is_untouched(norm: nn.Module, shape: tuple[int, ...], exported_in: str) -> None:
    model = nn.Sequential(nn.ReLU(), norm)
    args = (_randn(*shape),)
    gm = export(model, args, exported_in)
    swapped = modeswap.swap(gm, other(exported_in))
    assert swapped.changes == ()
    assert _calls(swapped.module) == _calls(gm)
    for mode in MODES:
        assert_mode_equivalent(model, args, mode, exported_in=exported_in)


def test_shared_batchnorm_counts_twice_in_train() -> None:
    args = (_randn(4, 3),)
    gm = modeswap.to_train(export(SharedNorm(), args, "eval"))
    assert len(_nodes(gm, aten.add_.Tensor)) == 2
    eager = SharedNorm().train()
    for seed in range(3):
        x = _randn(4, 3, seed=seed)
        torch.testing.assert_close(gm(x), eager(x))
    assert dict(gm.named_buffers())["bn.num_batches_tracked"].item() == eager.bn.num_batches_tracked.item() == 13
    assert_mode_equivalent(SharedNorm(), args, "train")


def test_shared_batchnorm_to_eval() -> None:
    # Regression: export chains the second counter on the first (add_(add_, 1)).
    swapped = assert_mode_equivalent(SharedNorm(), (_randn(4, 3),), "eval")
    assert _nodes(swapped.module, aten.add_.Tensor) == []


def test_shared_batchnorm_round_trips_its_chained_counters() -> None:
    args = (_randn(4, 3),)
    gm = export(SharedNorm(), args, "train")
    assert call_signature(modeswap.to_train(modeswap.to_eval(gm))) == call_signature(gm)


def test_a_counter_away_from_its_batch_norm_is_found() -> None:
    # prepare_qat_pt2e rewrites conv + batch norm, and leaves the counter before the new conv ops.
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, momentum=0.2), nn.Dropout(0.3))
    args = (_randn(4, 3),)
    gm = export(model, args, "train")
    (counter,) = _nodes(gm, aten.add_.Tensor)
    (linear,) = _nodes(gm, aten.linear.default)
    linear.prepend(counter)
    gm.recompile()
    assert counter.next is linear
    evaluated = modeswap.to_eval(gm)
    assert _nodes(evaluated, aten.add_.Tensor) == []
    expected = run_forward_backward(copy.deepcopy(model).eval(), args, seed=0)
    assert_same_run(expected, run_forward_backward(evaluated, args, seed=0), atol=0, rtol=0)


def test_cumulative_momentum_cannot_go_to_train() -> None:
    gm = export(nn.BatchNorm1d(3, momentum=None), (_randn(4, 3),), "eval")
    with pytest.raises(UnsupportedGraphError, match=r"momentum=None") as info:
        modeswap.to_train(gm)
    message = str(info.value)
    assert "batch_norm" in message
    assert "numeric momentum" in message


# --- instance norm -----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("cls", "shape"), [(nn.InstanceNorm1d, (2, 3, 5)), (nn.InstanceNorm2d, (2, 3, 2, 3))])
def test_instance_norm_with_running_stats(cls: type, shape: tuple[int, ...], mode: str) -> None:
    norm = _with_stats(cls(3, eps=1e-3, momentum=0.3, affine=True, track_running_stats=True))
    swapped = assert_mode_equivalent(nn.Sequential(nn.ReLU(), norm), (_randn(*shape),), mode)
    (node,) = _nodes(swapped.module, aten.instance_norm.default)
    assert (_arg(node, "use_input_stats"), _arg(node, "momentum"), _arg(node, "eps")) == (mode == "train", 0.3, 1e-3)
    assert _nodes(swapped.module, aten.add_.Tensor) == []  # eager InstanceNorm never counts batches


# --- rrelu -------------------------------------------------------------------

RRELUS = [
    pytest.param(nn.RReLU(0.1, 0.3), id="custom"),
    pytest.param(nn.RReLU(), id="default"),
    pytest.param(nn.RReLU(0.1, 0.3, inplace=True), id="custom-inplace"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", RRELUS)
def test_rrelu_matches_eager_and_the_other_export(layer: nn.Module, mode: str) -> None:
    model = nn.Sequential(nn.Linear(3, 3), layer)
    args = (_randn(4, 3),)
    swapped = assert_mode_equivalent(model, args, mode)
    # to_train pads the defaults an eval export strips (rrelu(x)); to_eval strips them again.
    assert _calls(swapped.module) == _calls(export(model, args, mode))
    (node,) = _nodes(swapped.module, aten.rrelu.default, aten.rrelu_.default)
    if mode == "train":
        assert node.args[1:] == (layer.lower, layer.upper, True)


def test_rrelu_custom_bounds_kept_in_eval() -> None:
    gm = modeswap.to_eval(export(nn.RReLU(0.1, 0.3), (_randn(4, 3),), "train"))
    (node,) = _nodes(gm, aten.rrelu.default)
    assert node.args[1:] == (0.1, 0.3)


# --- attention ---------------------------------------------------------------


def _attention_nodes(gm: GraphModule) -> list[Node]:
    return _nodes(gm, aten.scaled_dot_product_attention.default)


def test_attention_to_eval_zeroes_dropout_and_remembers_it() -> None:
    model = nn.Sequential(nn.Linear(4, 4), Attention(ATTENTION_P))
    swapped = assert_mode_equivalent(model, (_randn(2, 3, 4),), "eval")
    (node,) = _attention_nodes(swapped.module)
    assert _arg(node, "dropout_p") == 0.0
    assert memo_of(node) == Memo({"dropout_p": ATTENTION_P})


def test_attention_to_train_with_attention_dropout_matches_eager() -> None:
    model = nn.Sequential(nn.Linear(4, 4), Attention(ATTENTION_P))
    swapped = assert_mode_equivalent(model, (_randn(2, 3, 4),), "train", attention_dropout=ATTENTION_P)
    (node,) = _attention_nodes(swapped.module)
    assert _arg(node, "dropout_p") == ATTENTION_P


def test_attention_to_train_without_value_warns_once_and_keeps_zero() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(3), Attention(ATTENTION_P, calls=2))
    gm = export(model, (_randn(2, 3, 4),), "eval")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained = modeswap.to_train(gm)
    assert [w.category for w in caught] == [UnknownTrainingValueWarning]
    names = [n.name for n in _attention_nodes(gm)]
    assert len(names) == 2
    for name in names:
        assert name in str(caught[0].message)
    assert "attention_dropout" in str(caught[0].message)
    assert [_arg(n, "dropout_p") for n in _attention_nodes(trained)] == [0.0, 0.0]
    (bn,) = _nodes(trained, aten.batch_norm.default)
    assert _arg(bn, "training") is True


@pytest.mark.parametrize("mode", MODES)
def test_attention_keeps_is_causal_and_scale(mode: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), Attention(ATTENTION_P, causal=True, scale=0.7))
    swapped = assert_mode_equivalent(
        model, (_randn(2, 3, 4),), mode, attention_dropout=ATTENTION_P if mode == "train" else None
    )
    (node,) = _attention_nodes(swapped.module)
    assert _arg(node, "is_causal") is True
    assert node.kwargs["scale"] == 0.7
    assert _arg(node, "dropout_p") == (ATTENTION_P if mode == "train" else 0.0)


# --- recurrent layers ----------------------------------------------------------


class Recurrent(nn.Module):
    """An ``nn.LSTM``/``GRU``/``RNN`` with dropout between stacked layers; returns the outputs and the state."""

    def __init__(self, cls: type[nn.RNNBase], **options: Any) -> None:
        super().__init__()
        self.rnn = cls(4, 6, **options)

    def forward(self, x: torch.Tensor) -> Any:
        return self.rnn(x)


RECURRENT = [
    pytest.param(nn.LSTM, {}, aten.lstm.input, id="LSTM"),
    pytest.param(nn.GRU, {}, aten.gru.input, id="GRU"),
    pytest.param(nn.RNN, {"nonlinearity": "tanh"}, aten.rnn_tanh.input, id="RNN-tanh"),
    pytest.param(nn.RNN, {"nonlinearity": "relu"}, aten.rnn_relu.input, id="RNN-relu"),
    pytest.param(nn.LSTM, {"bidirectional": True, "batch_first": True}, aten.lstm.input, id="LSTM-bi-batch-first"),
    pytest.param(nn.LSTM, {"proj_size": 3}, aten.lstm.input, id="LSTM-proj"),
    pytest.param(nn.GRU, {"bidirectional": True, "bias": False}, aten.gru.input, id="GRU-bi-no-bias"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("cls", "options", "op"), RECURRENT)
def test_recurrent_layers_match_eager_and_keep_dropout(cls: type, options: dict[str, Any], op: Any, mode: str) -> None:
    torch.manual_seed(0)
    model = Recurrent(cls, num_layers=3, dropout=0.4, **options)
    swapped = assert_mode_equivalent(model, (_randn(5, 2, 4),), mode)
    (node,) = _nodes(swapped.module, op)
    assert (_arg(node, "train"), _arg(node, "dropout"), _arg(node, "num_layers")) == (mode == "train", 0.4, 3)
    assert [(c.field, c.after) for c in swapped.changes] == [("train", mode == "train")]
    (site,) = modeswap.mode_of(swapped.module).sites
    assert (site.kind, site.module_path, site.functional) == ("rnn", "rnn", False)


def test_a_recurrent_layer_round_trips_argument_for_argument() -> None:
    model = Recurrent(nn.LSTM, num_layers=2, dropout=0.3, bidirectional=True)
    gm = export(model, (_randn(5, 2, 4),), "train")
    assert call_signature(modeswap.to_train(modeswap.to_eval(gm))) == call_signature(gm)
    assert modeswap.mode_of(gm).stochastic == ()  # the rule owns the op's random draws


def test_a_packed_sequence_overload_is_swapped_too() -> None:
    # torch 2.13 cannot export a PackedSequence (its batch sizes are data), so the .data overload
    # is called by hand here, in a graph traced with export's metadata.
    lstm = nn.LSTM(4, 6, num_layers=2, dropout=0.5)
    batch_sizes = torch.tensor([2, 2, 1])

    def packed(data: torch.Tensor, train: bool) -> torch.Tensor:
        state = [torch.zeros(2, 2, 6), torch.zeros(2, 2, 6)]
        weights = list(lstm._flat_weights)
        out: torch.Tensor = aten.lstm.data(data, batch_sizes, state, weights, True, 2, 0.5, train, False)[0]
        return out

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = lstm  # so that tracing reads its weights as attributes

        def forward(self, data: torch.Tensor) -> torch.Tensor:
            return packed(data, True)

    gm = torch.fx.symbolic_trace(Packed())
    for node in gm.graph.nodes:
        node.meta["val"] = None  # what modeswap.is_exported looks for
    data = _randn(5, 4)
    evaluated = modeswap.to_eval(gm)
    (node,) = _nodes(evaluated, aten.lstm.data)
    assert _arg(node, "train") is False
    torch.testing.assert_close(evaluated(data), packed(data, False), rtol=0, atol=0)
    torch.manual_seed(0)
    trained = modeswap.to_train(evaluated)(data)
    torch.manual_seed(0)
    torch.testing.assert_close(trained, packed(data, True), rtol=0, atol=0)


# --- whole graphs: round trip, idempotence, changes, purity ------------------


def _to(mode: str) -> Any:
    return modeswap.to_eval if mode == "eval" else lambda gm: modeswap.to_train(gm, attention_dropout=ATTENTION_P)


@pytest.mark.parametrize("exported_in", MODES)
def test_round_trip_gives_back_the_export(exported_in: str) -> None:
    model = _every_site()
    gm = export(model, EVERY_ARGS, exported_in)
    # From a train export the memo alone restores attention dropout: no attention_dropout=, no warning.
    there = _to(other(exported_in))(gm)
    back = modeswap.to_train(there) if exported_in == "train" else modeswap.to_eval(there)
    assert _calls(back) == _calls(gm)
    eager = copy.deepcopy(model).train(exported_in == "train")
    assert_same_run(
        run_forward_backward(eager, EVERY_ARGS, seed=0),
        run_forward_backward(back, EVERY_ARGS, seed=0),
        atol=1e-6,
        rtol=1e-5,
    )


@pytest.mark.parametrize("mode", MODES)
def test_every_site_matches_eager(mode: str) -> None:
    swapped = assert_mode_equivalent(
        _every_site(), EVERY_ARGS, mode, attention_dropout=ATTENTION_P if mode == "train" else None
    )
    assert modeswap.mode_of(swapped.module).mode is Mode(mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("exported_in", MODES)
def test_swap_is_idempotent(exported_in: str, mode: str) -> None:
    once = _to(mode)(export(_every_site(), EVERY_ARGS, exported_in))
    twice = modeswap.swap(once, mode)
    assert twice.changes == ()
    assert _calls(twice.module) == _calls(once)


#: (node, op, field) of every boolean flag swapping _every_site() flips.
EVERY_FLAG = [
    ("batch_norm", "aten.batch_norm.default", "training"),
    ("batch_norm", "aten.batch_norm.default", COUNTER),
    ("dropout", "aten.dropout.default", "train"),
    ("feature_dropout", "aten.feature_dropout.default", "train"),
    ("alpha_dropout", "aten.alpha_dropout.default", "train"),
    ("feature_alpha_dropout", "aten.feature_alpha_dropout.default", "train"),
    ("rrelu", "aten.rrelu.default", "training"),
    ("rrelu_1", "aten.rrelu.default", "training"),
    ("instance_norm", "aten.instance_norm.default", "use_input_stats"),
    ("dropout_", "aten.dropout_.default", "train"),
]


def _every_change(before: bool) -> set[Change]:
    """Every edit swapping _every_site() makes; ``before`` is the flags' value in the source graph."""
    changes = {Change(node, op, field, before, not before) for node, op, field in EVERY_FLAG}
    p = (ATTENTION_P, 0.0) if before else (0.0, ATTENTION_P)
    sdpa = "scaled_dot_product_attention"
    return changes | {Change(sdpa, f"aten.{sdpa}.default", "dropout_p", *p)}


@pytest.mark.parametrize("exported_in", MODES)
def test_changes_list_every_edit(exported_in: str) -> None:
    gm = export(_every_site(), EVERY_ARGS, exported_in)
    target = other(exported_in)
    swapped = modeswap.swap(gm, target, attention_dropout=ATTENTION_P if target == "train" else None)
    assert swapped.mode is Mode(target)
    assert len(swapped.changes) == len(set(swapped.changes))
    assert set(swapped.changes) == _every_change(before=exported_in == "train")


@pytest.mark.parametrize("exported_in", MODES)
def test_swap_leaves_its_input_alone(exported_in: str) -> None:
    gm = export(_every_site(), EVERY_ARGS, exported_in)
    before = Snapshot.of(gm)
    _to(other(exported_in))(gm)
    assert Snapshot.of(gm) == before


# --- regressions from review ---------------------------------------------------


class FunctionalNormAfterUserIncrement(nn.Module):
    """A user's own add_(t, 1) right before a functional batch norm: not a batch counter."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rm", torch.zeros(3))
        self.register_buffer("rv", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2
        x.add_(1)
        return F.batch_norm(x, self.rm, self.rv, training=self.training)


class FunctionalNormOnModuleBuffers(nn.Module):
    """F.batch_norm on a BatchNorm's buffers: eager never touches num_batches_tracked."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.bn.running_mean, self.bn.running_var, training=self.training)


@pytest.mark.parametrize("mode", MODES)
def test_a_user_add_before_a_functional_batch_norm_is_kept(mode: str) -> None:
    swapped = assert_mode_equivalent(FunctionalNormAfterUserIncrement(), (_randn(4, 3),), mode)
    assert len(_nodes(swapped.module, aten.add_.Tensor)) == 1
    assert all(change.field != "num_batches_tracked.add_(1)" for change in swapped.changes)


def test_a_functional_batch_norm_on_module_buffers_never_counts() -> None:
    args = (_randn(4, 3),)
    swapped = assert_mode_equivalent(FunctionalNormOnModuleBuffers(), args, "train")
    assert _nodes(swapped.module, aten.add_.Tensor) == []
    gm = export(FunctionalNormOnModuleBuffers(), args, "train")
    assert call_signature(modeswap.to_train(modeswap.to_eval(gm))) == call_signature(gm)


def test_attention_dropout_applies_to_a_graph_already_swapped_without_it() -> None:
    model = nn.Sequential(nn.Dropout(0.1), Attention(0.3))
    args = (_randn(2, 3, 4),)
    with pytest.warns(UnknownTrainingValueWarning):
        guessed = modeswap.to_train(export(model, args, "eval"))
    fixed = modeswap.swap(guessed, "train", attention_dropout=0.3)
    assert [(c.field, c.before, c.after) for c in fixed.changes] == [("dropout_p", 0.0, 0.3)]
    assert_same_run(
        run_forward_backward(copy.deepcopy(model).train(), args, seed=4),
        run_forward_backward(fixed.module, args, seed=4),
        atol=1e-6,
        rtol=1e-5,
    )


@pytest.mark.parametrize("exported_in", MODES)
@pytest.mark.parametrize("target", MODES)
def test_decomposed_graphs_are_refused(exported_in: str, target: str) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.2))
    ep = torch.export.export(copy.deepcopy(model).train(exported_in == "train"), (_randn(4, 3),))
    with pytest.raises(
        UnsupportedGraphError, match=r"run_decompositions\(\).*Swap the program torch\.export\.export returns"
    ):
        modeswap.swap(ep.run_decompositions().module(), target)


def test_attention_dropout_of_one_is_accepted() -> None:
    gm = export(Attention(0.5), (_randn(2, 3, 4),), "eval")
    (node,) = _nodes(modeswap.to_train(gm, attention_dropout=1.0), aten.scaled_dot_product_attention.default)
    assert _arg(node, "dropout_p") == 1.0


def test_a_strict_eval_export_without_its_batch_counter_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    gm = torch.export.export(model.eval(), (_randn(4, 3),), strict=True).module()
    assert "1.num_batches_tracked" not in gm.state_dict()
    with pytest.raises(UnsupportedGraphError, match=r"no 1\.num_batches_tracked .*strict=True"):
        modeswap.to_train(gm)
