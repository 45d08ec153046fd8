"""The site model: one site of a graph as a swap sees it (:class:`Occurrence`), and what graph and user say of it.

Reading only: whether a swap leaves a site as it is, the training value a
site records or the user states, and where the two contradict. The swap
kernels (``flag_swap``, ``idioms``) and the checks (``warning_passes``)
read sites through it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from torch.fx import GraphModule, Node

from modeswap.fx.graphs import calls, describe, get_argument, graph_modules, module_path, qualified_name
from modeswap.fx.torch_private import OpOverload
from modeswap.records.errors import UnsupportedGraphError, lowered
from modeswap.records.modes import Memo, Mode, memo_of, set_memo
from modeswap.records.options import Options
from modeswap.table import rules as table
from modeswap.table.rules import DECOMPOSED, EVAL_ONLY, Rule, Sentinel, resolve

if TYPE_CHECKING:
    from modeswap.rewrite.base import Context


@attrs.frozen
class Occurrence:
    """One site to swap (a node a rule applies to), and what the rest of the graph says about it."""

    node: Node
    name: str  # unique in the module tree: "submod_1.dropout" inside a subgraph
    rule: Rule
    module: GraphModule  # the graph module whose graph holds the node
    context: Context
    buffers: Mapping[str, str]  # lifted placeholders of this graph -> the buffers they stand for
    reads: dict[str, Node]  # get_attr target -> node in this graph; shared, kept current by counters
    stated: Options  # what the user states that the graph does not record
    captured: Mode | None  # the mode the graph's fixed sites were captured in, kept sites aside


def stays(node: Node, stated: Options) -> bool:
    """Whether the site at ``node`` is to stay as it is; mark one that ``keep=`` names, so later swaps keep it too.

    A site outside the modules the swap is for (``Options.within``) stays unmarked.
    """
    memo = memo_of(node)
    if memo is not None and memo.kept:
        return True
    path = module_path(node)
    if not stated.reaches(path):
        return True
    if not stated.keeps(path):
        return False
    set_memo(node, attrs.evolve(memo or Memo(), kept=True))
    return True


@functools.cache
def _refused(kind: str) -> tuple[tuple[OpOverload, ...], tuple[OpOverload, ...]]:
    """The ops of ``kind`` that no swap can handle: decomposed ones, and fused eval-only kernels."""

    def of_kind(table: Mapping[str, str]) -> tuple[OpOverload, ...]:
        return tuple(resolve(name for name, of_kind in table.items() if of_kind == kind))

    return of_kind(DECOMPOSED), of_kind(EVAL_ONLY)


def occurrences(gm: GraphModule, context: Context, kind: str, mode: Mode, stated: Options) -> Iterator[Occurrence]:
    """Every site of ``kind`` in ``gm`` and its subgraphs, refusing the ops no swap to ``mode`` can handle."""
    rules = [rule for rule in table.RULES if rule.kind == kind]
    decomposed, eval_only = _refused(kind)
    if mode is not Mode.TRAIN:
        eval_only = ()  # an eval swap leaves them as they are: they compute what eager eval does
    captured = functools.cache(lambda: context.captured(stated.keeps))  # read only where a site is
    for path, module in graph_modules(gm):
        for node in calls(module.graph, decomposed):
            _refuse_decomposed(qualified_name(path, node), node)
        for node in calls(module.graph, eval_only):
            _refuse_eval_only(qualified_name(path, node), node)
        sites = [(rule, node) for rule in rules for node in calls(module.graph, rule.ops) if rule.applies(node)]
        if not sites:
            continue  # most kinds have no site in most graphs: read nothing more
        lifted = context.buffers if module is gm else {}  # subgraph placeholders are not in the signature
        reads = {str(n.target): n for n in module.graph.find_nodes(op="get_attr")}  # find_nodes(target=) scans
        for rule, node in sites:
            yield Occurrence(node, qualified_name(path, node), rule, module, context, lifted, reads, stated, captured())


def training_probability(t: Occurrence) -> tuple[str, Any] | None:
    """The probability argument of ``t`` that train mode may set, and its training value, or ``None``.

    The value is the one the graph records, else the one the user states
    (``dropout=``, then ``attention_dropout=`` for attention), else what the
    graph's mode suggests (see :func:`_inferred`), else :data:`Sentinel.UNKNOWN`. A
    recorded value wins over a stated one; :func:`contradiction` says where
    they differ, and ``preflight`` raises there.
    """
    recorded = recorded_training(t)
    if recorded is None or recorded[1] is not Sentinel.UNKNOWN:
        return recorded
    stated = stated_training(t)
    if stated is not None:
        return recorded[0], stated[1]
    return recorded_probability(t.rule, t.node, t.captured)


def recorded_training(t: Occurrence) -> tuple[str, Any] | None:
    """The probability argument of ``t`` that train mode may set, and the training value the graph records, or ``None``.

    The value is :data:`Sentinel.UNKNOWN` where the graph records none, and where it is
    only inferred from the mode the graph seems to be in: what the user states
    wins over that inference.
    """
    recorded = recorded_probability(t.rule, t.node, t.captured)
    if recorded is not None and _inferred(t):
        return recorded[0], Sentinel.UNKNOWN
    return recorded


def stated_training(t: Occurrence) -> tuple[str, float] | None:
    """The option that states the training probability of ``t`` (``"dropout={'encoder': 0.1}"``) and its value.

    A ``dropout=`` pattern decides a site before ``attention_dropout=`` does;
    ``None`` where neither speaks of ``t``.
    """
    decided = t.stated.dropout_for(module_path(t.node))
    if decided is not None:
        pattern, p = decided
        return f"dropout={{{pattern!r}: {p}}}", p
    if t.rule.train is Sentinel.PER_NODE and t.stated.attention_dropout is not None:
        return f"attention_dropout={t.stated.attention_dropout}", t.stated.attention_dropout
    return None


def holds(t: Occurrence) -> bool:
    """Whether ``t`` bears out a ``dropout=`` pattern that decides its module: it takes the stated value, or records it.

    A site whose training value the graph does not record bears out any value.
    """
    recorded = recorded_training(t)
    if recorded is None:
        return False
    decided = t.stated.dropout_for(module_path(t.node))
    if recorded[1] is Sentinel.UNKNOWN:
        return True
    return decided is not None and not isinstance(recorded[1], Node) and recorded[1] == decided[1]


def contradiction(t: Occurrence) -> str | None:
    """Why what the user states of ``t`` contradicts the training value the graph records; ``None`` if it does not.

    A value the graph computes instead of holding as a literal cannot be
    compared, so any statement of it is refused.
    """
    recorded, stated = recorded_training(t), stated_training(t)
    if recorded is None or stated is None or recorded[1] is Sentinel.UNKNOWN:
        return None
    (argument, value), (option, p) = recorded, stated
    if not isinstance(value, Node) and value == p:
        return None
    path = module_path(t.node)
    if option.startswith("dropout="):
        fix = "Leave that module out of the pattern (add a more specific pattern for it)"
    else:
        fix = f"Give that module a pattern of its own (dropout={{{path!r}: {value}}})"
    if isinstance(value, Node):
        return (
            f"{option} cannot hold for {describe(t.name, t.node)}: it computes its training {argument} in the graph "
            f"({value.name}) instead of passing a literal, and modeswap neither sets nor checks it. {fix}"
        )
    return (
        f"{option} contradicts the graph: {describe(t.name, t.node)} records a training {argument} of {value}. "
        f"{fix}, or state {value}"
    )


def _inferred(t: Occurrence) -> bool:
    """Whether ``t``'s training probability is known only because the graph looks captured in train mode.

    That is attention at ``dropout_p=0.0`` with no memo, in a graph whose
    other sites are in train mode. Those sites may hold their mode whatever the
    model's (``F.dropout(x, p, training=True)``), so the inference is weaker
    than a stated value.
    """
    rule, node = t.rule, t.node
    return rule.train is Sentinel.PER_NODE and memo_of(node) is None and get_argument(node, rule.flag) == rule.eval


def recorded_probability(rule: Rule, node: Node, captured: Mode | None) -> tuple[str, Any] | None:
    """The probability argument of ``node`` that a mode may have zeroed, and its training value as recorded.

    Attention's ``dropout_p`` is 0.0 in eval; a dropout's ``p`` is 0.0 in eval
    where eager code wrote ``p if self.training else 0.0``. The training value
    is what a memo or a train-mode literal records, any ``p`` but 0.0 (no mode
    gives it: eager code zeroes ``p`` outside training, it sets no other
    value), and 0.0 in an ``nn.Dropout`` (whose ``p`` does not depend on the
    mode); else it is :data:`Sentinel.UNKNOWN`. ``None`` for a node with no probability
    that a mode may zero.
    """
    memo = memo_of(node)
    argument = rule.flag if rule.train is Sentinel.PER_NODE else rule.gated
    if argument is None:
        return None
    if memo is not None and argument in memo.values:
        held = memo.values[argument]  # None: a train swap met it unknown
        return argument, Sentinel.UNKNOWN if held is None else held
    value = get_argument(node, argument)
    if rule.train is Sentinel.PER_NODE:
        return argument, value if value != rule.eval or captured is Mode.TRAIN else Sentinel.UNKNOWN
    if isinstance(value, Node) or value != 0.0:
        return argument, value  # what eager computes in both modes
    in_eval = get_argument(node, rule.flag) == rule.eval
    known = memo is not None or not in_eval or not rule.functional(node)
    return argument, 0.0 if known else Sentinel.UNKNOWN


def _refuse_decomposed(name: str, node: Node) -> None:
    raise lowered(f"{describe(name, node)} is what lowering makes of a train/eval-sensitive op")


def _refuse_eval_only(name: str, node: Node) -> None:
    msg = (
        f"cannot swap {describe(name, node)} to train mode: it is a fused kernel eager runs only in eval "
        "mode (the fast path torch takes when gradients are off), and the graph keeps none of the dropouts "
        "train mode runs. Export the model with strict=False, or with gradients on, or in train mode."
    )
    raise UnsupportedGraphError(msg)
