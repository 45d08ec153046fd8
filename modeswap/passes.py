"""The public passes: one swap per kind of site, derived from the rule table, and plain graph passes.

Each factory takes its options first and returns a :class:`Pass`, a pure
``GraphModule -> GraphModule`` function::

    evaluated = swap_dropout("eval")(gm)
    everything = swap_pipeline("eval")(gm)   # what modeswap.to_eval runs
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from torch.fx import GraphModule

from modeswap.fx.copying import recompile_all
from modeswap.fx.graphs import graph_modules
from modeswap.records.errors import InvalidOptionError
from modeswap.records.modes import Change, Kind, Mode
from modeswap.records.options import Options
from modeswap.rewrite import flag_swap, idioms, warning_passes
from modeswap.rewrite.base import Context, Kernel, Pass, for_pass_manager, pipeline
from modeswap.table import rules as table
from modeswap.table.rules import IDIOMS, KINDS, Sentinel

__all__ = [
    "SWAPS",
    "Context",
    "Kernel",
    "Pass",
    "eliminate_dead_code",
    "for_pass_manager",
    "pipeline",
    "preflight",
    "recompile",
    "set_training",
    "swap_attention",
    "swap_batch_norm",
    "swap_batchnorm",
    "swap_drop_path",
    "swap_dropout",
    "swap_instance_norm",
    "swap_kind",
    "swap_passes",
    "swap_pipeline",
    "swap_rnn",
    "swap_rrelu",
    "warn_nondeterministic",
    "warn_training_branches",
]


def _eliminate_dead_code(gm: GraphModule, context: Context) -> tuple[Change, ...]:
    for _, module in graph_modules(gm):
        module.graph.eliminate_dead_code()
    return ()


def _recompile(gm: GraphModule, context: Context) -> tuple[Change, ...]:
    recompile_all(gm)
    return ()


eliminate_dead_code = Pass("eliminate_dead_code", _eliminate_dead_code)
recompile = Pass("recompile", _recompile, compiles=True)


def set_training(mode: Mode | str) -> Pass:
    """Return the pass that sets ``training`` of the module and its submodules to say ``mode``."""
    target = Mode.parse(mode)

    def kernel(gm: GraphModule, context: Context) -> tuple[Change, ...]:
        for module in gm.modules():
            module.training = target is Mode.TRAIN
        return ()

    return Pass(f"set_training({target.value})", kernel)


def swap_kind(
    kind: str,
    mode: Mode | str,
    *,
    dropout: Mapping[str, float] | None = None,
    attention_dropout: float | None = None,
    keep: Sequence[str] = (),
) -> Pass:
    """Return the pass that puts every site of ``kind`` (one of ``rules.KINDS``) in ``mode``.

    ``dropout``, ``attention_dropout`` and ``keep`` are ``modeswap.swap``'s.
    This is the bare swap, for building pipelines: it neither checks the
    options against the graph nor warns about a site whose training value is
    neither recorded nor stated (that site keeps the value it has).
    :func:`preflight` does both, and ``swap_dropout``, ``swap_batchnorm`` and
    the other single-kind passes run it first.
    """
    target = Mode.parse(mode)
    return _swap_kind(kind, target, Options.of(target, dropout=dropout, attention_dropout=attention_dropout, keep=keep))


def _swap_kind(kind: str, target: Mode, stated: Options) -> Pass:
    kernel: Kernel
    if any(rule.kind == kind for rule in table.RULES):

        def kernel(gm: GraphModule, context: Context) -> list[Change]:
            return flag_swap.swap_flags(gm, context, kind, target, stated)

    elif any(idiom.kind == kind for idiom in IDIOMS):

        def kernel(gm: GraphModule, context: Context) -> list[Change]:
            return idioms.swap_in_place(gm, kind, target, stated)

    else:
        msg = f"unknown kind of site {kind!r}; expected one of {', '.join(KINDS)}"
        raise InvalidOptionError(msg)
    return Pass(f"swap_{kind}({target.value})", kernel)


def preflight(
    mode: Mode | str,
    *,
    dropout: Mapping[str, float] | None = None,
    attention_dropout: float | None = None,
    keep: Sequence[str] = (),
) -> Pass:
    """Return the pass that checks a swap's options against the graph before the swap passes run.

    It raises when a ``dropout`` or ``keep`` pattern matches no site, or when a
    stated training value contradicts one the graph records; for a swap to
    train it warns (``UnknownTrainingValueWarning``) about the sites whose
    training value is neither recorded nor stated, and prints the ``dropout=``
    mapping that would state them.
    """
    target = Mode.parse(mode)
    return _preflight(target, Options.of(target, dropout=dropout, attention_dropout=attention_dropout, keep=keep))


def _preflight(target: Mode, stated: Options, kinds: tuple[str, ...] = KINDS) -> Pass:
    return _check(f"preflight({target.value})", warning_passes.preflight, target, stated, kinds)


def _check(name: str, check: Callable[..., tuple[Change, ...]], *options: Any) -> Pass:
    """The pass ``name`` of a kernel of :mod:`modeswap.rewrite.warning_passes`, given ``options`` after the graph."""

    def kernel(gm: GraphModule, context: Context) -> tuple[Change, ...]:
        return check(gm, context, *options)

    return Pass(name, kernel)


def _checked(kind: Kind, mode: Mode | str, **options: Any) -> Pass:
    target = Mode.parse(mode)
    stated = Options.of(target, **options)
    checked = pipeline(_preflight(target, stated, (kind,)), _swap_kind(kind, target, stated))
    return attrs.evolve(checked, name=f"swap_{kind}({target.value})")


#: A ``swap_<kind>`` factory: ``factory(mode, *, dropout=None, attention_dropout=None, keep=())`` -> :class:`Pass`.
Factory = Callable[..., Pass]


def _factory(kind: Kind) -> Factory:
    """The public, checked swap of the sites of ``kind``, written from what the rule table says of the kind."""
    rules = [rule for rule in table.RULES if rule.kind == kind]
    idioms_of_kind = [idiom for idiom in IDIOMS if idiom.kind == kind]
    takes = {"keep"}
    if any(rule.gated is not None or rule.train is Sentinel.PER_NODE for rule in rules):
        takes.add("dropout")
    if any(rule.train is Sentinel.PER_NODE for rule in rules):
        takes.add("attention_dropout")
    name = f"swap_{kind}"

    def factory(
        mode: Mode | str,
        *,
        dropout: Mapping[str, float] | None = None,
        attention_dropout: float | None = None,
        keep: Sequence[str] = (),
    ) -> Pass:
        given = {"dropout": dropout, "attention_dropout": attention_dropout, "keep": keep}
        for option, value in given.items():
            if value not in (None, ()) and option not in takes:
                msg = f"{name} takes no {option}= (the sites of kind {kind!r} have no training value to state)"
                raise InvalidOptionError(msg)
        return _checked(kind, mode, **{option: given[option] for option in sorted(takes)})

    if rules:
        ops = ", ".join(sorted({f"``{str(op).rsplit('.', 1)[0]}``" for rule in rules for op in rule.ops}))
        what = f"sets the mode argument of every {kind.replace('_', ' ')} op ({ops})"
    else:
        what = f"removes the {kind.replace('_', ' ')} idioms for eval and rebuilds them for train " + (
            f"({', '.join(idiom.name for idiom in idioms_of_kind)}; only those an earlier eval swap removed: "
            "an eval export never ran them)"
        )
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (
        f"Return the pass that {what} for ``mode``, checked first (``preflight``).\n\n"
        f"    Generated from ``modeswap.table.rules``. Its options, {', '.join(f'``{o}``' for o in sorted(takes))}, "
        "are ``modeswap.swap``'s.\n    "
    )
    return factory


#: The checked swap of each kind of site in the rule table (``rules.KINDS``), by kind.
SWAPS: Mapping[Kind, Factory] = {kind: _factory(kind) for kind in KINDS}

swap_dropout = SWAPS["dropout"]
swap_batch_norm = SWAPS["batch_norm"]
swap_instance_norm = SWAPS["instance_norm"]
swap_rrelu = SWAPS["rrelu"]
swap_rnn = SWAPS["rnn"]
swap_attention = SWAPS["attention"]
swap_drop_path = SWAPS["drop_path"]
#: The name the docs used before the factories were named after their kind.
swap_batchnorm = swap_batch_norm


def warn_training_branches(mode: Mode | str, *, keep: Sequence[str] = ()) -> Pass:
    """Return the pass that warns about modules whose forward branches on ``self.training`` where no swap reaches.

    Sites under the ``keep`` patterns do not follow the mode, so they do not
    tell the mode the graph was captured in.
    """
    target = Mode.parse(mode)
    return _warn_training_branches(target, Options.of(Mode.EVAL, keep=keep))


def _warn_training_branches(target: Mode, stated: Options) -> Pass:
    return _check(f"warn_training_branches({target.value})", warning_passes.warn_training_branches, target, stated)


#: Warn when an eval graph still draws random numbers that no rule owns.
warn_nondeterministic = _check("warn_nondeterministic", warning_passes.warn_nondeterministic, Options())


def swap_passes(
    mode: Mode | str,
    *,
    attention_dropout: float | None = None,
    dropout: Mapping[str, float] | None = None,
    keep: Sequence[str] = (),
) -> tuple[Pass, ...]:
    """Return the passes that swap every site of a graph to ``mode``, with the checks around them.

    ``preflight`` first, then one swap per kind of site, in the order of
    ``rules.KINDS``, then the checks of what no swap can fix; no
    ``recompile``. Each swap erases what its own edits leave unused (an eval
    batch norm's counter read), so the graph's other nodes, dead or not, stay as
    they were and no dead-code pass is needed. The options are ``modeswap.swap``'s.
    """
    target = Mode.parse(mode)
    return _steps(target, Options.of(target, dropout=dropout, attention_dropout=attention_dropout, keep=keep))


def full_swap(target: Mode, options: Options) -> Pass:
    """The one pass that swaps every site to ``target``, checks included: :func:`swap_passes` as one pipeline.

    For options already checked into an :class:`Options` record (``within``
    included); no ``set_training`` or ``recompile``, which lowering a swap does.
    """
    return attrs.evolve(pipeline(*_steps(target, options)), name=f"full_swap({target.value})")


def _steps(target: Mode, stated: Options) -> tuple[Pass, ...]:
    swaps = tuple(_swap_kind(kind, target, stated) for kind in KINDS)
    if target is Mode.EVAL:
        checked = _check("warn_nondeterministic", warning_passes.warn_nondeterministic, stated)
    else:
        checked = _check("warn_unread_state", warning_passes.warn_unread_state, stated)
    first = (
        _preflight(target, stated),
        _check(f"warn_minority({target.value})", warning_passes.warn_minority, target, stated),
    )
    return (*first, *swaps, checked, _warn_training_branches(target, stated))


def swap_pipeline(
    mode: Mode | str,
    *,
    attention_dropout: float | None = None,
    dropout: Mapping[str, float] | None = None,
    keep: Sequence[str] = (),
) -> Pass:
    """Return the pass that swaps every site of a ``GraphModule`` to ``mode``, sets its ``training`` and recompiles."""
    passes = swap_passes(mode, attention_dropout=attention_dropout, dropout=dropout, keep=keep)
    return pipeline(*passes, set_training(mode), recompile)
