"""``allow_train_eval``: an exported module whose ``.train()`` and ``.eval()`` switch its behaviour as eager does.

The returned :class:`ModalModule` owns one copy of the parameters and buffers,
under the exported module's names, and the code of two graphs generated once:
the graph swapped to train and the graph swapped to eval. ``forward`` runs the
code of the mode ``self.training`` names, against the module's own state, so a
switch is ``nn.Module.train``: no trace, no rewrite, no recompile.
"""

from __future__ import annotations

import copy
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, SupportsIndex

import attrs
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.export import ExportedProgram
from torch.fx import Graph, GraphModule

from modeswap.errors import ModeswapWarning, UnsupportedGraphError
from modeswap.exported import require_exported
from modeswap.graphs import attribute, copy_module, recompile_all
from modeswap.modes import Mode, ModeReport
from modeswap.pass_base import Pass, pipeline
from modeswap.passes import swap_passes
from modeswap.program import refuse_lowered, swap_program
from modeswap.report import report
from modeswap.skeleton import Skeleton
from modeswap.stated import Stated
from modeswap.weights import copy_tensor

#: What ``GraphModule`` adds to an ``nn.Module``'s ``__dict__``: its graph, its
#: code and their bookkeeping. A ``ModalModule`` takes every other attribute of
#: the exported module (the input spec, the guards, range constraints, tensor
#: constants, hooks), which the generated code and torch's hooks read.
_GRAPH_MODULE_ONLY = frozenset(vars(GraphModule(torch.nn.Module(), Graph()))) - frozenset(vars(torch.nn.Module()))


@attrs.frozen(eq=False)
class Variant:
    """One mode of a :class:`ModalModule`: the swapped graph, its generated code, and what ``mode_of`` reports.

    ``forward`` takes the module as ``self``, so one variant serves every copy
    of the module. ``skeleton`` rebuilds the mode's ``ExportedProgram`` around
    the module's tensors (``modeswap.save``); it is ``None`` for a module made
    from a ``GraphModule``, which carries no program.
    """

    graph: Graph
    code: str
    forward: Callable[..., Any] = attrs.field(repr=False)
    report: ModeReport = attrs.field(repr=False)
    # How the generated code flattens the inputs and builds the outputs: a mode may return other outputs.
    in_spec: Any = attrs.field(default=None, repr=False)
    out_spec: Any = attrs.field(default=None, repr=False)
    skeleton: Skeleton | None = attrs.field(default=None, repr=False)

    def __deepcopy__(self, memo: dict[int, Any]) -> Variant:
        return self  # immutable and stateless: copies of the module share it


class ModalModule(torch.nn.Module):
    """An exported module that switches between train and eval behaviour with ``.train()`` and ``.eval()``.

    Made by :func:`allow_train_eval`. Its parameters, buffers and submodules
    carry the exported module's names, so ``state_dict()`` keys match.
    """

    def __init__(
        self,
        state: GraphModule,
        variants: Mapping[Mode, Variant],
        subgraphs: Mapping[str, GraphModule],
        *,
        training: bool,
    ) -> None:
        super().__init__()
        for key, value in vars(state).items():
            if key not in _GRAPH_MODULE_ONLY and key not in ("train", "eval", "_in_spec", "_out_spec"):
                vars(self)[key] = value
        # The captured graph's subgraph bodies give way to each mode's own.
        captured = {node.target for node in state.graph.find_nodes(op="get_attr")}
        modules = {k: v for k, v in state._modules.items() if not (k in captured and isinstance(v, GraphModule))}
        vars(self)["_modules"] = modules | dict(subgraphs)
        self._variants = dict(variants)
        self.train(training)

    @property
    def variant(self) -> Variant:
        """The :class:`Variant` that ``forward`` runs now: the one ``self.training`` names."""
        return self._variants[Mode.TRAIN if self.training else Mode.EVAL]

    @property
    def variants(self) -> Mapping[Mode, Variant]:
        """The :class:`Variant` of each mode (read only)."""
        return types.MappingProxyType(self._variants)

    @property
    def _in_spec(self) -> Any:
        return self.variant.in_spec

    @property
    def _out_spec(self) -> Any:
        return self.variant.out_spec

    @property
    def graph(self) -> Graph:
        """The graph of the current mode (read only)."""
        return self.variant.graph

    @property
    def code(self) -> str:
        """The Python code generated from the graph of the current mode."""
        return self.variant.code

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the graph of the current mode on the module's parameters and buffers."""
        return self.variant.forward(self, *args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> ModalModule:
        # What copy.deepcopy does by default; spelled out because __reduce_ex__ refuses.
        new = object.__new__(type(self))
        memo[id(self)] = new
        vars(new).update(copy.deepcopy(vars(self), memo))
        return new

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        msg = (
            "a ModalModule cannot be pickled: its code is generated. Save it with modeswap.save(module, "
            "path) and read it back with modeswap.load(path), or save its state_dict()"
        )
        raise TypeError(msg)


def allow_train_eval(
    module: GraphModule | torch.export.ExportedProgram,
    *,
    attention_dropout: float | None = None,
    dropout: Mapping[str, float] | None = None,
    keep: Sequence[str] = (),
    copy_on_write: bool = False,
) -> ModalModule:
    """Return a new module that behaves as the eager model does after the same ``.train()`` / ``.eval()`` calls.

    ``module`` is not modified: the new module owns a copy of its parameters
    and buffers, shared by both modes; ``copy_on_write`` makes that copy lazily,
    as ``modeswap.swap`` does (see there what it changes). It starts in the mode ``module`` was
    captured in, or in eval when its graph shows no mode (then its behaviour is
    the eval variant's). ``attention_dropout`` and ``dropout`` state the
    training values the graph does not record, for the train variant; ``keep``
    pins sites in both (see ``modeswap.swap``).

    >>> model = modeswap.allow_train_eval(gm)
    >>> evaluated = model.eval()
    """
    if isinstance(module, ExportedProgram):
        refuse_lowered(module)
        gm, modules = module.module(), [entry.fqn for entry in module.module_call_graph]
    else:
        gm, modules = require_exported(module), None
    captured = report(gm)
    pinned = Stated.of(Mode.EVAL, keep=keep)
    modes = {site.mode for site in captured.sites if not (site.kept or pinned.keeps(site.module_path))}
    if len(modes) > 1:
        msg = (
            f"allow_train_eval takes a graph in one mode, and this one mixes train and eval sites "
            f"({_mixed_sites(captured)}); swap it first with modeswap.to_train(gm) or modeswap.to_eval(gm)"
        )
        raise UnsupportedGraphError(msg)
    state = copy_module(gm, copy_on_write=copy_on_write)
    variants: dict[Mode, Variant] = {}
    subgraphs: dict[str, GraphModule] = {}
    for mode in Mode:
        # The training values the graph does not record are the train variant's alone.
        stated = (attention_dropout, dropout) if mode is Mode.TRAIN else (None, None)
        passes = swap_passes(mode, attention_dropout=stated[0], dropout=stated[1], keep=keep)
        skeleton = None
        if isinstance(module, ExportedProgram):
            skeleton = _swapped_skeleton(module, mode, attention_dropout=stated[0], dropout=stated[1], keep=keep)
        variants[mode], bodies = _variant(state, mode, passes, modules, skeleton)
        subgraphs |= bodies
    # A graph that shows no mode computes what its eval variant computes.
    return ModalModule(state, variants, subgraphs, training=modes == {Mode.TRAIN})


def _swapped_skeleton(
    program: ExportedProgram,
    mode: Mode,
    *,
    attention_dropout: float | None,
    dropout: Mapping[str, float] | None,
    keep: Sequence[str],
) -> Skeleton:
    # The program swapped by the passes that swap the variant's graph, for modeswap.save. They warn
    # alike: the variant's swap gives the warnings, once.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ModeswapWarning)
        swapped, _ = swap_program(
            program, mode, share_weights=True, attention_dropout=attention_dropout, dropout=dropout, keep=keep
        )
    return Skeleton.of(swapped)


def _variant(
    state: GraphModule, mode: Mode, passes: tuple[Pass, ...], modules: list[str] | None, skeleton: Skeleton | None
) -> tuple[Variant, dict[str, GraphModule]]:
    # Edit a copy of our own, not Pass.rewrite: the subgraphs are renamed before
    # the code is generated, so it is generated once.
    swapped = copy_module(state, share_weights=True)
    pipeline(*passes).edit(swapped, modules=modules)
    return variant_of(swapped, mode, skeleton)


def variant_of(gm: GraphModule, mode: Mode, skeleton: Skeleton | None = None) -> tuple[Variant, dict[str, GraphModule]]:
    """Make ``gm`` (a copy of modeswap's own, edited no further) the ``mode`` variant of a :class:`ModalModule`.

    Returns the variant and its subgraph bodies, renamed for ``mode``. ``skeleton``
    is that of the mode's ``ExportedProgram``, when there is one.
    """
    found = report(gm)
    bodies = _rename_subgraphs(gm, mode)
    recompile_all(gm)
    variant = Variant(
        gm.graph,
        gm.code,
        type(gm).forward,
        found,
        getattr(gm, "_in_spec", None),
        getattr(gm, "_out_spec", None),
        skeleton,
    )
    # The variant keeps the graph, and a graph its owning module: gm, whose tensors the code never
    # reads (it runs on the ModalModule's). Kept, they would hold an eager model's weights alive, or
    # the old ones after .to(); the graph is only read from here on.
    gm.graph.owning_module = None
    return variant, bodies


def modal_of(programs: Mapping[Mode, ExportedProgram], *, training: bool, share_weights: bool = False) -> ModalModule:
    """Return a :class:`ModalModule` that runs each mode's own program on one copy of the weights.

    ``programs`` are ``torch.export.export`` of one model in each mode; they are
    not modified. The weights are copied from the train program, or, with
    ``share_weights``, are its own; the eval graph reads them under the same
    names. A tensor constant or a guard that only one graph has, or that
    differs between them, is kept for that graph under a name of its own. Each
    variant keeps its program's skeleton (``modeswap.save``), not its tensors.
    """
    modules = {mode: program.module() for mode, program in programs.items()}
    state = modules[Mode.TRAIN] if share_weights else copy_module(modules[Mode.TRAIN])
    variants: dict[Mode, Variant] = {}
    subgraphs: dict[str, GraphModule] = {}
    for mode in Mode:
        gm = copy_module(modules[mode], share_weights=True)
        names = _adopt(state, gm, mode)
        variants[mode], bodies = variant_of(gm, mode, Skeleton.of(programs[mode], names))
        subgraphs |= bodies
    return ModalModule(state, variants, subgraphs, training=training)


def _adopt(state: GraphModule, gm: GraphModule, mode: Mode) -> dict[str, str]:
    # Point gm's graph at state's tensors and modules; add to state what it lacks, under a name of
    # its own. Returns those names: old -> new.
    renamed: dict[str, str] = {}
    weights = {name for name, _ in state.named_parameters(remove_duplicate=False)}
    weights |= {name for name, _ in state.named_buffers(remove_duplicate=False)}
    for node in gm.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        target = str(node.target)
        value, held = attribute(gm, target), attribute(state, target)
        if isinstance(value, GraphModule) and node.op == "get_attr":
            continue  # a subgraph body: each mode gets its own (_rename_subgraphs)
        if target in weights or _same_attribute(value, held):
            continue
        if isinstance(value, torch.Tensor) and target in dict(gm.named_parameters()) | dict(gm.named_buffers()):
            msg = f"the {mode.value} export has a parameter or buffer {target!r} that the train export lacks"
            raise UnsupportedGraphError(msg)
        new = f"{target.replace('.', '_')}_{mode.value}"
        if hasattr(state, new):
            msg = f"cannot name the {mode.value} copy of {target!r}: the module already has {new!r}"
            raise UnsupportedGraphError(msg)
        if isinstance(value, torch.nn.Module):
            state.add_module(new, value)
        else:
            setattr(state, new, copy_tensor(value, {}) if isinstance(value, torch.Tensor) else copy.deepcopy(value))
        node.target = renamed[target] = new
    return renamed


def _same_attribute(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a is b:
            return True
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return False
        if a.is_meta or isinstance(a, FakeTensor) or isinstance(b, FakeTensor):
            return False  # no values to compare: each graph keeps a constant of its own
        return bool(torch.equal(a, b))
    if isinstance(a, GraphModule) and isinstance(b, GraphModule):
        return a.code == b.code
    return a is b and a is not None


def _rename_subgraphs(gm: GraphModule, mode: Mode) -> dict[str, GraphModule]:
    # Both modes' code reads its subgraph bodies off the one module: each mode's
    # bodies get names of their own.
    renamed: dict[str, GraphModule] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        target = str(node.target)
        body = attribute(gm, target)  # None for a tensor _adopt renamed: the state holds it, gm does not
        if not isinstance(body, GraphModule):
            continue
        new = f"{target.replace('.', '_')}_{mode.value}"
        if hasattr(gm, new):
            msg = f"cannot name the {mode.value} copy of subgraph {target!r}: the module already has {new!r}"
            raise UnsupportedGraphError(msg)
        renamed[new] = body
        node.target = new
    return renamed


def _mixed_sites(captured: ModeReport) -> str:
    def names(mode: Mode) -> str:
        found = [site.node for site in captured.sites if site.mode is mode]
        return ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")

    return "; ".join(f"{mode.value}: {names(mode)}" for mode in Mode)
