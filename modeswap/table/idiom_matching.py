"""Finding the train-only op sequences of ``rules.IDIOMS`` (drop path) in a graph, and the markers left for them.

An :class:`~modeswap.table.rules.Idiom` is matched from its last op backwards;
``rewrite.idioms`` removes a match for eval and rebuilds it for train.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from torch.fx import Graph, Node

from modeswap.fx.graphs import calls, get_argument
from modeswap.fx.torch_private import op_schema
from modeswap.records.errors import UnsupportedGraphError
from modeswap.records.modes import Memo, memo_of
from modeswap.table.rules import IDIOMS, Capture, Idiom, Op

aten = torch.ops.aten


#: The node ``to_eval`` leaves where a drop path was: the identity, and the holder of its memo.
MARKER = aten.alias.default


@attrs.frozen(eq=False)
class Match:
    """Where ``idiom`` matched: its ``output`` node, the ``input`` it acts on, and every node it owns."""

    idiom: Idiom
    output: Node
    input: Node
    keep: float
    nodes: tuple[Node, ...]  # in graph order, output last; the input is not one of them


def matches(graph: Graph) -> Iterator[Match]:
    """Yield every match of an idiom in ``graph`` (a train graph's drop paths), in graph order."""
    for node in calls(graph, {op for idiom in IDIOMS for op in idiom.pattern.targets}):
        for idiom in IDIOMS:
            found = match(idiom, node)
            if found is not None:
                yield found
                break


def markers(graph: Graph) -> Iterator[tuple[Node, Memo]]:
    """Yield every node ``to_eval`` left in place of an idiom (an eval graph's drop paths), with its memo."""
    for node in graph.find_nodes(op="call_function", target=MARKER):
        memo = memo_of(node)
        if memo is not None and memo.removed is not None:
            yield node, memo


def idiom_name(memo: Memo) -> str:
    """The name of the idiom ``memo`` records."""
    assert memo.removed is not None
    name: str = json.loads(memo.removed)["idiom"]
    return name


def idiom_of(memo: Memo) -> Idiom:
    """The idiom ``memo`` records."""
    name = idiom_name(memo)
    for idiom in IDIOMS:
        if idiom.name == name:
            return idiom
    msg = f"cannot rebuild the idiom {name!r}: this version of modeswap does not know it"
    raise UnsupportedGraphError(msg)


def match(idiom: Idiom, node: Node) -> Match | None:
    """Match ``idiom`` with ``node`` as its last op, or return ``None``."""
    captures: dict[Capture, Any] = {}
    owned: list[Node] = []
    if not _match(idiom.pattern, node, captures, owned, last=True):
        return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    nodes = tuple(sorted(set(owned), key=order.__getitem__))
    return Match(idiom, node, captures[Capture.INPUT], captures[Capture.KEEP], nodes)


def _match(pattern: Op | Capture, value: Any, captures: dict[Capture, Any], owned: list[Node], *, last: bool) -> bool:
    if isinstance(pattern, Capture):
        return _capture(pattern, value, captures)
    if not (isinstance(value, Node) and value.op == "call_function" and value.target in pattern.targets):
        return False
    if not last and len(value.users) != 1:
        return False  # used elsewhere too: removing it would change more than the idiom
    # By schema, with defaults: export drops trailing arguments equal to their default (bernoulli_'s p=0.5).
    n = len(pattern.args)
    leading = tuple(get_argument(value, a.name) for a in op_schema(value.target).arguments[:n])
    orders = [leading, leading[::-1]] if pattern.commutative else [leading]
    for args in orders:
        trial, trial_owned = dict(captures), list(owned)
        if len(args) == n and all(
            _match(p, a, trial, trial_owned, last=False) for p, a in zip(pattern.args, args, strict=True)
        ):
            captures.update(trial)
            owned[:] = [*trial_owned, value]
            return True
    return False


def _capture(kind: Capture, value: Any, captures: dict[Capture, Any]) -> bool:
    if kind is Capture.SHAPE:
        return isinstance(value, list | tuple) and len(value) >= 1 and all(d == 1 for d in value[1:])
    if kind is Capture.KEEP and (isinstance(value, bool) or not isinstance(value, float)):
        return False
    if kind is Capture.INPUT and not isinstance(value, Node):
        return False
    if kind in captures:
        return captures[kind] is value or (kind is Capture.KEEP and captures[kind] == value)
    captures[kind] = value
    return True
