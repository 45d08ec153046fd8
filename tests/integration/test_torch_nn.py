"""torch.nn's own recurrent and transformer layers, swapped both ways against eager PyTorch.

Each swap is exact and quiet, or says why not: an eval export records
attention dropout as 0.0 (``UnknownTrainingValueWarning``; exact once told the
value with ``attention_dropout=``), and ``nn.MultiheadAttention(need_weights=True)``
exported in eval has no node of its dropout at all (``TrainingBranchWarning``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import modeswap
from modeswap.testing import assert_mode_equivalent, assert_same_run, export, quiet, run_forward_backward


def _tokens(*shape: int) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.randn(*shape, generator=torch.Generator().manual_seed(1)),)


class Output(nn.Module):
    """Call ``layer`` with ``x`` as every input it takes, and return its first output."""

    def __init__(self, layer: nn.Module, inputs: int = 1, **options: Any) -> None:
        super().__init__()
        self.layer, self.inputs, self.options = layer, inputs, options

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(*[x] * self.inputs, **self.options)
        return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Layer:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    #: What an eval export records as dropout_p=0.0 and to_train must be told; None if nothing.
    attention_dropout: float | None = None


def _rnn(cls: type[nn.RNNBase], **options: Any) -> Callable[[], nn.Module]:
    return lambda: Output(cls(6, 8, num_layers=3, dropout=0.3, **options))


def _encoder(**options: Any) -> nn.Module:
    return nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.2, **options)


LAYERS = [
    Layer("lstm", _rnn(nn.LSTM), _tokens(5, 2, 6)),
    Layer("lstm-bidirectional-proj", _rnn(nn.LSTM, bidirectional=True, proj_size=4), _tokens(5, 2, 6)),
    Layer("gru-batch-first", _rnn(nn.GRU, batch_first=True), _tokens(2, 5, 6)),
    Layer("rnn-tanh", _rnn(nn.RNN), _tokens(5, 2, 6)),
    Layer("rnn-relu-bidirectional", _rnn(nn.RNN, nonlinearity="relu", bidirectional=True), _tokens(5, 2, 6)),
    Layer("encoder-layer", lambda: Output(_encoder()), _tokens(5, 2, 8), attention_dropout=0.2),
    Layer(
        "encoder-layer-batch-first-norm-first",
        lambda: Output(_encoder(batch_first=True, norm_first=True)),
        _tokens(2, 5, 8),
        attention_dropout=0.2,
    ),
    Layer(
        "encoder-stack",
        lambda: Output(nn.TransformerEncoder(_encoder(), 2, enable_nested_tensor=False)),
        _tokens(5, 2, 8),
        attention_dropout=0.2,
    ),
    Layer(
        "decoder-layer",
        lambda: Output(nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.2), inputs=2),
        _tokens(5, 2, 8),
        attention_dropout=0.2,
    ),
    Layer(
        "transformer",
        lambda: Output(nn.Transformer(8, 2, 1, 1, dim_feedforward=16, dropout=0.2), inputs=2),
        _tokens(5, 2, 8),
        attention_dropout=0.2,
    ),
    Layer(
        "multihead-attention",
        lambda: Output(nn.MultiheadAttention(8, 2, dropout=0.25), inputs=3, need_weights=False),
        _tokens(5, 2, 8),
        attention_dropout=0.25,
    ),
]


def _build(layer: Layer) -> nn.Module:
    torch.manual_seed(0)
    return layer.build()


@pytest.mark.parametrize("layer", LAYERS, ids=[layer.name for layer in LAYERS])
def test_a_train_export_swaps_to_eval_exactly_and_quietly(layer: Layer) -> None:
    model = _build(layer)
    with quiet():
        swapped = assert_mode_equivalent(model, layer.inputs(), "eval")
        back = modeswap.to_train(swapped.module)
    assert modeswap.mode_of(swapped.module).stochastic == ()
    expected = run_forward_backward(copy.deepcopy(model).train(), layer.inputs(), seed=5)
    assert_same_run(expected, run_forward_backward(back, layer.inputs(), seed=5), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layer", LAYERS, ids=[layer.name for layer in LAYERS])
def test_an_eval_export_swaps_to_train_exactly_or_says_what_it_lacks(layer: Layer) -> None:
    model = _build(layer)
    if layer.attention_dropout is None:
        with quiet():
            assert_mode_equivalent(model, layer.inputs(), "train")
        return
    with pytest.warns(modeswap.UnknownTrainingValueWarning, match="attention_dropout=p"):
        modeswap.to_train(export(model, layer.inputs(), "eval"))
    with quiet():
        assert_mode_equivalent(model, layer.inputs(), "train", attention_dropout=layer.attention_dropout)


def test_attention_weights_exported_in_eval_warn_that_their_dropout_is_gone() -> None:
    torch.manual_seed(0)
    model = Output(nn.MultiheadAttention(8, 2, dropout=0.25), inputs=3, need_weights=True)
    args = _tokens(5, 2, 8)()
    gm = export(model, args, "eval")
    with pytest.raises(modeswap.InvalidOptionError, match=r"attention_dropout=0\.25 is for attention nodes"):
        modeswap.to_train(gm, attention_dropout=0.25)  # need_weights=True computes attention by hand
    with pytest.warns(modeswap.TrainingBranchWarning, match=r"'layer' \(with need_weights=True"):
        trained = modeswap.to_train(gm)
    expected = run_forward_backward(copy.deepcopy(model).train(), args, seed=0)
    with pytest.raises(AssertionError):  # the warning is not a false alarm
        assert_same_run(expected, run_forward_backward(trained, args, seed=0), atol=1e-6, rtol=1e-5)
    with quiet():
        assert_mode_equivalent(model, args, "eval")  # a train export holds the dropout
