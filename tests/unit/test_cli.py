"""The ``modeswap`` command, run as a user runs it: the installed executable in a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import modeswap

EXECUTABLE = shutil.which("modeswap")
pytestmark = pytest.mark.skipif(EXECUTABLE is None, reason="the modeswap executable is not installed")


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert EXECUTABLE is not None
    command = [EXECUTABLE, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, cwd=cwd)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.2), nn.Dropout(0.3))


X = torch.randn(2, 3, 6, 6)


def aoti_package(path: Path) -> None:
    """Write a zip laid out as torch._inductor.aoti_compile_and_package lays out its .pt2 (building one takes ~40 s)."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in [
            ("data/aotinductor/model/c7qy.wrapper.cpp", b"// generated"),
            ("data/aotinductor/model/c7qy.wrapper.so", b"\x7fELF"),
            ("data/aotinductor/model/c7qy.wrapper_metadata.json", b"{}"),
            ("archive_format", b"pt2"),
            ("archive_version", b"1"),
            (".data/version", b"2"),
            ("byteorder", b"little"),
        ]:
            archive.writestr(f"{path.stem}/{name}", data)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of good and bad .pt2 files."""
    folder = tmp_path_factory.mktemp("pt2")
    torch.export.save(torch.export.export(model().train(), (X,)), folder / "train.pt2")
    decomposed = torch.export.export(model().eval(), (X,)).run_decompositions()
    torch.export.save(decomposed, folder / "decomposed.pt2")
    torch.save(model().state_dict(), folder / "weights.pt2")
    (folder / "text.pt2").write_text("not a program")
    (folder / "empty.pt2").write_bytes(b"")
    whole = (folder / "train.pt2").read_bytes()
    (folder / "truncated.pt2").write_bytes(whole[: len(whole) // 2])
    (folder / "train.bin").write_bytes(whole)
    aoti_package(folder / "compiled.pt2")
    with zipfile.ZipFile(folder / "zip.pt2", "w") as archive:
        archive.writestr("notes/readme.txt", "a zip, not a program")
    return folder


def assert_bad_input(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_demo_passes_every_check():
    result = run("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 of 5 checks held." in result.stdout
    assert "FAILED" not in result.stdout
    assert "num_batches_tracked.add_(1)  True -> False" in result.stdout
    assert "momentum=0.05, eps=0.001" in result.stdout


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"modeswap {modeswap.__version__}"


def test_help_lists_the_demo():
    result = run("--help")
    assert result.returncode == 0
    assert "demo" in result.stdout


def test_unknown_command_is_a_usage_error():
    result = run("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_inspect_prints_the_report(files):
    result = run("inspect", files / "train.pt2")
    assert result.returncode == 0, result.stderr
    assert "mode: train" in result.stdout
    assert "momentum=0.2" in result.stdout


def test_inspect_json_is_the_report(files):
    result = run("inspect", files / "train.pt2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["mode"], report["mixed"], report["stochastic"]) == ("train", False, [])
    assert [(s["kind"], s["mode"], s["params"]) for s in report["sites"]] == [
        ("batch_norm", "train", {"momentum": 0.2, "eps": 1e-5}),
        ("dropout", "train", {"p": 0.3}),
    ]


def test_convert_writes_a_swapped_program_and_leaves_the_input(files, tmp_path):
    before = (files / "train.pt2").read_bytes()
    out = tmp_path / "eval.pt2"
    result = run("convert", files / "train.pt2", "--to", "eval", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "3 change(s)" in result.stdout
    assert (files / "train.pt2").read_bytes() == before
    program = torch.export.load(out)
    assert modeswap.mode_of(program).mode is modeswap.Mode.EVAL
    torch.testing.assert_close(program.module()(X), model().eval()(X), atol=1e-6, rtol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["eval.pt2"]


def test_convert_does_not_overwrite_without_force(files, tmp_path):
    out = tmp_path / "out.pt2"
    out.write_bytes(b"keep me")
    assert_bad_input(run("convert", files / "train.pt2", "--to", "eval", "-o", out), "already exists", "--force")
    assert out.read_bytes() == b"keep me"
    assert run("convert", files / "train.pt2", "--to", "eval", "-o", out, "--force").returncode == 0
    assert modeswap.mode_of(torch.export.load(out)).mode is modeswap.Mode.EVAL


@pytest.mark.parametrize(
    ("name", "phrases"),
    [
        ("missing.pt2", ("missing.pt2", "no such file")),
        (".", ("is a directory",)),
        ("empty.pt2", ("empty.pt2", "empty")),
        ("text.pt2", ("text.pt2", "not a program saved with torch.export.save")),
        ("truncated.pt2", ("truncated.pt2", "not a program saved with torch.export.save")),
        ("weights.pt2", ("weights.pt2", "torch.save() file")),
        ("compiled.pt2", ("compiled.pt2", "compiled by AOTInductor", "Swap the ExportedProgram, then compile")),
        ("zip.pt2", ("zip.pt2", "a zip archive that holds no exported program")),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_bad_input_files_get_one_line_and_exit_2(files, tmp_path, command, name, phrases):
    extra = ["--to", "eval", "-o", tmp_path / "out.pt2"] if command == "convert" else []
    assert_bad_input(run(command, files / name, *extra), *phrases)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("output", "phrases"),
    [
        ("missing-dir/out.pt2", ("does not exist",)),
        ("/proc/out.pt2", ("cannot write in /proc",)),
        (".", ("is a directory",)),
    ],
)
def test_bad_outputs_get_one_line_and_exit_2(files, output, phrases):
    assert_bad_input(run("convert", files / "train.pt2", "--to", "eval", "-o", output, cwd=files), *phrases)


def test_converting_onto_the_input_is_refused(files):
    before = (files / "train.pt2").read_bytes()
    result = run("convert", files / "train.pt2", "--to", "eval", "-o", files / "train.pt2", "--force")
    assert_bad_input(result, "is the input file")
    assert (files / "train.pt2").read_bytes() == before


def test_a_decomposed_program_is_refused(files, tmp_path):
    result = run("convert", files / "decomposed.pt2", "--to", "train", "-o", tmp_path / "out.pt2")
    assert_bad_input(result, "run_decompositions()")
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_mode_is_a_usage_error(files, tmp_path):
    result = run("convert", files / "train.pt2", "--to", "evaluation", "-o", tmp_path / "out.pt2")
    assert result.returncode == 2
    assert "invalid choice: 'evaluation'" in result.stderr


def test_debug_shows_the_traceback(files):
    result = run("--debug", "inspect", files / "empty.pt2")
    assert result.returncode == 2
    assert "Traceback" in result.stderr


def test_an_output_not_named_pt2_is_refused_before_anything_is_written(files, tmp_path):
    result = run("convert", files / "train.pt2", "--to", "eval", "-o", tmp_path / "out.bin")
    assert_bad_input(result, "out.bin", "ends in .pt2", "write out.pt2")
    assert list(tmp_path.iterdir()) == []


def test_an_input_not_named_pt2_loads_without_torchs_log_line(files):
    result = run("inspect", files / "train.bin")
    assert (result.returncode, result.stderr) == (0, "")
    assert "mode: train" in result.stdout
