"""Batch counters: the ``add_(num_batches_tracked, 1)`` a train graph runs before a batch norm, found or made.

A rule's :class:`~modeswap.table.rules.Counter` says which buffer its module
increments; this module finds that increment in a train graph (to remove it for
eval) and decides which buffer eager would increment (to add it for train).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Graph, Node

from modeswap.fx.graphs import describe, get_argument, innermost_module, module_path
from modeswap.fx.torch_private import buffer_table, detect_fake_mode
from modeswap.records.errors import UnsupportedGraphError
from modeswap.records.modes import Memo
from modeswap.table.rules import Counter, rule_for

if TYPE_CHECKING:
    from modeswap.rewrite.occurrence import Occurrence

aten = torch.ops.aten


def field(counter: Counter) -> str:
    """The field a :class:`~modeswap.Change` names when a site starts or stops counting."""
    return f"{counter.buffer}.add_(1)"


def remove(t: Occurrence, counter: Counter) -> str | None:
    """Erase the increment train-mode ``t`` runs; return the counter it incremented, or ``None`` if none.

    The counter is named by its buffer path, or by its placeholder inside a subgraph.
    """
    increment = _increment_before(t, counter)
    if increment is None:
        return None
    counted: Node = increment.args[0]  # type: ignore[assignment]
    # add_ returns its input: a later read of the counter (a BatchNorm called
    # twice increments add_'s result) reads the counted tensor itself instead.
    increment.replace_all_uses_with(counted)
    t.module.graph.erase_node(increment)
    root = _increment_root(counted)
    if counted.op == "get_attr" and not counted.users:
        t.reads.pop(str(counted.target), None)
        t.module.graph.erase_node(counted)  # the read only fed the counter
    return _attribute(t, root) or root.name


def add(t: Occurrence, counter: Counter, memo: Memo | None) -> bool:
    """Insert the increment eager runs before ``t`` in train mode, if it runs one; return whether it does.

    A memo from the eval swap says which counter, if any, the train graph had.
    """
    counted = _counted(t, counter, memo)
    if counted is None:
        return False
    graph = t.module.graph
    with graph.inserting_before(t.node):
        increment = graph.call_function(aten.add_.Tensor, (_last_increment(counted), 1))
    increment.meta.update(_meta_like(t.node, val=counted.meta.get("val")))
    return True


def _increment_before(t: Occurrence, counter: Counter) -> Node | None:
    """The ``add_(counter, 1)`` that a train graph runs before ``t``.

    Export writes it right before the op; a QAT-prepared graph
    (``prepare_qat_pt2e``) has its conv rewrite in between, so the search goes
    back as far as the previous site of the same rule.
    """
    beside = _attribute(t, get_argument(t.node, counter.beside))
    if beside is None:
        # Inside a subgraph buffers are placeholders without names: only the node right before will do.
        prev: Node = t.node.prev
        if not _is_increment(prev):
            return None
        root = _increment_root(prev)
        val = root.meta.get("val")
        return prev if root.op == "placeholder" and isinstance(val, torch.Tensor) and val.dtype == torch.int64 else None
    # The module's own counter, or the one beside the buffer read: they differ when a module's
    # buffers are shared with another module, or when one module is called under two names.
    names = {_sibling(beside, counter.buffer), _join(module_path(t.node), counter.buffer)}
    node: Node = t.node.prev
    while node.op != "root" and rule_for(node) is not t.rule:
        if _is_increment(node) and _attribute(t, _increment_root(node)) in names:
            return node
        node = node.prev
    return None


def _counted(t: Occurrence, counter: Counter, memo: Memo | None) -> Node | None:
    """The node holding the counter eager increments before ``t`` in train mode, or ``None`` if none.

    Eager increments the counter of the module whose forward makes the call,
    when that module is one of the counter's owners or owns the buffer the call
    reads. A call from anywhere else (``F.batch_norm`` in a user's forward)
    counts nothing.
    """
    if memo is not None:
        return None if memo.counter is None else _counter_node(t, memo.counter)
    beside_node: Node = get_argument(t.node, counter.beside)
    beside = _attribute(t, beside_node)
    if beside is None:
        msg = (
            f"cannot swap {describe(t.name, t.node)} to train mode: its {counter.beside} comes into a subgraph "
            f"({beside_node.name}), so the {counter.buffer} it must increment is out of reach. "
            "Export the model in train mode instead."
        )
        raise UnsupportedGraphError(msg)
    path, module_type = innermost_module(t.node) or ("", "")
    owned = path == beside.rpartition(".")[0]
    if not (owned or module_type.startswith(counter.owners)):
        return None
    own = _join(path, counter.buffer)
    if _exists(t, own):
        return _counter_node(t, own)
    # One module under two names: export names its buffers after one of them.
    shared = _sibling(beside, counter.buffer)
    if not owned and _exists(t, shared):
        return _counter_node(t, shared)
    if module_type.startswith(counter.owners):
        msg = (
            f"cannot swap {describe(t.name, t.node)} to train mode: the graph has no {own} for its "
            f"{module_type.rpartition('.')[2]} to count batches in (torch.export.export(..., "
            "strict=True) drops buffers an eval graph does not read). Export with strict=False, "
            "or in train mode."
        )
        raise UnsupportedGraphError(msg)
    return None


def _exists(t: Occurrence, path: str) -> bool:
    return _buffer(t.module, path) is not None or path in t.buffers.values()


def _is_increment(node: Node) -> bool:
    return node.op == "call_function" and node.target is aten.add_.Tensor and node.args[1:] == (1,)


def _increment_root(node: Node) -> Node:
    """The tensor a chain of ``add_(..., 1)`` increments."""
    while node.op == "call_function" and node.target is aten.add_.Tensor:
        node = node.args[0]  # type: ignore[assignment]
    return node


def _last_increment(counted: Node) -> Node:
    """The last ``add_(..., 1)`` chained on ``counted`` so far, as export writes a BatchNorm called twice."""
    while later := [u for u in counted.users if u.target is aten.add_.Tensor and u.args == (counted, 1)]:
        counted = later[0]
    return counted


def _attribute(t: Occurrence, node: Node) -> str | None:
    """The buffer ``node`` reads: a ``get_attr``'s target, or what a lifted placeholder stands for.

    In an ``ExportedProgram``'s graph buffers are placeholders; only the graph
    signature says which buffer each one is.
    """
    if node.op == "get_attr":
        return str(node.target)
    return t.buffers.get(node.name) if node.op == "placeholder" else None


def _sibling(path: str, name: str) -> str:
    return _join(path.rpartition(".")[0], name)


def _join(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def _counter_node(t: Occurrence, counter: str) -> Node:
    """The node reading ``counter``: a buffer path, or the name of a subgraph placeholder."""
    graph: Graph = t.module.graph
    if (buffer := _buffer(t.module, counter)) is not None:
        if counter in t.reads:
            return t.reads[counter]
        with graph.inserting_before(t.node):
            node = graph.get_attr(counter)
        node.meta.update(_meta_like(t.node, val=_fake_like(graph, buffer)))
        t.reads[counter] = node
        return node
    lifted = {path: name for name, path in t.buffers.items()}
    placeholders: list[Node] = graph.find_nodes(op="placeholder")
    for node in placeholders:
        if node.name == lifted.get(counter, counter):
            return node
    msg = (
        f"cannot swap {describe(t.name, t.node)} to train mode: the batch counter {counter!r} its eval swap "
        "recorded is gone from the graph"
    )
    raise UnsupportedGraphError(msg)


def _buffer(module: torch.nn.Module, path: str) -> torch.Tensor | None:
    owner, _, name = path.rpartition(".")
    try:
        return buffer_table(module.get_submodule(owner)).get(name)
    except AttributeError:
        return None


def _fake_like(graph: Graph, tensor: torch.Tensor) -> Any:
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.find_nodes(op="placeholder")])
    return None if fake_mode is None else fake_mode.from_tensor(tensor, static_shapes=True)


def _meta_like(node: Node, *, val: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {key: node.meta[key] for key in ("nn_module_stack", "stack_trace") if key in node.meta}
    if val is not None:
        meta["val"] = val
    return meta
