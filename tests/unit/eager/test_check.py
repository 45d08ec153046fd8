"""``check`` leaves the model alone, validates what it is given, and its advice is something a swap takes.

Each test holds ``check`` (and ``capture``, where the promise is theirs
together) against eager PyTorch: the model's own state before and after, or
the eager model trained the way the advice says the swap now trains.
"""

from __future__ import annotations

import copy
import doctest
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeswap
import modeswap.eager.running
from modeswap import Cause, InvalidOptionError, Mode, Options
from modeswap.eager.compare import blind_spots
from modeswap.testing import Observed, assert_mode_equivalent, export, quiet
from modeswap.testing.models import TrainOnlyHead

X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))


class Attention(nn.Module):
    """timm's ViT attention: ``scaled_dot_product_attention`` with the training ``p`` of a dropout child it never calls,
    beside a projection dropout of its own."""

    def __init__(self, p: float, proj: float = 0.0) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.attn_drop = nn.Dropout(p)
        self.proj_drop = nn.Dropout(proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        p = self.attn_drop.p if self.training else 0.0
        return self.proj_drop(F.scaled_dot_product_attention(q, k, v, dropout_p=p))


class Block(nn.Module):
    def __init__(self, p: float, proj: float = 0.0) -> None:
        super().__init__()
        self.attn = Attention(p, proj)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.attn(x))


class ViT(nn.Module):
    def __init__(self, ps: list[float], proj: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(p, proj) for p in ps])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class RootDropout(nn.Module):
    """A dropout the root's own forward pins to train mode, and a batch norm that follows the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.dropout(self.fc(x), 0.5, training=True))


class Embedded(nn.Module):
    """An embedding that renormalises its weight in place on every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8, max_norm=1.0)
        self.drop = nn.Dropout(0.2)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.bn(self.drop(self.embed(tokens)))


TOKENS = (torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]),)


def _with_grads(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.randn_like(p)
    return model


# 1. Pure.


@pytest.mark.parametrize("run", ["check", "capture"])
@pytest.mark.parametrize(
    ("name", "build", "args"),
    [
        ("max-norm embedding", Embedded, TOKENS),
        ("batch norm and dropout", lambda: nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(5), nn.Dropout(0.3)), (X,)),
        ("prior gradients", lambda: _with_grads(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(5))), (X,)),
        ("root dropout", RootDropout, (X,)),
    ],
)
def test_the_model_and_the_random_state_are_left_as_found(
    run: str, name: str, build: type, args: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second opinion runs here whatever the comparison vouches for: it is what could write into the model.
    monkeypatch.setattr(modeswap.eager.check, "blind_spots", lambda gm: ("every op",))
    model = build()
    model.train()
    model.get_submodule(next(path for path, _ in model.named_children())).eval()  # modes mixed, as users leave them
    handle = model.register_forward_hook(lambda module, inputs, output: None)
    torch.manual_seed(1234)
    before = Observed.of(model)
    with quiet():
        getattr(modeswap, run)(model, args)
    assert before.changed(Observed.of(model)) == [], name
    handle.remove()


def test_the_random_stream_goes_on_as_if_check_had_not_run() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
    torch.manual_seed(7)
    modeswap.check(model, (X,))
    after_check = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), after_check)


# 2. Advice the swap accepts.


def test_attention_of_one_value_is_one_row_and_one_option() -> None:
    model = ViT([0.1] * 4)
    fidelity = modeswap.check(model, (X,))
    (row,) = fidelity.to_train.differences
    assert row.module_path == "blocks.*.attn"
    assert row.paths == tuple(f"blocks.{i}.attn" for i in range(4))
    assert row.cause is Cause.ATTENTION_DROPOUT_UNKNOWN
    assert fidelity.suggested == {"attention_dropout": 0.1}
    _assert_advice_works(model, fidelity)


@pytest.mark.parametrize("proj", [0.0, 0.3])
def test_a_pattern_never_contradicts_the_projection_dropout_beside_the_attention(proj: float) -> None:
    # timm's ViT: the attention's module holds a projection dropout whose p the graph records (0.0 or 0.3);
    # a pattern for the attention reaches it, so the advice states it at its own value.
    model = ViT([0.1, 0.1, 0.2, 0.2], proj)
    fidelity = modeswap.check(model, (X,))
    dropout = fidelity.suggested["dropout"]
    assert all(
        dropout[f"blocks.{i}.attn"] == p for i, p in enumerate([0.1, 0.1, 0.2, 0.2]) if f"blocks.{i}.attn" in dropout
    )
    _assert_advice_works(model, fidelity)
    with pytest.raises(InvalidOptionError, match="contradicts the graph"):
        modeswap.check(model, (X,), dropout={"blocks.0.attn": 0.1})  # what the advice said before


def _assert_advice_works(model: nn.Module, fidelity: modeswap.Fidelity) -> None:
    """``check`` and ``to_train`` take the advice, and the eval export's swap then trains like eager."""
    assert modeswap.check(model, (X,), **fidelity.suggested).exact
    with warnings.catch_warnings():
        warnings.simplefilter("error", modeswap.ModeswapWarning)  # nothing left unknown
        assert_mode_equivalent(copy.deepcopy(model), (X,), Mode.TRAIN, exported_in=Mode.EVAL, **fidelity.suggested)


def test_each_row_carries_the_options_that_fix_it() -> None:
    fidelity = modeswap.check(ViT([0.1, 0.2]), (X,))
    rows = fidelity.to_train.differences
    assert len(rows) == 2
    for row in rows:
        assert row.options, row
        assert f"`{row.options}`" in row.fix
    assert Options.merged(row.options for row in rows).kwargs() == fidelity.suggested


def test_a_train_only_head_is_one_row() -> None:
    # GoogLeNet's auxiliary head: ops of its own and of its children, one row per direction.
    model = TrainOnlyHead(8)
    # Layers of its own, with an eval dropout between two of them that the comparison reads through.
    model.head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(5), nn.Dropout(0.2), nn.Linear(8, 3))
    fidelity = modeswap.check(nn.Sequential(nn.Linear(8, 8), model), (X,))
    for direction in fidelity.directions:
        heads = [row for row in direction.differences if row.module_path.startswith("1")]
        assert len(heads) == 1, direction
        assert heads[0].cause is Cause.TRAINING_BRANCH
        assert not heads[0].options


def test_frozen_batch_norms_in_numbered_blocks_are_one_row_with_one_pattern() -> None:
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(5)) for _ in range(3)], nn.Dropout(0.2))
    model.train()
    for block in list(model)[:3]:
        block[1].eval()
    fidelity = modeswap.check(model, (X,))
    assert fidelity.mixed == ("0.1", "1.1", "2.1")
    (row,) = fidelity.to_train.differences
    assert (row.module_path, row.cause, row.paths) == ("*.1", Cause.PINNED, ("0.1", "1.1", "2.1"))
    assert fidelity.suggested == {"keep": ("*.1",)}
    assert fidelity.to_eval.exact
    assert modeswap.check(model, (X,), **fidelity.suggested).exact
    assert [m.training for m in model.modules()] == [True, *[True, True, False] * 3, True]  # as found


def test_a_keep_pattern_that_would_reach_a_site_that_must_change_is_not_suggested() -> None:
    fidelity = modeswap.check(RootDropout(), (X,))
    (row,) = fidelity.to_eval.differences
    assert (row.module_path, row.cause) == ("", Cause.PINNED)  # a pinned dropout, not a training branch
    assert not row.options  # keep=("",) would keep the batch norm too
    assert "no `keep=` pattern" in row.fix
    assert fidelity.suggested == {}


class EvalOnlyDropout(nn.Module):
    """A dropout held in train mode that only eval runs: the train export has nothing for keep= to hold."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.training else F.dropout(x, 0.5, training=True)


def test_a_keep_that_would_not_fix_the_swap_is_not_suggested() -> None:
    model = nn.Sequential(nn.Linear(8, 8), EvalOnlyDropout(), nn.BatchNorm1d(5))
    fidelity = modeswap.check(model, (X,))
    (row,) = fidelity.to_eval.differences
    assert row.paths == ("1",)
    assert not row.options, row  # keep=("1",) leaves the swap without the dropout the eval export runs
    assert "still differs" in row.fix
    assert not modeswap.check(model, (X,), keep=("1",)).to_eval.exact  # as said


def test_a_row_the_users_own_keep_makes_says_so_and_suggests_nothing() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3), nn.BatchNorm1d(5))
    assert modeswap.check(model, (X,)).exact
    fidelity = modeswap.check(model, (X,), keep=("1",))
    for direction in fidelity.directions:
        (row,) = direction.differences
        assert (row.module_path, row.options) == ("1", Options())
        assert row.fix.startswith("the `keep=` given holds it"), row
    assert fidelity.suggested == {}


def test_monte_carlo_dropout_is_reported_as_mixed_with_the_keep_that_pins_it() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3), nn.BatchNorm1d(5)).eval()
    model[1].train()
    fidelity = modeswap.check(model, (X,))
    assert fidelity.mixed == ("1",)
    assert fidelity.to_train.exact
    (row,) = fidelity.to_eval.differences
    assert (row.module_path, row.cause, row.options) == ("1", Cause.PINNED, Options(keep=("1",)))
    assert "in the other mode than the model" in str(fidelity)
    assert modeswap.check(model, (X,), **fidelity.suggested).exact


def test_the_report_fits_the_width_without_breaking_a_path_or_a_piece_of_code() -> None:
    fidelity = modeswap.check(ViT([0.1, 0.1, 0.2, 0.2], 0.3), (X,))
    code = f"`{Options(dropout=tuple(fidelity.suggested['dropout'].items()))}`"
    for width in (40, 60, 100, 200):
        text = fidelity.format(width=width)
        lines = text.splitlines()
        assert all(len(line) <= width or "`" in line for line in lines), width  # only code overflows
        assert code in text, width  # in one piece
        assert "blocks.*.attn" in text
    assert str(fidelity) == fidelity.format(width=100)  # not a terminal: 100


class PositionDropout(nn.Module):
    """timm's ViT: a position dropout of p=0.0, which returns its input in either mode, read twice after it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.mlp = nn.Linear(8, 8), nn.Linear(8, 8)
        self.pos_drop = nn.Dropout(0.0)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.fc(x))
        return self.drop(x + self.mlp(x))  # a dropout of p>0 beside x would be ambiguous where export aliases it


@pytest.mark.parametrize("keep", [(), ("pos_drop",)])
def test_a_dropout_of_p_0_does_the_same_in_both_modes(keep: tuple[str, ...]) -> None:
    # Its eval node returns its input, read twice after it; at p=0.0 the train node does as well: no refusal.
    fidelity = modeswap.check(PositionDropout(), (X,), keep=keep)
    assert fidelity.exact, fidelity  # no row for a dropout that does nothing in either mode
    with warnings.catch_warnings():
        warnings.simplefilter("error", modeswap.ModeswapWarning)
        assert_mode_equivalent(PositionDropout(), (X,), Mode.TRAIN, exported_in=Mode.EVAL, keep=keep)


# 4. Cost: the second opinion runs where the comparison cannot vouch for the values.


class WritesThroughAnAlias(nn.Module):
    """Writes in place a tensor that an alias returned as it is: the comparison reads through it, only a run tells."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        z = torch.ops.aten.alias(y)  # an eval dropout returns its input so too
        y.mul_(2)
        return self.drop(z + y)


@pytest.mark.parametrize(
    ("build", "runs"),
    [
        # VGG's classifier: in-place ReLUs before the dropouts write nothing an eval dropout returned.
        (lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(8, 8)), 0),
        (WritesThroughAnAlias, 2 * 2),  # both directions, each graph under one seed: they draw alike
    ],
    ids=["vouched", "written-through-an-alias"],
)
def test_the_second_opinion_runs_only_where_the_comparison_cannot_vouch(
    build: type, runs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = modeswap.eager.running.run_forward_backward
    monkeypatch.setattr(
        modeswap.eager.running, "run_forward_backward", lambda *a, **k: calls.append(k["seed"]) or real(*a, **k)
    )
    model = build()
    assert modeswap.check(model, (X,)).exact
    assert len(calls) == runs
    before = {node for mode in Mode for node in blind_spots(export(model, (X,), mode))}
    assert bool(before) is bool(runs)


# 3. Errors and inputs.


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"dropout": {"nomatch": 0.1}}, "dropout pattern 'nomatch' matches no dropout or attention site"),
        ({"keep": ("nomatch",)}, "keep pattern 'nomatch' matches no site"),
        ({"seeds": 5}, r"seeds takes a sequence of ints.*seeds=\(5,\)"),
        ({"seeds": "01"}, "seeds takes a sequence of ints"),
        ({"seeds": (0, 1.5)}, "seeds takes a sequence of ints"),
        ({"keep": "1"}, r"write keep=\('1',\)"),
        ({"dropout": 0.1}, "dropout takes a mapping"),
        ({"attention_dropout": 2.0}, "attention_dropout"),
    ],
)
def test_bad_options_raise_before_anything_is_reported(options: dict, match: str) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3))
    before = Observed.of(model)
    with pytest.raises(InvalidOptionError, match=match):
        modeswap.check(model, (X,), **options)
    assert before.changed(Observed.of(model)) == []


def test_a_backward_that_eager_itself_cannot_run_is_said_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Dropout(inplace=True))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model.train()(torch.randn(4, 8)).sum().backward()  # eager's own backward fails
    assert modeswap.check(model, (torch.randn(4, 8),)).exact  # the comparison vouches: nothing runs
    monkeypatch.setattr(modeswap.eager.check, "blind_spots", lambda gm: ("every op",))  # where it could not
    fidelity = modeswap.check(model, (torch.randn(4, 8),))
    assert fidelity.exact  # the graphs and the forwards agree
    assert fidelity.to_train.unrun.startswith("backward: RuntimeError: one of the variables needed")
    assert "not run: backward: RuntimeError" in str(fidelity)
    assert '"unrun": "backward: RuntimeError' in fidelity.to_json()


def test_bad_seeds_are_refused_before_exporting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: pytest.fail("exported"))
    with pytest.raises(InvalidOptionError):
        modeswap.check(nn.Linear(8, 8), (X,), seeds=5)


@pytest.mark.parametrize("function", [modeswap.check, modeswap.Fidelity], ids=["check", "Fidelity"])
def test_the_docstring_examples_run_as_written(function: object) -> None:
    (test,) = doctest.DocTestFinder(recurse=False).find(
        function, globs={"modeswap": modeswap, "torch": torch, "nn": nn}
    )
    assert test.examples
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    assert runner.run(test, out=lambda text: pytest.fail(text)).failed == 0


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of one rank, this process, for the test's length."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.usefixtures("one_rank")
@pytest.mark.parametrize("wrapper", ["DistributedDataParallel", "fully_shard"])
def test_capture_and_check_take_the_model_before_a_distributed_wrapper(wrapper: str) -> None:
    # torch.export fails inside either wrapper with an error about its internals; say what to do instead.
    from torch.distributed.fsdp import fully_shard

    wrap = {"DistributedDataParallel": nn.parallel.DistributedDataParallel, "fully_shard": fully_shard}[wrapper]
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout())
    wrapped = wrap(copy.deepcopy(model))
    for call in (modeswap.capture, modeswap.check):
        with pytest.raises(modeswap.InvalidOptionError, match=rf"then wrap the modal module .*: {wrapper}\(modeswap"):
            call(wrapped, (torch.randn(2, 3),))
    modal = wrap(modeswap.capture(model, (torch.randn(2, 3),)))  # what it says works
    assert modal(torch.randn(2, 3)).shape == (2, 3)
