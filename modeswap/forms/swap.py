"""The top level: swap an exported graph to a mode, or read the mode it is in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypedDict, TypeVar, cast

import torch
from torch.fx import GraphModule

from modeswap.forms.modal import ModalModule
from modeswap.forms.program import swap_program
from modeswap.fx.exported import require_exported
from modeswap.passes import swap_pipeline
from modeswap.records.errors import NotExportedError
from modeswap.records.modes import Mode, ModeReport, Swap
from modeswap.rewrite.report import report

Exported = TypeVar("Exported", GraphModule, torch.export.ExportedProgram)


def swap(
    module: Exported,
    mode: Mode | str,
    *,
    share_weights: bool = False,
    copy_on_write: bool = False,
    attention_dropout: float | None = None,
    dropout: Mapping[str, float] | None = None,
    keep: Sequence[str] = (),
) -> Swap[Exported]:
    """Return a :class:`Swap`: a copy of ``module`` that behaves as eager does in ``mode``, and its changes.

    ``module`` is not modified. Its parameters and buffers are cloned, unless
    ``share_weights``, when the new module aliases them.

    ``copy_on_write`` clones them lazily (``torch._lazy_clone``, a private torch
    API): the swap copies no weight data, and the first write to a tensor on
    either side copies that tensor. The input's tensors become copy-on-write too,
    so the input keeps its values but not its addresses: its first in-place write,
    ``data_ptr()``, ``.numpy()`` or DLPack export after the swap copies it to new
    memory. Writes through DLPack aliases or raw pointers of the input taken
    *before* the swap bypass copy-on-write and reach the result. Tensors it
    cannot clone lazily and safely are cloned: subclasses, quantized, sparse,
    meta, loaded with ``torch.load``, viewed by NumPy (see ``modeswap.fx.weights``).
    It cannot be combined with ``share_weights``.

    What the graph does not record, the caller states (see ``modeswap.records.options``
    for how module-path patterns match):

    - ``dropout`` maps module-path patterns to the training ``p`` of dropout and
      attention sites whose graph holds 0.0 (an eval export writes 0.0 where
      eager code zeroes ``p`` outside training). It sets the sites that record
      no training value. A value the graph records (any ``p`` but 0.0, an
      ``nn.Dropout``'s, a train graph's, a memo's) is never overridden: a
      stated value that differs raises, unless the pattern sets another site
      of the same module, which no pattern can tell apart from it; then the
      recorded one stays.
    - ``attention_dropout`` is the training ``dropout_p`` of attention nodes
      (``scaled_dot_product_attention``) that no ``dropout`` pattern matches;
      one that differs from what such a node records raises, and so does one
      that no node is left for.
    - ``keep`` lists module-path patterns whose sites this swap, and every later
      one, leaves as they are (Monte Carlo dropout, frozen batch norms). The pin
      is recorded in the new graph; swap the original graph to undo it.

    >>> swapped = modeswap.swap(gm, "eval")
    >>> evaluated = swapped.module
    """
    target = Mode.parse(mode)
    options = Options(attention_dropout=attention_dropout, dropout=dropout, keep=keep)
    if isinstance(module, torch.export.ExportedProgram):
        program, changes = swap_program(
            module, target, share_weights=share_weights, copy_on_write=copy_on_write, **options
        )
        return cast(Swap[Exported], Swap(program, target, changes))  # Exported is ExportedProgram here
    if isinstance(module, ModalModule):
        msg = (
            "got a module from modeswap.allow_train_eval; it switches with .train() and .eval(). "
            "Swap the exported module it was made from instead"
        )
        raise NotExportedError(msg)
    rewrite = swap_pipeline(target, **options)
    new, changes = rewrite.rewrite(module, share_weights=share_weights, copy_on_write=copy_on_write)
    return Swap(new, target, changes)


class Options(TypedDict):
    """The options of a swap that state what the graph does not record."""

    attention_dropout: float | None
    dropout: Mapping[str, float] | None
    keep: Sequence[str]


def to_eval(
    module: Exported, *, share_weights: bool = False, copy_on_write: bool = False, keep: Sequence[str] = ()
) -> Exported:
    """Return a copy of ``module`` that behaves as eager does after ``model.eval()``; see :func:`swap`.

    >>> evaluated = modeswap.to_eval(gm)
    """
    return swap(module, Mode.EVAL, share_weights=share_weights, copy_on_write=copy_on_write, keep=keep).module


def to_train(
    module: Exported,
    *,
    share_weights: bool = False,
    copy_on_write: bool = False,
    attention_dropout: float | None = None,
    dropout: Mapping[str, float] | None = None,
    keep: Sequence[str] = (),
) -> Exported:
    """Return a copy of ``module`` that behaves as eager does after ``model.train()``; see :func:`swap`.

    >>> trainable = modeswap.to_train(gm, dropout={"encoder.layers.*.attention": 0.1})
    """
    options = Options(attention_dropout=attention_dropout, dropout=dropout, keep=keep)
    return swap(module, Mode.TRAIN, share_weights=share_weights, copy_on_write=copy_on_write, **options).module


def mode_of(module: GraphModule | torch.export.ExportedProgram | ModalModule) -> ModeReport:
    """Return the :class:`ModeReport` of ``module``, read off its graph; ``module`` is not modified.

    For a module from :func:`allow_train_eval`, that is the graph of its current mode.
    """
    if isinstance(module, torch.export.ExportedProgram):
        return report(module.graph_module)
    if isinstance(module, ModalModule):
        return module.variant.report
    return report(require_exported(module))
