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
KINDS: tuple[Kind, ...] = tuple(rule.kind for rule in RULES)


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
        custom[MEMO_KEY] = attrs.asdict(memo)
    if custom:
        node.meta["custom"] = custom
    else:
        node.meta.pop("custom", None)
