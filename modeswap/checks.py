"""What no swap can fix, said out loud: the kernels of the check passes that end every swap.

A swap matches eager, raises, or warns. These kernels warn where the graph
shows a trace of something a rewrite cannot change: random ops that no rule
owns left in an eval graph, and modules whose forward branches on
``self.training`` (export kept only the side that ran). Each warns once per
swap, naming every node or module and saying what to do.
"""

from __future__ import annotations

import warnings

from torch.fx import GraphModule

from modeswap.errors import NondeterministicEvalWarning, TrainingBranchWarning
from modeswap.graphs import calls, describe, graph_modules, innermost_module, module_paths
from modeswap.modes import Change, Mode
from modeswap.pass_base import Context
from modeswap.report import random_nodes
from modeswap.rules import ERASED_IN_EVAL, RULES, TRAINING_BRANCHES, rule_for

_SITE_OPS = tuple(op for rule in RULES for op in rule.ops)


def warn_nondeterministic(gm: GraphModule, context: Context) -> tuple[Change, ...]:
    """Warn when ``gm``, swapped to eval, still draws random numbers in nodes that no rule owns."""
    found = list(random_nodes(gm))
    if found:
        where = ", ".join(describe(name, node) for name, node in found)
        msg = (
            f"the eval graph still draws random numbers in {len(found)} node(s) that no rule owns: {where}. "
            "Eager eval is deterministic for nearly every model: such ops usually come from code that "
            "branches on self.training (a noise layer, PatchDropout, DropBlock), which export specialised "
            "to the mode it ran in. Export the model in eval mode, or keep them if they are meant to stay "
            "random (modeswap.mode_of(gm).stochastic lists them)."
        )
        warnings.warn(msg, NondeterministicEvalWarning, stacklevel=2)
    return ()


def warn_training_branches(gm: GraphModule, context: Context, mode: Mode) -> tuple[Change, ...]:
    """Warn about modules of ``gm`` whose forward branches on ``self.training`` where no swap reaches.

    Two traces tell: a module of a type in ``rules.TRAINING_BRANCHES`` with no
    site inside it, and, on the way to train, a module of the program's module
    call graph that is named like a drop path and left no node at all.
    """
    if context.captured is mode:
        return ()  # the sites say the graph was captured in this mode: nothing branched the other way
    branches: dict[str, str] = {}
    with_sites: set[str] = set()
    for _, module in graph_modules(gm):
        for node in module.graph.nodes:
            # The ops a branch module runs itself are enough to find it: their innermost module is it.
            path, module_type = innermost_module(node) or ("", "")
            for branch in TRAINING_BRANCHES:
                if mode in branch.to and module_type.startswith(branch.owner):
                    branches[path] = branch.what
        for node in calls(module.graph, _SITE_OPS):
            if (rule := rule_for(node)) is not None and rule.applies(node):
                with_sites.update(module_paths(node))
    found = [f"{path!r} ({what})" for path, what in branches.items() if path not in with_sites]
    if mode is Mode.TRAIN and context.modules is not None:
        ran = {path for _, module in graph_modules(gm) for node in module.graph.nodes for path in module_paths(node)}
        found += [f"{path!r} (named like a drop path, and left no node)" for path in _erased(context.modules, ran)]
    if found:
        msg = (
            f"the graph holds {len(found)} module(s) whose forward branches on self.training, and export kept "
            f"only the side that ran, so the {mode.value} graph may differ from eager {mode.value} mode there: "
            f"{', '.join(found)}. No swap can change them: export the model in {mode.value} mode instead. "
            "A drop path exported in train mode survives to_eval and back; one that is an nn.Identity "
            "(a drop rate of 0) loses nothing."
        )
        warnings.warn(msg, TrainingBranchWarning, stacklevel=2)
    return ()


def _erased(modules: tuple[str, ...], ran: set[str]) -> list[str]:
    def named_like(path: str) -> bool:
        name = path.rpartition(".")[2].lower().replace("_", "")
        return any(word in name for word in ERASED_IN_EVAL)

    return [path for path in modules if path and path not in ran and named_like(path)]
