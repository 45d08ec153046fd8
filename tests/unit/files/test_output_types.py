"""Programs that return namedtuples, dataclasses and transformers ModelOutputs save, and read back in a fresh process.

Each reader runs in a subprocess, a fresh interpreter that has imported none of
the modules defining the output types: ``modeswap.load``, ``modeswap inspect``
and ``modeswap convert`` import them by the names the file gives.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import archived_models
import pytest
import registering  # noqa: F401  (registers archived_models.Unregistered, as a user's module would)
import torch
from archived_models import GoogLeNetLike, GoogLeNetOutputs, Prediction, Predictor, Unregistered, seeded, tokens

import modeswap
from modeswap.testing.oracle import assert_same_run, run_forward_backward

#: The folder of archived_models: on PYTHONPATH, a fresh interpreter imports it by name.
HELPERS = Path(archived_models.__file__).parent
X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
EXECUTABLE = shutil.which("modeswap")


def environment(*, helpers: bool) -> dict[str, str]:
    """This process's environment; with ``helpers``, archived_models importable too."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if helpers:
        paths.append(str(HELPERS))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def python(code: str, *, helpers: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter."""
    command = [sys.executable, "-c", textwrap.dedent(code)]
    env = environment(helpers=helpers)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, env=env)


def command(*args: str | Path, helpers: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the ``modeswap`` command in a fresh interpreter."""
    assert EXECUTABLE is not None, "the modeswap executable is not installed"
    env = environment(helpers=helpers)
    return subprocess.run(
        [EXECUTABLE, *map(str, args)], capture_output=True, text=True, timeout=300, check=False, env=env
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a bad input gets on stderr (exit 2), less torch's own log lines."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("modeswap ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of archives of models with namedtuple and dataclass outputs."""
    folder = tmp_path_factory.mktemp("outputs")
    modeswap.save(modeswap.capture(seeded(GoogLeNetLike).train(), (X,)), folder / "googlenet.pt2")
    modeswap.save(modeswap.capture(seeded(Predictor).eval(), (torch.randn(2, 4),)), folder / "prediction.pt2")
    modeswap.save(modeswap.capture(seeded(Predictor, False), (torch.randn(2, 4),)), folder / "unregistered.pt2")
    return folder


def test_a_namedtuple_output_saves_and_loads_as_its_own_type(archives: Path) -> None:
    eager = seeded(GoogLeNetLike)
    loaded = modeswap.load(archives / "googlenet.pt2")
    for training in (True, False):
        want = run_forward_backward(copy.deepcopy(eager).train(training), (X,), seed=1)
        got = run_forward_backward(copy.deepcopy(loaded).train(training), (X,), seed=1)
        assert_same_run(want, got, atol=1e-6, rtol=1e-5)
    assert type(loaded.train()(X)) is GoogLeNetOutputs
    features = loaded.eval()(X)["features"]
    assert type(features).__name__ == "Features"
    assert features._fields == ("pooled", "logits")


def test_a_dataclass_registered_without_a_name_saves_under_its_module_and_name(archives: Path) -> None:
    loaded = modeswap.load(archives / "prediction.pt2")
    out = loaded(torch.ones(2, 4))
    assert type(out) is Prediction
    torch.testing.assert_close(out.logits, seeded(Predictor).eval()(torch.ones(2, 4)).logits)
    assert torch.utils._pytree.SUPPORTED_SERIALIZED_TYPES[Prediction].serialized_type_name == (
        "archived_models.Prediction"
    )


#: Loads an archive in a fresh interpreter, then checks it against the eager model, built after the load.
FRESH_LOAD = """
    import sys, copy, torch, modeswap
    loaded = modeswap.load(sys.argv[1] if len(sys.argv) > 1 else {path!r})
    assert "archived_models" in sys.modules  # imported by the load, by the name the file gives
    import archived_models
    from modeswap.testing.oracle import assert_same_run, run_forward_backward
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    eager = archived_models.seeded(archived_models.GoogLeNetLike)
    for training in (True, False):
        want = run_forward_backward(copy.deepcopy(eager).train(training), (x,), seed=1)
        got = run_forward_backward(copy.deepcopy(loaded).train(training), (x,), seed=1)
        assert_same_run(want, got, atol=1e-6, rtol=1e-5)
    assert type(loaded.train()(x)) is archived_models.GoogLeNetOutputs
    print("ok")
"""


def test_a_fresh_interpreter_loads_it_importing_the_module_of_the_namedtuple(archives: Path) -> None:
    result = python(FRESH_LOAD.format(path=str(archives / "googlenet.pt2")))
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr


def test_a_fresh_command_line_reads_and_converts_it(archives: Path, tmp_path: Path) -> None:
    result = command("inspect", archives / "googlenet.pt2")
    assert result.returncode == 0, result.stderr
    assert "saved in train mode" in result.stdout
    for mode in ("train", "eval"):
        out = tmp_path / f"{mode}.pt2"
        result = command("convert", archives / "googlenet.pt2", "--to", mode, "-o", out)
        assert result.returncode == 0, result.stderr
        result = command("inspect", out)  # a file of one program, read in a fresh interpreter too
        assert (result.returncode, f"mode: {mode}" in result.stdout) == (0, True), result.stderr
    program = torch.export.load(tmp_path / "train.pt2")
    assert type(program.module()(X)) is GoogLeNetOutputs


@pytest.mark.parametrize("reader", ["load", "inspect", "convert"])
def test_an_output_type_whose_module_cannot_be_imported_is_named_with_what_to_do(
    archives: Path, tmp_path: Path, reader: str
) -> None:
    path = archives / "googlenet.pt2"
    if reader == "load":
        result = python(f"import modeswap; modeswap.load({str(path)!r})", helpers=False)
        assert result.returncode == 1
        message = result.stderr.strip().splitlines()[-1]
        assert message.startswith("modeswap.records.errors.ProgramFileError: ")
    else:
        extra = ["--to", "eval", "-o", tmp_path / "out.pt2"] if reader == "convert" else []
        message = one_line(command(reader, path, *extra, helpers=False))
        assert list(tmp_path.iterdir()) == []
    for phrase in ("archived_models.GoogLeNetOutputs", "No module named 'archived_models'", "--import MODULE"):
        assert phrase in message, message


def test_a_type_that_only_another_module_registers_needs_import(archives: Path, tmp_path: Path) -> None:
    path = archives / "unregistered.pt2"
    message = one_line(command("inspect", path))
    for phrase in ("archived_models.Unregistered", "did not register it", "--import MODULE"):
        assert phrase in message, message
    result = command("inspect", path, "--import", "registering")
    assert result.returncode == 0, result.stderr
    result = command("convert", path, "--import", "registering", "--to", "eval", "-o", tmp_path / "eval.pt2")
    assert result.returncode == 0, result.stderr
    assert type(torch.export.load(tmp_path / "eval.pt2").module()(torch.ones(2, 4))) is Unregistered


def test_an_import_that_fails_is_a_bad_option(archives: Path) -> None:
    message = one_line(command("inspect", archives / "googlenet.pt2", "--import", "no_such_module_here"))
    assert "--import no_such_module_here: importing it failed (ModuleNotFoundError" in message


@pytest.fixture(scope="module")
def transformers_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Files of transformers models, which return ModelOutputs: an archive and a program of each, eager outputs."""
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("transformers")
    found: dict[str, Any] = {"folder": folder}
    ids = tokens()
    for name, build in (("bert", archived_models.bert_classifier), ("gpt2", archived_models.gpt2)):
        eager = build()
        modeswap.save(modeswap.capture(copy.deepcopy(eager).train(), (ids,)), folder / f"{name}.pt2")
        torch.export.save(torch.export.export(copy.deepcopy(eager).eval(), (ids,)), folder / f"{name}_program.pt2")
        found[name] = {
            mode: run_forward_backward(copy.deepcopy(eager).train(mode == "train"), (ids,), seed=4)
            for mode in ("train", "eval")
        }
    return found


#: Loads a transformers archive in a fresh interpreter, and writes what each mode computes.
TRANSFORMERS_LOAD = """
    import sys, copy, torch
    import modeswap
    from modeswap.testing.oracle import run_forward_backward
    assert "transformers" not in sys.modules
    loaded = modeswap.load(sys.argv[1])
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    found = {}
    for mode in ("train", "eval"):
        found[mode] = run_forward_backward(copy.deepcopy(loaded).train(mode == "train"), (ids,), seed=4)
        found[mode + "_type"] = type(loaded.train(mode == "train")(ids)).__module__
    torch.save(found, sys.argv[2])
"""


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_a_transformers_archive_loads_in_a_fresh_interpreter(transformers_files: dict[str, Any], name: str) -> None:
    folder = transformers_files["folder"]
    script = textwrap.dedent(TRANSFORMERS_LOAD)
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder / f"{name}.pt2"), str(folder / f"{name}_found.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=environment(helpers=False),
    )
    assert result.returncode == 0, result.stderr
    found = torch.load(folder / f"{name}_found.pt", weights_only=False)
    for mode in ("train", "eval"):
        assert found[f"{mode}_type"] == "transformers.modeling_outputs"
        assert_same_run(transformers_files[name][mode], found[mode], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
@pytest.mark.parametrize("kind", ["archive", "program"])
def test_a_fresh_command_line_reads_and_converts_transformers_files(
    transformers_files: dict[str, Any], tmp_path: Path, name: str, kind: str
) -> None:
    path = transformers_files["folder"] / (f"{name}.pt2" if kind == "archive" else f"{name}_program.pt2")
    result = command("inspect", path, helpers=False)
    assert result.returncode == 0, result.stderr
    assert "not a program saved with torch.export.save" not in result.stderr
    out = tmp_path / "train.pt2"
    # A program exported in eval mode is swapped, stating its attention dropout; an archive holds its own.
    flags = ["--attention-dropout", "0.1"] if kind == "program" else []
    result = command("convert", path, "--to", "train", *flags, "-o", out, helpers=False)
    assert result.returncode == 0, result.stderr
    module = torch.export.load(out).module()
    assert type(module(tokens())).__module__ == "transformers.modeling_outputs"
