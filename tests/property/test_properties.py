"""Properties of swaps on random models of every site kind, with eager PyTorch as the oracle.

Each example exports its model once and checks what it can on that export.
``MODESWAP_PROFILE=ci`` runs the full counts (see tests/conftest.py).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import modeswap
from modeswap import Mode
from modeswap.fx.graphs import module_path
from modeswap.rewrite.report import tells_mode
from modeswap.table.rules import RULES, Sentinel, rule_for
from modeswap.testing import Case, Snapshot, assert_same_run, call_signature, cases, other, run_forward_backward

#: The kinds of site whose training value the rule fixes: the ones that tell the mode a graph was captured in.
FIXED_KINDS = frozenset(rule.kind for rule in RULES if rule.train is not Sentinel.PER_NODE)

#: The equivalence property runs four times as many examples as the others (400 in ci).
EQUIVALENCE = settings(max_examples=4 * settings.default.max_examples)

modes = st.sampled_from(Mode)


def export(case: Case, mode: Mode) -> torch.fx.GraphModule:
    return modeswap.testing.export(case.model, case.args, mode)


def graph_in(case: Case, mode: Mode) -> torch.fx.GraphModule:
    """A graph of ``case`` in ``mode`` to swap away from: an export, except for an eval graph with a drop path.

    An eval export never ran its drop paths, so nothing can train them again
    (docs/limitations.md); the eval graph of such a model is ``to_eval`` of a train export.
    """
    if mode is Mode.EVAL and case.drop_path:
        return modeswap.to_eval(export(case, Mode.TRAIN))
    return export(case, mode)


def eager(case: Case, mode: Mode) -> torch.nn.Module:
    return copy.deepcopy(case.model).train(mode is Mode.TRAIN)


def attention_dropout(case: Case, target: Mode) -> float | None:
    return case.attention_dropout if target is Mode.TRAIN else None


@EQUIVALENCE
@given(case=cases(), target=modes, seed=st.integers(0, 1000))
def test_swap_behaves_as_eager_in_the_target_mode(case: Case, target: Mode, seed: int) -> None:
    gm = graph_in(case, other(target))
    before = Snapshot.of(gm)
    swapped = modeswap.swap(gm, target, attention_dropout=attention_dropout(case, target))
    expected = run_forward_backward(eager(case, target), case.args, seed=seed)
    actual = run_forward_backward(swapped.module, case.args, seed=seed)
    assert_same_run(expected, actual, atol=1e-6, rtol=1e-5)
    assert Snapshot.of(gm) == before


@given(case=cases(), target=modes, share_weights=st.booleans())
def test_swap_never_touches_its_input(case: Case, target: Mode, share_weights: bool) -> None:
    gm = export(case, other(target))
    before = Snapshot.of(gm)
    swapped = modeswap.swap(gm, target, share_weights=share_weights, attention_dropout=attention_dropout(case, target))
    if not share_weights:
        run_forward_backward(swapped.module, case.args, seed=0)  # running the copy must not reach the input either
        assert Snapshot.of(gm) == before
    else:
        assert Snapshot.of(gm).nodes == before.nodes
        assert Snapshot.of(gm).meta == before.meta
    old = {name: t.data_ptr() for name, t in gm.state_dict(keep_vars=True).items()}
    new = {name: t.data_ptr() for name, t in swapped.module.state_dict(keep_vars=True).items()}
    assert old.keys() == new.keys()
    if share_weights:
        assert old == new
    else:
        assert not set(old.values()) & set(new.values())


def values(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_equal_values(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def train_step(module: torch.nn.Module, args: tuple[torch.Tensor, ...], seed: int) -> None:
    """A forward (buffers update in train mode), a backward, and an SGD step, all in place."""
    parameters = list(module.parameters())
    run_forward_backward(module, args, seed=seed)
    if parameters:
        torch.optim.SGD(parameters, lr=0.1).step()


@given(case=cases(), target=modes, seed=st.integers(0, 1000), result_first=st.booleans())
def test_a_copy_on_write_swap_computes_what_the_default_swap_computes_and_keeps_the_sides_apart(
    case: Case, target: Mode, seed: int, result_first: bool
) -> None:
    gm = graph_in(case, other(target))
    twin = modeswap.swap(gm, other(target)).module  # a plain clone of the input: what it must go on computing
    before = values(gm)
    options = {"attention_dropout": attention_dropout(case, target)}
    default = modeswap.swap(gm, target, **options)
    lazy = modeswap.swap(gm, target, copy_on_write=True, **options)
    assert lazy.changes == default.changes
    expected = run_forward_backward(default.module, case.args, seed=seed)
    assert_same_run(expected, run_forward_backward(lazy.module, case.args, seed=seed), atol=0, rtol=0)
    assert_equal_values(values(gm), before)
    # Training steps on the result and on the input, in either order, as on two plain clones.
    pairs = [(lazy.module, default.module), (gm, twin)]
    (first, first_twin), (second, second_twin) = pairs if result_first else pairs[::-1]
    untouched = values(second)
    for step in range(2):
        train_step(first, case.args, seed + step)
        train_step(first_twin, case.args, seed + step)
    assert_equal_values(values(first), values(first_twin))
    assert_equal_values(values(second), untouched)
    trained = values(first)
    train_step(second, case.args, seed)
    train_step(second_twin, case.args, seed)
    assert_equal_values(values(second), values(second_twin))
    assert_equal_values(values(first), trained)


@given(case=cases(), source=modes)
def test_round_trip_gives_back_the_exported_graph(case: Case, source: Mode) -> None:
    gm = export(case, source)
    away = modeswap.swap(gm, other(source), attention_dropout=attention_dropout(case, other(source))).module
    back = modeswap.swap(away, source, attention_dropout=attention_dropout(case, source)).module
    assert call_signature(back) == call_signature(gm)
    expected = run_forward_backward(eager(case, source), case.args, seed=7)
    assert_same_run(expected, run_forward_backward(back, case.args, seed=7), atol=1e-6, rtol=1e-5)


@given(case=cases(), source=modes)
def test_swapping_to_the_mode_a_graph_is_in_changes_nothing(case: Case, source: Mode) -> None:
    gm = export(case, source)
    again = modeswap.swap(gm, source, attention_dropout=attention_dropout(case, source))
    assert again.changes == ()
    assert call_signature(again.module) == call_signature(gm)
    once = modeswap.swap(gm, other(source), attention_dropout=attention_dropout(case, other(source))).module
    twice = modeswap.swap(once, other(source))
    assert twice.changes == ()
    assert call_signature(twice.module) == call_signature(once)


@given(case=cases(mixed=True), source=modes)
def test_mode_of_agrees_with_the_eager_modules(case: Case, source: Mode) -> None:
    model = eager(case, source)
    gm = torch.export.export(model, case.args).module()
    report = modeswap.mode_of(gm)
    for site in report.sites:
        module = model.get_submodule(site.module_path)
        assert site.mode is (Mode.TRAIN if module.training else Mode.EVAL), site
    # Every site is listed; attention at dropout_p=0.0 in eval mode, though it tells no mode of the graph.
    expected_sites = [name for name, module in model.named_modules(remove_duplicate=False) if _is_site(module)]
    assert sorted(s.module_path for s in report.sites) == sorted(expected_sites)
    modes_seen = {s.mode for s in report.sites if tells_mode(s)}
    assert report.mixed is (len(modes_seen) > 1)
    assert report.mode is (next(iter(modes_seen)) if len(modes_seen) == 1 else None)
    assert report.stochastic == ()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", modeswap.ModeswapWarning)
        evaluated = modeswap.to_eval(gm)
    assert {s.mode for s in modeswap.mode_of(evaluated).sites} <= {Mode.EVAL}
    # A mixed graph whose train sites are not the majority: the swap changes its minority, and says so.
    fixed = [s for s in report.sites if s.kind in FIXED_KINDS]  # the sites whose mode their rule fixes
    trained = [s.module_path for s in fixed if s.mode is Mode.TRAIN]
    said = [w.message for w in caught if isinstance(w.message, modeswap.MixedModeWarning)]
    if trained and len(trained) <= len(fixed) - len(trained):
        assert [set(w.keep) for w in said] == [set(trained)]
    else:
        assert said == []
    assert modeswap.mode_of(evaluated).stochastic == ()


@given(case=cases(kinds=("skip", "linear", "relu", "dropout")), seed=st.integers(0, 1000))
def test_an_ambiguous_eval_graph_is_refused_and_a_train_export_goes_both_ways(case: Case, seed: int) -> None:
    eval_export = export(case, Mode.EVAL)
    if case.aliasing:
        with pytest.raises(modeswap.UnsupportedGraphError, match="Export the model in train mode"):
            modeswap.to_train(eval_export)
    else:
        trained = modeswap.to_train(eval_export)
        expected = run_forward_backward(eager(case, Mode.TRAIN), case.args, seed=seed)
        assert_same_run(expected, run_forward_backward(trained, case.args, seed=seed), atol=1e-6, rtol=1e-5)
    evaluated = modeswap.to_eval(export(case, Mode.TRAIN))
    expected = run_forward_backward(eager(case, Mode.EVAL), case.args, seed=seed)
    assert_same_run(expected, run_forward_backward(evaluated, case.args, seed=seed), atol=1e-6, rtol=1e-5)
    trained = modeswap.to_train(evaluated)  # the memo of to_eval settles what the eval export could not
    expected = run_forward_backward(eager(case, Mode.TRAIN), case.args, seed=seed)
    assert_same_run(expected, run_forward_backward(trained, case.args, seed=seed), atol=1e-6, rtol=1e-5)


@given(case=cases(mixed=True), source=modes, seed=st.integers(0, 1000))
def test_layers_a_swap_keeps_stay_in_the_mode_eager_pins_them_to(case: Case, source: Mode, seed: int) -> None:
    """Layers pinned to one mode (a norm_eval batch norm, Monte Carlo dropout), named in keep=: eager is the oracle."""
    target = other(source)
    via_train = source is Mode.EVAL and case.drop_path  # an eval export never ran its drop paths
    exported = export(case, Mode.TRAIN if via_train else source)
    pinned = {str(i) for i, layer in enumerate(case.layers) if layer.mode is not None}
    # Every site counts: attention at dropout_p=0.0 too, which mode_of cannot place in a mode.
    rules = {module_path(n) for n in exported.graph.nodes if (rule := rule_for(n)) is not None and rule.applies(n)}
    idioms = {site.module_path for site in modeswap.mode_of(exported).sites}
    with_sites = {path.partition(".")[0] for path in rules | idioms}
    keep = sorted(pinned & with_sites)
    gm = modeswap.to_eval(exported, keep=keep) if via_train else exported
    # attention_dropout= that keep= leaves no attention node to decide is refused: state it only for one.
    free = any(layer.kind == "attention" and str(i) not in keep for i, layer in enumerate(case.layers))
    stated = attention_dropout(case, target) if free else None
    swapped = modeswap.swap(gm, target, keep=keep, attention_dropout=stated)
    expected = run_forward_backward(eager(case, target), case.args, seed=seed)
    assert_same_run(expected, run_forward_backward(swapped.module, case.args, seed=seed), atol=1e-6, rtol=1e-5)
    kept = [site for site in modeswap.mode_of(swapped.module).sites if site.kept]
    assert {site.module_path.partition(".")[0] for site in kept} <= set(keep)
    assert not {change.node for change in swapped.changes} & {site.node for site in kept}


def _is_site(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm | torch.nn.modules.instancenorm._InstanceNorm):
        return module.track_running_stats
    if isinstance(module, modeswap.testing.strategies.DropPath):
        return module.training  # an eval export never ran it
    return isinstance(
        module,
        torch.nn.modules.dropout._DropoutNd | torch.nn.RReLU | torch.nn.RNNBase | modeswap.testing.strategies.Attention,
    )
