"""From what comparing a swap with the other mode's own export found to the rows of a :class:`Fidelity`.

Each row says why the swap differs and what to do; where an option of the swap
fixes it, the row carries that option, checked against the graphs so that a
swap takes it: a ``dropout=`` pattern reaches no site whose training value it
would contradict, a ``keep=`` pattern no site that must change. Rows read as a
person would group them: the ops of a train-only head make one row (not one per
layer of the head), and the same difference in twelve numbered blocks makes one
``blocks.*.attn`` row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

import attrs
from torch.fx import GraphModule

from modeswap.eager.compare import Found, source
from modeswap.eager.fidelity import Cause, Difference
from modeswap.fx.graphs import get_argument, module_path
from modeswap.fx.torch_private import pytree
from modeswap.records.errors import InvalidOptionError
from modeswap.records.modes import Mode
from modeswap.records.options import Options, decide, matches
from modeswap.rewrite.base import Context
from modeswap.rewrite.occurrence import recorded_probability
from modeswap.rewrite.report import rule_nodes
from modeswap.table.rules import Sentinel

#: A numbered component of a module path: ``3`` in ``layers.3.attention``.
_NUMBERED = re.compile(r"(?<![^.])\d+(?![^.])")

#: The causes whose fix is a stated training value.
_UNKNOWN = (Cause.DROPOUT_UNKNOWN, Cause.ATTENTION_DROPOUT_UNKNOWN)


def explain(
    found: Mapping[Mode, list[Found | str]],
    modules: Mapping[Mode, GraphModule],
    swapped: Mapping[Mode, GraphModule | None],
    kept: tuple[str, ...] = (),
) -> dict[Mode, tuple[Difference, ...]]:
    """Per target mode, the rows of what the swap to that mode differs in, with their causes and fixes.

    ``found[target]`` is what comparing ``swapped[target]``, the swap of the
    other mode's module to ``target`` (``None``: refused), with ``modules[target]``
    found (a string: the swap refused). ``kept`` are the user's ``keep=``
    patterns: a row they reach says so, and suggests nothing.
    """
    exact = {mode: not found[mode] for mode in Mode}
    graphs = {
        target: {"expected": modules[target], "actual": swapped[target] or modules[target.other]} for target in Mode
    }
    rows = {
        target: list(_rows(found[target], target, graphs[target], other_exact=exact[target.other])) for target in Mode
    }
    sited = set().union(*map(sited_paths, modules.values()))
    fixes = _options(rows, modules, sited)
    held = {row.module_path for target in Mode for row in rows[target] if row.cause is Cause.PINNED}

    def keeps_only_held(pattern: str) -> bool:
        # keep= reaches the sites of the modules inside the one it names: only if they are held too.
        return all(path in held for path in sited if matches(pattern, path))

    def fixed(row: Difference) -> Difference:
        if row.module_path and any(matches(pattern, row.module_path) for pattern in kept):
            said = "the `keep=` given holds it as the export has it: leave it out of `keep=` for the swap to change it"
            return attrs.evolve(row, options=Options(), fix=said)
        return _fixed(row, fixes.get(id(row)))

    return {target: tuple(_grouped([fixed(row) for row in rows[target]], keeps_only_held)) for target in Mode}


def _fixed(row: Difference, fix: tuple[Options, str] | None) -> Difference:
    return row if fix is None else attrs.evolve(row, options=fix[0], fix=fix[1])


def verified(
    rows: Mapping[Mode, tuple[Difference, ...]], left: Callable[[Mode, Options], list[Found | str] | None]
) -> dict[Mode, tuple[Difference, ...]]:
    """``rows``, without the options of the rows that the swap with all the rows' options still differs in.

    ``left(target, options)`` compares the swap to ``target`` with ``options``
    added to the user's, and returns what still differs (``None``: the swap
    refused the options). A difference inside a row's modules fails that row;
    one outside every row fails the rows whose patterns reach it, or all of them.
    """
    rows = dict(rows)
    for _ in range(4):  # each round drops options; a round that drops none ends it
        advised = Options.merged(row.options for target in Mode for row in rows[target])
        if not advised:
            break
        every = [row for target in Mode for row in rows[target]]
        failed: set[int] = set()
        for target in Mode:
            still = left(target, advised)
            for f in ["refused"] if still is None else still:
                owners = [row for row in every if isinstance(f, Found) and _inside(f.module_path, row.paths)]
                if owners and not any(row.options for row in owners):
                    continue  # a difference no option was meant to fix
                reach = [row for row in every if row.options and isinstance(f, Found) and _reaches(row, f.module_path)]
                failed |= {id(row) for row in (owners or reach or every) if row.options}
        if not failed:
            break
        rows = {target: tuple(_unfixed(row) if id(row) in failed else row for row in rows[target]) for target in Mode}
    return rows


def _inside(path: str, paths: tuple[str, ...]) -> bool:
    # The root's row (the outputs) is no owner of what lies in its modules: every difference does.
    return any(path == p or (p and path.startswith(p + ".")) for p in paths)


def _reaches(row: Difference, path: str) -> bool:
    patterns = [*row.options.keep, *(pattern for pattern, _ in row.options.dropout)]
    return any(matches(pattern, path) for pattern in patterns) or row.options.attention_dropout is not None


def _unfixed(row: Difference) -> Difference:
    fix = "no option the swap takes fixes it (the swap with it still differs): use `modeswap.capture(model, args)`"
    return attrs.evolve(row, options=Options(), fix=fix)


# What was found, one row each.


def _rows(
    found: list[Found | str], target: Mode, graphs: Mapping[str, GraphModule], *, other_exact: bool
) -> Iterator[Difference]:
    """One row per module and cause, in the order found; the ops of a train-only head are one row."""
    pinned = {f.module_path for f in found if isinstance(f, Found) and (f.flag or _held_attention(f, target))}
    rows: dict[tuple[str, Cause], list[Difference]] = {}
    for f in _heads(found, graphs):
        if isinstance(f, str):
            rows.setdefault(("", Cause.REFUSED), []).append(
                Difference("", (), f, Cause.REFUSED, _capture(target, other_exact))
            )
            continue
        cause = _cause(f, pinned)
        if cause is Cause.PINNED:
            fix = "the swap leaves it as the model holds it when `keep=` names it"
        elif cause in _UNKNOWN:
            fix = "stating the training value that the train export has fixes it"
        elif cause is Cause.DROP_PATH:
            fix = "export in train mode (its swap to eval is exact), or `modeswap.capture(model, args)`"
        else:
            fix = _capture(target, other_exact)
        row = Difference(f.module_path, f.nodes, _what(f, target), cause, fix)
        if cause in _UNKNOWN:
            assert f.values is not None
            row = attrs.evolve(row, options=Options(dropout=((f.module_path, f.values[0]),)))
        rows.setdefault((f.module_path, cause), []).append(row)
    for group in rows.values():
        nodes = tuple(dict.fromkeys(n for d in group for n in d.nodes))
        yield attrs.evolve(group[0], nodes=nodes, what="; ".join(d.what for d in group))


def _heads(found: list[Found | str], graphs: Mapping[str, GraphModule]) -> list[Found | str]:
    """``found``, with the ops only one graph runs that feed one another inside one module joined as one.

    GoogLeNet's auxiliary head runs a pooling itself and a conv, a batch norm
    and two linear layers in its children, one after the other: one row says
    that the head differs, under the innermost module that holds them all. The
    root holds everything, so ops joined only there stay apart. ``graphs``
    holds, per side, the graph whose nodes the side names.
    """

    def branch(f: Found | str) -> bool:
        return isinstance(f, Found) and f.side in ("expected", "actual") and not f.flag and not f.drop_path

    branches = [f for f in found if isinstance(f, Found) and branch(f)]
    parent = list(range(len(branches)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple[str, str], int] = {}
    for i, f in enumerate(branches):
        owner.update({(f.side, name): i for name in f.nodes})
    for i, f in enumerate(branches):
        nodes = {node.name: node for node in graphs[f.side].graph.nodes}
        for name in f.nodes:
            # Through the ops the comparison reads through: an eval dropout between two layers of a head.
            for used in map(source, nodes[name].all_input_nodes if name in nodes else ()):
                j = owner.get((f.side, used.name))
                if j is not None and _enclosing(f.module_path, branches[j].module_path):
                    parent[root(i)] = root(j)
    groups: dict[int, list[Found]] = {}
    for i, f in enumerate(branches):
        groups.setdefault(root(i), []).append(f)
    first = {id(group[0]): group for group in groups.values()}
    joined: list[Found | str] = []
    for item in found:
        if not branch(item):
            joined.append(item)
        elif id(item) in first:
            group = first[id(item)]
            joined.append(_joined(group, _enclosing(*(g.module_path for g in group)) or group[0].module_path))
    return joined


def _enclosing(*paths: str) -> str:
    """The innermost module that holds each of ``paths`` (``""``: only the root does)."""
    split = [path.split(".") for path in paths]
    common = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _joined(found: list[Found], path: str) -> Found:
    if len(found) == 1:
        return found[0]
    return attrs.evolve(
        found[0],
        module_path=path,
        nodes=tuple(n for f in found for n in f.nodes),
        ops=tuple(op for f in found for op in f.ops),
        writes=tuple(w for f in found for w in f.writes),
    )


def _held_attention(f: Found, target: Mode) -> bool:
    """Whether ``f`` is attention that the eval export runs with a dropout: a module holds it in train mode."""
    return target is Mode.EVAL and f.per_node


def _cause(f: Found, pinned: set[str]) -> Cause:
    if f.side == "values":
        return Cause.VALUES
    if f.module_path in pinned:
        return Cause.PINNED
    if f.drop_path:
        return Cause.DROP_PATH
    if f.side == "both" and f.argument is not None and f.values is not None:
        have = f.values[1]
        if f.per_node and have == 0.0:
            return Cause.ATTENTION_DROPOUT_UNKNOWN
        if f.gated and have == 0.0:
            return Cause.DROPOUT_UNKNOWN
    return Cause.TRAINING_BRANCH


def _what(f: Found, target: Mode) -> str:
    own = f"the {target.value} export"
    if f.side in ("expected", "actual"):
        where = own if f.side == "expected" else "the swap"
        other = "the swap" if f.side == "expected" else own
        updates = f", updating {', '.join(dict.fromkeys(f.writes))}" if f.writes else ""
        return f"{where} runs {_ops(f.ops)}{updates}; {other} does not"
    assert f.values is not None
    want, have = f.values
    if f.argument == "outputs":
        return f"{own} returns {_outputs(want)}, the swap {_outputs(have)}"
    if f.side == "values":
        return f"{f.argument} differs from {own} when both run under seed(s) {', '.join(map(str, want))}"
    return f"{f.ops[0]} {f.argument}={_short(have)} in the swap, {_short(want)} in {own}"


def _ops(ops: tuple[str, ...], shown: int = 4) -> str:
    if len(ops) <= shown:
        return ", ".join(ops)
    kinds = list(dict.fromkeys(ops))
    return f"{len(ops)} ops ({', '.join(kinds[:shown])}{', ...' if len(kinds) > shown else ''})"


def _outputs(value: object) -> str:
    leaves = pytree.tree_leaves(value)
    name = type(value).__name__
    kind = "" if isinstance(value, str) else f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name} of "
    count = f"{len(leaves)} output{'s' * (len(leaves) != 1)}"
    return f"{kind}{count} ({_short(', '.join(map(str, leaves)))})"


def _short(value: object) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _capture(target: Mode, other_exact: bool) -> str:
    fix = "`modeswap.capture(model, args)` runs each mode's own export"
    if other_exact:
        fix += f", or export in {target.value} mode (its swap to {target.other.value} is exact)"
    return fix


# The options that fix them, as a swap takes them.


@attrs.frozen
class _Site:
    """A dropout or attention site of the eval graph: where, and the training value a swap must give it."""

    path: str
    attention: bool
    unknown: bool  # the graph records no training value
    wanted: float


def _options(
    rows: Mapping[Mode, list[Difference]], modules: Mapping[Mode, GraphModule], sited: set[str]
) -> dict[int, tuple[Options, str]]:
    """Per row (by ``id``), the ``options`` and ``fix`` that fix it, or the ``fix`` that says why none does."""
    fixes: dict[int, tuple[Options, str]] = {}
    unknown = [row for row in rows[Mode.TRAIN] if row.cause in _UNKNOWN]
    if unknown:
        fixes.update(_training_values(unknown, list(_probability_sites(modules[Mode.EVAL], unknown))))
    pinned = [row for target in Mode for row in rows[target] if row.cause is Cause.PINNED]
    if pinned:
        held = {row.module_path for row in pinned}
        for row in pinned:
            # keep= reaches the sites of the modules inside the one it names: only if they are held too.
            if all(path in held for path in sited if matches(row.module_path, path)):
                options = Options(keep=(row.module_path,))
                fixes[id(row)] = (options, f"`{options}` leaves it as the model holds it")
            else:
                reach = "every module" if not row.module_path else "the modules inside it"
                fixes[id(row)] = (
                    Options(),
                    f"no `keep=` pattern reaches its own sites without {reach}, whose sites must change: "
                    "move it into a submodule of its own, or use `modeswap.capture(model, args)`",
                )
    return fixes


def _training_values(unknown: list[Difference], sites: list[_Site]) -> dict[int, tuple[Options, str]]:
    """The ``dropout=`` or ``attention_dropout=`` that gives each of ``unknown`` the train export's value.

    ``attention_dropout=p`` when every attention site of unknown value wants
    ``p``; else one ``dropout=`` pattern per module, then ``*`` for numbered
    components where that reaches no other site, plus a pattern, at its recorded
    value, for each site inside that the pattern would contradict.
    """
    wanted = {row.module_path: row.options.dropout[0][1] for row in unknown}
    attention = [s for s in sites if s.attention and s.unknown]
    values = {s.wanted for s in attention}
    attention_dropout = values.pop() if len(values) == 1 and values != {0.0} else None
    mapping = {
        row.module_path: p
        for row in unknown
        if attention_dropout is None or row.cause is not Cause.ATTENTION_DROPOUT_UNKNOWN
        for p in [wanted[row.module_path]]
    }
    mapping, unfixable = _settled(mapping, sites, attention_dropout)
    mapping = _generalised(mapping, sites, attention_dropout)
    fixes: dict[int, tuple[Options, str]] = {}
    for row in unknown:
        if row.module_path in unfixable:
            fixes[id(row)] = (
                Options(),
                "sites of one module want different training values, which no pattern tells apart: "
                "use `modeswap.capture(model, args)`",
            )
            continue
        if attention_dropout is not None and row.cause is Cause.ATTENTION_DROPOUT_UNKNOWN:
            options = Options(attention_dropout=attention_dropout)
        else:
            deciding = decide(tuple(mapping.items()), row.module_path)
            assert deciding is not None
            # The pattern, and the patterns beside it for the sites it reaches that it would contradict.
            reached = [site.path for site in sites if matches(deciding[0], site.path)]
            inside = [(p, v) for p, v in mapping.items() if p == deciding[0] or any(matches(p, r) for r in reached)]
            options = Options(dropout=tuple(inside))
        fixes[id(row)] = (options, f"`{options}` states the training value")
    return fixes


def _settled(
    mapping: dict[str, float], sites: list[_Site], attention_dropout: float | None
) -> tuple[dict[str, float], set[str]]:
    """``mapping`` with a pattern for each site it would give a wrong value, and the paths no pattern can fix."""
    mapping, unfixable = dict(mapping), set[str]()
    for _ in range(len(sites) + 1):
        wrong = [s for s in sites if _given(mapping, s, attention_dropout) not in (None, s.wanted)]
        if not wrong:
            return mapping, unfixable
        for s in wrong:
            if s.path in mapping:
                unfixable.add(s.path)  # two sites of one module want two values
                del mapping[s.path]
            else:
                mapping[s.path] = s.wanted
    return mapping, unfixable


def _given(mapping: Mapping[str, float], site: _Site, attention_dropout: float | None) -> float | None:
    """The training value the swap gives ``site`` under ``mapping``; ``None`` for the one it leaves as it is."""
    try:
        decided = decide(tuple(mapping.items()), site.path)
    except InvalidOptionError:
        return float("nan")  # never wanted
    if decided is not None:
        return decided[1]
    return attention_dropout if site.attention and site.unknown else None


def _generalised(mapping: dict[str, float], sites: list[_Site], attention_dropout: float | None) -> dict[str, float]:
    """``mapping`` with numbered components of paths that share a shape and a value as ``*``, where nothing changes."""
    shapes: dict[tuple[str, float], list[str]] = {}
    for path, p in mapping.items():
        shapes.setdefault((_NUMBERED.sub("*", path), p), []).append(path)
    before = [_given(mapping, s, attention_dropout) for s in sites]
    for (_, p), paths in shapes.items():
        if len(paths) < 2:
            continue
        candidate = {k: v for k, v in mapping.items() if k not in paths} | {pattern(paths): p}
        if [_given(candidate, s, attention_dropout) for s in sites] == before:
            mapping = candidate
    return mapping


def _probability_sites(gm: GraphModule, unknown: list[Difference]) -> Iterator[_Site]:
    """Each dropout and attention site of the eval graph ``gm``, with the training value the train export has."""
    wanted = {
        (row.module_path, row.cause is Cause.ATTENTION_DROPOUT_UNKNOWN): row.options.dropout[0][1] for row in unknown
    }
    captured = Context.of(gm).captured()
    for _, node, rule in rule_nodes(gm):
        argument = rule.flag if rule.train is Sentinel.PER_NODE else rule.gated
        if argument is None:
            continue
        path, attention = module_path(node), rule.train is Sentinel.PER_NODE
        recorded = recorded_probability(rule, node, captured)
        unknown_value = recorded is not None and recorded[1] is Sentinel.UNKNOWN
        if (path, attention) in wanted:
            value = wanted[path, attention]
        elif recorded is not None and not unknown_value:
            value = recorded[1]
        else:
            value = get_argument(node, argument)  # what the swap leaves, and the train export agreed
        if isinstance(value, int | float):
            yield _Site(path, attention, unknown_value, float(value))


def sited_paths(gm: GraphModule) -> set[str]:
    """The module path of every site of ``gm``, subgraphs included, whatever its mode."""
    return {module_path(node) for _, node, _ in rule_nodes(gm)}


# Rows grouped as a reader wants them.


def _grouped(rows: list[Difference], keeps_only_held: Callable[[str], bool]) -> Iterator[Difference]:
    """``rows``, those that differ only in a numbered component of their path (``blocks.3``) as one row.

    The row's ``keep=`` names the pattern where ``keeps_only_held`` says that
    it reaches no site that must change, else each module.
    """
    groups: dict[tuple[object, ...], list[Difference]] = {}
    for row in rows:
        groups.setdefault(_shape(row), []).append(row)
    for group in groups.values():
        if len(group) == 1:
            yield group[0]
            continue
        first = group[0]
        shared = pattern([row.module_path for row in group])
        options = Options.merged(row.options for row in group)
        if options.keep and keeps_only_held(shared):
            options = attrs.evolve(options, keep=(shared,))
        fix = first.fix.replace(str(first.options), str(options)) if first.options else first.fix
        yield Difference(
            shared,
            tuple(n for row in group for n in row.nodes),
            first.what.replace(first.module_path, shared),
            first.cause,
            fix,
            options,
            tuple(row.module_path for row in group),
        )


def pattern(paths: list[str]) -> str:
    """The pattern of ``paths`` (of one shape): each component they share as it is, the others (numbers) as ``*``."""
    split = [path.split(".") for path in paths]
    return ".".join(parts[0] if len(set(parts)) == 1 else "*" for parts in zip(*split, strict=True))


def _shape(row: Difference) -> tuple[object, ...]:
    """What a row says, with its path's numbered components as ``*``: rows of one shape are one difference."""
    path = row.module_path
    if not path or not _NUMBERED.search(path):
        return (id(row),)
    pattern = _NUMBERED.sub("*", path)

    def general(text: str) -> str:
        return text.replace(path, pattern)

    attention = row.options.attention_dropout
    values = tuple(p for _, p in row.options.dropout)
    return (pattern, row.cause, general(row.what), general(_without(row.fix, str(row.options))), attention, values)


def _without(text: str, part: str) -> str:
    return text.replace(part, "") if part else text
