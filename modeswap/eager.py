"""From the eager model, when the graph alone is not enough: :func:`check` and :func:`capture`.

A swap rewrites one mode's graph; what that mode's trace never ran (an
``if self.training:`` branch, drop path in an eval export, a training dropout
written as 0.0) it cannot bring back. Whoever still holds the eager model can
export it once per mode: :func:`check` holds each swap against the other
mode's own export and says where they differ, and :func:`capture` builds a
module that runs each mode's own export on one set of weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule

from modeswap.compare import Found, compare
from modeswap.errors import InvalidOptionError, ModeswapError, ModeswapWarning
from modeswap.exported import is_exported
from modeswap.fidelity import Cause, Difference, Direction, Fidelity
from modeswap.modal import Layout, ModalModule, modal_of, set_flags
from modeswap.modes import Mode
from modeswap.recompute import checkpoints_entered, warn_recomputed
from modeswap.running import second_opinion
from modeswap.swapping import swap

#: The seeds of the second opinion: each swap and the other mode's export run under each, forward and backward.
SEEDS = (0, 1)


def export_modes(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    strict: bool = False,
) -> dict[Mode, ExportedProgram]:
    """Return ``torch.export.export`` of ``model`` in train mode and in eval mode.

    Every module's ``training`` flag is set back as it was, whatever happens.
    """
    programs, *_ = _export_modes(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    return programs


def _export_modes(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any] | None,
    *,
    dynamic_shapes: Any,
    strict: bool,
) -> tuple[dict[Mode, ExportedProgram], dict[Mode, dict[str, bool]], dict[Mode, frozenset[str]] | None]:
    """:func:`export_modes`, each module's flag in each export, and the modules each export called.

    A flag is what ``model.train(mode)`` left it at. The calls are watched with
    forward pre-hooks, which a strict export would trace: then they are ``None``.
    """
    _require_eager(model)
    with _modes_restored(model):
        programs: dict[Mode, ExportedProgram] = {}
        flags: dict[Mode, dict[str, bool]] = {}
        called: dict[Mode, frozenset[str]] = {}
        checkpointed_in: dict[Mode, bool] = {}
        for mode in Mode:
            model.train(mode is Mode.TRAIN)
            flags[mode] = {path: module.training for path, module in model.named_modules()}
            try:
                with checkpoints_entered() as checkpointed, _calls(model, watched=not strict) as calls:
                    programs[mode] = torch.export.export(
                        model, args, dict(kwargs or {}), dynamic_shapes=dynamic_shapes, strict=strict
                    )
            except Exception as error:
                error.add_note(f"modeswap: this happened while exporting the model in {mode.value} mode")
                raise
            called[mode] = frozenset(calls)
            checkpointed_in[mode] = bool(checkpointed)
    if checkpointed_in[Mode.TRAIN]:
        # Eager recomputes checkpointed regions in backward, the export never: say what that updates, with the
        # modes the model's modules are in (a batch norm the user froze updates nothing), or else train's.
        with _modes_restored(model):
            if not model.training:
                model.train()
            warn_recomputed(
                model, args, kwargs, program=programs[Mode.TRAIN], stacklevel=3
            )  # the caller of check or capture
    return programs, flags, None if strict else called


@contextmanager
def _calls(model: torch.nn.Module, *, watched: bool) -> Iterator[set[str]]:
    """Collect the path of each module of ``model`` whose forward is called in the block, if ``watched``."""
    paths: set[str] = set()
    if not watched:
        yield paths
        return

    def hook(path: str) -> Any:
        return lambda module, inputs: paths.add(path)

    handles = [
        module.register_forward_pre_hook(hook(path)) for path, module in model.named_modules(remove_duplicate=False)
    ]
    try:
        yield paths
    finally:
        for handle in handles:
            handle.remove()


def _require_eager(model: object) -> None:
    if is_exported(model):
        msg = (
            "check and capture take the eager model, which they export once per mode; this is an exported "
            "graph, whose other mode they cannot see. For a graph alone use modeswap.swap or "
            "modeswap.allow_train_eval"
        )
        raise InvalidOptionError(msg)
    if not isinstance(model, torch.nn.Module):
        msg = f"check and capture take an eager torch.nn.Module, not {type(model).__name__}"
        raise InvalidOptionError(msg)


@contextmanager
def _modes_restored(model: torch.nn.Module) -> Iterator[None]:
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training  # not train(): an override would run again


def check(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    strict: bool = False,
    attention_dropout: float | None = None,
    dropout: Mapping[str, float] | None = None,
    keep: Sequence[str] = (),
    seeds: Sequence[int] = SEEDS,
) -> Fidelity:
    """Return whether swapping an export of ``model`` is exact in each direction, and where it is not.

    ``model`` is exported in each mode (``args``, ``kwargs``, ``dynamic_shapes``
    and ``strict`` go to ``torch.export.export``); each export is swapped to the
    other mode, with ``attention_dropout``, ``dropout`` and ``keep`` as
    :func:`modeswap.swap` takes them, and compared with the other mode's own
    export: the ops, their order, their literal arguments and the outputs, then,
    as a second opinion, the outputs, buffers and gradients of a forward and a
    backward under each of ``seeds`` (under the first only, for graphs that draw
    no random numbers; ``seeds=()`` skips it: on a large model it costs more
    than the exports). ``model`` is left as it was: its modes, its parameters,
    their gradients and its buffers.

    >>> fidelity = modeswap.check(model, (x,))
    >>> print(fidelity)
    """
    programs, *_ = _export_modes(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    return fidelity_of(programs, attention_dropout=attention_dropout, dropout=dropout, keep=keep, seeds=seeds)


def capture(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    strict: bool = False,
) -> ModalModule:
    """Return a module that behaves as ``model`` does in each mode, with ``.train()`` and ``.eval()`` as eager's.

    ``model`` is exported once per mode (``args``, ``kwargs``,
    ``dynamic_shapes`` and ``strict`` go to ``torch.export.export``); the new
    module runs the export of its current mode on one copy of the model's
    parameters and buffers, under the model's names. It starts in the mode
    ``model`` is in, each submodule's included (a batch norm frozen with
    ``model.bn.eval()`` stays frozen), and its ``.train()`` and ``.eval()`` set
    each submodule as the model's do. ``model`` is left as it was.

    >>> modal = modeswap.capture(model, (x,))
    >>> logits = modal.eval()(x)
    """
    _require_eager(model)
    flags = {path: module.training for path, module in model.named_modules()}
    programs, exported, called = _export_modes(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    modal = modal_of(programs, training=model.training, layout=Layout.of(model, exported, called))
    return set_flags(modal, flags)


def fidelity_of(
    programs: Mapping[Mode, ExportedProgram],
    *,
    attention_dropout: float | None = None,
    dropout: Mapping[str, float] | None = None,
    keep: Sequence[str] = (),
    seeds: Sequence[int] = SEEDS,
) -> Fidelity:
    """Return the :class:`Fidelity` of swapping each of ``programs`` (one per mode) to the other mode.

    The second opinion runs on the programs' example inputs under ``seeds``.
    """
    # The training values stated are for the swap to train; what to keep, for both.
    options: dict[Mode, dict[str, Any]] = {
        Mode.TRAIN: {"attention_dropout": attention_dropout, "dropout": dropout, "keep": keep},
        Mode.EVAL: {"keep": keep},
    }
    # One module per program: the swaps leave theirs as it was, and the second opinion runs on copies.
    modules = {mode: program.module() for mode, program in programs.items()}
    inputs = programs[Mode.TRAIN].example_inputs
    found = {mode: _direction(modules, mode, options[mode], inputs, tuple(seeds)) for mode in Mode}
    exact = {mode: not found[mode] for mode in Mode}
    directions = {
        target: Direction(
            source=target.other,
            target=target,
            differences=tuple(_explain(found[target], target, other_exact=exact[target.other])),
        )
        for target in Mode
    }
    return Fidelity(to_eval=directions[Mode.EVAL], to_train=directions[Mode.TRAIN])


def _direction(
    modules: Mapping[Mode, GraphModule],
    target: Mode,
    options: dict[str, Any],
    inputs: tuple[Any, Any] | None,
    seeds: tuple[int, ...],
) -> list[Found | str]:
    """What differs between the swap of the other mode's module to ``target`` and ``target``'s own module."""
    source = target.other
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ModeswapWarning)  # the report says it, with the eager model's values
            swapped = swap(modules[source], target, share_weights=True, **options).module
    except ModeswapError as error:
        return [str(error)]
    expected = modules[target]
    found: list[Found | str] = list(compare(expected, swapped, target))
    if not found and inputs is not None and seeds:
        found += second_opinion(expected, swapped, inputs, seeds)
    return found


def _explain(found: list[Found | str], target: Mode, *, other_exact: bool) -> Iterator[Difference]:
    """One :class:`Difference` per module and cause, in the order they were found."""
    rows: dict[tuple[str, Cause], list[Difference]] = {}
    for difference in _differences(found, target, other_exact=other_exact):
        rows.setdefault((difference.module_path, difference.cause), []).append(difference)
    for (path, cause), group in rows.items():
        nodes = tuple(dict.fromkeys(n for d in group for n in d.nodes))
        yield Difference(path, nodes, "; ".join(d.what for d in group), cause, group[0].fix)


def _differences(found: list[Found | str], target: Mode, *, other_exact: bool) -> Iterator[Difference]:
    pinned = {f.module_path for f in found if isinstance(f, Found) and f.flag}
    for f in found:
        if isinstance(f, str):
            yield Difference("", (), f, Cause.REFUSED, _capture(target, other_exact))
            continue
        cause = _cause(f, pinned)
        if cause is Cause.PINNED:
            fix = f"keep=({f.module_path!r},) leaves it as the model holds it"
        elif cause in (Cause.DROPOUT_UNKNOWN, Cause.ATTENTION_DROPOUT_UNKNOWN):
            assert f.values is not None
            fix = f"dropout={{{f.module_path!r}: {f.values[0]!r}}} states the training value"
        elif cause is Cause.DROP_PATH:
            fix = "export in train mode (its swap to eval is exact), or modeswap.capture(model, args)"
        else:
            fix = _capture(target, other_exact)
        yield Difference(f.module_path, f.nodes, _what(f, target), cause, fix)


def _cause(f: Found, pinned: set[str]) -> Cause:
    if f.side == "values":
        return Cause.VALUES
    if f.module_path in pinned and f.module_path:
        return Cause.PINNED
    if f.drop_path:
        return Cause.DROP_PATH
    if f.side == "both" and f.argument is not None and f.values is not None:
        have = f.values[1]
        if f.site_kind == "attention" and f.argument == "dropout_p" and have == 0.0:
            return Cause.ATTENTION_DROPOUT_UNKNOWN
        if f.site_kind == "dropout" and f.argument == "p" and have == 0.0:
            return Cause.DROPOUT_UNKNOWN
    return Cause.TRAINING_BRANCH


def _what(f: Found, target: Mode) -> str:
    own = f"the {target.value} export"
    if f.side in ("expected", "actual"):
        where = own if f.side == "expected" else "the swap"
        other = "the swap" if f.side == "expected" else own
        updates = f", updating {', '.join(dict.fromkeys(f.writes))}" if f.writes else ""
        return f"{where} runs {', '.join(f.ops)}{updates}; {other} does not"
    assert f.values is not None
    want, have = f.values
    if f.argument == "outputs":
        return f"{own} returns {_outputs(want)}, the swap {_outputs(have)}"
    if f.side == "values":
        return f"{f.argument} differs from {own} when both run under seed(s) {', '.join(map(str, want))}"
    return f"{f.ops[0]} {f.argument}={_short(have)} in the swap, {_short(want)} in {own}"


def _outputs(value: Any) -> str:
    leaves = torch.utils._pytree.tree_leaves(value)
    kind = "" if isinstance(value, str) else f"a {type(value).__name__} of "
    return f"{kind}{len(leaves)} output(s) ({_short(', '.join(map(str, leaves)))})"


def _short(value: Any) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _capture(target: Mode, other_exact: bool) -> str:
    fix = "modeswap.capture(model, args) runs each mode's own export"
    if other_exact:
        fix += f", or export in {target.value} mode (its swap to {target.other.value} is exact)"
    return fix
