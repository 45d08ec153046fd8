"""modeswap's readings of torch's private serializer give what torch's own give, on real programs.

Run on the newest torch too: ``.ci/newest-torch python -m pytest tests/unit/files/test_pt2.py``.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from typing import Any

import pytest
import torch
from archived_models import GoogLeNetLike, Predictor, Tied, seeded, tokens
from torch import nn
from torch._export.serde.serialize import _dict_to_dataclass, serialize

from modeswap.files import pt2


class Branching(nn.Module):
    """A ``torch.cond``: a subgraph per branch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda y: self.drop(self.linear(y)), lambda y: y * 2, (x,))  # type: ignore[no-any-return]


def dynamic() -> torch.export.ExportedProgram:
    """A program with a dynamic batch size: range constraints and symbolic shapes in the JSON."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.2)).train()
    batch = torch.export.Dim("batch", min=2, max=64)
    return torch.export.export(model, (torch.randn(4, 4),), dynamic_shapes=({0: batch},))


def bert() -> torch.export.ExportedProgram:
    from archived_models import bert_classifier

    return torch.export.export(bert_classifier().train(), (tokens(),))


PROGRAMS: dict[str, Callable[[], torch.export.ExportedProgram]] = {
    "googlenet_train": lambda: torch.export.export(seeded(GoogLeNetLike).train(), (torch.randn(2, 3, 6, 6),)),
    "googlenet_eval": lambda: torch.export.export(seeded(GoogLeNetLike).eval(), (torch.randn(2, 3, 6, 6),)),
    "dataclass": lambda: torch.export.export(seeded(Predictor), (torch.randn(2, 4),)),
    "tied": lambda: torch.export.export(seeded(Tied), (tokens(),)),
    "dynamic": dynamic,
    "cond": lambda: torch.export.export(seeded(Branching), (torch.randn(3, 4),)),
    "bert": bert,
}


@pytest.fixture(scope="module", params=list(PROGRAMS))
def program(request: pytest.FixtureRequest) -> torch.export.ExportedProgram:
    if request.param == "bert":
        pytest.importorskip("transformers")
    from modeswap.files.output_types import name_for_saving

    exported = PROGRAMS[request.param]()
    # What modeswap.save does first: give the namedtuples in the specs a name, so that torch can write them.
    name_for_saving(spec for entry in exported.module_call_graph if entry.signature for spec in _specs(entry))
    return exported


def _specs(entry: Any) -> tuple[Any, ...]:
    return (entry.signature.in_spec, entry.signature.out_spec)


def records(program: torch.export.ExportedProgram) -> dict[str, Any]:
    """The JSON records of ``program`` as ``torch.export.save`` writes them, parsed, by name."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with zipfile.ZipFile(buffer) as archive:
        return {
            name.partition("/")[2]: json.loads(archive.read(name))
            for name in archive.namelist()
            if name.endswith(".json")
        }


def test_the_converter_gives_what_torchs_gives(program: torch.export.ExportedProgram) -> None:
    found = records(program)
    mine = pt2.from_json(pt2.schema.ExportedProgram, found["models/model.json"])
    assert mine == _dict_to_dataclass(pt2.schema.ExportedProgram, found["models/model.json"])
    for table in ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json"):
        assert pt2.from_json(pt2.schema.PayloadConfig, found[table]) == _dict_to_dataclass(
            pt2.schema.PayloadConfig, found[table]
        )


def test_the_converter_keeps_torchs_forward_compatibility_and_errors() -> None:
    meta = {"path_name": "weight_0", "is_param": True, "use_pickle": False, "tensor_meta": None, "later": 1}
    assert pt2.from_json(pt2.schema.PayloadMeta, meta) == _dict_to_dataclass(pt2.schema.PayloadMeta, meta)
    for bad in ({"as_int": 1, "as_float": 2.0}, [1]):
        with pytest.raises(AssertionError) as torchs:
            _dict_to_dataclass(pt2.schema.SymInt, bad)
        with pytest.raises(AssertionError) as mine:
            pt2.from_json(pt2.schema.SymInt, bad)
        assert str(mine.value) == str(torchs.value)


def test_serialized_program_is_the_bytes_torch_serializes(program: torch.export.ExportedProgram) -> None:
    artifact = serialize(program, serialize_state_dict=False, serialize_constants=False)
    graph, inputs = pt2.serialized_program(**pt2.program_parts(program))
    assert graph == artifact.exported_program
    assert inputs == artifact.example_inputs


def test_a_program_read_back_computes_as_torchs(program: torch.export.ExportedProgram) -> None:
    found = records(program)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    state, constants = dict(program.state_dict), dict(program.constants)
    graph, inputs = pt2.serialized_program(**pt2.program_parts(program))
    parsed = pt2.from_json(pt2.schema.ExportedProgram, json.loads(graph))
    mine = pt2.deserialized_program(parsed, state, constants, inputs)
    torchs = torch.export.load(io.BytesIO(buffer.getvalue()))
    assert found["models/model.json"] == json.loads(graph)
    assert str(mine.graph) == str(torchs.graph)
    assert mine.graph_signature == torchs.graph_signature
    assert [entry.fqn for entry in mine.module_call_graph] == [entry.fqn for entry in torchs.module_call_graph]
