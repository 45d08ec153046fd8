"""hypothesis strategies for random models made of every train/eval-sensitive layer modeswap knows.

A model is drawn as a tuple of layer specs (frozen attrs records), so that a
failing example shrinks to a short, readable list of layers::

    @given(modeswap.testing.cases())
    def test_eval_matches_eager(case):
        modeswap.testing.assert_mode_equivalent(case.model, case.args, "eval")

:func:`branched_cases` adds ``if self.training:`` branches, and says which of
them no swap can follow (``Case.differs``)::

    @given(branched_cases())
    def test_check_names_the_branches(case):
        fidelity = modeswap.check(case.model, case.args, attention_dropout=case.attention_dropout)
        assert fidelity.to_eval.exact is not case.differs("eval")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from modeswap.records.modes import Mode
from modeswap.table.aliases import exported_as_alias
from modeswap.testing.models import (
    Attention,
    DropPath,
    Fresh,
    PinnedMode,
    Recurrent,
    SharedBatchNorm,
    Skip,
    TrainOnlyHead,
)

__all__ = [
    "BODIES",
    "BUILDERS",
    "EXACT_LAYERS",
    "EXTRA_LAYERS",
    "LAYERS",
    "Attention",
    "Branch",
    "Builder",
    "Case",
    "DropPath",
    "Fresh",
    "Layer",
    "ModeCall",
    "Options",
    "Outputs",
    "PinnedMode",
    "Recurrent",
    "SharedBatchNorm",
    "Skip",
    "branched_cases",
    "build",
    "cases",
    "layers",
    "mode_calls",
]

#: A layer's options, sorted by name: ``(("p", 0.5), ("cls", "Dropout"))``.
Options = tuple[tuple[str, Any], ...]
#: What a ``branch`` layer (:class:`Branch`) does in the modes it runs in.
BODIES = ("op", "noise", "literal", "output", "buffer", "dropout")


class Branch(nn.Module):
    """A layer with an ``if self.training:`` branch, as models write them by hand.

    ``body`` runs in the modes ``runs`` names (``"train"``, ``"eval"`` or
    ``"both"``): ``op`` computes ``x * 1.5 + 0.1``; ``noise`` adds
    ``randn_like`` noise; ``output`` returns ``x * 0.5`` as an extra output,
    which :class:`Outputs` passes on; ``buffer`` moves a running mean towards the
    batch mean under ``no_grad``, as EvoNorm does (both modes add it to ``x``);
    ``dropout`` calls ``F.dropout(x, p, training=True)``. A ``literal`` body
    runs in both modes: ``x * (literals[0] if self.training else literals[1])``.
    """

    def __init__(self, body: str, runs: str = "both", *, literals: tuple[float, float] = (2.0, 2.0), p: float = 0.5):
        super().__init__()
        self.body, self.runs, self.literals, self.p = body, runs, literals, p
        if body == "buffer":
            self.running_mean: torch.Tensor
            self.register_buffer("running_mean", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.body == "literal":
            return x * (self.literals[0] if self.training else self.literals[1])
        runs = self.runs == "both" or self.training is (self.runs == "train")
        if self.body == "buffer":
            if runs:
                with torch.no_grad():
                    self.running_mean.lerp_(x.mean().detach(), 0.1)
            return x + self.running_mean
        if not runs:
            return x
        match self.body:
            case "op":
                return x * 1.5 + 0.1
            case "noise":
                return x + 0.1 * torch.randn_like(x)
            case "output":
                return x, x * 0.5
            case _:
                return F.dropout(x, self.p, training=True)


class Outputs(nn.Sequential):
    """A sequence of layers that returns, after the last layer's output, the extra outputs its layers returned."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        extra: list[torch.Tensor] = []
        for layer in self:
            out = layer(x)
            if isinstance(out, tuple):
                x, *more = out
                extra += more
            else:
                x = out
        return (x, *extra) if extra else x


@attrs.frozen
class Layer:
    """One layer of a generated model: its kind and the literals it is built with."""

    kind: str  # its name in :data:`BUILDERS`
    options: Options = ()
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
        ps = {dict(layer.options)["p"] for layer in self.layers if _builder(layer).kind == "attention"}
        return ps.pop() if len(ps) == 1 else None

    @property
    def aliasing(self) -> bool:
        """Whether an eval export of it is ambiguous: a dropout that returns its input in eval, read twice.

        That is a skip around such a dropout, or such a dropout right before a skip, which reads its
        input twice (see ``modeswap.table.aliases``), or before branches that read it twice between them.
        """
        pairs = zip(self.layers, self.layers[1:], strict=False)
        return (
            any(_builder(layer).beside and _returns_input(layer) for layer in self.layers)
            or any(_returns_input(layer) and _builder(after).beside for layer, after in pairs)
            or _read_twice(self.layers)
        )

    @property
    def drop_path(self) -> bool:
        """Whether it has a drop path: an eval export erases it for good, so train it from a train export."""
        return any(_builder(layer).erased_in_eval for layer in self.layers)

    def differs(self, target: Mode | str) -> tuple[str, ...]:
        """The paths of the ``branch`` layers that make a swap to ``target`` differ from ``target``'s own export.

        Derived from the specs, not from a swap: see :func:`_differs`.
        """
        mode = Mode.parse(target)
        return tuple(
            str(i)
            for i, layer in enumerate(self.layers)
            if _builder(layer).differs is not None and mode in _differs(layer)
        )

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
_literal = st.sampled_from((0.5, 2.0, 3.0))  # never 1.0, which a trace might drop
_momentum = st.floats(0.01, 0.99).map(lambda m: round(m, 3))
_eps = st.sampled_from((1e-5, 1e-3, 0.01))


def _options(**strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[Options]:
    return st.fixed_dictionaries(strategies).map(lambda d: tuple(sorted(d.items())))


def _branch(body: str) -> st.SearchStrategy[Options]:
    if body == "literal":
        return _options(body=st.just(body), train=_literal, eval=_literal)
    runs = st.sampled_from(("train", "eval", "both"))
    if body == "dropout":
        return _options(body=st.just(body), runs=runs, p=_probability)
    return _options(body=st.just(body), runs=runs)


def _norm_options(dims: int) -> st.SearchStrategy[Options]:
    return _options(momentum=_momentum, eps=_eps, affine=st.booleans(), track=st.booleans())


def _dropout_returns_input(o: dict[str, Any]) -> bool:
    """Whether the dropout of a ``dropout`` or ``skip`` layer built from ``o`` returns its input in an eval export."""
    # nn.AlphaDropout and nn.FeatureAlphaDropout ignore inplace: their forward calls the functional op.
    if o.get("inplace") and o["cls"] not in ("AlphaDropout", "FeatureAlphaDropout"):
        return False  # in place: the same tensor in both modes, so no use can be told apart
    if o["cls"] == "Dropout":
        return exported_as_alias(torch.ops.aten.dropout.default)  # torch 2.15 does, 2.13 copies
    return True


def _branch_eval_reads(o: dict[str, Any]) -> tuple[int, bool]:
    runs = o["body"] == "literal" or o.get("runs") in ("eval", "both")
    if o["body"] == "buffer":
        return (2 if runs else 1), False  # x.mean() for the update, then x + running_mean
    if not runs:
        return 0, True
    return {"noise": (2, False), "output": (1, True)}.get(o["body"], (1, False))


def _branch_differs(o: dict[str, Any]) -> frozenset[Mode]:
    """The modes a swap cannot reach for a :class:`Branch` built from ``o``: what it does only in one mode.

    A swap can turn a dropout on or off, nothing else. A dropout the branch runs
    in train mode only is what a swap to eval turns off (exact), but a swap to
    train cannot add it; one it runs in eval mode only (Monte Carlo dropout) is
    missing from a train export and stays on in a swap to train; one it runs in
    both modes a swap to eval turns off, where eval keeps it on.
    """
    if o["body"] == "literal":
        return frozenset(Mode) if o["train"] != o["eval"] else frozenset()
    if o["body"] == "dropout":
        return frozenset({"train": {Mode.TRAIN}, "eval": set(Mode), "both": {Mode.EVAL}}[o["runs"]])
    return frozenset(Mode) if o["runs"] != "both" else frozenset()


def _always(o: dict[str, Any]) -> bool:
    return True


def _never(o: dict[str, Any]) -> bool:
    return False


def _read_once(o: dict[str, Any]) -> tuple[int, bool]:
    return 1, False


@attrs.frozen
class Builder:
    """Everything about one layer of generated models: the site it exercises, how to draw it and build it.

    Adding a layer is one entry of :data:`BUILDERS`; :data:`LAYERS`,
    :func:`layers`, :func:`build` and the facts :class:`Case` derives
    (``aliasing``, ``drop_path``, ``differs``, ``attention_dropout``) read it.
    """

    #: The kind (``modeswap.table.rules.KINDS``) of the sites a train export of it has; ``None``: it has none
    #: by design (it exercises something else: shapes, ``if self.training:`` branches, unread state).
    kind: str | None
    #: The strategy for its options, on inputs of ``dims`` spatial dimensions.
    options: Callable[[int], st.SearchStrategy[Options]]
    #: The eager module it stands for, from its options, the spatial dimensions, the input's channels and last
    #: size (width); and the channels of the module's output.
    module: Callable[[dict[str, Any], int, int, int], tuple[nn.Module, int]]
    #: Whether :func:`cases` draws it only when asked (:data:`EXTRA_LAYERS`), not by default (:data:`LAYERS`).
    extra: bool = False
    #: Whether a train export of it, built from these options, has a site of ``kind`` (a norm: with running stats).
    has_site: Callable[[dict[str, Any]], bool] = _always
    #: Whether its dropout returns its input tensor itself in an eval export (``modeswap.table.aliases``).
    returns_input: Callable[[dict[str, Any]], bool] = _never
    #: How many ops read its input in eval mode, and whether it returns that input itself.
    eval_reads: Callable[[dict[str, Any]], tuple[int, bool]] = _read_once
    #: Whether it adds its input to its dropout's output (``drop(x) + x``), reading the input twice.
    beside: bool = False
    #: Whether an eval export keeps no node of it, so that no swap to train brings it back (a drop path).
    erased_in_eval: bool = False
    #: Whether it may return extra outputs, which :class:`Outputs` passes on.
    extra_outputs: bool = False
    #: For a layer no swap can always follow (an ``if self.training:`` branch): the modes a swap cannot reach,
    #: from its options. Such a layer is never pinned to one mode: it would branch on nothing.
    differs: Callable[[dict[str, Any]], frozenset[Mode]] | None = None


def _conv(o: dict[str, Any], dims: int, channels: int, width: int) -> tuple[nn.Module, int]:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    return conv(channels, o["channels"], o["kernel"], padding=o["kernel"] // 2), o["channels"]


def _batch_norm(o: dict[str, Any], dims: int, channels: int, width: int) -> tuple[nn.Module, int]:
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    return bn(channels, o["eps"], o["momentum"], o["affine"], o["track"]), channels


def _shared_batch_norm(o: dict[str, Any], dims: int, channels: int, width: int) -> tuple[nn.Module, int]:
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    return SharedBatchNorm(bn, channels, o["momentum"], o["same_module"]), channels


def _instance_norm(o: dict[str, Any], dims: int, channels: int, width: int) -> tuple[nn.Module, int]:
    norm = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 1]
    return norm(channels, o["eps"], o["momentum"], o["affine"], o["track"]), channels


def _dropout(o: dict[str, Any], dims: int, channels: int, width: int) -> tuple[nn.Module, int]:
    dropout = getattr(nn, o["cls"])(o["p"], inplace=o["inplace"])
    return (nn.Sequential(Fresh(), dropout) if o["inplace"] else dropout), channels


def _rnn(o: dict[str, Any], dims: int, channels: int, width: int) -> tuple[nn.Module, int]:
    return Recurrent(o["cell"], width, o["layers"], o["p"], o["bidirectional"], o["batch_first"]), channels


def _branch_module(o: dict[str, Any], dims: int, channels: int, width: int) -> tuple[nn.Module, int]:
    literals = (o["train"], o["eval"]) if o["body"] == "literal" else (2.0, 2.0)
    return Branch(o["body"], o.get("runs", "both"), literals=literals, p=o.get("p", 0.5)), channels


#: Every layer a generated model may contain, by name (``Layer.kind``), in the order :func:`layers` samples them.
BUILDERS: Mapping[str, Builder] = MappingProxyType(
    {
        "conv": Builder(None, lambda dims: _options(channels=st.integers(1, 4), kernel=st.sampled_from((1, 3))), _conv),
        "linear": Builder(None, lambda dims: _options(), lambda o, dims, c, width: (nn.Linear(width, width), c)),
        "batch_norm": Builder("batch_norm", _norm_options, _batch_norm, has_site=lambda o: bool(o["track"])),
        # One batch norm called twice, or two sharing their running stats.
        "shared_batch_norm": Builder(
            "batch_norm", lambda dims: _options(momentum=_momentum, same_module=st.booleans()), _shared_batch_norm
        ),
        "dropout": Builder(
            "dropout",
            lambda dims: _options(cls=st.sampled_from(_DROPOUTS[dims]), p=_probability, inplace=st.booleans()),
            _dropout,
            returns_input=_dropout_returns_input,
        ),
        "rrelu": Builder(
            "rrelu",
            lambda dims: _options(lower=st.floats(0.0, 0.3), upper=st.floats(0.31, 0.9)),
            lambda o, dims, c, width: (nn.RReLU(o["lower"], o["upper"]), c),
        ),
        "instance_norm": Builder("instance_norm", _norm_options, _instance_norm, has_site=lambda o: bool(o["track"])),
        # Its p is the one all attention layers of a case share (``Case.attention_dropout``).
        "attention": Builder(
            "attention",
            lambda dims: _options(p=_probability, causal=st.booleans()),
            lambda o, dims, c, width: (Attention(o["p"], o["causal"]), c),
        ),
        # An eval export never ran it: see ``Case.drop_path``.
        "drop_path": Builder(
            "drop_path",
            lambda dims: _options(p=_probability, idiom=st.sampled_from(DropPath.IDIOMS)),
            lambda o, dims, c, width: (DropPath(o["p"], o["idiom"]), c),
            erased_in_eval=True,
        ),
        "rnn": Builder(
            "rnn",
            lambda dims: _options(
                cell=st.sampled_from(Recurrent.CELLS),
                layers=st.integers(2, 3),
                p=_probability,
                bidirectional=st.booleans(),
                batch_first=st.booleans(),
            ),
            _rnn,
        ),
        "relu": Builder(None, lambda dims: _options(), lambda o, dims, c, width: (nn.ReLU(), c)),
        # A dropout beside the identity (``drop(x) + x``), which an eval export cannot tell apart from
        # ``drop(x) + drop(x)`` when the dropout returns its input: see ``Case.aliasing``.
        "skip": Builder(
            "dropout",
            lambda dims: _options(cls=st.sampled_from(_DROPOUTS[dims]), p=_probability),
            lambda o, dims, c, width: (Skip(getattr(nn, o["cls"])(o["p"])), c),
            extra=True,
            returns_input=_dropout_returns_input,
            beside=True,
        ),
        # An ``if self.training:`` branch (:class:`Branch`), which no swap can follow: see ``Case.differs``.
        "branch": Builder(
            None,
            lambda dims: st.sampled_from(BODIES).flatmap(_branch),
            _branch_module,
            extra=True,
            eval_reads=_branch_eval_reads,
            extra_outputs=True,
            differs=_branch_differs,
        ),
        # A head that only training runs (:class:`TrainOnlyHead`), whose state an eval export holds unread.
        "aux_head": Builder(
            None,
            lambda dims: _options(),
            lambda o, dims, c, width: (TrainOnlyHead(width), c),
            extra=True,
            extra_outputs=True,
        ),
    }
)

#: Layer kinds a generated model may contain.
LAYERS = tuple(name for name, builder in BUILDERS.items() if not builder.extra)
#: Layer kinds that :func:`cases` can draw but does not by default (``skip``, ``branch``, ``aux_head``):
#: their entries in :data:`BUILDERS` say why.
EXTRA_LAYERS = tuple(name for name, builder in BUILDERS.items() if builder.extra)
#: Layer kinds whose swap is exact both ways, given ``Case.attention_dropout``: an eval export
#: never ran a drop path, and a skip may be refused (``Case.aliasing``).
EXACT_LAYERS = tuple(name for name in LAYERS if not BUILDERS[name].erased_in_eval)


def _builder(layer: Layer) -> Builder:
    try:
        return BUILDERS[layer.kind]
    except KeyError:
        msg = f"unknown layer kind {layer.kind!r}; expected one of {tuple(BUILDERS)}"
        raise ValueError(msg) from None


def _returns_input(layer: Layer) -> bool:
    """Whether the dropout of ``layer`` returns its input tensor itself in an eval export."""
    return _builder(layer).returns_input(dict(layer.options))


def _read_twice(specs: tuple[Layer, ...]) -> bool:
    """Whether branches read the output of a dropout that returns its input in eval more than once, in eval mode.

    A branch that does nothing in eval passes its input on; an ``output`` body
    reads it and passes it on; the model's output reads it once.
    """
    reads: int | None = None  # reads of the live dropout output so far; None when there is none
    for spec in specs:
        if reads is not None:
            read, passes = _eval_reads(spec)
            reads += read
            if not passes:
                if reads > 1:
                    return True
                reads = None
        if _returns_input(spec):
            reads = 0
    return reads is not None and reads + 1 > 1


def _eval_reads(spec: Layer) -> tuple[int, bool]:
    """How many ops read the input of ``spec`` in eval mode, and whether it returns that input itself."""
    return _builder(spec).eval_reads(dict(spec.options))


def _differs(layer: Layer) -> frozenset[Mode]:
    """The modes a swap cannot reach for ``layer`` (see ``Builder.differs``): what it does only in one mode."""
    differs = _builder(layer).differs
    if differs is None:
        return frozenset()
    if layer.mode is not None:
        msg = f"a {layer.kind} pinned to one mode runs as that mode in both exports; cases() never draws one"
        raise ValueError(msg)
    return differs(dict(layer.options))


def layers(dims: int, *, kinds: tuple[str, ...] = LAYERS, mixed: bool = False) -> st.SearchStrategy[Layer]:
    """Strategy for one :class:`Layer` of a model on ``dims`` spatial dimensions."""
    by_kind = {kind: BUILDERS[kind].options(dims) for kind in kinds}
    pinned = st.sampled_from((None, "train", "eval")) if mixed else st.just(None)
    return st.sampled_from(kinds).flatmap(
        lambda kind: st.builds(
            Layer,
            st.just(kind),
            by_kind[kind],
            # A pinned branch runs as one mode in both exports: it would branch on nothing.
            st.just(None) if BUILDERS[kind].differs is not None else pinned,
        ),
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
        if _builder(s).kind == "attention"
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


@attrs.frozen
class ModeCall:
    """One ``.train(training)`` call on the submodule at ``path`` of a model (``""``: the model itself)."""

    path: str
    training: bool

    def apply(self, model: nn.Module) -> None:
        """Make the call on ``model``: ``model.get_submodule(path).train(training)``."""
        model.get_submodule(self.path).train(self.training)

    def __repr__(self) -> str:
        return f"{f'model.{self.path}' if self.path else 'model'}.{'train' if self.training else 'eval'}()"


def mode_calls(model: nn.Module, *, max_calls: int = 5) -> st.SearchStrategy[tuple[ModeCall, ...]]:
    """Strategy for a sequence of ``.train()`` / ``.eval()`` calls on ``model`` and its submodules.

    The calls set submodule modes as everyday eager code does (``model.train();
    model.bn.eval()`` freezes a batch norm while fine-tuning), so the model
    ends up with its modules in mixed modes::

        @given(data=st.data(), case=cases())
        def test_modal_follows_submodule_modes(data, case):
            for call in data.draw(mode_calls(case.model)):
                call.apply(case.model)
    """
    paths = [path for path, _ in model.named_modules()]
    call = st.builds(ModeCall, st.sampled_from(paths), st.booleans())
    return st.lists(call, min_size=1, max_size=max_calls).map(tuple)


@st.composite
def branched_cases(
    draw: st.DrawFn,
    *,
    max_layers: int = 3,
    max_branches: int = 3,
    kinds: tuple[str, ...] = EXACT_LAYERS,
) -> Case:
    """Strategy for a :class:`Case` with ``if self.training:`` branches (:class:`Branch`) among layers of ``kinds``.

    ``Case.differs(mode)`` names the branches that make a swap to ``mode``
    differ from that mode's own export. Some branches change nothing (the same
    body in both modes, the same literal on both sides); with the default
    ``kinds``, and ``attention_dropout=Case.attention_dropout``, nothing but the
    branches named there makes a swap differ.

    Beside attention, a dropout branch runs in train mode only: an eval export
    whose only sites are always-on dropouts reads as a train graph, and a swap
    of it to train leaves attention at ``dropout_p=0.0`` whatever
    ``attention_dropout`` says.
    """
    case = draw(cases(max_layers=max_layers, kinds=kinds))
    branches = draw(st.lists(layers(case.dims, kinds=("branch",)), min_size=1, max_size=max_branches))
    if case.attention_dropout is not None:
        branches = [_train_only(branch) for branch in branches]
    specs = list(case.layers)
    for branch in branches:
        specs.insert(draw(st.integers(0, len(specs))), branch)
    _, channels, *_, width = case.args[0].shape
    model = build(tuple(specs), dims=case.dims, channels=channels, width=width)
    return Case(model, case.args, tuple(specs), case.dims)


def _train_only(branch: Layer) -> Layer:
    options = dict(branch.options)
    if options["body"] != "dropout":
        return branch
    return attrs.evolve(branch, options=tuple(sorted((options | {"runs": "train"}).items())))


def build(specs: tuple[Layer, ...], *, dims: int, channels: int, width: int) -> nn.Sequential:
    """Build the eager model ``specs`` describe, for inputs of ``channels`` channels and last size ``width``.

    With a ``branch`` or ``aux_head`` layer the model is an :class:`Outputs`, which returns the extra
    outputs of its layers.
    """
    modules: list[nn.Module] = []
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for spec in specs:
            module, channels = _module(spec, dims, channels, width)
            modules.append(module if spec.mode is None else PinnedMode(module, spec.mode == "train"))
    tuples = any(_builder(spec).extra_outputs for spec in specs)
    return (Outputs if tuples else nn.Sequential)(*modules)


def _module(spec: Layer, dims: int, channels: int, width: int) -> tuple[nn.Module, int]:
    return _builder(spec).module(dict(spec.options), dims, channels, width)
