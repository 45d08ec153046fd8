"""Copying a ``GraphModule`` as every pure pass starts: its own graph and tree, its tensors cloned, shared or lazily."""

from __future__ import annotations

import copy
import types
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from modeswap.fx.graphs import graph_modules
from modeswap.fx.torch_private import (
    BUFFERS,
    GRAPH,
    MODES_REFUSED,
    MODULES,
    PARAMETERS,
    buffer_table,
    codegen,
    empty_graph_like,
    module_table,
    parameter_table,
)
from modeswap.fx.weights import Tensors, tensor_copier


def copy_graph(graph: Graph) -> Graph:
    """Return a copy of ``graph``: the same node names, node meta copied shallowly."""
    new = empty_graph_like(graph)
    copies: dict[Node, Node] = {}
    output: Any = new.graph_copy(graph, copies, return_output_node=True)
    for old, copied in copies.items():
        # A fresh graph renames nodes that shadow builtins (placeholder "input"
        # becomes "input_1"); an ExportedProgram's signature refers to the old names.
        if copied.name != old.name:
            copied.name = old.name
    # The codegen holds the immutable pytree specs; deep-copying them only costs
    # time (and a torch FutureWarning about LeafSpec).
    new.set_codegen(copy.copy(codegen(graph)))
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
    state[PARAMETERS] = {k: None if v is None else tensor(v) for k, v in parameter_table(module).items()}
    state[BUFFERS] = {k: None if v is None else tensor(v) for k, v in buffer_table(module).items()}
    state[MODULES] = {k: None if v is None else _copy_tree(v, tensor) for k, v in module_table(module).items()}
    if isinstance(module, GraphModule):
        state[GRAPH] = copy_graph(module.graph)
        state[GRAPH].owning_module = new
    vars(new).update(state)
    return new


def _copy_attribute(value: Any, old: torch.nn.Module, new: torch.nn.Module, tensor: Tensors) -> Any:
    if isinstance(value, torch.Tensor):
        return tensor(value)
    if isinstance(value, types.MethodType) and value.__self__ is old:
        # ExportedProgram.module() patches train/eval onto the instance to raise;
        # the copy gets modeswap's own refusal, and no reference back to the original.
        func = _refuse_train_eval if value.__name__ in MODES_REFUSED else value.__func__
        return types.MethodType(func, new)
    if isinstance(value, dict | list | set):
        return copy.copy(value)
    return value
