"""mode_of: the sites of a graph, the mode they agree on, and its stray random ops."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

import modeswap
from modeswap import Mode
from modeswap.testing import Snapshot, export, other
from modeswap.testing.models import Attention

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
    # An eval export records nothing about training: dropout_p=0.0 could be either mode.
    assert modeswap.mode_of(export(model, ARGS, "eval")).sites == ()
    (site,) = modeswap.mode_of(modeswap.to_eval(export(model, ARGS, "train"))).sites
    assert (site.mode, site.params["dropout_p"], site.params["training_dropout_p"]) == (Mode.EVAL, 0.0, 0.3)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_stochastic_lists_stray_random_ops_only(mode: str) -> None:
    # Each dropout's output is read once: an eval export is unambiguous on every torch (see modeswap.aliases).
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
