"""``allow_train_eval``: an exported module whose ``.train()`` and ``.eval()`` switch its behaviour as eager does.

The returned :class:`ModalModule` owns one copy of the parameters and buffers,
under the exported module's names, and the code of the graphs it runs: the
graph of each mode, generated once, and one graph per combination of
submodule modes met (``modal.train(); modal.bn.eval()``), generated on first
use. ``forward`` runs the code that the ``.training`` flags of its modules
name, against the module's own state, so a switch is ``nn.Module.train``: no
trace, no rewrite, no recompile.

Each site follows the flag of the module that owns it (the innermost module
that ran it), as in eager. Every module of the model is reachable with
``get_submodule`` (from a ``GraphModule``, every module that ran a node): a
stateless one, such as a ``Dropout``, as an empty placeholder whose
``.training`` is its flag.
"""

from __future__ import annotations

import copy
import functools
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, SupportsIndex

import attrs
import torch
from torch.export import ExportedProgram
from torch.fx import Graph, GraphModule

from modeswap.eager.compare import Found, compare
from modeswap.forms.program import Skeleton, refuse_lowered
from modeswap.forms.swap import Lifted, Weights, lift, mode_of, swapped
from modeswap.fx.copying import copy_module, recompile_all
from modeswap.fx.exported import require_exported
from modeswap.fx.graphs import attribute, enclosing, graph_modules, innermost_module, module_path, module_paths
from modeswap.fx.sharing import alias_groups, tie
from modeswap.fx.torch_private import (
    GRAPH,
    GUARDS_MODULE,
    IN_SPEC,
    MODULES,
    OUT_SPEC,
    FakeTensor,
    buffer_table,
    compiled_from_callees,
    in_spec,
    module_table,
    out_spec,
    parameter_table,
    run_while_tracing,
    trace_again,
)
from modeswap.fx.weights import copy_tensor
from modeswap.records.errors import (
    ModeswapError,
    ModeswapWarning,
    NondeterministicEvalWarning,
    NotExportedError,
    TrainingBranchWarning,
    UnsupportedGraphError,
)
from modeswap.records.modes import Memo, Mode, ModeReport, set_memo
from modeswap.records.options import Options
from modeswap.rewrite.report import report, site_paths, tells_mode

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

#: What ``GraphModule`` adds to an ``nn.Module``'s ``__dict__``: its graph, its
#: code and their bookkeeping. A ``ModalModule`` takes every other attribute of
#: the exported module (the input spec, the guards, range constraints, tensor
#: constants, hooks), which the generated code and torch's hooks read.
_GRAPH_MODULE_ONLY = frozenset(vars(GraphModule(torch.nn.Module(), Graph()))) - frozenset(vars(torch.nn.Module()))


@attrs.frozen(eq=False)
class Variant:
    """One graph a :class:`ModalModule` runs: the swapped graph, its generated code, and what ``mode_of`` reports.

    ``forward`` takes the module as ``self``, so one variant serves every copy
    of the module. ``skeleton`` rebuilds the mode's ``ExportedProgram`` around
    the module's tensors (``modeswap.save``); it is ``None`` for a module made
    from a ``GraphModule``, which carries no program, and for the graph of a
    combination of submodule modes.
    """

    graph: Graph
    code: str
    forward: Callable[..., Any] = attrs.field(repr=False)
    report: ModeReport = attrs.field(repr=False)
    # How the generated code flattens the inputs and builds the outputs: a mode may return other outputs.
    in_spec: Any = attrs.field(default=None, repr=False)
    out_spec: Any = attrs.field(default=None, repr=False)
    skeleton: Skeleton | None = attrs.field(default=None, repr=False)
    #: The module paths of the nodes that a rule or an idiom swaps, whatever mode they show.
    owners: frozenset[str] = attrs.field(factory=frozenset, repr=False)
    #: The paths of the ``SyncBatchNorm`` modules whose batch norm this graph computes from the batch.
    unsynced: tuple[str, ...] = attrs.field(default=(), repr=False)

    def __deepcopy__(self, memo: dict[int, Any]) -> Variant:
        return self  # immutable and stateless: copies of the module share it


def _refuse_unsynced(paths: Sequence[str]) -> None:
    """Refuse to run batch norms exported from ``SyncBatchNorm`` in train mode on more than one rank.

    Outside a process group, where it is exported, ``SyncBatchNorm`` computes
    what ``BatchNorm`` does: the graph holds no all-reduce of the statistics,
    so on each rank it would normalize by that rank's batch alone.
    """
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1):
        return
    msg = (
        f"the batch norm of {', '.join(map(repr, paths))} was exported from a torch.nn.SyncBatchNorm, whose "
        "all-reduce of the batch statistics torch.export does not capture: on each of the "
        f"{distributed.get_world_size()} ranks this graph would normalize by that rank's batch alone. Export the model "
        "with nn.BatchNorm (what DDP computes without SyncBatchNorm), or freeze those batch norms with "
        "modal.get_submodule(path).eval(), which SyncBatchNorm computes without synchronising"
    )
    raise UnsupportedGraphError(msg)


# Python, never compiled: torch.compile(modal) runs forward as Python and compiles only the graph's code.
@torch.compiler.disable  # type: ignore[untyped-decorator]
def _unsharded_nested(modal: ModalModule) -> list[FSDPModule]:
    """Gather the parameters of every submodule of ``modal`` that FSDP2 shards on its own, as its forward would.

    ``fully_shard(modal.layers[0])`` hooks the submodule's forward, which the
    graph never calls: the graph reads the submodule's parameters, and would
    find them sharded. So they are gathered here, all of them, before the
    graph runs (:func:`_resharded` puts them back after a forward without
    grad; with grad, the root's post-backward callback reduce-scatters their
    gradients and reshards them, as it does for any group whose forward ran
    without inputs that need a gradient). The peak memory is that of sharding
    ``modal`` whole. Returns the submodules gathered.
    """
    from torch.distributed.fsdp import FSDPModule  # imported: a module may be sharded

    nested: list[FSDPModule] = [m for m in modal.modules() if m is not modal and isinstance(m, FSDPModule)]
    if nested and not isinstance(modal, FSDPModule):
        msg = (
            "fully_shard was applied to submodules of this ModalModule but not to the module itself: its graph "
            "reads their parameters directly, and FSDP2 reduce-scatters their gradients from the root's "
            "post-backward. Shard the modal module too, last: fully_shard(modal)"
        )
        raise UnsupportedGraphError(msg)
    for module in nested:
        module.unshard()
    return nested


@torch.compiler.disable  # type: ignore[untyped-decorator]
def _resharded(nested: Sequence[FSDPModule]) -> None:
    for module in nested:
        module.reshard()


def _no_overrides() -> Mapping[Mode, frozenset[str]]:
    return dict.fromkeys(Mode, frozenset())


@attrs.frozen
class Layout:
    """What the eager model's module tree says that its graphs do not.

    ``overrides`` maps each mode to the modules that ``model.train()`` (for
    train) or ``model.eval()`` leaves in the other mode: a ``train()`` override
    that keeps batch norms frozen, as mmdetection's ``norm_eval`` does.
    ``shared`` lists the groups of paths that name one module (a module
    registered twice), so that one ``.eval()`` reaches it under every name.
    ``called`` maps each mode to the paths of the modules whose forward its
    export called, when known: a module that only one export called was
    called by a branch of the module around it, which its own mode cannot change.
    ``trains`` maps the path of each submodule whose own ``train()`` override
    leaves some of its modules in the other mode to those modules' paths
    within it, per mode, so that ``modal.get_submodule(path).train()`` does as eager's.
    """

    overrides: Mapping[Mode, frozenset[str]] = attrs.field(factory=_no_overrides)
    shared: tuple[tuple[str, ...], ...] = ()
    called: Mapping[Mode, frozenset[str]] | None = None
    trains: Mapping[str, Mapping[Mode, frozenset[str]]] = attrs.field(factory=dict)

    @classmethod
    def of(
        cls,
        model: torch.nn.Module,
        flags: Mapping[Mode, Mapping[str, bool]],
        called: Mapping[Mode, frozenset[str]] | None = None,
    ) -> Layout:
        """The layout of ``model``, whose modules had ``flags[mode]`` after ``model.train(mode is TRAIN)``.

        Each submodule whose class overrides ``train`` is called to see what it
        does; every module's ``.training`` is put back as it was.
        """
        overrides = {
            mode: frozenset(path for path, flag in flags[mode].items() if flag is not (mode is Mode.TRAIN))
            for mode in Mode
        }
        paths: dict[int, list[str]] = {}
        for path, module in model.named_modules(remove_duplicate=False):
            paths.setdefault(id(module), []).append(path)
        shared = tuple(tuple(p) for p in paths.values() if len(p) > 1)
        return cls(overrides, shared, called, _own_trains(model))

    def flag(self, mode: Mode, path: str) -> bool:
        """The flag the module at ``path`` has after ``.train(mode is TRAIN)``."""
        return (mode is Mode.TRAIN) is not (path in self.overrides[mode])

    def __deepcopy__(self, memo: dict[int, Any]) -> Layout:
        return self  # immutable


def _own_trains(model: torch.nn.Module) -> dict[str, dict[Mode, frozenset[str]]]:
    """What the ``train()`` override of each submodule of ``model`` leaves in the other mode, within it."""
    found: dict[str, dict[Mode, frozenset[str]]] = {}
    flags = [(module, module.training) for module in model.modules()]
    try:
        for path, module in model.named_modules():
            if not path or type(module).train is torch.nn.Module.train:
                continue
            left = {}
            for mode in Mode:
                module.train(mode is Mode.TRAIN)
                left[mode] = frozenset(
                    p for p, m in module.named_modules() if p and m.training is not (mode is Mode.TRAIN)
                )
            if any(left.values()):
                found[path] = left
    finally:
        for module, training in flags:
            module.training = training  # not train(): an override would run again
    return found


class _Train:
    """A submodule's ``train``, as its eager class's override does it: ``nn.Module.train``, then what it leaves."""

    def __init__(self, module: torch.nn.Module, left: Mapping[Mode, frozenset[str]]) -> None:
        self.module, self.left = module, left

    def __call__(self, mode: bool = True) -> torch.nn.Module:
        torch.nn.Module.train(self.module, mode)
        for path in self.left[Mode.TRAIN if mode else Mode.EVAL]:
            self.module.get_submodule(path).training = not mode
        return self.module


@attrs.frozen(eq=False)
class Origin:
    """Where the graphs of a :class:`ModalModule` come from, which says how to derive a combination of modes.

    ``stated`` holds ``allow_train_eval``'s options, for the swaps of its one
    graph; ``exports`` is true when each mode runs its own export (``capture``,
    ``load``), whose comparison tells what a swap cannot.
    """

    stated: Options = attrs.field(factory=Options)
    exports: bool = False

    def __deepcopy__(self, memo: dict[int, Any]) -> Origin:
        return self  # immutable


class ModalModule(torch.nn.Module):
    """An exported module that switches between train and eval behaviour with ``.train()`` and ``.eval()``.

    Made by :func:`allow_train_eval`, ``modeswap.capture`` and
    ``modeswap.load``. Its parameters, buffers and submodules carry the
    exported module's names, so ``state_dict()`` keys match; each site follows
    the ``.training`` flag of the module that owns it, so
    ``modal.get_submodule("bn").eval()`` freezes that batch norm as it does in eager.
    """

    #: The attributes a ModalModule keeps of its own, beside those of the module whose graphs it runs.
    _BOOKKEEPING = frozenset(
        ("_variants", "_pending", "_layout", "_origin", "_paths", "_flagged", "_built", "_derived", "_found", "_lock")
    )

    def __init__(
        self,
        state: GraphModule,
        variants: Mapping[Mode, Variant],
        subgraphs: Mapping[str, GraphModule],
        *,
        training: bool,
        layout: Layout | None = None,
        origin: Origin | None = None,
        paths: Iterable[str] = (),
        pending: Mapping[Mode, Pending] | None = None,
    ) -> None:
        super().__init__()
        for key, value in vars(state).items():
            if key not in _GRAPH_MODULE_ONLY and key not in ("train", "eval", IN_SPEC, OUT_SPEC):
                vars(self)[key] = value
        # The captured graph's subgraph bodies give way to each mode's own.
        captured = {node.target for node in state.graph.find_nodes(op="get_attr")}
        modules = {k: v for k, v in module_table(state).items() if not (k in captured and isinstance(v, GraphModule))}
        vars(self)[MODULES] = modules | dict(subgraphs)
        self._variants = dict(variants)
        #: The modes whose graph is built on first use, from their program (``modeswap.load``).
        self._pending = dict(pending or {})
        self._layout = layout or Layout()
        self._origin = origin or Origin()
        _add_placeholders(self, paths)  # the model's other modules, as a program's module call graph lists them
        #: The variant each combination of flags met so far runs (a cache: the flags are the state).
        self._built: dict[tuple[bool, ...], Variant] = {}
        self._derived: dict[tuple[Mode, frozenset[str], frozenset[str]], Variant] = {}
        #: What the comparison of the two exports found, per mode swapped to (_compared; a cache).
        self._found: dict[Mode, tuple[Found | str, ...]] | None = None
        #: Held while a graph is built or a pending mode deserialized, not while one runs.
        self._lock = threading.RLock()
        self._adopted()
        self.train(training)

    @property
    @compiled_from_callees
    def variant(self) -> Variant:
        """The :class:`Variant` that ``forward`` runs now: the one the modules' ``.training`` flags name."""
        # A list, not a generator: torch.compile(fullgraph=True) refuses a generator's frame.
        flags = tuple([m.training for m in self._flagged])
        found = self._built.get(flags)
        if torch.compiler.is_dynamo_compiling():
            # Traced, a new graph is built as Python and the trace starts again, making this same call (torch
            # replays them): the graph that calls the module holds the new one, with no break.
            _build_and_trace_again(self if found is None else None, flags)
        if found is None:
            built: Variant = self._locked_build(flags)
            return built
        return found

    def flags(self) -> dict[str, bool]:
        """Return the ``.training`` of each module whose flag can decide a site, by path (generated code aside)."""
        return {path: module.training for path, module in zip(self._paths, self._flagged, strict=True)}

    @property
    def layout(self) -> Layout:
        """What the eager model's module tree says that the graphs do not (see :class:`Layout`)."""
        return self._layout

    @property
    def variants(self) -> Mapping[Mode, Variant]:
        """The :class:`Variant` of each mode, every module in it (read only)."""
        return types.MappingProxyType({mode: self._variant(mode) for mode in Mode})

    # The names torch's generated code reads the specs under (torch_private.IN_SPEC and OUT_SPEC); the
    # input check export installs as a forward pre-hook reads _in_spec too, ahead of forward.
    @property
    @compiled_from_callees
    def _in_spec(self) -> Any:
        return self.variant.in_spec

    @property
    @compiled_from_callees
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

    # torch.compile(modal) compiles each variant's generated code, its own frame with a cache of its own, and
    # runs forward as Python to pick it. Compiled from forward, the graphs of every ModalModule would share
    # the one cache of this code, whose recompile limit (8) counts them all: the fifth module compiled in
    # both modes would run uncompiled. A compiled model that calls the module traces forward as usual.
    @compiled_from_callees
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the graph of the current mode on the module's parameters and buffers."""
        variant = self.variant
        if variant.unsynced:
            _refuse_unsynced(variant.unsynced)
        if torch.compiler.is_compiling() or "torch.distributed.fsdp" not in sys.modules:
            return variant.forward(self, *args, **kwargs)
        nested = _unsharded_nested(self)
        output = variant.forward(self, *args, **kwargs)
        if nested and not torch.is_grad_enabled():
            _resharded(nested)
        return output

    def train(self, mode: bool = True) -> ModalModule:
        """Set every module's ``.training`` as the eager model's ``.train(mode)`` does; return ``self``.

        That is ``mode`` everywhere, but for the modules a ``train()`` override
        of the eager model leaves in the other mode (see :class:`Layout`).
        """
        super().train(mode)
        for path in self._layout.overrides[Mode.TRAIN if mode else Mode.EVAL]:
            if path in self._paths:
                self._flagged[self._paths.index(path)].training = not mode
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ModalModule:
        # What copy.deepcopy does by default; spelled out because __reduce_ex__ refuses.
        new = object.__new__(type(self))
        memo[id(self)] = new
        vars(new).update(copy.deepcopy({k: v for k, v in vars(self).items() if k != "_lock"}, memo))
        vars(new)["_lock"] = threading.RLock()
        return new

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        msg = (
            "a ModalModule cannot be pickled: its code is generated. Save it with modeswap.save(module, "
            "path) and read it back with modeswap.load(path), or save its state_dict()"
        )
        raise TypeError(msg)

    def _key_of(self, mode: Mode) -> tuple[bool, ...]:
        return tuple(self._layout.flag(mode, path) for path in self._paths)

    def _adopted(self) -> None:
        """Take in the variants built: placeholders for the modules they run, and the flags that name them."""
        _add_placeholders(self, (path for v in self._variants.values() for path in (*v.owners, *_ran(v.graph))))
        _share(self, self._layout.shared)
        for path, left in self._layout.trains.items():
            module = attribute(self, path)
            if isinstance(module, torch.nn.Module) and "train" not in vars(module):
                vars(module)["train"] = _Train(module, left)  # the instance's, ahead of nn.Module's
        flagged = [(path, m) for path, m in self.named_modules(remove_duplicate=False) if _has_flag(path, m)]
        if tuple(path for path, _ in flagged) != getattr(self, "_paths", None):
            self._paths = tuple(path for path, _ in flagged)
            self._flagged = tuple(m for _, m in flagged)
            self._built.clear()  # keyed by the flags of the modules that were
        for mode, variant in self._variants.items():
            self._built[self._key_of(mode)] = variant

    def _variant(self, mode: Mode) -> Variant:
        """The variant of ``mode``, built from its program now if it was left for its first use."""
        with self._lock:
            if mode not in self._variants:
                program = self._pending.pop(mode)(self)
                gm = program.module()
                names = _adopt(self, gm, mode)
                self._variants[mode], bodies = variant_of(gm, mode.value, Skeleton.of(program, names))
                for name, body in bodies.items():
                    self.add_module(name, body)
                self._adopted()
            return self._variants[mode]

    # Building traces and generates code: never inside a compiled graph (see _build_and_trace_again).
    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def _locked_build(self, flags: tuple[bool, ...]) -> Variant:
        """:meth:`_build`, one thread at a time: the first forwards of a served module may come together."""
        with self._lock:
            found = self._built.get(flags)
            return found if found is not None else self._build(flags)

    def _build(self, flags: tuple[bool, ...]) -> Variant:
        """The variant for ``flags``: the graph of the root's mode, the sites of modules in the other mode swapped."""
        base = Mode.TRAIN if flags[0] else Mode.EVAL
        if self._pending and (base in self._pending or self._origin.exports):
            # Building a mode may give the module new placeholders, and a combination compares both modes: build
            # what it needs, then read the flags again.
            for mode in (base, *Mode) if self._origin.exports and flags != self._key_of(base) else (base,):
                self._variant(mode)
            return self.variant
        now = dict(zip(self._paths, flags, strict=True))
        exported = self._origin.exports
        if exported:
            self._warn_branches(base, now)
        within = self._within(base, now)
        if exported:
            # Two exports: their comparison speaks of the modules without sites (_warn_branches).
            within = {mode: paths & self._variant(base).owners for mode, paths in within.items()}
        key = (base, within[Mode.TRAIN], within[Mode.EVAL])
        if not any(within.values()):
            found = self._variant(base)
        elif key in self._derived:
            found = self._derived[key]
        else:
            gm, changed = self._swapped(base, within, self._stated, self._pinned() if exported else frozenset())
            found = self._variant(base) if not changed else self._variant_of(base, gm)
            self._derived[key] = found
        self._built[flags] = found
        return found

    def _within(self, base: Mode, now: Mapping[str, bool]) -> dict[Mode, frozenset[str]]:
        """The modules whose sites the ``base`` graph holds in another mode than ``now`` gives, per mode to swap to.

        They are the modules whose flag differs from the one they have in that
        graph, and the paths of the sites they own (a site's owner is the
        innermost module with a flag that ran it).
        """
        owners = self._variant(base).owners
        within: dict[Mode, frozenset[str]] = {}
        for mode in Mode:
            going = {
                p for p in self._paths if now[p] is (mode is Mode.TRAIN) and now[p] is not self._layout.flag(base, p)
            }
            within[mode] = frozenset(going | {path for path in owners if self._owner(path) in going})
        return within

    def _owner(self, path: str) -> str:
        """The module whose flag a site run by the module at ``path`` follows: it, or its nearest enclosing one."""
        while path not in self._paths:
            path = path.rpartition(".")[0]
        return path

    def _swapped(
        self,
        base: Mode,
        within: Mapping[Mode, frozenset[str]],
        stated: Callable[[Mode, Mode, frozenset[str]], Options],
        pinned: frozenset[str],
    ) -> tuple[GraphModule, bool]:
        """A copy of the ``base`` graph whose sites under ``within[mode]`` are swapped to ``mode``, and whether any was.

        Sites of the modules in ``pinned`` stay as they are: the model holds them in one mode.
        """
        lifted = self._editable(base)
        for _, module in graph_modules(lifted.module):
            for node in module.graph.nodes:
                if node.op == "call_function" and module_path(node) in pinned:
                    set_memo(node, Memo(kept=True))
        changed = False
        for mode in Mode:
            if not within[mode]:
                continue
            with warnings.catch_warnings():
                if self._origin.exports:
                    # What a graph alone can say of branches, the comparison of the exports says better.
                    warnings.simplefilter("ignore", TrainingBranchWarning)
                    warnings.simplefilter("ignore", NondeterministicEvalWarning)
                changed |= bool(lifted.edit(mode, stated(base, mode, within[mode])))
        return lifted.module, changed

    def _variant_of(self, base: Mode, gm: GraphModule) -> Variant:
        variant, bodies = variant_of(gm, f"{base.value}_{len(self._derived)}")
        for name, body in bodies.items():
            self.add_module(name, body)
        return attrs.evolve(variant, in_spec=self._variant(base).in_spec, out_spec=self._variant(base).out_spec)

    def _stated(self, base: Mode, mode: Mode, within: frozenset[str]) -> Options:
        """The options of the swap of the sites under ``within`` of the ``base`` graph to ``mode``."""
        stated = self._origin.stated
        if mode is Mode.EVAL:
            return Options(keep=stated.keep, within=within)
        if not self._origin.exports:
            return attrs.evolve(stated, within=within)
        # The training p an eval export writes as 0.0, read off the train export.
        learned = self._learned()
        return Options(
            dropout=tuple((p, learned[p]) for p in sorted(within) if p in learned), within=within, exact=True
        )

    def _editable(self, mode: Mode) -> Lifted:
        """This module's tree and ``mode``'s graph, lifted to be swapped: its own graph and bodies, the same tensors."""
        variant = self._variant(mode)
        shell = GraphModule.__new__(GraphModule)
        vars(shell).update({k: v for k, v in vars(self).items() if k not in self._BOOKKEEPING})
        vars(shell).update({GRAPH: variant.graph, IN_SPEC: variant.in_spec, OUT_SPEC: variant.out_spec})
        return lift(shell, Weights(share_weights=True))

    def _compared(self) -> dict[Mode, tuple[Found | str, ...]]:
        """Per mode, what differs between the other export swapped to it and its own export (cached).

        Each module is swapped to the flag it has in the other export. A swap that is refused is one string, its error.
        """
        if self._found is None:
            for mode in Mode:
                self._variant(mode)  # before the flags are read: building one may add placeholders
            found: dict[Mode, tuple[Found | str, ...]] = {}
            for target in Mode:
                source = target.other
                flags = {path: self._layout.flag(target, path) for path in self._paths}
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ModeswapWarning)
                        swapped, _ = self._swapped(
                            source, self._within(source, flags), lambda b, m, w: Options(within=w), frozenset()
                        )
                except ModeswapError as error:
                    found[target] = (
                        f"the swap of the {source.value} export to {target.value} mode is refused: {error}",
                    )
                    continue
                recompile_all(swapped)
                found[target] = compare(self._editable(target).module, swapped, target)
            self._found = found
        return self._found

    def _pinned(self) -> frozenset[str]:
        """The modules with a site that an export holds in the other mode (``F.dropout(x, training=True)``)."""
        return frozenset(
            f.module_path for fs in self._compared().values() for f in fs if isinstance(f, Found) and f.flag
        )

    def _learned(self) -> dict[str, float]:
        """The training ``p`` of each module whose dropout or attention the eval export holds at 0.0."""
        found = self._compared()[Mode.TRAIN]
        return {f.module_path: f.values[0] for f in found if isinstance(f, Found) and _zeroed(f) and f.values}

    def _warn_branches(self, base: Mode, now: Mapping[str, bool]) -> None:
        """Warn about the modules in another mode than their export's whose forward branches on ``self.training``.

        A difference between the exports is the doing of the innermost module
        enclosing it that both exports called. Where the exports' calls are not
        known, every module between the innermost one both graphs ran and the
        difference is suspected.
        """
        differing = {path for path in self._paths if now[path] is not self._layout.flag(base, path)}
        if not differing:
            return
        found: dict[str, list[str]] = {}
        refused: list[str] = []
        for target, differences in self._compared().items():
            going = {path for path in differing if now[path] is (target is Mode.TRAIN)}
            if not going:
                continue
            for f in differences:
                if isinstance(f, str):
                    refused.append(f)
                elif not (f.flag or f.side == "values" or _zeroed(f)):  # not what a swap sets: a site's mode, its p
                    for path in self._deciders(f.module_path) & going:
                        found.setdefault(path, []).extend(f.ops or (str(f.argument),))
        if found:
            listed = "; ".join(
                f"{path!r} (the exports differ in {', '.join(dict.fromkeys(ops))})" for path, ops in found.items()
            )
            msg = (
                f"{len(found)} module(s) are in another mode than the model around them, and their forward branches "
                f"on self.training: {listed}. Each export holds only the side its mode ran, so they compute as in "
                "the mode of the model around them, not as eager would. Put them back in the model's mode, or "
                "export the model in this state (set the modes, then torch.export.export) and use that program"
            )
            warnings.warn(msg, TrainingBranchWarning, stacklevel=2)
        if refused:
            msg = (
                f"modules {', '.join(map(repr, sorted(differing)))} are in another mode than the model around them, "
                f"and whether their forward branches on self.training cannot be told: {' '.join(refused)}"
            )
            warnings.warn(msg, TrainingBranchWarning, stacklevel=2)

    def _deciders(self, path: str) -> set[str]:
        """The modules whose own mode may decide a difference the exports show at ``path``."""
        called = self._layout.called
        if called is not None:
            both = called[Mode.TRAIN] & called[Mode.EVAL]
            return {next(p for p in enclosing(path) if p in both or not p)}
        ran = [frozenset(_ran(self._variant(mode).graph)) for mode in Mode]
        suspects: set[str] = set()
        for p in enclosing(path):
            suspects.add(p)
            if all(p in paths for paths in ran):
                break
        return suspects


@run_while_tracing
def _build_and_trace_again(module: ModalModule | None, flags: tuple[bool, ...]) -> None:
    """Build the variant ``module`` runs under ``flags``, then have torch.compile trace again from the start.

    torch.compile calls it as Python while it traces the module, alone or in a
    model around it: the new trace reads the module as the build left it, new
    modules and attributes included. ``None``: the variant is there, nothing to do.
    """
    if module is not None:
        module._locked_build(flags)
        trace_again(f"a ModalModule built the graph of the modes {flags} of its modules")


def _zeroed(f: Found) -> bool:
    """Whether ``f`` is a dropout or attention probability that the swap leaves at 0.0 where the export has another."""
    return f.side == "both" and f.argument in ("p", "dropout_p") and f.values is not None and f.values[1] == 0.0


def _has_flag(path: str, module: torch.nn.Module) -> bool:
    """Whether the ``.training`` of ``module`` can decide a site: a module of the model, not generated code."""
    return not isinstance(module, GraphModule) and not path.rpartition(".")[2].startswith(GUARDS_MODULE)


def _ran(graph: Graph) -> Iterator[str]:
    """The paths of every module whose forward ran a node of ``graph``."""
    for node in graph.nodes:
        yield from module_paths(node)


def _add_placeholders(root: torch.nn.Module, paths: Iterable[str]) -> None:
    """Give ``root`` an empty module at each of ``paths`` it lacks: a module the export kept no state of.

    A path whose name ``root`` holds as something else (a tensor, a method) is left out.
    """
    for path in sorted(set(paths), key=lambda p: p.count(".")):
        if not path or "@" in path:
            continue  # the root, or a module_call_graph entry of a repeated call ("block@1")
        parent_path, _, name = path.rpartition(".")
        parent = attribute(root, parent_path) if parent_path else root
        if not isinstance(parent, torch.nn.Module) or name in module_table(parent) or hasattr(parent, name):
            continue
        parent.add_module(name, torch.nn.Module())


def _share(root: torch.nn.Module, groups: Sequence[Sequence[str]]) -> None:
    """Make each group of paths name one module, as in eager, where they name modules holding the same tensors."""
    for group in groups:
        present = [path for path in group if isinstance(attribute(root, path), torch.nn.Module)]
        if not present:
            continue
        module = attribute(root, present[0])
        for path in group:
            held = attribute(root, path)
            if held is module or (held is not None and not _same_state(held, module)):
                continue
            parent_path, _, name = path.rpartition(".")
            parent = attribute(root, parent_path) if parent_path else root
            if isinstance(parent, torch.nn.Module) and (held is not None or not hasattr(parent, name)):
                module_table(parent)[name] = module


def shared_by_state(root: torch.nn.Module) -> tuple[tuple[str, ...], ...]:
    """The groups of paths of ``root`` whose modules hold the very same tensors under the same names.

    An export keeps no trace of a module registered twice but its tensors, held
    under both paths: modules that hold the same ones are taken to be one.
    """
    groups: dict[tuple[tuple[str, int], ...], list[str]] = {}
    for path, module in root.named_modules(remove_duplicate=False):
        if path and not isinstance(module, GraphModule) and (state := _state(module)):
            groups.setdefault(tuple(sorted(state.items())), []).append(path)
    return tuple(tuple(paths) for paths in groups.values() if len(paths) > 1)


def _state(module: torch.nn.Module) -> dict[str, int]:
    named = (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False))
    return {name: id(t) for name, t in named}


def _named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict((*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)))


def _tie(root: torch.nn.Module, groups: Iterable[Sequence[str]]) -> None:
    """Make the parameters or buffers of each group of names one tensor: the first name's."""
    named = _named_tensors(root)
    for group in groups:
        for name in group[1:]:
            owner_path, _, leaf = name.rpartition(".")
            owner = root.get_submodule(owner_path)
            parameters = parameter_table(owner)
            table = parameters if leaf in parameters else buffer_table(owner)
            table[leaf] = named[group[0]]  # type: ignore[assignment]


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return _state(a) == _state(b)


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
    pins sites in both (see ``modeswap.swap``). Submodules switch on their own
    too (``modal.get_submodule("bn").eval()``), as in eager. Weights that
    ``torch.export.load`` untied (distinct parameters over one memory, of one
    shape and stride: tied embeddings) are one tensor again, as in the model.

    >>> model = modeswap.allow_train_eval(gm)
    >>> evaluated = model.eval()
    """
    if isinstance(module, ExportedProgram):
        refuse_lowered(module)
        captured, modules = report(module.graph_module), [entry.fqn for entry in module.module_call_graph]
    else:
        captured, modules = report(require_exported(module)), None
    stated = {mode: Options.of(mode, keep=keep) for mode in Mode}
    stated[Mode.TRAIN] = Options.of(Mode.TRAIN, attention_dropout=attention_dropout, dropout=dropout, keep=keep)
    modes = {
        site.mode
        for site in captured.sites
        if tells_mode(site) and not (site.kept or stated[Mode.EVAL].keeps(site.module_path))
    }
    if len(modes) > 1:
        raise UnsupportedGraphError(_mixed(captured))
    if isinstance(module, ExportedProgram):
        state, variants, subgraphs = _from_program(module, stated, copy_on_write)
    else:
        state, variants, subgraphs = _from_graph(module, stated, copy_on_write)
    # A graph that shows no mode computes what its eval variant computes.
    layout = Layout(shared=shared_by_state(state))
    origin = Origin(stated[Mode.TRAIN])
    training = modes == {Mode.TRAIN}
    return ModalModule(state, variants, subgraphs, training=training, layout=layout, origin=origin, paths=modules or ())


def _from_graph(
    gm: GraphModule, stated: Mapping[Mode, Options], copy_on_write: bool
) -> tuple[GraphModule, dict[Mode, Variant], dict[str, GraphModule]]:
    """The state and the variants of a modal module of ``gm``: each mode's swap of one copy of its tensors."""
    state = _state_of(gm, copy_on_write)
    variants: dict[Mode, Variant] = {}
    subgraphs: dict[str, GraphModule] = {}
    for mode in Mode:
        # The training values the graph does not record are the train variant's alone (stated[mode]).
        lowered = functools.partial(_lowered, suffix=mode.value)
        (variants[mode], bodies), _ = swapped(state, mode, stated[mode], Weights(share_weights=True), lowered)
        subgraphs |= bodies
    return state, variants, subgraphs


def _lowered(lifted: Lifted, suffix: str) -> tuple[Variant, dict[str, GraphModule]]:
    return variant_of(lifted.module, suffix)


def _from_program(
    program: ExportedProgram, stated: Mapping[Mode, Options], copy_on_write: bool
) -> tuple[GraphModule, dict[Mode, Variant], dict[str, GraphModule]]:
    """The state and the variants of a modal module of ``program``: one swap of the program per mode.

    Each variant runs its swapped program's ``module()`` on one copy of the
    tensors, and keeps the program's skeleton for ``modeswap.save``.
    """
    programs = {mode: swapped(program, mode, stated[mode], Weights(share_weights=True))[0] for mode in Mode}
    graphs = {mode: p.module() for mode, p in programs.items()}
    state = _state_of(graphs[Mode.TRAIN], copy_on_write)
    variants: dict[Mode, Variant] = {}
    subgraphs: dict[str, GraphModule] = {}
    for mode, gm in graphs.items():
        names = _adopt(state, gm, mode)
        variants[mode], bodies = variant_of(gm, mode.value, Skeleton.of(programs[mode], names))
        subgraphs |= bodies
    return state, variants, subgraphs


def _state_of(gm: GraphModule, copy_on_write: bool) -> GraphModule:
    """A copy of ``gm`` to hold a modal module's tensors; tied weights ``torch.export.load`` untied are one again."""
    # torch.export.load gives tied weights back as Parameters over one memory: one tensor again.
    ties = alias_groups(tie(_named_tensors(gm)))
    state = copy_module(gm, copy_on_write=copy_on_write)
    _tie(state, ties)
    return state


def variant_of(
    gm: GraphModule, suffix: str, skeleton: Skeleton | None = None
) -> tuple[Variant, dict[str, GraphModule]]:
    """Make ``gm`` (a copy of modeswap's own, edited no further) a variant of a :class:`ModalModule`.

    Returns the variant and its subgraph bodies, renamed with ``suffix`` (a
    mode's name, for the graph of that mode). ``skeleton`` is that of the
    mode's ``ExportedProgram``, when there is one.
    """
    found = report(gm)
    owners = frozenset(path for _, module in graph_modules(gm) for path in site_paths(module.graph))
    bodies = _rename_subgraphs(gm, suffix)
    recompile_all(gm)
    variant = Variant(
        gm.graph,
        gm.code,
        type(gm).forward,
        found,
        in_spec(gm),
        out_spec(gm),
        skeleton,
        owners | {site.module_path for site in found.sites},
        _unsynced(gm, found),
    )
    # The variant keeps the graph, and a graph its owning module: gm, whose tensors the code never
    # reads (it runs on the ModalModule's). Kept, they would hold an eager model's weights alive, or
    # the old ones after .to(); the graph is only read from here on.
    gm.graph.owning_module = None
    return variant, bodies


def _unsynced(gm: GraphModule, found: ModeReport) -> tuple[str, ...]:
    """The paths of the ``SyncBatchNorm`` modules whose batch norm ``gm`` computes in train mode."""
    nodes = {node.name: node for _, module in graph_modules(gm) for node in module.graph.nodes}
    paths = (
        site.module_path
        for site in found.sites
        if site.kind == "batch_norm"
        and site.mode is Mode.TRAIN
        and site.node in nodes
        and _type_name(nodes[site.node]).rpartition(".")[2] == "SyncBatchNorm"
    )
    return tuple(dict.fromkeys(paths))


def _type_name(node: torch.fx.Node) -> str:
    """The name of the type of the module that ran ``node``, as ``nn_module_stack`` spells it (``"pkg.mod.Cls"``)."""
    return (innermost_module(node) or ("", ""))[1].removeprefix("<class '").removesuffix("'>")


#: A program whose graph a :class:`ModalModule` builds on first use: given the module, whose tensors it is
#: to hold by name, return it (``modeswap.load`` deserializes the mode it was not saved in so).
Pending = Callable[[torch.nn.Module], ExportedProgram]


def modal_of(
    programs: Mapping[Mode, ExportedProgram | Pending],
    *,
    training: bool,
    share_weights: bool = False,
    layout: Layout | None = None,
    paths: Iterable[str] = (),
) -> ModalModule:
    """Return a :class:`ModalModule` that runs each mode's own program on one copy of the weights.

    ``programs`` are ``torch.export.export`` of one model in each mode; they are
    not modified. A mode may give a :data:`Pending` instead, called on first
    use of that mode. The weights are copied from the train program (the
    other, when the train program is pending), or, with ``share_weights``, are
    its own; the other graph reads them under the same names. A tensor
    constant or a guard that only one graph has, or that differs between them,
    is kept for that graph under a name of its own. Each variant keeps its
    program's skeleton (``modeswap.save``), not its tensors. ``layout`` is what
    the eager model's module tree says (see :class:`Layout`); ``paths`` are
    the model's module paths, when a pending program's are to be known now.
    """
    ready = {mode: program for mode, program in programs.items() if isinstance(program, ExportedProgram)}
    pending = {mode: program for mode, program in programs.items() if not isinstance(program, ExportedProgram)}
    modules = {mode: program.module() for mode, program in ready.items()}
    first = modules[Mode.TRAIN] if Mode.TRAIN in modules else next(iter(modules.values()))
    state = first if share_weights else copy_module(first)
    variants: dict[Mode, Variant] = {}
    subgraphs: dict[str, GraphModule] = {}
    for mode, module in modules.items():
        # The variant edits the graph module it is given: one the state is not.
        gm = copy_module(module, share_weights=True) if module is state else module
        names = _adopt(state, gm, mode)
        variants[mode], bodies = variant_of(gm, mode.value, Skeleton.of(ready[mode], names))
        subgraphs |= bodies
    called = [entry.fqn for program in ready.values() for entry in program.module_call_graph]
    origin = Origin(exports=True)
    paths = [*paths, *called]
    return ModalModule(
        state, variants, subgraphs, training=training, layout=layout, origin=origin, paths=paths, pending=pending
    )


def set_flags(modal: ModalModule, flags: Mapping[str, bool]) -> ModalModule:
    """Set the ``.training`` of each module of ``modal`` that ``flags`` names by path; return ``modal``.

    A path ``modal`` lacks (a module no export called, such as an ``nn.ReLU``) decides nothing, and is passed over.
    """
    for path, module in modal.named_modules():
        if path in flags and _has_flag(path, module):
            module.training = flags[path]
    return modal


def _adopt(state: torch.nn.Module, gm: GraphModule, mode: Mode) -> dict[str, str]:
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


def _rename_subgraphs(gm: GraphModule, suffix: str) -> dict[str, GraphModule]:
    # Every graph's code reads its subgraph bodies off the one module: each graph's
    # bodies get names of their own.
    renamed: dict[str, GraphModule] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        target = str(node.target)
        body = attribute(gm, target)  # None for a tensor _adopt renamed: the state holds it, gm does not
        if not isinstance(body, GraphModule):
            continue
        new = f"{target.replace('.', '_')}_{suffix}"
        if hasattr(gm, new):
            msg = f"cannot name the {suffix} copy of subgraph {target!r}: the module already has {new!r}"
            raise UnsupportedGraphError(msg)
        renamed[new] = body
        node.target = new
    return renamed


def _mixed(captured: ModeReport) -> str:
    """Why a graph whose sites disagree cannot be made modal as it is, and the ``keep=`` that pins the minority."""
    counts = {
        mode: [site for site in captured.sites if site.mode is mode and tells_mode(site) and not site.kept]
        for mode in Mode
    }
    majority = max(Mode, key=lambda mode: len(counts[mode]))
    minority = counts[majority.other]
    paths = tuple(dict.fromkeys(site.module_path for site in minority))
    nodes = ", ".join(site.node for site in minority[:3]) + (", ..." if len(minority) > 3 else "")
    return (
        f"allow_train_eval takes a graph whose sites follow one mode, and this one mixes them: the "
        f"{majority.other.value} sites {nodes} are under {', '.join(map(repr, paths)) or 'the root module'}, the "
        f"rest in {majority.value} mode. If those modules stay in {majority.other.value} mode whatever the model's "
        f"mode (frozen batch norms, Monte Carlo dropout), pin them: modeswap.allow_train_eval(gm, keep={paths!r}). "
        "To switch them with the rest, export the model in one mode; with the eager model at hand, "
        "modeswap.capture(model, args) keeps each module's own mode"
    )


@lift.register
def _(module: ModalModule, weights: Weights) -> Lifted:
    msg = (
        "got a module from modeswap.allow_train_eval; it switches with .train() and .eval(). "
        "Swap the exported module it was made from instead"
    )
    raise NotExportedError(msg)


@mode_of.register
def _(module: ModalModule) -> ModeReport:
    return module.variant.report
