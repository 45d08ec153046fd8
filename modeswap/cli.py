"""The ``modeswap`` command."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

import modeswap
from modeswap.errors import ModeswapError, ProgramFileError
from modeswap.files import load_program, save_program
from modeswap.modes import Change, ModeReport
from modeswap.testing.oracle import Snapshot, call_signature, run_forward_backward


class DemoNet(nn.Module):
    """The demo's model: conv, batch norm with custom momentum and eps, dropout, attention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, momentum=0.05, eps=1e-3)
        self.drop = nn.Dropout(0.2)
        self.attention_p = 0.1
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.relu(self.bn(self.conv(x))))
        tokens = x.flatten(2).transpose(1, 2).unsqueeze(1)  # (batch, 1 head, positions, channels)
        p = self.attention_p if self.training else 0.0
        attended = F.scaled_dot_product_attention(tokens, tokens, tokens, dropout_p=p)
        return self.head(attended.mean(dim=2).squeeze(1))  # type: ignore[no-any-return]


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [list(map(str, header)), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report_table(report: ModeReport) -> str:
    """Render a :class:`ModeReport` as a text table."""
    overall = "none" if report.mode is None else report.mode.value
    rows = [
        (
            s.node,
            s.kind,
            s.mode.value,
            s.module_path or "(root)",
            "functional" if s.functional else "module",
            ", ".join(f"{k}={v}" for k, v in s.params.items()),
        )
        for s in report.sites
    ]
    lines = [
        f"mode: {overall}{' (mixed)' if report.mixed else ''}",
        _table(rows, ("node", "kind", "mode", "module", "call", "params")),
    ]
    if any(s.functional for s in report.sites):
        lines.append(
            "call=functional: an F.* call outside a module of its kind; its mode may be hard-coded, not follow training"
        )
    if report.stochastic:
        lines.append(f"random ops outside any site: {', '.join(report.stochastic)}")
    return "\n".join(lines)


def changes_table(changes: Sequence[Change]) -> str:
    """Render the changes of a swap as a text table."""
    return _table(
        [(c.node, c.op, c.field, f"{c.before} -> {c.after}") for c in changes], ("node", "op", "field", "edit")
    )


def _max_difference(expected: dict[str, Any], actual: dict[str, Any]) -> float:
    pairs = list(zip(expected["outputs"], actual["outputs"], strict=True))
    pairs += [(expected["buffers"][k], actual["buffers"][k]) for k in expected["buffers"]]
    pairs += [(expected["grads"][k], actual["grads"][k]) for k in expected["grads"] if expected["grads"][k] is not None]
    return max(float((e.double() - a.double()).abs().max()) for e, a in pairs)


def _median_seconds(fn: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def demo() -> int:
    """Export a model in train mode, swap it to eval and back, and check every step against eager."""
    torch.manual_seed(0)
    model = DemoNet()
    x = torch.randn(4, 3, 8, 8)
    checks: list[tuple[str, bool]] = []

    def check(what: str, ok: bool) -> None:
        checks.append((what, ok))
        print(f"  [{'ok' if ok else 'FAILED'}] {what}")

    print("1. Export DemoNet (conv, batch norm momentum=0.05 eps=1e-3, dropout p=0.2, attention p=0.1) in train mode")
    gm = torch.export.export(copy.deepcopy(model).train(), (x,)).module()
    before = Snapshot.of(gm)
    print(report_table(modeswap.mode_of(gm)))

    print("\n2. Swap to eval")
    evaluated = modeswap.swap(gm, "eval")
    print(changes_table(evaluated.changes))
    expected = run_forward_backward(copy.deepcopy(model).eval(), (x,), seed=1)
    actual = run_forward_backward(evaluated.module, (x,), seed=1)
    difference = _max_difference(expected, actual)
    print(f"  max |eager eval - swapped| over outputs, buffers and gradients: {difference:.3g}")
    check("eval graph matches eager model.eval() (outputs, buffers, gradients)", difference == 0.0)
    check("mode_of says eval", modeswap.mode_of(evaluated.module).mode is modeswap.Mode.EVAL)

    print("\n3. Swap back to train")
    trained = modeswap.to_train(evaluated.module)
    eager_train = copy.deepcopy(model).train()
    expected = run_forward_backward(eager_train, (x,), seed=2)
    actual = run_forward_backward(trained, (x,), seed=2)
    difference = _max_difference(expected, actual)
    print(f"  max |eager train - swapped| under one seed: {difference:.3g}")
    print(f"  num_batches_tracked after one forward: {int(actual['buffers']['bn.num_batches_tracked'])}")
    check("train graph matches eager model.train() (outputs, buffers, gradients, dropout masks)", difference == 0.0)
    check(
        "round trip gives back the exported train graph",
        call_signature(trained) == call_signature(gm),
    )

    print("\n4. The input was never touched")
    check("exported module: same code, nodes, meta, tensors and storage", Snapshot.of(gm) == before)

    print("\n5. Time")
    swap_time = _median_seconds(lambda: modeswap.to_eval(gm))
    floor_time = _median_seconds(lambda: modeswap.pipeline()(gm))
    print(f"  to_eval: {swap_time * 1e3:.1f} ms (copy + recompile alone: {floor_time * 1e3:.1f} ms)")

    failed = [what for what, ok in checks if not ok]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks held.")
    return 1 if failed else 0


def inspect(args: argparse.Namespace) -> int:
    """Print the mode report of a saved program."""
    report = modeswap.mode_of(load_program(args.file))
    if args.json:
        print(json.dumps({"file": str(args.file), **attrs.asdict(report)}, indent=2))
    else:
        print(f"{args.file}")
        print(report_table(report))
    return 0


def convert(args: argparse.Namespace) -> int:
    """Swap a saved program to train or eval mode and save the result."""
    if args.output.exists() and args.output.resolve() == args.file.resolve():
        raise ProgramFileError(f"{args.output}: is the input file; write the result to another file")
    program = load_program(args.file)
    swapped = modeswap.swap(program, args.to, attention_dropout=args.attention_dropout)
    save_program(swapped.module, args.output, force=args.force)
    print(f"{args.file} -> {args.output}: {args.to} mode, {len(swapped.changes)} change(s)")
    if swapped.changes:
        print(changes_table(swapped.changes))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modeswap",
        description="Switch torch.export graphs between train and eval behaviour.",
        epilog="Loading a .pt2 file runs torch's deserializer on it: use files you trust.",
    )
    parser.add_argument("--version", action="version", version=f"modeswap {modeswap.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback when a command fails")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "demo",
        help="swap an embedded model to eval and back, checking each step against eager PyTorch",
        description=demo.__doc__,
    ).set_defaults(run=lambda args: demo())
    show = commands.add_parser("inspect", help="print the mode of a saved program", description=inspect.__doc__)
    show.add_argument("file", type=Path, metavar="FILE.pt2", help="a program saved with torch.export.save")
    show.add_argument("--json", action="store_true", help="print the report as JSON")
    show.set_defaults(run=inspect)
    swap = commands.add_parser("convert", help="swap a saved program to train or eval", description=convert.__doc__)
    swap.add_argument("file", type=Path, metavar="IN.pt2", help="a program saved with torch.export.save")
    swap.add_argument("--to", required=True, choices=[m.value for m in modeswap.Mode], help="the target mode")
    swap.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.pt2", help="where to write it")
    swap.add_argument(
        "--attention-dropout",
        type=float,
        metavar="P",
        help="dropout_p for attention whose training value the file does not record (train only)",
    )
    swap.add_argument("--force", action="store_true", help="overwrite OUT.pt2 if it exists")
    swap.set_defaults(run=convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``modeswap`` command line; return its exit code (0 done, 2 bad input or usage, 1 a bug)."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except ModeswapError as error:
        print(f"modeswap {args.command}: {error}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return 2
    except Exception as error:
        print(f"modeswap {args.command}: internal error, please report it: {error!r}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        else:
            print("(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
