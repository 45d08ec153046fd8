"""Real architectures from transformers, every dropout on, swapped both ways and checked against eager PyTorch.

The models come from ``models.py``: tiny configs with random weights, nothing
downloaded. Each is exported in one mode, swapped to the other and run beside
the eager model in that mode under one seed (``modeswap.testing.assert_mode_equivalent``).

Two things an eval export loses, and what modeswap does about each:

- attention dropout (SDPA's ``dropout_p``, eager attention's ``p``) is recorded
  as 0.0: ``to_train`` warns with the ``dropout=`` mapping that would state it,
  and these tests fill in that mapping from the config;
- drop path runs as the identity, so no node of the graph comes from it and
  nothing can bring it back. ``to_train`` of an eval export trains without it,
  and these tests pin that down; a train export keeps it through ``to_eval``
  and back.
"""

from __future__ import annotations

import copy
import warnings

import pytest

pytest.importorskip("transformers")

import torch
import transformers

import modeswap
from modeswap.records.options import decide
from modeswap.testing import assert_mode_equivalent
from modeswap.testing.oracle import assert_same_run, run_forward_backward

from .models import CASES, Case, Output, drop_probabilities

ERASED_ATTENTION = [case for case in CASES if case.attention_dropout is not None]
DROP_PATH_CASES = [case for case in CASES if case.drop_path]


def _ids(cases: list[Case] | tuple[Case, ...]) -> list[str]:
    return [case.name for case in cases]


def _swap_cases() -> list[object]:
    return [
        pytest.param(case, mode, id=f"{case.name}-to_{mode}")
        for case in CASES
        for mode in ("eval", "train")
        if not (case.drop_path and mode == "train")  # see test_an_eval_export_has_no_drop_path_to_restore
    ]


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_every_dropout_is_on(case: Case) -> None:
    model = case.build()
    config = model.model.config
    assert all(p > 0 for p in drop_probabilities(config).values()), drop_probabilities(config)
    assert case.drop_path == any("drop_path" in key for key in drop_probabilities(config))


@pytest.mark.parametrize(("case", "mode"), _swap_cases())
def test_swap_matches_eager(case: Case, mode: str) -> None:
    """Export in the other mode, swap to ``mode``: outputs, buffers and gradients as eager in ``mode``."""
    model = case.build()
    args = case.inputs()
    dropout = None
    if mode == "train" and case.attention_dropout is not None:
        dropout = suggested(torch.export.export(copy.deepcopy(model).eval(), args).module(), case.attention_dropout)
    swapped = assert_mode_equivalent(model, args, mode, dropout=dropout)
    report = modeswap.mode_of(swapped.module)
    assert not report.mixed
    assert report.mode in (modeswap.Mode.parse(mode), None)
    if mode == "eval":
        assert report.stochastic == ()


def suggested(gm: torch.fx.GraphModule, p: float) -> dict[str, float]:
    """The ``dropout=`` mapping that ``to_train``'s warning suggests for ``gm``, every value to edit set to ``p``.

    The patterns it adds at the values the graph records (GPT-2's ``attn.resid_dropout`` inside the
    ``attn`` whose attention it states) keep them.
    """
    with pytest.warns(modeswap.UnknownTrainingValueWarning) as caught:
        modeswap.to_train(gm)
    (warning,) = [w.message for w in caught if isinstance(w.message, modeswap.UnknownTrainingValueWarning)]
    return filled(warning, p)


def filled(warning: modeswap.UnknownTrainingValueWarning, p: float) -> dict[str, float]:
    """``warning.suggestion`` with ``p`` for each pattern that decides a site of unknown value."""
    mapping = tuple(warning.suggestion.items())
    unknown = {decide(mapping, path)[0] for paths in warning.groups.values() for path in paths}  # type: ignore[index]
    return {pattern: p if pattern in unknown else value for pattern, value in mapping}


@pytest.mark.parametrize("case", ERASED_ATTENTION, ids=_ids(ERASED_ATTENTION))
def test_eval_export_warns_that_attention_dropout_is_lost(case: Case) -> None:
    """An eval export records attention dropout as 0.0: ``to_train`` warns and keeps it unless told the value."""
    gm = torch.export.export(case.build().eval(), case.inputs()).module()
    mapping = suggested(gm, case.attention_dropout)
    assert mapping
    with warnings.catch_warnings():
        warnings.simplefilter("error", modeswap.UnknownTrainingValueWarning)
        told = modeswap.to_train(gm, dropout=mapping)
    sites = modeswap.mode_of(told).sites
    attention = {site.params["dropout_p"] for site in sites if site.kind == "attention"}
    dropout = {site.params["p"] for site in sites if site.kind == "dropout"}
    assert attention | dropout
    assert attention <= {case.attention_dropout}
    assert 0.0 not in dropout


@pytest.mark.parametrize("case", DROP_PATH_CASES, ids=_ids(DROP_PATH_CASES))
def test_drop_path_round_trips(case: Case) -> None:
    """Train export, to_eval, to_train: trains as eager does, drop path included, random numbers in order."""
    model = case.build()
    args = case.inputs()
    gm = torch.export.export(copy.deepcopy(model).train(), args).module()
    evaluated = modeswap.to_eval(gm)
    kinds = [site.kind for site in modeswap.mode_of(gm).sites]
    assert kinds.count("drop_path") == [site.kind for site in modeswap.mode_of(evaluated).sites].count("drop_path") > 0
    trainable = modeswap.to_train(evaluated, attention_dropout=case.attention_dropout)
    expected = run_forward_backward(copy.deepcopy(model).train(), args, seed=0)
    actual = run_forward_backward(trainable, args, seed=0)
    assert_same_run(expected, actual, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", DROP_PATH_CASES, ids=_ids(DROP_PATH_CASES))
def test_an_eval_export_has_no_drop_path_to_restore(case: Case) -> None:
    """The documented limit: an eval export never ran the drop path, so to_train cannot add it back."""
    model = case.build()
    args = case.inputs()
    gm = torch.export.export(copy.deepcopy(model).eval(), args).module()
    assert "drop_path" not in {site.kind for site in modeswap.mode_of(gm).sites}
    trainable = modeswap.to_train(gm, attention_dropout=case.attention_dropout)
    assert "drop_path" not in {site.kind for site in modeswap.mode_of(trainable).sites}
    expected = run_forward_backward(copy.deepcopy(model).train(), args, seed=0)
    actual = run_forward_backward(trainable, args, seed=0)
    with pytest.raises(AssertionError, match="output"):
        assert_same_run(expected, actual, atol=1e-6, rtol=1e-5)


def _bart(attention: str) -> transformers.BartConfig:
    # The case: attention dropout 0.1, activation dropout 0.0 (both gated or passed as
    # F.dropout(p, training=self.training) outside an nn.Dropout), hidden dropout 0.1.
    return transformers.BartConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
        dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.0,
        attn_implementation=attention,
    )


def _fill_from_bart_config(
    warning: modeswap.UnknownTrainingValueWarning, config: transformers.BartConfig
) -> dict[str, float]:
    """The warning's mapping with each pattern's value read off the config by the module type it names."""
    by_type = {"BartAttention": config.attention_dropout}
    by_type |= dict.fromkeys(["BartEncoderLayer", "BartDecoderLayer"], config.activation_dropout)
    mapping = tuple(warning.suggestion.items())
    decided = {decide(mapping, path): module_type for module_type, paths in warning.groups.items() for path in paths}
    assert len(decided) == len(mapping)  # each pattern decides the modules of one type
    return {pattern: by_type[module_type] for (pattern, _), module_type in decided.items()}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_bart_eval_export_with_the_suggested_mapping_matches_eager_train(attention: str) -> None:
    config = _bart(attention)
    torch.manual_seed(0)
    model = Output(transformers.BartForConditionalGeneration(config)).train()
    args = (torch.randint(0, 64, (2, 8)), torch.ones(2, 8, dtype=torch.long), torch.randint(0, 64, (2, 6)))
    gm = torch.export.export(copy.deepcopy(model).eval(), args).module()
    with pytest.warns(modeswap.UnknownTrainingValueWarning) as caught:
        blind = modeswap.to_train(gm)
    (warning,) = [w.message for w in caught if isinstance(w.message, modeswap.UnknownTrainingValueWarning)]
    assert set(warning.groups) == {"BartAttention", "BartEncoderLayer", "BartDecoderLayer"}
    assert len(warning.groups["BartAttention"]) == 6  # encoder self, decoder self and cross attention
    assert set(warning.suggestion) == {
        "model.model.encoder.layers.*.self_attn",
        "model.model.decoder.layers.*.self_attn",
        "model.model.decoder.layers.*.encoder_attn",
        "model.model.encoder.layers.*",
        "model.model.decoder.layers.*",
    }
    expected = run_forward_backward(copy.deepcopy(model).train(), args, seed=1)
    # The old advice, attention_dropout=0.1, is for SDPA nodes only: it no longer reaches the other sites.
    if attention == "eager":
        with pytest.raises(modeswap.InvalidOptionError, match=r"attention_dropout=0\.1 is for attention nodes"):
            modeswap.to_train(gm, attention_dropout=config.attention_dropout)
    else:
        with pytest.warns(modeswap.UnknownTrainingValueWarning) as still:
            modeswap.to_train(gm, attention_dropout=config.attention_dropout)
        (unknown,) = [w.message for w in still if isinstance(w.message, modeswap.UnknownTrainingValueWarning)]
        assert set(unknown.groups) == {"BartEncoderLayer", "BartDecoderLayer"}
    with pytest.raises(AssertionError):
        assert_same_run(expected, run_forward_backward(blind, args, seed=1), atol=1e-6, rtol=1e-5)
    mapping = _fill_from_bart_config(warning, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", modeswap.UnknownTrainingValueWarning)
        trained = modeswap.to_train(gm, dropout=mapping)
    assert_same_run(expected, run_forward_backward(trained, args, seed=1), atol=0.0, rtol=0.0)
