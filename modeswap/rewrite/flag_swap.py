"""The generic swap: put every site of one kind in a mode by setting the argument its rule names.

What a rule describes as data (a training value remembered per node, a gated
argument, a batch counter, values no train graph can express, eval results that
alias their input) is handled here once, for every rule that has it.
"""

from __future__ import annotations

from typing import Any

import attrs
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from modeswap.fx.graphs import describe, get_argument, set_argument
from modeswap.records.errors import UnsupportedGraphError
from modeswap.records.modes import Change, Memo, Mode, memo_of, set_memo
from modeswap.records.options import Options
from modeswap.rewrite import counters
from modeswap.rewrite.base import Context
from modeswap.rewrite.occurrence import Occurrence, occurrences, stays, training_probability
from modeswap.table import aliases
from modeswap.table.rules import Sentinel


def swap_flags(gm: GraphModule, context: Context, kind: str, mode: Mode, stated: Options) -> list[Change]:
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


def _to_eval(t: Occurrence) -> list[Change]:
    rule, node = t.rule, t.node
    value = _literal_flag(t)
    if value == rule.eval:
        if rule.train is Sentinel.PER_NODE and t.captured is Mode.TRAIN and memo_of(node) is None:
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
    unknown = Memo({training[0]: None}) if training is not None and training[1] is Sentinel.UNKNOWN else None
    if rule.train is Sentinel.PER_NODE:
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
    if training is not None and training[0] != rule.flag and training[1] is not Sentinel.UNKNOWN:
        argument, p = training
        if (held := get_argument(node, argument)) != p:
            set_argument(node, argument, p)
            changes.append(Change(t.name, str(node.target), argument, held, p))
    if value != train and rule.counter is not None and counters.add(t, rule.counter, memo):
        changes.append(Change(t.name, str(node.target), counters.field(rule.counter), False, True))
    return changes


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
    if training is not None and training[1] is not Sentinel.UNKNOWN and training[1] == 0.0:
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
