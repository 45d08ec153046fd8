"""The rule table of docs/semantics.md against the rule table of the code (``modeswap.table.rules``).

Each row of the doc's table names ops (``aten.dropout``, ``dropout_``,
``aten.feature_dropout(_)`` for both overload packets, ``.input`` for an
overload, or a pattern such as ``mul(div(x, keep), ...)`` for a drop path), the
kind of site they make, the argument that carries the mode and its value in each
mode. Every op the doc names must be one of that kind's in ``RULES``/``IDIOMS``,
and every op of a rule or idiom must be named in a row of its kind.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from modeswap.table.rules import IDIOMS, KINDS, RULES, Capture, Op, Rule, Sentinel

DOC = Path(__file__).resolve().parents[3] / "docs" / "semantics.md"
SECTION = "## The rule table"
NONE = "—"  # the kind of a row whose op the swaps leave alone


def cells(line: str) -> list[str]:
    """The cells of a markdown table row, ``|`` inside code spans kept."""
    found: list[str] = []
    cell, code = "", False
    for char in line.strip().removeprefix("|").removesuffix("|"):
        if char == "`":
            code = not code
        if char == "|" and not code:
            found.append(cell.strip())
            cell = ""
        else:
            cell += char
    return [*found, cell.strip()]


def doc_table(text: str) -> list[dict[str, str]]:
    """The rows of the first table after the heading :data:`SECTION`, by header: one run of ``|`` lines."""
    section = text.split(f"\n{SECTION}\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows: list[list[str]] = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    header, separator, *body = rows
    assert all(set(cell) <= set("-:") for cell in separator), f"{DOC}: no table under {SECTION!r}"
    for row in body:
        assert len(row) == len(header), f"{DOC}: a row of {len(row)} cells under a header of {len(header)}: {row}"
    return [dict(zip(header, row, strict=True)) for row in body]


def spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def named(cell: str) -> tuple[set[str], set[str]]:
    """The op packets (``aten.dropout``) and overloads (``input``) the code spans of ``cell`` name.

    ``x(_)`` names ``x`` and ``x_``; a span with calls in it, a pattern, names each op it calls.
    """
    packets: set[str] = set()
    overloads: set[str] = set()
    for span in spans(cell):
        if overload := re.fullmatch(r"\.(\w+)", span):
            overloads.add(overload[1])
        elif op := re.fullmatch(r"(?:aten\.)?(\w+)(\(_\))?", span):
            packets |= {f"aten.{op[1]}", *([f"aten.{op[1]}_"] if op[2] else [])}
        else:
            packets |= {f"aten.{name}" for name in re.findall(r"(\w+)\(", span)}
    return packets, overloads


def packet(op: torch._ops.OpOverload) -> str:
    """``aten.lstm`` for ``aten.lstm.input``."""
    return str(op).rsplit(".", 1)[0]


def pattern_ops(op: Op | Capture) -> set[torch._ops.OpOverload]:
    if isinstance(op, Capture):
        return set()
    return set(op.targets).union(*(pattern_ops(arg) for arg in op.args))


def table_ops() -> dict[str, set[torch._ops.OpOverload]]:
    """Every op of ``RULES`` and ``IDIOMS``, by kind."""
    ops: dict[str, set[torch._ops.OpOverload]] = defaultdict(set)
    for rule in RULES:
        ops[rule.kind] |= set(rule.ops)
    for idiom in IDIOMS:
        ops[idiom.kind] |= pattern_ops(idiom.pattern)
    return ops


ROWS = doc_table(DOC.read_text(encoding="utf-8"))
OP, KIND, ARGUMENT, TRAIN, EVAL = "op in the export training IR", "`kind`", "argument", "train", "eval"


def row_kind(row: dict[str, str]) -> str:
    kind = spans(row[KIND])
    return kind[0] if kind else row[KIND]


def test_the_doc_has_the_columns_read_here() -> None:
    assert ROWS, f"{DOC}: the table under {SECTION!r} has no rows"
    assert {OP, KIND, ARGUMENT, TRAIN, EVAL} <= set(ROWS[0]), f"{DOC}: columns {list(ROWS[0])}"


def test_every_kind_the_doc_names_is_in_the_table_and_every_kind_has_a_row() -> None:
    documented = {row_kind(row) for row in ROWS} - {NONE}
    unknown = sorted(documented - set(KINDS))
    missing = [kind for kind in KINDS if kind not in documented]
    assert not unknown, f"{DOC} names kinds that modeswap.table.rules.KINDS lacks: {unknown}"
    assert not missing, f"{DOC}'s rule table has no row for the kinds {missing} of modeswap.table.rules.KINDS"


def test_every_op_the_doc_names_is_an_op_of_its_kind() -> None:
    ops = table_ops()
    wrong: list[str] = []
    for row in ROWS:
        kind = row_kind(row)
        # A row the swaps leave alone names an op some rule owns under other arguments.
        known = set().union(*ops.values()) if kind == NONE else ops.get(kind, set())
        packets, overloads = named(row[OP])
        assert packets, f"{DOC}: a row of kind {kind} names no op: {row[OP]!r}"
        wrong += [f"{p} (kind {kind})" for p in sorted(packets - {packet(op) for op in known})]
        ours = {op._overloadname for op in known if packet(op) in packets}
        wrong += [f"overload .{o} of {sorted(packets)} (kind {kind})" for o in sorted(overloads - ours)]
    assert not wrong, f"{DOC} names ops that no rule or idiom of modeswap.table.rules has: {wrong}"


@pytest.mark.parametrize("kind", KINDS)
def test_every_op_of_the_table_is_named_in_a_row_of_its_kind(kind: str) -> None:
    documented = set().union(*(named(row[OP])[0] for row in ROWS if row_kind(row) == kind))
    missing = sorted({packet(op) for op in table_ops()[kind]} - documented)
    assert not missing, f"{DOC}'s rule table names no op {missing} of kind {kind} (modeswap.table.rules)"


@pytest.mark.parametrize("rule", RULES, ids=[rule.kind for rule in RULES])
def test_the_doc_gives_each_rule_its_argument_and_values(rule: Rule) -> None:
    for row in (row for row in ROWS if row_kind(row) == rule.kind):
        where = f"{DOC}, row {row[OP]!r}"
        assert spans(row[ARGUMENT])[:1] == [rule.flag], f"{where}: the argument is {rule.flag!r} in the rule"
        assert spans(row[EVAL])[:1] == [str(rule.eval)], f"{where}: eval is {rule.eval!r} in the rule"
        if rule.train is not Sentinel.PER_NODE:
            assert spans(row[TRAIN])[:1] == [str(rule.train)], f"{where}: train is {rule.train!r} in the rule"
