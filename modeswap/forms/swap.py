"""One swap for every input form: lift the input into the form the passes edit, edit it once, lower it back.

A ``GraphModule`` lifts to a copy of itself; an ``ExportedProgram`` to a copy
of its lifted graph and what its signature says of the placeholders; a
:class:`ModalModule` builds its variants from lifted copies of its own graph
(``forms.modal``). :func:`swapped` runs the passes of a swap on the lifted
form, and the form's ``lower`` gives back the kind the input was: a
recompiled ``GraphModule``, a program assembled around the edited graph, or a
modal variant. The public ``swap``, ``to_eval`` and ``to_train`` are
:func:`swapped` with their options checked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import attrs
import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule

from modeswap.forms.program import Skeleton, lifted_state, refuse_lowered
from modeswap.fx.copying import copy_module, recompile_all
from modeswap.fx.exported import require_exported
from modeswap.fx.weights import tensor_copier
from modeswap.passes import full_swap
from modeswap.records.modes import Change, Mode, ModeReport, Swap
from modeswap.records.options import Options
from modeswap.rewrite import warning_passes
from modeswap.rewrite.base import Context
from modeswap.rewrite.report import report

Exported = TypeVar("Exported", GraphModule, ExportedProgram)
Lowered = TypeVar("Lowered")


@attrs.frozen
class Weights:
    """How a swap's result gets the input's parameters and buffers: cloned (the default), shared, or copy-on-write."""

    share_weights: bool = False
    copy_on_write: bool = False

    def copy(self, gm: GraphModule) -> GraphModule:
        """A copy of ``gm`` (its tree, graph and code) whose tensors are given as this record says."""
        return copy_module(gm, share_weights=self.share_weights, copy_on_write=self.copy_on_write)


@attrs.frozen
class Lifted:
    """A swap's input in the one form the passes edit: a graph module the swap owns, and what its program says."""

    module: GraphModule
    #: ``Pass.edit``'s ``buffers``, ``parameters`` and ``aliases``: empty for a GraphModule.
    state: Mapping[str, Mapping[str, str]] = attrs.field(factory=dict)
    #: The module paths of the program's ``module_call_graph``; ``None`` for a GraphModule.
    modules: tuple[str, ...] | None = None

    def edit(self, mode: Mode, stated: Options) -> tuple[Change, ...]:
        """Run the passes that swap every site to ``mode`` on :attr:`module`, in place; return the changes."""
        return full_swap(mode, stated).edit(self.module, **self.state, modules=self.modules)


@functools.singledispatch
def lift(module: object, weights: Weights) -> Lifted:
    """Return ``module`` lifted into the form the passes edit; its tensors are copied as ``weights`` says."""
    require_exported(module)  # raises, saying what to pass instead
    raise AssertionError("require_exported accepts only GraphModules")  # pragma: no cover


@lift.register
def _(module: GraphModule, weights: Weights) -> Lifted:
    return Lifted(weights.copy(require_exported(module)))


@lift.register
def _(program: ExportedProgram, weights: Weights) -> Lifted:
    refuse_lowered(program)
    modules = tuple(entry.fqn for entry in program.module_call_graph)
    return Lifted(weights.copy(program.graph_module), lifted_state(program), modules)


@functools.singledispatch
def lower(original: Any, lifted: Lifted, mode: Mode, weights: Weights) -> Any:
    """Return the swapped ``lifted`` as the kind ``original`` is: the input of :func:`lift`, not modified."""
    msg = f"cannot lower a swap back to {type(original).__name__}"
    raise TypeError(msg)


@lower.register
def _(original: GraphModule, lifted: Lifted, mode: Mode, weights: Weights) -> GraphModule:
    for module in lifted.module.modules():
        module.training = mode is Mode.TRAIN
    recompile_all(lifted.module)
    return lifted.module


@lower.register
def _(original: ExportedProgram, lifted: Lifted, mode: Mode, weights: Weights) -> ExportedProgram:
    tensor = tensor_copier(share_weights=weights.share_weights, copy_on_write=weights.copy_on_write)

    def tensors(values: dict[str, Any]) -> dict[str, Any]:
        return {k: tensor(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()}

    return Skeleton.of(original).assembled(lifted.module, tensors(original.state_dict), tensors(original.constants))


def swapped(
    module: Any,
    mode: Mode,
    stated: Options,
    weights: Weights = Weights(),
    lowered: Callable[[Lifted], Lowered] | None = None,
) -> tuple[Any, tuple[Change, ...]]:
    """The swap primitive: lift ``module``, put every site in ``mode`` once, lower the result; and its changes.

    ``module`` is not modified. ``lowered`` replaces the lowering to the
    kind of ``module`` (a modal module lowers to a variant of its own).
    """
    lifted = lift(module, weights)
    changes = lifted.edit(mode, stated)
    result = lowered(lifted) if lowered is not None else lower(module, lifted, mode, weights)
    return result, changes


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
    stated = Options.of(target, dropout=dropout, attention_dropout=attention_dropout, keep=keep)
    weights = Weights(share_weights=share_weights, copy_on_write=copy_on_write)
    new, changes = swapped(module, target, stated, weights)
    return cast(Swap[Exported], Swap(new, target, changes))


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
    return swap(
        module,
        Mode.TRAIN,
        share_weights=share_weights,
        copy_on_write=copy_on_write,
        attention_dropout=attention_dropout,
        dropout=dropout,
        keep=keep,
    ).module


@functools.singledispatch
def mode_of(module: Any) -> ModeReport:
    """Return the :class:`ModeReport` of ``module``, read off its graph; ``module`` is not modified.

    ``module`` is a ``GraphModule``, an ``ExportedProgram``, or a module from
    :func:`allow_train_eval`: for that, the report of its current mode's graph.
    """
    return report(require_exported(module))


@mode_of.register
def _(module: ExportedProgram) -> ModeReport:
    return report(module.graph_module)


def warn_unread_state(program: ExportedProgram) -> None:
    """Warn, as a swap of ``program`` to train would, about modules whose state no node reads and that never ran."""
    gm = program.graph_module
    warning_passes.warn_unread_state(gm, Context.of(gm, **lifted_state(program)), Options())
