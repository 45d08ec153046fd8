"""``copy_on_write=True``: a pure swap whose weights share memory with the input's until either side writes.

The oracle is the default swap (a plain clone): what either side computes and
holds after each kind of write must be what it would be with the plain clone.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.export import ExportedProgram
from torch.fx import GraphModule

import modeswap
from modeswap import Mode
from modeswap.fx.weights import can_copy_on_write, tensor_copier
from modeswap.testing import assert_same_run, export_program, other, run_forward_backward

is_cow = torch._C._is_cow_tensor
x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6, momentum=0.3)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(6, 2)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.bn(self.fc(input))))


def program(mode: Mode) -> ExportedProgram:
    torch.manual_seed(0)
    return export_program(Net(), (x,), mode)


def export(mode: Mode) -> GraphModule:
    gm = program(mode).module()
    assert isinstance(gm, GraphModule)
    return gm


def values(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_values(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = values(module)
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert torch.equal(actual[name], value), name


# Writes, each applied to one whole module, that must stay on the side that makes them.


def train_steps(module: nn.Module) -> None:
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    for seed in range(2):
        torch.manual_seed(seed)
        module(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def in_place_update(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.5).add_(1.0)


def load_state_dict(module: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    new = {
        k: v + 1 if not v.is_floating_point() else torch.randn(v.shape, generator=generator)
        for k, v in module.state_dict().items()
    }
    module.load_state_dict(new)


def copy_into(module: nn.Module) -> None:
    with torch.no_grad():
        for v in module.state_dict().values():
            v.copy_(torch.full_like(v, 3))


def to_float64(module: nn.Module) -> None:
    module.to(torch.float64)


def batch_norm_forward(module: nn.Module) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        module(x)  # a train-mode graph updates its running stats and num_batches_tracked


WRITES: dict[str, Callable[[nn.Module], None]] = {
    "train_steps": train_steps,
    "in_place_update": in_place_update,
    "load_state_dict": load_state_dict,
    "copy_": copy_into,
    "to_float64": to_float64,
    "batch_norm_forward": batch_norm_forward,
}


def test_copy_on_write_and_share_weights_together_are_refused():
    for module in (export(Mode.TRAIN), program(Mode.TRAIN)):
        with pytest.raises(modeswap.InvalidOptionError, match="cannot be combined"):
            modeswap.to_eval(module, share_weights=True, copy_on_write=True)


@pytest.mark.parametrize("target", list(Mode))
def test_the_swap_copies_no_weight_and_computes_what_the_default_swap_computes(target):
    gm = export(other(target))
    default = modeswap.swap(gm, target)
    lazy = modeswap.swap(gm, target, copy_on_write=True)
    assert lazy.changes == default.changes
    assert all(is_cow(v) for v in lazy.module.state_dict().values())
    assert all(type(p) is nn.Parameter and p.requires_grad for p in lazy.module.parameters())
    for seed in range(2):
        expected = run_forward_backward(default.module, (x,), seed=seed)
        actual = run_forward_backward(lazy.module, (x,), seed=seed)
        assert_same_run(expected, actual, atol=0, rtol=0)


def test_a_frozen_parameter_stays_frozen():
    gm = export(Mode.TRAIN)
    gm.get_parameter("fc.weight").requires_grad_(False)
    swapped = modeswap.to_eval(gm, copy_on_write=True)
    assert not swapped.get_parameter("fc.weight").requires_grad
    assert swapped.get_parameter("fc.bias").requires_grad


@pytest.mark.parametrize("result_first", [True, False], ids=["result-then-input", "input-then-result"])
@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("target", list(Mode))
def test_a_write_on_either_side_never_shows_on_the_other(target, write, result_first):
    def run(copy_on_write: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        gm = export(other(target))
        before = values(gm)
        swapped = modeswap.swap(gm, target, copy_on_write=copy_on_write).module
        assert_values(swapped, before)
        first, second = (swapped, gm) if result_first else (gm, swapped)
        WRITES[write](first)
        written = values(first)
        assert_values(second, before)
        WRITES[write](second)
        assert_values(first, written)
        return values(gm), values(swapped)

    # Both sides end as they would with the plain clone, value for value.
    for expected, actual in zip(run(copy_on_write=False), run(copy_on_write=True), strict=True):
        assert actual.keys() == expected.keys()
        for name in expected:
            assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize("source", ["graph", "program"])
@pytest.mark.parametrize("write", ["train_steps", "load_state_dict", "batch_norm_forward"])
def test_allow_train_eval_copies_lazily_and_a_write_never_shows_on_the_other_side(write, source):
    def run(copy_on_write: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[torch.Tensor]]:
        exported = program(Mode.TRAIN)
        gm = exported.module()
        before = values(gm)
        modal = modeswap.allow_train_eval(exported if source == "program" else gm, copy_on_write=copy_on_write)
        assert all(is_cow(v) == copy_on_write for v in modal.state_dict().values())
        torch.manual_seed(3)
        outputs = [modal.eval()(x), modal.train()(x)]
        WRITES[write](modal)
        assert_values(gm, before)
        WRITES[write](gm)
        torch.manual_seed(4)
        outputs.append(modal(x))
        return values(gm), values(modal), outputs

    expected, actual = run(copy_on_write=False), run(copy_on_write=True)
    for want, got in zip(expected[:2], actual[:2], strict=True):
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name
    for want, got in zip(expected[2], actual[2], strict=True):
        assert torch.equal(got, want)


def test_batch_norm_in_the_swapped_train_graph_updates_its_own_running_stats_only():
    gm = export(Mode.EVAL)
    before = values(gm)
    swapped = modeswap.to_train(gm, copy_on_write=True)
    batch_norm_forward(swapped)
    assert swapped.get_buffer("bn.num_batches_tracked").item() == 1
    assert not torch.equal(swapped.get_buffer("bn.running_mean"), before["bn.running_mean"])
    assert_values(gm, before)


def test_a_swapped_program_trains_and_round_trips_through_a_swap_back():
    ep = program(Mode.TRAIN)
    before = {k: v.detach().clone() for k, v in ep.state_dict.items()}
    evaluated = modeswap.to_eval(ep, copy_on_write=True)
    assert all(is_cow(v) for v in evaluated.state_dict.values())
    trained = modeswap.to_train(evaluated, copy_on_write=True)
    module = trained.module()
    train_steps(module)
    for source in (ep, evaluated):
        for name, value in before.items():
            assert torch.equal(source.state_dict[name], value), name
    expected = run_forward_backward(modeswap.to_eval(ep).module(), (x,), seed=0)
    assert_same_run(expected, run_forward_backward(evaluated.module(), (x,), seed=0), atol=0, rtol=0)


def test_views_of_one_storage_stay_views_of_one_copy():
    gm = export(Mode.TRAIN)
    gm.register_buffer("table", torch.arange(10.0))
    gm.register_buffer("tail", gm.get_buffer("table")[6:])
    swapped = modeswap.to_eval(gm, copy_on_write=True)
    table, tail = swapped.get_buffer("table"), swapped.get_buffer("tail")
    assert is_cow(tail)
    table[7] = -1.0
    assert tail[1].item() == -1.0
    assert gm.get_buffer("tail")[1].item() == 7.0


def test_deepcopy_of_the_result_is_a_real_copy():
    gm = export(Mode.TRAIN)
    before = values(gm)
    swapped = modeswap.to_eval(gm, copy_on_write=True)
    copied = copy.deepcopy(swapped)
    in_place_update(copied)
    assert_values(swapped, before)
    assert_values(gm, before)
    torch.testing.assert_close(copied(x), modeswap.to_eval(copied)(x), rtol=0, atol=0)


def test_the_state_dict_of_the_result_saves_and_loads():
    gm = export(Mode.TRAIN)
    swapped = modeswap.to_eval(gm, copy_on_write=True)
    buffer = io.BytesIO()
    torch.save(swapped.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert_values(swapped, {k: v.clone() for k, v in loaded.items()})
    fresh = modeswap.to_eval(export(Mode.TRAIN))
    in_place_update(fresh)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh(x), swapped(x))


def test_a_swapped_program_saves_and_loads():
    evaluated = modeswap.to_eval(program(Mode.TRAIN), copy_on_write=True)
    buffer = io.BytesIO()
    torch.export.save(evaluated, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert torch.equal(loaded.module()(x), evaluated.module()(x))


def test_torch_compile_trains_the_result_as_the_default_swap():
    gm = export(Mode.EVAL)
    before = values(gm)
    default = modeswap.to_train(gm)
    lazy = modeswap.to_train(gm, copy_on_write=True)
    outputs = []
    for module in (default, torch.compile(lazy, backend="aot_eager")):
        torch.manual_seed(0)
        out = module(x)
        out.square().sum().backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[1], outputs[0])
    for name, value in values(default).items():
        torch.testing.assert_close(values(lazy)[name], value, msg=name)
    for name, p in default.named_parameters():
        torch.testing.assert_close(lazy.get_parameter(name).grad, p.grad, msg=name)
    assert_values(gm, before)


# What a caller can observe: the input's tensors are copy-on-write too.


def test_the_input_moves_to_new_memory_at_its_first_write_or_data_ptr_call():
    gm = export(Mode.TRAIN)
    weight, bias = gm.get_parameter("fc.weight"), gm.get_parameter("fc.bias")
    addresses = weight.data_ptr(), bias.data_ptr()
    swapped = modeswap.to_eval(gm, copy_on_write=True)
    assert is_cow(weight)
    assert weight.const_data_ptr() == addresses[0]  # reading does not copy
    assert weight.data_ptr() != addresses[0]  # data_ptr() copies the input's tensor
    with torch.no_grad():
        bias.add_(0)
    assert bias.const_data_ptr() != addresses[1]  # so does a write
    # The result was left holding the old memory on its own: it stays put.
    assert swapped.get_parameter("fc.weight").data_ptr() == addresses[0]


def test_with_the_default_swap_the_input_keeps_its_memory():
    gm = export(Mode.TRAIN)
    weight = gm.get_parameter("fc.weight")
    address = weight.data_ptr()
    modeswap.to_eval(gm)
    with torch.no_grad():
        weight.add_(0)
    assert weight.data_ptr() == address


def test_a_dlpack_alias_of_the_input_taken_before_the_swap_writes_into_the_result():
    gm = export(Mode.TRAIN)
    alias = torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(gm.get_parameter("fc.bias").detach()))
    swapped = modeswap.to_eval(gm, copy_on_write=True)
    alias[0] = 42.0  # bypasses the dispatcher, so copy-on-write cannot see it (documented)
    assert swapped.get_parameter("fc.bias")[0].item() == 42.0


def test_a_numpy_view_of_the_input_taken_before_the_swap_does_not_reach_the_result():
    pytest.importorskip("numpy")
    gm = export(Mode.TRAIN)
    view = gm.get_parameter("fc.bias").detach().numpy()  # torch marks the storage not resizable: deep-copied
    swapped = modeswap.to_eval(gm, copy_on_write=True)
    assert not is_cow(swapped.get_parameter("fc.bias"))
    view[0] = 42.0
    assert swapped.get_parameter("fc.bias")[0].item() != 42.0


# Fallbacks: what cannot be copied lazily is copied as the default swap copies it.


def test_a_loaded_program_is_copied_and_trains():
    buffer = io.BytesIO()
    torch.export.save(program(Mode.TRAIN), buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    before = {k: v.detach().clone() for k, v in loaded.state_dict.items()}
    assert not any(can_copy_on_write(v) for v in loaded.state_dict.values())
    evaluated = modeswap.to_eval(loaded, copy_on_write=True)
    assert not any(is_cow(v) for v in [*evaluated.state_dict.values(), *loaded.state_dict.values()])
    trained = modeswap.to_train(evaluated, copy_on_write=True)
    train_steps(trained.module())  # a lazy clone of these storages would crash here
    train_steps(loaded.module())
    for name, value in before.items():
        assert torch.equal(evaluated.state_dict[name], value), name


def quantized() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch deprecates its quantized tensors
        return torch.quantize_per_tensor(torch.linspace(-1, 1, 6), 0.1, 3, torch.qint8)


def fake() -> torch.Tensor:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(3)


FALLBACKS: dict[str, Callable[[], torch.Tensor]] = {
    "quantized": quantized,
    "meta": lambda: torch.empty(3, device="meta"),
    "fake": fake,
    "sparse": lambda: torch.eye(3).to_sparse(),
    "conjugate view": lambda: torch.tensor([1 + 2j, 3 - 1j]).conj(),
    "from numpy": lambda: torch.from_numpy(pytest.importorskip("numpy").ones(3)),
    "torch.load": lambda: torch.load(io.BytesIO(saved(torch.ones(3)))),
    "with a gradient": lambda: with_grad(torch.ones(3)),
}


def saved(t: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(t, buffer)
    return buffer.getvalue()


def with_grad(t: torch.Tensor) -> torch.Tensor:
    t.grad = torch.zeros(3)
    return t


@pytest.mark.parametrize("kind", list(FALLBACKS))
def test_what_cannot_be_copied_lazily_is_deep_copied(kind):
    t = FALLBACKS[kind]()
    assert not can_copy_on_write(t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # deepcopy of a fake tensor reads its data_ptr and warns
        new = tensor_copier(copy_on_write=True)(t)
    assert type(new) is type(t)
    assert new.device == t.device
    if t.device.type == "cpu" and type(t) is torch.Tensor:
        if t.layout is torch.strided:
            assert not is_cow(new)
            assert not is_cow(t)
        assert torch.equal(plain(new), plain(t))


def plain(t: torch.Tensor) -> torch.Tensor:
    return t.dequantize() if t.is_quantized else t.to_dense().resolve_conj()


def test_a_quantized_buffer_is_copied_and_stays_readable():
    gm = export(Mode.TRAIN)
    gm.register_buffer("q", quantized())
    swapped = modeswap.to_eval(gm, copy_on_write=True)
    q = swapped.get_buffer("q")
    assert not is_cow(q)  # before reading its scale, which would crash on a lazy clone
    assert q.q_scale() == 0.1
    assert torch.equal(q.dequantize(), gm.get_buffer("q").dequantize())


def test_meta_weights_swap_without_allocating():
    with torch.device("meta"):
        model = Net().train()
    gm = torch.export.export(model, (torch.empty(8, 4, device="meta"),)).module()
    swapped = modeswap.to_eval(gm, copy_on_write=True)
    assert all(v.device.type == "meta" for v in swapped.state_dict().values())
    assert all(type(p) is nn.Parameter for p in swapped.parameters())
