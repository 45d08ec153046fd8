"""Reading the mode of a graph: its sites, whether they agree, and its stray random ops."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.fx import Graph, GraphModule, Node

from modeswap.fx.graphs import get_argument, graph_modules, module_path, qualified_name
from modeswap.fx.torch_private import OpOverload
from modeswap.records.modes import Mode, ModeReport, Params, Scalar, Site, memo_of
from modeswap.rewrite.base import Context
from modeswap.rewrite.occurrence import recorded_probability
from modeswap.table import rules as table
from modeswap.table.idiom_matching import idiom_of, markers, matches
from modeswap.table.rules import Idiom, Rule, Sentinel, rule_for


def sites(gm: GraphModule) -> Iterator[Site]:
    """Yield a :class:`Site` for every node of ``gm`` (subgraphs included) whose behaviour has a mode.

    A node that shows no mode of its own (see :func:`tells_mode`) is listed in
    eval mode, whose behaviour it has.
    """
    captured = Context.of(gm).captured()
    for path, node, rule in rule_nodes(gm):
        mode = rule.mode(node) or Mode.EVAL
        params = {name: _literal(get_argument(node, name)) for name in rule.params}
        memo = memo_of(node)
        if rule.train is Sentinel.PER_NODE and memo is not None:
            params[f"training_{rule.flag}"] = memo.values.get(rule.flag)
        recorded = recorded_probability(rule, node, captured)
        yield Site(
            node=qualified_name(path, node),
            op=str(node.target),
            kind=rule.kind,
            mode=mode,
            module_path=module_path(node),
            params=Params(params),
            functional=rule.functional(node),
            kept=bool(memo is not None and memo.kept),
            known=recorded is None or recorded[1] is not Sentinel.UNKNOWN,
        )


def tells_mode(site: Site) -> bool:
    """Whether the node of ``site`` tells the mode it is in, so that it counts toward the mode of its graph.

    An attention node at ``dropout_p=0.0`` that records no training value
    (``params`` has no ``training_dropout_p``) does not: it computes what eval
    mode computes, and what train mode computes at a training ``dropout_p`` of
    0.0. ``mode_of`` lists it in eval mode and reads the graph's mode off the
    other sites.
    """
    return not any(
        rule.kind == site.kind
        and site.params.get(rule.flag) == rule.eval
        and site.params.get(f"training_{rule.flag}") is None
        for rule in table.RULES
        if rule.train is Sentinel.PER_NODE
    )


def rule_nodes(gm: GraphModule) -> Iterator[tuple[str, Node, Rule]]:
    """Yield each node of ``gm`` (subgraphs included) that a rule applies to: its subgraph's path, it, the rule."""
    for path, module in graph_modules(gm):
        for node in module.graph.nodes:
            rule = rule_for(node)
            if rule is not None and rule.applies(node):
                yield path, node, rule


def site_paths(graph: Graph) -> Iterator[str]:
    """Yield the module path of every node of ``graph`` (not its subgraphs) that a rule applies to."""
    for node in graph.nodes:
        rule = rule_for(node)
        if rule is not None and rule.applies(node):
            yield module_path(node)


def idiom_sites(gm: GraphModule) -> Iterator[Site]:
    """Yield a :class:`Site` for every idiom of ``gm`` (drop path): a train graph's ops, or what an eval swap left."""
    for path, module in graph_modules(gm):
        found: list[tuple[Node, Idiom, Scalar, Mode]] = [
            (m.output, m.idiom, m.keep, Mode.TRAIN) for m in matches(module.graph)
        ]
        found += [(n, idiom_of(memo), memo.values["keep"], Mode.EVAL) for n, memo in markers(module.graph)]
        for node, idiom, keep, mode in found:
            memo = memo_of(node)
            yield Site(
                node=qualified_name(path, node),
                op=str(node.target),
                kind=idiom.kind,
                mode=mode,
                module_path=module_path(node),
                params=Params([("keep", keep), ("idiom", idiom.name)]),
                kept=bool(memo is not None and memo.kept),
            )


def random_nodes(gm: GraphModule) -> Iterator[tuple[str, Node]]:
    """Yield the name and node of every node that draws random numbers and that no rule or idiom owns."""
    seeded = torch.Tag.nondeterministic_seeded
    for path, module in graph_modules(gm):
        owned = {node for found in matches(module.graph) for node in found.nodes}
        for node in module.graph.nodes:
            target = node.target
            if (
                node.op == "call_function"
                and isinstance(target, OpOverload)
                and seeded in target.tags
                and rule_for(node) is None
                and node not in owned
            ):
                yield qualified_name(path, node), node


def report(gm: GraphModule) -> ModeReport:
    """Derive the :class:`ModeReport` of an exported ``GraphModule`` from its graph."""
    found = (*sites(gm), *idiom_sites(gm))
    modes = {site.mode for site in found if not site.kept and tells_mode(site)}
    (agreed,) = modes if len(modes) == 1 else (None,)
    return ModeReport(
        mode=agreed,
        mixed=len(modes) > 1,
        sites=found,
        stochastic=tuple(name for name, _ in random_nodes(gm)),
    )


def _literal(value: object) -> Scalar:
    if isinstance(value, Node):
        return value.name
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
