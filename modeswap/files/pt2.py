"""torch's PT2 archive, as modeswap reads and writes it, with torch's private serializer (``fx.torch_private``).

A PT2 archive (``torch.export.pt2_archive``) is a zip file of records:
``models/NAME.json`` (a program's graph, in the JSON of
``torch._export.serde.schema``), ``data/weights/`` and ``data/constants/`` (its
tensors, one record per storage, and a table per program naming each tensor's
record, ``data/weights/NAME_weights_config.json``), ``data/sample_inputs/``, and
``extra/``. torch has no public API for its parts, only ``torch.export.save`` and
``load`` of one program whole. modeswap writes and reads them itself, to store a
tensor once for several programs and to load quickly, and that takes torch's
private serializer: this module is the one that uses it, through
``modeswap.fx.torch_private``, which says why each name is needed.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import io
import pickle
import types
import typing
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.export import ExportedProgram
from torch.export.pt2_archive import PT2ArchiveReader, PT2ArchiveWriter
from torch.export.pt2_archive.constants import (
    CONSTANTS_CONFIG_FILENAME_FORMAT,
    CONSTANTS_DIR,
    CUSTOM_OBJ_FILENAME_PREFIX,
    EXTRA_DIR,
    MODELS_FILENAME_FORMAT,
    OPAQUE_OBJ_FILENAME_PREFIX,
    SAMPLE_INPUTS_FILENAME_FORMAT,
    TENSOR_CONSTANT_FILENAME_PREFIX,
    WEIGHT_FILENAME_PREFIX,
    WEIGHTS_CONFIG_FILENAME_FORMAT,
    WEIGHTS_DIR,
)
from torch.fx import GraphModule

# torch's program (de)serializer and its schema, private (modeswap.fx.torch_private says why each name).
from modeswap.fx.torch_private import (
    DEFAULT_PICKLE_PROTOCOL,
    SCHEMA_VERSION,
    ExportedProgramDeserializer,
    FakeTensor,
    GraphModuleSerializer,
    SchemaUnion,
    dataclass_to_dict,
    deserialize_device,
    deserialize_scalar_type,
    deserialize_size,
    deserialize_storage_offset,
    deserialize_stride,
    enable_graph_inputs_of_type_nn_module,
    guards_code_of,
    max_operator_version,
    pickle_script_object,
    schema,
    serialize_range_constraints,
    serialize_tensor_meta,
    serialize_torch_artifact,
    to_json_bytes,
    unpickle_script_object,
)

__all__ = [
    "CONSTANTS_CONFIG_FILENAME_FORMAT",
    "CONSTANTS_DIR",
    "CUSTOM_OBJ_FILENAME_PREFIX",
    "EXTRA_DIR",
    "MODELS_FILENAME_FORMAT",
    "OPAQUE_OBJ_FILENAME_PREFIX",
    "SAMPLE_INPUTS_FILENAME_FORMAT",
    "TENSOR_CONSTANT_FILENAME_PREFIX",
    "WEIGHTS_CONFIG_FILENAME_FORMAT",
    "WEIGHTS_DIR",
    "WEIGHT_FILENAME_PREFIX",
    "Damaged",
    "Reader",
    "Writer",
    "deserialized_program",
    "from_json",
    "is_fake",
    "object_bytes",
    "object_from_bytes",
    "payload_meta",
    "program_parts",
    "schema",
    "serialized_program",
    "tensor_layout",
]


def is_fake(value: object) -> bool:
    """Return whether ``value`` is a fake tensor (``torch._subclasses.FakeTensor``): a shape and dtype, no memory."""
    return isinstance(value, FakeTensor)


def from_json(cls: Any, data: Any) -> Any:
    """Return ``data``, parsed JSON, as the ``schema`` dataclass ``cls``: what torch's ``_dict_to_dataclass`` returns.

    torch's converter asks ``typing.get_type_hints`` for the fields of every
    dataclass it builds, once per instance: 0.3 s of the 0.5 s that
    ``torch.export.load`` takes on ResNet-50. This one follows its steps, with
    the hints of each class, and the branch each annotation takes, found once.
    """
    return _converter(cls)(data)


_CONVERTERS: dict[Any, Callable[[Any], Any]] = {}


def _converter(cls: Any) -> Callable[[Any], Any]:
    try:
        return _CONVERTERS[cls]
    except KeyError:
        pass
    except TypeError:  # an annotation that cannot be hashed: converted as torch does, unremembered
        return _new_converter(cls)
    converter = _CONVERTERS[cls] = _new_converter(cls)
    return converter


def _resolve(cls: Any) -> Any:
    # torch's _resolve_schema_cls: a name or forward reference is a class of the schema.
    if isinstance(cls, str) and (resolved := getattr(schema, cls, None)) is not None:
        return resolved
    if isinstance(cls, typing.ForwardRef):
        return _resolve(cls.__forward_arg__)
    return cls


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns=vars(schema))


def _new_converter(cls: Any) -> Callable[[Any], Any]:
    cls = _resolve(cls)
    if isinstance(cls, str):
        raise AssertionError(f"Unresolved class type: '{cls}'.")
    if typing.get_origin(cls) is typing.Annotated:
        return _converter(cls.__origin__)
    if typing.get_origin(cls) in (typing.Union, types.UnionType) and type(None) in typing.get_args(cls):
        return _optional(typing.get_args(cls))
    if isinstance(cls, type) and issubclass(cls, SchemaUnion):
        return _union(cls, _hints(cls))
    if dataclasses.is_dataclass(cls) and isinstance(cls, type):
        return _record(cls, _hints(cls), tuple(f.name for f in dataclasses.fields(cls)))
    return _container(cls)


def _optional(args: tuple[Any, ...]) -> Callable[[Any], Any]:
    def convert(data: Any) -> Any:
        if data is None:
            return None
        if len(args) != 2:
            raise AssertionError(f"expected 2 type args, got {len(args)}")
        return _converter(args[0])(data)

    return convert


def _union(cls: type, hints: dict[str, Any]) -> Callable[[Any], Any]:
    def convert(data: Any) -> Any:
        if not isinstance(data, dict):
            raise AssertionError(f"expected dict, got {type(data).__name__}")
        if len(data) != 1:
            raise AssertionError(f"expected dict with 1 key, got {len(data)}")
        ((kind, value),) = data.items()
        if not isinstance(kind, str):
            raise AssertionError(f"expected str key, got {type(kind).__name__}")
        return cls.create(**{kind: _converter(hints[kind])(value)})  # type: ignore[attr-defined]

    return convert


def _record(cls: type, hints: dict[str, Any], names: tuple[str, ...]) -> Callable[[Any], Any]:
    def convert(data: Any) -> Any:
        # As torch does, for forward compatibility: keys the dataclass does not define are ignored.
        return cls(**{name: _converter(hints[name])(data[name]) for name in names if name in data})

    return convert


def _container(cls: Any) -> Callable[[Any], Any]:
    def convert(data: Any) -> Any:
        if isinstance(data, list):
            if not data:
                return data
            item = _converter(typing.get_args(cls)[0])
            return [item(d) for d in data]
        if isinstance(data, dict):
            value = _converter(typing.get_args(cls)[1])
            return {k: value(v) for k, v in data.items()}
        if cls is float:
            return float(data)
        return data

    return convert


def serialized_program(
    graph_module: GraphModule,
    signature: Any,
    module_call_graph: list[Any],
    range_constraints: Mapping[Any, Any],
    verifiers: list[Any],
    guards_code: list[str],
    example_inputs: Any,
) -> tuple[bytes, bytes]:
    """Return the ``models/NAME.json`` and ``data/sample_inputs/NAME.pt`` records of a program of these parts.

    The bytes ``torch._export.serde.serialize.serialize`` writes for the
    program, without the checks it runs first: ``ExportedProgram.validate``
    (the program was validated when made) and ``canonicalize`` of a deep copy,
    whose result it drops (60% of its time).
    """
    with enable_graph_inputs_of_type_nn_module(example_inputs):
        serializer = GraphModuleSerializer(signature, module_call_graph)
        program = schema.ExportedProgram(
            graph_module=serializer.serialize(graph_module),
            opset_version={"aten": max_operator_version()},
            range_constraints=serialize_range_constraints(dict(range_constraints)),
            schema_version=schema.SchemaVersion(major=SCHEMA_VERSION[0], minor=SCHEMA_VERSION[1]),
            verifiers=[v.dialect for v in verifiers],
            torch_version=torch.__version__,
            guards_code=guards_code,
        )
    inputs = serialize_torch_artifact(example_inputs, DEFAULT_PICKLE_PROTOCOL)
    return to_json_bytes(program), inputs


def program_parts(program: ExportedProgram) -> dict[str, Any]:
    """Return the parts of ``program`` that :func:`serialized_program` takes, by name."""
    return {
        "graph_module": program.graph_module,
        "signature": program.graph_signature,
        "module_call_graph": list(program.module_call_graph),
        "range_constraints": dict(program.range_constraints),
        "verifiers": list(program.verifiers),
        "guards_code": list(guards_code_of(program)),
        "example_inputs": program.example_inputs,
    }


def deserialized_program(
    program: Any, state_dict: dict[str, torch.Tensor], constants: dict[str, Any], example_inputs: bytes
) -> ExportedProgram:
    """Return the ``ExportedProgram`` of ``program`` (a ``schema.ExportedProgram``) around these tensors.

    What ``torch.export.load`` returns, given the same records.
    """
    deserializer = ExportedProgramDeserializer(None)
    return deserializer.deserialize(program, state_dict, constants, example_inputs)


def payload_meta(path_name: str, value: object, *, pickled: bool) -> dict[str, Any]:
    """Return the row of a weights or constants table (``schema.PayloadMeta`` as JSON) of ``value`` in ``path_name``."""
    meta = serialize_tensor_meta(value) if isinstance(value, torch.Tensor) else None
    row = schema.PayloadMeta(
        path_name=path_name,
        is_param=isinstance(value, torch.nn.Parameter),
        use_pickle=pickled,
        tensor_meta=meta,
    )
    found: dict[str, Any] = dataclass_to_dict(row)  # type: ignore[no-untyped-call]
    return found


def tensor_layout(meta: Any) -> tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int, torch.device, bool]:
    """Return the dtype, size, stride, storage offset, device and ``requires_grad`` a ``schema.TensorMeta`` records."""
    return (
        deserialize_scalar_type(meta.dtype),
        deserialize_size(meta.sizes),
        deserialize_stride(meta.strides),
        deserialize_storage_offset(meta.storage_offset),
        deserialize_device(meta.device),
        bool(meta.requires_grad),
    )


def object_bytes(value: object) -> tuple[str, bytes]:
    """Return the file name prefix and the bytes of a constant that is no plain tensor, as torch's writer stores it.

    A tensor subclass (a quantized weight) and a TorchScript object are
    pickled, each as torch pickles it; any other object with ``pickle``.
    """
    if isinstance(value, torch.Tensor):
        buffer = io.BytesIO()
        torch.save(value, buffer, pickle_protocol=DEFAULT_PICKLE_PROTOCOL)
        return "", buffer.getvalue()
    if isinstance(value, torch.ScriptObject):
        # torch stores a TorchScript object with its own pickler, which C++ reads too.
        return CUSTOM_OBJ_FILENAME_PREFIX, pickle_script_object(value)
    return OPAQUE_OBJ_FILENAME_PREFIX, pickle.dumps(value, protocol=DEFAULT_PICKLE_PROTOCOL)


def object_from_bytes(path_name: str, data: bytes) -> object:
    """Return the object :func:`object_bytes` stored in the record ``path_name``, as torch's reader does."""
    if path_name.startswith(CUSTOM_OBJ_FILENAME_PREFIX):
        return unpickle_script_object(data)
    if path_name.startswith(OPAQUE_OBJ_FILENAME_PREFIX):
        return pickle.loads(data)
    return torch.load(io.BytesIO(data), weights_only=False)


class Damaged(Exception):
    """A record of the archive cannot be read, or its bytes are not those its zip directory's checksum names."""


class Reader:
    """A PT2 archive open for reading, in a ``with`` block, each record checked against its zip directory's CRC-32.

    torch's reader checks no checksum: a flipped bit in a weight loads as a
    different weight. Raises :class:`Damaged` when the zip directory cannot be
    read (a truncated file has none), when a record cannot be, and when a
    record's bytes do not match its checksum: a storage's at the end of the
    block, as the checksums of large storages are computed on a thread of
    their own meanwhile (``zlib`` lets go of the interpreter while it sums).
    """

    #: Storages of at least this many bytes are checked on the thread; smaller ones at once.
    THREADED = 1 << 20

    def __init__(self, path: Path) -> None:
        try:
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
            if infos and min(info.header_offset for info in infos) != 0:
                raise zipfile.BadZipFile("its zip directory lists no record at its start: the end of another zip")
            self._archive = PT2ArchiveReader(str(path))
        except (zipfile.BadZipFile, RuntimeError, AssertionError, EOFError, ValueError) as error:
            raise Damaged(_reason(error)) from error
        # torch writes every record inside one folder, named after the file: names here are less it.
        self._records = {info.filename.partition("/")[2]: info for info in infos}
        self._checks: list[concurrent.futures.Future[None]] = []
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        pool, checks = self._pool, self._checks
        if pool is None:
            return
        pool.shutdown(wait=kind is None, cancel_futures=kind is not None)
        if kind is None:
            for check in checks:
                check.result()  # raises the Damaged of the first storage that failed its check

    def names(self) -> list[str]:
        """Return the names of the records, less the archive's folder."""
        return list(self._records)

    def read(self, name: str) -> bytes:
        """Return the bytes of the record ``name``, checked."""
        try:
            data: bytes = self._archive.read_bytes(name)
        except RuntimeError as error:
            raise Damaged(f"{name}: {_reason(error)}") from error
        self._check(name, data)
        return data

    def read_storage(self, name: str, dtype: torch.dtype) -> torch.UntypedStorage:
        """Return the record ``name`` as a new storage, read once from the file; checked by the end of the block."""
        size = self._records[name].file_size
        if size == 0:
            return torch.UntypedStorage(0)  # type: ignore[no-untyped-call]
        if size % dtype.itemsize:
            raise Damaged(f"{name}: {size} bytes, not a whole number of {dtype} elements")
        try:
            # The reader's only way to read a record into a storage without a copy through Python bytes.
            flat = self._archive.archive_file.get_storage_from_record(name, size // dtype.itemsize, dtype)
        except RuntimeError as error:
            raise Damaged(f"{name}: {_reason(error)}") from error
        storage = flat.untyped_storage()
        data = (ctypes.c_char * storage.nbytes()).from_address(storage.data_ptr())
        if size < self.THREADED:
            self._check(name, data)
        else:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="modeswap-crc32")
            # The storage goes along: its memory lives as long as the check reads it.
            self._checks.append(self._pool.submit(self._check, name, data, storage))
        return storage

    def _check(self, name: str, data: Any, *alive: object) -> None:
        info = self._records.get(name)
        # A CRC-32 of 0 for bytes: a writer told not to compute it (torch.serialization.set_crc32_options).
        if info is not None and (info.CRC or not info.file_size) and zlib.crc32(data) != info.CRC:
            raise Damaged(f"{name}: its bytes do not match the checksum the zip directory records")


class Writer:
    """A PT2 archive written on ``stream``, in a ``with`` block: torch's ``PT2ArchiveWriter``, storages whole."""

    def __init__(self, stream: BinaryIO) -> None:
        self._archive = PT2ArchiveWriter(stream)

    def write(self, name: str, data: bytes) -> None:
        """Write the record ``name``."""
        self._archive.write_bytes(name, data)

    def write_storage(self, name: str, tensor: torch.Tensor) -> None:
        """Write the record ``name``: the bytes of ``tensor``'s whole storage, none for a tensor without memory.

        The storage goes to the file as it is, not through a copy in Python
        bytes (torch's writer copies it).
        """
        if tensor.is_meta or is_fake(tensor) or tensor.untyped_storage().nbytes() == 0:
            self._archive.write_bytes(name, b"")  # no memory: torch's writer stores no bytes either
            return
        storage = tensor.untyped_storage().cpu()  # type: ignore[no-untyped-call]
        size = storage.nbytes() - storage.nbytes() % tensor.element_size()
        self._archive.archive_file.write_record(name, storage, size)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        # torch's writer adds its format and version records, then the zip directory; a failed
        # write is left as it is, for the caller to delete, not finished into a valid archive.
        if kind is None:
            self._archive.__exit__(None, None, None)


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
