"""allow_train_eval driven in lockstep with the eager model by a hypothesis state machine.

Random models from modeswap.testing, exported in a random mode; random sequences
of train(), eval(), forwards, optimizer steps and state_dict reloads. After every
step the two must agree on outputs, parameters, buffers and their mode.
"""

from __future__ import annotations

import copy

import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import modeswap
from modeswap import Mode
from modeswap.testing import Case, cases

TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}  # a few optimizer steps compound rounding


def has_parameters(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters())


class LockstepMachine(RuleBasedStateMachine):
    """An eager model and the allow_train_eval module of its export, given the same calls."""

    def __init__(self) -> None:
        super().__init__()
        self.eager: torch.nn.Module | None = None
        self.modal: torch.nn.Module | None = None

    @rule(case=cases(max_layers=4), exported_in=st.sampled_from(Mode))
    @precondition(lambda self: self.eager is None)
    def build(self, case: Case, exported_in: Mode) -> None:
        self.eager = copy.deepcopy(case.model).train(exported_in is Mode.TRAIN)
        # An eval export never runs drop paths, so nothing could train them again: such a model's
        # eval graph is to_eval of a train export.
        captured_in = Mode.TRAIN if case.drop_path else exported_in
        gm = torch.export.export(copy.deepcopy(case.model).train(captured_in is Mode.TRAIN), case.args).module()
        if captured_in is not exported_in:
            gm = modeswap.to_eval(gm)
        self.modal = modeswap.allow_train_eval(gm, attention_dropout=case.attention_dropout)
        self.args = case.args
        if modeswap.mode_of(self.modal).mode is None:
            # Nothing in the graph depends on the mode, or tells it: the module keeps the exported flag.
            self.eager.train(self.modal.training)
        self.optimizers = [
            torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.5) for m in self.pair if has_parameters(m)
        ]

    @property
    def pair(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        assert self.eager is not None
        assert self.modal is not None
        return self.eager, self.modal

    @rule()
    @precondition(lambda self: self.eager is not None)
    def train(self) -> None:
        for m in self.pair:
            m.train()

    @rule()
    @precondition(lambda self: self.eager is not None)
    def eval(self) -> None:
        for m in self.pair:
            m.eval()

    @rule(seed=st.integers(0, 1000))
    @precondition(lambda self: self.eager is not None)
    def forward(self, seed: int) -> None:
        want, got = (self._run(m, seed) for m in self.pair)
        torch.testing.assert_close(got, want, **TOLERANCE)

    @rule(seed=st.integers(0, 1000))
    @precondition(lambda self: self.eager is not None and has_parameters(self.eager))
    def step(self, seed: int) -> None:
        for m, optimizer in zip(self.pair, self.optimizers, strict=True):
            self._run(m, seed).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    @rule(seed=st.integers(0, 1000))
    @precondition(lambda self: self.eager is not None)
    def reload(self, seed: int) -> None:
        """Load a perturbed copy of the eager state into both."""
        generator = torch.Generator().manual_seed(seed)
        perturbed = {
            k: v + 0.1 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in self.pair[0].state_dict().items()
        }
        for m in self.pair:
            m.load_state_dict(perturbed)

    @invariant()
    def same_state_and_mode(self) -> None:
        if self.eager is None:
            return
        eager, modal = self.pair
        assert modal.training is eager.training
        reported = modeswap.mode_of(modal).mode
        assert reported in (None, Mode.TRAIN if eager.training else Mode.EVAL)
        want, got = eager.state_dict(), modal.state_dict()
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], **TOLERANCE, msg=lambda m, k=key: f"{k}: {m}")

    def _run(self, module: torch.nn.Module, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        out: torch.Tensor = module(*self.args)
        return out


LockstepMachine.TestCase.settings = settings(settings.default, stateful_step_count=12)
TestLockstep = LockstepMachine.TestCase
