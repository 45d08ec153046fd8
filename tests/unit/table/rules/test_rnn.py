"""The recurrent rows of the semantics table (LSTM, GRU, RNN), in both directions, against eager PyTorch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import modeswap
from modeswap.testing import assert_mode_equivalent, call_signature, export

from ...sites import MODES, arg, nodes, randn

aten = torch.ops.aten


class Recurrent(nn.Module):
    """An ``nn.LSTM``/``GRU``/``RNN`` with dropout between stacked layers; returns the outputs and the state."""

    def __init__(self, cls: type[nn.RNNBase], **options: Any) -> None:
        super().__init__()
        self.rnn = cls(4, 6, **options)

    def forward(self, x: torch.Tensor) -> Any:
        return self.rnn(x)


RECURRENT = [
    pytest.param(nn.LSTM, {}, aten.lstm.input, id="LSTM"),
    pytest.param(nn.GRU, {}, aten.gru.input, id="GRU"),
    pytest.param(nn.RNN, {"nonlinearity": "tanh"}, aten.rnn_tanh.input, id="RNN-tanh"),
    pytest.param(nn.RNN, {"nonlinearity": "relu"}, aten.rnn_relu.input, id="RNN-relu"),
    pytest.param(nn.LSTM, {"bidirectional": True, "batch_first": True}, aten.lstm.input, id="LSTM-bi-batch-first"),
    pytest.param(nn.LSTM, {"proj_size": 3}, aten.lstm.input, id="LSTM-proj"),
    pytest.param(nn.GRU, {"bidirectional": True, "bias": False}, aten.gru.input, id="GRU-bi-no-bias"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("cls", "options", "op"), RECURRENT)
def test_recurrent_layers_match_eager_and_keep_dropout(cls: type, options: dict[str, Any], op: Any, mode: str) -> None:
    torch.manual_seed(0)
    model = Recurrent(cls, num_layers=3, dropout=0.4, **options)
    swapped = assert_mode_equivalent(model, (randn(5, 2, 4),), mode)
    (node,) = nodes(swapped.module, op)
    assert (arg(node, "train"), arg(node, "dropout"), arg(node, "num_layers")) == (mode == "train", 0.4, 3)
    assert [(c.field, c.after) for c in swapped.changes] == [("train", mode == "train")]
    (site,) = modeswap.mode_of(swapped.module).sites
    assert (site.kind, site.module_path, site.functional) == ("rnn", "rnn", False)


def test_a_recurrent_layer_round_trips_argument_for_argument() -> None:
    model = Recurrent(nn.LSTM, num_layers=2, dropout=0.3, bidirectional=True)
    gm = export(model, (randn(5, 2, 4),), "train")
    assert call_signature(modeswap.to_train(modeswap.to_eval(gm))) == call_signature(gm)
    assert modeswap.mode_of(gm).stochastic == ()  # the rule owns the op's random draws


def test_a_packed_sequence_overload_is_swapped_too() -> None:
    # torch 2.13 cannot export a PackedSequence (its batch sizes are data), so the .data overload
    # is called by hand here, in a graph traced with export's metadata.
    lstm = nn.LSTM(4, 6, num_layers=2, dropout=0.5)
    batch_sizes = torch.tensor([2, 2, 1])

    def packed(data: torch.Tensor, train: bool) -> torch.Tensor:
        state = [torch.zeros(2, 2, 6), torch.zeros(2, 2, 6)]
        weights = list(lstm._flat_weights)
        out: torch.Tensor = aten.lstm.data(data, batch_sizes, state, weights, True, 2, 0.5, train, False)[0]
        return out

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = lstm  # so that tracing reads its weights as attributes

        def forward(self, data: torch.Tensor) -> torch.Tensor:
            return packed(data, True)

    gm = torch.fx.symbolic_trace(Packed())
    for node in gm.graph.nodes:
        node.meta["val"] = None  # what modeswap.is_exported looks for
    data = randn(5, 4)
    evaluated = modeswap.to_eval(gm)
    (node,) = nodes(evaluated, aten.lstm.data)
    assert arg(node, "train") is False
    torch.testing.assert_close(evaluated(data), packed(data, False), rtol=0, atol=0)
    torch.manual_seed(0)
    trained = modeswap.to_train(evaluated)(data)
    torch.manual_seed(0)
    torch.testing.assert_close(trained, packed(data, True), rtol=0, atol=0)
