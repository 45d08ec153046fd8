"""Models whose archives the archive tests write: tied and shared weights, namedtuple and dataclass outputs.

An importable module, not a test file: a test saves one of these models, then
reads the archive in a fresh interpreter, which imports this module by the name
the archive gives its output types (``archived_models.Outputs``, with this
folder on ``PYTHONPATH``), as unpickling would.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

#: What torchvision's GoogLeNet returns in train mode: the main logits and two auxiliary ones.
GoogLeNetOutputs = collections.namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])


class Features(NamedTuple):
    """A typed namedtuple, nested in the eval output of :class:`GoogLeNetLike`."""

    pooled: torch.Tensor
    logits: torch.Tensor


class GoogLeNetLike(nn.Module):
    """Conv, batch norm and dropout; in train mode a namedtuple with two auxiliary heads, as GoogLeNet returns."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(4, 3)
        self.aux1 = nn.Linear(4, 3)
        self.aux2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> Any:
        pooled = F.relu(self.bn(self.conv(x))).mean((2, 3))
        logits = self.fc(self.drop(pooled))
        if self.training:
            return GoogLeNetOutputs(logits, self.aux2(pooled), self.aux1(pooled))
        return {"features": Features(pooled, logits)}


@dataclasses.dataclass
class Prediction:
    """A dataclass output, registered with torch without a serialized name (as most code registers one)."""

    logits: torch.Tensor
    scores: torch.Tensor


torch.export.register_dataclass(Prediction)


@dataclasses.dataclass
class Unregistered:
    """A dataclass output that this module does not register: :mod:`registering` does, when imported."""

    logits: torch.Tensor


class Predictor(nn.Module):
    """Returns a :class:`Prediction` dataclass in both modes, or an :class:`Unregistered` one."""

    def __init__(self, registered: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.3)
        self.registered = registered

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.drop(self.linear(x))
        if not self.registered:
            return Unregistered(logits)
        return Prediction(logits, logits.softmax(-1))


class Tied(nn.Module):
    """Tied input and output embeddings, with dropout between them, as every transformers language model has."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.norm = nn.LayerNorm(8)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(8, 50, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.norm(self.emb(ids))))  # type: ignore[no-any-return]


class Shared(nn.Module):
    """One module registered under two names, and a batch norm, as a weight-shared block reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(8, 8)
        self.again = self.block
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.again(self.drop(self.bn(torch.relu(self.block(x)))))  # type: ignore[no-any-return]


def seeded(cls: type[nn.Module], *args: Any, seed: int = 0) -> nn.Module:
    """``cls(*args)`` with weights drawn under ``seed``: the same model in every process."""
    torch.manual_seed(seed)
    return cls(*args)


def bert_classifier() -> nn.Module:
    """A two-layer BERT for sequence classification from its config, random weights: it returns a ModelOutput."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
        attn_implementation="sdpa",
    )
    return BertForSequenceClassification(config)


def gpt2() -> nn.Module:
    """A two-layer GPT-2 language model from its config, random weights: tied embeddings, a ModelOutput."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2, use_cache=False, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def bart() -> nn.Module:
    """A small BART from its config: ``model.shared``, both ``embed_tokens`` and ``lm_head`` are one weight."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=50,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=16,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return BartForConditionalGeneration(config)


def t5() -> nn.Module:
    """A small T5 from its config: ``shared``, both ``embed_tokens`` (and ``lm_head`` when tied) are one weight."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, use_cache=False, tie_word_embeddings=True
    )
    return T5ForConditionalGeneration(config)


def tokens(batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    """Token ids for the language models above."""
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))
