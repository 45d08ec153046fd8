"""Eager PyTorch as the oracle: check a swapped graph against the eager model it came from."""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch.fx import GraphModule

from modeswap.eager.running import run_forward_backward
from modeswap.forms.swap import swap
from modeswap.fx.graphs import graph_modules
from modeswap.fx.torch_private import global_hook_tables, hook_tables, pytree
from modeswap.records.errors import ModeswapWarning
from modeswap.records.modes import Mode, Swap


@attrs.frozen(eq=False)
class Snapshot:
    """Everything a pure rewrite must leave as it was: code, nodes, node meta, tensors and their storage.

    Two snapshots are equal when all of it is bit for bit the same.
    """

    code: str
    nodes: tuple[tuple[str, str, str, str], ...]
    meta: tuple[tuple[str, str], ...]
    tensors: tuple[tuple[str, int, torch.Tensor], ...]  # name, data_ptr, a copy of the bytes

    @classmethod
    def of(cls, gm: GraphModule) -> Snapshot:
        """Record ``gm`` as it is now."""
        graphs = list(graph_modules(gm))
        nodes = tuple(
            (f"{path}.{n.name}", n.op, str(n.target), repr((n.args, n.kwargs)))
            for path, m in graphs
            for n in m.graph.nodes
        )
        meta = tuple((f"{path}.{n.name}", _meta_repr(n.meta)) for path, m in graphs for n in m.graph.nodes)
        tensors = tuple((name, t.data_ptr(), _raw(t)) for name, t in _all_tensors(gm))
        return cls(gm.code, nodes, meta, tensors)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Snapshot):
            return NotImplemented
        same_tensors = len(self.tensors) == len(other.tensors) and all(
            a[:2] == b[:2] and a[2].shape == b[2].shape and torch.equal(a[2], b[2])
            for a, b in zip(self.tensors, other.tensors, strict=True)
        )
        return (self.code, self.nodes, self.meta) == (other.code, other.nodes, other.meta) and same_tensors

    __hash__ = None  # type: ignore[assignment]


@attrs.frozen(eq=False)
class Observed:
    """What ``check`` and ``capture`` must leave as they found it in an eager model, and the global random state.

    Each parameter's and buffer's bytes and storage, each ``.grad`` (the
    object and its bytes), ``requires_grad``, every module's ``.training``, the
    hooks of every module and the global ones, the CPU and CUDA random states.
    """

    items: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, model: torch.nn.Module) -> Observed:
        """Record ``model`` and the global random state as they are now."""
        items: list[tuple[str, Any]] = []
        for name, t in _all_tensors(model):
            items.append((f"tensor {name}", (t.data_ptr(), _raw(t), t.requires_grad)))
        for name, p in model.named_parameters(remove_duplicate=False):
            grad = None if p.grad is None else (id(p.grad), p.grad.data_ptr(), _raw(p.grad))
            items.append((f"grad {name}", grad))
        for path, module in model.named_modules(remove_duplicate=False):
            items.append((f"training {path!r}", module.training))
            for attribute, hooks in hook_tables(module):
                items.append((f"{attribute} of {path!r}", tuple(hooks)))
        for attribute, hooks in global_hook_tables():
            items.append((f"torch.nn.modules.module.{attribute}", tuple(hooks)))
        items.append(("torch.get_rng_state()", torch.get_rng_state()))
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            items.append(("torch.cuda.get_rng_state_all()", tuple(torch.cuda.get_rng_state_all())))
        return cls(tuple(items))

    def changed(self, now: Observed) -> list[str]:
        """The names of what differs between this record and ``now`` (``[]``: nothing)."""
        before, after = dict(self.items), dict(now.items)
        return [name for name in {**before, **after} if not _same(before.get(name), after.get(name))]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def call_signature(gm: GraphModule) -> list[tuple[str, Any, Any]]:
    """The ``call_function`` nodes of ``gm`` in order, with their arguments, independent of node names.

    A node argument is written as what it stands for: ``("attr", target)`` for a
    ``get_attr``, ``("input", target)`` for a placeholder, ``("call", i)`` for the
    i-th call. Two graphs with equal signatures compute the same thing.
    """
    order = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "call_function")}

    def name(node: torch.fx.Node) -> tuple[str, Any]:
        if node.op == "call_function":
            return ("call", order[node])
        return ("attr" if node.op == "get_attr" else node.op, node.target)

    return [(str(n.target), torch.fx.node.map_arg(n.args, name), torch.fx.node.map_arg(n.kwargs, name)) for n in order]


def _meta_repr(meta: dict[str, Any]) -> str:
    return repr(sorted((k, repr(v)) for k, v in meta.items() if k not in ("val", "tensor_meta")))


def _all_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    named: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    for path, sub in module.named_modules():
        for key, value in vars(sub).items():
            if isinstance(value, torch.Tensor):
                named[f"{path}.{key}" if path else key] = value
    return sorted(named.items())


def assert_same_run(expected: dict[str, Any], actual: dict[str, Any], *, atol: float, rtol: float) -> None:
    """Assert two ``run_forward_backward`` results agree: outputs, buffers, gradients.

    A NaN agrees with a NaN in the same place: where the eager model computes
    one (a model trained into overflow), the swap is to compute it too.
    """
    for key in ("outputs", "input_grads"):
        assert len(expected[key]) == len(actual[key]), f"{key}: {len(expected[key])} != {len(actual[key])}"
        for i, (e, a) in enumerate(zip(expected[key], actual[key], strict=True)):
            _close(e, a, f"{key}[{i}]", atol, rtol)
    for key in ("buffers", "grads"):
        names, actual_names = sorted(expected[key]), sorted(actual[key])
        assert names == actual_names, f"{key} names differ: {names} vs {actual_names}"
        for name in expected[key]:
            _close(expected[key][name], actual[key][name], f"{key}[{name!r}]", atol, rtol)


def assert_runs_as(eager: torch.nn.Module, module: torch.nn.Module, args: tuple[Any, ...], *, seed: int = 0) -> None:
    """Assert that ``module`` runs as ``eager`` bit for bit: one forward and backward of each under ``seed``.

    Outputs, buffers after the forward, and parameter and input gradients must
    be equal (``atol=rtol=0``). Both modules run as they are, in their own mode.

    >>> assert_runs_as(model.eval(), modeswap.to_eval(gm), (x,))
    """
    expected = run_forward_backward(eager, args, seed=seed)
    assert_same_run(expected, run_forward_backward(module, args, seed=seed), atol=0.0, rtol=0.0)


def assert_same_state(
    expected: torch.nn.Module, actual: torch.nn.Module, *, atol: float = 0.0, rtol: float = 0.0
) -> None:
    """Assert that two modules' ``state_dict()`` have the same keys in the same order, and close values.

    By default the values must be equal; ``atol`` and ``rtol`` allow what
    ``torch.testing.assert_close`` allows. A failure names the entry.
    """
    want, got = expected.state_dict(), actual.state_dict()
    assert list(got) == list(want), f"state_dict keys differ: {list(got)} vs {list(want)}"
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=rtol, msg=functools.partial(_located, key))


def _close(expected: Any, actual: Any, what: str, atol: float, rtol: float) -> None:
    if expected is None or actual is None:
        assert expected is actual, f"{what}: one side is None ({expected!r} vs {actual!r})"
        return
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_mode_equivalent(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    mode: Mode | str,
    *,
    exported_in: Mode | str | None = None,
    attention_dropout: float | None = None,
    dropout: Mapping[str, float] | None = None,
    keep: Sequence[str] = (),
    seed: int = 0,
    atol: float = 1e-6,
    rtol: float = 1e-5,
) -> Swap[GraphModule]:
    """Assert that swapping an export of ``model`` to ``mode`` behaves as eager ``model`` in ``mode``.

    The model is exported in ``exported_in`` (by default the other mode),
    swapped to ``mode``, and both are run under ``seed``: outputs, buffers after
    the forward, and parameter and input gradients after a backward must agree.
    ``model`` itself is not modified. ``attention_dropout``, ``dropout`` and
    ``keep`` are passed to :func:`modeswap.swap`. Returns the :class:`modeswap.Swap`.

    >>> swapped = assert_mode_equivalent(model, (x,), "eval")
    """
    target = Mode.parse(mode)
    source = Mode.parse(exported_in) if exported_in is not None else other(target)
    gm = export(model, args, source)
    swapped = swap(gm, target, attention_dropout=attention_dropout, dropout=dropout, keep=keep)
    eager = copy.deepcopy(model).train(target is Mode.TRAIN)
    expected = run_forward_backward(eager, args, seed=seed)
    actual = run_forward_backward(swapped.module, args, seed=seed)
    assert_same_run(expected, actual, atol=atol, rtol=rtol)
    return swapped


def train_side_by_side(
    eager: torch.nn.Module, other: torch.nn.Module, args: tuple[Any, ...], *, epochs: int = 3, steps: int = 3
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Train ``eager`` and ``other`` alike, yielding ``(what, eager's value, other's value)`` after every pass.

    Each epoch runs ``steps`` training steps in train mode (SGD with momentum on
    the mean square of every output), then a validation pass in eval mode under
    ``no_grad``; each pass has a seed of its own. After every pass come the loss
    or outputs, then every entry of ``state_dict()``.

    >>> for what, want, got in train_side_by_side(model, modal, (x,)):
    ...     torch.testing.assert_close(got, want)
    """
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (eager, other)]
    seed = 0
    for epoch in range(epochs):
        for step in range(steps):
            seed += 1
            losses = []
            for module, optimizer in zip((eager, other), optimizers, strict=True):
                torch.manual_seed(seed)
                outputs = pytree.tree_leaves(module.train()(*args))
                loss = sum(o.square().mean() for o in outputs if isinstance(o, torch.Tensor))
                loss.backward()  # type: ignore[union-attr]
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss)
            yield f"epoch {epoch} step {step} loss", losses[0], losses[1]  # type: ignore[misc]
            yield from _state_pairs(f"epoch {epoch} step {step}", eager, other)
        seed += 1
        with torch.no_grad():
            results = []
            for module in (eager, other):
                torch.manual_seed(seed)
                results.append(pytree.tree_leaves(module.eval()(*args)))
        assert len(results[0]) == len(results[1]), f"epoch {epoch} validation: a different number of outputs"
        for i, (want, got) in enumerate(zip(*results, strict=True)):
            yield f"epoch {epoch} validation output {i}", want, got
        yield from _state_pairs(f"epoch {epoch} validation", eager, other)


def _state_pairs(when: str, eager: torch.nn.Module, other: torch.nn.Module) -> Iterator[tuple[str, Any, Any]]:
    want, got = eager.state_dict(), other.state_dict()
    assert want.keys() == got.keys(), f"{when}: state_dict keys differ: {sorted(want)} vs {sorted(got)}"
    for key in want:
        yield f"{when}: {key}", want[key], got[key]


def assert_trains_like(
    eager: torch.nn.Module, other: torch.nn.Module, args: tuple[Any, ...], *, atol: float = 1e-6, rtol: float = 1e-5
) -> int:
    """Assert that ``other`` trains and validates as ``eager`` does; return how many values were compared.

    See :func:`train_side_by_side` for the training.
    """
    checked = 0
    for what, want, got in train_side_by_side(eager, other, args):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=functools.partial(_located, what))
        checked += 1
    return checked


def _located(what: str, message: str) -> str:
    return f"{what}: {message}"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Turn every :class:`modeswap.ModeswapWarning` raised inside the block into an error.

    >>> with quiet():
    ...     evaluated = modeswap.to_eval(gm)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModeswapWarning)
        yield


def export(model: torch.nn.Module, args: tuple[Any, ...], mode: Mode | str, **options: Any) -> GraphModule:
    """Return ``torch.export.export(...).module()`` of a copy of ``model`` in ``mode``; ``model`` is not modified.

    ``options`` go to ``torch.export.export`` (``strict``, ``dynamic_shapes``).

    >>> gm = export(model, (x,), "train")
    """
    return export_program(model, args, mode, **options).module()


def export_program(
    model: torch.nn.Module, args: tuple[Any, ...], mode: Mode | str, **options: Any
) -> torch.export.ExportedProgram:
    """Return ``torch.export.export(...)`` of a copy of ``model`` in ``mode``: :func:`export`'s program.

    >>> program = export_program(model, (x,), "eval")
    """
    captured = copy.deepcopy(model).train(Mode.parse(mode) is Mode.TRAIN)
    return torch.export.export(captured, args, **options)


def other(mode: Mode | str) -> Mode:
    """Return the mode that is not ``mode``."""
    return Mode.EVAL if Mode.parse(mode) is Mode.TRAIN else Mode.TRAIN
