"""Reading and writing ``.pt2`` files, of one program or a modal archive: clear errors for bad input, atomic writes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch
from torch.export import ExportedProgram
from torch.export.pt2_archive._package import load_pt2, package_pt2

from modeswap import __version__
from modeswap.errors import ProgramFileError
from modeswap.modes import Mode

#: The extra file (``extra/modeswap.json`` in the archive) by which ``modeswap.save`` marks a modal archive.
MODAL_HEADER = "modeswap.json"
#: The version of the modal archive's layout that this modeswap writes and reads.
MODAL_FORMAT = 1


def load_program(path: str | os.PathLike[str]) -> ExportedProgram:
    """Return the ``ExportedProgram`` saved at ``path`` with ``torch.export.save``.

    Loading a file runs torch's deserializer on it: load only files you trust.
    """
    file = Path(path)
    check_input(file)
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


def check_input(path: str | os.PathLike[str]) -> None:
    """Raise :class:`ProgramFileError` unless ``path`` is a file with something in it."""
    file = Path(path)
    if not file.exists():
        raise ProgramFileError(f"{file}: no such file")
    if file.is_dir():
        raise ProgramFileError(f"{file}: is a directory, not a .pt2 file")
    if file.stat().st_size == 0:
        raise ProgramFileError(f"{file}: the file is empty")


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
    write_atomically(path, lambda stream: torch.export.save(program, stream), force=force)


def write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], None], *, force: bool) -> None:
    """Call ``write`` on a new file next to ``path``, then rename it to ``path``: it appears complete, or not at all.

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
            write(stream)
        os.replace(temporary, file)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def load_archive(path: str | os.PathLike[str]) -> tuple[dict[Mode, ExportedProgram], Mode]:
    """Return the programs of the modal archive at ``path``, one per mode, and the mode its module was saved in.

    A modal archive is what ``modeswap.save`` writes: torch's PT2 archive with a
    program per mode, named after it, and the extra file ``modeswap.json``.
    Anything else raises :class:`ProgramFileError`, saying what it is. Loading
    a file runs torch's deserializer on it: load only files you trust.
    """
    file = Path(path)
    check_input(file)
    saved = _modal_header(file)
    # A stream, not the path: torch's reader logs a line for a name not ending in .pt2, then reads it anyway.
    with _captured("torch.export"), open(file, "rb") as stream:
        try:
            contents = load_pt2(stream)
        except Exception as error:
            msg = f"{file}: a modal archive that torch cannot read ({_first_cause(error)})"
            raise ProgramFileError(msg) from error
    return {mode: contents.exported_programs[mode.value] for mode in Mode}, saved


def save_archive(programs: Mapping[Mode, ExportedProgram], mode: Mode, path: str | os.PathLike[str]) -> None:
    """Write ``programs``, one per mode, to ``path`` as the modal archive of a module in ``mode``.

    The write is atomic, as :func:`save_program`'s; an existing file is replaced.
    """
    header = {"format": "modeswap.ModalModule", "version": MODAL_FORMAT, "mode": mode.value, "modeswap": __version__}

    def write(stream: BinaryIO) -> None:
        named = {m.value: programs[m] for m in Mode}
        package_pt2(stream, exported_programs=named, extra_files={MODAL_HEADER: json.dumps(header)})

    write_atomically(path, write, force=True)


def _modal_header(file: Path) -> Mode:
    """Check that ``file`` is a modal archive this modeswap reads, holding both programs; return its saved mode."""
    names = archive_names(file)
    if names is None:
        raise ProgramFileError(f"{file}: not a modal archive written by modeswap.save (not a zip archive)")
    within = {name.partition("/")[2]: name for name in names}  # less the folder torch writes them in
    if f"extra/{MODAL_HEADER}" not in within:
        if "models/model.json" in within:
            msg = (
                f"{file}: a program saved with torch.export.save, not a modal archive from modeswap.save: it "
                "holds one program. Load it with torch.export.load(path); modeswap.allow_train_eval(program) "
                "then switches it with .train() and .eval(), and modeswap convert swaps the file"
            )
        else:
            msg = f"{file}: {_what_instead(file) or 'not a modal archive written by modeswap.save'}"
        raise ProgramFileError(msg)
    with zipfile.ZipFile(file) as archive:
        text = archive.read(within[f"extra/{MODAL_HEADER}"]).decode("utf-8", errors="replace")
    try:
        header = json.loads(text)
        version, mode = header["version"], Mode.parse(header["mode"])
    except (ValueError, KeyError, TypeError) as error:
        msg = f"{file}: a modal archive whose {MODAL_HEADER} cannot be read ({type(error).__name__}: {error})"
        raise ProgramFileError(msg) from error
    if not isinstance(version, int) or version > MODAL_FORMAT:
        msg = (
            f"{file}: a modal archive of format version {version!r}, written by a later modeswap; this one "
            f"({__version__}) reads version {MODAL_FORMAT}: upgrade modeswap"
        )
        raise ProgramFileError(msg)
    missing = [m.value for m in Mode if f"models/{m.value}.json" not in within]
    if missing:
        held = " and ".join(m.value for m in Mode if m.value not in missing) or "no"
        msg = (
            f"{file}: a modal archive without its {' and '.join(missing)} program (models/{missing[0]}.json), "
            f"holding the {held} program only; modeswap.save writes both: save the module again"
        )
        raise ProgramFileError(msg)
    return mode


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


def archive_names(path: str | os.PathLike[str]) -> list[str] | None:
    """Return the names in the zip archive at ``path``, ``None`` if it is not one (torch's are ``FOLDER/NAME``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def is_modal_archive(path: str | os.PathLike[str]) -> bool:
    """Return whether ``path`` is a zip archive that ``modeswap.save`` marked as its own (no program is loaded)."""
    return _marked(archive_names(path) or [])


def _marked(names: list[str]) -> bool:
    return any(name.endswith(f"/extra/{MODAL_HEADER}") for name in names)


def _what_instead(file: Path) -> str | None:
    """Say what a zip archive that torch.export.load refused holds instead of a program, when it can tell."""
    names = archive_names(file)
    if names is None:
        return None  # not a readable zip: torch's own error says more
    if _marked(names):
        return (
            "a modal archive from modeswap.save, with a train and an eval program: modeswap.load(path) reads it, "
            "modeswap inspect shows both programs, and modeswap convert FILE --to MODE writes one of them"
        )
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
