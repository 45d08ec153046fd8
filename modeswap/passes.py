"""Pure passes over exported ``GraphModule``s, and ``pipeline`` to run several on one copy.

A :class:`Pass` is called like a function, ``GraphModule -> GraphModule``: it
returns a rewritten copy and leaves its input alone. Inside, it is an in-place
*kernel* run on a copy the pass owns; ``pipeline`` copies once and runs all its
passes' kernels on that copy, so four passes cost one copy and one recompile::

    dropout_and_bn = pipeline(swap_dropout("eval"), swap_batchnorm("eval"), eliminate_dead_code, recompile)
    rewritten = dropout_and_bn(gm)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import toolz
import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from modeswap import idioms
from modeswap.errors import InvalidOptionError, UnknownTrainingValueWarning, UnsupportedGraphError
from modeswap.exported import require_exported
from modeswap.graphs import (
    calls,
    copy_module,
    get_argument,
    graph_modules,
    innermost_module,
    qualified_name,
    recompile_all,
    set_argument,
)
from modeswap.modes import Change, Kind, Memo, Mode
from modeswap.rules import DECOMPOSED, RULES_BY_OP, PerNode, Rule, memo_of, rule_for, set_memo

#: An in-place kernel: edits a module the caller owns and returns the changes it made.
Kernel = Callable[[GraphModule], Iterable[Change]]

#: The field a :class:`Change` names when a batch norm starts or stops counting batches.
COUNTER_FIELD = "num_batches_tracked.add_(1)"

aten = torch.ops.aten


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

    def rewrite(self, gm: GraphModule, *, share_weights: bool = False) -> tuple[GraphModule, tuple[Change, ...]]:
        """Return a rewritten copy of ``gm`` and the changes made to reach it.

        With ``share_weights`` the copy aliases ``gm``'s parameters and buffers
        instead of cloning them.
        """
        new = copy_module(require_exported(gm), share_weights=share_weights)
        changes = tuple(self.kernel(new))
        if not self.compiles:
            recompile_all(new)
        return new, changes


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
    kernels = tuple(p.kernel for p in passes)

    def kernel(gm: GraphModule) -> tuple[Change, ...]:
        # tuple() runs each kernel to the end before the next starts, even a generator.
        return tuple(toolz.concat(tuple(k(gm)) for k in kernels))

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


def _no_edits(gm: GraphModule) -> tuple[Change, ...]:
    return ()


def _eliminate_dead_code(gm: GraphModule) -> tuple[Change, ...]:
    for _, module in graph_modules(gm):
        module.graph.eliminate_dead_code()
    return ()


def _recompile(gm: GraphModule) -> tuple[Change, ...]:
    recompile_all(gm)
    return ()


copy = Pass("copy", _no_edits)
eliminate_dead_code = Pass("eliminate_dead_code", _eliminate_dead_code)
recompile = Pass("recompile", _recompile, compiles=True)


def swap_kind(
    kind: Kind,
    mode: Mode | str,
    *,
    default: float | None = None,
    buffers: Mapping[str, str] | None = None,
    name: str | None = None,
) -> Pass:
    """Return the pass that puts every site of ``kind`` in ``mode``, as its rule says.

    ``default`` is the training value for sites whose rule remembers it per node
    (attention ``dropout_p``) when the graph does not record one. ``buffers``
    maps the placeholders of a lifted graph (``ExportedProgram.graph``) to the
    buffers they stand for (``graph_signature.inputs_to_buffers``).
    """
    target = Mode.parse(mode)
    lifted = dict(buffers or {})

    def kernel(gm: GraphModule) -> list[Change]:
        return _swap_in_place(gm, kind, target, default, lifted)

    return Pass(f"{name or f'swap_{kind}'}({target.value})", kernel)


def swap_dropout(mode: Mode | str, *, gated: float | None = None) -> Pass:
    """Return the pass that sets ``train`` of every dropout op (all variants) for ``mode``.

    ``gated`` is the training ``p`` of dropouts that an eval graph records with
    ``p=0.0`` outside an ``nn.Dropout`` module: code such as transformers' eager
    attention passes ``p=0.0 if not self.training else p``.
    """
    return swap_kind("dropout", mode, default=gated)


def swap_batchnorm(mode: Mode | str, *, buffers: Mapping[str, str] | None = None) -> Pass:
    """Return the pass that swaps batch norms with running stats, and their batch counters.

    On a lifted graph, pass ``buffers=ep.graph_signature.inputs_to_buffers``: the
    counters are placeholders there, found through the signature.
    """
    return swap_kind("batch_norm", mode, buffers=buffers, name="swap_batchnorm")


def swap_instance_norm(mode: Mode | str) -> Pass:
    """Return the pass that sets ``use_input_stats`` of instance norms with running stats."""
    return swap_kind("instance_norm", mode)


def swap_rrelu(mode: Mode | str) -> Pass:
    """Return the pass that sets ``training`` of every ``rrelu``."""
    return swap_kind("rrelu", mode)


def swap_attention(mode: Mode | str, *, dropout: float | None = None) -> Pass:
    """Return the pass that sets ``dropout_p`` of every ``scaled_dot_product_attention``.

    Eval sets it to 0.0 and remembers the training value in the node's meta;
    train restores it, or uses ``dropout`` where nothing was remembered.
    """
    target = Mode.parse(mode)
    _check_attention_dropout(dropout, target)
    return swap_kind("attention", target, default=dropout)


def swap_drop_path(mode: Mode | str) -> Pass:
    """Return the pass that removes drop paths for eval (eager eval is the identity) and rebuilds them for train.

    Only drop paths an earlier eval swap removed can be rebuilt: an eval export
    never ran them, so nothing in its graph tells they were there.
    """
    target = Mode.parse(mode)

    def kernel(gm: GraphModule) -> list[Change]:
        changes = []
        for path, module in graph_modules(gm):
            if target is Mode.EVAL:
                # Last first: a match may act on the output of the one before it, which removing replaces.
                for found in reversed(list(idioms.matches(module.graph))):
                    op = str(found.output.target)
                    marker = idioms.remove(found)
                    changes.append(Change(qualified_name(path, marker), op, "drop_path", found.idiom.name, "identity"))
            else:
                for marker, memo in list(idioms.markers(module.graph)):
                    name = qualified_name(path, marker)
                    output = idioms.restore(marker, memo)
                    changes.append(Change(name, str(output.target), "drop_path", "identity", idioms.idiom_name(memo)))
        return changes

    return Pass(f"swap_drop_path({target.value})", kernel)


def swap_passes(
    mode: Mode | str, *, attention_dropout: float | None = None, buffers: Mapping[str, str] | None = None
) -> tuple[Pass, ...]:
    """Return the passes that swap every site of a graph to ``mode``, in order, without ``recompile``.

    Attention goes first: whether a ``dropout_p`` of 0.0 is a training value is
    read off the other sites, before they are swapped. Each pass erases what its
    own edits leave unused (an eval batch norm's counter read), so the graph's
    other nodes, dead or not, stay as they were and no dead-code pass is needed.
    """
    return (
        swap_attention(mode, dropout=attention_dropout),
        swap_dropout(mode, gated=attention_dropout),
        swap_batchnorm(mode, buffers=buffers),
        swap_instance_norm(mode),
        swap_rrelu(mode),
        swap_drop_path(mode),
    )


def swap_pipeline(mode: Mode | str, *, attention_dropout: float | None = None) -> Pass:
    """Return the pass that swaps every site of a ``GraphModule`` to ``mode``: ``swap_passes``, then ``recompile``."""
    return pipeline(*swap_passes(mode, attention_dropout=attention_dropout), recompile)


def _check_attention_dropout(p: float | None, mode: Mode) -> None:
    if p is None:
        return
    if mode is not Mode.TRAIN:
        msg = f"attention_dropout={p!r} only applies when swapping to train mode"
        raise InvalidOptionError(msg)
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
        msg = f"attention_dropout must be a probability in [0, 1], got {p!r}"
        raise InvalidOptionError(msg)


@attrs.frozen
class _Target:
    """One node to swap and what the rest of the graph says about it."""

    node: Node
    name: str
    rule: Rule
    module: GraphModule
    buffers: Mapping[str, str]  # lifted placeholders of this graph -> the buffers they stand for
    reads: dict[str, Node]  # get_attr target -> node, for this graph; shared, and kept current by _counter_node
    graph_trains: bool  # the sites with a fixed training value say the graph was captured in train mode


#: The training value of a node that neither the node nor the graph records.
_UNKNOWN = object()


def _swap_in_place(
    gm: GraphModule, kind: Kind, mode: Mode, default: float | None, buffers: Mapping[str, str]
) -> list[Change]:
    targets = []
    for path, module in graph_modules(gm):
        lifted = buffers if module is gm else {}  # subgraph placeholders are not in the signature
        reads = {str(n.target): n for n in module.graph.find_nodes(op="get_attr")}  # find_nodes(target=) scans
        for node in calls(module.graph, (op for op, of_kind in DECOMPOSED.items() if of_kind == kind)):
            _refuse_decomposed(qualified_name(path, node), node)
        for node in calls(module.graph, (op for op, rule in RULES_BY_OP.items() if rule.kind == kind)):
            rule = rule_for(node)
            if rule is not None and rule.applies(node):
                targets.append(
                    _Target(node, qualified_name(path, node), rule, module, lifted, reads, graph_trains=False)
                )
    if any(t.rule.train is PerNode.VALUE for t in targets):
        trains = _captured_in_train(gm)
        targets = [attrs.evolve(t, graph_trains=trains) for t in targets]
    changes: list[Change] = []
    unknown: list[_Target] = []
    for target in targets:
        if mode is Mode.EVAL:
            changes += _to_eval(target)
        else:
            changes += _to_train(target, default, unknown)
    if unknown:
        _warn_unknown(unknown)
    return changes


def _captured_in_train(gm: GraphModule) -> bool:
    """Whether every site whose training value is fixed (not remembered per node) is in train mode."""
    modes = {
        rule.mode(node)
        for _, module in graph_modules(gm)
        for node in module.graph.nodes
        if (rule := rule_for(node)) is not None and rule.train is not PerNode.VALUE and rule.applies(node)
    }
    return modes == {Mode.TRAIN}


def _to_eval(t: _Target) -> list[Change]:
    rule, node = t.rule, t.node
    value = _literal_flag(t)
    if value == rule.eval:
        if rule.train is PerNode.VALUE and t.graph_trains and memo_of(node) is None:
            set_memo(node, Memo({rule.flag: value}))  # 0.0 is this node's training value: keep it known
        return []
    memo = Memo({rule.flag: value})
    set_argument(node, rule.flag, rule.eval)
    changes = [Change(t.name, str(node.target), rule.flag, value, rule.eval)]
    if rule.counts_batches and (counter := _counter_before(t)) is not None:
        counted: Node = counter.args[0]  # type: ignore[assignment]
        # add_ returns its input: a later read of the counter (a BatchNorm called
        # twice increments add_'s result) reads the counted tensor itself instead.
        counter.replace_all_uses_with(counted)
        t.module.graph.erase_node(counter)
        root = _increment_root(counted)
        memo = attrs.evolve(memo, counter=_attribute(t, root) or root.name)
        if counted.op == "get_attr" and not counted.users:
            t.reads.pop(str(counted.target), None)
            t.module.graph.erase_node(counted)  # the read only fed the counter
        changes.append(Change(t.name, str(node.target), COUNTER_FIELD, True, False))
    set_memo(node, memo)
    return changes


def _to_train(t: _Target, default: float | None, unknown: list[_Target]) -> list[Change]:
    rule, node = t.rule, t.node
    value = _literal_flag(t)
    memo = memo_of(node)
    train = _training_value(t, value, memo, default)
    if train is _UNKNOWN:
        unknown.append(t)
        return []
    if memo is None:
        if value == train:
            return []  # in train mode already
        _refuse_untrainable(t)
    set_memo(node, None)
    if value == train:
        return []
    set_argument(node, rule.flag, train)
    changes = [Change(t.name, str(node.target), rule.flag, value, train)]
    if memo is None and (gated := _gated_off(t)) is not None:
        if default is None:
            unknown.append(t)
        else:
            set_argument(node, gated, default)
            changes.append(Change(t.name, str(node.target), gated, 0.0, default))
    if rule.counts_batches and (counted := _counted_buffer(t, memo)) is not None:
        with t.module.graph.inserting_before(node):
            counter = t.module.graph.call_function(aten.add_.Tensor, (_last_increment(counted), 1))
        counter.meta.update(_meta_like(node, val=counted.meta.get("val")))
        changes.append(Change(t.name, str(node.target), COUNTER_FIELD, False, True))
    return changes


def _gated_off(t: _Target) -> str | None:
    """``t``'s gated argument, if it is 0.0 in a call that eager code may have gated on ``self.training``."""
    if t.rule.gated is None or get_argument(t.node, t.rule.gated) != 0.0:
        return None
    _, owner = innermost_module(t.node) or ("", "")
    return None if owner.startswith(t.rule.keeps) else t.rule.gated


def _training_value(t: _Target, value: Any, memo: Memo | None, default: float | None) -> Any:
    """What ``t``'s flag holds in train mode: remembered, fixed by its rule, or taken from the graph."""
    if memo is not None and t.rule.flag in memo.values:
        return memo.values[t.rule.flag]
    if t.rule.train is not PerNode.VALUE:
        return t.rule.train
    if value != t.rule.eval:
        return value  # it holds a training value already
    if default is not None:
        return default
    return value if t.graph_trains else _UNKNOWN


def _literal_flag(t: _Target) -> Any:
    value = get_argument(t.node, t.rule.flag)
    if isinstance(value, Node):
        msg = (
            f"node {t.name} ({t.node.target}) computes {t.rule.flag} in the graph "
            f"({value.name}) instead of passing a literal, so modeswap cannot set it"
        )
        raise UnsupportedGraphError(msg)
    return value


def _refuse_untrainable(t: _Target) -> None:
    for case in t.rule.untrainable:
        if get_argument(t.node, case.argument) == case.value:
            msg = f"cannot swap {t.name} ({t.node.target}) to train mode: {case.argument}={case.value!r}. {case.why}"
            raise UnsupportedGraphError(msg)


def _refuse_decomposed(name: str, node: Node) -> None:
    msg = (
        f"{name} ({node.target}) is what ExportedProgram.run_decompositions() makes of a "
        f"train/eval-sensitive op; its mode cannot be swapped there. Swap before run_decompositions()."
    )
    raise UnsupportedGraphError(msg)


def _counter_before(t: _Target) -> Node | None:
    """The ``add_(num_batches_tracked, 1)`` that a train graph runs before batch norm ``t``.

    Export writes it right before the batch norm; a QAT-prepared graph
    (``prepare_qat_pt2e``) has its conv rewrite in between, so the search goes
    back as far as the previous batch norm.
    """
    running_mean = _attribute(t, get_argument(t.node, "running_mean"))
    if running_mean is None:
        # Inside a subgraph buffers are placeholders without names: only the node right before will do.
        prev: Node = t.node.prev
        if not _is_increment(prev):
            return None
        root = _increment_root(prev)
        val = root.meta.get("val")
        return prev if root.op == "placeholder" and isinstance(val, torch.Tensor) and val.dtype == torch.int64 else None
    counter = _sibling(running_mean, "num_batches_tracked")
    node: Node = t.node.prev
    while node.op != "root" and rule_for(node) is not t.rule:
        if _is_increment(node) and _attribute(t, _increment_root(node)) == counter:
            return node
        node = node.prev
    return None


def _is_increment(node: Node) -> bool:
    return node.op == "call_function" and node.target is aten.add_.Tensor and node.args[1:] == (1,)


def _increment_root(node: Node) -> Node:
    """The tensor a chain of ``add_(..., 1)`` increments."""
    while node.op == "call_function" and node.target is aten.add_.Tensor:
        node = node.args[0]  # type: ignore[assignment]
    return node


def _last_increment(counted: Node) -> Node:
    """The last ``add_(..., 1)`` chained on ``counted`` so far, as export writes a BatchNorm called twice."""
    while later := [u for u in counted.users if u.target is aten.add_.Tensor and u.args == (counted, 1)]:
        counted = later[0]
    return counted


def _attribute(t: _Target, node: Node) -> str | None:
    """The buffer ``node`` reads: a ``get_attr``'s target, or what a lifted placeholder stands for.

    In an ``ExportedProgram``'s graph buffers are placeholders; only the graph
    signature says which buffer each one is.
    """
    if node.op == "get_attr":
        return str(node.target)
    return t.buffers.get(node.name) if node.op == "placeholder" else None


def _sibling(path: str, name: str) -> str:
    owner, _, _ = path.rpartition(".")
    return f"{owner}.{name}" if owner else name


def _counted_buffer(t: _Target, memo: Memo | None) -> Node | None:
    """The node holding the ``num_batches_tracked`` batch norm ``t`` increments, or ``None`` if none.

    A memo from the eval swap says which counter, if any, the train graph had.
    Without one: ``nn.BatchNorm`` increments the ``num_batches_tracked`` it
    registers beside ``running_mean``, in its own forward. So the counter is the
    sibling of the buffer ``running_mean`` is read from, when the node ran in the
    forward of the module owning it; ``F.batch_norm`` elsewhere counts nothing.
    """
    if memo is not None:
        return None if memo.counter is None else _counter_node(t, memo.counter)
    running_mean_node: Node = get_argument(t.node, "running_mean")
    running_mean = _attribute(t, running_mean_node)
    if running_mean is None:
        msg = (
            f"cannot swap {t.name} to train mode: its running stats come into a subgraph "
            f"({running_mean_node.name}), so the num_batches_tracked it must increment is out of reach. "
            "Export the model in train mode instead."
        )
        raise UnsupportedGraphError(msg)
    name = _sibling(running_mean, "num_batches_tracked")
    owner = running_mean.rpartition(".")[0]
    path, module_type = innermost_module(t.node) or (owner, "")
    if path != owner:
        return None
    if _buffer(t.module, name) is None and name not in t.buffers.values():
        if str(module_type).startswith("torch.nn.modules.batchnorm."):
            msg = (
                f"cannot swap {t.name} to train mode: the graph has no {name} for its "
                f"{module_type.rpartition('.')[2]} to count batches in (torch.export.export(..., "
                "strict=True) drops buffers an eval graph does not read). Export with strict=False, "
                "or in train mode."
            )
            raise UnsupportedGraphError(msg)
        return None
    return _counter_node(t, name)


def _counter_node(t: _Target, counter: str) -> Node:
    """The node reading ``counter``: a buffer path, or the name of a subgraph placeholder."""
    graph: Graph = t.module.graph
    if (buffer := _buffer(t.module, counter)) is not None:
        if counter in t.reads:
            return t.reads[counter]
        with graph.inserting_before(t.node):
            node = graph.get_attr(counter)
        node.meta.update(_meta_like(t.node, val=_fake_like(graph, buffer)))
        t.reads[counter] = node
        return node
    lifted = {path: name for name, path in t.buffers.items()}
    placeholders: list[Node] = graph.find_nodes(op="placeholder")
    for node in placeholders:
        if node.name == lifted.get(counter, counter):
            return node
    msg = f"cannot swap {t.name} to train mode: the batch counter {counter!r} its eval swap recorded is gone"
    raise UnsupportedGraphError(msg)


def _buffer(module: torch.nn.Module, path: str) -> torch.Tensor | None:
    owner, _, name = path.rpartition(".")
    try:
        return module.get_submodule(owner)._buffers.get(name)
    except AttributeError:
        return None


def _fake_like(graph: Graph, tensor: torch.Tensor) -> Any:
    fake_mode = torch._guards.detect_fake_mode([n.meta.get("val") for n in graph.find_nodes(op="placeholder")])
    return None if fake_mode is None else fake_mode.from_tensor(tensor, static_shapes=True)


def _meta_like(node: Node, *, val: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {key: node.meta[key] for key in ("nn_module_stack", "stack_trace") if key in node.meta}
    if val is not None:
        meta["val"] = val
    return meta


def _warn_unknown(targets: list[_Target]) -> None:
    rule = targets[0].rule
    flag, value = (rule.gated, 0.0) if rule.gated is not None else (rule.flag, rule.eval)
    names = ", ".join(t.name for t in targets)
    msg = (
        f"{len(targets)} node(s) ({names}) have {flag}={value} and no recorded training value, so they "
        f"keep {value} in train mode. If the model uses attention dropout in training, pass it: "
        "modeswap.to_train(gm, attention_dropout=p)."
    )
    warnings.warn(msg, UnknownTrainingValueWarning, stacklevel=2)
