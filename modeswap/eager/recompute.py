"""Buffer updates that eager makes again in backward, where ``torch.utils.checkpoint`` recomputes a region.

Eager under ``torch.utils.checkpoint`` (the function, ``checkpoint_sequential``,
torchvision DenseNet's ``memory_efficient=True``, transformers'
``gradient_checkpointing_enable()``) runs a region's forward a second time in
backward, to rebuild the activations it did not keep. A batch norm in train mode
there updates its running stats in the forward and again in the recompute:
``num_batches_tracked`` +2 a step, the batch statistics averaged in twice.
``torch.export`` traces the forward once, and its train graph updates them once,
as eager does without checkpointing. The graph keeps no trace of a non-reentrant
checkpoint, so only a backward of the eager model tells: :func:`recomputed_updates`
runs one on fake tensors and counts the writes to each buffer.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import re
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch
import torch.utils.checkpoint
from torch.export import ExportedProgram

from modeswap.fx.graphs import get_argument, graph_modules
from modeswap.fx.torch_private import (
    FakeTensorMode,
    OpOverload,
    TorchDispatchMode,
    backward_hooks,
    op_schema,
    pytree,
    set_backward_hooks,
    storage_id,
)
from modeswap.records.errors import RecomputedUpdateWarning

#: Ops that update ``running_mean`` and ``running_var`` in place, though their schema does not mark
#: them written, with the argument that says whether they do (None: always). ``batch_norm`` and
#: ``instance_norm`` are what a training-IR graph holds; the others, what eager dispatches to.
UNMARKED_WRITES: dict[str, str | None] = {
    "aten::batch_norm": "training",
    "aten::instance_norm": "use_input_stats",
    "aten::_batch_norm_impl_index": "training",
    "aten::native_batch_norm": "training",
    "aten::cudnn_batch_norm": "training",
    "aten::miopen_batch_norm": "training",
    "aten::batch_norm_update_stats": None,
    "aten::batch_norm_gather_stats": None,
    "aten::batch_norm_gather_stats_with_counts": None,
}


@attrs.frozen
class RecomputedUpdate:
    """A module whose buffers eager updates again in backward, and how often a step each side updates them.

    ``module_path`` is where it is (``""`` for the root), ``module_type`` its
    class name, ``buffers`` the names of the buffers updated again; ``eager``
    counts the updates of one forward and backward in eager, ``exported`` those
    of the forward alone, which the export traces.
    """

    module_path: str
    module_type: str
    buffers: tuple[str, ...]
    eager: int
    exported: int


def recomputed_updates(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any] | None = None,
    *,
    program: ExportedProgram | None = None,
) -> tuple[RecomputedUpdate, ...]:
    """Return the modules of ``model`` whose buffers eager updates again in backward, in the modes it is in now.

    ``model`` runs one forward on ``args`` and ``kwargs``, and one backward from
    its outputs that require grad, on fake tensors: no arithmetic and no memory
    for activations, but about the Python cost of one more export trace. When
    ``program`` (the export of ``model`` in the modes it is in) updates nothing
    in place, nothing runs. ``model`` is left as it was: its parameters, their
    gradients, its buffers and tensor attributes, its modes and hooks, the CPU
    random state. Its hooks run, on fake tensors, as they do when
    ``torch.export`` traces it. Raises what the model raises on fake tensors.

    >>> found = recomputed_updates(model.train(), (x,), program=programs[Mode.TRAIN])
    >>> [u.module_path for u in found]
    ['features.denseblock1.denselayer1.norm1']
    """
    names = [name for name, _ in model.named_buffers()]  # each buffer once, under the name export gives it
    if not names or (program is not None and not _updates_in_place(program)):
        return ()
    forward, backward = _fake_step(model, args, dict(kwargs or {}), names)
    modules: dict[str, list[str]] = {}
    for name in names:
        if backward[name]:
            modules.setdefault(name.rpartition(".")[0], []).append(name)
    return tuple(
        RecomputedUpdate(
            module_path=path,
            module_type=type(model.get_submodule(path)).__name__,
            buffers=tuple(name.rpartition(".")[2] for name in written),
            eager=max(forward[name] + backward[name] for name in written),
            exported=max(forward[name] for name in written),
        )
        for path, written in modules.items()
    )


def warn_recomputed(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any] | None = None,
    *,
    program: ExportedProgram | None = None,
    stacklevel: int = 1,
) -> tuple[RecomputedUpdate, ...]:
    """Return :func:`recomputed_updates`, after a :class:`RecomputedUpdateWarning` that names them, if any.

    When ``model`` cannot run on fake tensors, the warning says that nothing
    could be checked, and nothing is returned. ``stacklevel=1`` points the
    warning at the line that calls this function, 2 at its caller's line, and so on.
    """
    try:
        found = recomputed_updates(model, args, kwargs, program=program)
    except Exception as error:
        msg = (
            "modeswap could not run the model's forward and backward on fake tensors to see whether "
            f"torch.utils.checkpoint recomputes a module that updates buffers ({type(error).__name__}: "
            f"{_first_line(error)}). If a checkpointed region holds one (a batch norm in train mode), eager "
            "updates its buffers again when backward recomputes the region, and the export does not"
        )
        warnings.warn(msg, RecomputedUpdateWarning, stacklevel=stacklevel + 1)
        return ()
    if found:
        warnings.warn(recomputed_message(found), RecomputedUpdateWarning, stacklevel=stacklevel + 1)
    return found


def recomputed_message(found: Sequence[RecomputedUpdate]) -> str:
    """Return the warning that names the modules of ``found``, says what differs and what to do."""
    groups: dict[str, list[str]] = {}
    for u in found:
        what = (
            f"{u.module_type}: {', '.join(u.buffers)} updated {_times(u.eager)} a step in eager, "
            f"{_times(u.exported)} in the export"
        )
        groups.setdefault(what, []).append(u.module_path)
    listed = "; ".join(f"{_shapes(paths)} ({what})" for what, paths in groups.items())
    return (
        f"eager recomputes {len(found)} module(s) in backward, where torch.utils.checkpoint reruns the "
        f"regions it checkpoints, and they update their buffers again there: {listed}. The export traces the "
        "forward once and updates them as eager does without checkpointing, so its buffers (a batch norm's "
        "running stats) part from eager's at the first step. Move these modules out of the checkpointed "
        "regions (torchvision's DenseNet: memory_efficient=False), or accept the difference: the export keeps "
        "the buffers that eager keeps without checkpointing."
    )


#: Where ``torch.utils.checkpoint.checkpoint`` checkpoints a region, by the module global it calls: the
#: reentrant implementation, and the non-reentrant one under each name a torch release gives it.
_ENTRIES = (
    "CheckpointFunction",
    "_checkpoint_without_reentrant_generator",
    "_checkpoint_without_reentrant_generator_impl",
)


@contextlib.contextmanager
def checkpoints_entered() -> Iterator[list[str]]:
    """Within the block, note each region ``torch.utils.checkpoint`` checkpoints; yield the list of notes.

    The one trace of a checkpoint that costs nothing: a non-strict export runs
    the model's Python, ``checkpoint`` and ``checkpoint_sequential`` included,
    and they reach torch's implementations through the module's globals, which
    are wrapped for the block (process-wide, as export itself is not
    thread-safe). Where this torch's checkpoint escapes the wrapping (a
    release that renamed them), a note says so: then only
    :func:`recomputed_updates` can tell.
    """
    notes: list[str] = []
    if not _watchable():
        notes.append("this torch's checkpoint cannot be watched")
        yield notes
        return
    with _wrapped(notes):
        yield notes


#: The notes of every block of :func:`_wrapped` open now, in any thread, and torch's entries while wrapped.
_OPEN: list[list[str]] = []
_HELD: dict[str, Any] = {}
_WATCHING = threading.Lock()


@contextlib.contextmanager
def _wrapped(notes: list[str]) -> Iterator[None]:
    """Within the block, torch's checkpoint entries note their calls in ``notes``, and in any other block open.

    The first block to open wraps them, the last to close puts torch's back,
    whatever the order blocks of several threads open and close in.
    """
    with _WATCHING:
        if not _OPEN:
            module = torch.utils.checkpoint
            _HELD.update({name: getattr(module, name) for name in _ENTRIES if hasattr(module, name)})
            for name, entry in _HELD.items():
                setattr(module, name, _noting(name, entry))
        _OPEN.append(notes)
    try:
        yield
    finally:
        with _WATCHING:
            _OPEN[:] = [other for other in _OPEN if other is not notes]
            if not _OPEN:
                for name, entry in _HELD.items():
                    setattr(torch.utils.checkpoint, name, entry)
                _HELD.clear()


def _noting(name: str, entry: Any) -> Any:
    """``entry``, one of torch's checkpoint implementations, noting each call in the notes of every open block."""

    def note() -> None:
        for notes in list(_OPEN):
            notes.append(name)

    if isinstance(entry, type):  # an autograd.Function: its apply is what checkpoint calls

        class Apply:
            @staticmethod
            def apply(*args: Any) -> Any:
                note()
                return entry.apply(*args)

        return Apply

    def call(*args: Any, **kwargs: Any) -> Any:
        note()
        return entry(*args, **kwargs)

    return call


@functools.cache
def _watchable() -> bool:
    """Whether :func:`_wrapped` sees both kinds of checkpoint on this torch: a probe, once per process."""
    x = torch.ones(1, requires_grad=True)
    seen = []
    for reentrant in (True, False):
        notes: list[str] = []
        with _wrapped(notes), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.utils.checkpoint.checkpoint(torch.sin, x, use_reentrant=reentrant)
        seen.append(bool(notes))
    return all(seen)


#: The numbers in a module path: ``denseblock1.denselayer3.norm1`` has three.
_NUMBERS = re.compile(r"\d+")


def _shapes(paths: Sequence[str]) -> str:
    """``paths``, quoted; those alike but for their numbers as one pattern, ``*`` where the numbers vary.

    ``'features.denseblock*.denselayer*.norm1' (58 modules)``
    """
    shapes: dict[tuple[str, ...], list[str]] = {}
    for path in paths:
        shapes.setdefault(tuple(_NUMBERS.split(path)), []).append(path)
    listed = []
    for words, found in shapes.items():
        numbers = list(zip(*(_NUMBERS.findall(path) for path in found), strict=True))
        held = [n[0] if len(set(n)) == 1 else "*" for n in numbers]
        pattern = "".join(w + n for w, n in zip(words, [*held, ""], strict=True))
        listed.append(f"{pattern!r} ({len(found)} modules)" if len(found) > 1 else repr(found[0]))
    return ", ".join(listed)


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def _first_line(error: Exception) -> str:
    line = str(error).strip().partition("\n")[0]
    return line if len(line) <= 200 else line[:197] + "..."


def _updates_in_place(program: ExportedProgram) -> bool:
    """Whether ``program`` updates a buffer, or holds an op that may write something in place."""
    if program.graph_signature.buffers_to_mutate:
        return True  # a functional graph, after run_decompositions: its updates are outputs
    return any(_may_write(node) for _, gm in graph_modules(program.graph_module) for node in gm.graph.nodes)


def _may_write(node: torch.fx.Node) -> bool:
    if not isinstance(node.target, OpOverload):
        return False
    schema = op_schema(node.target)
    if schema.name in UNMARKED_WRITES:
        flag = UNMARKED_WRITES[schema.name]
        return flag is None or get_argument(node, flag) is not False  # an eval batch norm writes nothing
    return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _fake_step(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], buffers: Sequence[str]
) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """The updates of each of ``buffers`` in a forward of ``model``, and in its backward, run on fake tensors."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    made: dict[int, torch.Tensor] = {}  # one fake per tensor: functional_call wants tied names tied
    for _, t in _named_tensors(model):
        if id(t) not in made:
            # A parameter's fake is a leaf of its own: backward fills its .grad, not the model's.
            real = t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.nn.Parameter) else t
            made[id(t)] = fake.from_tensor(real)
    state = {f"model.{name}": made[id(t)] for name, t in _named_tensors(model)}
    storages = {storage_id(state[f"model.{name}"].untyped_storage()): name for name in buffers}
    fake_args, fake_kwargs = pytree.tree_map_only(torch.Tensor, fake.from_tensor, (args, kwargs))
    # Fake ops draw nothing, but checkpoint reads and sets the random state around its recompute.
    with (
        torch.random.fork_rng(devices=[]),
        _without_backward_hooks(model),
        warnings.catch_warnings(),
        fake,
        torch.enable_grad(),
    ):
        warnings.simplefilter("ignore")  # the model's own warnings: its export has shown them
        # functional_call puts the fake tensors in for one call, and the recompute runs in backward:
        # the call makes both the forward and the backward.
        return torch.func.functional_call(  # type: ignore[no-any-return]
            _Step(model, storages), state, (fake_args, fake_kwargs), tie_weights=True, strict=False
        )


@contextlib.contextmanager
def _without_backward_hooks(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the modules of ``model`` have no backward hooks: an export never runs them either.

    They are nn.Module's private tables; the hooks are put back as they were.
    """
    held = [(m, *backward_hooks(m)) for m in model.modules()]
    for module, _, _ in held:
        set_backward_hooks(module, collections.OrderedDict(), collections.OrderedDict())
    try:
        yield
    finally:
        for module, hooks, pre_hooks in held:
            set_backward_hooks(module, hooks, pre_hooks)


def _named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter, buffer and plain tensor attribute of ``model``, under every name."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)
    # A forward that writes a plain tensor attribute in place writes the real one under export; not here.
    for path, module in model.named_modules(remove_duplicate=False):
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                yield f"{path}.{name}" if path else name, value


class _Step(torch.nn.Module):
    """One forward and backward of ``model``, counting the updates of ``storages`` in each."""

    def __init__(self, model: torch.nn.Module, storages: Mapping[int, str]) -> None:
        super().__init__()
        self.model = model
        self.storages = storages

    def forward(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[collections.Counter[str], collections.Counter[str]]:
        with _Updates(self.storages) as forward:
            outputs = self.model(*args, **kwargs)
        leaves = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.requires_grad]
        with _Updates(self.storages) as backward:
            if leaves:
                torch.autograd.backward(leaves, [torch.ones_like(t) for t in leaves])
        return forward.counts, backward.counts


class _Updates(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves it untyped
    """Counts the ops that write each of ``storages`` (by ``storage_id``), under the name of its buffer.

    A version counter would not do: ``native_batch_norm`` updates the running
    stats without bumping theirs. The op's schema says which arguments it writes,
    and :data:`UNMARKED_WRITES` what the schema does not say.
    """

    def __init__(self, storages: Mapping[int, str]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.storages = storages
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        schema = op_schema(func)
        values = {a.name: args[i] if i < len(args) else kwargs.get(a.name) for i, a in enumerate(schema.arguments)}
        written = [values[a.name] for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        if schema.name in UNMARKED_WRITES:
            flag = UNMARKED_WRITES[schema.name]
            if flag is None or values.get(flag):
                written += [values.get("running_mean"), values.get("running_var")]
        names = {
            self.storages.get(storage_id(t.untyped_storage()))
            for t in pytree.tree_leaves(written)
            if isinstance(t, torch.Tensor) and t.layout is torch.strided
        }
        self.counts.update(name for name in names if name is not None)
        return func(*args, **kwargs)
