"""Reading the mode of a graph: its sites, whether they agree, and its stray random ops."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.fx import GraphModule, Node

from modeswap.graphs import get_argument, graph_modules, innermost_module, qualified_name
from modeswap.modes import ModeReport, Params, Scalar, Site
from modeswap.rules import PerNode, memo_of, rule_for


def sites(gm: GraphModule) -> Iterator[Site]:
    """Yield a :class:`Site` for every node of ``gm`` (subgraphs included) whose behaviour has a mode."""
    for path, module in graph_modules(gm):
        for node in module.graph.nodes:
            rule = rule_for(node)
            if rule is None or not rule.applies(node):
                continue
            mode = rule.mode(node)
            if mode is None:
                continue
            params = {name: _literal(get_argument(node, name)) for name in rule.params}
            memo = memo_of(node)
            if rule.train is PerNode.VALUE and memo is not None:
                params[f"training_{rule.flag}"] = memo.values.get(rule.flag)
            yield Site(
                node=qualified_name(path, node),
                op=str(node.target),
                kind=rule.kind,
                mode=mode,
                module_path=(innermost_module(node) or ("", ""))[0],
                params=Params(params),
            )


def stochastic_nodes(gm: GraphModule) -> Iterator[str]:
    """Yield the names of nodes that draw random numbers and that no rule owns."""
    seeded = torch.Tag.nondeterministic_seeded
    for path, module in graph_modules(gm):
        for node in module.graph.nodes:
            target = node.target
            if (
                node.op == "call_function"
                and isinstance(target, torch._ops.OpOverload)
                and seeded in target.tags
                and rule_for(node) is None
            ):
                yield qualified_name(path, node)


def report(gm: GraphModule) -> ModeReport:
    """Derive the :class:`ModeReport` of an exported ``GraphModule`` from its graph."""
    found = tuple(sites(gm))
    modes = {site.mode for site in found}
    (agreed,) = modes if len(modes) == 1 else (None,)
    return ModeReport(
        mode=agreed,
        mixed=len(modes) > 1,
        sites=found,
        stochastic=tuple(stochastic_nodes(gm)),
    )


def _literal(value: object) -> Scalar:
    if isinstance(value, Node):
        return value.name
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
