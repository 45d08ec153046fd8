"""The text tables the ``modeswap`` command and its demo print: a graph's sites, and a swap's changes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modeswap.records.modes import Change, ModeReport

LEGEND = {
    "call=functional": "an F.* call outside a module of its kind: its mode may be hard-coded, not follow "
    "training (convert --keep PATTERN leaves it as it is)",
    "training value=unknown": "the graph does not record the value a swap to train would set (an eval p=0.0 "
    "written outside nn.Dropout, an eval attention dropout_p=0.0): state it with convert --dropout PATTERN=P "
    "(or --attention-dropout P for attention)",
    "kept=yes": "a swap was told to leave the site as it is (convert --keep); later swaps leave it too",
    "attention at dropout_p=0.0": "computes what eval mode does, and what train mode does at a training dropout_p "
    "of 0.0: listed as eval, it leaves the graph's mode to the other sites",
}


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [list(map(str, header)), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report_table(report: ModeReport) -> str:
    """Return a :class:`ModeReport` as a text table, with a legend line for each marker it uses."""
    from modeswap.rewrite.report import tells_mode

    overall = "none" if report.mode is None else report.mode.value
    if report.mode is None and not report.mixed and report.sites:
        overall += " (no site tells it)"
    rows = [
        (
            s.node,
            s.kind,
            s.mode.value,
            s.module_path or "(root)",
            "functional" if s.functional else "module",
            "known" if s.known else "unknown",
            "yes" if s.kept else "no",
            ", ".join(f"{k}={v}" for k, v in s.params.items()),
        )
        for s in report.sites
    ]
    lines = [
        f"mode: {overall}{' (mixed)' if report.mixed else ''}",
        _table(rows, ("node", "kind", "mode", "module", "call", "training value", "kept", "params")),
    ]
    used = {
        "call=functional": any(s.functional for s in report.sites),
        "training value=unknown": any(not s.known for s in report.sites),
        "kept=yes": any(s.kept for s in report.sites),
        "attention at dropout_p=0.0": not all(tells_mode(s) for s in report.sites),
    }
    lines += [f"{marker}: {LEGEND[marker]}" for marker, present in used.items() if present]
    if report.stochastic:
        lines.append(f"random ops outside any site: {', '.join(report.stochastic)}")
    return "\n".join(lines)


def changes_table(changes: Sequence[Change]) -> str:
    """Return the changes of a swap as a text table."""
    return _table(
        [(c.node, c.op, c.field, f"{c.before} -> {c.after}") for c in changes], ("node", "op", "field", "edit")
    )
