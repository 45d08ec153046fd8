"""Properties of ``check`` and ``capture`` on models with ``if self.training:`` branches, eager PyTorch as the oracle.

``branched_cases`` says which branches no swap can follow (``Case.differs``);
``check`` must report a difference in a direction exactly when one of them is
there, name it, and find nothing in a model whose swaps are known exact.
``MODESWAP_PROFILE=ci`` runs the full counts (see tests/conftest.py).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from hypothesis import example, given, strategies as st

import modeswap
from modeswap import Cause, Mode
from modeswap.testing import assert_same_run, run_forward_backward
from modeswap.testing.strategies import EXACT_LAYERS, EXTRA_LAYERS, LAYERS, Case, Layer, branched_cases, build, cases


def case_of(*specs: Layer, shape: tuple[int, ...] = (2, 2, 3)) -> Case:
    """The :class:`Case` of ``specs`` on an input of ``shape`` (batch, channels, *spatial), for explicit examples."""
    dims = len(shape) - 2
    model = build(specs, dims=dims, channels=shape[1], width=shape[-1])
    return Case(model, (torch.randn(shape, generator=torch.Generator().manual_seed(0)),), specs, dims)


def branch(body: str, runs: str = "train", **options: float) -> Layer:
    extra = {"train": options["train"], "eval": options["eval"]} if body == "literal" else {"runs": runs, **options}
    return Layer("branch", tuple(sorted({"body": body, **extra}.items())))


#: Layers between the branches: all but recurrent ones, whose export takes seconds (the last test has them).
BETWEEN = tuple(kind for kind in EXACT_LAYERS if kind != "rnn")

#: The modes of a few optimizer steps.
STEPS = st.lists(st.sampled_from(Mode), min_size=2, max_size=4)

LINEAR = Layer("linear")
ATTENTION = Layer("attention", (("causal", False), ("p", 0.5)))
DROPOUT_2D = Layer("dropout", (("cls", "Dropout2d"), ("inplace", False), ("p", 0.5)))  # returns its input in eval


def _body(case: Case, path: str) -> str:
    return str(dict(case.layers[int(path)].options)["body"])


def _within(path: str, paths: set[str]) -> bool:
    return any(path == p or path.startswith(f"{p}.") for p in paths)


@given(case=branched_cases(kinds=BETWEEN))
@example(case=case_of(LINEAR, branch("op", "eval"), branch("op", "both")))
@example(case=case_of(LINEAR, branch("literal", train=2.0, eval=3.0), branch("literal", train=0.5, eval=0.5)))
# Shrunk when compare ignored literals on purpose: the literal branch went unnamed, or only values differed.
@example(
    case=case_of(branch("literal", train=0.5, eval=2.0), branch("op"), Layer("conv", (("channels", 1), ("kernel", 1))))
)
@example(case=case_of(LINEAR, branch("output", "eval"), branch("output", "both")))
@example(case=case_of(LINEAR, branch("buffer", "train"), branch("noise", "both")))
@example(case=case_of(LINEAR, branch("dropout", "train", p=0.3)))
@example(case=case_of(LINEAR, branch("dropout", "eval", p=0.3), branch("dropout", "both", p=0.3)))
@example(case=case_of(ATTENTION, branch("noise", "train")))
# A Dropout2d returns its input in eval; these branches read it twice there, so to_train refuses.
@example(case=case_of(LINEAR, DROPOUT_2D, branch("noise", "eval"), shape=(2, 1, 2, 2)))
@example(case=case_of(DROPOUT_2D, branch("op"), branch("output", "eval"), shape=(2, 1, 2, 2)))
def test_check_reports_a_difference_exactly_where_a_branch_changes_the_graph(case: Case) -> None:
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    fidelity = modeswap.check(case.model, case.args, attention_dropout=case.attention_dropout)
    for direction in fidelity.directions:
        if direction.target is Mode.TRAIN and case.aliasing:  # the eval export is ambiguous: refused
            assert {d.cause for d in direction.differences} == {Cause.REFUSED}, fidelity
            continue
        branches = set(case.differs(direction.target))
        assert direction.exact is not branches, f"{direction.name} of {case}:\n{fidelity}"
        named = {path for difference in direction.differences for path in difference.paths}
        root = {""} if any(_body(case, path) == "output" for path in branches) else set()
        assert all(_within(path, branches) or path in root for path in named), f"{direction.name}:\n{fidelity}"
        assert all(_within(path, branches) for path in named) or root, fidelity
        assert branches <= named, f"{direction.name}: {sorted(branches - named)} not named:\n{fidelity}"
        assert {d.cause for d in direction.differences} <= {Cause.TRAINING_BRANCH, Cause.PINNED}, fidelity
    assert case.model.training
    assert all(torch.equal(before[k], v) for k, v in case.model.state_dict().items())


@given(case=branched_cases(kinds=(*BETWEEN, "drop_path")), modes=STEPS)
@example(case=case_of(LINEAR, branch("buffer", "train"), branch("output", "eval")), modes=[Mode.TRAIN, Mode.EVAL])
@example(case=case_of(branch("noise", "eval"), Layer("drop_path", (("idiom", "timm"), ("p", 0.5)))), modes=[*Mode])
def test_capture_trains_and_evaluates_as_eager(case: Case, modes: list[Mode]) -> None:
    """A few optimizer steps, switching modes between them: outputs, buffers and gradients as eager's at each."""
    eager = copy.deepcopy(case.model)
    modal = modeswap.capture(case.model, case.args)
    weights = [list(m.parameters()) for m in (eager, modal)]
    optimizers = [torch.optim.SGD(w, lr=0.1, momentum=0.9) for w in weights if w]  # a model may have none
    for step, mode in enumerate(modes):
        eager.train(mode is Mode.TRAIN)
        modal.train(mode is Mode.TRAIN)
        expected = run_forward_backward(eager, case.args, seed=step)
        actual = run_forward_backward(modal, case.args, seed=step)
        assert_same_run(expected, actual, atol=1e-6, rtol=1e-5)
        for optimizer in optimizers:
            optimizer.step()
    after = modal.state_dict()
    assert sorted(after) == sorted(eager.state_dict())
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(after[name], value, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@given(case=cases(max_layers=4, kinds=LAYERS + tuple(k for k in EXTRA_LAYERS if k not in ("branch", "aux_head"))))
def test_check_finds_no_difference_where_a_swap_is_exact(case: Case) -> None:
    """Each swap of these layers is exact but to train from an eval export with a drop path, or an ambiguous one."""
    fidelity = modeswap.check(case.model, case.args, attention_dropout=case.attention_dropout)
    assert fidelity.to_eval.exact, fidelity
    causes = {difference.cause for difference in fidelity.to_train.differences}
    if case.aliasing:
        assert causes == {Cause.REFUSED}, fidelity
    elif case.drop_path:
        drop_paths = {str(i) for i, layer in enumerate(case.layers) if layer.kind == "drop_path"}
        assert causes == {Cause.DROP_PATH}, fidelity
        assert all(_within(path, drop_paths) for d in fidelity.to_train.differences for path in d.paths), fidelity
    else:
        assert fidelity.to_train.exact, fidelity


def test_a_guard_call_is_not_a_difference() -> None:
    """A dropout on the input in train mode only: the swap of a train export to eval is exact."""
    case = case_of(branch("dropout", "train", p=0.5), LINEAR)
    fidelity = modeswap.check(case.model, case.args)
    assert fidelity.to_eval.exact, fidelity
    assert [d.module_path for d in fidelity.to_train.differences] == ["0"], fidelity


def test_one_buffer_under_two_names_is_not_a_difference() -> None:
    """One batch norm called as ``first`` and as ``second``: the swap of the eval export to train matches eager."""
    case = case_of(Layer("shared_batch_norm", (("momentum", 0.1), ("same_module", True))), shape=(3, 2, 4))
    fidelity = modeswap.check(case.model, case.args)
    assert fidelity.exact, fidelity


class SelfAttention(torch.nn.Module):
    """Attention as transformers' SDPA path writes it: heads split by a view, joined by ``transpose().contiguous()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.view(2, 8, 2, 4).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, q, q, dropout_p=0.25 if self.training else 0.0)
        return out.transpose(1, 2).contiguous()


def test_a_contiguous_copy_is_not_a_difference() -> None:
    """Each swap matches eager (tests/integration/test_transformers.py); check must find nothing."""
    fidelity = modeswap.check(SelfAttention(), (torch.randn(2, 8, 8),), attention_dropout=0.25)
    assert fidelity.exact, fidelity
