"""The ``ExportedProgram`` form: what a swap reads of a program, and a program without its tensors (:class:`Skeleton`).

A swap lifts a program into the form the passes edit (its lifted graph, and
:func:`lifted_state`) and lowers the result back through
:meth:`Skeleton.assembled`, the one place a program is constructed. A
:class:`ModalModule` runs ``ExportedProgram.module()`` graphs, which cannot be
saved as programs; it keeps, per mode, the program's skeleton: the parts that
hold no tensor (the lifted graph, its signature, its module call graph, ...).
At save time :meth:`Skeleton.program` puts the module's parameters, buffers and
constants, as they are then, back in by name, and :meth:`Skeleton.records`
gives the program's records in a PT2 archive, which hold no tensor either: the
tensors are stored apart, so the records are serialized once per skeleton.
"""

from __future__ import annotations

import dataclasses
import operator
import weakref
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch.export import ExportedProgram
from torch.export.exported_program import ModuleCallEntry
from torch.export.graph_signature import ExportGraphSignature
from torch.fx import GraphModule

from modeswap.files import pt2
from modeswap.files.output_types import name_for_saving
from modeswap.fx.copying import copy_module
from modeswap.fx.torch_private import guards_code_of, set_guards_code
from modeswap.records.errors import lowered


def lifted_state(ep: ExportedProgram) -> dict[str, dict[str, str]]:
    """What a pass knows of ``ep``'s lifted state: ``Pass.edit``'s ``buffers``, ``parameters`` and ``aliases``."""
    signature = ep.graph_signature
    first: dict[int, str] = {}
    aliases = {name: first.setdefault(id(t), name) for name, t in ep.state_dict.items()}
    return {"buffers": signature.inputs_to_buffers, "parameters": signature.inputs_to_parameters, "aliases": aliases}


def refuse_lowered(ep: ExportedProgram) -> None:
    """Refuse a program that ``run_decompositions()`` lowered from the training IR (its dialect says so)."""
    if ep.dialect != "TRAINING":
        raise lowered(f"the program is in the {ep.dialect} dialect")


#: The records of each skeleton's program, once serialized or read: the graph and the rest never change.
_RECORDS: weakref.WeakKeyDictionary[Skeleton, tuple[bytes, bytes]] = weakref.WeakKeyDictionary()
#: The records a program was read from (:func:`read_from`), for the skeleton made of it.
_READ: weakref.WeakKeyDictionary[ExportedProgram, tuple[bytes, bytes]] = weakref.WeakKeyDictionary()


def read_from(program: ExportedProgram, records: tuple[bytes, bytes]) -> ExportedProgram:
    """Note that ``program`` was read from ``records``; return it. Its skeleton will not serialize it again."""
    _READ[program] = records
    return program


@attrs.frozen(eq=False)
class Skeleton:
    """What rebuilds one mode's ``ExportedProgram`` around a module's tensors: all of it but the tensors.

    ``names`` maps a name of the program's state dict or constants to the
    module attribute that holds it, where the two differ.
    """

    graph_module: torch.fx.GraphModule = attrs.field(repr=False)
    signature: ExportGraphSignature = attrs.field(repr=False)
    range_constraints: Mapping[Any, Any] = attrs.field(repr=False)
    module_call_graph: tuple[ModuleCallEntry, ...] = attrs.field(repr=False)
    # The user's inputs to the export, not the model's state: the program carries them (its sample inputs).
    example_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = attrs.field(repr=False)
    verifiers: tuple[type[Any], ...] = attrs.field(repr=False)
    guards_code: tuple[str, ...] = attrs.field(repr=False)
    state_names: tuple[str, ...]
    constant_names: tuple[str, ...]
    names: Mapping[str, str] = attrs.field(factory=dict)

    @classmethod
    def of(cls, program: ExportedProgram, names: Mapping[str, str] | None = None) -> Skeleton:
        """Return the skeleton of ``program``; it holds none of the program's state dict or constants.

        The lifted graph holds no tensor: parameters, buffers and constants are its inputs.
        """
        skeleton = cls(
            graph_module=program.graph_module,
            signature=program.graph_signature,
            range_constraints=dict(program.range_constraints),
            module_call_graph=tuple(program.module_call_graph),
            example_inputs=program.example_inputs,
            verifiers=tuple(program.verifiers),
            guards_code=tuple(guards_code_of(program)),
            state_names=tuple(program.state_dict),
            constant_names=tuple(program.constants),
            names=dict(names or {}),
        )
        if program in _READ:
            skeleton.remember(_READ[program])
        return skeleton

    def program(self, module: torch.nn.Module) -> ExportedProgram:
        """Return a new ``ExportedProgram`` whose state dict and constants are ``module``'s tensors now.

        The tensors are ``module``'s own, not copies; the graph, signature and
        module call graph are copies, so the skeleton stays as it is.
        """
        state, constants = self.tensors(module)
        return self.assembled(copy_module(self.graph_module), state, constants)

    def assembled(self, gm: GraphModule, state: dict[str, Any], constants: dict[str, Any]) -> ExportedProgram:
        """Return the ``ExportedProgram`` of this skeleton around ``gm`` (its lifted graph) and the given tensors.

        The one place modeswap constructs a program. The constructor generates
        the code once, runs torch's verifier, and edits the signature and module
        call graph it is given: it is handed copies.
        """
        signature = self.signature
        program = ExportedProgram(
            root=gm,
            graph=gm.graph,
            graph_signature=ExportGraphSignature(list(signature.input_specs), list(signature.output_specs)),
            state_dict=state,
            range_constraints=dict(self.range_constraints),
            module_call_graph=[_copy_entry(entry) for entry in self.module_call_graph],
            example_inputs=self.example_inputs,
            constants=constants,
            verifiers=list(self.verifiers),
        )
        # The guards export derived from the user's code; the constructor can only
        # rebuild those the graph shows (ExportedProgram.module() installs both).
        set_guards_code(program, list(self.guards_code))
        return program

    def tensors(self, module: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return the program's state dict and constants, by the program's names: ``module``'s own tensors now."""
        state = {name: self._held(module, name) for name in self.state_names}
        return state, {name: self._held(module, name) for name in self.constant_names}

    def records(self) -> tuple[bytes, bytes]:
        """Return the program's ``models/NAME.json`` and ``data/sample_inputs/NAME.pt`` records in a PT2 archive.

        The first call serializes the program (giving its output types names,
        :func:`modeswap.files.output_types.name_for_saving`); later calls, and those
        after :meth:`remember`, return the same bytes.
        """
        if self not in _RECORDS:
            self.output_types()
            _RECORDS[self] = pt2.serialized_program(
                self.graph_module,
                self.signature,
                list(self.module_call_graph),
                self.range_constraints,
                list(self.verifiers),
                list(self.guards_code),
                self.example_inputs,
            )
        return _RECORDS[self]

    def remember(self, records: tuple[bytes, bytes]) -> None:
        """Make ``records``, read from the file of this skeleton's program, what :meth:`records` returns."""
        _RECORDS[self] = records

    def output_types(self) -> dict[str, str]:
        """Return ``{serialized name: module}`` of the types the program's inputs and outputs nest in (named now)."""
        specs = [spec for entry in self.module_call_graph if entry.signature for spec in _specs(entry.signature)]
        return name_for_saving(specs)

    def _held(self, module: torch.nn.Module, name: str) -> Any:
        return operator.attrgetter(self.names.get(name, name))(module)


def _specs(signature: Any) -> tuple[Any, ...]:
    return (signature.in_spec, signature.out_spec)


def _copy_entry(entry: ModuleCallEntry) -> ModuleCallEntry:
    sig = entry.signature
    if sig is None:
        return ModuleCallEntry(entry.fqn, None)
    copied = dataclasses.replace(sig, inputs=list(sig.inputs), outputs=list(sig.outputs))
    return ModuleCallEntry(entry.fqn, copied)
