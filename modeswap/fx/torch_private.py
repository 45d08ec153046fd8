"""Every private torch name modeswap uses, each with why: the one place a torch upgrade has to look.

torch has no public API for what modeswap reads and writes of exported graphs,
programs, modules and their files: an op's schema, a storage's identity, a
program's guards, the tables an ``nn.Module`` keeps, the serializer of PT2
files. Every other module of modeswap reaches these through the names below,
each a re-export or a small function that says why modeswap needs it.
tests/unit/fx/test_torch_private.py fails on a private torch name used anywhere
else in the package, and checks that each name here still does on this torch
what modeswap takes it to do.

This module imports nothing of modeswap: it is the bottom of the import graph.
torch's program serializer is imported on first use of one of its names
(:data:`SERIALIZER`): it imports ``torch._dynamo``, seconds that a swap never needs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import torch

# The class of an ATen op overload (aten.dropout.default), the target of a call_function node that calls one.
from torch._ops import OpOverload

# Export's meta values: tensors with a shape, dtype and device, and no memory, made in a fake mode. Copied in
# their own mode, stored without bytes, and run on (FakeTensorMode) to count the buffer updates of a backward.
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

# Public: the class of the graph empty_graph_like makes.
from torch.fx import Graph

# The fake mode a graph's meta values live in: to give a node modeswap adds the meta["val"] export would.
from torch._guards import detect_fake_mode  # isort: skip

# The pytree export flattens inputs and outputs with: its TreeSpec is an exported module's in and out spec.
from torch.utils import _pytree as pytree  # isort: skip

# The way to see each ATen op a run dispatches, and its arguments: to count the writes to a model's buffers.
from torch.utils._python_dispatch import TorchDispatchMode  # isort: skip

if TYPE_CHECKING:
    # torch's program (de)serializer and its schema: what torch.export.save and load run (files/pt2.py).
    from torch._export.serde import schema
    from torch._export.serde.schema import SCHEMA_VERSION
    from torch._export.serde.serialize import (
        DEFAULT_PICKLE_PROTOCOL,
        ExportedProgramDeserializer,
        GraphModuleSerializer,
        _dataclass_to_dict as dataclass_to_dict,
        _to_json_bytes as to_json_bytes,
        deserialize_device,
        deserialize_scalar_type,
        deserialize_size,
        deserialize_storage_offset,
        deserialize_stride,
        serialize_range_constraints,
        serialize_tensor_meta,
        serialize_torch_artifact,
    )
    from torch._export.serde.union import _Union as SchemaUnion
    from torch.export import ExportedProgram
    from torch.fx.graph import CodeGen

    # The context manager torch's serializer enters around a program whose inputs include modules.
    from torch._export.non_strict_utils import (  # isort: skip
        _enable_graph_inputs_of_type_nn_module as enable_graph_inputs_of_type_nn_module,
    )

__all__ = [
    "BUFFERS",
    "DEFAULT_PICKLE_PROTOCOL",
    "GRAPH",
    "GUARDS_MODULE",
    "IN_SPEC",
    "MODES_REFUSED",
    "MODULES",
    "OUT_SPEC",
    "PARAMETERS",
    "SCHEMA_VERSION",
    "SERIALIZER",
    "ExportedProgramDeserializer",
    "FakeTensor",
    "FakeTensorMode",
    "GraphModuleSerializer",
    "OpOverload",
    "SchemaUnion",
    "TorchDispatchMode",
    "backward_hooks",
    "buffer_table",
    "codegen",
    "compiled_from_callees",
    "dataclass_to_dict",
    "deserialize_device",
    "deserialize_scalar_type",
    "deserialize_size",
    "deserialize_storage_offset",
    "deserialize_stride",
    "detect_fake_mode",
    "empty_graph_like",
    "enable_graph_inputs_of_type_nn_module",
    "global_hook_tables",
    "guards_code_of",
    "has_pytree_node",
    "hook_tables",
    "in_spec",
    "is_serialized_name",
    "lazy_clone",
    "max_operator_version",
    "module_table",
    "name_pytree_type",
    "op_schema",
    "out_spec",
    "overload_name",
    "parameter_table",
    "pickle_script_object",
    "pytree",
    "run_while_tracing",
    "schema",
    "serialize_range_constraints",
    "serialize_tensor_meta",
    "serialize_torch_artifact",
    "serialized_type_name",
    "set_backward_hooks",
    "set_guards_code",
    "storage_id",
    "to_json_bytes",
    "trace_again",
    "unpickle_script_object",
    "version_counter",
]

# -- ATen ops -------------------------------------------------------------------------------------------------


def op_schema(op: OpOverload) -> torch.FunctionSchema:
    """``op._schema``: its arguments' names, order and defaults, and which it writes or aliases; none public."""
    return op._schema


def overload_name(op: OpOverload) -> str:
    """``op._overloadname``: the overload's name (``default``, ``Tensor``), to name the op as torch prints it."""
    return op._overloadname


# -- tensors and storages ----------------------------------------------------------------------------------


def storage_id(storage: torch.UntypedStorage) -> int:
    """Which storage this is (``_cdata``): equal for two views of one storage, fake and meta ones too.

    ``untyped_storage()`` returns a new Python object each call, so ``id`` does
    not tell; nor does ``data_ptr()``: 0 for every fake, meta and empty storage
    (and deprecated for a fake one).
    """
    return int(storage._cdata)


def version_counter(t: torch.Tensor) -> int:
    """``t._version``: bumped by each in-place write autograd records; torch has no public accessor."""
    return t._version


def lazy_clone(t: torch.Tensor) -> torch.Tensor:
    """``torch._lazy_clone``: the same view of a copy-on-write clone of ``t``'s whole storage; no public API.

    The clone shares memory with ``t`` until either side writes (``copy_on_write=True``, docs/semantics.md).
    """
    return torch._lazy_clone(t)


# -- programs and graph modules ------------------------------------------------------------------------------


def guards_code_of(program: ExportedProgram) -> list[str]:
    """``program._guards_code``: the input guards export derived from the user's code, as lines of Python.

    ``ExportedProgram`` has no public name for them; its constructor rebuilds
    only those the graph shows, and ``ExportedProgram.module()`` installs both.
    """
    return program._guards_code


def set_guards_code(program: ExportedProgram, code: list[str]) -> None:
    """Give ``program`` the guards of the program it was swapped from (see :func:`guards_code_of`)."""
    program._guards_code = code


def empty_graph_like(graph: Graph) -> Graph:
    """A new empty ``Graph`` with ``graph``'s tracer class and extras (private), as ``Graph.__deepcopy__`` makes."""
    return Graph(tracer_cls=graph._tracer_cls, tracer_extras=graph._tracer_extras)


def codegen(graph: Graph) -> CodeGen:
    """``graph._codegen``, which holds an exported graph's pytree specs; ``Graph`` has ``set_codegen``, no getter."""
    return graph._codegen


def in_spec(gm: torch.nn.Module) -> Any:
    """The input spec the code of an exported ``GraphModule`` flattens its inputs with (``_in_spec``), or None."""
    return getattr(gm, IN_SPEC, None)


def out_spec(gm: torch.nn.Module) -> Any:
    """The output spec the code of an exported ``GraphModule`` builds its result with (``_out_spec``), or None."""
    return getattr(gm, OUT_SPEC, None)


#: The names of a ``GraphModule``'s graph and specs in its ``__dict__``. Its generated code reads
#: ``self._in_spec`` and ``self._out_spec``: a module built without ``GraphModule.__init__`` (a copy, a
#: ``ModalModule``'s shell) sets them under these names, and a ``ModalModule`` defines them as properties.
GRAPH, IN_SPEC, OUT_SPEC = "_graph", "_in_spec", "_out_spec"

#: The names of the functions ``ExportedProgram.module()`` binds on its module as ``train`` and ``eval``, to refuse.
MODES_REFUSED = ("_train", "_eval")

#: The name of the submodule ``ExportedProgram.module()`` adds to check the input guards, and calls first.
GUARDS_MODULE = "_guards_fn"


# -- nn.Module's tables ----------------------------------------------------------------------------------------

#: The names of ``nn.Module``'s own tables in its ``__dict__``: set directly by a copy made without ``__init__``.
PARAMETERS, BUFFERS, MODULES = "_parameters", "_buffers", "_modules"


def parameter_table(module: torch.nn.Module) -> dict[str, torch.nn.Parameter | None]:
    """``module._parameters``, the dict itself: read and written in place, one module deep.

    The public ``named_parameters`` recurses and copies; ``register_parameter``
    refuses to replace a name, and a write here runs no ``__setattr__`` hook:
    modeswap lends a module other tensors for one run and puts its own back,
    and ties tensors by name.
    """
    return module._parameters


def buffer_table(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """``module._buffers``, the dict itself, for the same reasons as :func:`parameter_table`."""
    return module._buffers


def module_table(module: torch.nn.Module) -> dict[str, torch.nn.Module | None]:
    """``module._modules``, the dict itself: every child by its name, a child registered twice under each.

    ``named_children`` drops a child met twice and ``add_module`` refuses an
    existing name: modeswap walks every child, and shares one module under two names.
    """
    return module._modules


def backward_hooks(module: torch.nn.Module) -> tuple[dict[int, Callable[..., Any]], dict[int, Callable[..., Any]]]:
    """``module._backward_hooks`` and ``_backward_pre_hooks``: torch removes a hook only through its handle."""
    return module._backward_hooks, module._backward_pre_hooks


def set_backward_hooks(
    module: torch.nn.Module, hooks: dict[int, Callable[..., Any]], pre_hooks: dict[int, Callable[..., Any]]
) -> None:
    """Replace ``module``'s backward hooks and pre-hooks (see :func:`backward_hooks`)."""
    module._backward_hooks, module._backward_pre_hooks = hooks, pre_hooks


def hook_tables(module: torch.nn.Module) -> list[tuple[str, dict[Any, Any]]]:
    """Every hook table of ``module`` (``_forward_hooks``, ``_state_dict_hooks``, ...) by name, sorted.

    Each dict of its ``__dict__`` whose name ends in ``hooks``: torch lists a
    module's hooks nowhere public. To see that a check leaves none behind.
    """
    tables = sorted(vars(module).items())
    return [(name, table) for name, table in tables if name.endswith("hooks") and isinstance(table, dict)]


def global_hook_tables() -> list[tuple[str, dict[Any, Any]]]:
    """The tables of hooks registered for every module (``_global_forward_hooks``, ...), by name.

    torch keeps them in private globals of ``torch.nn.modules.module``, and
    lists them nowhere public. To see that a check leaves none behind.
    """
    module = torch.nn.modules.module
    return [
        (name, getattr(module, name))
        for name in sorted(vars(module))
        if name.startswith("_global_") and isinstance(getattr(module, name), dict)
    ]


# -- torch.compile -----------------------------------------------------------------------------------------------

_Function = TypeVar("_Function", bound=Callable[..., Any])


def compiled_from_callees(function: _Function) -> _Function:
    """Return ``function``, whose own frame torch.compile now runs as Python when it starts there.

    The frames ``function`` calls are compiled as usual, and a compiled caller
    traces ``function`` itself as usual. ``torch._dynamo.eval_frame.skip_code``:
    torch has no public way to leave only the first frame to Python
    (``torch.compiler.disable(recursive=False)`` breaks the graph of every
    compiled caller at the call). ``torch._dynamo`` is imported now: on first use.
    """
    from torch._dynamo.eval_frame import skip_code

    skip_code(function.__code__)
    return function


def run_while_tracing(function: _Function) -> _Function:
    """Return ``function``, which torch.compile now calls as Python while it traces a call of it.

    The trace goes on with the result as a constant; of what the call changed,
    it sees only the objects it reads for the first time after the call
    (``torch._dynamo.assume_constant_result``: torch has no public way to run
    Python at trace time). Called from Python, ``function`` runs as Python.
    ``torch._dynamo`` is imported now.
    """
    from torch._dynamo import assume_constant_result

    return assume_constant_result(function)  # type: ignore[no-untyped-call,no-any-return]


def trace_again(reason: str) -> NoReturn:
    """Have torch.compile trace the frame it is tracing again, from its start; from a :func:`run_while_tracing` call.

    ``torch._dynamo.exc.RestartAnalysis``: torch has no public way to. The new
    trace reads every object afresh, as the call left it.
    """
    from torch._dynamo.exc import RestartAnalysis

    raise RestartAnalysis(restart_reason=reason)


# -- torch's pytree registry -----------------------------------------------------------------------------------
# Writing a program's specs needs each type in them registered with a serialized name, and torch names no
# namedtuple, nor a dataclass registered without one; torch keeps the registry in torch.utils._pytree, with no
# public way to name a type already registered, nor to ask which name a type has (files/output_types.py).


def serialized_type_name(cls: type) -> str | None:
    """The name torch's pytree serializes ``cls`` under, or None: unregistered, or registered with no name."""
    node = pytree.SUPPORTED_SERIALIZED_TYPES.get(cls)
    if node is None or node.serialized_type_name == pytree.NO_SERIALIZED_TYPE_NAME_FOUND:
        return None
    return str(node.serialized_type_name)


def has_pytree_node(cls: type) -> bool:
    """Whether ``cls`` is registered with torch's pytree for serializing, named or not."""
    return cls in pytree.SUPPORTED_SERIALIZED_TYPES


def is_serialized_name(name: str) -> bool:
    """Whether a type is registered with torch's pytree under the serialized name ``name`` in this process."""
    return name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE


def name_pytree_type(cls: type, name: str) -> None:
    """Register ``cls`` with torch's pytree under ``name``: a namedtuple as torch asks, another type renamed."""
    if pytree.is_namedtuple_class(cls) and cls not in pytree.SUPPORTED_SERIALIZED_TYPES:
        pytree._register_namedtuple(cls, serialized_type_name=name)
        return
    # Registered already, with no name: registering again would replace its flatten functions (and warn).
    # torch keeps the name apart from them, in this record.
    node = pytree.SUPPORTED_SERIALIZED_TYPES[cls]
    pytree.SUPPORTED_SERIALIZED_TYPES[cls] = node._replace(serialized_type_name=name)
    pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE[name] = cls


# -- PT2 files ---------------------------------------------------------------------------------------------------
# A PT2 archive has no public API for its parts, only torch.export.save and load of one program whole. modeswap
# writes and reads them itself (files/pt2.py), to store a tensor once for several programs and to load quickly,
# and that takes torch's private serializer.


def pickle_script_object(value: torch.ScriptObject) -> bytes:
    """The bytes torch's writer stores for a TorchScript object: its own pickler's, which C++ reads too."""
    return torch._C._pickle_save(value)


def unpickle_script_object(data: bytes) -> Any:
    """The TorchScript object :func:`pickle_script_object` wrote, as torch's reader reads it."""
    return torch._C._pickle_load_obj(data)


def max_operator_version() -> int:
    """The ATen opset version torch's serializer records in a program."""
    return torch._C._get_max_operator_version()


#: torch's program (de)serializer and its schema: private, and what torch.export.save and load run. Each
#: name this module gives of it, as ``(module, name in it)``, a name of ``None`` for the module itself:
#: imported, in this order, on first use of one of them.
SERIALIZER: dict[str, tuple[str, str | None]] = {
    # The dataclasses of a program's JSON record (models/NAME.json) and of the rows of a weights table.
    "schema": ("torch._export.serde.schema", None),
    "SCHEMA_VERSION": ("torch._export.serde.schema", "SCHEMA_VERSION"),
    # The pickle protocol torch's writer stores tensors and opaque constants with.
    "DEFAULT_PICKLE_PROTOCOL": ("torch._export.serde.serialize", "DEFAULT_PICKLE_PROTOCOL"),
    # A program from its JSON record and its tensors, as torch.export.load builds it.
    "ExportedProgramDeserializer": ("torch._export.serde.serialize", "ExportedProgramDeserializer"),
    # A program's graph as its JSON record, without the checks and copy torch.export.save runs first.
    "GraphModuleSerializer": ("torch._export.serde.serialize", "GraphModuleSerializer"),
    # A schema record as JSON, as torch's writer converts it (a row of a weights table).
    "dataclass_to_dict": ("torch._export.serde.serialize", "_dataclass_to_dict"),
    # A program's JSON record as the bytes torch's writer stores.
    "to_json_bytes": ("torch._export.serde.serialize", "_to_json_bytes"),
    # A tensor's layout from its schema.TensorMeta, and back.
    "deserialize_device": ("torch._export.serde.serialize", "deserialize_device"),
    "deserialize_scalar_type": ("torch._export.serde.serialize", "deserialize_scalar_type"),
    "deserialize_size": ("torch._export.serde.serialize", "deserialize_size"),
    "deserialize_storage_offset": ("torch._export.serde.serialize", "deserialize_storage_offset"),
    "deserialize_stride": ("torch._export.serde.serialize", "deserialize_stride"),
    "serialize_tensor_meta": ("torch._export.serde.serialize", "serialize_tensor_meta"),
    # A program's range constraints, and its example inputs, as torch's writer stores them.
    "serialize_range_constraints": ("torch._export.serde.serialize", "serialize_range_constraints"),
    "serialize_torch_artifact": ("torch._export.serde.serialize", "serialize_torch_artifact"),
    # The base of the schema's union types, which the JSON reader (files/pt2.py from_json) builds apart.
    "SchemaUnion": ("torch._export.serde.union", "_Union"),
    # The context manager torch's serializer enters around a program whose inputs include modules.
    "enable_graph_inputs_of_type_nn_module": (
        "torch._export.non_strict_utils",
        "_enable_graph_inputs_of_type_nn_module",
    ),
}


def __getattr__(name: str) -> Any:
    """A name of :data:`SERIALIZER`, imported now with all of them (PEP 562: only names not defined yet)."""
    if name not in SERIALIZER:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    for key, (module, attribute) in SERIALIZER.items():
        found = importlib.import_module(module)
        globals()[key] = found if attribute is None else getattr(found, attribute)
    return globals()[name]
