"""The ``modeswap`` command, run as a user runs it: the installed executable in a subprocess."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeswap
from modeswap.testing.models import Attention, AuxiliaryHeads
from modeswap.testing.oracle import assert_same_run, run_forward_backward

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


class Block(nn.Module):
    """Attention, then a dropout written as eager code writes it: its eval graph records no training p."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = Attention(0.1)
        self.linear = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.linear(self.attn(x)), p=0.2 if self.training else 0.0, training=self.training)


class Noise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.randn_like(x) if self.training else x


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
    blocks = nn.Sequential(Block(), Block()).eval()
    torch.export.save(torch.export.export(blocks, (torch.randn(2, 6, 6),)), folder / "blocks.pt2")
    noisy = nn.Sequential(nn.Linear(6, 6), Noise(), nn.Dropout(0.1)).train()
    torch.export.save(torch.export.export(noisy, (torch.randn(2, 6),)), folder / "noisy.pt2")
    return folder


def assert_bad_input(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_demo_passes_every_check_times_against_the_floor_and_says_what_next():
    result = run("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 of 5 checks held." in result.stdout
    assert "FAILED" not in result.stdout
    assert "num_batches_tracked.add_(1)  True -> False" in result.stdout
    assert "momentum=0.05, eps=0.001" in result.stdout
    assert "Time (fastest of 7 runs)" in result.stdout
    [timing] = [line for line in result.stdout.splitlines() if line.strip().startswith("to_eval:")]
    assert "; floor: " in timing
    after = result.stdout.split("checks held.")[1]
    for next_step in ("modeswap inspect", "modeswap convert", "modeswap.to_eval(gm)"):
        assert next_step in after


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"modeswap {modeswap.__version__}"


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["convert", "--help"]])
def test_version_and_help_do_not_import_torch(argv):
    probe = (
        "import sys\n"
        "from modeswap.cli.main import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'attrs', 'toolz'))\n"
        "print('imported:', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "imported: []" in result.stdout


def test_python_dash_m_modeswap_is_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "modeswap", "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout.strip()) == (0, f"modeswap {modeswap.__version__}")


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
        ("truncated.pt2", ("truncated.pt2", "a truncated or damaged .pt2 file")),
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


def test_inspect_shows_training_values_and_pins_with_a_legend(files, tmp_path):
    result = run("inspect", files / "blocks.pt2")
    assert result.returncode == 0, result.stderr
    header, _, *rows = result.stdout.splitlines()[2:8]
    assert header.split() == ["node", "kind", "mode", "module", "call", "training", "value", "kept", "params"]
    assert [row.split()[1:7] for row in rows] == [
        [kind, "eval", path, "functional", "unknown", "no"]
        for block in ("0", "1")
        for kind, path in (("attention", f"{block}.attn"), ("dropout", block))
    ]
    assert "training value=unknown: " in result.stdout
    assert "call=functional: " in result.stdout
    assert "kept=yes" not in result.stdout

    kept = tmp_path / "kept.pt2"
    assert run("convert", files / "train.pt2", "--to", "eval", "--keep", "2", "-o", kept).returncode == 0
    result = run("inspect", kept)
    [dropout] = [line.split() for line in result.stdout.splitlines() if line.startswith("dropout ")]
    assert dropout[1:7] == ["dropout", "train", "2", "module", "known", "yes"]
    assert "kept=yes: " in result.stdout
    sites = json.loads(run("inspect", kept, "--json").stdout)["sites"]
    assert [(s["kind"], s["mode"], s["known"], s["kept"]) for s in sites] == [
        ("batch_norm", "eval", True, False),
        ("dropout", "train", True, True),
    ]


#: torch's own log lines ("W1202 01:52:51.484000 11414 torch/...py:113] triton not found; ..."),
#: which newer torch writes when it is imported: not the command's output.
TORCH_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def own_stderr(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The command's stderr lines, without torch's import-time log lines."""
    return [line for line in result.stderr.strip().splitlines() if not TORCH_LOG.match(line)]


def warning_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    lines = own_stderr(result)
    assert all(line.startswith("modeswap convert: warning: ") for line in lines), result.stderr
    return lines


def test_a_warning_is_one_line_of_flags_that_the_user_can_paste(files, tmp_path):
    result = run("convert", files / "blocks.pt2", "--to", "train", "-o", tmp_path / "guessed.pt2")
    assert result.returncode == 0, result.stderr
    [line] = warning_lines(result)
    assert "modeswap.to_train" not in line
    assert "Warning:" not in line
    assert ".py:" not in line  # no source location
    flags = shlex.split(line.partition("code has them): ")[2].partition(";")[0])
    assert flags == ["--dropout", "*=0.0", "--dropout", "*.attn=0.0"]

    edited = [flag.replace("=0.0", "=0.2") if flag.startswith("*=") else flag.replace("=0.0", "=0.1") for flag in flags]
    out = tmp_path / "stated.pt2"
    result = run("convert", files / "blocks.pt2", "--to", "train", *edited, "-o", out)
    assert (result.returncode, own_stderr(result)) == (0, [])
    sites = modeswap.mode_of(torch.export.load(out)).sites
    assert sorted((s.kind, s.module_path, *s.params.values())[:3] for s in sites) == [
        ("attention", "0.attn", 0.1),
        ("attention", "1.attn", 0.1),
        ("dropout", "0", 0.2),
        ("dropout", "1", 0.2),
    ]


def test_inspect_lists_the_very_sites_whose_value_convert_warns_it_does_not_know(files, tmp_path):
    # An eval export's attention (dropout_p=0.0) is a site: inspect lists it, as convert --to train warns of it.
    result = run("inspect", files / "blocks.pt2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1] == "mode: eval"
    unknown = {line.split()[3] for line in result.stdout.splitlines()[4:] if "unknown" in line.split()}
    assert unknown == {"0", "0.attn", "1", "1.attn"}
    assert "attention at dropout_p=0.0: " in result.stdout
    assert "--attention-dropout P" in result.stdout
    sites = json.loads(run("inspect", files / "blocks.pt2", "--json").stdout)["sites"]
    assert [(s["kind"], s["module_path"], s["mode"], s["known"]) for s in sites if s["kind"] == "attention"] == [
        ("attention", "0.attn", "eval", False),
        ("attention", "1.attn", "eval", False),
    ]
    result = run("convert", files / "blocks.pt2", "--to", "train", "-o", tmp_path / "guessed.pt2")
    [line] = warning_lines(result)
    where = line.partition("keep 0.0 in train mode (")[2].partition(")")[0]
    warned = {path for group in where.split("; ") for path in group.partition(": ")[2].split(", ")}
    assert warned == unknown


def test_inspect_of_attention_alone_says_no_site_tells_the_mode(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "attention.pt2"
    torch.export.save(torch.export.export(nn.Sequential(nn.Flatten(2), Attention(0.1)).eval(), (X,)), path)
    result = run("inspect", path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == "mode: none (no site tells it)"
    assert lines[4].split()[:6] == ["scaled_dot_product_attention", "attention", "eval", "1", "functional", "unknown"]
    assert json.loads(run("inspect", path, "--json").stdout)["mode"] is None


def test_a_stated_value_that_contradicts_the_file_is_an_error_in_flags(files, tmp_path):
    # train.pt2's nn.Dropout(0.3) records its p: --dropout 2=0.5 would have kept 0.3 unremarked.
    result = run("convert", files / "train.pt2", "--to", "train", "--dropout", "2=0.5", "-o", tmp_path / "out.pt2")
    assert_bad_input(
        result,
        "modeswap convert: --dropout 2=0.5 contradicts the graph: dropout (aten.dropout.default, in module '2')",
        "records a training p of 0.3. Leave that module out of the pattern",
        "or state 0.3",
    )
    assert list(tmp_path.iterdir()) == []
    stated = tmp_path / "stated.pt2"
    result = run("convert", files / "train.pt2", "--to", "train", "--dropout", "2=0.3", "-o", stated)
    assert (result.returncode, own_stderr(result)) == (0, [])


class Projected(nn.Module):
    """SDPA gated on training, then an nn.Dropout(0.2) inside the module: a pattern for one reaches the other."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.drop = nn.Linear(6, 18), nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.drop(F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0))


def test_the_warning_gives_the_recorded_values_its_flags_reach_apart_from_those_to_edit(tmp_path):
    path = tmp_path / "projected.pt2"
    torch.export.save(
        torch.export.export(nn.Sequential(Projected(), Projected()).eval(), (torch.randn(2, 5, 6),)), path
    )
    result = run("convert", path, "--to", "train", "-o", tmp_path / "guessed.pt2")
    [line] = warning_lines(result)
    edit, _, recorded = line.partition("code has them): ")[2].partition(";")[0].partition(", and beside them, ")
    assert shlex.split(edit) == ["--dropout", "*=0.0"]
    assert recorded == "as they are, the values the file records: --dropout '*.drop=0.2'"
    out = tmp_path / "stated.pt2"
    result = run("convert", path, "--to", "train", "--dropout", "*=0.1", "--dropout", "*.drop=0.2", "-o", out)
    assert (result.returncode, own_stderr(result)) == (0, [])
    sites = modeswap.mode_of(torch.export.load(out)).sites
    assert [(s.kind, s.module_path, s.mode.value, *s.params.values())[:4] for s in sites] == [
        ("attention", "0", "train", 0.1),
        ("dropout", "0.drop", "train", 0.2),
        ("attention", "1", "train", 0.1),
        ("dropout", "1.drop", "train", 0.2),
    ]


def test_attention_dropout_states_the_attention_nodes(files, tmp_path):
    out = tmp_path / "stated.pt2"
    result = run("convert", files / "blocks.pt2", "--to", "train", "--attention-dropout", "0.1", "-o", out)
    assert result.returncode == 0, result.stderr
    report = modeswap.mode_of(torch.export.load(out))
    assert sorted(s.params.get("dropout_p") for s in report.sites if s.kind == "attention") == [0.1, 0.1]


def test_other_warnings_speak_the_command_line_too(files, tmp_path):
    result = run("convert", files / "noisy.pt2", "--to", "eval", "-o", tmp_path / "eval.pt2")
    assert result.returncode == 0, result.stderr
    [line] = warning_lines(result)
    assert "randn_like" in line
    assert "modeswap inspect lists them" in line
    assert "mode_of" not in line


def test_debug_shows_warnings_as_python_gives_them(files, tmp_path):
    result = run("convert", files / "noisy.pt2", "--to", "eval", "-o", tmp_path / "eval.pt2", "--debug")
    assert result.returncode == 0, result.stderr
    assert "NondeterministicEvalWarning: " in result.stderr
    assert "modeswap.mode_of(gm).stochastic" in result.stderr


@pytest.mark.parametrize(
    ("flag", "phrases"),
    [
        ("encoder", ("'encoder' has no '='", "write PATTERN=P")),
        ("encoder=high", ("'encoder=high'", "after the '=' write the training dropout probability")),
        ("encoder=1.5", ("'encoder=1.5'", "a number from 0 to 1")),
    ],
)
def test_bad_dropout_flags_are_usage_errors_that_say_what_to_write(files, tmp_path, flag, phrases):
    result = run("convert", files / "blocks.pt2", "--to", "train", "--dropout", flag, "-o", tmp_path / "out.pt2")
    assert result.returncode == 2
    [error] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert error.startswith("modeswap convert: error: argument --dropout: ")
    for phrase in phrases:
        assert phrase in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "phrase"),
    [
        (["--to", "eval", "--dropout", "0=0.1"], "give training values: use them with --to train"),
        (["--to", "eval", "--attention-dropout", "0.1"], "give training values: use them with --to train"),
        (["--to", "train", "--dropout", "0=0.1", "--dropout", "0=0.2"], "--dropout gives '0' more than once"),
    ],
)
def test_options_that_mean_nothing_together_are_usage_errors(files, tmp_path, flags, phrase):
    result = run("convert", files / "blocks.pt2", *flags, "-o", tmp_path / "out.pt2")
    assert result.returncode == 2
    [error] = [line for line in result.stderr.splitlines() if line.startswith("modeswap convert: error: ")]
    assert phrase in error
    assert list(tmp_path.iterdir()) == []


def test_a_pattern_that_matches_nothing_is_named_by_its_flag(files, tmp_path):
    result = run("convert", files / "train.pt2", "--to", "eval", "--keep", "encoder.*", "-o", tmp_path / "out.pt2")
    assert_bad_input(result, "--keep pattern 'encoder.*' matches no")
    assert list(tmp_path.iterdir()) == []


def test_debug_works_after_the_command_too(files):
    result = run("inspect", files / "empty.pt2", "--debug")
    assert result.returncode == 2
    assert "Traceback" in result.stderr


def test_an_output_not_named_pt2_is_refused_before_anything_is_written(files, tmp_path):
    result = run("convert", files / "train.pt2", "--to", "eval", "-o", tmp_path / "out.bin")
    assert_bad_input(result, "out.bin", "ends in .pt2", "write out.pt2")
    assert list(tmp_path.iterdir()) == []


def test_an_input_not_named_pt2_loads_without_torchs_log_line(files):
    result = run("inspect", files / "train.bin")
    assert "Unable to load package" not in result.stderr
    assert (result.returncode, own_stderr(result)) == (0, [])
    assert "mode: train" in result.stdout


def auxiliary() -> nn.Module:
    torch.manual_seed(0)
    return AuxiliaryHeads().train()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A modal archive: modeswap.save of the capture of a model whose auxiliary head only training returns."""
    path = tmp_path_factory.mktemp("modal") / "modal.pt2"
    modeswap.save(modeswap.capture(auxiliary(), (X,)), path)
    return path


def test_inspect_shows_both_programs_of_a_modal_archive_and_where_they_differ(archive):
    result = run("inspect", archive)
    assert (result.returncode, own_stderr(result)) == (0, []), result.stderr
    head, _, fidelity = result.stdout.partition("this archive keeps both):\n")
    assert "a modal archive from modeswap.save, saved in train mode" in head
    assert "program train\nmode: train\n" in head
    assert "program eval\nmode: eval\n" in head
    assert "dropout     dropout     eval" in head
    assert fidelity.startswith("train -> eval: 2 difference")
    assert "eval -> train: 2 difference" in fidelity
    rows = [line.split() for line in fidelity.splitlines() if "training branch" in line]
    assert "aux" in [row[0].rstrip(":") for row in rows]


def test_inspect_json_of_a_modal_archive_has_each_programs_report_and_the_fidelity(archive):
    result = run("inspect", archive, "--json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert (found["archive"], found["saved_mode"]) == ("modal", "train")
    assert {mode: report["mode"] for mode, report in found["programs"].items()} == {"train": "train", "eval": "eval"}
    to_eval = found["fidelity"]["train -> eval"]
    assert to_eval["exact"] is False
    assert "aux" in {d["module_path"] for d in to_eval["differences"]}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_writes_the_archives_own_program_of_a_mode_as_it_is(archive, tmp_path, mode):
    out = tmp_path / f"{mode}.pt2"
    result = run("convert", archive, "--to", mode, "-o", out)
    assert result.returncode == 0, result.stderr
    assert f"the archive's {mode} program, as exported (no swap)" in result.stdout
    program = torch.export.load(out)
    assert modeswap.mode_of(program).mode is modeswap.Mode(mode)
    want = run_forward_backward(auxiliary().train(mode == "train"), (X,), seed=2)
    got = run_forward_backward(program.module(), (X,), seed=2)
    assert_same_run(want, got, atol=1e-6, rtol=1e-5)
    assert len(want["outputs"]) == (2 if mode == "train" else 1)


def test_convert_of_a_modal_archive_refuses_the_options_of_a_swap(archive, tmp_path):
    result = run("convert", archive, "--to", "train", "--dropout", "drop=0.1", "--keep", "bn", "-o", tmp_path / "o.pt2")
    assert_bad_input(result, "modal.pt2: a modal archive", "no swap: --dropout and --keep would change nothing")
    assert list(tmp_path.iterdir()) == []
