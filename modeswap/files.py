"""Reading and writing ``.pt2`` files: clear errors for bad input, atomic writes."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.export import ExportedProgram

from modeswap.errors import ProgramFileError


def load_program(path: str | os.PathLike[str]) -> ExportedProgram:
    """Return the ``ExportedProgram`` saved at ``path`` with ``torch.export.save``.

    Loading a file runs torch's deserializer on it: load only files you trust.
    """
    file = Path(path)
    if not file.exists():
        raise ProgramFileError(f"{file}: no such file")
    if file.is_dir():
        raise ProgramFileError(f"{file}: is a directory, not a .pt2 file")
    if file.stat().st_size == 0:
        raise ProgramFileError(f"{file}: the file is empty")
    # torch.export.load logs the error it met as a traceback, then raises a vaguer one; its package
    # reader (a child logger, whose records reach this one's handlers) logs "Unable to load package"
    # for a name not ending in .pt2, then loads the file anyway.
    with _captured("torch.export") as logged:
        try:
            program = torch.export.load(file)
        except Exception as error:
            errors = [r.exc_info[1] for r in logged if r.exc_info and r.exc_info[1] is not None]
            reason = _first_cause(errors[-1] if errors else error)
            msg = f"{file}: {_what_instead(file) or f'not a program saved with torch.export.save ({reason})'}"
            raise ProgramFileError(msg) from error
    return program


def check_output(path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Raise :class:`ProgramFileError` unless a program can be written to ``path``.

    An existing file may be replaced only with ``force``.
    """
    file = Path(path)
    if file.is_dir():
        raise ProgramFileError(f"{file}: is a directory; name the .pt2 file to write")
    if file.suffix != ".pt2":
        # torch.export.load warns about any other name; refuse it here rather than write a file that does.
        msg = f"{file}: a program file's name ends in .pt2, the name torch.export.load expects; write {file.stem}.pt2"
        raise ProgramFileError(msg)
    if not file.parent.is_dir():
        raise ProgramFileError(f"{file}: the directory {file.parent} does not exist")
    if file.exists() and not force:
        raise ProgramFileError(f"{file}: already exists; pass --force to overwrite it")


def save_program(program: ExportedProgram, path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Write ``program`` to ``path`` atomically: the file appears complete, or not at all.

    An existing file is replaced only with ``force``.
    """
    file = Path(path)
    check_output(file, force=force)
    temporary = file.with_name(f".{file.name}.{secrets.token_hex(6)}.tmp")
    try:
        # O_EXCL with mode 0o666: a fresh file of our own, with the umask applied as for any new file.
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise ProgramFileError(f"{file}: cannot write in {file.parent} ({error.strerror})") from error
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.export.save(program, stream)
        os.replace(temporary, file)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _captured(logger: str) -> Iterator[list[logging.LogRecord]]:
    """Collect what ``logger`` and its children log, instead of letting it reach the terminal."""
    collect = _Records()
    log = logging.getLogger(logger)
    handlers, propagate = log.handlers, log.propagate
    log.handlers, log.propagate = [collect], False
    try:
        yield collect.records
    finally:
        log.handlers, log.propagate = handlers, propagate


def _what_instead(file: Path) -> str | None:
    """Say what a zip archive that torch.export.load refused holds instead of a program, when it can tell."""
    try:
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None  # not a readable zip: torch's own error says more
    if any("/data/aotinductor/" in name for name in names):
        return (
            "a package compiled by AOTInductor (torch._inductor.aoti_compile_and_package), not an exported "
            "program: it holds machine code, no graph to swap. Swap the ExportedProgram, then compile the result"
        )
    if any(name.endswith("/data.pkl") for name in names):
        return "a torch.save() file, not a program saved with torch.export.save: it holds no exported program"
    if not any("/models/" in name for name in names):
        return "a zip archive that holds no exported program (torch.export.save writes models/ and data/ in it)"
    return None


def _first_cause(error: BaseException) -> str:
    """The message of the error at the root of ``error``'s chain (torch wraps it in a generic one)."""
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
