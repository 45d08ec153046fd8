"""From the eager model, when the graph alone is not enough: :func:`check` and :func:`capture`.

A swap rewrites one mode's graph; what that mode's trace never ran (an
``if self.training:`` branch, drop path in an eval export, a training dropout
written as 0.0) it cannot bring back. Whoever still holds the eager model can
export it once per mode: :func:`check` holds each swap against the other
mode's own export and says where they differ, and :func:`capture` builds a
module that runs each mode's own export on one set of weights.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule

from modeswap.eager.advice import explain, sited_paths, verified
from modeswap.eager.compare import Found, blind_spots, compare
from modeswap.eager.fidelity import Direction, Fidelity
from modeswap.eager.recompute import checkpoints_entered, warn_recomputed
from modeswap.eager.running import second_opinion
from modeswap.forms.modal import Layout, ModalModule, modal_of, set_flags
from modeswap.forms.swap import Weights, swapped
from modeswap.fx.exported import is_exported
from modeswap.records.errors import InvalidOptionError, ModeswapError, ModeswapWarning
from modeswap.records.modes import Mode
from modeswap.records.options import Options, matches

#: The seeds of the second opinion: where it runs, each swap and the other mode's export run forward and backward
#: under the first, and under the others where the two graphs draw random numbers differently.
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
    return _export_modes(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict).programs


@attrs.frozen
class _Exports:
    """The model's export in each mode, each module's flag in each, the modules each called, the modules mixed.

    ``called`` is ``None`` for a strict export, which would trace the hooks
    that watch the calls. ``mixed`` lists the outermost modules whose flag,
    as found, differed from what the model's own ``train()`` gives them.
    """

    programs: dict[Mode, ExportedProgram]
    flags: dict[Mode, dict[str, bool]]
    called: dict[Mode, frozenset[str]] | None
    mixed: tuple[str, ...] = ()


def _export_modes(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any] | None,
    *,
    dynamic_shapes: Any,
    strict: bool,
    as_found: bool = False,
) -> _Exports:
    """:func:`export_modes`, with what ``capture`` and ``check`` need to know besides.

    A flag is what ``model.train(mode)`` left it at, except, ``as_found``, in
    the model's own mode: then each module is exported in the mode it was found in.
    """
    _require_eager(model)
    found = {path: module.training for path, module in model.named_modules()}
    current = Mode.TRAIN if model.training else Mode.EVAL
    mixed: tuple[str, ...] = ()
    with _modes_restored(model):
        programs: dict[Mode, ExportedProgram] = {}
        flags: dict[Mode, dict[str, bool]] = {}
        called: dict[Mode, frozenset[str]] = {}
        checkpointed_in: dict[Mode, bool] = {}
        for mode in Mode:
            model.train(mode is Mode.TRAIN)
            flags[mode] = {path: module.training for path, module in model.named_modules()}
            if as_found and mode is current and flags[mode] != found:
                mixed = _outermost(path for path, training in found.items() if training != flags[mode][path])
                for path, module in model.named_modules():
                    module.training = found[path]
                flags[mode] = found
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
    return _Exports(programs, flags, None if strict else called, mixed)


def _outermost(paths: Iterable[str]) -> tuple[str, ...]:
    """``paths`` without those inside another of them."""
    listed = list(paths)
    return tuple(p for p in listed if not any(p != q and (not q or p.startswith(q + ".")) for q in listed))


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
    if (wrapper := _wrapper(model)) is not None:
        msg = (
            f"check and capture take the model before {wrapper} wraps it: torch.export cannot trace the "
            f"wrapper's hooks or sharded parameters. Capture the model, then wrap the modal module as you "
            f"would the model: {wrapper}(modeswap.capture(model, args))"
        )
        raise InvalidOptionError(msg)


def _wrapper(model: torch.nn.Module) -> str | None:
    """The distributed wrapper around ``model`` or any of its modules (DDP, FSDP2), or ``None``."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return "DistributedDataParallel"
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded
    if fsdp is not None and any(isinstance(module, fsdp.FSDPModule) for module in model.modules()):
        return "fully_shard"
    return None


@contextmanager
def _random_state_kept() -> Iterator[None]:
    """Give back the global random state (CPU, and each CUDA device once CUDA is initialised) as it was."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []  # type: ignore[no-untyped-call]
    with torch.random.fork_rng(devices=devices):
        yield


def _seeds(seeds: object) -> tuple[int, ...]:
    """``seeds`` as a tuple of ints, or an error that says what ``seeds=`` takes."""
    if isinstance(seeds, Iterable) and not isinstance(seeds, str | bytes):
        listed = tuple(seeds)
        if all(isinstance(s, int) and not isinstance(s, bool) for s in listed):
            return listed
    msg = (
        f"seeds takes a sequence of ints, the seeds the second opinion runs under (seeds=(0, 1); "
        f"seeds=() skips it), got {seeds!r}"
    )
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        msg += f": write seeds=({seeds},) for one seed, or seeds=range({seeds}) for {seeds}"
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
    as a second opinion where the comparison cannot vouch for the values (an
    op writes in place a tensor that an eval dropout returned as it is), the
    outputs, buffers and gradients of a forward and a backward under the first
    of ``seeds`` (under the others too where the graphs draw random numbers
    differently; ``seeds=()`` never runs it). A model whose modules are in
    mixed modes is exported, in its own mode, as it is (``Fidelity.mixed``).
    ``model`` is left as it was found: its parameters and buffers, their
    gradients, every module's mode, its hooks, and the global random state.

    Raises :class:`~modeswap.InvalidOptionError` for an option a swap would
    refuse (a pattern that matches no site, a ``p`` that contradicts the
    graph), before exporting where it can tell.

    >>> model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.1))
    >>> fidelity = modeswap.check(model, (torch.randn(8, 4),))
    >>> print(fidelity)
    train -> eval: exact
    eval -> train: exact
    >>> _ = model[1].eval()  # a batch norm frozen while fine-tuning
    >>> print(modeswap.check(model, (torch.randn(8, 4),)))
    check found '1' in the other mode than the model, and exported the model's mode as it found it:
    the swaps differ there unless `keep=` pins them
    train -> eval: exact
    eval -> train: 1 difference
      1: site does not follow the mode
        batch_norm training=True in the swap, False in the train export; the swap runs add_.Tensor,
        updating 1.num_batches_tracked; the train export does not
        fix: `keep=('1',)` leaves it as the model holds it
    suggested: `keep=('1',)`
    """
    _require_eager(model)
    # Options are checked before minutes of exporting; patterns, once there is a graph to match them in.
    options = Options.of(Mode.TRAIN, dropout=dropout, attention_dropout=attention_dropout, keep=keep)
    seeds = _seeds(seeds)
    with _random_state_kept():
        exports = _export_modes(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict, as_found=True)
        return fidelity_of(exports.programs, options, seeds=seeds, mixed=exports.mixed)


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
    with _random_state_kept():
        exports = _export_modes(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    modal = modal_of(exports.programs, training=model.training, layout=Layout.of(model, exports.flags, exports.called))
    return set_flags(modal, flags)


def fidelity_of(
    programs: Mapping[Mode, ExportedProgram],
    options: Options = Options(),
    *,
    seeds: Sequence[int] = SEEDS,
    mixed: Sequence[str] = (),
) -> Fidelity:
    """Return the :class:`Fidelity` of swapping each of ``programs`` (one per mode) to the other mode.

    ``options`` are the swaps' (checked for a swap to train). The second
    opinion runs on the programs' example inputs under ``seeds``; ``mixed``
    names the modules that were exported in the other mode than the model's.
    """
    # One module per program: the swaps leave theirs as it was, and the second opinion runs on copies.
    modules = {mode: program.module() for mode, program in programs.items()}
    keep = options.keep
    # The training values stated are for the swap to train; what to keep, for both (where it has a site).
    per_mode = {
        Mode.TRAIN: attrs.evolve(options, keep=_kept(keep, modules, Mode.EVAL)),
        Mode.EVAL: Options(keep=_kept(keep, modules, Mode.TRAIN)),
    }
    inputs = programs[Mode.TRAIN].example_inputs
    compared = {mode: _direction(modules, mode, per_mode[mode], inputs, _seeds(seeds)) for mode in Mode}
    found = {mode: compared[mode][0] for mode in Mode}
    # The second opinion's word on what it could not run is no difference, but the report says it.
    unrun = {
        mode: "; ".join(str(f.argument) for f in found[mode] if isinstance(f, Found) and f.side == "unrun")
        for mode in Mode
    }
    found = {mode: [f for f in found[mode] if not (isinstance(f, Found) and f.side == "unrun")] for mode in Mode}
    swapped = {mode: compared[mode][1] for mode in Mode}
    rows = verified(
        explain(found, modules, swapped, keep),
        lambda target, advised: _left(modules, target, per_mode[target], advised),
    )
    directions = {
        target: Direction(source=target.other, target=target, differences=rows[target], unrun=unrun[target])
        for target in Mode
    }
    return Fidelity(to_eval=directions[Mode.EVAL], to_train=directions[Mode.TRAIN], mixed=tuple(mixed))


def _kept(keep: Sequence[str], modules: Mapping[Mode, GraphModule], source: Mode) -> tuple[str, ...]:
    """The patterns of ``keep`` that match a site of ``modules[source]``; an error for one that matches none of either.

    A module may hold a site in one export only (a dropout only eval runs):
    ``keep=`` pins it in the swap of that export.
    """
    paths = {mode: sited_paths(module) for mode, module in modules.items()}
    for pattern in keep:
        if not any(matches(pattern, path) for mode in Mode for path in paths[mode]):
            msg = (
                f"keep pattern {pattern!r} matches no site of either export; the modules that have one: "
                f"{', '.join(map(repr, sorted(paths[Mode.TRAIN] | paths[Mode.EVAL]))) or 'none'}"
            )
            raise InvalidOptionError(msg)
    return tuple(pattern for pattern in keep if any(matches(pattern, path) for path in paths[source]))


def _left(
    modules: Mapping[Mode, GraphModule], target: Mode, options: Options, advised: Options
) -> list[Found | str] | None:
    """What the swap to ``target`` with ``options`` and ``advised`` still differs in; ``None`` if it refuses them."""
    keep = (*options.keep, *_kept(advised.keep, modules, target.other))  # keep=: both directions, where it has a site
    if target is Mode.TRAIN:  # the training values advised win over those stated
        dropout = dict(options.dropout) | dict(advised.dropout)
        attention = options.attention_dropout if advised.attention_dropout is None else advised.attention_dropout
        merged = Options(tuple(dropout.items()), attention, keep)
    else:
        merged = Options(keep=keep)
    try:
        return _direction(modules, target, merged, None, ())[0]
    except InvalidOptionError:
        return None


def _direction(
    modules: Mapping[Mode, GraphModule],
    target: Mode,
    options: Options,
    inputs: tuple[Any, Any] | None,
    seeds: tuple[int, ...],
) -> tuple[list[Found | str], GraphModule | None]:
    """What differs between the swap of the other mode's module to ``target`` and ``target``'s own module.

    And the swap (``None``: it refused, and what differs is its message).
    """
    source = target.other
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ModeswapWarning)  # the report says it, with the eager model's values
            result, _ = swapped(modules[source], target, options, Weights(share_weights=True))
    except InvalidOptionError as error:
        error.add_note(f"modeswap: check met this swapping the {source.value} export to {target.value}")
        raise  # the options are wrong, not the model
    except ModeswapError as error:
        return [str(error)], None
    expected = modules[target]
    found: list[Found | str] = list(compare(expected, result, target))
    # Where the comparison vouches for every value, running the graphs could tell nothing more.
    if not found and inputs is not None and seeds and (blind_spots(expected) or blind_spots(result)):
        found += second_opinion(expected, result, inputs, seeds)
    return found, result
