"""One site of a graph as a swap sees it (:class:`Occurrence`), and whether a swap leaves it as it is."""

from __future__ import annotations

from collections.abc import Mapping

import attrs
from torch.fx import GraphModule, Node

from modeswap.fx.graphs import memo_of, module_path, set_memo
from modeswap.records.modes import Memo, Mode
from modeswap.records.options import Stated
from modeswap.rewrite.base import Context
from modeswap.table.rules import Rule


@attrs.frozen
class Occurrence:
    """One site to swap (a node a rule applies to), and what the rest of the graph says about it."""

    node: Node
    name: str  # unique in the module tree: "submod_1.dropout" inside a subgraph
    rule: Rule
    module: GraphModule  # the graph module whose graph holds the node
    context: Context
    buffers: Mapping[str, str]  # lifted placeholders of this graph -> the buffers they stand for
    reads: dict[str, Node]  # get_attr target -> node in this graph; shared, kept current by counters
    stated: Stated  # what the user states that the graph does not record
    captured: Mode | None  # the mode the graph's fixed sites were captured in, kept sites aside


def stays(node: Node, stated: Stated) -> bool:
    """Whether the site at ``node`` is to stay as it is; mark one that ``keep=`` names, so later swaps keep it too.

    A site outside the modules the swap is for (``Stated.within``) stays unmarked.
    """
    memo = memo_of(node)
    if memo is not None and memo.kept:
        return True
    path = module_path(node)
    if not stated.reaches(path):
        return True
    if not stated.keeps(path):
        return False
    set_memo(node, attrs.evolve(memo or Memo(), kept=True))
    return True
