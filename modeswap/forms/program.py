"""Swapping an ``ExportedProgram``: the lifted graph, its signature and its state, in and out."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.exported_program import ModuleCallEntry
from torch.export.graph_signature import ExportGraphSignature

from modeswap.fx.graphs import copy_module
from modeswap.fx.weights import tensor_copier
from modeswap.passes import swap_passes
from modeswap.records.errors import UnsupportedGraphError
from modeswap.records.modes import Change, Mode
from modeswap.records.options import Stated
from modeswap.rewrite import warning_passes
from modeswap.rewrite.base import Context, pipeline


def swap_program(
    ep: ExportedProgram,
    mode: Mode,
    *,
    share_weights: bool,
    copy_on_write: bool = False,
    attention_dropout: float | None,
    dropout: Mapping[str, float] | None,
    keep: Sequence[str],
) -> tuple[ExportedProgram, tuple[Change, ...]]:
    """Return a new ``ExportedProgram`` whose graph behaves as eager does in ``mode``, and its changes.

    ``ep`` is not modified: the new program has its own graph, signature, module
    call graph and (unless ``share_weights``) state dict and constants, copied
    lazily with ``copy_on_write``. The options are ``modeswap.swap``'s.
    """
    refuse_lowered(ep)
    signature = ep.graph_signature
    rewrite = pipeline(*swap_passes(mode, attention_dropout=attention_dropout, dropout=dropout, keep=keep))
    gm = copy_module(ep.graph_module, share_weights=share_weights, copy_on_write=copy_on_write)
    modules = [entry.fqn for entry in ep.module_call_graph]
    changes = rewrite.edit(gm, **lifted_state(ep), modules=modules)
    tensor = tensor_copier(share_weights=share_weights, copy_on_write=copy_on_write)

    def tensors(values: dict[str, Any]) -> dict[str, Any]:
        return {k: tensor(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()}

    # The constructor generates the code once, runs torch's verifier, and edits
    # the signature and module call graph it is given: hand it copies.
    swapped = ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=ExportGraphSignature(list(signature.input_specs), list(signature.output_specs)),
        state_dict=tensors(ep.state_dict),
        range_constraints=dict(ep.range_constraints),
        module_call_graph=[_copy_entry(entry) for entry in ep.module_call_graph],
        example_inputs=ep.example_inputs,
        constants=tensors(ep.constants),
        verifiers=list(ep.verifiers),
    )
    # The guards export derived from the user's code; the constructor can only
    # rebuild those the graph shows (ExportedProgram.module() installs both).
    swapped._guards_code = list(ep._guards_code)
    return swapped, changes


def lifted_state(ep: ExportedProgram) -> dict[str, dict[str, str]]:
    """What a pass knows of ``ep``'s lifted state: ``Pass.edit``'s ``buffers``, ``parameters`` and ``aliases``."""
    signature = ep.graph_signature
    first: dict[int, str] = {}
    aliases = {name: first.setdefault(id(t), name) for name, t in ep.state_dict.items()}
    return {"buffers": signature.inputs_to_buffers, "parameters": signature.inputs_to_parameters, "aliases": aliases}


def warn_unread_state(ep: ExportedProgram) -> None:
    """Warn, as a swap of ``ep`` to train would, about modules whose state no node reads and that never ran."""
    gm = ep.graph_module
    warning_passes.warn_unread_state(gm, Context.of(gm, **lifted_state(ep)), Stated())


def refuse_lowered(ep: ExportedProgram) -> None:
    """Refuse a program that ``run_decompositions()`` lowered from the training IR (its dialect says so)."""
    if ep.dialect != "TRAINING":
        msg = (
            f"the program is in the {ep.dialect} dialect, not the TRAINING IR torch.export.export returns: "
            "ExportedProgram.run_decompositions() lowers to it. Lowering erases an eval dropout and fuses batch "
            "norm, so no swap can tell what the model did. "
            "Swap the program torch.export.export returns, then call run_decompositions() on the result."
        )
        raise UnsupportedGraphError(msg)


def _copy_entry(entry: ModuleCallEntry) -> ModuleCallEntry:
    sig = entry.signature
    if sig is None:
        return ModuleCallEntry(entry.fqn, None)
    copied = dataclasses.replace(sig, inputs=list(sig.inputs), outputs=list(sig.outputs))
    return ModuleCallEntry(entry.fqn, copied)
