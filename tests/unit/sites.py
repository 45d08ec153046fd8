"""What the tests of the rule table (table/rules) and of the batch counters (rewrite/test_counters) share.

The nodes a swap wrote and their arguments, read off the graph; norm layers whose running stats
differ from the initial ones, so that eval and train differ visibly; seeded inputs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

#: The modes, as the rule tests parametrize over them.
MODES = ("train", "eval")


def nodes(gm: GraphModule, *targets: Any) -> list[Node]:
    """The ``call_function`` nodes of ``gm`` that call one of ``targets``, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def arg(node: Node, name: str) -> Any:
    """Argument ``name`` of a call, or its schema default where the graph leaves it out (as export does)."""
    if name in node.kwargs:
        return node.kwargs[name]
    schema = node.target._schema.arguments
    index = next(i for i, a in enumerate(schema) if a.name == name)
    return node.args[index] if index < len(node.args) else schema[index].default_value


def calls(gm: GraphModule) -> list[tuple[Any, Any]]:
    """``call_function`` nodes in order as (target, literal args/kwargs); node arguments by position, not name."""
    position: dict[Node, int] = {}

    def literal(a: Any) -> Any:
        if not isinstance(a, Node):
            return (type(a).__name__, a)
        if a.op == "call_function":
            return ("call", position[a])
        if a.op == "get_attr":
            return ("attr", a.target)
        return (a.op, a.name)

    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function":
            found.append((node.target, pytree.tree_map(literal, (node.args, node.kwargs))))
            position[node] = len(position)
    return found


def with_stats(norm: nn.Module) -> nn.Module:
    """Give a norm layer non-default running stats and batch count, so eval and train differ visibly."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norm.running_mean.copy_(torch.rand(norm.running_mean.shape, generator=g) - 0.5)
        norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=g) + 0.5)
        norm.num_batches_tracked.fill_(7)
    return norm


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """A tensor of ``shape`` drawn from its own generator, seeded with ``seed``."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class InplaceDropout(nn.Module):
    """``F.dropout(..., inplace=True)`` of a fresh tensor: ``aten.dropout_`` in the graph."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x * 2, self.p, self.training, inplace=True)


#: The training p of the attention of the rule tests' models.
ATTENTION_P = 0.35
