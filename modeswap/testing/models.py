"""Eager modules with train/eval behaviour written by hand, as models in the wild write it.

The hypothesis strategies (:mod:`modeswap.testing.strategies`) build their models from
these; they need only torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """A small CNN: conv, batch norm, ReLU and dropout, a mean over positions, then a linear head.

    The sites most vision models have (batch norm and dropout) around a conv, with
    what each test needs changed by one argument: ``channels`` and ``classes``
    are the widths, ``padding`` the conv's, ``momentum`` and ``eps`` the batch
    norm's, ``p`` the dropout's. ``relu=False`` and ``pool=False`` leave out the
    ReLU and the mean (the output keeps its positions). ``head`` builds the
    layers after the mean from ``(channels, classes)``, or is ``None`` for none;
    ``aux`` adds a linear head of that many classes whose logits only training
    returns, after the main ones (GoogLeNet). ``scale`` multiplies the features
    by a non-persistent buffer, ``offset`` then adds a tensor constant (a plain
    tensor attribute, neither parameter nor buffer). The modules are made in
    the order written, so a seed gives every test the weights it always had.

    >>> torch.manual_seed(0)
    >>> model = Net(channels=8, classes=4, momentum=0.3, p=0.25)
    """

    scale: torch.Tensor | None
    offset: torch.Tensor | None

    def __init__(
        self,
        channels: int = 4,
        classes: int = 2,
        *,
        padding: int = 1,
        momentum: float = 0.1,
        eps: float = 1e-5,
        p: float = 0.5,
        relu: bool = True,
        pool: bool = True,
        head: Callable[[int, int], nn.Module] | None = nn.Linear,
        aux: int | None = None,
        scale: float | torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=padding)
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
        self.drop = nn.Dropout(p)
        self.relu, self.pool = relu, pool
        self.head = None if head is None else head(channels, classes)
        self.aux = None if aux is None else nn.Linear(channels, aux)
        if scale is None:
            self.scale = None
        else:
            self.register_buffer("scale", torch.as_tensor(scale), persistent=False)
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.bn(self.conv(x))
        h = self.drop(F.relu(h) if self.relu else h)
        if self.pool:
            h = h.mean((2, 3))
        if self.scale is not None:
            h = h * self.scale
        if self.offset is not None:
            h = h + self.offset
        out: torch.Tensor = h if self.head is None else self.head(h)
        if self.aux is not None and self.training:
            return out, self.aux(h)
        return out


class Attention(nn.Module):
    """Self-attention over the flattened spatial positions, with the eager gating idiom.

    ``dropout_p=self.p if self.training else 0.0``, as eager code writes it; ``calls`` applies
    the attention that many times in a row.
    """

    def __init__(self, p: float, causal: bool = False, *, scale: float | None = None, calls: int = 1) -> None:
        super().__init__()
        self.p = p
        self.causal = causal
        self.scale = scale
        self.calls = calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.calls):
            n, c = x.shape[:2]
            q = x.reshape(n, 1, c, -1)
            out = F.scaled_dot_product_attention(
                q, q, q, dropout_p=self.p if self.training else 0.0, is_causal=self.causal, scale=self.scale
            )
            x = out.reshape(x.shape)
        return x


class DropPath(nn.Module):
    """Stochastic depth as each library writes it by hand; the identity in eval mode."""

    IDIOMS = ("transformers", "timm", "timm-unscaled", "torchvision")

    def __init__(self, p: float, idiom: str) -> None:
        super().__init__()
        self.p = p
        self.idiom = idiom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        match self.idiom:
            case "transformers":
                mask = keep + torch.rand(shape, dtype=x.dtype, device=x.device)
                mask.floor_()
                return x.div(keep) * mask
            case "timm" | "timm-unscaled":
                mask = x.new_empty(shape).bernoulli_(keep)
                return x * (mask.div_(keep) if self.idiom == "timm" else mask)
            case _:
                noise = torch.empty(list(shape), dtype=x.dtype, device=x.device).bernoulli_(keep)
                return x * noise.div_(keep)


class Recurrent(nn.Module):
    """An ``nn.LSTM``/``GRU``/``RNN`` over the flattened positions, with dropout between its layers."""

    CELLS = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")

    def __init__(self, cell: str, width: int, layers: int, p: float, bidirectional: bool, batch_first: bool) -> None:
        super().__init__()
        cls = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}[cell]
        options = {"nonlinearity": cell.removeprefix("RNN_").lower()} if cell.startswith("RNN_") else {}
        self.rnn = cls(width, width, layers, dropout=p, bidirectional=bidirectional, batch_first=batch_first, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequence = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, positions, width)
        if not self.rnn.batch_first:
            sequence = sequence.transpose(0, 1)
        out: torch.Tensor = self.rnn(sequence)[0]
        if not self.rnn.batch_first:
            out = out.transpose(0, 1)
        return out[..., : x.shape[-1]].reshape(x.shape)


class SharedBatchNorm(nn.Module):
    """A batch norm called twice: one module under two names, or two modules sharing running stats."""

    def __init__(self, norm: type[nn.Module], channels: int, momentum: float, same_module: bool) -> None:
        super().__init__()
        self.first = norm(channels, momentum=momentum)
        self.second = self.first if same_module else norm(channels, momentum=momentum / 2)
        if not same_module:
            self.second.running_mean = self.first.running_mean
            self.second.running_var = self.first.running_var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))  # type: ignore[no-any-return]


class Skip(nn.Module):
    """A dropout beside the identity: ``drop(x) + x``, as a residual or a U-Net skip reads it."""

    def __init__(self, dropout: nn.Module) -> None:
        super().__init__()
        self.drop = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x) + x  # type: ignore[no-any-return]


class Fresh(nn.Module):
    """Copies its input, so an in-place layer after it never overwrites a tensor autograd saved."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class PinnedMode(nn.Module):
    """Keeps its child in one mode whatever ``train()``/``eval()`` is called with (for mixed graphs)."""

    def __init__(self, child: nn.Module, training: bool) -> None:
        super().__init__()
        self.child = child
        self.pinned = training
        self.child.train(training)

    def train(self, mode: bool = True) -> PinnedMode:
        self.training = mode
        self.child.train(self.pinned)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.child(x)  # type: ignore[no-any-return]


class AuxiliaryHeads(nn.Module):
    """Returns auxiliary logits beside the main ones only in training, as torchvision's GoogLeNet and Inception do."""

    def __init__(self, channels: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(0.2)
        self.aux = nn.Linear(channels, classes)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = F.relu(self.bn(self.conv(x))).mean((2, 3))
        logits: torch.Tensor = self.fc(self.drop(features))
        if self.training:
            return logits, self.aux(features)
        return logits


class NormEval(nn.Module):
    """A backbone that keeps its batch norm frozen whenever it is put in train mode, as mmdetection's ``norm_eval``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    def train(self, mode: bool = True) -> NormEval:
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(F.relu(self.bn(self.conv(x)))).mean((2, 3)))  # type: ignore[no-any-return]


class TrainOnlyHead(nn.Module):
    """A head that only training runs and returns beside its input, as GoogLeNet's and Inception-v3's auxiliary heads.

    An eval export never calls ``head``: its parameters are in the program's state, and no node reads them.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.head = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            return x, self.head(x)
        return x


class Noise(nn.Module):
    """Adds Gaussian noise in training only, as noise-injection and data-augmentation layers do."""

    def __init__(self, std: float = 0.1) -> None:
        super().__init__()
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.std * torch.randn_like(x) if self.training else x


class BatchVariance(nn.Module):
    """Normalises by a variance it updates only in training, as timm's EvoNorm-B0 does."""

    def __init__(self, width: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.running_var: torch.Tensor
        self.register_buffer("running_var", torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            var = x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_var.lerp_(var.detach(), self.momentum)
        else:
            var = self.running_var
        return x / (var + 1e-5).sqrt()


class Attending(nn.Module):
    """``nn.MultiheadAttention`` asked for its weights: it computes attention by hand and drops out in training only."""

    def __init__(self, width: int = 8, heads: int = 2, p: float = 0.25) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads, dropout=p, batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, weights = self.attention(x, x, x, need_weights=True)
        return out, weights
