"""hypothesis strategies for random models made of every train/eval-sensitive layer modeswap knows.

A model is drawn as a tuple of layer specs (frozen attrs records), so that a
failing example shrinks to a short, readable list of layers::

    @given(modeswap.testing.cases())
    def test_eval_matches_eager(case):
        modeswap.testing.assert_mode_equivalent(case.model, case.args, "eval")
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from hypothesis import strategies as st
from torch import nn

from modeswap.aliases import exported_as_alias
from modeswap.testing.models import Attention, DropPath, Fresh, PinnedMode, Recurrent, SharedBatchNorm, Skip

__all__ = [
    "EXTRA_LAYERS",
    "LAYERS",
    "Attention",
    "Case",
    "DropPath",
    "Fresh",
    "Layer",
    "PinnedMode",
    "Recurrent",
    "SharedBatchNorm",
    "Skip",
    "build",
    "cases",
    "layers",
]

#: Layer kinds a generated model may contain.
LAYERS = (
    "conv",
    "linear",
    "batch_norm",
    "shared_batch_norm",
    "dropout",
    "rrelu",
    "instance_norm",
    "attention",
    "drop_path",
    "rnn",
    "relu",
)
#: Layer kinds that :func:`cases` can draw but does not by default: a ``skip`` is a dropout beside
#: the identity (``drop(x) + x``), which an eval export cannot tell apart from ``drop(x) + drop(x)``
#: when the dropout returns its input (see ``Case.aliasing``).
EXTRA_LAYERS = ("skip",)


@attrs.frozen
class Layer:
    """One layer of a generated model: its kind and the literals it is built with."""

    kind: str
    options: tuple[tuple[str, Any], ...] = ()
    mode: str | None = None  # "train" / "eval" to pin this layer's mode; None follows the model


@attrs.frozen
class Case:
    """A generated model, the inputs to call it with, and the specs it was built from."""

    model: nn.Module
    args: tuple[torch.Tensor, ...]
    layers: tuple[Layer, ...]
    dims: int

    @property
    def attention_dropout(self) -> float | None:
        """The ``dropout_p`` its attention layers train with (they share one), or ``None``."""
        ps = {dict(layer.options)["p"] for layer in self.layers if layer.kind == "attention"}
        return ps.pop() if len(ps) == 1 else None

    @property
    def aliasing(self) -> bool:
        """Whether an eval export of it is ambiguous: a dropout that returns its input in eval, read twice.

        That is a skip around such a dropout, or such a dropout right before a skip, which reads its
        input twice (see ``modeswap.aliases``).
        """
        pairs = zip(self.layers, self.layers[1:], strict=False)
        return any(layer.kind == "skip" and _returns_input(layer) for layer in self.layers) or any(
            _returns_input(layer) and after.kind == "skip" for layer, after in pairs
        )

    @property
    def drop_path(self) -> bool:
        """Whether it has a drop path: an eval export erases it for good, so train it from a train export."""
        return any(layer.kind == "drop_path" for layer in self.layers)

    def __repr__(self) -> str:
        layers = ", ".join(f"{layer.kind}{dict(layer.options)}" for layer in self.layers)
        shape = tuple(self.args[0].shape)
        return f"Case(dims={self.dims}, input={shape}, layers=[{layers}])"


_DROPOUTS = {
    1: ("Dropout", "Dropout1d", "AlphaDropout", "FeatureAlphaDropout"),
    2: ("Dropout", "Dropout2d", "AlphaDropout", "FeatureAlphaDropout"),
    3: ("Dropout", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"),
}

_probability = st.floats(0.05, 0.9).map(lambda p: round(p, 3))
_momentum = st.floats(0.01, 0.99).map(lambda m: round(m, 3))
_eps = st.sampled_from((1e-5, 1e-3, 0.01))


def _returns_input(layer: Layer) -> bool:
    """Whether the dropout of ``layer`` returns its input tensor itself in an eval export."""
    if layer.kind not in ("dropout", "skip"):
        return False
    options = dict(layer.options)
    # nn.AlphaDropout and nn.FeatureAlphaDropout ignore inplace: their forward calls the functional op.
    if options.get("inplace") and options["cls"] not in ("AlphaDropout", "FeatureAlphaDropout"):
        return False  # in place: the same tensor in both modes, so no use can be told apart
    if options["cls"] == "Dropout":
        return exported_as_alias(torch.ops.aten.dropout.default)  # torch 2.15 does, 2.13 copies
    return True


def _options(**strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[tuple[str, Any], ...]]:
    return st.fixed_dictionaries(strategies).map(lambda d: tuple(sorted(d.items())))


def layers(dims: int, *, kinds: tuple[str, ...] = LAYERS, mixed: bool = False) -> st.SearchStrategy[Layer]:
    """Strategy for one :class:`Layer` of a model on ``dims`` spatial dimensions."""
    by_kind: dict[str, st.SearchStrategy[tuple[tuple[str, Any], ...]]] = {
        "conv": _options(channels=st.integers(1, 4), kernel=st.sampled_from((1, 3))),
        "linear": _options(),
        "relu": _options(),
        "batch_norm": _options(momentum=_momentum, eps=_eps, affine=st.booleans(), track=st.booleans()),
        "dropout": _options(cls=st.sampled_from(_DROPOUTS[dims]), p=_probability, inplace=st.booleans()),
        "rrelu": _options(lower=st.floats(0.0, 0.3), upper=st.floats(0.31, 0.9)),
        "instance_norm": _options(momentum=_momentum, eps=_eps, affine=st.booleans(), track=st.booleans()),
        "attention": _options(p=_probability, causal=st.booleans()),
        "drop_path": _options(p=_probability, idiom=st.sampled_from(DropPath.IDIOMS)),
        "rnn": _options(
            cell=st.sampled_from(Recurrent.CELLS),
            layers=st.integers(2, 3),
            p=_probability,
            bidirectional=st.booleans(),
            batch_first=st.booleans(),
        ),
        "shared_batch_norm": _options(momentum=_momentum, same_module=st.booleans()),
        "skip": _options(cls=st.sampled_from(_DROPOUTS[dims]), p=_probability),
    }
    pinned = st.sampled_from((None, "train", "eval")) if mixed else st.just(None)
    return st.sampled_from(kinds).flatmap(
        lambda kind: st.builds(Layer, st.just(kind), by_kind[kind], pinned),
    )


@st.composite
def cases(
    draw: st.DrawFn,
    *,
    max_layers: int = 6,
    kinds: tuple[str, ...] = LAYERS,
    mixed: bool = False,
) -> Case:
    """Strategy for a :class:`Case`: a random model of ``kinds`` layers and an input for it.

    Attention layers share one ``dropout_p`` (``Case.attention_dropout``), the
    one value ``to_train(..., attention_dropout=)`` can restore to an eval
    export. With ``mixed``, some layers are pinned to one mode, so the exported
    graph has sites in both modes.
    """
    dims = draw(st.integers(1, 3))
    specs = tuple(draw(st.lists(layers(dims, kinds=kinds, mixed=mixed), min_size=1, max_size=max_layers)))
    attention_p = draw(_probability)
    specs = tuple(
        attrs.evolve(s, options=tuple((k, attention_p if k == "p" else v) for k, v in s.options))
        if s.kind == "attention"
        else s
        for s in specs
    )
    batch = draw(st.integers(2, 3))
    spatial = draw(st.lists(st.integers(2, 5), min_size=dims, max_size=dims))
    channels = draw(st.integers(1, 4))
    model = build(specs, dims=dims, channels=channels, width=spatial[-1])
    seed = draw(st.integers(0, 2**16))
    x = torch.randn((batch, channels, *spatial), generator=torch.Generator().manual_seed(seed))
    return Case(model, (x,), specs, dims)


def build(specs: tuple[Layer, ...], *, dims: int, channels: int, width: int) -> nn.Sequential:
    """Build the eager model ``specs`` describe, for inputs of ``channels`` channels and last size ``width``."""
    modules: list[nn.Module] = []
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for spec in specs:
            module, channels = _module(spec, dims, channels, width)
            modules.append(module if spec.mode is None else PinnedMode(module, spec.mode == "train"))
    return nn.Sequential(*modules)


def _module(spec: Layer, dims: int, channels: int, width: int) -> tuple[nn.Module, int]:
    o = dict(spec.options)
    match spec.kind:
        case "conv":
            conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
            return conv(channels, o["channels"], o["kernel"], padding=o["kernel"] // 2), o["channels"]
        case "linear":
            return nn.Linear(width, width), channels
        case "relu":
            return nn.ReLU(), channels
        case "batch_norm":
            bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
            return bn(channels, o["eps"], o["momentum"], o["affine"], o["track"]), channels
        case "instance_norm":
            norm = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 1]
            return norm(channels, o["eps"], o["momentum"], o["affine"], o["track"]), channels
        case "dropout":
            dropout = getattr(nn, o["cls"])(o["p"], inplace=o["inplace"])
            return (nn.Sequential(Fresh(), dropout) if o["inplace"] else dropout), channels
        case "rrelu":
            return nn.RReLU(o["lower"], o["upper"]), channels
        case "attention":
            return Attention(o["p"], o["causal"]), channels
        case "drop_path":
            return DropPath(o["p"], o["idiom"]), channels
        case "rnn":
            return Recurrent(o["cell"], width, o["layers"], o["p"], o["bidirectional"], o["batch_first"]), channels
        case "shared_batch_norm":
            bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
            return SharedBatchNorm(bn, channels, o["momentum"], o["same_module"]), channels
        case "skip":
            return Skip(getattr(nn, o["cls"])(o["p"])), channels
    msg = f"unknown layer kind {spec.kind!r}; expected one of {LAYERS + EXTRA_LAYERS}"
    raise ValueError(msg)
