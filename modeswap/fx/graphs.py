"""Reading, writing and copying ``torch.fx`` graphs the way ``torch.export`` writes them."""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
import torch
from torch.fx import Graph, GraphModule, Node

from modeswap.fx.weights import Tensors, tensor_copier
from modeswap.records.modes import Memo


@functools.cache
def _argument(op: torch._ops.OpOverload, name: str) -> tuple[int, Any]:
    for index, argument in enumerate(op._schema.arguments):
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
    op: torch._ops.OpOverload = node.target  # type: ignore[assignment]
    index, argument = _argument(op, name)
    if argument.kwarg_only or name in node.kwargs:
        node.kwargs = {**node.kwargs, name: value}
        return
    schema = op._schema.arguments
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
    for name, child in gm._modules.items():  # not named_children(): a lifted graph has a child per weight's parent
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


def copy_graph(graph: Graph) -> Graph:
    """Return a copy of ``graph``: the same node names, node meta copied shallowly."""
    new = Graph(tracer_cls=graph._tracer_cls, tracer_extras=graph._tracer_extras)
    copies: dict[Node, Node] = {}
    output: Any = new.graph_copy(graph, copies, return_output_node=True)
    for old, copied in copies.items():
        # A fresh graph renames nodes that shadow builtins (placeholder "input"
        # becomes "input_1"); an ExportedProgram's signature refers to the old names.
        if copied.name != old.name:
            copied.name = old.name
    # The codegen holds the immutable pytree specs; deep-copying them only costs
    # time (and a torch FutureWarning about LeafSpec).
    new._codegen = copy.copy(graph._codegen)
    if output is not None:
        value, old_output = output
        new_output = new.output(value, type_expr=old_output.type)
        new_output.meta = copy.copy(old_output.meta)
    return new


def copy_module(gm: GraphModule, *, share_weights: bool = False, copy_on_write: bool = False) -> GraphModule:
    """Return a copy of ``gm`` whose graph can be edited without touching ``gm``.

    Every submodule, parameter, buffer and tensor constant is there under its
    old name, whether the graph reads it or not. Tensors are copied (aliasing
    between them kept) unless ``share_weights``, when the copy uses ``gm``'s own;
    ``copy_on_write`` copies them lazily (see ``modeswap.fx.weights``).
    The copy's code is not generated: call ``recompile`` on it before use.
    """
    new = _copy_tree(gm, tensor_copier(share_weights=share_weights, copy_on_write=copy_on_write))
    assert isinstance(new, GraphModule)
    return new


def recompile_all(gm: GraphModule) -> None:
    """Generate the code of ``gm`` and of every subgraph below it."""
    for _, module in graph_modules(gm):
        module.recompile()


def _refuse_train_eval(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    msg = (
        "an exported graph cannot switch its mode in place: modeswap.to_train(gm) and "
        "modeswap.to_eval(gm) return the swapped module"
    )
    raise NotImplementedError(msg)


def _copy_tree(module: torch.nn.Module, tensor: Tensors) -> torch.nn.Module:
    # GraphModule.__new__ makes a fresh class per instance, so the code that
    # recompile installs on the copy's class never reaches the original's.
    new = GraphModule.__new__(type(module)) if isinstance(module, GraphModule) else object.__new__(type(module))
    state = {key: _copy_attribute(value, module, new, tensor) for key, value in vars(module).items()}
    state["_parameters"] = {k: None if v is None else tensor(v) for k, v in module._parameters.items()}
    state["_buffers"] = {k: None if v is None else tensor(v) for k, v in module._buffers.items()}
    state["_modules"] = {k: None if v is None else _copy_tree(v, tensor) for k, v in module._modules.items()}
    if isinstance(module, GraphModule):
        state["_graph"] = copy_graph(module.graph)
        state["_graph"].owning_module = new
    vars(new).update(state)
    return new


def _copy_attribute(value: Any, old: torch.nn.Module, new: torch.nn.Module, tensor: Tensors) -> Any:
    if isinstance(value, torch.Tensor):
        return tensor(value)
    if isinstance(value, types.MethodType) and value.__self__ is old:
        # ExportedProgram.module() patches train/eval onto the instance to raise;
        # the copy gets modeswap's own refusal, and no reference back to the original.
        func = _refuse_train_eval if value.__name__ in ("_train", "_eval") else value.__func__
        return types.MethodType(func, new)
    if isinstance(value, dict | list | set):
        return copy.copy(value)
    return value


#: The key under ``node.meta["custom"]`` where a rewrite keeps its :class:`Memo`.
#: ``torch.export.save`` keeps only ``meta["custom"]`` of a node's meta, as JSON,
#: so the memo is stored there, as a plain dict, to survive a save and load.
MEMO_KEY = "modeswap"


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
        custom[MEMO_KEY] = {k: v for k, v in attrs.asdict(memo).items() if v is not None}
    if custom:
        node.meta["custom"] = custom
    else:
        node.meta.pop("custom", None)
