"""The generic swap: put every site of one kind in a mode by setting the argument its rule names.

What a rule describes as data (a training value remembered per node, a gated
argument, a batch counter, values no train graph can express, eval results that
alias their input) is handled here once, for every rule that has it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from modeswap import aliases, counters
from modeswap.errors import UnknownTrainingValueWarning, UnsupportedGraphError
from modeswap.graphs import (
    calls,
    describe,
    get_argument,
    graph_modules,
    memo_of,
    qualified_name,
    set_argument,
    set_memo,
)
from modeswap.modes import Change, Memo, Mode
from modeswap.pass_base import Context
from modeswap.rules import DECOMPOSED, EVAL_ONLY, RULES, PerNode, Rule, resolve

#: The training value of a node that neither the node nor the graph records.
_UNKNOWN = object()


@attrs.frozen
class Target:
    """One node to swap, and what the rest of the graph says about it."""

    node: Node
    name: str  # unique in the module tree: "submod_1.dropout" inside a subgraph
    rule: Rule
    module: GraphModule  # the graph module whose graph holds the node
    context: Context
    buffers: Mapping[str, str]  # lifted placeholders of this graph -> the buffers they stand for
    reads: dict[str, Node]  # get_attr target -> node in this graph; shared, kept current by counters


def swap_flags(gm: GraphModule, context: Context, kind: str, mode: Mode, default: float | None) -> list[Change]:
    """Put every site of ``kind`` in ``gm`` (subgraphs included) in ``mode``, in place; return the changes.

    ``default`` is the training value of sites whose value the graph does not
    record (attention ``dropout_p``, a gated dropout ``p``).
    """
    changes: list[Change] = []
    unknown: list[Target] = []
    for target in _targets(gm, context, kind, mode):
        if mode is Mode.EVAL:
            changes += _to_eval(target)
        else:
            changes += _to_train(target, default, unknown)
    if unknown:
        _warn_unknown(unknown)
    return changes


@functools.cache
def _refused(kind: str) -> tuple[tuple[torch._ops.OpOverload, ...], tuple[torch._ops.OpOverload, ...]]:
    """The ops of ``kind`` that no swap can handle: decomposed ones, and fused eval-only kernels."""

    def of_kind(table: Mapping[str, str]) -> tuple[torch._ops.OpOverload, ...]:
        return tuple(resolve(name for name, of_kind in table.items() if of_kind == kind))

    return of_kind(DECOMPOSED), of_kind(EVAL_ONLY)


def _targets(gm: GraphModule, context: Context, kind: str, mode: Mode) -> Iterator[Target]:
    rules = [rule for rule in RULES if rule.kind == kind]
    decomposed, eval_only = _refused(kind)
    if mode is not Mode.TRAIN:
        eval_only = ()  # an eval swap leaves them as they are: they compute what eager eval does
    for path, module in graph_modules(gm):
        for node in calls(module.graph, decomposed):
            _refuse_decomposed(qualified_name(path, node), node)
        for node in calls(module.graph, eval_only):
            _refuse_eval_only(qualified_name(path, node), node)
        lifted = context.buffers if module is gm else {}  # subgraph placeholders are not in the signature
        reads = {str(n.target): n for n in module.graph.find_nodes(op="get_attr")}  # find_nodes(target=) scans
        for rule in rules:
            for node in calls(module.graph, rule.ops):
                if rule.applies(node):
                    yield Target(node, qualified_name(path, node), rule, module, context, lifted, reads)


def _to_eval(t: Target) -> list[Change]:
    rule, node = t.rule, t.node
    value = _literal_flag(t)
    if value == rule.eval:
        if rule.train is PerNode.VALUE and t.context.captured is Mode.TRAIN and memo_of(node) is None:
            set_memo(node, Memo({rule.flag: value}))  # 0.0 is this node's training value: keep it known
        return []
    memo = Memo({rule.flag: value})
    set_argument(node, rule.flag, rule.eval)
    changes = [Change(t.name, str(node.target), rule.flag, value, rule.eval)]
    if rule.counter is not None and (counted := counters.remove(t, rule.counter)) is not None:
        memo = attrs.evolve(memo, counter=counted)
        changes.append(Change(t.name, str(node.target), counters.field(rule.counter), True, False))
    set_memo(node, memo)
    return changes


def _to_train(t: Target, default: float | None, unknown: list[Target]) -> list[Change]:
    rule, node = t.rule, t.node
    value = _literal_flag(t)
    memo = memo_of(node)
    train = _training_value(t, value, memo, default)
    if train is _UNKNOWN:
        unknown.append(t)
        return []
    if memo is None:
        if value == train:
            return []  # in train mode already
        _refuse_untrainable(t)
        _refuse_aliased(t)
    set_memo(node, None)
    if value == train:
        return []
    set_argument(node, rule.flag, train)
    changes = [Change(t.name, str(node.target), rule.flag, value, train)]
    if memo is None and (gated := _gated_off(t)) is not None:
        if default is None:
            unknown.append(t)
        else:
            set_argument(node, gated, default)
            changes.append(Change(t.name, str(node.target), gated, 0.0, default))
    if rule.counter is not None and counters.add(t, rule.counter, memo):
        changes.append(Change(t.name, str(node.target), counters.field(rule.counter), False, True))
    return changes


def _gated_off(t: Target) -> str | None:
    """``t``'s gated argument, if it is 0.0 in a call that eager code may have gated on ``self.training``."""
    if t.rule.gated is None or get_argument(t.node, t.rule.gated) != 0.0:
        return None
    return t.rule.gated if t.rule.functional(t.node) else None


def _training_value(t: Target, value: Any, memo: Memo | None, default: float | None) -> Any:
    """What ``t``'s flag holds in train mode: remembered, fixed by its rule, or taken from the graph."""
    if memo is not None and t.rule.flag in memo.values:
        return memo.values[t.rule.flag]
    if t.rule.train is not PerNode.VALUE:
        return t.rule.train
    if value != t.rule.eval:
        return value  # it holds a training value already
    if default is not None:
        return default
    return value if t.context.captured is Mode.TRAIN else _UNKNOWN


def _literal_flag(t: Target) -> Any:
    value = get_argument(t.node, t.rule.flag)
    if isinstance(value, Node):
        msg = (
            f"node {t.name} ({t.node.target}) computes {t.rule.flag} in the graph "
            f"({value.name}) instead of passing a literal, so modeswap cannot set it"
        )
        raise UnsupportedGraphError(msg)
    return value


def _refuse_untrainable(t: Target) -> None:
    for case in t.rule.untrainable:
        if get_argument(t.node, case.argument) == case.value:
            msg = f"cannot swap {describe(t.name, t.node)} to train mode: {case.argument}={case.value!r}. {case.why}"
            raise UnsupportedGraphError(msg)


def _refuse_aliased(t: Target) -> None:
    """Refuse an eval node that returns its input, when export may have routed the input's own uses through it."""
    if t.node.target not in t.rule.eval_aliases:
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


def _warn_unknown(targets: list[Target]) -> None:
    rule = targets[0].rule
    flag, value = (rule.gated, 0.0) if rule.gated is not None else (rule.flag, rule.eval)
    where = ", ".join(describe(t.name, t.node) for t in targets)
    msg = (
        f"{len(targets)} node(s) have {flag}={value} and no recorded training value, so they keep "
        f"{value} in train mode: {where}. If the model uses attention dropout in training, pass it: "
        "modeswap.to_train(gm, attention_dropout=p)."
    )
    warnings.warn(msg, UnknownTrainingValueWarning, stacklevel=2)
