"""torchvision's Swin Transformer swapped both ways against eager PyTorch: the issue 12 case.

``shifted_window_attention`` calls ``F.dropout`` twice in one module, the
``ShiftedWindowAttention`` of each block: on the attention weights with
``p=attention_dropout`` and on the output projection with ``p=dropout``. Both are
literals, so an eval export records both values; in the issue's configuration
(attention dropout 0.1, dropout 0.0) each block's projection dropout holds p=0.0
outside an ``nn.Dropout``, which a graph cannot tell from a training value that
eager code zeroed in eval. ``to_train`` warns of those sites and suggests a
``dropout=`` mapping; the recorded attention dropouts (p=0.1) are no concern of
``attention_dropout=``, which speaks of ``scaled_dot_product_attention`` only.

The model is the vendored copy in ``torchvision_swin.py`` (the test environment
has no torchvision), and torchvision's own where it is installed;
``python -m tests.integration.check_vendored_swin`` shows the two are the same.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

import modeswap
from modeswap.testing import assert_mode_equivalent, assert_same_run, export, quiet, run_forward_backward

from . import torchvision_swin
from .check_vendored_swin import ALL_DROPOUTS, SMALL, Config, torchvision_swin_module


@pytest.fixture(params=["vendored", "torchvision"])
def swin(request: pytest.FixtureRequest) -> types.ModuleType:
    """The module that defines ``SwinTransformer``: the vendored copy, or torchvision's where installed."""
    if request.param == "vendored":
        return torchvision_swin
    try:
        return torchvision_swin_module()
    except ImportError:
        pytest.skip("torchvision is not installed")


def _attention_paths(model: torch.nn.Module) -> tuple[str, ...]:
    return tuple(path for path, m in model.named_modules() if type(m).__name__ == "ShiftedWindowAttention")


def _functional_dropouts(gm: torch.fx.GraphModule, p: float) -> list[modeswap.Site]:
    """The functional dropout sites of ``gm`` whose graph holds ``p``."""
    return [s for s in modeswap.mode_of(gm).sites if s.kind == "dropout" and s.functional and s.params["p"] == p]


def _unknown_warning(gm: torch.fx.GraphModule) -> modeswap.UnknownTrainingValueWarning:
    with pytest.warns(modeswap.UnknownTrainingValueWarning) as record:
        modeswap.to_train(gm)
    [warning] = [w.message for w in record if isinstance(w.message, modeswap.UnknownTrainingValueWarning)]
    return warning


def _from_config(warning: modeswap.UnknownTrainingValueWarning, config: Config) -> dict[str, float]:
    """The warning's suggested mapping with the training values filled in from the model's configuration.

    Every site it names is a projection dropout, whose training ``p`` is ``dropout``.
    """
    return dict.fromkeys(warning.suggestion, config.options["dropout"])


def test_the_issue_case_has_one_projection_dropout_at_zero_per_block(swin: types.ModuleType) -> None:
    model = SMALL.build(swin)
    gm = export(model, SMALL.inputs(), "eval")
    attention = _attention_paths(model)
    assert len(attention) == sum(SMALL.options["depths"]) == 4
    # Two functional dropouts in each attention module: the attention weights' (0.1) and the projection's (0.0).
    assert [s.module_path for s in _functional_dropouts(gm, 0.1)] == list(attention)
    assert [s.module_path for s in _functional_dropouts(gm, 0.0)] == list(attention)


def test_to_train_warns_of_the_projection_dropouts_and_trains_the_recorded_attention_dropouts(
    swin: types.ModuleType,
) -> None:
    """(a) The warning lists the p=0.0 projection dropouts; the recorded p=0.1 attention dropouts train as recorded."""
    model = SMALL.build(swin)
    gm = export(model, SMALL.inputs(), "eval")
    projections = [s.node for s in _functional_dropouts(gm, 0.0)]
    with pytest.warns(modeswap.UnknownTrainingValueWarning) as record:
        trained = modeswap.to_train(gm)
    [warning] = [w.message for w in record if isinstance(w.message, modeswap.UnknownTrainingValueWarning)]

    assert warning.groups == {"ShiftedWindowAttention": _attention_paths(model)}
    assert warning.suggestion
    assert set(warning.suggestion.values()) == {0.0}
    assert "dropout={" in str(warning)

    sites = modeswap.mode_of(trained).sites
    assert {s.mode for s in sites} == {modeswap.Mode.TRAIN}
    assert sorted(s.node for s in sites if not s.known) == sorted(projections)
    assert all(s.params["p"] == 0.0 for s in sites if not s.known)
    recorded = [s for s in sites if s.functional and s.known]
    assert [s.params["p"] for s in recorded] == [0.1] * len(_attention_paths(model))


def test_the_suggested_mapping_filled_from_the_config_trains_as_eager(swin: types.ModuleType) -> None:
    """(b) ``dropout=`` the suggestion, values from the config: quiet, and exactly eager train."""
    model = SMALL.build(swin)
    args = SMALL.inputs()
    gm = export(model, args, "eval")
    mapping = _from_config(_unknown_warning(gm), SMALL)
    with quiet():
        trained = modeswap.to_train(gm, dropout=mapping)
    sites = modeswap.mode_of(trained).sites
    assert sorted(s.params["p"] for s in sites if s.functional) == [0.0] * 4 + [0.1] * 4
    expected = run_forward_backward(copy.deepcopy(model).train(), args, seed=0)
    assert_same_run(expected, run_forward_backward(trained, args, seed=0), atol=0.0, rtol=0.0)


def test_attention_dropout_leaves_the_projection_dropouts_alone(swin: types.ModuleType) -> None:
    """(c) The issue's bug: ``attention_dropout=0.1`` made every projection dropout p=0.1 (off by 0.003 here).

    It now applies to attention nodes only, and Swin has none: the option is refused.
    """
    model = SMALL.build(swin)
    args = SMALL.inputs()
    gm = export(model, args, "eval")
    # Swin has no attention node (scaled_dot_product_attention): the option is refused, not spread.
    with pytest.raises(modeswap.InvalidOptionError, match=r"attention_dropout=0\.1 is for attention nodes"):
        modeswap.to_train(gm, attention_dropout=SMALL.options["attention_dropout"])
    with pytest.warns(modeswap.UnknownTrainingValueWarning):
        trained = modeswap.to_train(gm)
    sites = modeswap.mode_of(trained).sites
    assert [s.params["p"] for s in sites if s.functional] == [0.1, 0.0] * 4
    expected = run_forward_backward(copy.deepcopy(model).train(), args, seed=0)
    assert_same_run(expected, run_forward_backward(trained, args, seed=0), atol=0.0, rtol=0.0)


@pytest.mark.parametrize("config", [SMALL, ALL_DROPOUTS], ids=lambda config: config.name)
def test_a_train_export_swaps_to_eval_as_eager(swin: types.ModuleType, config: Config) -> None:
    """(d) Train export, ``to_eval``: exactly eager eval, quietly; and back to train, exactly eager train."""
    model = config.build(swin)
    args = config.inputs()
    with quiet():
        swapped = assert_mode_equivalent(model, args, "eval", atol=0.0, rtol=0.0)
        back = modeswap.to_train(swapped.module)
    assert modeswap.mode_of(swapped.module).stochastic == ()
    expected = run_forward_backward(copy.deepcopy(model).train(), args, seed=0)
    assert_same_run(expected, run_forward_backward(back, args, seed=0), atol=0.0, rtol=0.0)
