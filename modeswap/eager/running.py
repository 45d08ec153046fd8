"""Running a module the way its tests and :func:`modeswap.check` do: a forward under a seed, then a backward."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch.fx import GraphModule

from modeswap.eager.compare import Found, written_state
from modeswap.fx.graphs import attribute, graph_modules
from modeswap.fx.torch_private import OpOverload, buffer_table, parameter_table, pytree, version_counter


def run_forward_backward(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any] | None = None,
    *,
    seed: int,
    copy_grads: bool = True,
    catch: bool = False,
) -> dict[str, Any]:
    """Run ``module`` on copies of ``args`` and ``kwargs`` under ``seed``, then backward through a fixed loss.

    Returns the outputs, the input gradients, the buffers after the forward and
    the parameter gradients, keyed by name. Clears the module's gradients first.
    ``copy_grads=False`` returns the gradient tensors themselves, not copies:
    for a module that nothing else runs (they are its ``.grad`` until its next
    run clears them). ``catch=True`` returns, when the forward or the backward
    raises, what ran before it and ``failed``: the phase, the exception's type
    and the first line of its message (``"backward: RuntimeError: ..."``).
    """
    assert isinstance(module, torch.nn.Module)
    module.zero_grad(set_to_none=True)  # modules from one ExportedProgram share their parameters
    leaves = [_fresh_leaf(a) for a in args]
    named = {k: _fresh_leaf(v) for k, v in (kwargs or {}).items()}
    torch.manual_seed(seed)
    result: dict[str, Any] = {}
    try:
        # The module gets copies of the leaves, so in-place ops on its inputs are allowed.
        outputs = module(*map(_copy, leaves), **{k: _copy(v) for k, v in named.items()})
    except Exception as error:
        if not catch:
            raise
        return {"failed": _failure("forward", error)}
    flat = [o for o in pytree.tree_leaves(outputs) if isinstance(o, torch.Tensor)]
    result["outputs"] = [o.detach().clone() for o in flat]
    result["buffers"] = {k: v.detach().clone() for k, v in module.named_buffers()}
    differentiable = [o for o in flat if o.requires_grad]
    if differentiable:
        weights = torch.Generator().manual_seed(seed + 1)
        loss = sum((o * torch.randn(o.shape, generator=weights, dtype=o.dtype)).sum() for o in differentiable)
        try:
            loss.backward()  # type: ignore[union-attr]
        except Exception as error:
            if not catch:
                raise
            return result | {"failed": _failure("backward", error)}
    copy = _copy if copy_grads else _same
    result["grads"] = {k: None if p.grad is None else copy(p.grad) for k, p in module.named_parameters()}
    result["input_grads"] = [_grad(a) for a in [*leaves, *named.values()]]
    return result


def _failure(phase: str, error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{phase}: {type(error).__name__}" + (f": {lines[0]}" if lines else "")


def _grad(a: Any) -> torch.Tensor | None:
    return a.grad.clone() if isinstance(a, torch.Tensor) and a.grad is not None else None


def _fresh_leaf(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        leaf = a.detach().clone()
        return leaf.requires_grad_(True) if leaf.is_floating_point() else leaf
    return a


def _copy(a: Any) -> Any:
    return a.clone() if isinstance(a, torch.Tensor) else a


def _same(a: Any) -> Any:
    return a


def run_differences(expected: dict[str, Any], actual: dict[str, Any], *, atol: float, rtol: float) -> list[str]:
    """Name what differs between two :func:`run_forward_backward` results, in what both hold.

    Names read ``"outputs[0]"``, ``"buffers['bn.running_mean']"``, ``"grads['fc.weight']"``.
    """
    found: list[str] = []
    for key in ("outputs", "input_grads"):
        if key not in expected or key not in actual:
            continue
        if len(expected[key]) != len(actual[key]):
            found.append(f"{key} (one run has {len(expected[key])}, the other {len(actual[key])})")
            continue
        found += [
            f"{key}[{i}]"
            for i, (e, a) in enumerate(zip(expected[key], actual[key], strict=True))
            if not _close(e, a, atol, rtol)
        ]
    for key in ("buffers", "grads"):
        if key not in expected or key not in actual:
            continue
        for name in sorted(set(expected[key]) | set(actual[key])):
            if not _close(expected[key].get(name), actual[key].get(name), atol, rtol):
                found.append(f"{key}[{name!r}]")
    return found


def _close(expected: torch.Tensor | None, actual: torch.Tensor | None, atol: float, rtol: float) -> bool:
    if expected is None or actual is None:
        return expected is actual
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return False
    # Most values are bit for bit the same, and equal is several times cheaper than allclose.
    return torch.equal(actual, expected) or torch.allclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)


def second_opinion(
    expected: GraphModule, actual: GraphModule, inputs: tuple[Any, Any], seeds: tuple[int, ...]
) -> Iterator[Found]:
    """Run ``expected`` and ``actual`` forward and backward on ``inputs`` under each of ``seeds``; yield what differs.

    Under the first seed only, unless the graphs draw random numbers
    differently: then under each (where both draw alike, each seed would hold
    the same draws against the same computation). Each
    run starts from the modules' parameters and buffers and writes only into
    copies of them (see :func:`_own_state`): the modules are left as they
    were. Where a graph fails to run, what both ran is compared, and a last
    ``Found`` of side ``"unrun"`` says what failed; no later seed runs.
    """
    args, kwargs = inputs
    written = [_written_tensors(gm) for gm in (expected, actual)]
    under: dict[str, list[int]] = {}
    failed: str | None = None
    alike = True  # the graphs left the random generators alike
    # A graph that draws no random numbers computes the same under every seed.
    drawing = any(_draws(gm) for gm in (expected, actual))
    for i, seed in enumerate(seeds if drawing else seeds[:1]):
        if i > 0 and alike:
            break
        with _own_state(expected, written[0]):
            wanted = run_forward_backward(expected, args, kwargs, seed=seed, copy_grads=False, catch=True)
        state = _random_state()
        with _own_state(actual, written[1]):
            got = run_forward_backward(actual, args, kwargs, seed=seed, copy_grads=False, catch=True)
        alike = alike and all(torch.equal(a, b) for a, b in zip(state, _random_state(), strict=True))
        # A strict export leaves out buffers its graph does not read: compare the ones both hold.
        for key in ("buffers", "grads"):
            if key in wanted and key in got:
                wanted[key], got[key] = (
                    {k: v for k, v in r[key].items() if k in wanted[key] and k in got[key]} for r in (wanted, got)
                )
        for what in run_differences(wanted, got, atol=1e-6, rtol=1e-5):
            under.setdefault(what, []).append(seed)
        failed = wanted.get("failed") or got.get("failed")
        if failed:
            break
    for what, differing in under.items():
        path = what.partition("['")[2].rpartition(".")[0]
        yield Found(side="values", module_path=path, nodes=(), ops=(), argument=what, values=(differing, None))
    if failed:
        yield Found(side="unrun", module_path="", nodes=(), ops=(), argument=failed)


def _random_state() -> list[torch.Tensor]:
    """The state of the default generators: the CPU's, and each CUDA device's once CUDA is initialised."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []  # type: ignore[no-untyped-call]
    return [torch.get_rng_state(), *cuda]


def _written_tensors(gm: GraphModule) -> set[int]:
    """The ids of the tensors ``gm`` writes in place (:func:`modeswap.eager.compare.written_state`)."""
    return {id(attribute(module, target)) for _, module in graph_modules(gm) for target in written_state(module)}


@contextmanager
def _own_state(gm: GraphModule, written: set[int]) -> Iterator[None]:
    """Lend ``gm`` tensors of its own for one run, and give it back its own after.

    Its parameters become new ``Parameter`` objects (their gradients are the
    run's), over the same data unless the graph writes them in place
    (``embedding_renorm_`` of an ``Embedding(max_norm=...)``; ids in
    ``written``): then over a copy. Its buffers are copies (a forward in train
    mode updates them, not always through an op that says so), its tensor
    constants copies where written. A tensor held under two names stays one.
    What the run only reads is not copied, so a large model costs no more than
    its gradients; while the run lasts, ``gm`` is not for other threads.
    """
    lent: dict[int, torch.Tensor] = {}
    shared: dict[int, tuple[torch.Tensor, int]] = {}
    held: list[tuple[dict[str, Any], str, torch.Tensor]] = []  # where, under which name, the module's own tensor

    def lend(where: dict[str, Any], name: str, tensor: torch.Tensor, *, parameter: bool, copied: bool) -> None:
        if id(tensor) not in lent:
            if copied:
                data = tensor.detach().clone()
            else:
                data = tensor.detach()
                shared[id(tensor)] = (tensor, version_counter(tensor))
            lent[id(tensor)] = torch.nn.Parameter(data, tensor.requires_grad) if parameter else data
        held.append((where, name, tensor))
        where[name] = lent[id(tensor)]

    try:
        for module in gm.modules():
            parameters, buffers = parameter_table(module), buffer_table(module)
            for name, param in list(parameters.items()):
                if param is not None:
                    lend(parameters, name, param, parameter=True, copied=id(param) in written)
            for name, buffer in list(buffers.items()):
                if buffer is not None:
                    lend(buffers, name, buffer, parameter=False, copied=True)
            for name, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor) and id(value) in written:
                    lend(module.__dict__, name, value, parameter=False, copied=True)
        yield
    finally:
        for where, name, tensor in reversed(held):
            where[name] = tensor
    _require_untouched(shared)


def _require_untouched(shared: dict[int, tuple[torch.Tensor, int]]) -> None:
    """Raise if a run wrote into a tensor it shares with the model, through a view :func:`written_state` missed.

    Only writes that bump the version counter show (an op whose schema
    declares them): not the running statistics a batch norm kernel updates.
    """
    written = [t for t, version in shared.values() if version_counter(t) != version]
    if written:
        shapes = ", ".join(str(tuple(t.shape)) for t in written[:3])
        msg = (
            f"modeswap's second opinion wrote into {len(written)} tensor(s) of the model (shapes {shapes}) that it "
            "took for read-only; please report this with the model"
        )
        raise RuntimeError(msg)


def _draws(gm: GraphModule) -> bool:
    seeded = torch.Tag.nondeterministic_seeded
    return any(
        isinstance(node.target, OpOverload) and seeded in node.target.tags
        for _, module in graph_modules(gm)
        for node in module.graph.nodes
    )
