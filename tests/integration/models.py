"""A zoo of small transformers models with every dropout on, built from config classes with random weights.

Each :class:`Case` builds its model from a config (nothing is downloaded) in
which every dropout, attention dropout, classifier dropout and drop path
probability is above zero, and wraps it so that ``forward`` returns one tensor.
The models are tiny (one or two layers per stage, hidden sizes of 8 to 32,
32x32 images, 8 tokens, 400 audio samples), so a forward and backward takes
milliseconds on a CPU.

Attention goes through ``F.scaled_dot_product_attention`` (``attn_implementation="sdpa"``)
where the model supports it; ``Case.attention_dropout`` is then the ``dropout_p``
it passes in train mode. MobileViT has no SDPA path: it drops its attention
probabilities with an ``nn.Dropout``. ``bert_eager`` is BERT with transformers'
eager attention, which calls ``F.dropout(p=0.0 if not self.training else p)``:
an eval export records that ``p`` as 0.0, as it records SDPA's ``dropout_p``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn

#: Config attributes that hold a probability of dropping something in train mode.
#: ``layerdrop`` and the SpecAugment masks are not here: they decide in Python
#: whether to run a layer or mask a span, which ``torch.export`` cannot capture.
DROP_WORDS = ("dropout", "drop_path", "drop_connect", "pdrop")


class Output(nn.Module):
    """Call a transformers model and return one field of its output, so that ``forward`` gives a tensor."""

    def __init__(self, model: nn.Module, field: str = "logits") -> None:
        super().__init__()
        self.model = model
        self.field = field

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(*args, return_dict=True), self.field)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Case:
    """One architecture: how to build it and what to feed it."""

    name: str
    config: Callable[[], transformers.PretrainedConfig]
    model_class: Callable[[transformers.PretrainedConfig], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    field: str = "logits"
    #: The attention dropout an eval export records as 0.0 (SDPA's ``dropout_p``, or the ``p`` of
    #: transformers' eager attention dropout); None when the model's attention dropout is an ``nn.Dropout``.
    attention_dropout: float | None = None
    #: Whether the model has a drop path (stochastic depth) with a probability above zero.
    drop_path: bool = False

    def build(self, seed: int = 0) -> nn.Module:
        """The model in train mode, with weights drawn from ``seed``."""
        torch.manual_seed(seed)
        model = self.model_class(self.config())
        return Output(model, self.field).train()


def drop_probabilities(config: transformers.PretrainedConfig) -> dict[str, Any]:
    """The config's dropout-like probabilities by attribute name."""
    return {key: value for key, value in config.to_dict().items() if any(word in key for word in DROP_WORDS)}


def _images(size: int = 32, batch: int = 2) -> Callable[[], tuple[torch.Tensor, ...]]:
    def make() -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)),)

    return make


def _tokens(vocab: int = 64, length: int = 8, batch: int = 2) -> Callable[[], tuple[torch.Tensor, ...]]:
    def make() -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1)),)

    return make


def _audio(samples: int = 400, batch: int = 2) -> Callable[[], tuple[torch.Tensor, ...]]:
    def make() -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, samples, generator=torch.Generator().manual_seed(1)),)

    return make


SDPA = {"attn_implementation": "sdpa"}
P_ATTENTION = 0.25  # attention dropout in every model, so a test can pass it as attention_dropout=
P_HIDDEN = 0.2
P_CLASSIFIER = 0.3
P_DROP_PATH = 0.4  # ConvNeXt and Swin spread it linearly from 0 over the blocks; DINOv2 uses it in every block


def _resnet() -> transformers.PretrainedConfig:
    # ResNet has no dropout of any kind: batch norm is its only mode-dependent op.
    return transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5
    )


def _regnet() -> transformers.PretrainedConfig:
    # Like ResNet: batch norm only, with squeeze-and-excitation (layer_type="y").
    return transformers.RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=5
    )


def _mobilenet_v2() -> transformers.PretrainedConfig:
    return transformers.MobileNetV2Config(
        image_size=32, depth_multiplier=0.25, classifier_dropout_prob=P_CLASSIFIER, num_labels=5
    )


def _efficientnet() -> transformers.PretrainedConfig:
    # transformers' "drop connect" is an nn.Dropout (elementwise, not per sample) at the end of each
    # block with stride 1 and no id_skip, its rate growing from 0 over the blocks.
    return transformers.EfficientNetConfig(
        image_size=32,
        width_coefficient=0.05,  # 8 to 16 channels; the head is round_filters(1280) = 64 = hidden_dim
        depth_coefficient=1.0,
        kernel_sizes=[3, 3],
        in_channels=[32, 16],
        out_channels=[16, 24],
        num_block_repeats=[1, 2],  # the only block with a drop connect is the second one of stage 2
        strides=[1, 2],
        expand_ratios=[1, 6],
        hidden_dim=64,
        dropout_rate=P_CLASSIFIER,
        drop_connect_rate=P_DROP_PATH,
        num_labels=5,
    )


def _convnext() -> transformers.PretrainedConfig:
    return transformers.ConvNextConfig(
        image_size=32,
        num_stages=2,
        hidden_sizes=[8, 16],
        depths=[2, 1],
        drop_path_rate=P_DROP_PATH,
        layer_scale_init_value=1.0,  # the default 1e-6 hides the drop path in the outputs
        num_labels=5,
    )


def _vit() -> transformers.PretrainedConfig:
    return transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=P_HIDDEN,
        attention_probs_dropout_prob=P_ATTENTION,
        num_labels=5,
        **SDPA,
    )


def _bert(attention: str = "sdpa") -> transformers.PretrainedConfig:
    return transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=P_HIDDEN,
        attention_probs_dropout_prob=P_ATTENTION,
        classifier_dropout=P_CLASSIFIER,
        num_labels=5,
        attn_implementation=attention,
    )


def _bert_eager() -> transformers.PretrainedConfig:
    # transformers' own attention: F.dropout(weights, p=0.0 if not self.training else p, training=self.training),
    # an ordinary dropout site whose p an eval export records as 0.0.
    return _bert("eager")


def _distilbert() -> transformers.PretrainedConfig:
    return transformers.DistilBertConfig(
        vocab_size=64,
        dim=16,
        n_layers=2,
        n_heads=2,
        hidden_dim=32,
        max_position_embeddings=32,
        dropout=P_HIDDEN,
        attention_dropout=P_ATTENTION,
        qa_dropout=P_CLASSIFIER,
        seq_classif_dropout=P_CLASSIFIER,
        num_labels=5,
        **SDPA,
    )


def _gpt2() -> transformers.PretrainedConfig:
    return transformers.GPT2Config(
        vocab_size=64,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=P_HIDDEN,
        embd_pdrop=P_HIDDEN,
        attn_pdrop=P_ATTENTION,
        summary_first_dropout=P_CLASSIFIER,
        bos_token_id=0,  # the default 50256 is outside this vocabulary, and transformers logs a warning
        eos_token_id=0,
        **SDPA,
    )


def _swin() -> transformers.PretrainedConfig:
    return transformers.SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[2, 1],
        num_heads=[2, 2],
        window_size=4,
        hidden_dropout_prob=P_HIDDEN,
        attention_probs_dropout_prob=P_ATTENTION,
        drop_path_rate=P_DROP_PATH,
        num_labels=5,
        **SDPA,
    )


def _mobilevit() -> transformers.PretrainedConfig:
    return transformers.MobileViTConfig(
        image_size=32,
        patch_size=2,
        hidden_sizes=[16, 16, 16],
        neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32],
        num_attention_heads=2,
        expand_ratio=2.0,
        hidden_dropout_prob=P_HIDDEN,
        attention_probs_dropout_prob=P_ATTENTION,
        classifier_dropout_prob=P_CLASSIFIER,
        aspp_dropout_prob=P_CLASSIFIER,
        num_labels=5,
    )


def _dinov2() -> transformers.PretrainedConfig:
    return transformers.Dinov2Config(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        hidden_dropout_prob=P_HIDDEN,
        attention_probs_dropout_prob=P_ATTENTION,
        drop_path_rate=P_DROP_PATH,
        num_labels=5,
        **SDPA,
    )


def _wav2vec2() -> transformers.PretrainedConfig:
    return transformers.Wav2Vec2Config(
        vocab_size=16,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_feat_extract_layers=2,
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        hidden_dropout=P_HIDDEN,
        activation_dropout=P_HIDDEN,
        attention_dropout=P_ATTENTION,
        feat_proj_dropout=P_HIDDEN,
        feat_quantizer_dropout=P_HIDDEN,
        final_dropout=P_CLASSIFIER,
        layerdrop=0.0,  # skips whole layers on a torch.rand draw compared in Python: not exportable
        mask_time_prob=0.0,  # SpecAugment draws its spans with numpy: not exportable
        **SDPA,
    )


def _wav2vec2_for_ctc(config: transformers.PretrainedConfig) -> nn.Module:
    model = transformers.Wav2Vec2ForCTC(config)
    # In train mode an unfrozen feature encoder sets requires_grad on its first activation, which
    # raises when the input itself requires grad, as the oracle's inputs do. Fine-tuning freezes it anyway.
    model.freeze_feature_encoder()
    return model


CASES: tuple[Case, ...] = (
    Case("resnet", _resnet, transformers.ResNetForImageClassification, _images()),
    Case("regnet", _regnet, transformers.RegNetForImageClassification, _images()),
    Case("mobilenet_v2", _mobilenet_v2, transformers.MobileNetV2ForImageClassification, _images()),
    Case("efficientnet", _efficientnet, transformers.EfficientNetForImageClassification, _images()),
    Case("convnext", _convnext, transformers.ConvNextForImageClassification, _images(), drop_path=True),
    Case("vit", _vit, transformers.ViTForImageClassification, _images(), attention_dropout=P_ATTENTION),
    Case("bert", _bert, transformers.BertForSequenceClassification, _tokens(), attention_dropout=P_ATTENTION),
    Case(
        "bert_eager",
        _bert_eager,
        transformers.BertForSequenceClassification,
        _tokens(),
        attention_dropout=P_ATTENTION,
    ),
    Case(
        "distilbert",
        _distilbert,
        transformers.DistilBertForSequenceClassification,
        _tokens(),
        attention_dropout=P_ATTENTION,
    ),
    Case("gpt2", _gpt2, transformers.GPT2LMHeadModel, _tokens(), attention_dropout=P_ATTENTION),
    Case(
        "swin",
        _swin,
        transformers.SwinForImageClassification,
        _images(),
        attention_dropout=P_ATTENTION,
        drop_path=True,
    ),
    Case("mobilevit", _mobilevit, transformers.MobileViTForImageClassification, _images()),
    Case(
        "dinov2",
        _dinov2,
        transformers.Dinov2ForImageClassification,
        _images(),
        attention_dropout=P_ATTENTION,
        drop_path=True,
    ),
    Case("wav2vec2", _wav2vec2, _wav2vec2_for_ctc, _audio(), attention_dropout=P_ATTENTION),
)

BY_NAME = {case.name: case for case in CASES}
