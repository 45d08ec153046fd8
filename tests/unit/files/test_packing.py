"""Several programs' tensors in one PT2 archive: each storage stored once, read once, views and objects kept."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from modeswap.files import pt2
from modeswap.files.packing import Packed, identities, pack, unpack


@pytest.fixture(scope="module")
def records() -> tuple[bytes, bytes]:
    """A program's two records: unpack parses them, whatever tensors the tables hold."""
    program = torch.export.export(nn.Linear(2, 2), (torch.randn(1, 2),))
    return pt2.serialized_program(**pt2.program_parts(program))


def tensors() -> dict[str, Any]:
    """Tensors that share storages in every way a module's can."""
    base = torch.arange(12, dtype=torch.float32)
    weight = nn.Parameter(base.view(3, 4))
    return {
        "weight": weight,
        "same_memory": nn.Parameter(base.view(3, 4)),  # another Parameter over the same memory: not tied
        "row": base[4:8],  # another view of the storage
        "transposed": weight.detach().t(),  # strides of its own
        "bits": base.view(torch.int32)[:3],  # another dtype over the storage
        "frozen": nn.Parameter(torch.ones(2), requires_grad=False),
        "apart": torch.zeros(5),
        "meta": torch.empty(4, 4, device="meta"),
        "empty": torch.empty(0),
        "count": torch.tensor(7),
    }


def archive(programs: dict[str, Packed]) -> tuple[Path, dict[str, dict[str, int]]]:
    buffer = io.BytesIO()
    pack(buffer, programs, {"note.txt": "hello"})
    path = Path(f"/tmp/packing-{id(buffer)}.pt2")
    path.write_bytes(buffer.getvalue())
    return path, identities(programs)


def test_each_storage_is_one_record_and_comes_back_as_views_of_one(records: tuple[bytes, bytes]) -> None:
    given = tensors()
    train = Packed(*records, state=given, constants={"apart_too": given["apart"]})
    evaluated = Packed(*records, state={k: given[k] for k in ("weight", "row")}, constants={})
    path, numbers = archive({"train": train, "eval": evaluated})
    try:
        with zipfile.ZipFile(path) as zipped:
            stored = [n.partition("/")[2] for n in zipped.namelist() if "/data/weights/weight_" in n]
            assert zipped.read(next(n for n in zipped.namelist() if n.endswith("extra/note.txt"))) == b"hello"
        # base (float32), base as int32, frozen, apart, meta, empty, count: one record each.
        assert len(stored) == 7
        with pt2.Reader(path) as reader:
            found = unpack(reader, ["train", "eval"], numbers)
    finally:
        path.unlink()
    state = found["train"].state
    for name, value in given.items():
        assert type(state[name]) is type(value), name
        got, want = state[name], value
        assert (got.shape, got.dtype, got.stride(), got.requires_grad) == (
            want.shape,
            want.dtype,
            want.stride(),
            want.requires_grad,
        ), name
        if not value.is_meta:
            assert torch.equal(state[name], value), name
    assert state["meta"].is_meta
    pointers = {name: state[name].untyped_storage().data_ptr() for name in ("weight", "same_memory", "row")}
    assert len(set(pointers.values())) == 1
    # torch's reader reads a record in the dtype of the first row naming it: another dtype needs its own.
    assert state["bits"].untyped_storage().data_ptr() not in pointers.values()
    assert state["same_memory"] is not state["weight"]
    assert found["eval"].state["weight"] is state["weight"]  # one object in both programs
    assert found["eval"].state["row"] is state["row"]
    assert found["train"].constants["apart_too"] is state["apart"]  # one object, though each folder has a record
    with torch.no_grad():
        state["weight"][0, 1] = 100.0
    assert state["row"][0] == 4.0
    assert state["same_memory"][0, 1] == 100.0


def test_without_identities_views_of_one_record_are_tied_as_torch_untied_them(records: tuple[bytes, bytes]) -> None:
    base = torch.randn(3, 4)
    tied = nn.Parameter(base)
    given = {"emb": tied, "out": tied, "other": nn.Parameter(base.clone()), "buffer": base}
    path, _ = archive({"model": Packed(*records, state=given, constants={})})
    try:
        with pt2.Reader(path) as reader:
            state = unpack(reader, ["model"], None)["model"].state
    finally:
        path.unlink()
    assert state["emb"] is state["out"]
    assert state["other"] is not state["emb"]
    assert state["buffer"] is not state["emb"]  # a plain tensor is no Parameter: not one object
    assert state["buffer"].untyped_storage().data_ptr() == state["emb"].untyped_storage().data_ptr()


def test_the_tables_are_torchs_rows(records: tuple[bytes, bytes]) -> None:
    given = tensors()
    path, _ = archive({"model": Packed(*records, state=given, constants={})})
    try:
        with zipfile.ZipFile(path) as zipped:
            name = next(n for n in zipped.namelist() if n.endswith("model_weights_config.json"))
            table = json.loads(zipped.read(name))
    finally:
        path.unlink()
    config = pt2.from_json(pt2.schema.PayloadConfig, table).config
    assert set(config) == set(given)
    assert config["weight"].path_name == config["row"].path_name == config["same_memory"].path_name
    assert config["weight"].is_param
    assert not config["row"].is_param
    assert pt2.tensor_layout(config["row"].tensor_meta)[1:4] == ((4,), (1,), 4)
