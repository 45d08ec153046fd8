"""Compare two exported graphs: the ops each runs, in dependency order, with their literal arguments and outputs.

Used by :func:`modeswap.check` to hold a swapped graph against the other
mode's own export. Two graphs are the same when they run the same ops on the
same inputs with the same literals and return the same outputs; node names,
the names a tensor is read under, the placement of reads, the input guards and
ops whose result has their input's values (``aten.alias``, ``contiguous``, a
dropout in eval mode) do not count. The ops are aligned by (op, module path)
with a longest-matching-blocks diff, so that one extra op shows as one extra
op, not as everything after it.
"""

from __future__ import annotations

import difflib
import hashlib
import operator
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import torch
from torch.fx import GraphModule, Node

from modeswap.fx.graphs import attribute, get_argument, graph_modules, module_path
from modeswap.fx.torch_private import GUARDS_MODULE, OpOverload, op_schema, out_spec, overload_name, pytree
from modeswap.records.modes import Mode, memo_of
from modeswap.table.idiom_matching import matches
from modeswap.table.rules import Sentinel, rule_for

#: Ops whose result has their input's values: an alias, and ``contiguous``, which export keeps or drops
#: with the strides a kernel happens to return (an attention kernel's differ between train and eval).
_SAME_VALUES = (torch.ops.aten.alias.default, torch.ops.aten.contiguous.default)


def _identity(node: Node) -> bool:
    """Whether ``node`` returns its input's values unchanged: an alias, ``contiguous``, a dropout in eval mode.

    A dropout of ``p=0.0`` returns its very input in train mode too (ATen's
    dropout does nothing at 0), as timm's position dropout does by default.
    """
    if node.op != "call_function":
        return False
    if node.target in _SAME_VALUES:
        return True
    rule = rule_for(node)
    if rule is None or not rule.identity_in_eval:
        return False
    if get_argument(node, rule.flag) is False:
        return True
    if rule.gated is None or get_argument(node, rule.gated) != 0.0:
        return False
    # A p the swap left at 0.0 because no one said it (its memo holds None) stands for a p unknown, not for 0.
    memo = memo_of(node)
    return memo is None or memo.values.get(rule.gated, 0.0) is not None


def source(node: Node) -> Node:
    """What ``node`` returns unchanged (through aliases, eval dropouts), or ``node``: what the comparison reads."""
    while _identity(node):
        assert isinstance(node.args[0], Node)
        node = node.args[0]
    return node


@attrs.frozen
class Found:
    """One difference between the graphs, before it is explained: the nodes, where, and what differs.

    ``side`` is ``"expected"`` or ``"actual"`` for ops only one graph runs,
    ``"both"`` for a difference in ops both run (then ``argument`` names the
    argument that differs and ``values`` its two values), and ``"values"`` for
    a result that differs when both graphs run (``modeswap.check``'s second
    opinion: ``argument`` names it, ``values[0]`` lists the seeds). ``"unrun"``
    is no difference: the second opinion could not run a graph, and
    ``argument`` says, on one line, in which phase (``"forward"`` or
    ``"backward"``), with the exception's type and the first line of its
    message (``"backward: RuntimeError: one of the variables needed ..."``);
    what ran before it was compared.
    """

    side: str
    module_path: str
    nodes: tuple[str, ...]
    ops: tuple[str, ...]
    argument: str | None = None
    values: tuple[Any, Any] | None = None
    flag: bool = False  # a site held in the other mode: its mode argument differs, or only one graph runs it
    per_node: bool = False  # the argument is a training value remembered per node (attention's dropout_p)
    gated: bool = False  # the argument is one eager code zeroes outside training (a dropout's p)
    drop_path: bool = False
    writes: tuple[str, ...] = ()  # buffers the ops update in place


class _Graph:
    """The ops of one graph in order, and what each argument refers to, independent of node names."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.calls = [n for n in gm.graph.nodes if _computes(n)]
        self.index = {n: i for i, n in enumerate(self.calls)}
        self.inputs = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
        # A tensor reached under several names (a module called as two children) is one: its first name.
        first: dict[int, str] = {}
        self.state: dict[str, str] = {}
        for name, tensor in (*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)):
            self.state[name] = first.setdefault(id(tensor), name)
        self.drop_path = {n for m in matches(gm.graph) for n in m.nodes}
        self.keys = [(str(n.target), module_path(n)) for n in self.calls]

    def source(self, node: Node) -> Node:
        return source(node)

    def refer(self, node: Node, call: Callable[[int], Any]) -> Any:
        """What ``node`` stands for as an argument; ``call`` names the i-th op.

        The result of an in-place op is the tensor it wrote to.
        """
        node = self.source(node)
        if _returns_written(node):
            assert isinstance(node.args[0], Node)
            return self.refer(node.args[0], call)
        if node in self.index:
            return call(self.index[node])
        if node.op == "placeholder":
            return ("input", self.inputs[node])
        if node.op == "get_attr":
            target = str(node.target)
            value = attribute(self.gm, target)
            if isinstance(value, GraphModule):
                return ("body", _signature(value))
            if target in self.state or not isinstance(value, torch.Tensor):
                return ("attr", self.state.get(target, target))
            return ("constant", tuple(value.shape), str(value.dtype), _small(value))
        return (node.op, str(node.target))

    def shown(self, node: Node) -> str:
        """``node`` as a reader knows it: the node name, or the name of the parameter or buffer it reads."""
        node = self.source(node)
        return str(node.target) if node.op == "get_attr" else node.name

    def _output(self, node: Node) -> str:
        # An output as a reader knows it: the module that computed it, else the node.
        node = self.source(node)
        return module_path(node) or self.shown(node)

    def arguments(self, node: Node, call: Callable[[int], Any] | None) -> dict[str, Any]:
        """The node's arguments by schema name, defaults filled in.

        A node argument is written as :meth:`refer` writes it, or, without
        ``call``, as :meth:`shown` does.
        """
        refer = self.shown if call is None else lambda n: self.refer(n, call)
        mapped = torch.fx.node.map_arg((node.args, node.kwargs), refer)
        args, kwargs = mapped
        target = node.target
        if not isinstance(target, OpOverload):
            return {str(i): a for i, a in enumerate(args)} | dict(kwargs)
        named: dict[str, Any] = {}
        for i, argument in enumerate(op_schema(target).arguments):
            if i < len(args):
                named[argument.name] = args[i]
            elif argument.name in kwargs:
                named[argument.name] = kwargs[argument.name]
            elif argument.has_default_value():
                named[argument.name] = argument.default_value
        return named

    def writes(self, node: Node) -> tuple[str, ...]:
        """The parameters and buffers ``node`` updates in place, inside a subgraph body too."""
        sources = (self.source(value) for value in _written(self.gm, node))
        return tuple(str(source.target) for source in sources if source.op == "get_attr")

    def outputs(self, call: Callable[[int], Any] | None) -> tuple[Any, Any]:
        """The output structure and what each output is, written as :meth:`arguments` writes arguments."""
        (output,) = self.gm.graph.find_nodes(op="output")
        spec = out_spec(self.gm)
        refer = self._output if call is None else lambda n: self.refer(n, call)
        values = torch.fx.node.map_arg(output.args[0], refer)
        if spec is not None and call is None:  # as the module returns them: a tuple, a dict, one tensor
            values = pytree.tree_unflatten(list(values), spec)
        return spec, values


def _computes(node: Node) -> bool:
    """Whether ``node`` is an op to compare: a call that does not just return its input's values.

    The input guards ``ExportedProgram.module()`` calls first are left out: both graphs check the
    same inputs, and the guards take the module path of whichever op comes first.
    """
    if node.op == "call_module":
        return not str(node.target).startswith(GUARDS_MODULE)
    return node.op == "call_function" and not _identity(node)


def _returns_written(node: Node) -> bool:
    """Whether ``node`` is an in-place op that returns the tensor it writes (``add_``, ``copy_``)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, OpOverload) or not node.args:
        return False
    schema = op_schema(target)
    first, returns = schema.arguments[0].alias_info, schema.returns
    return (
        isinstance(node.args[0], Node)
        and first is not None
        and first.is_write
        and len(returns) == 1
        and returns[0].alias_info is not None
        and returns[0].alias_info.before_set == first.before_set
    )


def _written(gm: GraphModule, node: Node, *, undeclared: bool = False) -> Iterator[Node]:
    """The node arguments ``node`` writes to; a higher-order op writes what its body writes to its inputs.

    The writes are those the op's schema declares, and, ``undeclared``, those of :data:`_UNDECLARED_WRITES`.
    """
    target = node.target
    if undeclared and target in _UNDECLARED_WRITES:
        flag, state = _UNDECLARED_WRITES[target]
        if get_argument(node, flag) is not False:
            yield from (v for v in (get_argument(node, name) for name in state) if isinstance(v, Node))
    if isinstance(target, OpOverload):
        for i, argument in enumerate(op_schema(target).arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
            yield from (v for v in (value if isinstance(value, list | tuple) else [value]) if isinstance(v, Node))
        return
    bodies = [a for a in node.args if isinstance(a, Node) and a.op == "get_attr"]
    bodies = [b for b in bodies if isinstance(attribute(gm, str(b.target)), GraphModule)]
    if not bodies:
        return
    # The body's inputs are the operands after the last body, in order (``cond`` passes them as one tuple).
    operands = pytree.tree_leaves(list(node.args[node.args.index(bodies[-1]) + 1 :]))
    for body in bodies:
        module = attribute(gm, str(body.target))
        inputs = list(module.graph.find_nodes(op="placeholder"))
        if len(inputs) != len(operands):
            continue
        position = {n: i for i, n in enumerate(inputs)}
        for inner in module.graph.nodes:
            for value in map(_base if undeclared else source, _written(module, inner, undeclared=undeclared)):
                if value in position and isinstance(operands[position[value]], Node):
                    yield operands[position[value]]


#: Ops that update their running statistics in place though their schemas do not say so (torch tags
#: ``batch_norm`` ``maybe_aliasing_or_mutating`` for it), with the argument that says whether they do.
_UNDECLARED_WRITES: dict[Any, tuple[str, tuple[str, ...]]] = {
    torch.ops.aten.batch_norm.default: ("training", ("running_mean", "running_var")),
    torch.ops.aten.native_batch_norm.default: ("training", ("running_mean", "running_var")),
    torch.ops.aten._batch_norm_impl_index.default: ("training", ("running_mean", "running_var")),
    torch.ops.aten.cudnn_batch_norm.default: ("training", ("running_mean", "running_var")),
    torch.ops.aten.miopen_batch_norm.default: ("training", ("running_mean", "running_var")),
    torch.ops.aten.instance_norm.default: ("use_input_stats", ("running_mean", "running_var")),
}


def written_state(gm: GraphModule) -> frozenset[str]:
    """Return the ``get_attr`` targets of the tensors ``gm`` writes in place, through a view or an alias too.

    ``embedding_renorm_`` on a ``detach`` of an embedding's weight (``max_norm=``)
    writes the weight; a batch norm in train mode, its running statistics,
    which ``aten.batch_norm``'s schema leaves unsaid; a subgraph, what its body
    writes to its operands.
    """
    found: set[str] = set()
    for node in gm.graph.nodes:
        for value in _written(gm, node, undeclared=True):
            base = _base(value)
            if base.op == "get_attr":
                found.add(str(base.target))
    return frozenset(found)


def _base(node: Node) -> Node:
    """The node whose tensor ``node`` views or aliases (``detach``, ``view``, an item of ``split``), or ``node``.

    An op that returns its input's values (a dropout in eval mode returns its
    very input) counts as an alias, whatever its schema says.
    """
    while (aliased := _aliased(node)) is not None:
        node = aliased
    return node


def _aliased(node: Node) -> Node | None:
    if node.op != "call_function":
        return None
    if node.target is operator.getitem and isinstance(node.args[0], Node):
        return _aliased(node.args[0])  # an item of split or unbind views what they view
    target = node.target
    if _identity(node):
        first = node.args[0]
        return first if isinstance(first, Node) else None
    if not isinstance(target, OpOverload):
        return None
    returned = {a for r in op_schema(target).returns if r.alias_info is not None for a in r.alias_info.before_set}
    for argument, value in zip(op_schema(target).arguments, node.args, strict=False):
        info = argument.alias_info
        if info is not None and returned & set(info.before_set) and isinstance(value, Node):
            return value
    return None


def _small(t: torch.Tensor) -> Any:
    """The values of a constant, to compare: a list when it is small, else a digest of its bytes."""
    if t.device.type == "meta":
        return None
    if t.numel() <= 16:
        return t.tolist()
    try:
        data = bytes(t.detach().cpu().contiguous().flatten().view(torch.uint8).tolist())
    except (RuntimeError, TypeError):  # a dtype with no bytes to view (quantized, sparse): its values
        data = repr(t.detach().cpu().tolist()).encode()
    return ("sha256", hashlib.sha256(data).hexdigest())


def blind_spots(gm: GraphModule) -> tuple[str, ...]:
    """Return the ops of ``gm`` whose values the comparison cannot vouch for; empty when it vouches for all.

    The comparison reads through an op that returns its input's values (an
    eval dropout returns its very input; its train twin returns a new tensor).
    Where a later op writes that tensor in place, through any alias, graphs
    the comparison sees as the same may compute different values: only
    running them tells. Returns the names of those ops, subgraphs included.
    """
    found: list[str] = []
    for _, module in graph_modules(gm):
        order = {node: i for i, node in enumerate(module.graph.nodes)}
        read_through: dict[Node, int] = {}  # the base of what an identity op returned -> where it first did
        for node in module.graph.nodes:
            if _identity(node):
                read_through.setdefault(_base(node), order[node])
        if not read_through:
            continue
        for node in module.graph.nodes:
            for value in _written(module, node, undeclared=True):
                first = read_through.get(_base(value))
                if first is not None and order[node] > first:
                    found.append(node.name)
    return tuple(dict.fromkeys(found))


def _signature(gm: GraphModule) -> tuple[Any, ...]:
    graph = _Graph(gm)

    def call(i: int) -> tuple[str, int]:
        return ("call", i)

    ops = tuple((key, repr(graph.arguments(n, call))) for key, n in zip(graph.keys, graph.calls, strict=True))
    return ops, repr(graph.outputs(call))


def compare(expected: GraphModule, actual: GraphModule, mode: Mode) -> tuple[Found, ...]:
    """Return where ``actual`` computes something other than ``expected``; empty when they are the same.

    Both graphs should be in ``mode``: a site of the other mode among the ops
    only one of them runs is flagged as not following the mode.
    """
    want, have = _Graph(expected), _Graph(actual)
    matcher = difflib.SequenceMatcher(None, want.keys, have.keys, autojunk=False)
    partner: dict[int, int] = {}
    found: list[Found] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            partner.update(zip(range(i1, i2), range(j1, j2), strict=True))
            continue
        found += _unmatched("expected", want, want.calls[i1:i2], mode)
        found += _unmatched("actual", have, have.calls[j1:j2], mode)

    def theirs(i: int) -> Any:
        return ("call", partner.get(i, ("unmatched", i)))

    unmatched = {("call", j) for j in range(len(have.calls))} - {("call", j) for j in partner.values()}
    for i, j in partner.items():
        found += _differing(want, want.calls[i], have, have.calls[j], theirs, unmatched)
    found += _outputs(want, have, theirs, consequence=bool(found))
    order = {n.name: k for k, n in enumerate(expected.graph.nodes)}
    return tuple(sorted(found, key=lambda f: (f.side == "actual", order.get(f.nodes[0], 0) if f.nodes else -1)))


def _unmatched(side: str, graph: _Graph, nodes: list[Node], mode: Mode) -> Iterator[Found]:
    # Consecutive ops of one module make one difference.
    groups: list[list[Node]] = []
    for node in nodes:
        if groups and module_path(groups[-1][-1]) == module_path(node):
            groups[-1].append(node)
        else:
            groups.append([node])
    for group in groups:
        yield Found(
            side=side,
            module_path=module_path(group[0]),
            nodes=tuple(n.name for n in group),
            ops=tuple(_op_name(n) for n in group if n.target is not operator.getitem),
            flag=any(_in_other_mode(n, mode) for n in group),
            drop_path=any(n in graph.drop_path for n in group),
            writes=tuple(w for n in group for w in graph.writes(n)),
        )


def _differing(
    want: _Graph, want_node: Node, have: _Graph, have_node: Node, theirs: Callable[[int], Any], unmatched: set[Any]
) -> Iterator[Found]:
    wanted, got = want.arguments(want_node, theirs), have.arguments(have_node, lambda j: ("call", j))
    shown = (want.arguments(want_node, None), have.arguments(have_node, None))
    rule = rule_for(have_node)
    for name in [*wanted, *(k for k in got if k not in wanted)]:
        if _same(wanted.get(name), got.get(name)):
            continue
        if _reads_unmatched(wanted.get(name), got.get(name), unmatched):
            continue  # the op reads what an op of one graph only computed: that op is the difference
        a, b = (side.get(name) for side in shown)
        yield Found(
            side="both",
            module_path=module_path(want_node),
            nodes=(want_node.name,),
            ops=(_op_name(want_node),),
            argument=name,
            values=(a, b),
            flag=rule is not None and name == rule.flag and rule.train is not Sentinel.PER_NODE,
            per_node=rule is not None and name == rule.flag and rule.train is Sentinel.PER_NODE,
            gated=rule is not None and name == rule.gated,
        )


def _in_other_mode(node: Node, mode: Mode) -> bool:
    rule = rule_for(node)
    return rule is not None and rule.applies(node) and rule.mode(node) not in (None, mode)


def _reads_unmatched(wanted: Any, got: Any, unmatched: set[Any]) -> bool:
    def refs(value: Any) -> Iterator[Any]:
        if isinstance(value, tuple) and len(value) == 2 and value[0] == "call":
            yield value
        elif isinstance(value, tuple | list):
            for item in value:
                yield from refs(item)

    return any(isinstance(r[1], tuple) for r in refs(wanted)) or any(r in unmatched for r in refs(got))


def _same(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b  # an export may write 0 where a swap writes 0.0
    return repr(a) == repr(b)


def _outputs(want: _Graph, have: _Graph, theirs: Callable[[int], Any], *, consequence: bool) -> Iterator[Found]:
    # Outputs computed differently follow from the differences found before; a different structure does not.
    (want_spec, want_refs), (have_spec, have_refs) = want.outputs(theirs), have.outputs(lambda j: ("call", j))
    if want_spec != have_spec or (repr(want_refs) != repr(have_refs) and not consequence):
        shown = (want.outputs(None)[1], have.outputs(None)[1])
        yield Found(side="both", module_path="", nodes=(), ops=(), argument="outputs", values=shown)


def _op_name(node: Node) -> str:
    target = node.target
    if isinstance(target, OpOverload):
        return op_schema(target).name.removeprefix("aten::") + (
            f".{overload_name(target)}" if overload_name(target) != "default" else ""
        )
    return getattr(target, "__name__", str(target))
