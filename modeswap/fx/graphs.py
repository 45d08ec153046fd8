"""Reading and writing ``torch.fx`` graphs the way ``torch.export`` writes them."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from modeswap.fx.torch_private import OpOverload, module_table, op_schema


@functools.cache
def _argument(op: OpOverload, name: str) -> tuple[int, Any]:
    for index, argument in enumerate(op_schema(op).arguments):
        if argument.name == name:
            return index, argument
    msg = f"{op} has no argument named {name!r}"
    raise KeyError(msg)


def get_argument(node: Node, name: str) -> Any:
    """Return argument ``name`` of a call to an ATen op, or its schema default when left out."""
    index, argument = _argument(node.target, name)
    if name in node.kwargs:
        return node.kwargs[name]
    if not argument.kwarg_only and index < len(node.args):
        return node.args[index]
    return argument.default_value if argument.has_default_value() else None


def set_argument(node: Node, name: str, value: Any) -> None:
    """Set argument ``name`` of a call to an ATen op, written as ``torch.export`` writes calls.

    Export leaves out trailing positional arguments that equal their schema
    defaults (an eval ``rrelu`` is ``rrelu(x)``); writing calls the same way is
    what makes ``to_train(to_eval(g))`` give back ``g`` argument for argument.
    """
    op: OpOverload = node.target  # type: ignore[assignment]
    index, argument = _argument(op, name)
    if argument.kwarg_only or name in node.kwargs:
        node.kwargs = {**node.kwargs, name: value}
        return
    schema = op_schema(op).arguments
    args = list(node.args)
    args.extend(schema[i].default_value for i in range(len(args), index + 1))
    args[index] = value
    while args and _is_default(schema[len(args) - 1], args[-1]):
        args.pop()
    node.args = tuple(args)


def _is_default(argument: Any, value: Any) -> bool:
    if not argument.has_default_value() or isinstance(value, Node):
        return False
    default = argument.default_value
    return type(value) is type(default) and value == default


def attribute(module: torch.nn.Module, target: str) -> Any:
    """What the dotted ``target`` names on ``module`` (a ``get_attr`` target), or ``None`` if nothing."""
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def graph_modules(gm: GraphModule, path: str = "") -> Iterator[tuple[str, GraphModule]]:
    """Yield ``gm`` and every ``GraphModule`` below it (the subgraphs of higher-order ops).

    Export registers a subgraph on the graph module whose graph calls it, so
    only ``GraphModule`` children are searched, not the whole module tree.
    """
    yield path, gm
    for name, child in module_table(gm).items():  # not named_children(): a lifted graph has a child per weight's parent
        if isinstance(child, GraphModule):
            yield from graph_modules(child, f"{path}.{name}" if path else name)


def calls(graph: Graph, targets: Iterable[Any]) -> list[Node]:
    """The ``call_function`` nodes of ``graph`` calling one of ``targets``, in graph order.

    Through fx's index of call targets, so a pass that swaps a few ops does not
    visit every node.
    """
    found = [node for target in targets for node in graph.find_nodes(op="call_function", target=target, sort=False)]
    return sorted(found)


def innermost_module(node: Node) -> tuple[str, str] | None:
    """The path and type name of the module whose forward ran ``node`` (from ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, module_type = list(stack.values())[-1]
    return str(path), str(module_type)


def module_paths(node: Node) -> list[str]:
    """The paths of every module whose forward was running when ``node`` ran, outermost first."""
    return [str(path) for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def enclosing(path: str) -> Iterator[str]:
    """``path`` and the paths of the modules enclosing it, innermost first, the root (``""``) last."""
    while path:
        yield path
        path = path.rpartition(".")[0]
    yield ""


def module_path(node: Node) -> str:
    """The path of the module whose forward ran ``node``; ``""`` for the root or when export did not record it."""
    return (innermost_module(node) or ("", ""))[0]


def describe(name: str, node: Node) -> str:
    """``node`` for a message, with its op and the module that ran it.

    ``dropout (aten.dropout.default, in module 'drop')``
    """
    path = module_path(node)
    return f"{name} ({node.target}, in {f'module {path!r}' if path else 'the root module'})"


def qualified_name(path: str, node: Node) -> str:
    """Name ``node`` uniquely in a module tree: ``submod_1.dropout`` inside a subgraph."""
    return f"{path}.{node.name}" if path else node.name
