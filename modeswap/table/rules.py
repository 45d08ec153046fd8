"""The op table: one declarative rule per train/eval-sensitive op of the export training IR.

A rule says which overloads it matches, which schema argument carries the mode
and its value in each mode, the literals worth reporting, and the extra edits a
mode needs. The passes read this table; adding an op is one entry here.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attrs
import torch
from torch.fx import Node

from modeswap.fx.graphs import get_argument, innermost_module
from modeswap.fx.torch_private import OpOverload
from modeswap.records.modes import Kind, Mode, Scalar, memo_of

aten = torch.ops.aten


class Sentinel(enum.Enum):
    """What a rule or a site holds where a literal would be."""

    #: A rule's training value that differs from node to node: remembered in each node's memo (attention's dropout_p).
    PER_NODE = "per node"
    #: A site's training value that neither the node nor the graph records.
    UNKNOWN = "unknown"


@attrs.frozen
class Untrainable:
    """An eval-graph value that no train graph can express exactly."""

    argument: str
    value: Scalar
    why: str


@attrs.frozen
class Counter:
    """A buffer that the op's module increments before each call in train mode, and never in eval.

    ``nn.BatchNorm`` increments ``num_batches_tracked``, registered beside its
    ``running_mean``; export writes the increment as ``add_(counter, 1)`` right
    before the op.
    """

    buffer: str  # the buffer's name in its module
    beside: str  # the op's argument read from a buffer of the same module
    owners: tuple[str, ...]  # type-name prefixes of the modules whose forward increments it


@attrs.frozen
class Rule:
    """How one op encodes ``module.training`` in a graph."""

    kind: Kind
    ops: tuple[OpOverload, ...]  # every overload export may emit
    flag: str  # the schema argument that carries the mode
    train: Scalar | Sentinel  # its value in train mode
    eval: Scalar  # its value in eval mode
    family: tuple[str, ...]  # type-name prefixes of the modules that call the op and follow their mode
    params: tuple[str, ...] = ()  # literals a Site reports; never changed
    needs: str | None = None  # the op depends on the mode only when this argument is a tensor
    counter: Counter | None = None
    untrainable: tuple[Untrainable, ...] = ()
    # An argument that eager code often zeroes outside training (``p if self.training else 0.0``):
    # at 0.0 in an eval graph its training value is unknown, unless a module of the family made the call.
    gated: str | None = None
    # Overloads that may return their very input in eval mode (see modeswap.table.aliases): export then
    # routes every later use of the input through the node, and an eval graph cannot tell those
    # uses from the op's own.
    eval_aliases: tuple[OpOverload, ...] = ()
    # In eval mode the op returns its input's values (a dropout): what compares two graphs reads through it.
    identity_in_eval: bool = False

    def applies(self, node: Node) -> bool:
        """Whether ``node``'s behaviour depends on the mode under this rule."""
        return self.needs is None or get_argument(node, self.needs) is not None

    def mode(self, node: Node) -> Mode | None:
        """The mode ``node`` is in, or ``None`` when its arguments behave alike in both."""
        value = get_argument(node, self.flag)
        if value != self.eval:
            return Mode.TRAIN
        if self.train is Sentinel.PER_NODE and getattr(memo_of(node), "values", {}).get(self.flag) is None:
            return None  # e.g. attention with dropout_p=0.0: nothing tells
        return Mode.EVAL

    def functional(self, node: Node) -> bool:
        """Whether ``node`` was called outside a module of the op's family (``F.dropout`` in a user's forward).

        Such a call may follow ``self.training`` or hard-code a mode; the graph
        cannot tell which, so its mode is inferred from its arguments alone.
        """
        _, owner = innermost_module(node) or ("", "")
        return not owner.startswith(self.family)


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
        (
            aten.dropout.default,
            aten.dropout_.default,
            aten.feature_dropout.default,
            aten.feature_dropout_.default,
            aten.alpha_dropout.default,
            aten.alpha_dropout_.default,
            aten.feature_alpha_dropout.default,
            aten.feature_alpha_dropout_.default,
        ),
        flag="train",
        train=True,
        eval=False,
        family=("torch.nn.modules.dropout.",),
        params=("p",),
        gated="p",  # transformers' eager attention: dropout(w, p=0.0 if not self.training else p)
        # The in-place variants return their input in both modes: their uses are the same in both.
        eval_aliases=(
            aten.dropout.default,
            aten.feature_dropout.default,
            aten.alpha_dropout.default,
            aten.feature_alpha_dropout.default,
        ),
        identity_in_eval=True,
    ),
    Rule(
        "batch_norm",
        (aten.batch_norm.default,),
        flag="training",
        train=True,
        eval=False,
        family=("torch.nn.modules.batchnorm.",),
        params=("momentum", "eps"),
        needs="running_mean",
        counter=Counter("num_batches_tracked", beside="running_mean", owners=("torch.nn.modules.batchnorm.",)),
        untrainable=(_MOMENTUM_NONE,),
    ),
    Rule(
        "instance_norm",
        (aten.instance_norm.default,),
        flag="use_input_stats",
        train=True,
        eval=False,
        family=("torch.nn.modules.instancenorm.",),
        params=("momentum", "eps"),
        needs="running_mean",
    ),
    Rule(
        "rrelu",
        (aten.rrelu.default, aten.rrelu_.default),
        flag="training",
        train=True,
        eval=False,
        family=("torch.nn.modules.activation.RReLU",),
        params=("lower", "upper"),
    ),
    Rule(
        "attention",
        (aten.scaled_dot_product_attention.default,),
        flag="dropout_p",
        train=Sentinel.PER_NODE,
        eval=0.0,
        family=("torch.nn.modules.activation.MultiheadAttention",),
        params=("dropout_p", "is_causal"),
    ),
    # nn.LSTM, nn.GRU and nn.RNN: dropout between stacked layers; .data takes a packed sequence.
    Rule(
        "rnn",
        (
            aten.lstm.input,
            aten.lstm.data,
            aten.gru.input,
            aten.gru.data,
            aten.rnn_tanh.input,
            aten.rnn_tanh.data,
            aten.rnn_relu.input,
            aten.rnn_relu.data,
        ),
        flag="train",
        train=True,
        eval=False,
        family=("torch.nn.modules.rnn.",),
        params=("dropout", "num_layers", "bidirectional"),
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

    targets: tuple[OpOverload, ...]
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


@attrs.frozen
class Branch:
    """A module type whose forward branches on ``self.training`` beyond any op a rule swaps.

    Export keeps the side that ran; a swap to one of ``to`` warns when it meets
    such a module without a site inside.
    """

    owner: str  # type-name prefix of the module
    what: str  # what differs between the modes
    to: tuple[Mode, ...] = (Mode.TRAIN, Mode.EVAL)


TRAINING_BRANCHES: tuple[Branch, ...] = (
    # need_weights=True computes attention by hand and calls dropout only when its p is above 0.
    Branch(
        "torch.nn.modules.activation.MultiheadAttention",
        "with need_weights=True, an eval export has no node of its attention dropout",
        to=(Mode.TRAIN,),
    ),
    Branch(
        "torch.nn.utils.parametrizations._SpectralNorm", "it updates its power-iteration vectors only in train mode"
    ),
)

#: Words in a module's name that mark a module eager runs only in train mode (drop path, stochastic
#: depth, DropBlock): in eval it is the identity, so an eval export keeps no node of it. Compared
#: with the module's attribute name, lower-cased, without underscores.
ERASED_IN_EVAL: tuple[str, ...] = ("droppath", "stochasticdepth", "dropblock")

#: What ``ExportedProgram.run_decompositions()`` (or a direct call of a lower-level op) makes of a
#: rule's op, by kind. The mode then hides in shapes no rule reads (an eval dropout is gone
#: altogether), so a swap refuses these graphs rather than leave them in the wrong mode. Names, not
#: ops, so that the table reads the same on a torch that lacks one of them.
DECOMPOSED: dict[str, str] = {
    "aten.native_dropout.default": "dropout",
    "aten._native_batch_norm_legit_functional.default": "batch_norm",
    "aten._native_batch_norm_legit.default": "batch_norm",
    "aten._native_batch_norm_legit.out": "batch_norm",
    "aten._native_batch_norm_legit_no_training.default": "batch_norm",
    "aten.native_batch_norm.default": "batch_norm",
    "aten.native_batch_norm.out": "batch_norm",
    "aten._batch_norm_impl_index.default": "batch_norm",
    "aten._batch_norm_with_update.default": "batch_norm",
    "aten._batch_norm_with_update_functional.default": "batch_norm",
    "aten._batch_norm_no_update.default": "batch_norm",
    "aten.rrelu_with_noise.default": "rrelu",
    "aten.rrelu_with_noise.out": "rrelu",
    "aten.rrelu_with_noise_.default": "rrelu",
    "aten.rrelu_with_noise_functional.default": "rrelu",
    "aten._scaled_dot_product_attention_math.default": "attention",
    "aten._scaled_dot_product_flash_attention_for_cpu.default": "attention",
    "aten._scaled_dot_product_flash_attention.default": "attention",
    "aten._scaled_dot_product_efficient_attention.default": "attention",
    "aten._scaled_dot_product_cudnn_attention.default": "attention",
    "aten._scaled_dot_product_fused_attention_overrideable.default": "attention",
}

#: Fused kernels that eager runs only in eval mode, by the kind of site they hide: the fast paths
#: of ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention``, which a strict export takes
#: when gradients are off. Their train-mode dropouts are not in the graph, so no swap to train can
#: bring them back.
EVAL_ONLY: dict[str, str] = {
    "aten._transformer_encoder_layer_fwd.default": "dropout",
    "aten._native_multi_head_attention.default": "attention",
}


def resolve(names: Iterable[str]) -> list[OpOverload]:
    """The ops ``names`` ("aten.dropout.default") name, leaving out those this torch does not have."""
    ops = []
    for name in names:
        namespace, packet, overload = name.split(".")
        op = getattr(getattr(getattr(torch.ops, namespace), packet, None), overload, None)
        if isinstance(op, OpOverload):
            ops.append(op)
    return ops


#: Every kind of site, in the order the swap passes run: the rules', then the idioms'.
KINDS: tuple[Kind, ...] = tuple(dict.fromkeys([*(rule.kind for rule in RULES), *(idiom.kind for idiom in IDIOMS)]))


def rule_for(node: Node) -> Rule | None:
    """The rule that owns ``node``, if any (``None`` for placeholders, outputs, other ops)."""
    if node.op != "call_function":
        return None
    return _by_op().get(node.target) if isinstance(node.target, OpOverload) else None


#: :data:`RULES` by op, and the table it was made of: a table extended at run time is indexed again.
_INDEX: tuple[tuple[Rule, ...], dict[OpOverload, Rule]] = ((), {})


def _by_op() -> dict[OpOverload, Rule]:
    global _INDEX
    if _INDEX[0] is not RULES:
        _INDEX = (RULES, {op: rule for rule in RULES for op in rule.ops})
    return _INDEX[1]
