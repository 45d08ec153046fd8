"""The models the benchmark swaps, built with random weights: nothing is downloaded.

Conv-bn-relu-dropout chains of any length, transformers models of real
sizes built from their config classes, and torchvision's VGG-11-bn and AlexNet
written out as torchvision defines them (torchvision itself is not a
dependency). Inputs are small where only the graph's size matters to a swap;
VGG and AlexNet take torchvision's 224x224 images, since what ``check`` costs
on them is running their large fully connected layers.
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


def vgg11_bn(num_classes: int = 1000, dropout: float = 0.5) -> nn.Module:
    """torchvision's ``vgg11_bn`` (configuration "A" with batch norm), its initialisation included."""
    layers: list[nn.Module] = []
    channels = 3
    for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            channels = v
    model = _Classifier(
        nn.Sequential(*layers),
        nn.AdaptiveAvgPool2d((7, 7)),
        nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        ),
    )
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)
    return model


def alexnet(num_classes: int = 1000, dropout: float = 0.5) -> nn.Module:
    """torchvision's ``alexnet``."""
    return _Classifier(
        nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        ),
        nn.AdaptiveAvgPool2d((6, 6)),
        nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        ),
    )


class _Classifier(nn.Module):
    """torchvision's ``VGG`` and ``AlexNet`` forward: features, average pool, flatten, classifier."""

    def __init__(self, features: nn.Module, avgpool: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features, self.avgpool, self.classifier = features, avgpool, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        out: torch.Tensor = self.classifier(torch.flatten(x, 1))
        return out


def _images() -> tuple[torch.Tensor, ...]:
    # Batch 2: a train-mode batch norm refuses one value per channel (ResNet ends at 1x1).
    return (torch.randn(2, 3, 32, 32),)


def _imagenet() -> tuple[torch.Tensor, ...]:
    # torchvision's input size: the classifier's first layer is sized for it.
    return (torch.randn(2, 3, 224, 224),)


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

VGG11_BN = ModelSpec("vgg11_bn", "torchvision's vgg11_bn, written out, input 2x3x224x224", vgg11_bn, _imagenet)
ALEXNET = ModelSpec("alexnet", "torchvision's alexnet, written out, input 2x3x224x224", alexnet, _imagenet)


def all_specs() -> list[ModelSpec]:
    return [*(chain_spec(n) for n in (10, 100, 400, 1000)), RESNET50, MOBILENET_V2, BERT, VGG11_BN, ALEXNET]


def quick_specs() -> list[ModelSpec]:
    return [chain_spec(10), chain_spec(100), RESNET50]
