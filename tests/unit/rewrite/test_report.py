"""mode_of: the sites of a graph, the mode they agree on, and its stray random ops."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import modeswap
from modeswap import Mode
from modeswap.rewrite.report import tells_mode
from modeswap.testing import Snapshot, assert_mode_equivalent, export, other
from modeswap.testing.models import Attention, PinnedMode
from modeswap.testing.oracle import assert_same_run, run_forward_backward

aten = torch.ops.aten
ARGS = (torch.randn((2, 2, 3, 3), generator=torch.Generator().manual_seed(0)),)


class Noise(nn.Module):
    """A hand-written noise layer: random ops that belong to no site."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.randn_like(x) + 0.1 * torch.rand(x.shape)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(2, 3, 1),
            nn.BatchNorm2d(3, momentum=0.3, eps=1e-3),
            nn.RReLU(0.1, 0.2),
            nn.Dropout2d(0.25),
        )
        self.norm = nn.InstanceNorm2d(3, momentum=0.2, eps=1e-4, track_running_stats=True)
        self.head = nn.Sequential(nn.Flatten(1), nn.Linear(27, 4), nn.Dropout(0.4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x)))


#: (node, op, kind, module_path, params) of every site of Net, in graph order.
NET_SITES = [
    ("batch_norm", "aten.batch_norm.default", "batch_norm", "features.1", {"momentum": 0.3, "eps": 1e-3}),
    ("rrelu", "aten.rrelu.default", "rrelu", "features.2", {"lower": 0.1, "upper": 0.2}),
    ("feature_dropout", "aten.feature_dropout.default", "dropout", "features.3", {"p": 0.25}),
    ("instance_norm", "aten.instance_norm.default", "instance_norm", "norm", {"momentum": 0.2, "eps": 1e-4}),
    ("dropout", "aten.dropout.default", "dropout", "head.2", {"p": 0.4}),
]


def _site_rows(report: modeswap.ModeReport) -> list[tuple[Any, ...]]:
    return [(s.node, s.op, s.kind, s.module_path, dict(s.params)) for s in report.sites]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_report_of_an_export(mode: str) -> None:
    report = modeswap.mode_of(export(Net(), ARGS, mode))
    assert report.mode is Mode(mode)
    assert report.mixed is False
    assert _site_rows(report) == NET_SITES
    assert {s.mode for s in report.sites} == {Mode(mode)}
    assert report.stochastic == ()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_report_of_a_swapped_export(mode: str) -> None:
    swapped = modeswap.swap(export(Net(), ARGS, other(mode)), mode).module
    report = modeswap.mode_of(swapped)
    assert (report.mode, report.mixed) == (Mode(mode), False)
    assert _site_rows(report) == NET_SITES


def test_report_of_an_exported_program() -> None:
    program = torch.export.export(Net().train(), ARGS)
    report = modeswap.mode_of(program)
    assert report.mode is Mode.TRAIN
    assert [(s.node, s.kind, dict(s.params)) for s in report.sites] == [(n, k, p) for n, _, k, _, p in NET_SITES]


def test_mixed_model() -> None:
    model = Net().train()
    model.features[1].eval()
    report = modeswap.mode_of(torch.export.export(model, ARGS).module())
    assert report.mixed is True
    assert report.mode is None
    modes = {s.node: s.mode for s in report.sites}
    assert modes.pop("batch_norm") is Mode.EVAL
    assert set(modes.values()) == {Mode.TRAIN}


def test_model_without_sites() -> None:
    report = modeswap.mode_of(export(nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU()), ARGS, "train"))
    assert (report.mode, report.mixed, report.sites, report.stochastic) == (None, False, (), ())


def test_batchnorm_without_running_stats_is_no_site() -> None:
    model = nn.Sequential(nn.BatchNorm2d(2, track_running_stats=False), nn.InstanceNorm2d(2))
    report = modeswap.mode_of(export(model, ARGS, "train"))
    assert (report.mode, report.sites) == (None, ())


def test_attention_sites() -> None:
    model = nn.Sequential(nn.Flatten(2), Attention(0.3))
    (site,) = modeswap.mode_of(export(model, ARGS, "train")).sites
    assert (site.kind, site.mode) == ("attention", Mode.TRAIN)
    assert dict(site.params) == {"dropout_p": 0.3, "is_causal": False}
    # An eval export records nothing about training: dropout_p=0.0 computes what eval does, and tells no mode.
    report = modeswap.mode_of(export(model, ARGS, "eval"))
    assert (report.mode, report.mixed) == (None, False)
    (site,) = report.sites
    assert (site.kind, site.mode, site.module_path, site.known) == ("attention", Mode.EVAL, "1", False)
    assert dict(site.params) == {"dropout_p": 0.0, "is_causal": False}
    (site,) = modeswap.mode_of(modeswap.to_eval(export(model, ARGS, "train"))).sites
    assert (site.mode, site.params["dropout_p"], site.params["training_dropout_p"]) == (Mode.EVAL, 0.0, 0.3)


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` on a sequence, as a transformer calls it, then an ``nn.Dropout``."""

    def __init__(self, p: float, dropout: float | None = 0.1) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, dropout=p, batch_first=True)
        self.drop = nn.Identity() if dropout is None else nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.attention(x, x, x, need_weights=False)[0])  # type: ignore[no-any-return]


TOKENS = (torch.randn((2, 5, 8), generator=torch.Generator().manual_seed(1)),)

#: Attention as it is written: (the model, its input, the module path of each attention node, its training p).
ATTENTION = {
    "MultiheadAttention": (lambda: SelfAttention(0.2), TOKENS, ["attention"], 0.2),
    "functional": (lambda: nn.Sequential(nn.Flatten(2), Attention(0.2), nn.Dropout(0.1)), ARGS, ["1"], 0.2),
    "TransformerEncoderLayer": (
        lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True),
        TOKENS,
        ["self_attn"],
        0.2,
    ),
}


def _unknown_warning(gm: torch.fx.GraphModule) -> modeswap.UnknownTrainingValueWarning:
    with pytest.warns(modeswap.UnknownTrainingValueWarning) as caught:
        modeswap.to_train(gm)
    (warning,) = [w.message for w in caught if isinstance(w.message, modeswap.UnknownTrainingValueWarning)]
    return warning


@pytest.mark.parametrize("written", list(ATTENTION))
def test_an_eval_exports_attention_is_a_site_in_eval_mode_whose_training_value_is_unknown(written: str) -> None:
    make, args, paths, p = ATTENTION[written]
    torch.manual_seed(0)
    model = make()
    gm = export(model, args, "eval")
    report = modeswap.mode_of(gm)
    assert (report.mode, report.mixed) == (Mode.EVAL, False)  # the other sites tell it; attention agrees
    attention = [s for s in report.sites if s.kind == "attention"]
    assert len(attention) == len(
        gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default)
    )
    assert [(s.module_path, s.mode, s.known, s.params["dropout_p"]) for s in attention] == [
        (path, Mode.EVAL, False, 0.0) for path in paths
    ]
    assert not any(tells_mode(s) for s in attention)
    # to_train warns of the very sites mode_of shows unknown, and trains as eager once told the value.
    assert set(_unknown_warning(gm).groups.values()) == {tuple(s.module_path for s in report.sites if not s.known)}
    assert_mode_equivalent(model, args, "train", exported_in="eval", attention_dropout=p)
    # A train export's attention trains with its p, and is listed as before.
    trained = [s for s in modeswap.mode_of(export(model, args, "train")).sites if s.kind == "attention"]
    assert [(s.module_path, s.mode, s.known, s.params["dropout_p"]) for s in trained] == [
        (path, Mode.TRAIN, True, p) for path in paths
    ]


def test_a_bert_eval_export_lists_each_attention_node() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        attention_probs_dropout_prob=0.1,
        hidden_dropout_prob=0.1,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = transformers.BertModel(config)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids).last_hidden_state  # type: ignore[no-any-return]

    model, args = Bert(), (torch.randint(0, 64, (2, 8)),)
    gm = export(model, args, "eval")
    report = modeswap.mode_of(gm)
    assert (report.mode, report.mixed) == (Mode.EVAL, False)
    unknown = [(s.kind, s.module_path, s.mode) for s in report.sites if not s.known]
    assert unknown == [("attention", f"bert.encoder.layer.{i}.attention.self", Mode.EVAL) for i in range(2)]
    assert _unknown_warning(gm).groups == {"BertSelfAttention": tuple(path for _, path, _ in unknown)}
    assert_mode_equivalent(model, args, "train", exported_in="eval", attention_dropout=0.1)


def test_a_graph_of_attention_at_zero_alone_tells_no_mode() -> None:
    gm = export(SelfAttention(0.2, dropout=None), TOKENS, "eval")
    report = modeswap.mode_of(gm)
    assert (report.mode, report.mixed, [(s.kind, s.mode, s.known) for s in report.sites]) == (
        None,
        False,
        [("attention", Mode.EVAL, False)],
    )
    with pytest.warns(modeswap.UnknownTrainingValueWarning):  # the train variant's attention dropout
        modal = modeswap.allow_train_eval(gm)
    assert not modal.training  # a graph that tells no mode starts in eval


@pytest.mark.parametrize("frozen", [False, True], ids=["plain", "frozen batch norm"])
def test_attention_at_zero_in_a_train_export_leaves_the_mode_to_the_other_sites(frozen: bool) -> None:
    # Attention that trains at dropout_p=0.0 reads as eval; the graph's mode is its other sites'.
    torch.manual_seed(0)
    norm: nn.Module = PinnedMode(nn.BatchNorm2d(2), training=False) if frozen else nn.BatchNorm2d(2)
    model = nn.Sequential(nn.Conv2d(2, 2, 1), norm, nn.Flatten(2), Attention(0.0), nn.Dropout(0.2))
    gm = export(model, ARGS, "train")
    report = modeswap.mode_of(gm)
    assert (report.mode, report.mixed) == (None if frozen else Mode.TRAIN, frozen)
    (attention,) = [s for s in report.sites if s.kind == "attention"]
    # The graph reads as a train export, where 0.0 is the training value; mixed, it reads as nothing.
    assert (attention.mode, attention.known) == (Mode.EVAL, not frozen)
    # allow_train_eval counts the sites that tell a mode: it starts in train and runs as eager in both modes.
    modal = modeswap.allow_train_eval(gm, keep=["1"] if frozen else ())
    assert modal.training
    eager = copy.deepcopy(model)
    for mode in ("train", "eval", "train"):
        expected = run_forward_backward(eager.train(mode == "train"), ARGS, seed=2)
        assert_same_run(
            expected, run_forward_backward(modal.train(mode == "train"), ARGS, seed=2), atol=1e-6, rtol=1e-5
        )


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_stochastic_lists_stray_random_ops_only(mode: str) -> None:
    # Each dropout's output is read once: an eval export is unambiguous on every torch (see modeswap.table.aliases).
    model = nn.Sequential(Noise(), nn.Dropout(0.3), nn.Dropout2d(0.2), nn.RReLU())
    gm = export(model, ARGS, mode)
    random = {n.name for n in gm.graph.nodes if n.target in (aten.randn_like.default, aten.rand.default)}
    assert len(random) == 2
    target = other(mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        swapped = modeswap.swap(gm, target).module
    # Only an eval graph should be deterministic: one warning, naming each node and its module.
    assert [w.category for w in caught] == ([modeswap.NondeterministicEvalWarning] if target == "eval" else [])
    if target == "eval":
        assert all(f"{name} (" in str(caught[0].message) for name in random)
        assert "in module '0'" in str(caught[0].message)
    for graph in (gm, swapped):
        report = modeswap.mode_of(graph)
        assert set(report.stochastic) == random
        assert len(report.stochastic) == 2
        assert {s.kind for s in report.sites} == {"dropout", "rrelu"}
        assert not set(report.stochastic) & {s.node for s in report.sites}


@pytest.mark.parametrize(
    "make", [lambda: export(Net(), ARGS, "train"), lambda: modeswap.to_eval(export(Net(), ARGS, "train"))]
)
def test_mode_of_reads_only(make: Any) -> None:
    gm = make()
    before = Snapshot.of(gm)
    modeswap.mode_of(gm)
    assert Snapshot.of(gm) == before
