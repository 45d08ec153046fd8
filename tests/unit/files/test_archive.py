"""modeswap.save and modeswap.load: both programs of a ModalModule in one PT2 archive, checked against eager."""

from __future__ import annotations

import copy
import gc
import json
import weakref
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.export.pt2_archive._package import load_pt2, package_pt2

import modeswap
from modeswap import Mode
from modeswap.testing.models import AuxiliaryHeads, Net
from modeswap.testing.oracle import assert_same_run, assert_same_state, assert_trains_like, run_forward_backward

X = torch.randn(4, 3, 6, 6)


def net() -> nn.Module:
    """Batch norm, dropout, a non-persistent buffer, and an auxiliary head that only training returns."""
    torch.manual_seed(0)
    return Net(padding=0, momentum=0.2, p=0.3, aux=3, scale=0.5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, modeswap.ModalModule, Path]:
    """An eager model and its capture, trained alike (ending in eval mode), and the capture saved."""
    eager = net().train()
    modal = modeswap.capture(copy.deepcopy(eager), (X,))
    assert_trains_like(eager, modal, (X,))
    path = tmp_path_factory.mktemp("archive") / "trained.pt2"
    modeswap.save(modal, path)
    return eager, modal, path


def same_run(expected: nn.Module, actual: nn.Module, training: bool, seed: int = 7) -> None:
    """Copies of both, in one mode: outputs, buffers and gradients of a forward and a backward under ``seed``."""
    want = run_forward_backward(copy.deepcopy(expected).train(training), (X,), seed=seed)
    got = run_forward_backward(copy.deepcopy(actual).train(training), (X,), seed=seed)
    assert_same_run(want, got, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_trained_module_loads_back_as_the_eager_model_in_each_mode(trained: Any, training: bool) -> None:
    eager, _, path = trained
    loaded = modeswap.load(path)
    same_run(eager, loaded, training)
    outputs = copy.deepcopy(loaded).train(training)(X)
    assert isinstance(outputs, tuple) is training  # the auxiliary head: the train program's own branch


def test_a_loaded_module_trains_on_as_the_eager_model(trained: Any) -> None:
    eager, _, path = trained
    assert_trains_like(copy.deepcopy(eager), modeswap.load(path), (X,))


def test_it_starts_in_the_mode_it_was_saved_in(trained: Any, tmp_path: Path) -> None:
    _, modal, path = trained
    assert modal.training is False
    assert modeswap.load(path).training is False
    trainable = copy.deepcopy(modal).train()
    modeswap.save(trainable, tmp_path / "train.pt2")
    loaded = modeswap.load(tmp_path / "train.pt2")
    assert loaded.training is True
    assert all(m.training for m in loaded.modules())
    assert modeswap.mode_of(loaded).mode is Mode.TRAIN


def test_state_dict_is_the_saved_modules_and_the_eager_models(trained: Any) -> None:
    eager, modal, path = trained
    loaded = modeswap.load(path)
    assert_same_state(modal, loaded)
    assert list(loaded.state_dict()) == list(eager.state_dict())
    torch.testing.assert_close(loaded.state_dict(), eager.state_dict(), atol=1e-6, rtol=1e-5)
    assert torch.equal(loaded.scale, modal.scale)  # the non-persistent buffer travels too, as a constant
    assert int(loaded.bn.num_batches_tracked) == 9


def test_what_is_saved_is_the_module_now_not_at_capture(tmp_path: Path) -> None:
    modal = modeswap.capture(net().eval(), (X,))
    new = {k: torch.rand_like(v) + 0.5 if v.is_floating_point() else v + 5 for k, v in modal.state_dict().items()}
    modal.load_state_dict(new)
    modal.scale.fill_(3.0)
    modeswap.save(modal, tmp_path / "edited.pt2")
    loaded = modeswap.load(tmp_path / "edited.pt2")
    assert_same_state(modal, loaded)
    assert float(loaded.scale) == 3.0
    same_run(modal, loaded, training=False)
    same_run(modal, loaded, training=True)


def test_a_module_moved_with_to_is_saved_as_it_is(tmp_path: Path) -> None:
    eager = net().train()
    modal = modeswap.capture(copy.deepcopy(eager), (X,)).to(torch.float64)
    modeswap.save(modal, tmp_path / "double.pt2")
    loaded = modeswap.load(tmp_path / "double.pt2")
    assert {v.dtype for k, v in loaded.state_dict().items() if k != "bn.num_batches_tracked"} == {torch.float64}
    for training in (True, False):
        want = run_forward_backward(copy.deepcopy(eager).double().train(training), (X.double(),), seed=3)
        got = run_forward_backward(copy.deepcopy(loaded).train(training), (X.double(),), seed=3)
        assert_same_run(want, got, atol=1e-12, rtol=1e-12)


def test_each_weight_is_read_once_and_both_programs_hold_the_modules_own(
    trained: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, path = trained
    programs: list[torch.export.ExportedProgram] = []
    reads: list[str] = []
    deserialized, read_storage = modeswap.files.pt2.deserialized_program, modeswap.files.pt2.Reader.read_storage

    def recording(*args: Any) -> torch.export.ExportedProgram:
        programs.append(deserialized(*args))
        return programs[-1]

    def counted(self: Any, name: str, dtype: torch.dtype) -> torch.UntypedStorage:
        reads.append(name)
        return read_storage(self, name, dtype)

    monkeypatch.setattr(modeswap.files.pt2, "deserialized_program", recording)
    monkeypatch.setattr(modeswap.files.pt2.Reader, "read_storage", counted)
    loaded = modeswap.load(path)
    assert sorted(reads) == sorted(set(reads))
    weights = [name for name in reads if name.startswith("data/weights/")]
    assert len(weights) == len({id(t) for t in loaded.state_dict(keep_vars=True).values()})
    held = {name: id(t) for name, t in loaded.state_dict(keep_vars=True).items()}
    for program in programs:  # the module's tensors are the train program's and the eval program's, not copies
        assert {name: id(t) for name, t in program.state_dict.items()} == held


def test_capture_keeps_none_of_the_eager_models_weights_alive() -> None:
    model = net()
    refs = {name: weakref.ref(t) for name, t in model.state_dict(keep_vars=True).items()}
    modal = modeswap.capture(model, (X,))
    del model
    gc.collect()
    assert [name for name, ref in refs.items() if ref() is not None] == []
    assert all(variant.skeleton is not None for variant in modal.variants.values())


def test_saving_leaves_the_module_as_it_was(trained: Any, tmp_path: Path) -> None:
    _, modal, _ = trained
    module = copy.deepcopy(modal)
    run_forward_backward(module, (X,), seed=1)  # gradients in place, as after a step
    before = {k: (v.data_ptr(), v.clone()) for k, v in module.state_dict(keep_vars=True).items()}
    grads = {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
    attributes, code, training = set(vars(module)), module.code, module.training
    modeswap.save(module, tmp_path / "again.pt2")
    after = module.state_dict(keep_vars=True)
    assert before.keys() == after.keys()
    for k, (pointer, value) in before.items():
        assert after[k].data_ptr() == pointer
        assert torch.equal(after[k], value), k
    assert all(torch.equal(p.grad, grads[k]) for k, p in module.named_parameters() if p.grad is not None)
    assert (set(vars(module)), module.code, module.training) == (attributes, code, training)


def test_the_archive_is_torchs_own_format_whose_tables_name_one_record_per_tensor(trained: Any) -> None:
    _, modal, path = trained
    contents = load_pt2(path)
    assert sorted(contents.exported_programs) == ["eval", "train"]
    header = json.loads(contents.extra_files["modeswap.json"])
    assert (header["mode"], header["version"]) == ("eval", 2)
    evaluated = contents.exported_programs["eval"].module()
    torch.testing.assert_close(evaluated(X), modal.eval()(X))
    for program in contents.exported_programs.values():
        for name, tensor in program.state_dict.items():
            assert torch.equal(tensor, modal.state_dict()[name])
    with zipfile.ZipFile(path) as archive:
        folder = archive.namelist()[0].partition("/")[0]
        tables = {
            mode: json.loads(archive.read(f"{folder}/data/weights/{mode}_weights_config.json"))["config"]
            for mode in ("train", "eval")
        }
        weights = [name for name in archive.namelist() if "/data/weights/weight_" in name]
    assert {k: v["path_name"] for k, v in tables["train"].items()} == {
        k: v["path_name"] for k, v in tables["eval"].items()
    }
    assert len(weights) == len(tables["train"])


def test_a_module_from_allow_train_eval_of_a_program_is_saved(tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.3), nn.Flatten(), nn.Linear(64, 2))
    modal = modeswap.allow_train_eval(torch.export.export(copy.deepcopy(eager).eval(), (X,)))
    assert_trains_like(eager, modal, (X,))
    modeswap.save(modal, tmp_path / "switched.pt2")
    loaded = modeswap.load(tmp_path / "switched.pt2")
    assert loaded.training is False
    assert_same_state(modal, loaded)
    for training in (True, False):
        same_run(eager, loaded, training)


def test_a_module_from_allow_train_eval_of_a_graph_module_is_refused(tmp_path: Path) -> None:
    gm = torch.export.export(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)), (torch.randn(3, 2),)).module()
    with pytest.raises(modeswap.NotExportedError, match=r"allow_train_eval\(ep\)"):
        modeswap.save(modeswap.allow_train_eval(gm), tmp_path / "graph.pt2")
    assert list(tmp_path.iterdir()) == []


def test_what_is_not_a_modal_module_is_refused(tmp_path: Path) -> None:
    program = torch.export.export(nn.Linear(2, 2), (torch.randn(3, 2),))
    with pytest.raises(modeswap.NotExportedError, match=r"ExportedProgram.*torch\.export\.save"):
        modeswap.save(program, tmp_path / "program.pt2")  # type: ignore[arg-type]


def test_a_name_not_ending_in_pt2_is_refused_and_nothing_is_written(trained: Any, tmp_path: Path) -> None:
    _, modal, _ = trained
    with pytest.raises(modeswap.ModeswapError, match=r"ends in \.pt2.*write model\.pt2"):
        modeswap.save(modal, tmp_path / "model.pth")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_nothing_behind(trained: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, modal, _ = trained
    target = tmp_path / "kept.pt2"
    target.write_bytes(b"the old file")

    def failing(stream: Any, *_: Any) -> None:
        stream.write(b"half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(modeswap.files.disk, "pack", failing)
    with pytest.raises(OSError, match="disk full"):
        modeswap.save(modal, target)
    assert target.read_bytes() == b"the old file"
    assert list(tmp_path.iterdir()) == [target]


def one_program(folder: Path) -> Path:
    path = folder / "one.pt2"
    torch.export.save(torch.export.export(net().eval(), (X,)), path)
    return path


def one_mode(folder: Path) -> Path:
    path = folder / "train_only.pt2"
    header = json.dumps({"format": "modeswap.ModalModule", "version": 1, "mode": "train"})
    program = torch.export.export(net().train(), (X,))
    package_pt2(path, exported_programs={"train": program}, extra_files={"modeswap.json": header})
    return path


def later_version(folder: Path) -> Path:
    path = folder / "later.pt2"
    header = json.dumps({"format": "modeswap.ModalModule", "version": 3, "mode": "eval"})
    programs = {mode.value: program for mode, program in modeswap.eager.check.export_modes(net(), (X,)).items()}
    package_pt2(path, exported_programs=programs, extra_files={"modeswap.json": header})
    return path


def text(folder: Path) -> Path:
    path = folder / "text.pt2"
    path.write_text("not an archive")
    return path


def state_dict(folder: Path) -> Path:
    path = folder / "weights.pt2"
    torch.save(net().state_dict(), path)
    return path


@pytest.mark.parametrize(
    ("make", "phrases"),
    [
        (lambda folder: folder / "missing.pt2", ["missing.pt2: no such file"]),
        (one_program, ["one program", "torch.export.load", "modeswap convert"]),
        (one_mode, ["without its eval program", "holding the train program only"]),
        (later_version, ["format version 3", "upgrade modeswap"]),
        (text, ["not a modal archive", "not a zip archive"]),
        (state_dict, ["a torch.save() file"]),
    ],
    ids=["missing", "one_program", "one_mode", "later_version", "text", "state_dict"],
)
def test_bad_files_get_an_error_that_says_what_they_are(make: Any, phrases: list[str], tmp_path: Path) -> None:
    with pytest.raises(modeswap.ModeswapError) as caught:
        modeswap.load(make(tmp_path))
    assert isinstance(caught.value, ValueError)
    for phrase in phrases:
        assert phrase in str(caught.value)


#: A modal archive written at format version 1 (tests/unit/data/make_format1.py made it): later modeswaps read it.
FORMAT_1 = Path(__file__).parents[1] / "data" / "format1.pt2"


def format1_model() -> nn.Module:
    """The eager model of ``FORMAT_1``: ``AuxiliaryHeads`` with weights no random number generator made."""
    model = AuxiliaryHeads(channels=2, classes=2)
    with torch.no_grad():
        for index, (_, tensor) in enumerate(model.state_dict(keep_vars=True).items()):
            if tensor.is_floating_point():
                tensor.copy_(torch.linspace(-0.5, 0.5 + index / 10, tensor.numel()).reshape(tensor.shape).cos())
            else:
                tensor.fill_(3)
    return model.eval()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_an_archive_of_format_1_loads_as_the_eager_model(training: bool) -> None:
    eager, x = format1_model(), torch.linspace(-2, 2, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    loaded = modeswap.load(FORMAT_1)
    assert loaded.training is False
    assert_same_state(eager, loaded)
    want = run_forward_backward(copy.deepcopy(eager).train(training), (x,), seed=5)
    got = run_forward_backward(copy.deepcopy(loaded).train(training), (x,), seed=5)
    assert_same_run(want, got, atol=1e-6, rtol=1e-5)
    assert len(got["outputs"]) == (2 if training else 1)  # the auxiliary head: the train program's own branch
    assert_trains_like(copy.deepcopy(eager), loaded, (x,))


@pytest.mark.parametrize("path", ["bn", "drop"])
def test_every_modules_mode_is_saved_and_restored(tmp_path: Path, path: str) -> None:
    eager = net().train()
    modal = modeswap.capture(copy.deepcopy(eager), (X,)).train()
    modal.get_submodule(path).eval()  # a batch norm frozen, or one dropout off, in a model in train mode
    eager.get_submodule(path).eval()
    modeswap.save(modal, tmp_path / "mixed.pt2")
    loaded = modeswap.load(tmp_path / "mixed.pt2")
    flags = modal.flags()  # every module of the model; the generated code's modules aside
    assert loaded.flags() == flags
    assert flags[""] is True
    assert flags[path] is False
    want = run_forward_backward(copy.deepcopy(eager), (X,), seed=2)
    got = run_forward_backward(copy.deepcopy(loaded), (X,), seed=2)
    assert_same_run(want, got, atol=1e-6, rtol=1e-5)


def test_a_recorded_module_the_loaded_one_lacks_is_named(
    trained: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, modal, _ = trained
    pack = modeswap.files.disk.pack

    def with_a_ghost(stream: Any, programs: Any, extra_files: dict[str, str]) -> None:
        header = json.loads(extra_files["modeswap.json"])
        header["training"]["head.ghost"] = True
        pack(stream, programs, {"modeswap.json": json.dumps(header)})

    monkeypatch.setattr(modeswap.files.disk, "pack", with_a_ghost)
    modeswap.save(modal, tmp_path / "ghost.pt2")
    with pytest.raises(
        modeswap.ModeswapError, match=r"ghost\.pt2: the archive records the mode of a module at 'head\.ghost'"
    ):
        modeswap.load(tmp_path / "ghost.pt2")


def test_saving_again_and_saving_a_loaded_module_serialize_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []
    serialized = modeswap.files.pt2.serialized_program

    def counted(*args: Any) -> tuple[bytes, bytes]:
        calls.append(args)
        return serialized(*args)

    monkeypatch.setattr(modeswap.files.pt2, "serialized_program", counted)
    modal = modeswap.capture(net(), (X,))
    modeswap.save(modal, tmp_path / "first.pt2")
    assert len(calls) == 2  # a program per mode
    run_forward_backward(modal, (X,), seed=0)
    modeswap.save(modal, tmp_path / "second.pt2")  # its tensors changed, its graphs did not
    modeswap.save(copy.deepcopy(modal), tmp_path / "copy.pt2")
    loaded = modeswap.load(tmp_path / "second.pt2")
    modeswap.save(loaded, tmp_path / "again.pt2")
    assert len(calls) == 2
    with zipfile.ZipFile(tmp_path / "first.pt2") as before, zipfile.ZipFile(tmp_path / "again.pt2") as after:
        for mode in ("train", "eval"):
            assert after.read(f"archive/models/{mode}.json") == before.read(f"archive/models/{mode}.json")
    for training in (True, False):
        same_run(modal, modeswap.load(tmp_path / "again.pt2"), training)
    assert_same_state(modal, modeswap.load(tmp_path / "copy.pt2"))


def test_the_mode_it_was_not_saved_in_is_deserialized_on_first_use_once(
    trained: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    eager, modal, path = trained  # saved in eval
    deserialized: list[int] = []
    real = modeswap.files.pt2.deserialized_program
    monkeypatch.setattr(modeswap.files.pt2, "deserialized_program", lambda *a: deserialized.append(0) or real(*a))
    loaded = modeswap.load(path)
    assert len(deserialized) == 1  # the eval program: what the module runs now
    torch.testing.assert_close(loaded(X), copy.deepcopy(eager).eval()(X), atol=1e-6, rtol=1e-5)
    loaded.train()
    assert len(deserialized) == 1  # a switch builds nothing; the first forward in train mode does
    want = run_forward_backward(copy.deepcopy(eager).train(), (X,), seed=3)
    assert_same_run(want, run_forward_backward(loaded, (X,), seed=3), atol=1e-6, rtol=1e-5)
    assert len(deserialized) == 2
    for training in (False, True, False):
        loaded.train(training)(X)
    assert len(deserialized) == 2
    assert loaded.flags() == modal.flags()


def test_the_program_read_later_holds_the_module_as_it_is_then(trained: Any) -> None:
    eager, _, path = trained
    loaded = modeswap.load(path).to(torch.float64)  # saved in eval; the train program is read after .to()
    doubled = copy.deepcopy(eager).to(torch.float64)
    for training in (True, False):
        want = run_forward_backward(copy.deepcopy(doubled).train(training), (X.double(),), seed=3)
        got = run_forward_backward(copy.deepcopy(loaded).train(training), (X.double(),), seed=3)
        assert_same_run(want, got, atol=1e-6, rtol=1e-5)
    copied = copy.deepcopy(modeswap.load(path))  # a copy builds its own, from the records the original read
    assert_trains_like(copy.deepcopy(eager), copied, (X,))


def test_the_weights_read_are_not_kept_alive_for_the_mode_read_later(trained: Any) -> None:
    _, _, path = trained
    loaded = modeswap.load(path)
    read = [weakref.ref(t) for t in loaded.state_dict().values()]
    loaded.to(torch.float64)
    gc.collect()
    assert all(ref() is None for ref in read)  # only the module held them
    assert loaded.train()(X.double())[0].dtype is torch.float64
