"""The models the benchmark swaps, built with random weights: nothing is downloaded.

Conv-bn-relu-dropout chains of any length, and transformers models of real
sizes built from their config classes. Inputs are small: only the graph's size
matters to a swap, not the cost of running it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """One model to benchmark: how to build it and call it."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    #: The ``dropout_p`` to_train gives attention nodes of a graph exported in eval mode.
    attention_dropout: float | None = None
    #: Whether it is a conv-bn-relu-dropout chain (the plot draws chains as one line).
    is_chain: bool = False


def chain(blocks: int, channels: int = 16) -> nn.Sequential:
    """``blocks`` repetitions of Conv2d(3x3) - BatchNorm2d - ReLU - Dropout(0.1)."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.Dropout(0.1)]
    return nn.Sequential(*layers)


def chain_spec(blocks: int) -> ModelSpec:
    return ModelSpec(
        name=f"chain-{blocks}",
        description=f"{blocks} conv-bn-relu-dropout blocks, 16 channels, input 2x16x8x8",
        build=lambda: chain(blocks),
        inputs=lambda: (torch.randn(2, 16, 8, 8),),
        is_chain=True,
    )


def resnet50() -> nn.Module:
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck")
    return ResNetModel(config)


def mobilenet_v2() -> nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2Model

    return MobileNetV2Model(MobileNetV2Config())


def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        num_hidden_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        attn_implementation="sdpa",
    )
    return BertModel(config)


def _images() -> tuple[torch.Tensor, ...]:
    # Batch 2: a train-mode batch norm refuses one value per channel (ResNet ends at 1x1).
    return (torch.randn(2, 3, 32, 32),)


def _tokens() -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 1000, (1, 8)),)


RESNET50 = ModelSpec(
    "resnet50", "transformers ResNetModel, depths 3-4-6-3, bottleneck, input 2x3x32x32", resnet50, _images
)
MOBILENET_V2 = ModelSpec(
    "mobilenet_v2", "transformers MobileNetV2Model, default config, input 2x3x32x32", mobilenet_v2, _images
)
BERT = ModelSpec(
    "bert",
    "transformers BertModel, 12 layers, hidden 768, sdpa, dropout 0.1, 1x8 tokens",
    bert,
    _tokens,
    attention_dropout=0.1,
)


def all_specs() -> list[ModelSpec]:
    return [*(chain_spec(n) for n in (10, 100, 400, 1000)), RESNET50, MOBILENET_V2, BERT]


def quick_specs() -> list[ModelSpec]:
    return [chain_spec(10), chain_spec(100), RESNET50]
