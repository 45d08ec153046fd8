"""Running a module the way its tests and :func:`modeswap.check` do: a forward under a seed, then a backward."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from modeswap.compare import Found
from modeswap.graphs import copy_module, graph_modules, recompile_all


def run_forward_backward(
    module: torch.nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None, *, seed: int
) -> dict[str, Any]:
    """Run ``module`` on copies of ``args`` and ``kwargs`` under ``seed``, then backward through a fixed loss.

    Returns the outputs, the input gradients, the buffers after the forward and
    the parameter gradients, keyed by name. Clears the module's gradients first.
    """
    assert isinstance(module, torch.nn.Module)
    module.zero_grad(set_to_none=True)  # modules from one ExportedProgram share their parameters
    leaves = [_fresh_leaf(a) for a in args]
    named = {k: _fresh_leaf(v) for k, v in (kwargs or {}).items()}
    torch.manual_seed(seed)
    # The module gets copies of the leaves, so in-place ops on its inputs are allowed.
    outputs = module(*map(_copy, leaves), **{k: _copy(v) for k, v in named.items()})
    flat = [o for o in pytree.tree_leaves(outputs) if isinstance(o, torch.Tensor)]
    result: dict[str, Any] = {"outputs": [o.detach().clone() for o in flat]}
    result["buffers"] = {k: v.detach().clone() for k, v in module.named_buffers()}
    differentiable = [o for o in flat if o.requires_grad]
    if differentiable:
        weights = torch.Generator().manual_seed(seed + 1)
        loss = sum((o * torch.randn(o.shape, generator=weights, dtype=o.dtype)).sum() for o in differentiable)
        loss.backward()  # type: ignore[union-attr]
    result["grads"] = {k: None if p.grad is None else p.grad.clone() for k, p in module.named_parameters()}
    result["input_grads"] = [_grad(a) for a in [*leaves, *named.values()]]
    return result


def _grad(a: Any) -> torch.Tensor | None:
    return a.grad.clone() if isinstance(a, torch.Tensor) and a.grad is not None else None


def _fresh_leaf(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        leaf = a.detach().clone()
        return leaf.requires_grad_(True) if leaf.is_floating_point() else leaf
    return a


def _copy(a: Any) -> Any:
    return a.clone() if isinstance(a, torch.Tensor) else a


def run_differences(expected: dict[str, Any], actual: dict[str, Any], *, atol: float, rtol: float) -> list[str]:
    """Name what differs between two :func:`run_forward_backward` results.

    Names read ``"outputs[0]"``, ``"buffers['bn.running_mean']"``, ``"grads['fc.weight']"``.
    """
    found: list[str] = []
    for key in ("outputs", "input_grads"):
        if len(expected[key]) != len(actual[key]):
            found.append(f"{key} (one run has {len(expected[key])}, the other {len(actual[key])})")
            continue
        found += [
            f"{key}[{i}]"
            for i, (e, a) in enumerate(zip(expected[key], actual[key], strict=True))
            if not _close(e, a, atol, rtol)
        ]
    for key in ("buffers", "grads"):
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

    Under the first seed only when neither graph draws random numbers. The
    graphs run on copies of their buffers and new parameters over the same
    data, so the modules they come from are left as they were.
    """
    expected, actual = _runnable(expected), _runnable(actual)
    args, kwargs = inputs
    under: dict[str, list[int]] = {}
    # A graph that draws no random numbers computes the same under every seed.
    drawing = any(_draws(gm) for gm in (expected, actual))
    for seed in seeds if drawing else seeds[:1]:
        wanted = run_forward_backward(expected, args, kwargs, seed=seed)
        got = run_forward_backward(actual, args, kwargs, seed=seed)
        # A strict export leaves out buffers its graph does not read: compare the ones both hold.
        for key in ("buffers", "grads"):
            wanted[key], got[key] = (
                {k: v for k, v in r[key].items() if k in wanted[key] and k in got[key]} for r in (wanted, got)
            )
        for what in run_differences(wanted, got, atol=1e-6, rtol=1e-5):
            under.setdefault(what, []).append(seed)
    for what, differing in under.items():
        path = what.partition("['")[2].rpartition(".")[0]
        yield Found(side="values", module_path=path, nodes=(), ops=(), argument=what, values=(differing, None))


def _runnable(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` to run forward and backward without touching the model it shares tensors with.

    Its parameters are new ``Parameter`` objects over the same data (their
    gradients are the copy's own), its buffers copies (a forward in train mode
    updates them); a tensor held under two names stays one.
    """
    new = copy_module(gm, share_weights=True)
    params: dict[int, torch.nn.Parameter] = {}
    buffers: dict[int, torch.Tensor] = {}
    for module in new.modules():
        for name, param in module._parameters.items():
            if param is not None and id(param) not in params:
                params[id(param)] = torch.nn.Parameter(param.detach(), param.requires_grad)
            module._parameters[name] = None if param is None else params[id(param)]
        for name, buffer in module._buffers.items():
            if buffer is not None and id(buffer) not in buffers:
                buffers[id(buffer)] = buffer.clone()
            module._buffers[name] = None if buffer is None else buffers[id(buffer)]
    recompile_all(new)
    return new


def _draws(gm: GraphModule) -> bool:
    seeded = torch.Tag.nondeterministic_seeded
    return any(
        isinstance(node.target, torch._ops.OpOverload) and seeded in node.target.tags
        for _, module in graph_modules(gm)
        for node in module.graph.nodes
    )
