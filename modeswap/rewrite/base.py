"""The pass machinery: :class:`Pass`, what a run knows about its graph (:class:`Context`), and ``pipeline``.

A :class:`Pass` is called like a function, ``GraphModule -> GraphModule``: it
returns a rewritten copy and leaves its input alone. Inside, it is an in-place
*kernel* run on a copy the pass owns; ``pipeline`` copies once and runs all its
passes' kernels on that copy, so four passes cost one copy and one recompile::

    dropout_and_bn = pipeline(swap_dropout("eval"), swap_batchnorm("eval"), eliminate_dead_code, recompile)
    rewritten = dropout_and_bn(gm)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import attrs
import toolz
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from modeswap.fx.copying import copy_module, recompile_all
from modeswap.fx.exported import require_exported
from modeswap.fx.graphs import calls, graph_modules, module_path
from modeswap.records.modes import Change, Mode, memo_of
from modeswap.table import rules as table
from modeswap.table.rules import Sentinel


@attrs.frozen
class Context:
    """What a run of passes knows about its graph, decided once before the first edit.

    Every kernel of a pipeline reads the same context, so no pass sees what an
    earlier one changed, and the order of passes cannot change a decision.
    """

    #: The module path and mode of each site whose training value is fixed by its rule, in graph order;
    #: sites an earlier swap kept (see ``Memo.kept``) are left out.
    modes: tuple[tuple[str, Mode], ...]
    #: In a lifted graph (``ExportedProgram.graph``): placeholder name -> the buffer it stands for.
    buffers: Mapping[str, str] = attrs.field(factory=dict)
    #: In a lifted graph: placeholder name -> the parameter it stands for.
    parameters: Mapping[str, str] = attrs.field(factory=dict)
    #: In a lifted graph: each parameter or buffer name -> the first name of its tensor (tied weights).
    aliases: Mapping[str, str] = attrs.field(factory=dict)
    #: The module paths an ``ExportedProgram`` lists in its ``module_call_graph``; ``None`` for a GraphModule.
    modules: tuple[str, ...] | None = None

    @classmethod
    def of(
        cls,
        gm: GraphModule,
        *,
        buffers: Mapping[str, str] | None = None,
        parameters: Mapping[str, str] | None = None,
        aliases: Mapping[str, str] | None = None,
        modules: Iterable[str] | None = None,
    ) -> Context:
        """Read the context of ``gm``, with what its ``ExportedProgram`` says where the caller has one."""
        found = {"buffers": dict(buffers or {}), "parameters": dict(parameters or {}), "aliases": dict(aliases or {})}
        return cls(_modes(gm), **found, modules=None if modules is None else tuple(modules))

    def captured(self, kept: Callable[[str], bool] | None = None) -> Mode | None:
        """The mode the graph was captured in, as its fixed sites say; ``None`` if none or mixed.

        Sites under a module that ``kept`` accepts do not follow the mode, so they do not count.
        """
        modes = {mode for path, mode in self.modes if kept is None or not kept(path)}
        (mode,) = modes if len(modes) == 1 else (None,)
        return mode


def _modes(gm: GraphModule) -> tuple[tuple[str, Mode], ...]:
    fixed = [rule for rule in table.RULES if rule.train is not Sentinel.PER_NODE]
    return tuple(
        (module_path(node), mode)
        for rule in fixed
        for _, module in graph_modules(gm)
        for node in calls(module.graph, rule.ops)
        if rule.applies(node) and (mode := rule.mode(node)) is not None and not getattr(memo_of(node), "kept", False)
    )


#: An in-place kernel: edits a module the caller owns and returns the changes it made.
Kernel = Callable[[GraphModule, Context], Iterable[Change]]


@attrs.frozen
class Pass:
    """A pure ``GraphModule -> GraphModule`` rewrite.

    ``kernel`` does the work in place on a copy the pass owns; ``compiles`` says
    whether the kernel leaves the generated code up to date (only ``recompile``
    does), so that running a pass generates code exactly once.
    """

    name: str
    kernel: Kernel = attrs.field(repr=False)
    compiles: bool = False

    def __call__(self, gm: GraphModule) -> GraphModule:
        """Return a rewritten copy of ``gm``; ``gm`` is not modified."""
        module, _ = self.rewrite(gm)
        return module

    def rewrite(
        self, gm: GraphModule, *, share_weights: bool = False, copy_on_write: bool = False
    ) -> tuple[GraphModule, tuple[Change, ...]]:
        """Return a rewritten copy of ``gm`` and the changes made to reach it.

        With ``share_weights`` the copy aliases ``gm``'s parameters and buffers
        instead of cloning them; with ``copy_on_write`` it clones them lazily.
        """
        new = copy_module(require_exported(gm), share_weights=share_weights, copy_on_write=copy_on_write)
        changes = self.edit(new)
        if not self.compiles:
            recompile_all(new)
        return new, changes

    def edit(
        self,
        gm: GraphModule,
        *,
        buffers: Mapping[str, str] | None = None,
        parameters: Mapping[str, str] | None = None,
        aliases: Mapping[str, str] | None = None,
        modules: Iterable[str] | None = None,
    ) -> tuple[Change, ...]:
        """Rewrite ``gm`` in place and return the changes; for a copy the caller owns.

        What the graph alone does not say comes from its ``ExportedProgram``, if
        any: ``buffers`` and ``parameters`` map the placeholders of a lifted
        graph to the buffers and parameters they stand for
        (``graph_signature.inputs_to_buffers``, ``inputs_to_parameters``),
        ``aliases`` each of their names to the first name of its tensor;
        ``modules`` lists the module paths of its ``module_call_graph``. The
        generated code is left as it is unless the pass compiles.
        """
        # tuple() runs a generator kernel to its end before anything else reads the graph.
        context = Context.of(gm, buffers=buffers, parameters=parameters, aliases=aliases, modules=modules)
        return tuple(self.kernel(gm, context))


def pipeline(*passes: Pass) -> Pass:
    """Return one pass that runs ``passes`` in order on a single copy.

    ``pipeline()`` is the identity: it returns a fresh copy. A pipeline is a
    pass, so pipelines nest.
    """
    for p in passes:
        if not isinstance(p, Pass):
            msg = (
                f"pipeline() takes modeswap passes, got {p!r}; compose other "
                "GraphModule -> GraphModule functions with toolz.compose_left instead"
            )
            raise TypeError(msg)
    # The card's composition, over one copy: each kernel in turn on the same module and context (juxt), each
    # run to its end before the next starts, even a generator (compose with tuple), their changes one tuple (concat).
    run_in_order = toolz.juxt(*(toolz.compose(tuple, p.kernel) for p in passes))

    def kernel(gm: GraphModule, context: Context) -> tuple[Change, ...]:
        return tuple(toolz.concat(run_in_order(gm, context)))

    names = ", ".join(p.name for p in passes)
    return Pass(f"pipeline({names})", kernel, compiles=bool(passes) and passes[-1].compiles)


def for_pass_manager(p: Pass) -> Callable[[GraphModule], PassResult]:
    """Adapt ``p`` to ``torch.fx.passes.infra.pass_manager.PassManager``.

    The adapted pass returns a ``PassResult`` holding the new module; the module
    the manager hands in is not modified.
    """

    def run(gm: GraphModule) -> PassResult:
        module, changes = p.rewrite(gm)
        return PassResult(module, bool(changes))

    run.__name__ = p.name
    return run
