"""Telling exported graphs from everything else, with errors that say what to do."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.fx import GraphModule

from modeswap.records.errors import NotExportedError
from modeswap.records.modes import Swap

_EXPORT_IT = "export it first with torch.export.export(model, args).module()"


def is_exported(module: object) -> bool:
    """Return whether ``module`` is a graph captured by ``torch.export``.

    That is an ``ExportedProgram``, or a ``GraphModule`` whose nodes carry the
    ``"val"`` metadata export records (``ExportedProgram.module()`` gives one).
    """
    if isinstance(module, torch.export.ExportedProgram):
        return True
    return isinstance(module, GraphModule) and any("val" in node.meta for node in module.graph.nodes)


def require_exported(module: Any) -> GraphModule:
    """Return ``module`` if it is an exported ``GraphModule``; raise :class:`NotExportedError` otherwise."""
    if isinstance(module, GraphModule) and is_exported(module):
        return module
    raise NotExportedError(_not_exported_message(module))


def _not_exported_message(module: object) -> str:
    if isinstance(module, GraphModule):
        return (
            "got a GraphModule without export metadata (no node has meta['val']), "
            f"as torch.fx.symbolic_trace makes; modeswap rewrites ATen graphs: {_EXPORT_IT}"
        )
    if isinstance(module, torch.nn.Module):
        cls = type(module)
        name = f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else f"{cls.__module__}.{cls.__qualname__}"
        return f"got {name}, an eager module; {_EXPORT_IT}"
    if isinstance(module, Swap):
        return "got a modeswap.Swap record; the swapped module is its .module (swapped.module)"
    if isinstance(module, str | os.PathLike):
        return f"got the path {os.fspath(module)!r}; load it first with torch.export.load(path)"
    return f"got {type(module).__name__} {module!r:.80}; modeswap takes an exported GraphModule: {_EXPORT_IT}"
