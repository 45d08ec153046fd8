"""Meta and fake weights: a model exported without memory for its weights swaps without allocating it.

The oracle is the same model on real weights: a meta swap must make the rewrite
a real swap makes, keep every tensor on meta (or fake), and, once given memory
and the real model's values, compute what the eager model computes in that mode.

``copy.deepcopy`` of a fake tensor copies its ``FakeTensorMode``, and a copied
mode crashes the process when it is collected; modeswap clones fake tensors in
their own mode instead (``weights.copy_tensor``). Should that regress, a crash
would end the whole test run, so every check that copies a fake tensor runs in
a forked child (see ``forked``).
"""

from __future__ import annotations

import builtins
import copy
import ctypes
import faulthandler
import functools
import gc
import os
import signal
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.export import ExportedProgram
from torch.fx import GraphModule
from torch.multiprocessing.reductions import StorageWeakRef

import modeswap
from modeswap import Mode
from modeswap.testing import assert_same_run, call_signature, export_program, other, run_forward_backward
from modeswap.testing.models import Net
from modeswap.testing.oracle import _all_tensors

T = TypeVar("T")
META, CPU = torch.device("meta"), torch.device("cpu")
POLICIES: dict[str, dict[str, bool]] = {
    "default": {},
    "copy_on_write": {"copy_on_write": True},
    "share_weights": {"share_weights": True},
}
COPYING = ["default", "copy_on_write"]
CONTAINERS = ["GraphModule", "ExportedProgram"]
x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
x_meta = torch.empty(2, 3, 8, 8, device="meta")


def cnn() -> Net:
    """Conv, batch norm, ReLU, dropout, a mean over positions and a linear head: 8 channels, 4 classes."""
    return Net(8, 4, momentum=0.3, p=0.25)


@functools.cache
def real_net() -> Net:
    torch.manual_seed(0)
    net = cnn()
    with torch.no_grad():  # running stats other than the initial ones, so that loading them shows
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.num_batches_tracked.fill_(5)
    return net


@functools.cache
def meta_program(mode: Mode) -> ExportedProgram:
    with torch.device("meta"):
        net = cnn()
    return torch.export.export(net.train(mode is Mode.TRAIN), (x_meta,))


@functools.cache
def real_program(mode: Mode) -> ExportedProgram:
    return export_program(real_net(), (x,), mode)


@functools.cache
def real_swap(container: str, source: Mode, target: Mode) -> modeswap.Swap[Any]:
    """The swap of the real model's export: the rewrite whichever weight policy makes the same."""
    return modeswap.swap(exported(real_program(source), container), target)


def exported(program: ExportedProgram, container: str) -> Any:
    return program.module() if container == "GraphModule" else program


def module_of(result: GraphModule | ExportedProgram) -> nn.Module:
    return result.module() if isinstance(result, ExportedProgram) else result


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor ``module`` holds: parameters, buffers, and plain tensor attributes (constants)."""
    return dict(_all_tensors(module))


def all_tensors(result: GraphModule | ExportedProgram) -> dict[str, torch.Tensor]:
    """Every tensor of a module, or of a program: its state dict, its constants and its graph module's own."""
    if isinstance(result, ExportedProgram):
        constants = {k: v for k, v in result.constants.items() if isinstance(v, torch.Tensor)}
        return {**result.state_dict, **constants, **tensors(result.graph_module)}
    return tensors(result)


def on_cpu(value: Any) -> Any:
    return CPU if isinstance(value, torch.device) and value == META else value


def structure(gm: nn.Module) -> list[tuple[str, Any, Any]]:
    """The graph's calls and their arguments, a ``device=meta`` that export baked in read as the CPU."""
    return [
        (target, torch.fx.node.map_aggregate(args, on_cpu), torch.fx.node.map_aggregate(kwargs, on_cpu))
        for target, args, kwargs in call_signature(gm)  # type: ignore[arg-type]
    ]


def materialise(module: nn.Module, real: nn.Module) -> nn.Module:
    """Give a meta module memory on the CPU and ``real``'s values, in place; return it.

    ``to_empty`` moves the parameters and buffers. The ops into which a meta
    export baked ``device=meta`` (``arange``, ``to``) are pointed at the CPU, as
    ``torch.export.passes.move_to_device_pass`` does for a program (it cannot
    copy out of meta tensors, so it is no use here).
    """
    module.to_empty(device=CPU)
    values = dict(real.named_parameters()) | dict(real.named_buffers())
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    assert own.keys() == values.keys()
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(values[name])
    assert not [name for name, t in tensors(module).items() if t.is_meta]  # no constant left on meta
    for sub in module.modules():
        if isinstance(sub, GraphModule):
            for node in sub.graph.nodes:
                node.args = torch.fx.node.map_aggregate(node.args, on_cpu)
                node.kwargs = torch.fx.node.map_aggregate(node.kwargs, on_cpu)
            sub.recompile()
    return module


def assert_runs_as_eager(module: nn.Module, real: nn.Module, mode: Mode, args: tuple[Any, ...]) -> None:
    """One forward and backward under a seed: outputs, buffers after the forward, gradients."""
    eager = copy.deepcopy(real).train(mode is Mode.TRAIN)
    expected = run_forward_backward(eager, args, seed=0)
    assert_same_run(expected, run_forward_backward(module, args, seed=0), atol=1e-5, rtol=1e-4)


# A swap of meta weights: the rewrite a swap of real weights makes, every tensor still on meta.


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("target", list(Mode))
@pytest.mark.parametrize("source", list(Mode))
@pytest.mark.parametrize("container", CONTAINERS)
def test_a_meta_swap_is_the_real_swap_and_keeps_every_tensor_on_meta(container, source, target, policy):
    given = exported(meta_program(source), container)
    before = all_tensors(given)
    swapped = modeswap.swap(given, target, **POLICIES[policy])
    expected = real_swap(container, source, target)

    assert swapped.changes == expected.changes
    assert len(swapped.changes) == (0 if source is target else 3)  # dropout's train flag, batch norm's two
    assert modeswap.mode_of(swapped.module) == modeswap.mode_of(expected.module)
    assert structure(module_of(swapped.module)) == structure(module_of(expected.module))

    after = all_tensors(swapped.module)
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        old = before[name]
        assert tensor.is_meta, name
        assert type(tensor) is type(old), name
        assert (tensor.shape, tensor.dtype, tensor.requires_grad) == (old.shape, old.dtype, old.requires_grad), name
        assert (tensor is old) == (policy == "share_weights"), name  # shared: the input's own; else copies
    assert all(t.is_meta for t in all_tensors(given).values())

    # The meta graph runs on meta inputs, as the eager meta model does: shapes only.
    out = module_of(swapped.module)(x_meta)
    assert out.is_meta
    assert out.shape == (2, 4)


@pytest.mark.parametrize(
    ("container", "source", "target", "policy"),
    [
        *[("GraphModule", source, other(source), policy) for source in Mode for policy in POLICIES],
        *[("GraphModule", source, source, "default") for source in Mode],
        *[("ExportedProgram", source, other(source), "copy_on_write") for source in Mode],
    ],
)
def test_the_meta_result_given_memory_computes_what_eager_computes(container, source, target, policy):
    swapped = modeswap.swap(exported(meta_program(source), container), target, **POLICIES[policy]).module
    module = materialise(module_of(swapped), real_net())
    assert_runs_as_eager(module, real_net(), target, (x,))
    if target is Mode.TRAIN:  # the forward updated the running stats the real model's state gave it
        assert module.get_buffer("bn.num_batches_tracked").item() == 6


def test_giving_a_shared_result_memory_leaves_the_input_on_meta():
    gm = meta_program(Mode.TRAIN).module()
    swapped = modeswap.to_eval(gm, share_weights=True)
    materialise(swapped, real_net())
    assert all(t.is_meta for t in tensors(gm).values())
    assert not any(t.is_meta for t in tensors(swapped).values())


# A transformers model built on meta: devices baked into its graph, attention dropout in SDPA.


def llama_config() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        attention_dropout=0.1,
        use_cache=False,  # export cannot return a DynamicCache
        attn_implementation="sdpa",
    )


ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


@functools.cache
def real_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config())  # type: ignore[no-any-return]


@functools.cache
def meta_llama(mode: Mode) -> ExportedProgram:
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config()).train(mode is Mode.TRAIN)
    return torch.export.export(model, (torch.zeros(2, 8, dtype=torch.long, device="meta"),))


def llama_options(target: Mode) -> dict[str, float]:
    # An eval export records SDPA's dropout_p as 0.0: the config's value is stated (see test_transformers).
    return {"attention_dropout": 0.1} if target is Mode.TRAIN else {}


@functools.cache
def real_llama_swap(source: Mode) -> modeswap.Swap[GraphModule]:
    """The swap of the same graph, on the real model's weights."""
    gm = materialise(meta_llama(source).module(), real_llama())
    return modeswap.swap(gm, other(source), **llama_options(other(source)))  # type: ignore[arg-type]


@pytest.mark.parametrize(("container", "policy"), [("GraphModule", "default"), ("ExportedProgram", "copy_on_write")])
@pytest.mark.parametrize("source", list(Mode))
def test_a_meta_llama_swaps_as_on_real_weights_and_given_memory_computes_as_eager(source, container, policy):
    target = other(source)
    given = exported(meta_llama(source), container)
    assert any(n.kwargs.get("device") == META for n in meta_llama(source).graph.nodes)  # export baked it in
    swapped = modeswap.swap(given, target, **POLICIES[policy], **llama_options(target))
    assert all(t.is_meta for t in all_tensors(swapped.module).values())
    expected = real_llama_swap(source)
    assert swapped.changes == expected.changes
    assert len(swapped.changes) == 2  # SDPA's dropout_p, in each layer
    assert modeswap.mode_of(swapped.module) == modeswap.mode_of(expected.module)
    assert structure(module_of(swapped.module)) == structure(expected.module)
    assert_runs_as_eager(materialise(module_of(swapped.module), real_llama()), real_llama(), target, (ids,))


# A model far larger than a swap may allocate: 4 GiB of float32 weights, on meta or fake.


class Big(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2**15, 2**15)  # 2**30 weights, 4 GiB
        self.bn = nn.BatchNorm1d(2**15)
        self.drop = nn.Dropout(0.1)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.fc(input)))


GIB = 2**30
#: Far below the 4 GiB the weights would take; far above what a swap's graph and Python objects take.
ALLOWED = GIB // 4


def big_program(kind: str, mode: Mode = Mode.TRAIN) -> ExportedProgram:
    if kind == "meta":
        with torch.device("meta"):
            return torch.export.export(Big().train(mode is Mode.TRAIN), (torch.empty(2, 2**15),))
    with FakeTensorMode():
        model, args = Big().train(mode is Mode.TRAIN), torch.empty(2, 2**15)
    return torch.export.export(model, (args,))


meta_big = functools.cache(functools.partial(big_program, "meta"))
#: Made here, and copied in forked children only (see ``forked``).
fake_big = functools.cache(functools.partial(big_program, "fake"))


def peak_rss_growth(fn: Callable[[], T]) -> tuple[T, int]:
    """What ``fn`` returns, and how far the resident set rose above its size before, at its peak.

    As benchmarks/measure.py reads it: ``VmHWM``, reset through /proc/self/clear_refs.
    """
    status = Path("/proc/self/status")
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs and glibc")

    def read(key: str) -> int:
        line = next(line for line in status.read_text().splitlines() if line.startswith(f"{key}:"))
        return int(line.split()[1]) * 1024

    before = read("VmRSS")
    result = fn()
    return result, read("VmHWM") - before


def test_the_measure_sees_an_allocation():
    _, grown = peak_rss_growth(lambda: torch.ones(GIB // 2 // 4))  # 512 MiB, written
    assert grown > ALLOWED


def assert_swaps_without_allocating(program: ExportedProgram, container: str, policy: str, kind: str) -> None:
    assert sum(t.numel() * t.element_size() for t in program.state_dict.values()) >= 4 * GIB
    given = exported(program, container)
    source = modeswap.mode_of(given).mode
    swapped, grown = peak_rss_growth(lambda: modeswap.swap(given, other(source), **POLICIES[policy]).module)
    assert grown < ALLOWED, f"{grown / 2**20:.0f} MiB"
    assert modeswap.mode_of(swapped).mode is other(source)
    for name, tensor in all_tensors(swapped).items():
        assert tensor.is_meta if kind == "meta" else isinstance(tensor, FakeTensor), name


def assert_allow_train_eval_allocates_nothing(program: ExportedProgram, container: str, kind: str) -> None:
    modal, grown = peak_rss_growth(lambda: modeswap.allow_train_eval(exported(program, container)))
    assert grown < ALLOWED, f"{grown / 2**20:.0f} MiB"
    assert modal.training
    assert modeswap.mode_of(modal.eval()).mode is Mode.EVAL
    for name, tensor in tensors(modal).items():
        assert tensor.is_meta if kind == "meta" else isinstance(tensor, FakeTensor), name


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("source", list(Mode))
def test_a_4_gib_meta_model_swaps_without_allocating_its_weights(source, container, policy):
    assert_swaps_without_allocating(meta_big(source), container, policy, "meta")


@pytest.mark.parametrize("container", CONTAINERS)
def test_allow_train_eval_on_a_4_gib_meta_model_allocates_nothing(container):
    assert_allow_train_eval_allocates_nothing(meta_big(), container, "meta")


# allow_train_eval and capture on meta weights.


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("source", list(Mode))
def test_allow_train_eval_on_meta_weights_switches_and_given_memory_computes_as_eager(source, container):
    modal = modeswap.allow_train_eval(exported(meta_program(source), container))
    assert all(t.is_meta for t in tensors(modal).values())
    assert modal.training is (source is Mode.TRAIN)
    for mode in (other(source), source):
        modal.train(mode is Mode.TRAIN)
        assert modeswap.mode_of(modal) == modeswap.mode_of(real_swap("ExportedProgram", source, mode).module)
        assert modal(x_meta).is_meta
    materialise(modal, real_net())
    eager = copy.deepcopy(real_net())
    for mode in (other(source), source):  # the stats the first forward updates carry over to the second
        eager.train(mode is Mode.TRAIN)
        modal.train(mode is Mode.TRAIN)
        expected = run_forward_backward(eager, (x,), seed=0)
        assert_same_run(expected, run_forward_backward(modal, (x,), seed=0), atol=1e-5, rtol=1e-4)


def test_capture_of_a_meta_model_keeps_its_weights_on_meta():
    with torch.device("meta"):
        model = cnn()
    modal = modeswap.capture(model, (x_meta,))
    assert all(t.is_meta for t in tensors(modal).values())
    assert modeswap.mode_of(modal.eval()).mode is Mode.EVAL
    assert modeswap.mode_of(modal.train()).mode is Mode.TRAIN


class Scaled(nn.Module):
    """A plain tensor attribute, which export lifts into a constant of each mode's program."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)
        self.scale = torch.ones(4)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc(input)) * self.scale


def test_capture_of_a_meta_model_with_a_tensor_constant():
    with torch.device("meta"):
        model = Scaled()
    modal = modeswap.capture(model, (torch.empty(2, 4, device="meta"),))
    assert all(t.is_meta for t in tensors(modal).values())
    for training in (True, False):
        assert modal.train(training)(torch.empty(2, 4, device="meta")).shape == (2, 4)


# Fake weights.


def forked(check: Callable[[], object]) -> None:
    """Run ``check`` in a forked child; raise here what it raised there, or ``ChildProcessError`` if it died.

    ``copy.deepcopy`` of a fake tensor copies its ``FakeTensorMode``, and with
    it the ``StorageWeakRef`` objects the mode keeps, which hold raw pointers:
    collecting the copy frees them a second time, and the process crashes there
    or later. A swap that copied fake tensors that way again would crash a child.
    """
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    read, write = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a process with threads (torch's) may deadlock the child. The
        # child runs no parallel op, and the alarm below ends it if it hangs all the same.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report, and leave without running pytest's or torch's teardown
        os.close(read)
        faulthandler.disable()  # a crash is reported here, as the signal that ended the child
        signal.alarm(120)
        outcome = "ok"
        try:
            check()
        except BaseException as error:
            outcome = f"{type(error).__name__}\n{error}"
        with os.fdopen(write, "w") as report:
            report.write(outcome)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as report:
        outcome = report.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        raise ChildProcessError(f"the child died of {name} (reported: {outcome!r})")
    if outcome != "ok":
        kind, _, message = outcome.partition("\n")
        error = getattr(builtins, kind, None)
        if isinstance(error, type) and issubclass(error, Exception):
            raise error(message)
        raise AssertionError(outcome)


def isolated(policy: str, check: Callable[[], object]) -> None:
    """Run ``check`` here when ``policy`` copies no tensor, else in a forked child (see ``forked``)."""
    if policy == "share_weights":
        check()
    else:
        forked(check)


@functools.cache
def fake_net(mode: Mode) -> tuple[ExportedProgram, FakeTensorMode, torch.Tensor]:
    """Exported here, and copied in forked children only (see ``forked``)."""
    fake_mode = FakeTensorMode()
    with fake_mode:
        net, args = cnn().train(mode is Mode.TRAIN), torch.empty(2, 3, 8, 8)
    return torch.export.export(net, (args,)), fake_mode, args


def assert_fake_swap_is_the_real_swap(container: str, target: Mode, policy: str) -> None:
    source = other(target)
    program, _, _ = fake_net(source)
    given = exported(program, container)
    before = all_tensors(given)
    swapped = modeswap.swap(given, target, **POLICIES[policy])
    expected = real_swap(container, source, target)
    assert swapped.changes == expected.changes
    assert len(swapped.changes) == 3
    assert structure(module_of(swapped.module)) == structure(module_of(expected.module))
    after = all_tensors(swapped.module)
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert isinstance(tensor, FakeTensor), name
        assert (tensor is before[name]) == (policy == "share_weights"), name
        assert tensor.requires_grad == before[name].requires_grad, name


@pytest.mark.parametrize("target", list(Mode))
@pytest.mark.parametrize("container", CONTAINERS)
def test_a_shared_fake_swap_is_the_real_swap_and_keeps_every_tensor_fake(container, target):
    assert_fake_swap_is_the_real_swap(container, target, "share_weights")


@pytest.mark.parametrize("target", list(Mode))
@pytest.mark.parametrize("container", CONTAINERS)
def test_a_copied_fake_swap_is_the_real_swap_and_keeps_every_tensor_fake(container, target):
    fake_net(other(target)), real_swap(container, other(target), target)  # made here, copied in the child

    def check() -> None:
        for policy in COPYING:
            assert_fake_swap_is_the_real_swap(container, target, policy)

    forked(check)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("container", CONTAINERS)
def test_a_4_gib_fake_model_swaps_without_allocating_its_weights(container, policy):
    program = fake_big()
    isolated(policy, lambda: assert_swaps_without_allocating(program, container, policy, "fake"))


@pytest.mark.parametrize("container", CONTAINERS)
def test_allow_train_eval_on_a_4_gib_fake_model_allocates_nothing(container):
    program = fake_big()
    forked(lambda: assert_allow_train_eval_allocates_nothing(program, container, "fake"))


def assert_runs_in_the_callers_fake_mode(container: str, policy: str) -> None:
    program, fake_mode, args = fake_net(Mode.TRAIN)
    swapped = module_of(modeswap.to_eval(exported(program, container), **POLICIES[policy]))
    with fake_mode:
        out = swapped(args)
    assert isinstance(out, FakeTensor)
    assert out.shape == (2, 4)
    assert all(t.fake_mode is fake_mode for t in tensors(swapped).values())


@pytest.mark.parametrize("policy", [*COPYING, "share_weights"])
@pytest.mark.parametrize("container", CONTAINERS)
def test_the_fake_result_runs_in_the_callers_fake_mode(container, policy):
    fake_net(Mode.TRAIN)
    isolated(policy, lambda: assert_runs_in_the_callers_fake_mode(container, policy))


@pytest.mark.parametrize("container", CONTAINERS)
def test_allow_train_eval_on_fake_weights_runs_in_the_callers_fake_mode(container):
    fake_net(Mode.TRAIN)

    def check() -> None:
        program, fake_mode, args = fake_net(Mode.TRAIN)
        modal = modeswap.allow_train_eval(exported(program, container))
        for training in (True, False):
            with fake_mode:
                assert modal.train(training)(args).shape == (2, 4)

    forked(check)


@pytest.mark.parametrize("policy", COPYING)
def test_a_copied_fake_swap_copies_no_storage_weak_reference(policy):
    """Each ``StorageWeakRef`` took a weak reference of its own; a copy of one frees it a second time.

    A process that collects such copies dies (SIGSEGV or SIGABRT) a few swaps later, at a moment that
    depends on the collector: this checks the cause, which is there or not after every swap.
    """
    program, _, _ = fake_net(Mode.TRAIN)

    def check() -> None:
        swapped = modeswap.to_eval(program.module(), **POLICIES[policy])  # alive while counted
        references = [o for o in gc.get_objects() if type(o) is StorageWeakRef]
        assert len({r.cdata for r in references}) == len(references), "a StorageWeakRef was copied"
        assert all(isinstance(t, FakeTensor) for t in all_tensors(swapped).values())

    forked(check)


def test_capture_of_a_fake_model_with_a_tensor_constant():
    def check() -> None:
        fake_mode = FakeTensorMode()
        with fake_mode:
            model, args = Scaled(), torch.empty(2, 4)
        modal = modeswap.capture(model, (args,))
        for training in (True, False):
            with fake_mode:
                assert modal.train(training)(args).shape == (2, 4)

    forked(check)


@pytest.fixture
def warn_always() -> Iterator[None]:
    """torch warns about a fake tensor's data pointer once a process; warn each time, so that every test sees it."""
    previous = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    yield
    torch.set_warn_always(previous)


@pytest.mark.parametrize("policy", [*COPYING, "share_weights"])
@pytest.mark.parametrize("container", CONTAINERS)
def test_a_fake_swap_reads_no_data_pointer(warn_always, container, policy):
    fake_net(Mode.TRAIN)

    def check() -> None:
        program, _, _ = fake_net(Mode.TRAIN)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "Accessing the data pointer", UserWarning)
            swapped = modeswap.to_eval(exported(program, container), **POLICIES[policy])
        assert all(isinstance(t, FakeTensor) for t in all_tensors(swapped).values())

    isolated(policy, check)
