"""torch's private API is reached from modeswap.fx.torch_private alone, and each name there does what modeswap needs."""

from __future__ import annotations

import ast
import collections
import dataclasses
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch.export import export

import modeswap
from modeswap.fx import torch_private as tp

PACKAGE = Path(modeswap.__file__).parent
HOME = PACKAGE / "fx" / "torch_private.py"

#: Private attributes of torch's objects that modeswap reads or writes: reached as ``x.name``, as a string
#: (``getattr(x, "_in_spec")``, ``vars(x)["_modules"]``) or a keyword (``vars(x).update(_graph=...)``).
PRIVATE_ATTRIBUTES = frozenset(
    {
        *("_schema", "_overloadname", "_cdata", "_version", "_guards_code", "_lazy_clone"),
        *("_parameters", "_buffers", "_modules", "_backward_hooks", "_backward_pre_hooks"),
        *("_forward_hooks", "_forward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"),
        *("_tracer_cls", "_tracer_extras", "_codegen", "_graph", "_in_spec", "_out_spec"),
        *("_guards_fn", "_train", "_eval", "_register_namedtuple", "_pickle_save", "_pickle_load_obj"),
    }
)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.expr) -> list[str] | None:
    """``["torch", "_C", "_pickle_save"]`` of ``torch._C._pickle_save``; None if it is not a dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def private_uses(source: str) -> list[tuple[int, str]]:
    """Each reach into torch's private API in ``source``: its line, and what it reaches."""
    tree = ast.parse(source)
    found: list[tuple[int, str]] = []
    # Names bound to something of torch's: a private attribute of one is private too (``pytree._register_namedtuple``).
    from_torch: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    from_torch.add(alias.asname or "torch")
                    if any(map(_private, alias.name.split("."))):
                        found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            module = node.module
            if module.split(".")[0] == "torch" or module == "modeswap.fx.torch_private":
                from_torch |= {alias.asname or alias.name for alias in node.names}
            if module.split(".")[0] == "torch":
                if any(map(_private, module.split("."))):
                    found.append((node.lineno, f"from {module} import ..."))
                found += [(node.lineno, f"from {module} import {a.name}") for a in node.names if _private(a.name)]
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            # torch.ops.aten._native_batch_norm_legit is an op's name, not torch's API.
            op_name = dotted is not None and dotted[:2] == ["torch", "ops"]
            if dotted and dotted[0] in from_torch and any(map(_private, dotted[1:])) and not op_name:
                if id(node) not in inner:  # torch._C._pickle_save once, not torch._C too
                    found.append((node.lineno, ".".join(dotted)))
                continue
            if node.attr in PRIVATE_ATTRIBUTES:
                found.append((node.lineno, f"{ast.unparse(node.value)}.{node.attr}"))
        elif isinstance(node, ast.Constant) and node.value in PRIVATE_ATTRIBUTES:
            found.append((node.lineno, repr(node.value)))
        elif isinstance(node, ast.keyword) and node.arg in PRIVATE_ATTRIBUTES:
            found.append((node.lineno, f"{node.arg}="))
    return sorted(set(found))


def test_no_module_but_torch_private_reaches_torch_private_api():
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != HOME
        for line, what in private_uses(path.read_text(encoding="utf-8"))
    ]
    assert found == [], "use modeswap.fx.torch_private:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("source", "what"),
    [
        ("import torch\nx = torch._lazy_clone(t)", "torch._lazy_clone"),
        ("import torch\nx = torch._C._get_max_operator_version()", "torch._C._get_max_operator_version"),
        ("import torch.utils._pytree as pytree", "import torch.utils._pytree"),
        ("from torch.utils import _pytree", "from torch.utils import _pytree"),
        ("from torch._subclasses.fake_tensor import FakeTensor", "from torch._subclasses.fake_tensor import ..."),
        ("n = op._schema.arguments", "op._schema"),
        ("s = t.untyped_storage()._cdata", "t.untyped_storage()._cdata"),
        ("spec = getattr(gm, '_out_spec', None)", "'_out_spec'"),
        ("vars(m).update(_graph=g)", "_graph="),
        ("from modeswap.fx.torch_private import pytree\npytree._register_namedtuple(c)", "pytree._register_namedtuple"),
    ],
)
def test_the_scan_finds_a_private_use(source, what):
    assert [found for _, found in private_uses(source)] == [what]


def test_the_scan_leaves_op_names_and_public_names_alone():
    source = "import torch\nop = torch.ops.aten._native_batch_norm_legit.default\nm = torch.nn.Module()\nm.__dict__"
    assert private_uses(source) == []


def test_torch_private_imports_nothing_of_modeswap():
    tree = ast.parse(HOME.read_text(encoding="utf-8"))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert {name.split(".")[0] for name in imported} <= {"__future__", "importlib", "collections", "typing", "torch"}


# -- each name does on this torch what modeswap takes it to do ----------------------------------------------------


def test_op_schema_and_overload_name():
    schema = tp.op_schema(torch.ops.aten.dropout.default)
    assert [a.name for a in schema.arguments] == ["input", "p", "train"]
    add_ = tp.op_schema(torch.ops.aten.add_.Tensor)
    assert add_.arguments[0].alias_info is not None
    assert add_.arguments[0].alias_info.is_write
    assert tp.overload_name(torch.ops.aten.add.Tensor) == "Tensor"
    assert tp.overload_name(torch.ops.aten.dropout.default) == "default"
    assert isinstance(torch.ops.aten.dropout.default, tp.OpOverload)


def test_storage_id_is_the_storage_of_views_and_of_fakes():
    t = torch.arange(12.0)
    assert tp.storage_id(t.untyped_storage()) == tp.storage_id(t[3:].view(3, 3).untyped_storage())
    assert tp.storage_id(t.untyped_storage()) != tp.storage_id(t.clone().untyped_storage())
    with tp.FakeTensorMode():
        fake = torch.ones(4, 4)
        assert isinstance(fake, tp.FakeTensor)
        assert tp.storage_id(fake.untyped_storage()) == tp.storage_id(fake[1:].untyped_storage())
        assert tp.storage_id(fake.untyped_storage()) != tp.storage_id(fake.clone().untyped_storage())


def test_version_counter_counts_in_place_writes():
    t = torch.zeros(3)
    before = tp.version_counter(t)
    t.add_(1)
    assert tp.version_counter(t) == before + 1
    _ = t + 1  # not in place
    assert tp.version_counter(t) == before + 1


def test_lazy_clone_is_copy_on_write():
    t = torch.arange(10.0)
    view = t[2:8].view(2, 3)
    clone = tp.lazy_clone(view)
    assert torch.equal(clone, view)
    assert (clone.shape, clone.stride(), clone.storage_offset()) == (view.shape, view.stride(), view.storage_offset())
    clone.add_(100)
    assert torch.equal(t, torch.arange(10.0))  # a write to the clone leaves the original
    t.mul_(2)
    assert torch.equal(clone, torch.arange(2.0, 8.0).view(2, 3) + 100)  # and one to the original, the clone


class _Guarded(torch.nn.Module):
    def forward(self, x):
        return x + 1 if x.shape[0] != 5 else x - 1


def test_guards_code_round_trip():
    program = export(_Guarded(), (torch.ones(4, 3),), dynamic_shapes={"x": {0: torch.export.Dim.AUTO}})
    assert tp.guards_code_of(program) == ["L['x'].size()[0] != 5"]
    tp.set_guards_code(program, ["L['x'].size()[0] != 7"])
    assert tp.guards_code_of(program) == ["L['x'].size()[0] != 7"]
    module = program.module()  # installs the guards set: a call that breaks one raises
    assert tp.GUARDS_MODULE in dict(module.named_children())
    module(torch.ones(5, 3))
    with pytest.raises(Exception, match="7"):
        module(torch.ones(7, 3))
    # A swap keeps them: the ExportedProgram constructor would not.
    assert tp.guards_code_of(modeswap.to_eval(program)) == ["L['x'].size()[0] != 7"]


def test_detect_fake_mode_finds_the_mode_of_an_exported_graph():
    program = export(torch.nn.Linear(3, 2), (torch.ones(1, 3),))
    values = [node.meta["val"] for node in program.graph.find_nodes(op="placeholder")]
    assert all(isinstance(v, tp.FakeTensor) for v in values)
    assert tp.detect_fake_mode(values) is values[0].fake_mode


def test_the_graph_module_names():
    module = export(torch.nn.Linear(3, 2), (torch.ones(1, 3),)).module()
    assert {tp.GRAPH, tp.IN_SPEC, tp.OUT_SPEC} <= set(vars(module))
    assert vars(module)[tp.GRAPH] is module.graph
    assert isinstance(tp.in_spec(module), tp.pytree.TreeSpec)
    assert isinstance(tp.out_spec(module), tp.pytree.TreeSpec)
    assert tp.in_spec(torch.nn.Linear(1, 1)) is None
    assert (vars(module)["train"].__name__, vars(module)["eval"].__name__) == tp.MODES_REFUSED


def test_empty_graph_like_and_codegen():
    graph = export(torch.nn.Linear(3, 2), (torch.ones(1, 3),)).module().graph
    new = tp.empty_graph_like(graph)
    assert len(new.nodes) == 0
    codegen = tp.codegen(graph)
    assert type(codegen).__name__ == "_PyTreeCodeGen"  # it holds the specs of the generated code
    new.set_codegen(codegen)
    assert tp.codegen(new) is codegen


def test_the_module_tables_are_the_modules_own():
    module = torch.nn.BatchNorm1d(3)
    module.add_module("child", torch.nn.ReLU())
    assert {tp.PARAMETERS, tp.BUFFERS, tp.MODULES} <= set(vars(module))
    weight = torch.nn.Parameter(torch.zeros(3))
    tp.parameter_table(module)["weight"] = weight
    assert module.weight is weight
    mean = torch.ones(3)
    tp.buffer_table(module)["running_mean"] = mean
    assert module.running_mean is mean
    assert tp.module_table(module)["child"] is module.child
    tp.module_table(module)["twice"] = module.child
    assert [name for name, _ in module.named_children()] == ["child"]  # a child registered twice, listed once
    assert list(tp.module_table(module)) == ["child", "twice"]


def test_backward_hooks_can_be_taken_off_and_put_back():
    module = torch.nn.Linear(2, 2)
    called: list[str] = []
    module.register_full_backward_hook(lambda *_: called.append("hook"))
    module.register_full_backward_pre_hook(lambda *_: called.append("pre"))
    hooks, pre_hooks = tp.backward_hooks(module)
    assert (len(hooks), len(pre_hooks)) == (1, 1)
    tp.set_backward_hooks(module, collections.OrderedDict(), collections.OrderedDict())
    module(torch.ones(1, 2, requires_grad=True)).sum().backward()
    assert called == []
    tp.set_backward_hooks(module, hooks, pre_hooks)
    module(torch.ones(1, 2, requires_grad=True)).sum().backward()
    assert sorted(called) == ["hook", "pre"]


def test_hook_tables_list_a_modules_hooks_and_the_global_ones():
    module = torch.nn.Linear(2, 2)
    handle = module.register_forward_hook(lambda *_: None)
    tables = dict(tp.hook_tables(module))
    assert {"_forward_hooks", "_backward_hooks", "_state_dict_hooks"} <= set(tables)
    assert list(tables["_forward_hooks"]) == [handle.id]
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        tables = dict(tp.global_hook_tables())
        assert handle.id in tables["_global_forward_hooks"]
    finally:
        handle.remove()


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """No graph compiled before the test, none left after it: each test counts its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_from_callees_leaves_the_first_frame_to_python_and_a_compiled_caller_inlines_it():
    from torch._dynamo.testing import CompileCounter

    def doubled(x):
        return x * 2

    def entry(x):
        return doubled(x) + 1

    def caller(x):
        return entry(x) - 1

    assert tp.compiled_from_callees(entry) is entry
    x = torch.ones(3)
    counter = CompileCounter()
    assert torch.equal(torch.compile(entry, backend=counter)(x), x * 2 + 1)
    assert (counter.frame_count, counter.op_count) == (1, 1)  # doubled's graph: entry's + 1 ran as Python
    counter.clear()
    assert torch.equal(torch.compile(caller, backend=counter)(x), x * 2)
    assert (counter.frame_count, counter.op_count) == (1, 3)  # one graph, entry traced within it


@pytest.mark.usefixtures("fresh_dynamo")
def test_run_while_tracing_runs_as_python_while_torch_compile_traces_and_the_trace_reads_what_it_did():
    from torch._dynamo.testing import CompileCounter

    calls: list[str] = []
    scales: dict[str, float] = {}

    def scale_of(key):
        calls.append(key)
        scales[key] = 3.0
        return True

    assert tp.run_while_tracing(scale_of) is scale_of

    def scaled(x):
        if scale_of("a"):
            return x * scales["a"]  # read for the first time after the call: it holds "a"
        return x

    x = torch.ones(3)
    counter = CompileCounter()
    compiled = torch.compile(scaled, backend=counter, fullgraph=True)
    assert torch.equal(compiled(x), x * 3)
    assert torch.equal(compiled(x), x * 3)
    assert calls == ["a"]  # while tracing, once: the graph holds its result
    assert counter.frame_count == 1
    assert scale_of("b") is True  # from Python, Python
    assert calls == ["a", "b"]


@pytest.mark.usefixtures("fresh_dynamo")
def test_trace_again_from_a_call_run_while_tracing_traces_the_frame_again_as_the_call_left_it():
    from torch._dynamo.testing import CompileCounter

    calls: list[bool] = []
    scales: dict[str, float] = {}

    def settle(ready):
        calls.append(ready)
        if not ready:
            scales["a"] = 3.0
            tp.trace_again("the scale is set")

    tp.run_while_tracing(settle)

    def scaled(x):
        settle("a" in scales)  # the same call in each trace: torch replays the calls of the last one
        return x * scales["a"]

    x = torch.ones(3)
    counter = CompileCounter()
    compiled = torch.compile(scaled, backend=counter, fullgraph=True)
    assert torch.equal(compiled(x), x * 3)
    assert torch.equal(compiled(x), x * 3)
    assert calls == [False, True]  # the first trace set the scale, the second read it
    assert counter.frame_count == 1


class _Pair(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


@dataclasses.dataclass
class _Record:
    x: torch.Tensor


def test_the_pytree_registry_names_a_namedtuple_and_renames_a_dataclass():
    pair, record = "test_torch_private.Pair", "test_torch_private.Record"
    registry = ("SUPPORTED_NODES", "SUPPORTED_SERIALIZED_TYPES", "SERIALIZED_TYPE_TO_PYTHON_TYPE")
    saved = {name: dict(getattr(tp.pytree, name)) for name in registry}
    assert tp.serialized_type_name(_Pair) is None
    assert not tp.has_pytree_node(_Pair)
    try:
        torch.export.register_dataclass(_Record)
        assert tp.has_pytree_node(_Record)
        assert tp.serialized_type_name(_Record) is None
        tp.name_pytree_type(_Pair, pair)
        tp.name_pytree_type(_Record, record)
        assert (tp.serialized_type_name(_Pair), tp.serialized_type_name(_Record)) == (pair, record)
        assert tp.is_serialized_name(pair)
        assert tp.is_serialized_name(record)
        spec = tp.pytree.tree_flatten(_Pair(torch.ones(1), torch.ones(1)))[1]
        assert pair in tp.pytree.treespec_dumps(spec)
    finally:  # the registry as it was: other tests register their own types
        for name, table in saved.items():
            getattr(tp.pytree, name).clear()
            getattr(tp.pytree, name).update(table)


def test_a_script_object_pickles_as_torch_stores_it():
    if not torch.backends.quantized.supported_engines:
        pytest.skip("no quantized engine to make a TorchScript object with")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.15 deprecates quantized tensors
        weight = torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(weight, None)
    assert isinstance(packed, torch.ScriptObject)
    back = tp.unpickle_script_object(tp.pickle_script_object(packed))
    assert isinstance(back, torch.ScriptObject)
    assert torch.equal(torch.ops.quantized.linear_unpack(back)[0].int_repr(), weight.int_repr())
    assert isinstance(tp.max_operator_version(), int)


def test_the_serializer_loads_on_first_use_and_every_name_is_there():
    code = textwrap.dedent(
        """
        import sys
        from modeswap.fx import torch_private as tp
        print("torch._export.serde.serialize" in sys.modules, "torch._dynamo" in sys.modules)
        tp.schema
        print("torch._export.serde.serialize" in sys.modules)
        missing = [name for name in tp.SERIALIZER if getattr(tp, name, None) is None]
        print(missing, issubclass(tp.schema.Argument, tp.SchemaUnion))
        row = tp.schema.SchemaVersion(major=tp.SCHEMA_VERSION[0], minor=tp.SCHEMA_VERSION[1])
        print(tp.to_json_bytes(row), tp.dataclass_to_dict(row))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    lines = result.stdout.splitlines()
    assert lines[:3] == ["False False", "True", "[] True"]
    assert lines[3] == f'b\'{{"major": {tp.SCHEMA_VERSION[0]}, "minor": {tp.SCHEMA_VERSION[1]}}}\' ' + str(
        {"major": tp.SCHEMA_VERSION[0], "minor": tp.SCHEMA_VERSION[1]}
    )
    assert set(tp.SERIALIZER) <= set(tp.__all__)


def test_every_name_torch_private_gives_is_there():
    missing = [name for name in tp.__all__ if not hasattr(tp, name)]
    assert missing == []
