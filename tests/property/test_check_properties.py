"""Properties of ``check``: it leaves the model as it found it, and the options it suggests fix what options can.

Random models, in random mixes of modes, with random gradients already
accumulated; eager PyTorch is the oracle for what the advised swap computes.
``MODESWAP_PROFILE=ci`` runs the full counts (see tests/conftest.py).
"""

from __future__ import annotations

import warnings
from unittest import mock

import attrs
import torch
from hypothesis import given, strategies as st

import modeswap
import modeswap.eager.check
from modeswap import Mode
from modeswap.testing import Observed, assert_mode_equivalent, quiet
from modeswap.testing.strategies import EXACT_LAYERS, Case, build, cases, mode_calls

#: Layers whose export takes well under a second (recurrent ones take seconds).
QUICK = tuple(kind for kind in EXACT_LAYERS if kind != "rnn")

#: Layers with a training value an eval export may not record (attention), or a mode a module may pin.
ADVISED = ("linear", "conv", "batch_norm", "dropout", "attention", "instance_norm", "relu")


@given(case=cases(kinds=QUICK, max_layers=4), data=st.data())
def test_check_and_capture_leave_the_model_and_the_random_state_as_found(case: Case, data: st.DataObject) -> None:
    model = case.model
    for call in data.draw(mode_calls(model), label="modes"):
        call.apply(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if data.draw(st.booleans(), label=f"{name} has a gradient"):
                p.grad = torch.randn_like(p)
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    before = Observed.of(model)
    # The second opinion runs whatever the comparison vouches for: it is what could write into the model.
    with quiet(), mock.patch.object(modeswap.eager.check, "blind_spots", return_value=("every op",)):
        modeswap.check(model, case.args, seeds=(0,))
        modeswap.capture(model, case.args)
    assert before.changed(Observed.of(model)) == []


@st.composite
def advised_cases(draw: st.DrawFn) -> Case:
    """A model with pinned layers and attention layers of several training ``p``, which an eval export writes as 0.0."""
    case = draw(cases(kinds=ADVISED, max_layers=5, mixed=True))
    specs = tuple(
        attrs.evolve(
            s, options=tuple((k, draw(st.sampled_from((0.0, 0.1, 0.25))) if k == "p" else v) for k, v in s.options)
        )
        if s.kind == "attention"
        else s
        for s in case.layers
    )
    (x,) = case.args
    model = build(specs, dims=case.dims, channels=x.shape[1], width=x.shape[-1])
    return Case(model, case.args, specs, case.dims)


@given(case=advised_cases())
def test_the_suggested_options_fix_every_difference_an_option_fixes(case: Case) -> None:
    with quiet():  # check says what it finds in its report, and warns about nothing
        fidelity = modeswap.check(case.model, case.args, seeds=(0,))
        suggested = fidelity.suggested
        again = modeswap.check(case.model, case.args, seeds=(0,), **suggested)
    for before, after in zip(fidelity.directions, again.directions, strict=True):
        fixed = {path for d in before.differences if d.options for path in d.paths}
        assert not [d for d in after.differences if fixed & set(d.paths)], (fidelity, suggested, again)
        if all(d.options for d in before.differences):
            assert after.exact, (fidelity, suggested, again)
    # The swaps take the advice, and then compute what eager computes.
    options = {Mode.TRAIN: suggested, Mode.EVAL: {k: v for k, v in suggested.items() if k == "keep"}}
    for direction in fidelity.directions:
        if all(d.options for d in direction.differences):
            with warnings.catch_warnings():
                # A site whose training value equals what the graph holds (0.0) is no difference, yet warns.
                warnings.simplefilter("ignore", modeswap.ModeswapWarning)
                assert_mode_equivalent(
                    case.model, case.args, direction.target, exported_in=direction.source, **options[direction.target]
                )
