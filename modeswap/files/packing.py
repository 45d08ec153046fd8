"""Several programs in one PT2 archive with each tensor stored once: the records ``modeswap.save`` writes.

torch's writer stores each program's tensors apart, so a tensor that two
programs hold is stored twice, and its reader reads it twice. Here each storage
is one record (``data/weights/weight_N``), written once, and each program's
table (``data/weights/NAME_weights_config.json``) names the record of each of
its tensors, with the tensor's dtype, size, stride and offset in it: tables of
several programs may name one record, which torch's own reader follows too.
:func:`unpack` reads each record once and gives every program a view of the one
storage, and, where :func:`identities` recorded it, the very same object.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

import attrs
import torch

from modeswap.files import pt2
from modeswap.files.output_types import program_type_names
from modeswap.fx.sharing import tie

#: Per program, a number for each of its tensor names: names of one number are one object.
Identities = Mapping[str, Mapping[str, int]]


@attrs.frozen(eq=False)
class Packed:
    """One program to store: its two records from :func:`pt2.serialized_program`, and its tensors by name."""

    program: bytes = attrs.field(repr=False)
    example_inputs: bytes = attrs.field(repr=False)
    state: Mapping[str, torch.Tensor] = attrs.field(repr=False)
    constants: Mapping[str, object] = attrs.field(repr=False)


@attrs.frozen(eq=False)
class Unpacked:
    """One program read back: its record and the ``schema.ExportedProgram`` of it, its tensors, its sample inputs.

    ``type_names`` are the serialized names of the types its inputs and
    outputs nest in, which must be registered before it is deserialized.
    """

    json: bytes = attrs.field(repr=False)
    program: Any = attrs.field(repr=False)
    state: dict[str, torch.Tensor] = attrs.field(repr=False)
    constants: dict[str, object] = attrs.field(repr=False)
    example_inputs: bytes = attrs.field(repr=False)
    type_names: tuple[str, ...] = ()


def identities(programs: Mapping[str, Packed]) -> dict[str, dict[str, int]]:
    """Return, per program, a number for each tensor name: one number for each distinct object, over all programs."""
    numbers: dict[int, int] = {}
    return {
        model: {
            name: numbers.setdefault(id(value), len(numbers))
            for name, value in [*packed.state.items(), *packed.constants.items()]
        }
        for model, packed in programs.items()
    }


def pack(stream: BinaryIO, programs: Mapping[str, Packed], extra_files: Mapping[str, str]) -> None:
    """Write ``programs`` (by name) and ``extra_files`` to ``stream`` as one PT2 archive, each storage once."""
    with pt2.Writer(stream) as writer:
        records = _Records(writer)
        for model, packed in programs.items():
            weights = {name: records.row(pt2.WEIGHTS_DIR, value) for name, value in packed.state.items()}
            constants = {name: records.row(pt2.CONSTANTS_DIR, value) for name, value in packed.constants.items()}
            writer.write(pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model), json.dumps({"config": weights}).encode())
            writer.write(pt2.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model), json.dumps({"config": constants}).encode())
            writer.write(pt2.MODELS_FILENAME_FORMAT.format(model), packed.program)
            writer.write(pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(model), packed.example_inputs)
        for name, text in extra_files.items():
            writer.write(f"{pt2.EXTRA_DIR}{name}", text.encode())


class _Records:
    """The records written so far: one per storage (and dtype) of a plain tensor, one per other object."""

    def __init__(self, writer: pt2.Writer) -> None:
        self.writer = writer
        self.paths: dict[tuple[str, object], str] = {}
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        self.counts: dict[str, int] = {}

    def row(self, directory: str, value: object) -> dict[str, Any]:
        """Return the table row of ``value``, writing its record first if no earlier row named it."""
        if (directory, id(value)) in self.rows:
            return self.rows[directory, id(value)]
        pickled = not _plain(value)
        key = (directory, _storage_key(value) if not pickled else id(value))
        if key not in self.paths:
            prefix, data = ("", b"") if not pickled else pt2.object_bytes(value)
            path = self.paths[key] = self._name(directory, prefix)
            if pickled:
                self.writer.write(f"{directory}{path}", data)
            else:
                assert isinstance(value, torch.Tensor)
                self.writer.write_storage(f"{directory}{path}", value)
        row = self.rows[directory, id(value)] = pt2.payload_meta(self.paths[key], value, pickled=pickled)
        return row

    def _name(self, directory: str, prefix: str) -> str:
        # torch's names: weight_N in the weights, tensor_N, custom_obj_N, opaque_obj_N in the constants.
        default = pt2.WEIGHT_FILENAME_PREFIX if directory == pt2.WEIGHTS_DIR else pt2.TENSOR_CONSTANT_FILENAME_PREFIX
        prefix = prefix or default
        count = self.counts[prefix] = self.counts.get(prefix, -1) + 1
        return f"{prefix}{count}"


def _plain(value: object) -> bool:
    """A plain tensor or Parameter, or a fake one: stored as raw bytes. A tensor subclass or object is pickled."""
    return isinstance(value, torch.Tensor) and (type(value.data) is torch.Tensor or pt2.is_fake(value))


def _storage_key(value: object) -> object:
    assert isinstance(value, torch.Tensor)
    if value.is_meta or pt2.is_fake(value) or value.untyped_storage().nbytes() == 0:
        return id(value)  # no memory: nothing to share, a record of its own
    storage = value.untyped_storage()
    return (value.device, storage.data_ptr(), storage.nbytes(), value.dtype)


def unpack(reader: pt2.Reader, models: Sequence[str], numbers: Identities | None) -> dict[str, Unpacked]:
    """Return each program of ``models`` in the archive ``reader`` reads, each record read once.

    Names that ``numbers`` (from :func:`identities`) gives one number are one
    object, in every program. Without ``numbers`` (an archive of torch's
    writer, or of modeswap's format 1), names that are one view of one record
    are one object (:func:`modeswap.fx.sharing.tie`), as tied weights were when
    saved. Raises :class:`pt2.Damaged` for a record that cannot be read.
    """
    tables = _Tables(reader, numbers)
    found: dict[str, Unpacked] = {}
    for model in models:
        record = pt2.MODELS_FILENAME_FORMAT.format(model)
        text = reader.read(record)
        parsed = _json(record, text)
        try:
            names = tuple(program_type_names(parsed))
            program = pt2.from_json(pt2.schema.ExportedProgram, parsed)
        except (AssertionError, AttributeError, KeyError, TypeError, ValueError) as error:
            raise pt2.Damaged(f"{record}: not a program torch wrote ({type(error).__name__}: {error})") from error
        state = tables.read(model, pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model), pt2.WEIGHTS_DIR)
        constants = tables.read(model, pt2.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model), pt2.CONSTANTS_DIR)
        inputs = reader.read(pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(model))
        found[model] = Unpacked(text, program, state, constants, inputs, names)  # type: ignore[arg-type]
    return found


class _Tables:
    """Reads programs' tables: each record once, each numbered object once."""

    def __init__(self, reader: pt2.Reader, numbers: Identities | None) -> None:
        self.reader = reader
        self.numbers = numbers
        self.storages: dict[tuple[str, torch.dtype, torch.device], torch.UntypedStorage] = {}
        self.objects: dict[int, object] = {}

    def read(self, model: str, table: str, directory: str) -> dict[str, object]:
        try:
            config = pt2.from_json(pt2.schema.PayloadConfig, _json(table, self.reader.read(table)))
        except (AssertionError, AttributeError, KeyError, TypeError) as error:
            raise pt2.Damaged(f"{table}: not a table torch wrote ({type(error).__name__}: {error})") from error
        numbers = self.numbers.get(model, {}) if self.numbers is not None else None
        named: dict[str, object] = {}
        for name, row in config.config.items():
            number = numbers.get(name) if numbers is not None else None
            if number is None or number not in self.objects:
                value = self._value(directory, row)
                if number is not None:
                    self.objects[number] = value
            named[name] = value if number is None else self.objects[number]
        return named if numbers is not None else tie(named)

    def _value(self, directory: str, row: Any) -> object:
        record = f"{directory}{row.path_name}"
        if row.use_pickle:
            return pt2.object_from_bytes(row.path_name, self.reader.read(record))
        dtype, size, stride, offset, device, requires_grad = pt2.tensor_layout(row.tensor_meta)
        storage = self._storage(record, dtype, device)
        if storage is None:  # no bytes: a fake or meta tensor, or an empty one (as torch's reader does)
            tensor = torch.zeros(size, dtype=dtype, device=device)
        else:
            try:
                tensor = torch.empty(0, dtype=dtype, device=device).set_(storage, offset, size, stride)
            except RuntimeError as error:
                msg = f"{record}: too small for a tensor of size {list(size)} at offset {offset} ({error})"
                raise pt2.Damaged(msg) from error
        if row.is_param:
            return torch.nn.Parameter(tensor, requires_grad=requires_grad)
        return tensor.requires_grad_(requires_grad)

    def _storage(self, record: str, dtype: torch.dtype, device: torch.device) -> torch.UntypedStorage | None:
        key = (record, dtype, device)
        if key not in self.storages:
            storage = self.reader.read_storage(record, dtype)
            if storage.nbytes() == 0:
                return None
            # Moved once per device: every tensor of the record shares the one copy, as on the CPU.
            self.storages[key] = storage if device.type == "cpu" else storage.to(device=device)
        return self.storages[key]


def _json(name: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as error:  # UnicodeDecodeError is one too
        raise pt2.Damaged(f"{name}: not JSON ({type(error).__name__}: {error})") from error
