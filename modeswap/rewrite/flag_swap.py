"""The generic swap: put every site of one kind in a mode by setting the argument its rule names.

What a rule describes as data (a training value remembered per node, a gated
argument, a batch counter, values no train graph can express, eval results that
alias their input) is handled here once, for every rule that has it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from modeswap.fx.graphs import (
    calls,
    describe,
    get_argument,
    graph_modules,
    memo_of,
    module_path,
    qualified_name,
    set_argument,
    set_memo,
)
from modeswap.records.errors import UnsupportedGraphError
from modeswap.records.modes import Change, Memo, Mode
from modeswap.records.options import Stated
from modeswap.rewrite import counters
from modeswap.rewrite.base import Context
from modeswap.rewrite.occurrence import Occurrence, stays
from modeswap.table import aliases
from modeswap.table.rules import DECOMPOSED, EVAL_ONLY, RULES, PerNode, Rule, resolve

#: The training value of a node that neither the node nor the graph records.
UNKNOWN: Any = object()


def swap_flags(gm: GraphModule, context: Context, kind: str, mode: Mode, stated: Stated) -> list[Change]:
    """Put every site of ``kind`` in ``gm`` (subgraphs included) in ``mode``, in place; return the changes.

    Sites under a module ``stated.keep`` names, or that an earlier swap kept,
    are left as they are and marked kept. A site whose training value is neither
    recorded nor stated keeps the value it has: ``preflight`` warns about it.
    """
    changes: list[Change] = []
    for site in occurrences(gm, context, kind, mode, stated):
        if stays(site.node, stated):
            continue
        if mode is Mode.EVAL:
            changes += _to_eval(site)
        else:
            changes += _to_train(site)
    return changes


@functools.cache
def _refused(kind: str) -> tuple[tuple[torch._ops.OpOverload, ...], tuple[torch._ops.OpOverload, ...]]:
    """The ops of ``kind`` that no swap can handle: decomposed ones, and fused eval-only kernels."""

    def of_kind(table: Mapping[str, str]) -> tuple[torch._ops.OpOverload, ...]:
        return tuple(resolve(name for name, of_kind in table.items() if of_kind == kind))

    return of_kind(DECOMPOSED), of_kind(EVAL_ONLY)


def occurrences(gm: GraphModule, context: Context, kind: str, mode: Mode, stated: Stated) -> Iterator[Occurrence]:
    """Every site of ``kind`` in ``gm`` and its subgraphs, refusing the ops no swap to ``mode`` can handle."""
    rules = [rule for rule in RULES if rule.kind == kind]
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


def _to_eval(t: Occurrence) -> list[Change]:
    rule, node = t.rule, t.node
    value = _literal_flag(t)
    if value == rule.eval:
        if rule.train is PerNode.VALUE and t.captured is Mode.TRAIN and memo_of(node) is None:
            set_memo(node, Memo({rule.flag: value}))  # 0.0 is this node's training value: keep it known
        return []
    # A value a blind train swap left unknown (None) stays unknown.
    unknown = {name: None for name, held in getattr(memo_of(node), "values", {}).items() if held is None}
    memo = Memo({rule.flag: value, **unknown})
    set_argument(node, rule.flag, rule.eval)
    changes = [Change(t.name, str(node.target), rule.flag, value, rule.eval)]
    if rule.counter is not None and (counted := counters.remove(t, rule.counter)) is not None:
        memo = attrs.evolve(memo, counter=counted)
        changes.append(Change(t.name, str(node.target), counters.field(rule.counter), True, False))
    set_memo(node, memo)
    return changes


def _to_train(t: Occurrence) -> list[Change]:
    rule, node = t.rule, t.node
    value = _literal_flag(t)
    memo = memo_of(node)
    training = training_probability(t)
    # preflight warns about an unknown value; the memo says it stays unknown, for a later swap to state.
    unknown = Memo({training[0]: None}) if training is not None and training[1] is UNKNOWN else None
    if rule.train is PerNode.VALUE:
        assert training is not None  # a per-node flag is a probability
        train = training[1]
        if unknown is not None:
            set_memo(node, unknown)
            return []
    else:
        train = rule.train
    if memo is None:
        if value == train:
            return []  # in train mode already
        _refuse_untrainable(t)
        _refuse_aliased(t)
    set_memo(node, unknown)
    changes = []
    if value != train:
        set_argument(node, rule.flag, train)
        changes.append(Change(t.name, str(node.target), rule.flag, value, train))
    if training is not None and training[0] != rule.flag and training[1] is not UNKNOWN:
        argument, p = training
        if (held := get_argument(node, argument)) != p:
            set_argument(node, argument, p)
            changes.append(Change(t.name, str(node.target), argument, held, p))
    if value != train and rule.counter is not None and counters.add(t, rule.counter, memo):
        changes.append(Change(t.name, str(node.target), counters.field(rule.counter), False, True))
    return changes


def training_probability(t: Occurrence) -> tuple[str, Any] | None:
    """The probability argument of ``t`` that train mode may set, and its training value, or ``None``.

    The value is the one the graph records, else the one the user states
    (``dropout=``, then ``attention_dropout=`` for attention), else what the
    graph's mode suggests (see :func:`_inferred`), else :data:`UNKNOWN`. A
    recorded value wins over a stated one; :func:`contradiction` says where
    they differ, and ``preflight`` raises there.
    """
    recorded = recorded_training(t)
    if recorded is None or recorded[1] is not UNKNOWN:
        return recorded
    stated = stated_training(t)
    if stated is not None:
        return recorded[0], stated[1]
    return recorded_probability(t.rule, t.node, t.captured)


def recorded_training(t: Occurrence) -> tuple[str, Any] | None:
    """The probability argument of ``t`` that train mode may set, and the training value the graph records, or ``None``.

    The value is :data:`UNKNOWN` where the graph records none, and where it is
    only inferred from the mode the graph seems to be in: what the user states
    wins over that inference.
    """
    recorded = recorded_probability(t.rule, t.node, t.captured)
    if recorded is not None and _inferred(t):
        return recorded[0], UNKNOWN
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
    if t.rule.train is PerNode.VALUE and t.stated.attention_dropout is not None:
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
    if recorded[1] is UNKNOWN:
        return True
    return decided is not None and not isinstance(recorded[1], Node) and recorded[1] == decided[1]


def contradiction(t: Occurrence) -> str | None:
    """Why what the user states of ``t`` contradicts the training value the graph records; ``None`` if it does not.

    A value the graph computes instead of holding as a literal cannot be
    compared, so any statement of it is refused.
    """
    recorded, stated = recorded_training(t), stated_training(t)
    if recorded is None or stated is None or recorded[1] is UNKNOWN:
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
    return rule.train is PerNode.VALUE and memo_of(node) is None and get_argument(node, rule.flag) == rule.eval


def recorded_probability(rule: Rule, node: Node, captured: Mode | None) -> tuple[str, Any] | None:
    """The probability argument of ``node`` that a mode may have zeroed, and its training value as recorded.

    Attention's ``dropout_p`` is 0.0 in eval; a dropout's ``p`` is 0.0 in eval
    where eager code wrote ``p if self.training else 0.0``. The training value
    is what a memo or a train-mode literal records, any ``p`` but 0.0 (no mode
    gives it: eager code zeroes ``p`` outside training, it sets no other
    value), and 0.0 in an ``nn.Dropout`` (whose ``p`` does not depend on the
    mode); else it is :data:`UNKNOWN`. ``None`` for a node with no probability
    that a mode may zero.
    """
    memo = memo_of(node)
    argument = rule.flag if rule.train is PerNode.VALUE else rule.gated
    if argument is None:
        return None
    if memo is not None and argument in memo.values:
        held = memo.values[argument]  # None: a train swap met it unknown
        return argument, UNKNOWN if held is None else held
    value = get_argument(node, argument)
    if rule.train is PerNode.VALUE:
        return argument, value if value != rule.eval or captured is Mode.TRAIN else UNKNOWN
    if isinstance(value, Node) or value != 0.0:
        return argument, value  # what eager computes in both modes
    in_eval = get_argument(node, rule.flag) == rule.eval
    known = memo is not None or not in_eval or not rule.functional(node)
    return argument, 0.0 if known else UNKNOWN


def _literal_flag(t: Occurrence) -> Any:
    value = get_argument(t.node, t.rule.flag)
    if isinstance(value, Node):
        msg = (
            f"node {t.name} ({t.node.target}) computes {t.rule.flag} in the graph "
            f"({value.name}) instead of passing a literal, so modeswap cannot set it"
        )
        raise UnsupportedGraphError(msg)
    return value


def _refuse_untrainable(t: Occurrence) -> None:
    for case in t.rule.untrainable:
        if get_argument(t.node, case.argument) == case.value:
            msg = f"cannot swap {describe(t.name, t.node)} to train mode: {case.argument}={case.value!r}. {case.why}"
            raise UnsupportedGraphError(msg)


def _refuse_aliased(t: Occurrence) -> None:
    """Refuse an eval node that returns its input, when export may have routed the input's own uses through it.

    A dropout whose training ``p`` is 0.0 returns its very input in train mode
    too (ATen's dropout does nothing at 0, as timm's position dropout is by
    default): its uses read the same tensor whichever way they were routed.
    """
    if t.node.target not in t.rule.eval_aliases:
        return
    training = training_probability(t)
    if training is not None and training[1] is not UNKNOWN and training[1] == 0.0:
        return
    uses = _uses(t.node)
    if uses <= 1 or not aliases.returns_input(t.node):
        return
    msg = (
        f"cannot swap {describe(t.name, t.node)} to train mode: in eval mode this op returns its input itself, so "
        f"export sent every later use of that input through it ({uses} uses), and the graph cannot tell "
        "which of them eager feeds the dropped tensor and which the input. Export the model in train "
        "mode instead: modeswap.to_eval of that graph remembers the difference for the way back."
    )
    raise UnsupportedGraphError(msg)


def _uses(node: Node) -> int:
    """How many times ``node`` appears among the arguments of its users (``add(d, d)`` uses it twice)."""
    seen: list[Node] = []
    for user in node.users:
        map_arg((user.args, user.kwargs), seen.append)
    return seen.count(node)


def _refuse_decomposed(name: str, node: Node) -> None:
    msg = (
        f"{describe(name, node)} is what ExportedProgram.run_decompositions() makes of a "
        f"train/eval-sensitive op; its mode cannot be swapped there. Swap before run_decompositions()."
    )
    raise UnsupportedGraphError(msg)


def _refuse_eval_only(name: str, node: Node) -> None:
    msg = (
        f"cannot swap {describe(name, node)} to train mode: it is a fused kernel eager runs only in eval "
        "mode (the fast path torch takes when gradients are off), and the graph keeps none of the dropouts "
        "train mode runs. Export the model with strict=False, or with gradients on, or in train mode."
    )
    raise UnsupportedGraphError(msg)
