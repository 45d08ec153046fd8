"""Hand-written train-only op sequences (drop path): remove them for eval, put them back for train.

``table.idiom_matching`` finds them. ``to_eval`` replaces a match with ``aten.alias(input)``, the identity eager
eval computes, and writes the removed ops into the alias node's memo as JSON:
targets, literal arguments and keyword arguments (dtype, device), node names.
``to_train`` rebuilds them from the memo, op for op, so the round trip draws
the same random numbers in the same order.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from modeswap.fx.graphs import graph_modules, qualified_name
from modeswap.fx.torch_private import OpOverload, detect_fake_mode
from modeswap.records.errors import UnsupportedGraphError
from modeswap.records.modes import Change, Memo, Mode, set_memo
from modeswap.records.options import Options
from modeswap.rewrite.occurrence import stays
from modeswap.table.idiom_matching import MARKER, Match, idiom_name, idiom_of, markers, matches

aten = torch.ops.aten


def swap_in_place(gm: GraphModule, kind: str, mode: Mode, stated: Options) -> list[Change]:
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
    fake_mode = detect_fake_mode([source.meta.get("val")])
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


def _op(target: str) -> OpOverload:
    namespace, name, overload = target.split(".")
    op: OpOverload = getattr(getattr(getattr(torch.ops, namespace), name), overload)
    return op


def _fake_run(mode: Any, target: OpOverload, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """The ``meta["val"]`` export would record: ``target`` run on the fake values of its inputs."""
    if mode is None:
        return None
    values = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    with mode:
        return target(*values[0], **values[1])
