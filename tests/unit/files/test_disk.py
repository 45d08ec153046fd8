"""Truncated and damaged ``.pt2`` files are named as such, in the same words by modeswap.load and the command line."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import modeswap
from modeswap.files.disk import archive_names, is_modal_archive, load_program
from modeswap.records.errors import ProgramFileError

EXECUTABLE = shutil.which("modeswap")
X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
DAMAGED = "a truncated or damaged .pt2 file ("


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.2), nn.Flatten(), nn.Linear(64, 2))


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The bytes of a modal archive and of a file of one program."""
    folder = tmp_path_factory.mktemp("whole")
    modeswap.save(modeswap.capture(model(), (X,)), folder / "modal.pt2")
    torch.export.save(torch.export.export(model().eval(), (X,)), folder / "program.pt2")
    # A weight of 2 MiB: its checksum is computed on a thread of its own, while the programs load.
    wide = nn.Sequential(nn.Linear(1024, 512), nn.Dropout(0.1))
    modeswap.save(modeswap.capture(wide, (torch.randn(2, 1024),)), folder / "wide.pt2")
    return {kind: (folder / f"{kind}.pt2").read_bytes() for kind in ("modal", "program", "wide")}


def data_offset(data: bytes, suffix: str) -> tuple[int, int]:
    """Where the bytes of the record whose name ends in ``suffix`` start in ``data``, and how many there are."""
    path = Path("/dev/shm" if Path("/dev/shm").is_dir() else "/tmp") / f"offset-{id(data)}.zip"
    path.write_bytes(data)
    try:
        with zipfile.ZipFile(path) as archive:
            [info] = [i for i in archive.infolist() if i.filename.endswith(suffix)]
    finally:
        path.unlink()
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def flipped(data: bytes, suffix: str) -> bytes:
    """``data`` with one bit flipped in the middle of the record whose name ends in ``suffix``."""
    start, size = data_offset(data, suffix)
    damaged = bytearray(data)
    damaged[start + size // 2] ^= 0x10
    return bytes(damaged)


def command(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert EXECUTABLE is not None, "the modeswap executable is not installed"
    return subprocess.run([EXECUTABLE, *map(str, args)], capture_output=True, text=True, timeout=300, check=False)


def library_message(path: Path, read: Callable[[Path], object]) -> str:
    with pytest.raises(ProgramFileError) as caught:
        read(path)
    return str(caught.value)


def assert_named_damaged(path: Path, phrase: str = "") -> None:
    """``modeswap.load`` names ``path`` as damaged; ``modeswap inspect`` and ``convert`` say the same, exit 2."""
    message = library_message(path, modeswap.load)
    assert f"{path}: {DAMAGED}" in message, message
    assert phrase in message, message
    assert "Save it again, or copy it again" in message
    for argv in (["inspect", path], ["convert", path, "--to", "eval", "-o", path.with_name("out.pt2")]):
        result = command(*argv)
        assert result.returncode == 2, result.stdout + result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("modeswap ")]
        assert lines == [f"modeswap {argv[0]}: {message}"], result.stderr
    assert not path.with_name("out.pt2").exists()


#: Where a file is cut: a fraction of its length, or a count of bytes from its end.
CUTS = [0.05, 0.3, 0.6, 0.95, -30, -1]


@pytest.mark.parametrize("kind", ["modal", "program"])
@pytest.mark.parametrize("cut", CUTS, ids=[f"cut{c}" for c in CUTS])
def test_a_truncated_file_is_named_truncated(whole: dict[str, bytes], tmp_path: Path, kind: str, cut: float) -> None:
    data = whole[kind]
    path = tmp_path / f"{kind}.pt2"
    path.write_bytes(data[: int(len(data) * cut) if cut > 0 else len(data) + int(cut)])
    assert archive_names(path) is None
    assert not is_modal_archive(path)
    assert_named_damaged(path, "its zip directory is missing")
    assert library_message(path, load_program) == library_message(path, modeswap.load)


@pytest.mark.parametrize(
    ("kind", "record"),
    [
        ("modal", "data/weights/weight_0"),
        ("modal", "data/weights/weight_5"),
        ("modal", "models/train.json"),
        ("modal", "models/eval.json"),
        ("modal", "data/weights/eval_weights_config.json"),
        ("wide", "data/weights/weight_0"),
        ("program", "data/weights/weight_0"),
        ("program", "models/model.json"),
    ],
)
def test_a_flipped_bit_in_a_record_is_named_with_the_record(
    whole: dict[str, bytes], tmp_path: Path, kind: str, record: str
) -> None:
    path = tmp_path / f"{kind}.pt2"
    path.write_bytes(flipped(whole[kind], record))
    assert_named_damaged(path, f"{record}: its bytes do not match the checksum")
    if kind == "program":
        assert library_message(path, load_program) == library_message(path, modeswap.load)


def test_a_flipped_bit_in_the_header_is_named_with_it(whole: dict[str, bytes], tmp_path: Path) -> None:
    path = tmp_path / "modal.pt2"
    path.write_bytes(flipped(whole["modal"], "extra/modeswap.json"))
    assert_named_damaged(path, "extra/modeswap.json: BadZipFile: Bad CRC-32")


def test_the_flipped_bit_would_load_silently_in_torch(whole: dict[str, bytes], tmp_path: Path) -> None:
    """torch's own reader checks no checksum: what the checks above catch, it loads as other weights."""
    (tmp_path / "good.pt2").write_bytes(whole["program"])
    (tmp_path / "damaged.pt2").write_bytes(flipped(whole["program"], "data/weights/weight_0"))
    damaged = torch.export.load(tmp_path / "damaged.pt2").state_dict
    good = torch.export.load(tmp_path / "good.pt2").state_dict
    assert any(not torch.equal(damaged[name], good[name]) for name in good)


def test_an_intact_file_reads_as_before(whole: dict[str, bytes], tmp_path: Path) -> None:
    for kind, data in whole.items():
        (tmp_path / f"{kind}.pt2").write_bytes(data)
    assert modeswap.load(tmp_path / "modal.pt2").training is True
    assert modeswap.load(tmp_path / "wide.pt2").get_parameter("0.weight").shape == (512, 1024)
    assert command("inspect", tmp_path / "program.pt2").returncode == 0
