"""The ``modeswap`` command.

The parser is built without importing torch, so that ``--help`` and ``--version``
answer at once; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

from modeswap.cli.tables import changes_table, report_table
from modeswap.records.errors import (
    InvalidOptionError,
    MixedModeWarning,
    ModeswapError,
    ModeswapWarning,
    ProgramFileError,
    UnknownTrainingValueWarning,
)
from modeswap.records.version import VERSION

MODES = ("train", "eval")  # the values of modeswap.Mode, written out: reading the enum would import torch


def demo(args: argparse.Namespace) -> int:
    """Export a model in train mode, swap it to eval and back, and check every step against eager."""
    from modeswap.cli.demo import demo

    return demo()


def inspect(args: argparse.Namespace) -> int:
    """Print the mode report of a saved program; of both programs of a modal archive, and how they differ."""
    import attrs

    from modeswap.files.disk import is_modal_archive, load_program

    if is_modal_archive(args.file):
        return inspect_archive(args)
    from modeswap.forms.swap import mode_of, warn_unread_state

    program = load_program(args.file)
    report = mode_of(program)
    warn_unread_state(program)  # what a swap to train would say of state no node reads
    if args.json:
        print(json.dumps({"file": str(args.file), **attrs.asdict(report)}, indent=2))
    else:
        print(f"{args.file}")
        print(report_table(report))
    return 0


def inspect_archive(args: argparse.Namespace) -> int:
    """Print the mode report of each program of a modal archive, and each program's swap against the other."""
    import attrs

    from modeswap.eager.check import fidelity_of
    from modeswap.files.disk import load_archive
    from modeswap.forms.swap import mode_of

    archive = load_archive(args.file)
    programs, saved = archive.programs, archive.header.mode
    reports = {mode: mode_of(program) for mode, program in programs.items()}
    fidelity = fidelity_of(programs)
    if args.json:
        found = {
            "file": str(args.file),
            "archive": "modal",
            "saved_mode": saved,
            "programs": {mode: attrs.asdict(report) for mode, report in reports.items()},
            "fidelity": json.loads(fidelity.to_json()),
        }
        print(json.dumps(found, indent=2))
        return 0
    print(f"{args.file}: a modal archive from modeswap.save, saved in {saved} mode")
    for mode, report in reports.items():
        print(f"\nprogram {mode}")
        print(report_table(report))
    # The advice is check()'s; this file already holds what capture() makes.
    print("\neach program swapped to the other mode, against that mode's own program (what a file of one program")
    print("would lose; this archive keeps both):")
    print(fidelity)
    return 0


def convert(args: argparse.Namespace) -> int:
    """Swap a saved program to train or eval mode and save the result; of a modal archive, write one program."""
    from modeswap.files.disk import check_output, is_modal_archive, load_program, save_program
    from modeswap.forms.swap import swap

    if args.output.exists() and args.output.resolve() == args.file.resolve():
        raise ProgramFileError(f"{args.output}: is the input file; write the result to another file")
    check_output(args.output, force=args.force)
    if is_modal_archive(args.file):
        return convert_archive(args)
    program = load_program(args.file)
    swapped = swap(
        program,
        args.to,
        attention_dropout=args.attention_dropout,
        dropout=dict(args.dropout) if args.dropout else None,
        keep=tuple(args.keep),
    )
    save_program(swapped.module, args.output, force=args.force)
    print(f"{args.file} -> {args.output}: {args.to} mode, {len(swapped.changes)} change(s)")
    if swapped.changes:
        print(changes_table(swapped.changes))
    return 0


def convert_archive(args: argparse.Namespace) -> int:
    """Write the program of one mode of a modal archive as a file of one program: its own, exact, no swap."""
    from modeswap.files.disk import load_archive, save_program
    from modeswap.records.modes import Mode

    given = {"--dropout": bool(args.dropout), "--attention-dropout": args.attention_dropout is not None}
    flags = [flag for flag, present in {**given, "--keep": bool(args.keep)}.items() if present]
    if flags:
        msg = (
            f"{args.file}: a modal archive holds the {args.to} program as the model exported it, and convert "
            f"writes it as it is, with no swap: {' and '.join(flags)} would change nothing. Leave "
            f"{'it' if len(flags) == 1 else 'them'} out, or swap a file of one program"
        )
        raise InvalidOptionError(msg)
    program = load_archive(args.file).programs[Mode.parse(args.to)]
    save_program(program, args.output, force=args.force)
    print(f"{args.file} -> {args.output}: the archive's {args.to} program, as exported (no swap)")
    return 0


def probability(text: str) -> float:
    """Return ``text`` as a dropout probability; raise ``argparse.ArgumentTypeError`` saying what to write."""
    try:
        p = float(text)
    except ValueError:
        p = float("nan")
    if not 0.0 <= p <= 1.0:
        msg = f"{text!r} is not a probability: write a number from 0 to 1, such as 0.1"
        raise argparse.ArgumentTypeError(msg)
    return p


def dropout_entry(text: str) -> tuple[str, float]:
    """Return ``PATTERN=P`` as ``(pattern, p)``; raise ``argparse.ArgumentTypeError`` saying what to write."""
    pattern, equals, value = text.rpartition("=")
    if not equals:
        msg = (
            f"{text!r} has no '=': write PATTERN=P, a module path pattern and its training dropout "
            "probability, such as 'encoder.layers.*.attention=0.1'"
        )
        raise argparse.ArgumentTypeError(msg)
    try:
        return pattern, probability(value)
    except argparse.ArgumentTypeError:
        msg = f"{text!r}: after the '=' write the training dropout probability, a number from 0 to 1, such as 0.1"
        raise argparse.ArgumentTypeError(msg) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modeswap",
        description="Switch torch.export graphs between train and eval behaviour.",
        epilog="Loading a .pt2 file runs torch's deserializer on it, and imports the modules that define its "
        "output types: use files you trust.",
    )
    parser.add_argument("--version", action="version", version=f"modeswap {VERSION}")
    debug = "show the traceback when a command fails"
    parser.add_argument("--debug", action="store_true", help=debug)
    # The same flag after the command; SUPPRESS keeps a subcommand from resetting one given before it.
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE before reading the file: one that registers a type the program returns or takes with "
        "torch (the module that defines it is imported by itself; repeatable)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "demo",
        parents=[after],
        help="swap an embedded model to eval and back, checking each step against eager PyTorch",
        description=demo.__doc__,
    ).set_defaults(run=demo)
    show = commands.add_parser(
        "inspect",
        parents=[after, reading],
        help="print the mode of a saved program, or of both programs of a modal archive",
        description=inspect.__doc__,
    )
    show.add_argument(
        "file", type=Path, metavar="FILE.pt2", help="a program saved with torch.export.save, or by modeswap.save"
    )
    show.add_argument("--json", action="store_true", help="print the report as JSON")
    show.set_defaults(run=inspect)
    swap = commands.add_parser(
        "convert",
        parents=[after, reading],
        help="swap a saved program to train or eval",
        description=convert.__doc__,
        epilog="A PATTERN matches the module path of a site (as inspect prints it) or of a module enclosing "
        "it: * and ? match within one component (layers.* matches layers.3), ** any number of components "
        "(**.attn matches encoder.layers.3.attn). Of the --dropout patterns that match, the innermost module's "
        "wins, then the one with more literal characters.",
    )
    swap.add_argument(
        "file",
        type=Path,
        metavar="IN.pt2",
        help="a program saved with torch.export.save, or a modal archive from modeswap.save (its --to program "
        "is written as it is)",
    )
    swap.add_argument("--to", required=True, choices=MODES, help="the target mode")
    swap.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.pt2", help="where to write it")
    swap.add_argument(
        "--dropout",
        action="append",
        default=[],
        type=dropout_entry,
        metavar="PATTERN=P",
        help="the training p of dropout and attention sites under PATTERN whose training value the file does "
        "not record (train only; repeatable)",
    )
    swap.add_argument(
        "--attention-dropout",
        type=probability,
        metavar="P",
        help="dropout_p for attention whose training value the file does not record and no --dropout "
        "pattern gives (train only)",
    )
    swap.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave the sites under PATTERN as they are, in this swap and later ones "
        "(Monte Carlo dropout, frozen batch norms; repeatable)",
    )
    swap.add_argument("--force", action="store_true", help="overwrite OUT.pt2 if it exists")
    swap.set_defaults(run=convert, check=_check_convert, usage_error=swap.error)
    return parser


def _check_convert(args: argparse.Namespace) -> None:
    """Refuse, as usage errors (exit 2), options that parse one by one but mean nothing together."""
    patterns = [pattern for pattern, _ in args.dropout]
    repeated = sorted({pattern for pattern in patterns if patterns.count(pattern) > 1})
    if repeated:
        args.usage_error(f"--dropout gives {repeated[0]!r} more than once; give each pattern one value")
    if args.to == "eval" and (args.dropout or args.attention_dropout is not None):
        args.usage_error("--dropout and --attention-dropout give training values: use them with --to train")


# Python in modeswap's messages, and what the command line says instead.
_CLI_WORDS = (
    (re.compile(r"modeswap\.mode_of\(\w+\)\.stochastic"), "modeswap inspect"),
    (re.compile(r"modeswap\.to_train\(\w+, attention_dropout=p\)"), "--attention-dropout P"),
    (re.compile(r"\b(?:attention_dropout|dropout|keep)(?= patterns?\b)"), lambda m: f"--{m[0].replace('_', '-')}"),
    # What the user stated, as the flags that state it: dropout={'drop': 0.3} is --dropout drop=0.3.
    (re.compile(r"(?<![\w.-])dropout=\{module pattern: p\}"), "--dropout PATTERN=P"),
    (re.compile(r"(?<![\w.-])attention_dropout=(\d[\d.e-]*)"), r"--attention-dropout \1"),
    (
        re.compile(r"(?<![\w.-])dropout=\{'([^'{}]*)': ([^{}]+)\}"),
        lambda m: f"--dropout {shlex.quote(f'{m[1]}={m[2]}')}",
    ),
    (
        re.compile(r"(?<![\w.-])(attention_dropout|dropout|keep)=(?=[\s,.;)]|$)"),
        lambda m: f"--{m[1].replace('_', '-')}",
    ),
    (re.compile(r"(?<![\w.-])attention_dropout(?![\w=])"), "--attention-dropout"),
)


def in_cli_words(message: str) -> str:
    """Return ``message`` on one line, its Python calls and keywords put as the command line's flags."""
    line = " ".join(message.split())
    for python, flags in _CLI_WORDS:
        line = python.sub(flags, line)
    return line


def warning_line(warning: Warning | str) -> str:
    """Return ``warning`` as one line in the command line's words: flags, not Python calls."""
    suggestion = getattr(warning, "suggestion", None)
    groups = getattr(warning, "groups", None)
    if isinstance(warning, UnknownTrainingValueWarning) and suggestion and groups:
        from modeswap.records.options import decide

        where = "; ".join(f"{kind}: {_some(paths)}" for kind, paths in groups.items())
        mapping = tuple(suggestion.items())
        # The patterns that decide the sites of unknown value; the others give sites beside them their recorded p.
        edited = {found[0] for paths in groups.values() for path in paths if (found := decide(mapping, path))}
        flags = _dropout_flags({k: p for k, p in mapping if k in edited})
        recorded = _dropout_flags({k: p for k, p in mapping if k not in edited})
        beside = f", and beside them, as they are, the values the file records: {recorded}" if recorded else ""
        modules = sum(len(paths) for paths in groups.values())
        # The Python advice ends with attention_dropout= when some of the sites are attention nodes.
        attention = "; or --attention-dropout P for every attention node" if "attention_dropout" in str(warning) else ""
        return (
            f"dropout or attention sites in {modules} module(s) hold a probability of 0.0 and record no "
            f"training value, so they keep 0.0 in train mode ({where}). State their training p, editing the "
            f"numbers (the model's config or code has them): {flags}{beside}{attention}"
        )
    if isinstance(warning, MixedModeWarning):
        flags = " ".join(f"--keep {shlex.quote(path or '')}" for path in warning.keep)
        return in_cli_words(str(warning).replace(f"keep={warning.keep!r}", flags))
    return in_cli_words(str(warning))


def _dropout_flags(mapping: dict[str, float]) -> str:
    return " ".join(f"--dropout {shlex.quote(f'{pattern}={p}')}" for pattern, p in mapping.items())


def _some(items: Sequence[str], shown: int = 3) -> str:
    names = ", ".join(item or "(root)" for item in items[:shown])
    return names + (f", ... ({len(items)} in all)" if len(items) > shown else "")


def _import(modules: Sequence[str]) -> None:
    """Import each of ``modules``; raise :class:`InvalidOptionError` naming one that fails."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:
            msg = f"--import {module}: importing it failed ({type(error).__name__}: {error})"
            raise InvalidOptionError(msg) from error


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``modeswap`` command line; return its exit code (0 done, 2 bad input or usage, 1 a bug)."""
    args = _parser().parse_args(argv)
    if "check" in args:
        args.check(args)
    failure: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ModeswapWarning)
        try:
            _import(getattr(args, "imports", ()))
            code: int = args.run(args)
        except ModeswapError as error:
            failure.append(f"modeswap {args.command}: {in_cli_words(str(error))}")
            if args.debug:
                failure.append(traceback.format_exc())
            code = 2
        except Exception as error:
            failure.append(f"modeswap {args.command}: internal error, please report it: {error!r}")
            failure.append(traceback.format_exc() if args.debug else "(rerun with --debug for the traceback)")
            code = 1
    for record in caught:
        if issubclass(record.category, ModeswapWarning) and not args.debug:
            print(f"modeswap {args.command}: warning: {warning_line(record.message)}", file=sys.stderr)
        else:
            warnings.showwarning(record.message, record.category, record.filename, record.lineno)
    for line in failure:
        print(line.rstrip(), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
