"""Drop path (stochastic depth) idioms: found, removed for eval, put back for train; checked against eager."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import modeswap
from modeswap import Mode
from modeswap.testing import assert_runs_as, call_signature, export
from modeswap.testing.strategies import DropPath

IDIOM_NAMES = {
    "transformers": "rand-floor",
    "timm": "new_empty-bernoulli",
    "timm-unscaled": "new_empty-bernoulli-unscaled",
    "torchvision": "empty-bernoulli",
}


class Block(nn.Module):
    """A residual block with a drop path, as ConvNeXt, Swin and ViTs write it."""

    def __init__(self, idiom: str, p: float = 0.3) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop_path = DropPath(p, idiom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fc(x))


def random_ops(gm: torch.fx.GraphModule) -> list[str]:
    seeded = torch.Tag.nondeterministic_seeded
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and seeded in n.target.tags]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("idiom", IDIOM_NAMES)
def test_drop_path_goes_to_eval_and_back_exactly(idiom: str, dynamic: bool) -> None:
    torch.manual_seed(0)
    model, x = Block(idiom), torch.randn(6, 3, 4)
    shapes = {"x": {0: torch.export.Dim("batch", min=2, max=16)}} if dynamic else None
    gm = export(model, (x,), Mode.TRAIN, dynamic_shapes=shapes)
    (site,) = modeswap.mode_of(gm).sites
    assert (site.kind, site.mode, site.module_path) == ("drop_path", Mode.TRAIN, "drop_path")
    assert dict(site.params) == {"keep": 0.7, "idiom": IDIOM_NAMES[idiom]}
    assert modeswap.mode_of(gm).stochastic == ()

    swapped = modeswap.swap(gm, "eval")
    evaluated = swapped.module
    assert [(c.field, c.before, c.after) for c in swapped.changes] == [("drop_path", IDIOM_NAMES[idiom], "identity")]
    assert random_ops(evaluated) == []
    assert modeswap.mode_of(evaluated).mode is Mode.EVAL
    assert_runs_as(model.eval(), evaluated, (x,))

    trainable = modeswap.to_train(evaluated)
    assert modeswap.mode_of(trainable).sites == modeswap.mode_of(gm).sites
    assert_runs_as(model.train(), trainable, (x,), seed=3)
    if dynamic:
        other = torch.randn(11, 3, 4)
        assert_runs_as(model.train(), trainable, (other,), seed=4)
        assert_runs_as(model.eval(), evaluated, (other,))
    else:
        assert call_signature(trainable) == call_signature(gm)


def test_an_exported_program_keeps_the_removed_ops_through_save_and_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = Block("transformers"), torch.randn(6, 3, 4)
    ep = torch.export.export(copy.deepcopy(model).train(), (x,))
    path = tmp_path / "eval.pt2"
    torch.export.save(modeswap.to_eval(ep), path)
    loaded = torch.export.load(path)
    assert random_ops(loaded.module()) == []
    trainable = modeswap.to_train(loaded)
    assert_runs_as(model.train(), trainable.module(), (x,), seed=5)


class Chain(nn.Module):
    """Drop paths back to back, and one module called twice (DINOv2 does both)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = DropPath(0.2, "timm")
        self.second = DropPath(0.5, "transformers")
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.second(self.first(x))
        return y + self.second(self.fc(y))


def test_drop_paths_on_each_others_outputs_and_shared_modules() -> None:
    torch.manual_seed(0)
    model, x = Chain(), torch.randn(5, 4)
    gm = export(model, (x,), Mode.TRAIN)
    assert [s.params["keep"] for s in modeswap.mode_of(gm).sites] == [0.8, 0.5, 0.5]
    evaluated = modeswap.to_eval(gm)
    assert random_ops(evaluated) == []
    assert_runs_as(model.eval(), evaluated, (x,))
    trainable = modeswap.to_train(evaluated)
    assert call_signature(trainable) == call_signature(gm)
    assert_runs_as(model.train(), trainable, (x,), seed=1)


class Noise(nn.Module):
    """Random ops that are not a drop path: a noise layer, and a mask that is also read elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noisy = x * (1 + 0.1 * torch.randn_like(x))
        mask = x.new_empty((x.shape[0], 1)).bernoulli_(0.5)
        return noisy * mask.div_(0.5) + mask


def test_random_ops_that_match_no_idiom_stay_and_are_reported() -> None:
    x = torch.randn(3, 4)
    gm = export(Noise(), (x,), Mode.TRAIN)
    report = modeswap.mode_of(gm)
    assert report.sites == ()
    assert sorted(report.stochastic) == ["bernoulli_", "randn_like"]
    with pytest.warns(modeswap.NondeterministicEvalWarning, match=r"2 node\(s\).*randn_like.*bernoulli_") as caught:
        evaluated = modeswap.to_eval(gm)
    assert len(caught) == 1  # one warning per swap, not per node
    assert sorted(modeswap.mode_of(evaluated).stochastic) == ["bernoulli_", "randn_like"]
    assert call_signature(evaluated) == call_signature(gm)


def test_an_eval_export_has_no_drop_path_to_bring_back() -> None:
    torch.manual_seed(0)
    model, x = Block("timm"), torch.randn(6, 3, 4)
    gm = export(model, (x,), Mode.EVAL)
    assert modeswap.mode_of(gm).sites == ()
    assert modeswap.swap(gm, "train").changes == ()


@pytest.mark.parametrize("idiom", IDIOM_NAMES)
def test_keep_one_half_is_matched_although_export_drops_it(idiom: str) -> None:
    # Shrunk by hypothesis: bernoulli_(mask, 0.5) exports as bernoulli_(mask), 0.5 being p's default.
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv1d(1, 1, 1), DropPath(0.5, idiom)), torch.randn(2, 1, 2)
    gm = export(model, (x,), Mode.TRAIN)
    assert [(s.kind, s.params["keep"]) for s in modeswap.mode_of(gm).sites] == [("drop_path", 0.5)]
    evaluated = modeswap.to_eval(gm)
    assert_runs_as(model.eval(), evaluated, (x,))
    assert_runs_as(model.train(), modeswap.to_train(evaluated), (x,), seed=1)
