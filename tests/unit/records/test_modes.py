"""Mode and the records: frozen, hashable where they should be, picklable, JSON-able."""

from __future__ import annotations

import json
import pickle
from typing import Any

import attrs
import pytest
import torch
from torch import nn

import modeswap
from modeswap import Change, Memo, Mode, ModeReport, ModeswapError, Params, Site, Swap, UnknownModeError

SITE = Site("batch_norm", "aten.batch_norm.default", "batch_norm", Mode.TRAIN, "features.1", {"momentum": 0.3})
CHANGE = Change("dropout", "aten.dropout.default", "train", True, False)
MEMO = Memo({"dropout_p": 0.2}, counter="bn_num_batches_tracked")
REPORT = ModeReport(Mode.EVAL, False, (SITE,), ("randn_like",))
SWAP = Swap(nn.Identity(), Mode.EVAL, (CHANGE,))

RECORDS = [
    pytest.param(SITE, "mode", id="Site"),
    pytest.param(CHANGE, "after", id="Change"),
    pytest.param(MEMO, "counter", id="Memo"),
    pytest.param(REPORT, "mixed", id="ModeReport"),
    pytest.param(SWAP, "changes", id="Swap"),
]

PLAIN_RECORDS = [
    pytest.param(SITE, id="Site"),
    pytest.param(CHANGE, id="Change"),
    pytest.param(MEMO, id="Memo"),
    pytest.param(REPORT, id="ModeReport"),
]


@pytest.mark.parametrize(("record", "field"), RECORDS)
def test_records_are_frozen(record: Any, field: str) -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(record, field, None)


@pytest.mark.parametrize("record", [p.values[0] for p in PLAIN_RECORDS])
def test_records_pickle(record: Any) -> None:
    copy = pickle.loads(pickle.dumps(record))
    assert copy == record
    assert type(copy) is type(record)


@pytest.mark.parametrize("record", PLAIN_RECORDS)
def test_records_go_to_json(record: Any) -> None:
    encoded = json.dumps(attrs.asdict(record))
    assert json.loads(encoded) == json.loads(json.dumps(attrs.asdict(record, value_serializer=_plain)))


def _plain(_inst: object, _field: object, value: Any) -> Any:
    return value.value if isinstance(value, Mode) else value


def test_site_params_are_params() -> None:
    assert type(SITE.params) is Params
    assert type(MEMO.values) is Params


# --- Params ------------------------------------------------------------------

PARAMS = Params({"p": 0.3, "is_causal": True, "name": "x", "none": None})

MUTATIONS = [
    pytest.param(lambda p: p.__setitem__("p", 0.5), id="setitem"),
    pytest.param(lambda p: p.__delitem__("p"), id="delitem"),
    pytest.param(lambda p: p.clear(), id="clear"),
    pytest.param(lambda p: p.pop("p"), id="pop"),
    pytest.param(lambda p: p.popitem(), id="popitem"),
    pytest.param(lambda p: p.setdefault("q", 1), id="setdefault"),
    pytest.param(lambda p: p.update(q=1), id="update"),
    pytest.param(lambda p: p.__ior__({"q": 1}), id="ior"),
]


@pytest.mark.parametrize("mutate", MUTATIONS)
def test_params_are_read_only(mutate: Any) -> None:
    params = Params(PARAMS)
    with pytest.raises(TypeError, match="read-only"):
        mutate(params)
    assert params == PARAMS


def test_params_are_hashable() -> None:
    same = Params([("none", None), ("name", "x"), ("is_causal", True), ("p", 0.3)])
    assert hash(same) == hash(PARAMS)
    assert len({PARAMS, same, Params({"p": 0.4})}) == 2
    assert hash(SITE) == hash(attrs.evolve(SITE))


def test_params_pickle() -> None:
    copy = pickle.loads(pickle.dumps(PARAMS))
    assert type(copy) is Params
    assert copy == PARAMS
    with pytest.raises(TypeError):
        copy["p"] = 0.5


def test_params_go_to_json() -> None:
    assert json.loads(json.dumps(PARAMS)) == {"p": 0.3, "is_causal": True, "name": "x", "none": None}


def test_evolve_makes_a_new_record() -> None:
    changed = attrs.evolve(CHANGE, after=True)
    assert changed.after is True
    assert CHANGE.after is False


# --- Mode.parse --------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (Mode.TRAIN, Mode.TRAIN),
        (Mode.EVAL, Mode.EVAL),
        ("train", Mode.TRAIN),
        ("eval", Mode.EVAL),
        ("TRAIN", Mode.TRAIN),
        ("Eval", Mode.EVAL),
    ],
)
def test_parse_accepts_modes_and_names(given: Any, expected: Mode) -> None:
    assert Mode.parse(given) is expected


@pytest.mark.parametrize("given", ["bogus", "", "training", "evaluation", None, 1, True, Mode])
def test_parse_rejects_others(given: Any) -> None:
    with pytest.raises(UnknownModeError) as info:
        Mode.parse(given)
    message = str(info.value)
    assert "'train'" in message
    assert "'eval'" in message
    assert repr(given) in message
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ModeswapError)


def test_swap_rejects_an_unknown_mode() -> None:
    gm = torch.export.export(nn.Dropout(0.3), (torch.ones(2, 3),)).module()
    with pytest.raises(UnknownModeError, match=r"'bogus'.*'train', 'eval'"):
        modeswap.swap(gm, "bogus")
