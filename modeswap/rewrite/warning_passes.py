"""What no swap can fix, said out loud: the kernels of the check passes that end every swap.

A swap matches eager, raises, or warns. These kernels warn where the graph
shows a trace of something a rewrite cannot change: random ops that no rule
owns left in an eval graph, modules whose forward branches on
``self.training`` (export kept only the side that ran), and sites whose
training value neither the graph records nor the user states. Each warns once
per swap, naming every node or module and saying what to do.
"""

from __future__ import annotations

import collections
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from modeswap.fx.graphs import (
    attribute,
    calls,
    describe,
    enclosing,
    graph_modules,
    innermost_module,
    module_path,
    module_paths,
    qualified_name,
)
from modeswap.fx.torch_private import OpOverload
from modeswap.records import options
from modeswap.records.errors import (
    InvalidOptionError,
    MixedModeWarning,
    NondeterministicEvalWarning,
    TrainingBranchWarning,
    UnknownTrainingValueWarning,
    lowered,
)
from modeswap.records.modes import Change, Mode, memo_of
from modeswap.records.options import Options, decide
from modeswap.rewrite import occurrence
from modeswap.rewrite.base import Context
from modeswap.rewrite.occurrence import Occurrence
from modeswap.rewrite.report import idiom_sites, random_nodes
from modeswap.table import rules as table
from modeswap.table.rules import ERASED_IN_EVAL, TRAINING_BRANCHES, Sentinel, rule_for

_SITE_OPS = tuple(op for rule in table.RULES for op in rule.ops)


def warn_nondeterministic(gm: GraphModule, context: Context, told: Options) -> tuple[Change, ...]:
    """Warn when ``gm``, swapped to eval, still draws random numbers in nodes that no rule owns.

    Only nodes of the modules the swap is for count (``Options.within``).
    """
    found = [(name, node) for name, node in random_nodes(gm) if told.reaches(module_path(node))]
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


def warn_training_branches(gm: GraphModule, context: Context, mode: Mode, pinned: Options) -> tuple[Change, ...]:
    """Warn about modules of ``gm`` whose forward branches on ``self.training`` where no swap reaches.

    Two traces tell: a module of a type in ``rules.TRAINING_BRANCHES`` with no
    site inside it, and, on the way to train, a module of the program's module
    call graph that is named like a drop path and left no node at all.
    """
    if context.captured(pinned.keeps) is mode:
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
    found = [(path, what) for path, what in branches.items() if path not in with_sites]
    erased: list[str] = []
    if mode is Mode.TRAIN and context.modules is not None:
        ran = {path for _, module in graph_modules(gm) for node in module.graph.nodes for path in module_paths(node)}
        erased = [path for path in _erased(context.modules, ran) if pinned.reaches(path)]
    found = [(path, what) for path, what in found if pinned.reaches(path)]
    found += [(path, "named like a drop path, and left no node") for path in erased]
    if found:
        listed = ", ".join(f"{path!r} ({what})" for path, what in found)
        msg = (
            f"the graph holds {len(found)} module(s) whose forward branches on self.training, and export kept "
            f"only the side that ran, so the {mode.value} graph may differ from eager {mode.value} mode there: "
            f"{listed}. No swap can change them: export the model in {mode.value} mode instead."
        )
        if erased:  # the drop path's own words, for the modules named like one
            msg += (
                " A drop path exported in train mode survives to_eval and back; one that is an nn.Identity "
                "(a drop rate of 0) loses nothing."
            )
        warnings.warn(msg, TrainingBranchWarning, stacklevel=2)
    return ()


def warn_minority(gm: GraphModule, context: Context, mode: Mode, told: Options) -> tuple[Change, ...]:
    """Warn when a swap of a mixed graph to ``mode`` changes the sites whose mode differs from the rest.

    Sites the user pins (``keep=``) or states a value for (``dropout=``) are
    spoken for, and a swap of some modules only (``Options.within``) is not of the graph.
    """
    if told.within is not None:
        return ()
    modes = [(path, site) for path, site in context.modes if not (told.keeps(path) or told.dropout_for(path))]
    counts = collections.Counter(site for _, site in modes)
    if len(counts) < 2:
        return ()
    # The minority is the less common mode; with as many of each, the side that changes.
    minority = min(Mode, key=lambda m: (counts[m], m is mode))
    if minority is mode:
        return ()  # the rest changes to the mode the minority is in already
    paths = tuple(dict.fromkeys(path for path, site in modes if site is minority))
    msg = (
        f"the graph mixes modes: {counts[minority]} {minority.value} site(s) under "
        f"{_some(list(paths), 'module', shown=5) if any(paths) else 'the root module'}, "
        f"{counts[minority.other]} in {minority.other.value} mode. This swap puts them in {mode.value} mode "
        "with the rest. A batch norm frozen while fine-tuning, Monte Carlo dropout or F.batch_norm(training=False) "
        f"holds its mode whatever the model's: if these do, leave them as they are with keep={paths!r}"
    )
    warnings.warn(MixedModeWarning(msg, keep=paths), stacklevel=2)
    return ()


def warn_unread_state(gm: GraphModule, context: Context, told: Options) -> tuple[Change, ...]:
    """Warn, on the way to train, about modules whose state no node reads and whose forward never ran.

    That is what an eval export makes of a module that only training runs
    (GoogLeNet's auxiliary heads: ``if self.training: return out, self.aux(h)``).
    A module that ran a node and leaves some of its state unread (a mask token
    read only when a mask is given) is not one of them.
    """
    if told.within is not None or context.captured(told.keeps) is Mode.TRAIN:
        return ()
    tops = unread_modules(gm, context)
    if tops:
        msg = (
            f"the graph holds the parameters or buffers of {len(tops)} module(s) whose forward never ran and that "
            f"no node reads: {_some(tops, 'module', shown=5)}. A module that only training runs (GoogLeNet's "
            "auxiliary heads: `if self.training: return out, self.aux(h)`) leaves no node in an eval export, so "
            "no swap can run it: the train graph computes what eval does there. With the eager model, "
            "modeswap.check(model, args) names such branches and modeswap.capture(model, args) runs each mode's "
            "own export; a module that no mode runs makes this warning speak without cause."
        )
        warnings.warn(msg, TrainingBranchWarning, stacklevel=2)
    return ()


def unread_modules(gm: GraphModule, context: Context) -> list[str]:
    """The outermost modules of ``gm`` that hold state, none of which a node reads, and whose forward never ran."""
    names, read = _state_reads(gm, context)
    ran = {path for _, module in graph_modules(gm) for node in module.graph.nodes for path in module_paths(node)}
    held, unread = collections.Counter[str](), collections.Counter[str]()  # per module: its subtree's names
    for name in names:
        for path in enclosing(name.rpartition(".")[0]):
            held[path] += 1
            unread[path] += name not in read
    # The model's own forward runs: the root is never one.
    untouched = {path for path, count in held.items() if path and path not in ran and unread[path] == count}
    return sorted(path for path in untouched if path.rpartition(".")[0] not in untouched)


def _state_reads(gm: GraphModule, context: Context) -> tuple[list[str], set[str]]:
    """The names of the parameters and buffers of ``gm``, and of those a node reads (one tensor: all its names)."""
    if context.buffers or context.parameters:  # a lifted graph: its state comes in as placeholders
        lifted = {**context.parameters, **context.buffers}
        used = {
            lifted[node.name] for node in gm.graph.find_nodes(op="placeholder") if node.name in lifted and node.users
        }
        firsts = {context.aliases.get(name, name) for name in used}  # a tensor read is read under every name
        return list(lifted.values()), {name for name in lifted.values() if context.aliases.get(name, name) in firsts}
    tensors = dict((*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)))
    ids = {
        id(value)
        for _, module in graph_modules(gm)
        for node in module.graph.find_nodes(op="get_attr")
        if node.users and isinstance(value := attribute(module, str(node.target)), torch.Tensor)
    }
    return list(tensors), {name for name, t in tensors.items() if id(t) in ids}


def _erased(modules: tuple[str, ...], ran: set[str]) -> list[str]:
    def named_like(path: str) -> bool:
        name = path.rpartition(".")[2].lower().replace("_", "")
        return any(word in name for word in ERASED_IN_EVAL)

    return [path for path in modules if path and path not in ran and named_like(path)]


def preflight(
    gm: GraphModule, context: Context, mode: Mode, told: Options, kinds: tuple[str, ...]
) -> tuple[Change, ...]:
    """Check ``gm``, and what the user states about it, before a swap of its sites of ``kinds`` to ``mode``.

    Raises for a graph that ``run_decompositions()`` lowered, when a pattern
    matches no site it could speak of, when ``attention_dropout=`` reaches no
    attention node, or when a stated training value contradicts a recorded
    one; on the way to train, warns about the sites whose training value is
    neither recorded nor stated.
    """
    refuse_decomposed(gm)
    paths: list[str] = []  # the module path of every site
    probabilities: dict[bool, list[str]] = {False: [], True: []}  # of the dropout and attention sites, by kept
    attention: dict[bool, list[str]] = {False: [], True: []}  # of the attention nodes, by decided (pattern, pin)
    spoken: set[str] = set()  # the modules with a site a dropout= pattern holds for: it sets it, or it agrees
    recorded: list[tuple[str, Any]] = []  # (module path, training value) of the sites whose value the graph records
    checked: list[Occurrence] = []
    for kind in dict.fromkeys(rule.kind for rule in table.RULES):
        for site in occurrence.occurrences(gm, context, kind, mode, told):
            path = module_path(site.node)
            paths.append(path)
            memo = memo_of(site.node)
            kept = bool(memo is not None and memo.kept) or told.keeps(path)
            if site.rule.train is Sentinel.PER_NODE:
                attention[kept or told.dropout_for(path) is not None].append(path)
            if site.rule.gated is not None or site.rule.train is Sentinel.PER_NODE:
                probabilities[kept].append(path)
            if mode is not Mode.TRAIN or kept:
                continue
            if occurrence.holds(site):
                spoken.add(path)
            if (training := occurrence.recorded_training(site)) is not None and training[1] is not Sentinel.UNKNOWN:
                recorded.append((path, training[1]))
            if kind in kinds and told.reaches(path):
                checked.append(site)
    paths += [site.module_path for site in idiom_sites(gm)]
    _refuse_unmatched(told.keep, paths, "keep", "no site")
    patterns = [pattern for pattern, _ in told.dropout]
    _refuse_unmatched(patterns, probabilities[False], "dropout", "no dropout or attention site", probabilities[True])
    if told.attention_dropout is not None:
        _refuse_unreached(told, attention)
    unknown: list[Occurrence] = []
    for site in checked:
        _refuse_contradiction(site, spoken)
        training = occurrence.training_probability(site)
        if training is not None and training[1] is Sentinel.UNKNOWN:
            unknown.append(site)
    if unknown:
        _warn_unknown(unknown, recorded)
    return ()


def _refuse_contradiction(target: Occurrence, spoken: set[str]) -> None:
    """Raise where what the user states of ``target`` contradicts the training value its graph records.

    A ``dropout=`` pattern cannot tell apart two sites of one module, so where
    it holds for one of them (``spoken``), the module's others keep the value
    they record, unremarked: ``F.dropout(h, p=0.1)`` beside
    ``F.dropout(w, p=0.2 if self.training else 0.0)``.
    """
    found = occurrence.contradiction(target)
    if found is None:
        return
    path = module_path(target.node)
    if target.stated.dropout_for(path) is not None and path in spoken:
        return
    raise InvalidOptionError(found)


def _refuse_unreached(told: Options, attention: dict[bool, list[str]]) -> None:
    """Raise when ``attention_dropout=`` decides no attention node: there is none, or patterns and pins decide all."""
    if attention[False]:
        return
    if not attention[True]:
        msg = (
            f"attention_dropout={told.attention_dropout} is for attention nodes (scaled_dot_product_attention), "
            "and this graph has none; state the training p of other sites with dropout={module pattern: p}"
        )
        raise InvalidOptionError(msg)
    modules = ", ".join(repr(path) for path in dict.fromkeys(attention[True]))
    msg = (
        f"attention_dropout={told.attention_dropout} is for the attention nodes that no dropout= pattern decides "
        f"and keep= leaves to swap, and this graph has none: dropout= or keep= decides every one (in {modules}). "
        "Leave attention_dropout out, or state those nodes' value with dropout="
    )
    raise InvalidOptionError(msg)


def refuse_decomposed(gm: GraphModule) -> None:
    """Refuse a graph that ``run_decompositions()`` lowered: a site it came from is gone, and a node descends from it.

    A ``GraphModule`` keeps no dialect, but torch records each node's provenance
    (``meta["from_node"]``: the nodes, and their ops, it was made from).
    Lowering turns an eval ``dropout`` into a ``clone`` whose provenance still
    names the dropout, and leaves no dropout behind. A node that merely copied a
    site's provenance (an observer after a batch norm) is no sign: the site is
    still there.
    """
    survivors: set[tuple[str, int]] = set()  # the provenance of every site still in the graph
    descendants: list[tuple[str, Node, Any]] = []  # (subgraph path, node, the site source it descends from)
    for path, module in graph_modules(gm):
        for node in module.graph.nodes:
            if rule_for(node) is not None:
                survivors.update(_key(source) for source in _ancestors(node))
            elif isinstance(node.target, OpOverload):  # a HOP descends from every node it holds
                descendants += [(path, node, src) for src in _ancestors(node) if src.target in _SITE_TARGETS]
    for path, node, source in descendants:
        if _key(source) not in survivors:
            found = describe(qualified_name(path, node), node)
            raise lowered(f"{found} comes from {source.target} node {source.name!r}, which the graph no longer has")


#: The ops of every site, as a node's provenance writes them ("aten.dropout.default").
_SITE_TARGETS = frozenset(str(op) for op in _SITE_OPS)


def _ancestors(node: Node) -> Iterator[Any]:
    """The ``NodeSource`` records ``node`` was made from, and theirs, each once."""
    stack, seen = list(node.meta.get("from_node") or ()), set()
    while stack:
        source = stack.pop()
        if _key(source) in seen:
            continue
        seen.add(_key(source))
        yield source
        stack += source.from_node


def _key(source: Any) -> tuple[str, int]:
    return source.name, source.graph_id


def _refuse_unmatched(
    patterns: Iterable[str], paths: list[str], option: str, what: str, kept: Sequence[str] = ()
) -> None:
    """Raise for a pattern that matches none of ``paths``; name the ``kept`` paths it matches, if any."""
    for pattern in patterns:
        if any(options.matches(pattern, path) for path in paths):
            continue
        pinned = [path for path in dict.fromkeys(kept) if options.matches(pattern, path)]
        if pinned:
            msg = (
                f"{option} pattern {pattern!r} matches only sites that this swap leaves as they are (keep=, or a "
                f"pin an earlier swap recorded), in {_some(pinned, 'module')}: the value it states would set "
                "nothing. Leave the pattern out, or those modules out of keep="
            )
            raise InvalidOptionError(msg)
        known = ", ".join(repr(p) for p in suggest((path, "") for path in [*paths, *kept]))
        msg = (
            f"{option} pattern {pattern!r} matches {what} of this graph"
            + (f"; the modules that have one: {known}" if known else "")
            + " (a pattern matches a module path or an enclosing one; * stays within a path component, "
            "** matches any number of them)"
        )
        raise InvalidOptionError(msg)


def _warn_unknown(unknown: list[Occurrence], recorded: Sequence[tuple[str, Any]]) -> None:
    groups: dict[str, list[Occurrence]] = {}
    for target in unknown:
        _, module_type = innermost_module(target.node) or ("", "the root module")
        groups.setdefault(module_type.rpartition(".")[2], []).append(target)
    paths = {name: list(dict.fromkeys(module_path(t.node) for t in found)) for name, found in groups.items()}
    listed = "\n".join(
        f"  {name}: {len(found)} site(s) in {_some(paths[name], 'module')}: "
        f"{_some([f'{t.name} ({t.node.target})' for t in found], 'node', quote=False)}"
        for name, found in groups.items()
    )
    suggestion = suggest([innermost_module(t.node) or ("", "") for t in unknown])
    beside = _beside(suggestion, {module_path(t.node) for t in unknown}, recorded)
    mapping = "\n".join(
        [f"      {pattern!r}: {p}," for pattern, p in suggestion.items()]
        + [f"      {pattern!r}: {p},  # what the graph records: leave it" for pattern, p in beside.items()]
    )
    msg = (
        f"{len(unknown)} dropout or attention site(s) hold a probability of 0.0 in this eval graph and "
        "record no training value: an eval export writes 0.0 both where the model's p is 0.0 and where "
        "eager code passes `p if self.training else 0.0`, and the graph cannot tell which. "
        "They keep 0.0 in train mode:\n"
        f"{listed}\n"
        "State their training p, editing the numbers (0.0 is what the graph holds now; the model's config "
        "or code has the values):\n"
        f"  modeswap.to_train(gm, dropout={{\n{mapping}\n  }})"
    )
    if any(t.rule.train is Sentinel.PER_NODE for t in unknown):
        msg += "\nor give the attention nodes no pattern states one value: modeswap.to_train(gm, attention_dropout=p)"
    warning = UnknownTrainingValueWarning(
        msg, suggestion=suggestion | beside, groups={name: tuple(found) for name, found in paths.items()}
    )
    warnings.warn(warning, stacklevel=2)


def _beside(suggestion: dict[str, float], unknown: set[str], recorded: Sequence[tuple[str, Any]]) -> dict[str, float]:
    """Patterns at the values the graph records, for the sites ``suggestion`` reaches whose value the graph records.

    Without them, the value the user fills in would contradict such a site
    (GPT-2's ``attn.resid_dropout`` inside the ``attn`` whose attention it
    states), unless a site of its own module (``unknown``) takes that value.
    Numbered components become ``*`` where that decides no site otherwise.
    """
    values: dict[str, list[Any]] = {}
    for path, value in recorded:
        values.setdefault(path, []).append(value)
    mapping = tuple(suggestion.items())
    needed = {
        path: float(found[0])
        for path, found in values.items()
        if path not in unknown and not isinstance(found[0], Node) and decide(mapping, path) is not None
    }

    def agrees(extra: dict[str, float]) -> bool:
        full = tuple({**suggestion, **extra}.items())
        try:
            return all(decide(full, path) == decide(mapping, path) for path in unknown) and all(
                (decided := decide(full, path)) is None or decided[1] in found
                for path, found in values.items()
                if path not in unknown
            )
        except InvalidOptionError:
            return False

    shapes: dict[tuple[str, float], list[str]] = {}
    for path, value in needed.items():
        shapes.setdefault((_NUMBERED.sub("*", path), value), []).append(path)
    general = {shape if len(paths) > 1 else paths[0]: value for (shape, value), paths in shapes.items()}
    return general if agrees(general) else needed


def suggest(modules: Iterable[tuple[str, str]]) -> dict[str, float]:
    """A ``dropout=`` mapping that reaches the ``(path, type)`` modules, one pattern per module shape, all 0.0.

    Numbered components of paths of one module type that differ only there
    become ``*`` (``layers.0``, ``layers.1`` -> ``layers.*``), unless that would
    let one pattern decide a site meant for another; then the paths are given
    as they are.
    """
    shapes: dict[tuple[str, str], list[str]] = {}
    for path, module_type in dict.fromkeys(modules):
        shapes.setdefault((_NUMBERED.sub("*", path), module_type), []).append(path)
    pattern = {path: shape if len(found) > 1 else path for (shape, _), found in shapes.items() for path in found}
    # Distinct values, so that two patterns equally specific for a path raise.
    probe = tuple((p, float(i)) for i, p in enumerate(dict.fromkeys(pattern.values())))
    try:
        if all((options.decide(probe, path) or ("",))[0] == shape for path, shape in pattern.items()):
            return dict.fromkeys(pattern.values(), 0.0)
    except InvalidOptionError:
        pass
    return dict.fromkeys(pattern, 0.0)


#: A numbered component of a module path: ``3`` in ``layers.3.attention``.
_NUMBERED = re.compile(r"(?<![^.])\d+(?![^.])")


def _some(items: list[str], what: str, *, quote: bool = True, shown: int = 3) -> str:
    names = ", ".join(repr(item) if quote else item for item in items[:shown])
    return names + (f", ... ({len(items)} {what}s)" if len(items) > shown else "")
