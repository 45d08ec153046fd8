"""Reading and writing ``.pt2`` files: clear errors for bad input, atomic writes."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
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
    try:
        with _quiet("torch.export"):
            program = torch.export.load(file)
    except Exception as error:
        reason = _first_cause(error)
        msg = f"{file}: not a program saved with torch.export.save ({reason})"
        raise ProgramFileError(msg) from error
    return program


def save_program(program: ExportedProgram, path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Write ``program`` to ``path`` atomically: the file appears complete, or not at all.

    An existing file is replaced only with ``force``.
    """
    file = Path(path)
    if file.is_dir():
        raise ProgramFileError(f"{file}: is a directory; name the .pt2 file to write")
    if not file.parent.is_dir():
        raise ProgramFileError(f"{file}: the directory {file.parent} does not exist")
    if file.exists() and not force:
        raise ProgramFileError(f"{file}: already exists; pass --force to overwrite it")
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


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence ``logger``: torch.export.load logs a traceback before raising the error reported instead."""
    log = logging.getLogger(logger)
    disabled, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = disabled


def _first_cause(error: BaseException) -> str:
    """The message of the error at the root of ``error``'s chain (torch wraps it in a generic one)."""
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    lines = str(error).strip().splitlines()
    if lines and "check the warnings above" in lines[0]:
        # torch.export.load's own words point at the log it printed (silenced here).
        return "it holds no exported program; a torch.save() file is not a torch.export.save() file"
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
