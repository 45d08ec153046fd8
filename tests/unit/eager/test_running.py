"""The second opinion of check (eager.running): what only running the graphs shows, and what running must not do."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.fx import GraphModule

import modeswap
import modeswap.eager.check
import modeswap.eager.running
from modeswap.eager.compare import written_state
from modeswap.eager.running import second_opinion

ROWS = (torch.randn(5, 4, generator=torch.Generator().manual_seed(0)),)


def module_of(model: nn.Module, args: tuple[Any, ...], *, training: bool = True) -> GraphModule:
    return torch.export.export(model.train(training), args).module()  # type: ignore[return-value]


def test_an_embedding_with_max_norm_is_left_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modeswap.eager.check, "blind_spots", lambda gm: ("every op",))  # the second opinion runs
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 2))
    nn.init.normal_(model[0].weight, std=3.0)  # rows longer than max_norm: a forward renormalises them
    args = (torch.tensor([[1, 2, 3]]),)
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    assert "0.weight" in written_state(module_of(model, args))
    assert modeswap.check(model, args).exact
    after = model.state_dict()
    for key, (pointer, value) in before.items():
        assert after[key].data_ptr() == pointer, key
        assert torch.equal(after[key], value), key


def in_place_relu_and_dropout() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Dropout(inplace=True))


def test_a_backward_that_fails_is_unrun_after_the_forward_is_compared() -> None:
    # The in-place dropout writes the ReLU output that ReLU's backward needs: autograd refuses, as in eager.
    torch.manual_seed(0)
    model = in_place_relu_and_dropout()
    other = in_place_relu_and_dropout()
    with torch.no_grad():
        other[0].bias.copy_(model[0].bias + 1.0)
        other[0].weight.copy_(model[0].weight)
    expected, actual = module_of(model, ROWS), module_of(other, ROWS)
    found = list(second_opinion(expected, actual, (ROWS, {}), (0, 1)))
    assert [(f.side, f.argument) for f in found[:-1]] == [("values", "outputs[0]")]
    assert found[0].values == ([0], None)  # no second seed after a failure
    unrun = found[-1]
    assert (unrun.side, unrun.module_path, unrun.nodes, unrun.ops) == ("unrun", "", (), ())
    assert unrun.argument is not None
    assert unrun.argument.startswith("backward: RuntimeError: one of the variables needed for gradient computation")
    assert "\n" not in unrun.argument


def test_a_forward_that_fails_is_unrun_and_nothing_else() -> None:
    expected = module_of(nn.Linear(4, 4), ROWS)
    found = list(second_opinion(expected, expected, (((torch.randn(5, 3),)), {}), (0,)))
    assert [(f.side, f.argument.split(":")[0]) for f in found if f.argument] == [("unrun", "forward")]


def test_check_does_not_raise_where_the_backward_fails() -> None:
    model = in_place_relu_and_dropout()
    before = [p.clone() for p in model.parameters()]
    modeswap.check(model, ROWS)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_the_second_opinion_shares_what_it_does_not_write(monkeypatch: pytest.MonkeyPatch) -> None:
    # A large model stays cheap: only the batch norm's buffers, which a train forward writes, are copied,
    # and the gradients are handed over, not cloned.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.Dropout(0.1), nn.Linear(256, 256))
    args = (torch.randn(8, 256),)
    expected = module_of(model, args)
    actual = modeswap.to_train(module_of(model, args, training=False), share_weights=True)
    theirs = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: list[tuple[dict[str, bool], dict[str, bool], bool]] = []
    real = modeswap.eager.running.run_forward_backward

    def watched(module: nn.Module, *a: Any, **k: Any) -> dict[str, Any]:
        result = real(module, *a, **k)
        params = {name: p.data_ptr() in theirs for name, p in module.named_parameters()}
        buffers = {name: b.data_ptr() in theirs for name, b in module.named_buffers()}
        handed = all(result["grads"][name] is p.grad for name, p in module.named_parameters())
        seen.append((params, buffers, handed))
        return result

    monkeypatch.setattr(modeswap.eager.running, "run_forward_backward", watched)
    assert list(second_opinion(expected, actual, (args, {}), (0, 1))) == []
    assert len(seen) == 2  # two graphs under the first seed: their dropouts draw alike
    for params, buffers, handed in seen:
        assert params == dict.fromkeys(["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"], True)
        assert buffers == dict.fromkeys(["1.running_mean", "1.running_var", "1.num_batches_tracked"], False)
        assert handed


class TwiceDropped(nn.Module):
    """A linear layer and ``times`` dropouts: one more dropout draws more random numbers."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.fc, self.times = nn.Linear(4, 4), times

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        for _ in range(self.times):
            x = nn.functional.dropout(x, 0.5, self.training)
        return x


@pytest.mark.parametrize(("times", "seeds"), [(1, [0]), (2, [0, 1])], ids=["alike", "differently"])
def test_later_seeds_run_where_the_graphs_draw_differently(
    times: int, seeds: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    one, two = TwiceDropped(1), TwiceDropped(times)
    two.load_state_dict(one.state_dict())
    calls: list[int] = []
    real = modeswap.eager.running.run_forward_backward
    monkeypatch.setattr(
        modeswap.eager.running, "run_forward_backward", lambda *a, **k: calls.append(k["seed"]) or real(*a, **k)
    )
    found = list(second_opinion(module_of(one, ROWS), module_of(two, ROWS), (ROWS, {}), (0, 1)))
    assert calls == [seed for seed in seeds for _ in range(2)]
    assert {tuple(f.values[0]) for f in found if f.values} == ({tuple(seeds)} if times == 2 else set())
