"""The Python types a program's outputs and inputs are built of, by the names its file gives them.

``torch.export`` records how a program's inputs and outputs nest (a pytree
spec) and names each container type in it: a namedtuple (torchvision's GoogLeNet
returns one in train mode), a dataclass, a transformers ``ModelOutput``. Writing
the spec needs each type registered with torch's pytree under a name, and
torch names no namedtuple, nor a dataclass registered without one. Reading it
needs the type behind each name, which a fresh process has once the module that
defines the type, and registers it, is imported: :func:`require` imports it, as
unpickling imports the classes a pickle names (the same trust), and registers a
namedtuple that importing left unregistered.

torch keeps the registry in ``torch.utils._pytree``, with no public way to name
a type already registered, nor to ask which name a type has: this module is the
one that reads and writes it, through ``modeswap.fx.torch_private``.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from modeswap.fx.torch_private import (
    has_pytree_node,
    is_serialized_name,
    name_pytree_type,
    pytree,
    serialized_type_name,
)
from modeswap.records.errors import ProgramFileError

#: torch's name for every namedtuple in a spec; the namedtuple's own name is the node's context.
NAMEDTUPLE = "collections.namedtuple"


def stable_name(cls: type) -> str:
    """Return the name modeswap gives a type that has none: its module and qualified name."""
    return f"{cls.__module__}.{cls.__qualname__}"


def name_for_saving(specs: Iterable[pytree.TreeSpec]) -> dict[str, str]:
    """Give each container type in ``specs`` a serialized name if it has none; return ``{name: module}`` of each.

    A namedtuple is registered under :func:`stable_name`, as torch asks
    (``_register_namedtuple``); a type registered with no name (a dataclass
    given to ``torch.export.register_dataclass`` alone) gets that name too.
    Types that torch itself names (tuple, list, dict, ...) are left out of the
    result: a reader has them.
    """
    found: dict[str, str] = {}
    for cls in _types(specs):
        name = serialized_type_name(cls)
        if name is None:
            name = stable_name(cls)
            name_pytree_type(cls, name)
        if cls.__module__ not in ("builtins", "collections") and not cls.__module__.startswith("torch."):
            found[name] = cls.__module__
    return found


def _types(specs: Iterable[pytree.TreeSpec]) -> Iterator[type]:
    for spec in specs:
        if spec.is_leaf():
            continue
        if spec.type is collections.namedtuple or pytree.is_namedtuple_class(spec.type):
            yield spec.context
        else:
            yield spec.type
        yield from _types(spec.children())


def spec_type_names(spec: str) -> list[str]:
    """Return the serialized names of the container types in a serialized spec (``treespec_dumps``), in order."""
    _, tree = json.loads(spec)
    found: list[str] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        if node.get("type") is not None:
            found.append(node["context"] if node["type"] == NAMEDTUPLE else node["type"])
        pending.extend(reversed(node.get("children_spec") or []))
    return found


def program_type_names(program: Mapping[str, Any]) -> list[str]:
    """Return the serialized names of the types in the specs of ``program``, the JSON of a ``models/NAME.json``."""
    graph_module = program["graph_module"]
    names = list(graph_module.get("treespec_namedtuple_fields") or {})
    for entry in graph_module.get("module_call_graph") or []:
        signature = entry.get("signature")
        if signature is not None:
            names += spec_type_names(signature["in_spec"]) + spec_type_names(signature["out_spec"])
    return list(dict.fromkeys(names))


def require(names: Iterable[str], where: str, modules: Mapping[str, str] | None = None) -> None:
    """Make each serialized type name in ``names`` readable in this process, importing the module that defines it.

    ``modules`` maps a name to its module, as the writer recorded it; without
    it, the longest prefix of the name that imports is the module. A
    namedtuple that importing left unregistered is registered under the name;
    a type registered with no name is given it. Otherwise raises
    :class:`ProgramFileError`, ``where`` first, naming the type and the module
    to import.
    """
    for name in names:
        if is_serialized_name(name):
            continue
        cls, failure = _find(name, (modules or {}).get(name))
        if is_serialized_name(name):
            continue  # importing the module registered it (a transformers ModelOutput)
        if cls is not None and serialized_type_name(cls) is None and _registrable(cls):
            name_pytree_type(cls, name)
            continue
        module = (modules or {}).get(name) or name.rpartition(".")[0]
        if cls is None:
            why = f"importing it failed ({failure})" if failure else f"{module} has no {name.rpartition('.')[2]}"
        elif serialized_type_name(cls) is not None:
            why = f"this process registers the class under another name, {serialized_type_name(cls)!r}"
        elif dataclasses.is_dataclass(cls):
            why = "importing its module did not register it with torch (torch.export.register_dataclass)"
        else:
            why = "importing its module did not register it with torch's pytree"
        msg = (
            f"{where}: its program returns or takes a {name}, a type torch reads back only once the module "
            f"that defines and registers it is imported, and {why}. Import the module that registers it first "
            f"(--import MODULE of modeswap inspect and convert; in Python, an import before modeswap.load)"
        )
        raise ProgramFileError(msg)


def _registrable(cls: type) -> bool:
    """Whether ``name_pytree_type`` can name ``cls``: a namedtuple, or a type registered with torch's pytree."""
    return pytree.is_namedtuple_class(cls) or has_pytree_node(cls)


def _find(name: str, module: str | None) -> tuple[type | None, str | None]:
    """The class at ``name`` (in ``module`` when given), importing what it takes; else None and why."""
    parts = name.split(".")
    splits = [len(module.split("."))] if module and name.startswith(f"{module}.") else []
    splits += range(len(parts) - 1, 0, -1)
    failure = None
    for split in splits:
        tried = ".".join(parts[:split])
        try:
            found: Any = importlib.import_module(tried)
        except ImportError as error:
            # No module of that name: the class may sit in a shorter one. Anything else is why it fails.
            if not (isinstance(error, ModuleNotFoundError) and error.name == tried and split > 1):
                failure = failure or f"{type(error).__name__}: {error}"
            continue
        except Exception as error:  # the module's own code failed: say so, as unpickling would raise it
            return None, f"{type(error).__name__}: {error}"
        for attribute in parts[split:]:
            found = getattr(found, attribute, None)
        if isinstance(found, type):
            return found, None
    return None, failure
