"""Reading and writing ``.pt2`` files, of one program or a modal archive: clear errors for bad input, atomic writes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import torch
from torch.export import ExportedProgram

from modeswap.files import pt2
from modeswap.files.output_types import program_type_names, require
from modeswap.files.packing import Packed, Unpacked, pack, unpack
from modeswap.forms.program import read_from
from modeswap.fx.graphs import attribute
from modeswap.records.errors import ProgramFileError
from modeswap.records.modes import Mode
from modeswap.records.version import VERSION

#: The extra file (``extra/modeswap.json`` in the archive) by which ``modeswap.save`` marks a modal archive.
MODAL_HEADER = "modeswap.json"
#: The version of the modal archive's layout that this modeswap writes; it reads this one and every earlier one.
#: 1: each program with its own copy of the tensors, and the mode. 2: each storage stored once for both
#: programs, which tensors are one object, every module's training flag, the output types' modules.
MODAL_FORMAT = 2


def load_program(path: str | os.PathLike[str]) -> ExportedProgram:
    """Return the ``ExportedProgram`` saved at ``path`` with ``torch.export.save``.

    Every record is checked against its checksum first, and the modules that
    define the program's output types are imported (:func:`require`). Loading
    a file runs torch's deserializer on it: load only files you trust.
    """
    file = Path(path)
    check_input(file)
    names = _zip_names(file)
    if names is not None:
        _verify(file)
        _require_types(file, names)
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


def _require_types(file: Path, names: list[str]) -> None:
    """Import the modules that define the types of the programs in ``file`` (see :func:`require`)."""
    with zipfile.ZipFile(file) as archive:
        for name in names:
            if name.partition("/")[2].startswith("models/") and name.endswith(".json"):
                try:
                    types = program_type_names(json.loads(archive.read(name)))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # not a program of torch's schema: torch's reader says what it is
                require(types, f"{file}")


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


@attrs.frozen
class Header:
    """What ``extra/modeswap.json`` records of the module a modal archive holds.

    ``training`` maps every module's path (``""`` the root) to its
    ``training`` flag; ``overrides`` maps each mode to the paths of the
    modules that the eager model's ``.train()`` or ``.eval()`` leaves in the
    other mode, ``shared`` groups the paths that name one module, and
    ``called`` maps each mode to the modules its export called, when known,
    and ``trains`` each submodule whose own ``train()`` leaves modules in the
    other mode to those, per mode (the module's :class:`modeswap.forms.modal.Layout`);
    ``tensors`` numbers each tensor
    name of each program, one number per object
    (:func:`modeswap.files.packing.identities`); ``types`` maps the serialized name
    of each type the programs' inputs and outputs nest in to its module.
    Format 1 recorded the mode alone.
    """

    version: int
    mode: Mode
    training: Mapping[str, bool] | None = None
    overrides: Mapping[str, Sequence[str]] = attrs.field(factory=dict)
    shared: Sequence[Sequence[str]] = ()
    called: Mapping[str, Sequence[str]] | None = None
    trains: Mapping[str, Mapping[str, Sequence[str]]] = attrs.field(factory=dict)
    tensors: Mapping[str, Mapping[str, int]] | None = None
    types: Mapping[str, str] = attrs.field(factory=dict)

    def to_json(self) -> str:
        """Return the header as ``extra/modeswap.json`` holds it."""
        found = {"format": "modeswap.ModalModule", "version": self.version, "modeswap": VERSION}
        found |= {"mode": self.mode.value, "training": self.training, "overrides": self.overrides}
        found |= {"shared": self.shared, "called": self.called, "trains": self.trains}
        found |= {"tensors": self.tensors, "types": self.types}
        return json.dumps(found)


@attrs.frozen(eq=False)
class Archive:
    """A modal archive read back: a program per mode and its :class:`Header`.

    A mode read ``lazily`` (:func:`load_archive`) is in ``deferred``, not in
    ``programs``: a function that deserializes its program around the tensors
    of the module it is given.
    """

    programs: Mapping[Mode, ExportedProgram]
    header: Header
    deferred: Mapping[Mode, Callable[[torch.nn.Module], ExportedProgram]] = attrs.field(factory=dict, repr=False)


def load_archive(path: str | os.PathLike[str], *, lazily: bool = False) -> Archive:
    """Return the programs of the modal archive at ``path``, one per mode, with its header.

    With ``lazily``, the program of the mode the module was not saved in is a
    function that deserializes it later, around the tensors of the module it
    is given, by name: its records are read and checked now, and only torch's
    deserializer waits.

    A modal archive is what ``modeswap.save`` writes: torch's PT2 archive with a
    program per mode, named after it, and the extra file ``modeswap.json``.
    Each record is read once and checked against its checksum; a tensor that
    both programs hold is one tensor in both. Anything else raises
    :class:`ProgramFileError`, saying what it is. Loading a file runs torch's
    deserializer on it and imports the modules that define its output types:
    load only files you trust.
    """
    file = Path(path)
    check_input(file)
    header = _modal_header(file)
    # The programs are deserialized while the checksums of their tensors are computed: the block ends with them.
    with _reading(file) as reader:
        unpacked = unpack(reader, [mode.value for mode in Mode], header.tensors)
        for part in unpacked.values():
            require(part.type_names, f"{file}", header.types)
        records = {mode: (unpacked[mode.value].json, unpacked[mode.value].example_inputs) for mode in Mode}
        programs: dict[Mode, ExportedProgram] = {}
        deferred: dict[Mode, Callable[[torch.nn.Module], ExportedProgram]] = {}
        for mode in Mode:
            part = unpacked[mode.value]
            if lazily and mode is not header.mode:
                deferred[mode] = _deferred(file, part, records[mode])
            else:
                program = _deserialized(file, part.program, part.state, part.constants, part.example_inputs)
                programs[mode] = read_from(program, records[mode])
    return Archive(programs, header, deferred)


def _deserialized(
    file: Path, program: Any, state: dict[str, torch.Tensor], constants: dict[str, Any], inputs: bytes
) -> ExportedProgram:
    try:
        return pt2.deserialized_program(program, state, constants, inputs)
    except Exception as error:
        msg = f"{file}: a modal archive that torch cannot read ({_first_cause(error)})"
        raise ProgramFileError(msg) from error


def _deferred(file: Path, part: Unpacked, records: tuple[bytes, bytes]) -> Callable[[torch.nn.Module], ExportedProgram]:
    # The names of the program's weights, not the tensors read: the module holds them, as they are then
    # (after .to(), load_state_dict), and the ones read are not kept alive twice.
    program, names, constants, inputs = part.program, tuple(part.state), part.constants, part.example_inputs

    def deserialize(module: torch.nn.Module) -> ExportedProgram:
        state = {name: attribute(module, name) for name in names}
        return read_from(_deserialized(file, program, state, constants, inputs), records)

    return deserialize


def save_archive(path: str | os.PathLike[str], programs: Mapping[Mode, Packed], header: Header) -> None:
    """Write ``programs``, one per mode, to ``path`` as a modal archive with ``header``, each storage once.

    The write is atomic, as :func:`save_program`'s; an existing file is replaced.
    """
    named = {mode.value: programs[mode] for mode in Mode}
    write_atomically(path, lambda stream: pack(stream, named, {MODAL_HEADER: header.to_json()}), force=True)


def _modal_header(file: Path) -> Header:
    """Check that ``file`` is a modal archive this modeswap reads, holding both programs; return its header."""
    names = _zip_names(file)
    if names is None:
        raise ProgramFileError(f"{file}: not a modal archive written by modeswap.save (not a zip archive)")
    within = {name.partition("/")[2]: name for name in names}  # less the folder torch writes them in
    if f"extra/{MODAL_HEADER}" not in within:
        _verify(file)  # a damaged file is named as damaged first, as load_program names it
        if "models/model.json" in within:
            msg = (
                f"{file}: a program saved with torch.export.save, not a modal archive from modeswap.save: it "
                "holds one program. Load it with torch.export.load(path); modeswap.allow_train_eval(program) "
                "then switches it with .train() and .eval(), and modeswap convert swaps the file"
            )
        else:
            msg = f"{file}: {_what_instead(file) or 'not a modal archive written by modeswap.save'}"
        raise ProgramFileError(msg)
    try:
        with zipfile.ZipFile(file) as archive:
            text = archive.read(within[f"extra/{MODAL_HEADER}"]).decode("utf-8", errors="replace")
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as error:
        raise ProgramFileError(_damaged(file, f"extra/{MODAL_HEADER}: {_first_cause(error)}")) from error
    header = _header(file, text)
    missing = [m.value for m in Mode if f"models/{m.value}.json" not in within]
    if missing:
        held = " and ".join(m.value for m in Mode if m.value not in missing) or "no"
        msg = (
            f"{file}: a modal archive without its {' and '.join(missing)} program (models/{missing[0]}.json), "
            f"holding the {held} program only; modeswap.save writes both: save the module again"
        )
        raise ProgramFileError(msg)
    return header


def _header(file: Path, text: str) -> Header:
    """Parse ``extra/modeswap.json``; raise :class:`ProgramFileError` for one this modeswap cannot read."""
    try:
        found = json.loads(text)
        version, mode = found["version"], Mode.parse(found["mode"])
    except (ValueError, KeyError, TypeError) as error:
        msg = f"{file}: a modal archive whose {MODAL_HEADER} cannot be read ({type(error).__name__}: {error})"
        raise ProgramFileError(msg) from error
    if not isinstance(version, int) or version > MODAL_FORMAT:
        msg = (
            f"{file}: a modal archive of format version {version!r}, written by a later modeswap; this one "
            f"({VERSION}) reads versions 1 to {MODAL_FORMAT}: upgrade modeswap"
        )
        raise ProgramFileError(msg)
    if version == 1:
        return Header(version, mode)
    training, tensors, types = found.get("training"), found.get("tensors"), found.get("types", {})
    overrides, shared, called = found.get("overrides", {}), found.get("shared", []), found.get("called")
    trains = found.get("trains", {})
    well_formed = (
        isinstance(trains, dict)
        and all(isinstance(left, dict) and all(_strings(paths) for paths in left.values()) for left in trains.values())
        and (called is None or (isinstance(called, dict) and all(_strings(paths) for paths in called.values())))
        and _mapping_of(training, bool)
        and isinstance(overrides, dict)
        and set(overrides) <= {m.value for m in Mode}
        and all(_strings(paths) for paths in overrides.values())
        and isinstance(shared, list)
        and all(_strings(paths) for paths in shared)
        and isinstance(tensors, dict)
        and all(_mapping_of(numbers, int) for numbers in tensors.values())
        and _mapping_of(types, str)
    )
    if not well_formed:
        msg = f"{file}: a modal archive whose {MODAL_HEADER} does not hold what format {version} records"
        raise ProgramFileError(msg)
    return Header(version, mode, training, overrides, shared, called, trains, tensors, types)


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _mapping_of(value: object, kind: type) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, kind) for k, v in value.items())


@contextlib.contextmanager
def _reading(file: Path) -> Iterator[pt2.Reader]:
    """Open ``file`` with :class:`pt2.Reader`; a record that cannot be read names the file as damaged."""
    try:
        with pt2.Reader(file) as reader:
            yield reader
    except pt2.Damaged as error:
        raise ProgramFileError(_damaged(file, str(error))) from error


def _damaged(file: Path, reason: str) -> str:
    return (
        f"{file}: a truncated or damaged .pt2 file ({reason}); it cannot be read. Save it again, or copy it "
        "again from where it came"
    )


def _zip_names(file: Path) -> list[str] | None:
    """The names in the zip archive ``file``; ``None`` if it is none; :class:`ProgramFileError` if it is damaged."""
    names = archive_names(file)
    if names is None and _starts_as_zip(file):
        # A zip file begins with a record's header and ends with the directory of all of them:
        # begun but without its directory, the file was cut short, or its end was damaged.
        reason = "it begins as a zip archive, as a .pt2 file does, but its zip directory is missing or unreadable"
        raise ProgramFileError(_damaged(file, reason))
    return names


def _starts_as_zip(file: Path) -> bool:
    with open(file, "rb") as stream:
        return stream.read(4) == b"PK\x03\x04"


def _verify(file: Path) -> None:
    """Raise :class:`ProgramFileError` unless every record of the zip archive ``file`` matches its checksum."""
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, ValueError) as error:
        raise ProgramFileError(_damaged(file, _first_cause(error))) from error
    if bad is not None:
        reason = f"{bad.partition('/')[2]}: its bytes do not match the checksum the zip directory records"
        raise ProgramFileError(_damaged(file, reason))


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
    """Return the names in the zip archive at ``path``, ``None`` if it is not one (torch's are ``FOLDER/NAME``).

    A file whose zip directory lists no record at its start is none either:
    it is the end of a zip stored inside a longer file that was cut short (a
    PT2 archive stores its sample inputs as a ``torch.save`` zip, uncompressed).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError):
        return None
    if infos and min(info.header_offset for info in infos) != 0:
        return None
    return [info.filename for info in infos]


def is_modal_archive(path: str | os.PathLike[str]) -> bool:
    """Return whether ``path`` is a zip archive that ``modeswap.save`` marked as its own (no program is loaded)."""
    return _marked(archive_names(path) or [])


def _marked(names: list[str]) -> bool:
    return any(name.endswith(f"/extra/{MODAL_HEADER}") for name in names)


def _what_instead(file: Path) -> str | None:
    """Say what a zip archive that torch.export.load refused holds instead of a program, when it can tell."""
    names = archive_names(file)
    if names is None:
        return None  # not a readable zip: the caller says what it is
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
