"""The op table: one declarative rule per train/eval-sensitive op of the export training IR.

A rule says which overloads it matches, which schema argument carries the mode
and its value in each mode, the literals worth reporting, and the extra edits a
mode needs. The passes read this table; adding an op is one entry here.
"""

from __future__ import annotations

import enum

import attrs
import torch
from torch.fx import Node

from modeswap.graphs import get_argument
from modeswap.modes import Kind, Memo, Mode, Scalar

aten = torch.ops.aten

#: The key under ``node.meta["custom"]`` where a rewrite keeps its :class:`Memo`.
#: ``torch.export.save`` keeps only ``meta["custom"]`` of a node's meta, as JSON,
#: so the memo is stored there, as a plain dict, to survive a save and load.
MEMO_KEY = "modeswap"


class PerNode(enum.Enum):
    """The training value differs from node to node and is remembered, not known."""

    VALUE = "per node"


@attrs.frozen
class Untrainable:
    """An eval-graph value that no train graph can express exactly."""

    argument: str
    value: Scalar
    why: str


@attrs.frozen
class Rule:
    """How one op encodes ``module.training`` in a graph."""

    kind: Kind
    ops: tuple[torch._ops.OpOverload, ...]
    flag: str  # the schema argument that carries the mode
    train: Scalar | PerNode  # its value in train mode
    eval: Scalar  # its value in eval mode
    params: tuple[str, ...] = ()  # literals a Site reports; never changed
    needs: str | None = None  # the op depends on the mode only when this argument is a tensor
    counts_batches: bool = False  # a train graph increments num_batches_tracked right before it
    untrainable: tuple[Untrainable, ...] = ()
    # An argument that eager code often zeroes outside training (``p if self.training else 0.0``):
    # at 0.0 in an eval graph its training value is unknown, unless a module in ``keeps`` owns the call.
    gated: str | None = None
    keeps: tuple[str, ...] = ()

    def applies(self, node: Node) -> bool:
        """Whether ``node``'s behaviour depends on the mode under this rule."""
        return self.needs is None or get_argument(node, self.needs) is not None

    def mode(self, node: Node) -> Mode | None:
        """The mode ``node`` is in, or ``None`` when its arguments behave alike in both."""
        value = get_argument(node, self.flag)
        if value != self.eval:
            return Mode.TRAIN
        if self.train is PerNode.VALUE and memo_of(node) is None:
            return None  # e.g. attention with dropout_p=0.0: nothing tells
        return Mode.EVAL


def _overloads(*names: str) -> tuple[torch._ops.OpOverload, ...]:
    return tuple(getattr(aten, name).default for name in names)


_MOMENTUM_NONE = Untrainable(
    "momentum",
    0.0,
    "An eval graph records BatchNorm(momentum=None) as momentum=0.0, so the two cannot be told "
    "apart, and the cumulative average of momentum=None has no train graph. Give the BatchNorm a "
    "numeric momentum before torch.export.export. A model that really uses momentum=0.0 can be "
    "exported in train mode: its to_eval graph remembers the momentum for the way back.",
)

RULES: tuple[Rule, ...] = (
    Rule(
        "dropout",
        _overloads(
            "dropout",
            "dropout_",
            "feature_dropout",
            "feature_dropout_",
            "alpha_dropout",
            "alpha_dropout_",
            "feature_alpha_dropout",
            "feature_alpha_dropout_",
        ),
        flag="train",
        train=True,
        eval=False,
        params=("p",),
        gated="p",  # transformers' eager attention: dropout(w, p=0.0 if not self.training else p)
        keeps=("torch.nn.modules.dropout.",),
    ),
    Rule(
        "batch_norm",
        _overloads("batch_norm"),
        flag="training",
        train=True,
        eval=False,
        params=("momentum", "eps"),
        needs="running_mean",
        counts_batches=True,
        untrainable=(_MOMENTUM_NONE,),
    ),
    Rule(
        "instance_norm",
        _overloads("instance_norm"),
        flag="use_input_stats",
        train=True,
        eval=False,
        params=("momentum", "eps"),
        needs="running_mean",
    ),
    Rule(
        "rrelu",
        _overloads("rrelu", "rrelu_"),
        flag="training",
        train=True,
        eval=False,
        params=("lower", "upper"),
    ),
    Rule(
        "attention",
        _overloads("scaled_dot_product_attention"),
        flag="dropout_p",
        train=PerNode.VALUE,
        eval=0.0,
        params=("dropout_p", "is_causal"),
    ),
)


class Capture(enum.Enum):
    """A hole in an :class:`Op` pattern, and what may fill it."""

    INPUT = "the tensor the idiom acts on; the same node wherever it appears"
    KEEP = "the keep probability, a float literal; the same wherever it appears"
    SHAPE = "a shape [batch, 1, ..., 1]"


@attrs.frozen
class Op:
    """A pattern node: a call of one of ``targets`` whose leading arguments match ``args``.

    Keyword arguments (dtype, device) are not matched; they are kept as found.
    """

    targets: tuple[torch._ops.OpOverload, ...]
    args: tuple[Op | Capture, ...]
    commutative: bool = False


@attrs.frozen
class Idiom:
    """A hand-written op sequence that eager runs only in train mode; in eval mode it is the identity.

    ``pattern`` is the sequence's last op; every op in it but the ``INPUT``
    feeds only the next one, so eval can remove them all.
    """

    kind: Kind
    name: str
    pattern: Op


_INPUT, _KEEP, _SHAPE = Capture.INPUT, Capture.KEEP, Capture.SHAPE


def _bernoulli_mask(source: Op, *, scaled: bool) -> Op:
    mask = Op((aten.bernoulli_.float,), (source, _KEEP))
    if scaled:
        mask = Op((aten.div_.Tensor, aten.div_.Scalar), (mask, _KEEP))
    return Op((aten.mul.Tensor,), (_INPUT, mask), commutative=True)


IDIOMS: tuple[Idiom, ...] = (
    # transformers: mask = (keep + torch.rand(shape)).floor_(); x.div(keep) * mask
    Idiom(
        "drop_path",
        "rand-floor",
        Op(
            (aten.mul.Tensor,),
            (
                Op((aten.div.Tensor,), (_INPUT, _KEEP)),
                Op(
                    (aten.floor.default, aten.floor_.default),
                    (Op((aten.add.Tensor,), (Op((aten.rand.default,), (_SHAPE,)), _KEEP)),),
                ),
            ),
            commutative=True,
        ),
    ),
    # timm: mask = x.new_empty(shape).bernoulli_(keep); mask.div_(keep) unless scale_by_keep=False; x * mask
    Idiom(
        "drop_path",
        "new_empty-bernoulli",
        _bernoulli_mask(Op((aten.new_empty.default,), (_INPUT, _SHAPE)), scaled=True),
    ),
    Idiom(
        "drop_path",
        "new_empty-bernoulli-unscaled",
        _bernoulli_mask(Op((aten.new_empty.default,), (_INPUT, _SHAPE)), scaled=False),
    ),
    # torchvision.ops.stochastic_depth: mask = torch.empty(shape).bernoulli_(keep).div_(keep); x * mask
    Idiom("drop_path", "empty-bernoulli", _bernoulli_mask(Op((aten.empty.memory_format,), (_SHAPE,)), scaled=True)),
)

RULES_BY_OP: dict[torch._ops.OpOverload, Rule] = {op: rule for rule in RULES for op in rule.ops}

#: What ``ExportedProgram.run_decompositions()`` turns a rule's op into. The mode
#: then hides in shapes no rule reads (an eval dropout is gone altogether), so a
#: swap refuses these graphs rather than leave them in the wrong mode.
DECOMPOSED: dict[torch._ops.OpOverload, Kind] = {
    aten.native_dropout.default: "dropout",
    aten._native_batch_norm_legit_functional.default: "batch_norm",
    aten._native_batch_norm_legit.default: "batch_norm",
    aten._native_batch_norm_legit_no_training.default: "batch_norm",
    aten.native_batch_norm.default: "batch_norm",
    aten._batch_norm_with_update.default: "batch_norm",
    aten._batch_norm_with_update_functional.default: "batch_norm",
    aten._batch_norm_no_update.default: "batch_norm",
    aten.rrelu_with_noise.default: "rrelu",
    aten.rrelu_with_noise_functional.default: "rrelu",
}
KINDS: tuple[Kind, ...] = tuple(dict.fromkeys([*(rule.kind for rule in RULES), *(idiom.kind for idiom in IDIOMS)]))


def rule_for(node: Node) -> Rule | None:
    """The rule that owns ``node``, if any (``None`` for placeholders, outputs, other ops)."""
    if node.op != "call_function":
        return None
    return RULES_BY_OP.get(node.target) if isinstance(node.target, torch._ops.OpOverload) else None


def memo_of(node: Node) -> Memo | None:
    """The memo a previous eval rewrite left on ``node``."""
    stored = node.meta.get("custom", {}).get(MEMO_KEY)
    return None if stored is None else Memo(**stored)


def set_memo(node: Node, memo: Memo | None) -> None:
    """Store ``memo`` on ``node`` (or remove it), leaving other ``custom`` entries alone.

    Node meta is copied shallowly with the graph, so ``meta["custom"]`` may be
    the very dict the original node holds: replace it, never edit it in place.
    """
    custom = {k: v for k, v in node.meta.get("custom", {}).items() if k != MEMO_KEY}
    if memo is not None:
        custom[MEMO_KEY] = {k: v for k, v in attrs.asdict(memo).items() if v is not None}
    if custom:
        node.meta["custom"] = custom
    else:
        node.meta.pop("custom", None)
