"""Whether an eval node returns its very input: read off the graph's metadata, or asked of this torch.

In eval mode some dropouts return their input tensor itself, and export then
sends every later use of that input through the dropout node. Which ones do
depends on the op and on the torch release (``aten.dropout`` copies in torch
2.13 and returns its input in 2.15). A freshly exported graph says so in its
fake values: the node's value shares its input's storage. A loaded program's
values share nothing, so where the graph shows no aliasing anywhere, this
torch's own export of the op is asked instead, once per op.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.fx import Graph, Node

from modeswap.fx.torch_private import OpOverload, op_schema, storage_id


def returns_input(node: Node) -> bool:
    """Whether eval-mode ``node`` (a dropout with ``train=False``) returns the tensor it was given."""
    source = node.args[0]
    values = (node.meta.get("val"), source.meta.get("val") if isinstance(source, Node) else None)
    if _shares_storage(*values):
        return True
    if all(isinstance(v, torch.Tensor) for v in values) and _tracks_aliasing(node.graph):
        return False
    return exported_as_alias(node.target)


def _shares_storage(a: Any, b: Any) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    return storage_id(a.untyped_storage()) == storage_id(b.untyped_storage())


def _tracks_aliasing(graph: Graph) -> bool:
    """Whether the fake values of ``graph`` record aliasing: some view's value shares its base's storage."""
    for node in graph.nodes:
        op = node.target
        if node.op != "call_function" or not isinstance(op, OpOverload):
            continue
        returns = op_schema(op).returns
        aliased = returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write
        if aliased and node.args and isinstance(node.args[0], Node):
            return _shares_storage(node.meta.get("val"), node.args[0].meta.get("val"))
    return False


@functools.cache
def exported_as_alias(op: OpOverload) -> bool:
    """Whether this torch's export writes ``op(x, p, train=False)`` as a node that returns ``x`` itself."""

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            return op(x, 0.5, False)

    graph = torch.export.export(Probe(), (torch.ones(2, 2, 2),)).graph_module.graph
    (node,) = graph.find_nodes(op="call_function", target=op)
    return _shares_storage(node.meta.get("val"), node.args[0].meta.get("val"))
