"""The top level: swap an exported graph to a mode, or read the mode it is in."""

from __future__ import annotations

from typing import TypeVar, cast

import torch
from torch.fx import GraphModule

from modeswap.errors import NotExportedError
from modeswap.exported import require_exported
from modeswap.modal import ModalModule
from modeswap.modes import Mode, ModeReport, Swap
from modeswap.passes import swap_pipeline
from modeswap.program import swap_program
from modeswap.report import report

Exported = TypeVar("Exported", GraphModule, torch.export.ExportedProgram)


def swap(
    module: Exported,
    mode: Mode | str,
    *,
    share_weights: bool = False,
    attention_dropout: float | None = None,
) -> Swap[Exported]:
    """Return a :class:`Swap`: a copy of ``module`` that behaves as eager does in ``mode``, and its changes.

    ``module`` is not modified. Its parameters and buffers are cloned, unless
    ``share_weights``, when the new module aliases them. ``attention_dropout``
    is the ``dropout_p`` that train mode gives attention nodes whose training
    value the graph does not record.

    >>> swapped = modeswap.swap(gm, "eval")
    >>> evaluated = swapped.module
    """
    target = Mode.parse(mode)
    if isinstance(module, torch.export.ExportedProgram):
        program, changes = swap_program(
            module, target, share_weights=share_weights, attention_dropout=attention_dropout
        )
        return cast(Swap[Exported], Swap(program, target, changes))  # Exported is ExportedProgram here
    if isinstance(module, ModalModule):
        msg = (
            "got a module from modeswap.allow_train_eval; it switches with .train() and .eval(). "
            "Swap the exported module it was made from instead"
        )
        raise NotExportedError(msg)
    rewrite = swap_pipeline(target, attention_dropout=attention_dropout)
    new, changes = rewrite.rewrite(module, share_weights=share_weights)
    return Swap(new, target, changes)


def to_eval(module: Exported, *, share_weights: bool = False) -> Exported:
    """Return a copy of ``module`` that behaves as eager does after ``model.eval()``.

    >>> evaluated = modeswap.to_eval(gm)
    """
    return swap(module, Mode.EVAL, share_weights=share_weights).module


def to_train(module: Exported, *, share_weights: bool = False, attention_dropout: float | None = None) -> Exported:
    """Return a copy of ``module`` that behaves as eager does after ``model.train()``.

    >>> trainable = modeswap.to_train(gm, attention_dropout=0.1)
    """
    return swap(module, Mode.TRAIN, share_weights=share_weights, attention_dropout=attention_dropout).module


def mode_of(module: GraphModule | torch.export.ExportedProgram | ModalModule) -> ModeReport:
    """Return the :class:`ModeReport` of ``module``, read off its graph; ``module`` is not modified.

    For a module from :func:`allow_train_eval`, that is the graph of its current mode.
    """
    if isinstance(module, torch.export.ExportedProgram):
        return report(module.graph_module)
    if isinstance(module, ModalModule):
        return module.variant.report
    return report(require_exported(module))
