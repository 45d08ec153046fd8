"""recomputed_updates: the buffers eager updates again where torch.utils.checkpoint recomputes, against eager."""

from __future__ import annotations

import copy
import fnmatch
import re
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

import modeswap
import modeswap.eager.recompute
from modeswap.eager.recompute import checkpoints_entered, recomputed_updates, warn_recomputed
from modeswap.records.errors import RecomputedUpdateWarning


class DenseLayer(nn.Module):
    """torchvision's ``_DenseLayer``, cut down: ``norm1`` runs inside the checkpoint when ``memory_efficient``."""

    def __init__(self, channels: int, growth: int = 4, memory_efficient: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(channels, 2 * growth, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * growth, growth, kernel_size=3, padding=1, bias=False)
        self.memory_efficient = memory_efficient

    def bn_function(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))

    def any_requires_grad(self, inputs: list[torch.Tensor]) -> bool:
        return any(tensor.requires_grad for tensor in inputs)

    def call_checkpoint_bottleneck(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        def closure(*inputs: torch.Tensor) -> torch.Tensor:
            return self.bn_function(list(inputs))

        return cp.checkpoint(closure, *inputs, use_reentrant=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.memory_efficient and self.any_requires_grad(features):
            bottleneck = self.call_checkpoint_bottleneck(features)
        else:
            bottleneck = self.bn_function(features)
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseNet(nn.Module):
    """A stem, one dense block of two layers and a classifier, named as torchvision names them."""

    def __init__(self, memory_efficient: bool) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(8))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("denseblock1", nn.ModuleDict())
        for i in range(2):
            self.features.denseblock1.add_module(f"denselayer{i + 1}", DenseLayer(8 + 4 * i, 4, memory_efficient))
        self.classifier = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.features.relu0(self.features.norm0(self.features.conv0(x)))]
        for layer in self.features.denseblock1.values():
            features.append(layer(features))
        return self.classifier(F.adaptive_avg_pool2d(torch.cat(features, 1), 1).flatten(1))


class Counter(nn.Module):
    """A module that counts its calls in a buffer: an update of its own, outside any rule."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return x


class HandWrittenNorm(nn.Module):
    """``F.batch_norm`` on running stats of its own, with no ``num_batches_tracked`` to count the updates."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mean, self.var, training=self.training)


class Checkpointed(nn.Module):
    """``cp.checkpoint(self.body, x)``, the function form, around a linear layer and ``norm``."""

    def __init__(self, norm: nn.Module, *, use_reentrant: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Sequential(norm), nn.ReLU())
        self.use_reentrant = use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cp.checkpoint(self.body, x, use_reentrant=self.use_reentrant)


class Sequential(nn.Module):
    """``cp.checkpoint_sequential`` over linear, batch norm, linear, batch norm: the last segment runs as is."""

    def __init__(self, segments: int, *, use_reentrant: bool = False) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.segments = segments
        self.use_reentrant = use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cp.checkpoint_sequential(self.layers, self.segments, x, use_reentrant=self.use_reentrant)


class Nested(nn.Module):
    """A checkpoint inside a checkpoint: the inner batch norm runs three times a step in eager."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Checkpointed(nn.BatchNorm1d(4))
        self.outer = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cp.checkpoint(lambda y: self.outer(self.inner(y)), x, use_reentrant=False)


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6)


def _rows(requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(6, 4, requires_grad=requires_grad)


#: name -> (model, input, the modules eager updates again in backward).
MODELS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, set[str]]]] = {
    "densenet memory_efficient": lambda: (
        DenseNet(memory_efficient=True),
        _images(),
        {"features.denseblock1.denselayer1.norm1", "features.denseblock1.denselayer2.norm1"},
    ),
    "densenet": lambda: (DenseNet(memory_efficient=False), _images(), set()),
    "function": lambda: (Checkpointed(nn.BatchNorm1d(4)), _rows(), {"body.1.0"}),
    "function reentrant": lambda: (Checkpointed(nn.BatchNorm1d(4), use_reentrant=True), _rows(True), {"body.1.0"}),
    # Reentrant checkpoint gives no gradient through a region none of whose inputs requires grad: no recompute.
    "function reentrant, input without grad": lambda: (
        Checkpointed(nn.BatchNorm1d(4), use_reentrant=True),
        _rows(),
        set(),
    ),
    "checkpoint_sequential": lambda: (Sequential(segments=2), _rows(), {"layers.1"}),
    "checkpoint_sequential reentrant": lambda: (Sequential(segments=2, use_reentrant=True), _rows(True), {"layers.1"}),
    "checkpoint_sequential, one segment": lambda: (Sequential(segments=1), _rows(), set()),
    "nested": lambda: (Nested(), _rows(), {"inner.body.1.0", "outer"}),
    "no checkpoint": lambda: (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)), _rows(), set()),
    "track_running_stats=False": lambda: (
        Checkpointed(nn.BatchNorm1d(4, track_running_stats=False)),
        _rows(),
        set(),
    ),
    "instance norm with running stats": lambda: (
        Checkpointed(nn.Sequential(nn.Unflatten(1, (2, 2)), nn.InstanceNorm1d(2, track_running_stats=True))),
        _rows(),
        {"body.1.0.1"},
    ),
    "a buffer a module updates itself": lambda: (Checkpointed(Counter()), _rows(), {"body.1.0"}),
    "batch norm written by hand": lambda: (Checkpointed(HandWrittenNorm()), _rows(), {"body.1.0"}),
}


def _build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...], set[str]]:
    torch.manual_seed(seed)
    model, x, expected = MODELS[name]()
    return model.train(), (x,), expected


def _eager_step(model: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "None of the inputs have requires_grad=True", UserWarning)
        out = model(*args)
    if out.requires_grad:
        out.sum().backward()


def _updated_in_backward(model: nn.Module, args: tuple[torch.Tensor, ...]) -> set[str]:
    """The oracle: the modules whose buffers a copy of ``model`` changes in eager backward."""
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "None of the inputs have requires_grad=True", UserWarning)
        out = model(*args)
    after_forward = {name: b.clone() for name, b in model.named_buffers()}
    if out.requires_grad:
        out.sum().backward()
    return {name.rpartition(".")[0] for name, b in model.named_buffers() if not torch.equal(b, after_forward[name])}


def named(message: str, model: nn.Module) -> set[str]:
    """The paths of ``model``'s modules a warning names, quoted or in a quoted pattern (``*`` for a number)."""
    quoted = re.findall(r"'([\w.*]*)'", message)
    paths = {path for path, _ in model.named_modules()}
    return {path for path in paths if any(fnmatch.fnmatchcase(path, pattern) for pattern in quoted)}


def _export(model: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "None of the inputs have requires_grad=True", UserWarning)
        return torch.export.export(copy.deepcopy(model), args)


@pytest.mark.parametrize("name", MODELS)
def test_the_modules_named_are_those_eager_updates_again_in_backward(name: str) -> None:
    model, args, expected = _build(name)
    found = recomputed_updates(model, args, program=_export(model, args))
    assert {u.module_path for u in found} == expected
    assert {u.module_path for u in found} == _updated_in_backward(model, args)


@pytest.mark.parametrize("name", ["densenet memory_efficient", "function reentrant", "checkpoint_sequential"])
def test_eager_counts_two_steps_where_the_export_counts_one(name: str) -> None:
    model, args, expected = _build(name)
    program = _export(model, args)
    exported = program.module()
    _eager_step(model, args)
    _eager_step(exported, args)
    eager_buffers, exported_buffers = dict(model.named_buffers()), dict(exported.named_buffers())
    for path in expected:
        assert eager_buffers[f"{path}.num_batches_tracked"] == 2
        assert exported_buffers[f"{path}.num_batches_tracked"] == 1
        assert not torch.allclose(eager_buffers[f"{path}.running_mean"], exported_buffers[f"{path}.running_mean"])
    # Everywhere else eager and the export agree: the difference is the recompute's alone.
    for key, value in exported_buffers.items():
        if key.rpartition(".")[0] not in expected:
            torch.testing.assert_close(eager_buffers[key], value, msg=key)


def test_each_module_says_what_it_updates_and_how_often() -> None:
    model, args, _ = _build("nested")
    found = {u.module_path: u for u in recomputed_updates(model, args)}
    assert found["outer"].module_type == "BatchNorm1d"
    assert found["outer"].buffers == ("running_mean", "running_var", "num_batches_tracked")
    assert (found["outer"].eager, found["outer"].exported) == (2, 1)
    assert (found["inner.body.1.0"].eager, found["inner.body.1.0"].exported) == (3, 1)
    _eager_step(model, args)
    assert model.get_buffer("inner.body.1.0.num_batches_tracked") == 3


def test_eval_mode_updates_nothing_and_is_not_named() -> None:
    model, args, _ = _build("densenet memory_efficient")
    model.eval()
    assert recomputed_updates(model, args, program=_export(model, args)) == ()
    assert _updated_in_backward(model, args) == set()


def test_a_batch_norm_held_in_eval_inside_a_train_model_is_not_named() -> None:
    model, args, _ = _build("densenet memory_efficient")
    model.get_submodule("features.denseblock1.denselayer1.norm1").eval()
    found = recomputed_updates(model, args, program=_export(model, args))
    assert [u.module_path for u in found] == ["features.denseblock1.denselayer2.norm1"]


def test_under_no_grad_the_step_a_training_loop_takes_is_checked() -> None:
    # The checkpoint branch depends on requires_grad: the run enables grad, as a training step does.
    model, args, expected = _build("densenet memory_efficient")
    with torch.no_grad():
        found = recomputed_updates(model, args)
    assert {u.module_path for u in found} == expected


@pytest.mark.parametrize("name", ["no in-place op", "eval"])
def test_a_program_that_updates_nothing_in_place_runs_nothing(name: str) -> None:
    model, args, _ = _build("function")
    if name == "eval":
        model.eval()
    else:
        model.body[1][0] = nn.LayerNorm(4)
        model.register_buffer("scale", torch.ones(4))  # read, never written
    calls: list[None] = []
    model.register_forward_pre_hook(lambda *_: calls.append(None))
    program = _export(model, args)
    calls.clear()
    assert recomputed_updates(model, args, program=program) == ()
    assert calls == []
    assert recomputed_updates(model, args) == ()  # without a program it runs, and finds nothing
    assert len(calls) == 1


def test_a_program_after_run_decompositions_is_checked_too() -> None:
    model, args, expected = _build("densenet memory_efficient")
    program = _export(model, args).run_decompositions()
    assert program.graph_signature.buffers_to_mutate
    assert {u.module_path for u in recomputed_updates(model, args, program=program)} == expected


def test_the_model_is_left_as_it_was() -> None:
    model, args, _ = _build("densenet memory_efficient")
    model.get_submodule("features.denseblock1.denselayer2").eval()  # mixed modes must come back as they were
    model.plain = torch.zeros(3)  # a plain tensor attribute
    for param in model.parameters():
        param.grad = torch.full_like(param, 7.0)
    hook = model.register_forward_hook(lambda *_: None)
    flags = [m.training for m in model.modules()]
    state = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    rng = torch.get_rng_state()
    assert recomputed_updates(model, args, program=_export(model, args))
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters() if p.grad is not None)
    assert all(p.grad is not None and type(p.grad) is torch.Tensor for p in model.parameters())
    after = model.state_dict(keep_vars=True)
    assert after.keys() == state.keys()
    for key, (pointer, value) in state.items():
        assert after[key].data_ptr() == pointer, key
        assert type(after[key]) in (torch.Tensor, nn.Parameter), key
        assert torch.equal(after[key], value), key
    assert type(model.plain) is torch.Tensor
    assert torch.equal(model.plain, torch.zeros(3))
    assert list(model._forward_hooks) == [hook.id]


def test_the_warning_names_each_module_what_differs_and_what_to_do() -> None:
    model, args, expected = _build("densenet memory_efficient")
    with pytest.warns(RecomputedUpdateWarning) as caught:
        found = warn_recomputed(model, args, program=_export(model, args))
    assert {u.module_path for u in found} == expected
    (warning,) = caught
    message = str(warning.message)
    assert named(message, model) == expected
    assert "'features.denseblock1.denselayer*.norm1' (2 modules)" in message  # one pattern, * where numbers vary
    assert "norm0" not in message
    assert "denselayer1.norm2" not in message
    assert "updated twice a step in eager, once in the export" in message
    assert "torch.utils.checkpoint" in message
    assert "memory_efficient=False" in message
    assert warning.filename == __file__  # stacklevel: the caller's line


@pytest.mark.parametrize("name", ["densenet", "no checkpoint", "track_running_stats=False"])
def test_no_warning_where_nothing_is_updated_again(name: str) -> None:
    model, args, _ = _build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecomputedUpdateWarning)
        assert warn_recomputed(model, args, program=_export(model, args)) == ()


class DataDependent(nn.Module):
    """A forward that reads a value, which a fake tensor does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * float(x.sum().item() > 0)


def test_a_model_that_cannot_run_on_fake_tensors_is_said_to_be_unchecked() -> None:
    with pytest.warns(RecomputedUpdateWarning, match="could not run the model's forward and backward") as caught:
        assert warn_recomputed(DataDependent().train(), (_rows(),)) == ()
    assert caught[0].filename == __file__


@pytest.mark.parametrize("call", ["capture", "check"])
@pytest.mark.parametrize("name", MODELS)
def test_capture_and_check_name_what_eager_updates_again_and_nothing_else(name: str, call: str) -> None:
    model, args, expected = _build(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        getattr(modeswap, call)(model, args, **({"seeds": ()} if call == "check" else {}))
    said = [str(w.message) for w in caught if issubclass(w.category, RecomputedUpdateWarning)]
    assert all(w.filename == __file__ for w in caught if issubclass(w.category, RecomputedUpdateWarning))
    if not expected:
        assert said == []
        return
    (message,) = said
    assert named(message, model) == expected


def test_checkpoints_entered_notes_each_checkpointed_region_and_puts_torch_back() -> None:
    reentrant = torch.utils.checkpoint.CheckpointFunction
    for name, count in [("function", 1), ("checkpoint_sequential", 1), ("nested", 2), ("no checkpoint", 0)]:
        model, args, _ = _build(name)
        with checkpoints_entered() as notes:
            _export(model, args)  # the export runs the forward, as capture's does
        assert len(notes) == count, name
    assert torch.utils.checkpoint.CheckpointFunction is reentrant


def test_without_a_checkpoint_nothing_runs_on_fake_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    monkeypatch.setattr(modeswap.eager.recompute, "recomputed_updates", lambda *a, **k: ran.append("") or ())
    model, args, _ = _build("no checkpoint")
    modeswap.capture(model, args)
    assert ran == []
    model, args, _ = _build("function")
    modeswap.capture(model, args)
    assert ran == [""]


def test_a_batch_norm_the_user_froze_is_not_named() -> None:
    model, args, _ = _build("function")
    model.body[1][0].eval()  # frozen while fine-tuning: eager updates it neither in forward nor in backward
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modeswap.capture(model, args)
    model.eval()  # a model in eval mode is checked as its .train() leaves it
    with pytest.warns(RecomputedUpdateWarning, match="'body.1.0'"):
        modeswap.capture(model, args)


def test_blocks_that_overlap_leave_torchs_checkpoint_as_it_was() -> None:
    entries = {name: getattr(cp, name) for name in ("CheckpointFunction", "_checkpoint_without_reentrant_generator")}
    first, second = checkpoints_entered(), checkpoints_entered()
    a, b = first.__enter__(), second.__enter__()
    first.__exit__(None, None, None)  # closed before the block opened after it
    model, args, _ = _build("function")
    _export(model, args)
    assert a == []
    assert len(b) == 1
    second.__exit__(None, None, None)
    assert {name: getattr(cp, name) for name in entries} == entries


def test_the_models_backward_hooks_do_not_run_on_fake_tensors() -> None:
    model, args, _ = _build("function")
    seen: list[object] = []
    handle = model.body[1][0].register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_out))
    with pytest.warns(RecomputedUpdateWarning):
        modeswap.capture(model, args)
    assert seen == []  # as an export, which never runs them
    model(*args).sum().backward()
    assert len(seen) == 1  # and they are there still
    handle.remove()
