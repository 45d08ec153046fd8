"""Generate ``docs/coverage.md``: every model of the zoo swapped both ways, measured against eager PyTorch.

Run from the repository root::

    python -m tests.integration.coverage [--out docs/coverage.md]

For each architecture of :data:`tests.integration.models.CASES` it exports the
model in one mode, swaps the graph to the other with ``modeswap.swap`` and runs
it beside the eager model in the target mode under one seed
(``modeswap.testing.oracle.run_forward_backward``). A row records the graph, the
sites ``mode_of`` finds in it, how far outputs, buffers and gradients are from
eager, the warnings the swap raised, and the median time of five swaps.

Drop-path models get two eval-to-train rows: from ``to_eval`` of a train export
(which keeps the drop path), and from a plain eval export (which erased it, so
it cannot match). Models whose attention dropout an eval export records as 0.0
get one more row: ``to_train`` without the ``dropout=`` mapping its warning suggests.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from torch.fx import GraphModule

import modeswap
from modeswap.fx.graphs import graph_modules
from modeswap.table.rules import KINDS
from modeswap.testing.oracle import run_forward_backward

from .models import CASES, Case
from .test_transformers import filled

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "docs" / "coverage.md"
COMMAND = "python -m tests.integration.coverage"
SEED = 0
SWAP_REPEATS = 5
#: The marks of the rows that show a documented limit: ¹ drop path, ² attention dropout.
FOOTNOTES = ("¹", "²")


#: Which graph a row swaps: a train export, an eval export, or ``to_eval`` of a train export.
Start = Literal["train export", "eval export", "to_eval(train export)"]


@dataclass(frozen=True)
class Direction:
    """One row of an architecture: the graph to swap, the mode to swap it to, and the options."""

    label: str
    start: Start
    target: modeswap.Mode
    #: The training p of every site whose training value the graph does not record (see ``stated``).
    attention_dropout: float | None = None


@dataclass(frozen=True)
class Row:
    """What one direction of one architecture measured."""

    architecture: str
    direction: str
    nodes: int
    sites: str
    sites_after: str
    output_diff: float | None  # None when the outputs do not have the same shapes
    buffers_equal: bool
    grad_diff: float | None  # None when one side has a gradient the other lacks
    warnings: str
    swap_ms: float

    @property
    def footnoted(self) -> bool:
        """Whether the row is one of the documented limits, marked with a footnote."""
        return any(mark in self.direction for mark in FOOTNOTES)

    @property
    def exact(self) -> bool:
        """Whether outputs, buffers and gradients are bit for bit those of eager."""
        return self.output_diff == 0.0 and self.buffers_equal and self.grad_diff == 0.0


def export(model: torch.nn.Module, args: tuple[torch.Tensor, ...], *, train: bool) -> GraphModule:
    """``torch.export`` a copy of ``model`` in train or eval mode; export's own warnings are silenced."""
    captured = copy.deepcopy(model).train(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.export.export(captured, args).module()
    assert isinstance(module, GraphModule)
    return module


def node_count(gm: GraphModule) -> int:
    """The nodes of ``gm`` and of every subgraph below it."""
    return sum(len(module.graph.nodes) for _, module in graph_modules(gm))


def sites_by_kind(gm: GraphModule) -> str:
    """``mode_of``'s sites of ``gm`` counted by kind in the rule table's order, e.g. ``"dropout 2, batch_norm 6"``."""
    counts: Counter[str] = Counter(site.kind for site in modeswap.mode_of(gm).sites)
    order = [kind for kind in KINDS if kind in counts] + sorted(set(counts) - set(KINDS))
    return ", ".join(f"{kind} {counts[kind]}" for kind in order) or "none"


def stated(gm: GraphModule, p: float | None) -> dict[str, float] | None:
    """The ``dropout=`` mapping that ``to_train``'s warning suggests for ``gm``, every value to edit set to ``p``."""
    if p is None:
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        modeswap.to_train(gm)
    found = [w.message for w in caught if isinstance(w.message, modeswap.UnknownTrainingValueWarning)]
    return filled(found[0], p) if found else None


def timed_swaps(
    gm: GraphModule, target: modeswap.Mode, attention_dropout: float | None
) -> tuple[modeswap.Swap[GraphModule], list[warnings.WarningMessage], float]:
    """Swap ``gm`` :data:`SWAP_REPEATS` times: the first swap, the warnings it raised, the median time in ms."""
    results: list[tuple[modeswap.Swap[GraphModule], list[warnings.WarningMessage], float]] = []
    dropout = stated(gm, attention_dropout)
    for _ in range(SWAP_REPEATS):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            swapped = modeswap.swap(gm, target, dropout=dropout)
            elapsed = time.perf_counter() - start
        results.append((swapped, list(caught), elapsed))
    first, raised, _ = results[0]
    return first, raised, 1000 * statistics.median(elapsed for _, _, elapsed in results)


def warning_summary(caught: Iterable[warnings.WarningMessage]) -> str:
    """The warnings by class name and count, e.g. ``"UnknownTrainingValueWarning 1"``, or ``"none"``."""
    counts = Counter(message.category.__name__ for message in caught)
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items())) or "none"


def max_diff(expected: list[torch.Tensor | None], actual: list[torch.Tensor | None]) -> float | None:
    """The largest absolute difference between paired tensors; None when a pair does not line up."""
    if len(expected) != len(actual):
        return None
    worst = 0.0
    for e, a in zip(expected, actual, strict=True):
        if e is None or a is None:
            if e is not a:
                return None
            continue
        if e.shape != a.shape:
            return None
        if e.numel():
            worst = max(worst, (a.double() - e.double()).abs().max().item())
    return worst


def buffers_equal(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> bool:
    """Whether both runs have the same buffers, bit for bit."""
    return sorted(expected) == sorted(actual) and all(torch.equal(expected[k], actual[k]) for k in expected)


def grad_diff(expected: dict[str, Any], actual: dict[str, Any]) -> float | None:
    """The largest absolute difference over parameter and input gradients; None when they do not line up."""
    if sorted(expected["grads"]) != sorted(actual["grads"]):
        return None
    names = sorted(expected["grads"])
    return max_diff(
        [*(expected["grads"][k] for k in names), *expected["input_grads"]],
        [*(actual["grads"][k] for k in names), *actual["input_grads"]],
    )


def measure(case: Case, model: torch.nn.Module, direction: Direction, gm: GraphModule) -> Row:
    """Swap ``gm`` as ``direction`` says and compare one forward and backward with eager ``model``."""
    args = case.inputs()
    swapped, caught, swap_ms = timed_swaps(gm, direction.target, direction.attention_dropout)
    eager = copy.deepcopy(model).train(direction.target is modeswap.Mode.TRAIN)
    expected = run_forward_backward(eager, args, seed=SEED)
    actual = run_forward_backward(swapped.module, args, seed=SEED)
    return Row(
        architecture=case.name,
        direction=direction.label,
        nodes=node_count(gm),
        sites=sites_by_kind(gm),
        sites_after=sites_by_kind(swapped.module),
        output_diff=max_diff(expected["outputs"], actual["outputs"]),
        buffers_equal=buffers_equal(expected["buffers"], actual["buffers"]),
        grad_diff=grad_diff(expected, actual),
        warnings=warning_summary(caught),
        swap_ms=swap_ms,
    )


def directions(case: Case) -> list[Direction]:
    """The rows of ``case``; see the module docstring."""
    train, evaluate, p = modeswap.Mode.TRAIN, modeswap.Mode.EVAL, case.attention_dropout
    rows = [Direction("train export → to_eval", "train export", evaluate)]
    if case.drop_path:
        rows.append(Direction("to_eval(train export) → to_train", "to_eval(train export)", train, p))
        rows.append(Direction("eval export → to_train: drop path erased by the export ¹", "eval export", train, p))
    else:
        rows.append(Direction("eval export → to_train", "eval export", train, p))
    if p is not None:
        rows.append(Direction("eval export → to_train without dropout= ²", "eval export", train))
    return rows


def start_graphs(case: Case, model: torch.nn.Module) -> dict[Start, GraphModule]:
    """The graphs the rows of ``case`` swap, one export per mode."""
    args = case.inputs()
    trained = export(model, args, train=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluated = modeswap.to_eval(trained)
    return {
        "train export": trained,
        "eval export": export(model, args, train=False),
        "to_eval(train export)": evaluated,
    }


def measure_case(case: Case) -> list[Row]:
    """Every row of ``case``, with a progress line per row on stderr."""
    model = case.build(SEED)
    graphs = start_graphs(case, model)
    rows = []
    for direction in directions(case):
        start = time.perf_counter()
        row = measure(case, model, direction, graphs[direction.start])
        rows.append(row)
        seconds = time.perf_counter() - start
        flag = "exact" if row.exact else "DIFFERS"
        print(f"  {case.name}: {direction.label}: {flag} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    return rows


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo``, or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def number(value: float | None) -> str:
    """A difference as the table writes it: ``0``, ``1.2e-07``, or ``n/a`` when the runs do not line up."""
    if value is None:
        return "n/a"
    return "0" if value == 0 else f"{value:.2g}"


def table(rows: Iterable[Row]) -> list[str]:
    """The markdown table of ``rows``."""
    header = [
        "architecture",
        "direction",
        "graph nodes",
        "sites found",
        "sites after swap",
        "max abs output diff",
        "buffers equal",
        "max abs grad diff",
        "warnings during swap",
        "swap ms (median of 5)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [
            row.architecture,
            row.direction,
            str(row.nodes),
            row.sites,
            row.sites_after,
            number(row.output_diff),
            "yes" if row.buffers_equal else "**no**",
            number(row.grad_diff),
            row.warnings,
            f"{row.swap_ms:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def page(rows: list[Row], runtime_s: float, when: datetime) -> str:
    """The whole of ``docs/coverage.md``."""
    machine = (
        f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread, "
        f"{platform.system()} {platform.machine()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"modeswap {modeswap.__version__}"
    )
    exact = sum(row.exact for row in rows)
    unexpected = [f"{row.architecture} ({row.direction})" for row in rows if not row.exact and not row.footnoted]
    verdict = (
        f"Rows that differ without a footnote: {'; '.join(unexpected)}."
        if unexpected
        else "Every row that differs is one of the footnoted limits."
    )
    lines = [
        "# Coverage: the model zoo swapped both ways",
        "",
        "Every architecture of the integration zoo (`tests/integration/models.py`: tiny transformers configs with "
        "random weights and every dropout, attention dropout and drop path above zero) exported with "
        "`torch.export` in one mode, swapped to the other with `modeswap.swap`, and run beside the eager model "
        f"in the target mode under seed {SEED}: one forward, then one backward through a fixed random loss "
        "(`modeswap.testing.oracle.run_forward_backward`). The differences are maximum absolute differences "
        "against eager; buffers are compared bit for bit after the forward; gradients cover the parameters and "
        "the inputs. Graph nodes and sites found are those of the graph the swap starts from (`mode_of(...).sites` "
        "counted by kind; an attention call whose `dropout_p` is 0.0 is no site, since nothing in the graph tells "
        "its mode, hence none in eval exports); sites after swap are those of the swapped graph. The swap time is "
        f"the median of {SWAP_REPEATS} `modeswap.swap` calls. {exact} of {len(rows)} rows match eager bit for bit. "
        f"{verdict}",
        "",
        f"Generated by `{COMMAND}` on {when:%Y-%m-%d} in {runtime_s:.0f} s. Machine: {machine}.",
        "",
        *table(rows),
        "",
        "¹ An eval export never runs the drop path (stochastic depth): it is the identity there, so no node of "
        "the graph comes from it and no rewrite can bring it back; `to_train` of such a graph trains without it, "
        "which is why this row differs from eager train mode. A train export keeps the drop path: `to_eval` "
        "turns it into the identity and leaves a memo from which `to_train` rebuilds it exactly (the "
        "`to_eval(train export) → to_train` row). See "
        "[Limitations: drop path, exported in eval](limitations.md#drop-path-exported-in-eval).",
        "",
        "² An eval export records the training `dropout_p` of `F.scaled_dot_product_attention` (and the `p` of "
        "transformers' eager attention dropout, as in `bert_eager`) as 0.0, so `to_train` of an eval export "
        "must be told it. Without it, `to_train` emits an `UnknownTrainingValueWarning` that lists the sites "
        "and the `dropout=` mapping that would state them, and leaves attention dropout off, so the graph no "
        "longer trains as eager does: these rows. Every other eval export row passes that mapping with the "
        "model's attention dropout filled in. For the drop-path models (swin, dinov2) this row also lacks the "
        "drop path (¹).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure every case and write the page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to write (default: {DEFAULT_OUT})")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)  # the models are tiny: a second thread only adds overhead
    when = datetime.now(UTC)
    start = time.perf_counter()
    rows: list[Row] = []
    for index, case in enumerate(CASES, 1):
        print(f"[{index}/{len(CASES)}] {case.name}", file=sys.stderr, flush=True)
        rows.extend(measure_case(case))
    runtime_s = time.perf_counter() - start
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(page(rows, runtime_s, when), encoding="utf-8")
    print(f"wrote {options.out} ({len(rows)} rows, {runtime_s:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
