"""Every ATen op that takes a mode argument or draws random numbers has a place in the tables.

A new torch that adds such an op fails here until someone decides where it
goes: a rule (``rules.RULES``), what decomposition makes of one
(``rules.DECOMPOSED``), a fused eval-only kernel (``rules.EVAL_ONLY``), or one of
the explained tables of ``modeswap.table.unowned``.
"""

from __future__ import annotations

import re

import pytest
import torch

from modeswap.table import rules, unowned

#: Schema arguments that carry ``module.training`` in some op.
MODE_ARGUMENTS = frozenset({"train", "training", "use_input_stats", "dropout_p"})


def _aten_overloads() -> dict[str, torch._ops.OpOverload]:
    names = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("aten::")}
    names |= {f"{s.name}.{s.overload_name}" for s in torch._C._jit_get_all_schemas() if s.name.startswith("aten::")}
    found = {}
    for full in names:
        qualified, _, overload = full.partition(".")
        found_op = rules.resolve([f"aten.{qualified.removeprefix('aten::')}.{overload or 'default'}"])
        for op in found_op:
            found[str(op)] = op
    return found


def _mode_sensitive() -> list[str]:
    return sorted(
        name
        for name, op in _aten_overloads().items()
        if MODE_ARGUMENTS & {a.name for a in op._schema.arguments} or torch.Tag.nondeterministic_seeded in op.tags
    )


def _place(name: str) -> list[str]:
    packet = name.rsplit(".", 1)[0]
    owned = {str(op) for rule in rules.RULES for op in rule.ops}
    tables = {
        "a rule": owned,
        "DECOMPOSED": set(rules.DECOMPOSED),
        "EVAL_ONLY": set(rules.EVAL_ONLY),
        "unowned.RANDOM": set(unowned.RANDOM),
        "unowned.UNREACHABLE": set(unowned.UNREACHABLE),
    }
    return [table for table, names in tables.items() if name in names or packet in names]


def test_the_census_finds_the_ops_it_is_about() -> None:
    census = _mode_sensitive()
    # A census that found nothing would make the next test pass vacuously.
    assert {"aten.dropout.default", "aten.batch_norm.default", "aten.lstm.input", "aten.randn.default"} <= set(census)
    assert len(census) > 100


def test_every_mode_sensitive_op_has_exactly_one_place() -> None:
    census = _mode_sensitive()
    nowhere = [name for name in census if not _place(name)]
    twice = {name: _place(name) for name in census if len(_place(name)) > 1}
    assert nowhere == [], (
        f"torch {torch.__version__} has ops with a mode argument or a random draw that no table places: "
        f"{nowhere}. Add a rule for each op a swap must change, or list it in modeswap.table.unowned with its reason."
    )
    assert twice == {}


@pytest.mark.parametrize(
    "table",
    [rules.DECOMPOSED, rules.EVAL_ONLY, unowned.RANDOM, unowned.UNREACHABLE],
    ids=["DECOMPOSED", "EVAL_ONLY", "RANDOM", "UNREACHABLE"],
)
def test_every_name_in_the_tables_is_an_op_of_this_torch(table: dict[str, str]) -> None:
    known = _aten_overloads()
    packets = {name.rsplit(".", 1)[0] for name in known}
    stale = [name for name, reason in table.items() if name not in known.keys() | packets and _since(reason) <= _TORCH]
    assert stale == [], f"torch {torch.__version__} has no op named {stale}: remove them or say which torch has them"


_TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def _since(reason: str) -> tuple[int, ...]:
    """The torch release a reason says its op first appeared in (``torch 2.15+: ...``); (0,) if it says none."""
    match = re.match(r"torch (\d+)\.(\d+)\+:", reason)
    return (int(match[1]), int(match[2])) if match else (0,)


def test_every_rule_names_ops_with_its_flag() -> None:
    for rule in rules.RULES:
        for op in rule.ops:
            arguments = {a.name for a in op._schema.arguments}
            assert rule.flag in arguments, (op, rule.flag)
            assert set(rule.params) <= arguments, (op, rule.params)
            assert rule.flag in MODE_ARGUMENTS or torch.Tag.nondeterministic_seeded in op.tags, op


def test_every_reason_is_one_line() -> None:
    for table in (unowned.RANDOM, unowned.UNREACHABLE):
        for name, reason in table.items():
            assert reason, name
            assert "\n" not in reason, name
