"""Hand-written train-only op sequences (drop path): find them, remove them for eval, put them back for train.

An :class:`~modeswap.table.rules.Idiom` is matched from its last op backwards.
``to_eval`` replaces a match with ``aten.alias(input)``, the identity eager
eval computes, and writes the removed ops into the alias node's memo as JSON:
targets, literal arguments and keyword arguments (dtype, device), node names.
``to_train`` rebuilds them from the memo, op for op, so the round trip draws
the same random numbers in the same order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from torch.fx import Graph, GraphModule, Node

from modeswap.fx.graphs import calls, get_argument, graph_modules, memo_of, qualified_name, set_memo
from modeswap.records.errors import UnsupportedGraphError
from modeswap.records.modes import Change, Memo, Mode
from modeswap.records.options import Stated
from modeswap.rewrite.occurrence import stays
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


def swap_in_place(gm: GraphModule, kind: str, mode: Mode, stated: Stated) -> list[Change]:
    """Remove the idioms of ``kind`` from ``gm`` for eval, or rebuild those an eval swap removed for train.

    Only what an earlier eval swap removed can be rebuilt: an eval export never
    ran the idiom, so nothing in its graph tells it was there. Idioms under a
    module ``stated.keep`` names, or that an earlier swap kept, stay as they are.
    """
    changes = []
    for path, module in graph_modules(gm):
        if mode is Mode.EVAL:
            # Last first: a match may act on the output of the one before it, which removing replaces.
            swapped = [m for m in matches(module.graph) if m.idiom.kind == kind]
            swapped = [m for m in swapped if not stays(m.output, stated)]  # marks the kept ones
            for found in reversed(swapped):
                op = str(found.output.target)
                marker = remove(found)
                changes.append(Change(qualified_name(path, marker), op, kind, found.idiom.name, "identity"))
        else:
            for marker, memo in list(markers(module.graph)):
                if idiom_of(memo).kind != kind or stays(marker, stated):
                    continue
                name = qualified_name(path, marker)
                output = restore(marker, memo)
                changes.append(Change(name, str(output.target), kind, "identity", idiom_name(memo)))
    return changes


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
    leading = tuple(get_argument(value, a.name) for a in value.target._schema.arguments[:n])
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


def remove(found: Match) -> Node:
    """Replace ``found`` with the identity: an ``alias`` of its input carrying the memo to rebuild it."""
    removed = json.dumps({"idiom": found.idiom.name, "ops": [_encode_node(n, found) for n in found.nodes]})
    graph = found.output.graph
    with graph.inserting_before(found.output):
        marker = graph.call_function(MARKER, (found.input,))
    marker.meta = dict(found.output.meta)
    set_memo(marker, Memo({"keep": found.keep}, removed=removed))
    found.output.replace_all_uses_with(marker)
    for node in reversed(found.nodes):
        graph.erase_node(node)
    return marker


def restore(marker: Node, memo: Memo) -> Node:
    """Rebuild the ops ``remove`` took out where ``marker`` stands, and return the last one."""
    assert memo.removed is not None
    graph = marker.graph
    source: Node = marker.args[0]  # type: ignore[assignment]
    built: list[Node] = []
    fake_mode = torch._guards.detect_fake_mode([source.meta.get("val")])
    with graph.inserting_before(marker):
        for op in json.loads(memo.removed)["ops"]:
            target = _op(op["target"])
            args = _decode(op["args"], source, built, graph)
            kwargs = _decode(op["kwargs"], source, built, graph)
            node = graph.call_function(target, tuple(args), kwargs, name=op["name"])
            node.meta = {k: v for k, v in marker.meta.items() if k not in ("val", "custom")}
            node.meta["val"] = _fake_run(fake_mode, target, args, kwargs)
            built.append(node)
    output = built[-1]
    output.meta = {k: v for k, v in marker.meta.items() if k != "custom"}
    marker.replace_all_uses_with(output)
    graph.erase_node(marker)
    return output


def _encode_node(node: Node, found: Match) -> dict[str, Any]:
    return {
        "target": str(node.target),
        "name": node.name,
        "args": _encode(list(node.args), found),
        "kwargs": _encode(dict(node.kwargs), found),
    }


def _encode(value: Any, found: Match) -> Any:
    # Special values are one-key dicts whose key starts with "$"; keyword arguments are plain dicts.
    if isinstance(value, Node):
        if value is found.input:
            return {"$input": True}
        if value in found.nodes:
            return {"$node": found.nodes.index(value)}
        if value.target is aten.sym_size.int:
            # The batch size of a dynamic shape: rebuilt from its tensor, which outlives the drop path.
            return {"$sym_size": [_encode(value.args[0], found), value.args[1]]}
        return {"$name": value.name}
    if isinstance(value, torch.dtype | torch.layout | torch.memory_format):
        return {"$torch": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, list | tuple):
        return [_encode(v, found) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v, found) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    msg = f"cannot record the argument {value!r} of a drop path"
    raise UnsupportedGraphError(msg)


def _decode(value: Any, source: Node, built: list[Node], graph: Graph) -> Any:
    if isinstance(value, list):
        return [_decode(v, source, built, graph) for v in value]
    if not isinstance(value, dict):
        return value
    special = [key for key in value if key.startswith("$")]
    if not special:
        return {k: _decode(v, source, built, graph) for k, v in value.items()}
    (key,) = special
    match key, value[key]:
        case "$input", _:
            return source
        case "$node", index:
            return built[index]
        case "$sym_size", [tensor, dim]:
            return _sym_size(_decode(tensor, source, built, graph), dim, graph)
        case "$name", name:
            return _named(graph, name)
        case "$torch", name:
            return getattr(torch, name)  # a dtype, layout or memory format
        case "$device", device:
            return torch.device(device)
    msg = f"cannot read the drop path memo entry {value!r}"
    raise UnsupportedGraphError(msg)


def _sym_size(tensor: Node, dim: int, graph: Graph) -> Node:
    existing: list[Node] = list(graph.find_nodes(op="call_function", target=aten.sym_size.int))
    for node in existing:
        if node.args == (tensor, dim):
            return node
    node = graph.call_function(aten.sym_size.int, (tensor, dim))
    node.meta = {"val": tensor.meta["val"].shape[dim]} if "val" in tensor.meta else {}
    return node


def _named(graph: Graph, name: str) -> Node:
    nodes: list[Node] = list(graph.nodes)
    for node in nodes:
        if node.name == name:
            return node
    msg = f"cannot rebuild a drop path: the node {name!r} it read is gone from the graph"
    raise UnsupportedGraphError(msg)


def _op(target: str) -> torch._ops.OpOverload:
    namespace, name, overload = target.split(".")
    op: torch._ops.OpOverload = getattr(getattr(getattr(torch.ops, namespace), name), overload)
    return op


def _fake_run(mode: Any, target: torch._ops.OpOverload, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """The ``meta["val"]`` export would record: ``target`` run on the fake values of its inputs."""
    if mode is None:
        return None
    values = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    with mode:
        return target(*values[0], **values[1])
