"""allow_train_eval and capture: modules that switch modes with .train()/.eval(), checked step by step against eager.

The tests of what a ModalModule promises run on both makers: ``allow_train_eval``
on an export, and ``capture`` on the eager model (one export per mode).
"""

from __future__ import annotations

import copy
import gc
import pickle
import tracemalloc
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeswap
from modeswap import Mode
from modeswap.testing import Snapshot, assert_same_state, assert_trains_like


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.2)
        self.drop2d = nn.Dropout2d(0.25)
        self.fc = nn.Linear(4 * 6 * 6, 8)
        self.bn1d = nn.BatchNorm1d(8, momentum=0.05)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop2d(F.relu(self.bn(self.conv(x))))
        return self.out(self.drop(F.relu(self.bn1d(self.fc(x.flatten(1))))))


class Attention(nn.Module):
    """Self-attention written the way transformers writes it: dropout_p gated on self.training."""

    def __init__(self, width: int, p: float) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(0.2)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return self.norm(x + self.drop(attended))


class Noisy(nn.Module):
    """Instance norm with running stats, rrelu, alpha dropout, and a dropout inside a no_grad region."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm1d(3, momentum=0.3, track_running_stats=True, affine=True)
        self.act = nn.RReLU(0.1, 0.4)
        self.alpha = nn.AlphaDropout(0.2)
        self.fc = nn.Linear(5, 5)
        self.drop = nn.Dropout(0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.alpha(self.act(self.norm(x)))
        with torch.no_grad():
            noise = self.drop(self.fc(x))
        return self.fc(y) + noise


def conv_net() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return ConvNet(), (torch.randn(4, 3, 6, 6),)


def attention() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return nn.Sequential(nn.Linear(6, 8), Attention(8, p=0.3), nn.Linear(8, 2)), (torch.randn(3, 5, 6),)


def noisy() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return Noisy(), (torch.randn(4, 3, 5),)


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "conv_net": conv_net,
    "attention": attention,
    "noisy": noisy,
}
ATTENTION_DROPOUT = {"attention": 0.3}


MAKERS = ["allow_train_eval", "capture"]


def make(
    name: str, exported_in: Mode, how: str = "allow_train_eval"
) -> tuple[nn.Module, modeswap.ModalModule, tuple[torch.Tensor, ...]]:
    """An eager model in ``exported_in``, and the module that allow_train_eval makes of its export, or capture of it."""
    torch.manual_seed(0)
    model, args = MODELS[name]()
    model.train(exported_in is Mode.TRAIN)
    if how == "capture":
        return model, modeswap.capture(copy.deepcopy(model), args), args
    gm = torch.export.export(copy.deepcopy(model), args).module()
    modal = modeswap.allow_train_eval(gm, attention_dropout=ATTENTION_DROPOUT.get(name))
    return model, modal, args


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict(keep_vars=True))


def run(module: nn.Module, args: tuple[torch.Tensor, ...], seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    out: torch.Tensor = module(*args)
    return out


class Head(nn.Module):
    """A parent module: outer.train() / outer.eval() must reach the exported body."""

    def __init__(self, body: nn.Module, width: int) -> None:
        super().__init__()
        self.body = body
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.head = nn.Linear(width, 2)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(x)))


OUT_WIDTH = {"conv_net": 3, "attention": 2, "noisy": 5}


@pytest.mark.parametrize("how", MAKERS)
@pytest.mark.parametrize("through_parent", [False, True], ids=["direct", "parent"])
@pytest.mark.parametrize("exported_in", list(Mode))
@pytest.mark.parametrize("name", MODELS)
def test_a_training_loop_matches_eager_at_every_step(
    name: str, exported_in: Mode, through_parent: bool, how: str
) -> None:
    eager, modal, args = make(name, exported_in, how)
    if through_parent:
        eager, modal = Head(eager, OUT_WIDTH[name]), Head(modal, OUT_WIDTH[name])
    checked = assert_trains_like(eager, modal, args)
    assert checked > 3 * 4 * len(state(eager))
    norms = [m for m in eager.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(int(m.num_batches_tracked) == 9 for m in norms)  # 3 epochs x 3 steps, none in validation


@pytest.mark.parametrize("how", MAKERS)
@pytest.mark.parametrize("exported_in", list(Mode))
def test_it_starts_in_the_mode_it_was_captured_in(exported_in: Mode, how: str) -> None:
    eager, modal, args = make("conv_net", exported_in, how)
    assert modal.training is (exported_in is Mode.TRAIN)
    assert all(m.training is modal.training for m in modal.modules())
    assert modeswap.mode_of(modal).mode is exported_in
    torch.testing.assert_close(run(modal, args, 3), run(eager, args, 3))


@pytest.mark.parametrize("how", MAKERS)
def test_mode_of_follows_the_switch(how: str) -> None:
    _, modal, _ = make("conv_net", Mode.TRAIN, how)
    assert modeswap.mode_of(modal.eval()).mode is Mode.EVAL
    assert {site.mode for site in modeswap.mode_of(modal).sites} == {Mode.EVAL}
    assert modeswap.mode_of(modal.train()).mode is Mode.TRAIN
    assert modeswap.mode_of(modal.train(False)).mode is Mode.EVAL
    assert "batch_norm.default(" in modal.code
    assert ", False, 0.2, 0.001" in modal.code


def test_the_input_is_never_touched() -> None:
    torch.manual_seed(0)
    model, args = conv_net()
    gm = torch.export.export(model, args).module()
    before = Snapshot.of(gm)
    modal = modeswap.allow_train_eval(gm)
    assert_trains_like(copy.deepcopy(model), modal, args)
    assert Snapshot.of(gm) == before
    assert not {t.data_ptr() for t in state(gm).values()} & {t.data_ptr() for t in state(modal).values()}


def test_an_exported_program_is_accepted_and_left_alone() -> None:
    torch.manual_seed(0)
    model, args = conv_net()
    ep = torch.export.export(copy.deepcopy(model), args)
    before = {k: v.clone() for k, v in ep.state_dict.items()}
    modal = modeswap.allow_train_eval(ep)
    assert_trains_like(model, modal, args)
    for key, value in ep.state_dict.items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("how", MAKERS)
def test_one_set_of_tensors_serves_both_modes(how: str) -> None:
    _, modal, args = make("conv_net", Mode.TRAIN, how)
    optimizer = torch.optim.SGD(modal.parameters(), lr=0.1)  # built before any switch
    params = dict(modal.named_parameters())
    buffers = dict(modal.named_buffers())
    modal.eval()
    modal.train()
    run(modal, args, 0).sum().backward()
    optimizer.step()
    assert dict(modal.named_parameters()) == params
    assert all(p.grad is not None for p in params.values())
    assert dict(modal.named_buffers()) == buffers
    # Running stats the train graph updated are the ones the eval graph reads.
    modal.bn.running_mean.fill_(100.0)
    trained_eval = run(modal.eval(), args, 0)
    modal.bn.running_mean.zero_()
    assert not torch.equal(run(modal, args, 0), trained_eval)


def test_state_dict_keys_are_the_exported_modules() -> None:
    torch.manual_seed(0)
    model, args = conv_net()
    gm = torch.export.export(model, args).module()
    modal = modeswap.allow_train_eval(gm)
    assert list(modal.state_dict()) == list(gm.state_dict()) == list(model.state_dict())
    assert [n for n, _ in modal.named_parameters()] == [n for n, _ in gm.named_parameters()]
    assert [n for n, _ in modal.named_buffers()] == [n for n, _ in gm.named_buffers()]


@pytest.mark.parametrize("how", MAKERS)
def test_load_state_dict_round_trips_in_both_directions(how: str) -> None:
    eager, modal, args = make("conv_net", Mode.TRAIN, how)
    for _ in range(2):
        run(eager, args, 0)
    modal.load_state_dict(eager.state_dict())
    assert_same_state(eager, modal, atol=1e-6, rtol=1e-5)
    saved = copy.deepcopy(modal.state_dict())
    run(modal, args, 1)
    assert not torch.equal(modal.bn.running_mean, saved["bn.running_mean"])
    modal.load_state_dict(saved)
    fresh, _ = conv_net()
    fresh.load_state_dict(modal.state_dict())
    assert_same_state(fresh, modal, atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="Missing key"):
        modal.load_state_dict({k: v for k, v in saved.items() if k != "bn.running_var"})


@pytest.mark.parametrize("how", MAKERS)
def test_deepcopy_gives_an_independent_module(how: str) -> None:
    eager, modal, args = make("conv_net", Mode.EVAL, how)
    copied = copy.deepcopy(modal)
    assert copied.training is False
    copied.train()
    run(copied, args, 0)
    assert modal.training is False
    assert int(modal.bn.num_batches_tracked) == 0
    assert int(copied.bn.num_batches_tracked) == 1
    assert_same_state(eager, modal, atol=1e-6, rtol=1e-5)
    eager.train()
    run(eager, args, 0)
    torch.testing.assert_close(run(copied, args, 5), run(eager, args, 5))
    assert_same_state(eager, copied, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("how", MAKERS)
def test_to_dtype_reaches_both_modes(how: str) -> None:
    eager, modal, args = make("conv_net", Mode.TRAIN, how)
    eager, modal = eager.to(torch.float64), modal.to(torch.float64)
    doubled = tuple(a.double() for a in args)
    for mode in (False, True, False):
        eager.train(mode), modal.train(mode)
        got = run(modal, doubled, 2)
        assert got.dtype is torch.float64
        torch.testing.assert_close(got, run(eager, doubled, 2))
    assert modal.bn.running_var.dtype is torch.float64
    assert_same_state(eager, modal, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("how", MAKERS)
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("training", [True, False])
def test_runs_under_no_grad_and_inference_mode(context: Callable[[], Any], training: bool, how: str) -> None:
    eager, modal, args = make("conv_net", Mode.TRAIN, how)
    eager.train(training), modal.train(training)
    with context():
        torch.testing.assert_close(run(modal, args, 4), run(eager, args, 4))
    assert_same_state(eager, modal, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("how", MAKERS)
def test_forward_hooks_registered_on_it_run(how: str) -> None:
    _, modal, args = make("conv_net", Mode.TRAIN, how)
    seen: list[bool] = []
    handle = modal.register_forward_hook(lambda module, inputs, output: seen.append(module.training))
    modal(*args)
    modal.eval()(*args)
    handle.remove()
    modal(*args)
    assert seen == [True, False]


@pytest.mark.parametrize("how", MAKERS)
@pytest.mark.parametrize("exported_in", list(Mode))
def test_torch_compile_in_both_modes(exported_in: Mode, how: str) -> None:
    torch._dynamo.reset()
    eager, modal, args = make("conv_net", exported_in, how)
    compiled = torch.compile(modal, backend="aot_eager", fullgraph=True)
    for training in (True, False, True):
        eager.train(training), modal.train(training)
        torch.testing.assert_close(run(compiled, args, 6), run(eager, args, 6))
        assert_same_state(eager, modal, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("how", MAKERS)
def test_wrong_inputs_are_rejected_as_by_the_exported_module(how: str) -> None:
    _, modal, args = make("conv_net", Mode.TRAIN, how)
    for bad in (torch.randn(5, 3, 6, 6), torch.randn(4, 3, 7, 6)):
        with pytest.raises(AssertionError, match="Guard failed"):
            modal(bad)
    with pytest.raises(ValueError, match="Trying to flatten user inputs"):
        modal(*args, *args)


@pytest.mark.parametrize("how", MAKERS)
def test_switching_never_recompiles_and_leaves_memory_flat(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    _, modal, args = make("conv_net", Mode.TRAIN, how)
    compiled: list[str] = []
    recompile = torch.fx.GraphModule.recompile
    monkeypatch.setattr(torch.fx.GraphModule, "recompile", lambda self: compiled.append("") or recompile(self))
    python_code = torch.fx.Graph.python_code
    monkeypatch.setattr(
        torch.fx.Graph, "python_code", lambda self, *a, **k: compiled.append("") or python_code(self, *a, **k)
    )
    for i in range(1000):
        modal.train(i % 2 == 0)(*args)
    assert compiled == []
    gc.collect()
    tracemalloc.start()
    objects = len(gc.get_objects())
    before = tracemalloc.take_snapshot()
    for _ in range(500):
        modal.train()
        modal.eval()
    gc.collect()
    growth = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert len(gc.get_objects()) - objects < 100
    assert growth < 64 * 1024


def test_a_no_grad_region_gets_a_body_per_mode() -> None:
    _, modal, _ = make("noisy", Mode.EVAL)
    bodies = {name for name, m in modal.named_children() if isinstance(m, torch.fx.GraphModule)}
    assert bodies == {"submod_1_train", "submod_1_eval"}
    assert "self.submod_1_eval" in modal.code
    assert "self.submod_1_train" in modal.train().code
    assert "dropout.default(linear, 0.4, True)" in modal.submod_1_train.code
    assert "dropout.default(linear, 0.4, False)" in modal.submod_1_eval.code


def test_a_mixed_graph_is_refused_with_the_keep_that_pins_its_minority() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5), nn.BatchNorm1d(3))
    model.train()
    model[1].eval()  # a frozen batch norm while fine-tuning
    x = torch.randn(4, 3)
    gm = torch.export.export(copy.deepcopy(model), (x,)).module()
    with pytest.raises(modeswap.UnsupportedGraphError, match=r"the eval sites .* under '1'.*keep=\('1',\)") as raised:
        modeswap.allow_train_eval(gm)
    assert "to_train(gm)" not in str(raised.value)  # swapping first would unfreeze the batch norm
    modal = modeswap.allow_train_eval(gm, keep=("1",))
    for training in (True, False, True):
        model.train(training), modal.train(training)
        model[1].eval()  # the eager loop keeps it frozen; the pin does it for the module
        torch.testing.assert_close(run(modal, (x,), 2), run(model, (x,), 2))
        assert_same_state(model, modal, atol=1e-6, rtol=1e-5)


def test_a_graph_without_sites_starts_in_eval() -> None:
    model = nn.Linear(3, 2)
    args = (torch.randn(2, 3),)
    gm = torch.export.export(model.train(), args).module()
    modal = modeswap.allow_train_eval(gm)
    assert modal.training is False
    assert modeswap.mode_of(modal).mode is None
    torch.testing.assert_close(modal(*args), model(*args))
    torch.testing.assert_close(modal.train()(*args), model(*args))


def test_an_eval_graph_whose_attention_shows_no_mode_starts_in_eval() -> None:
    torch.manual_seed(0)
    model = Attention(8, p=0.3)
    model.drop.p = 0.0  # attention alone: the eval graph has no site at all
    x = torch.randn(3, 5, 8)
    gm = torch.export.export(copy.deepcopy(model).eval(), (x,)).module()
    modal = modeswap.allow_train_eval(gm, attention_dropout=0.3)
    assert modal.training is False
    torch.testing.assert_close(run(modal, (x,), 0), run(model.eval(), (x,), 0))
    torch.testing.assert_close(run(modal.train(), (x,), 0), run(model.train(), (x,), 0))


def test_unknown_attention_dropout_warns_and_can_be_given() -> None:
    torch.manual_seed(0)
    model, args = attention()
    gm = torch.export.export(copy.deepcopy(model).eval(), args).module()
    with pytest.warns(modeswap.UnknownTrainingValueWarning, match="attention_dropout"):
        modeswap.allow_train_eval(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modal = modeswap.allow_train_eval(gm, attention_dropout=0.3)
    torch.testing.assert_close(run(modal.train(), args, 8), run(model.train(), args, 8))


@pytest.mark.parametrize(
    ("module", "error", "match"),
    [
        (nn.Linear(2, 2), modeswap.NotExportedError, "export it first"),
        ("model.pt2", modeswap.NotExportedError, "torch.export.load"),
    ],
)
def test_bad_input_says_what_to_do(module: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        modeswap.allow_train_eval(module)


@pytest.mark.parametrize("p", [-0.1, 1.5, "0.1", True])
def test_a_bad_attention_dropout_is_refused(p: Any) -> None:
    gm = torch.export.export(nn.Dropout(0.1), (torch.randn(2),)).module()
    with pytest.raises(modeswap.InvalidOptionError, match="probability"):
        modeswap.allow_train_eval(gm, attention_dropout=p)


@pytest.mark.parametrize("how", MAKERS)
def test_pickling_is_refused_with_what_to_save_instead(how: str) -> None:
    _, modal, _ = make("conv_net", Mode.TRAIN, how)
    with pytest.raises(TypeError, match=r"state_dict\(\)"):
        pickle.dumps(modal)


@pytest.mark.parametrize("how", MAKERS)
def test_swap_functions_refuse_it_and_say_why(how: str) -> None:
    _, modal, _ = make("conv_net", Mode.TRAIN, how)
    with pytest.raises(modeswap.NotExportedError, match=r"\.train\(\) and \.eval\(\)"):
        modeswap.to_eval(modal)  # type: ignore[type-var]


def test_a_sync_batch_norm_trains_as_eager_outside_a_process_group() -> None:
    # Where there is one process, SyncBatchNorm computes BatchNorm's statistics, and so does the graph; on more
    # ranks the modal module refuses to train it (tests/integration/test_distributed.py).
    torch.manual_seed(0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout()))
    x = torch.randn(4, 3, 8, 8)
    modal = modeswap.capture(model, (x,))
    assert modal.variants[Mode.TRAIN].unsynced == ("1",)
    assert modal.variants[Mode.EVAL].unsynced == ()
    assert assert_trains_like(model, modal, (x,), atol=0, rtol=0) > 0
