"""The pass machinery: a pass returns a new module and leaves its input alone, one copy per pipeline, composition.

Also the PassManager adapter, and the copy itself. The fixtures ``x`` and ``train_gm`` are tests/unit/conftest.py's.
"""

from __future__ import annotations

import copy
import types

import pytest
import toolz
import torch
from torch import nn
from torch.fx.passes.infra.pass_manager import PassManager

import modeswap
from modeswap import Mode, passes
from modeswap.rewrite import base
from modeswap.testing import Snapshot, assert_same_run, call_signature, run_forward_backward


def test_a_pass_returns_a_new_module_and_leaves_its_input_alone(train_gm, x):
    before = Snapshot.of(train_gm)
    evaluated = passes.swap_dropout(Mode.EVAL)(train_gm)
    evaluated(x)
    assert evaluated is not train_gm
    assert Snapshot.of(train_gm) == before
    assert [n.args[1:] for n in evaluated.graph.nodes if n.name == "dropout"] == [(0.25, False)]
    assert [n.args[1:] for n in train_gm.graph.nodes if n.name == "dropout"] == [(0.25, True)]


def test_pipeline_copies_once_and_compiles_once(train_gm, monkeypatch):
    copies, compiles = [], []
    real_copy, real_recompile = base.copy_module, torch.fx.GraphModule.recompile
    monkeypatch.setattr(base, "copy_module", lambda *a, **k: copies.append(1) or real_copy(*a, **k))
    monkeypatch.setattr(torch.fx.GraphModule, "recompile", lambda self: compiles.append(1) or real_recompile(self))
    passes.swap_pipeline(Mode.EVAL)(train_gm)
    assert (len(copies), len(compiles)) == (1, 1)
    compiles.clear()
    modeswap.pipeline(passes.swap_dropout("eval"))(train_gm)  # no recompile listed: the pipeline adds it
    assert len(compiles) == 1


def test_empty_pipeline_is_the_identity(train_gm, x):
    same = modeswap.pipeline()(train_gm)
    assert same is not train_gm
    assert call_signature(same) == call_signature(train_gm)
    assert_same_run(
        run_forward_backward(train_gm, (x,), seed=3),
        run_forward_backward(same, (x,), seed=3),
        atol=0,
        rtol=0,
    )


def test_pipelines_nest(train_gm):
    inner = modeswap.pipeline(passes.swap_dropout("eval"), passes.swap_batchnorm("eval"))
    outer = modeswap.pipeline(passes.eliminate_dead_code, inner, passes.recompile)
    assert isinstance(outer, modeswap.Pass)
    assert call_signature(outer(train_gm)) == call_signature(modeswap.to_eval(train_gm))


def test_pipeline_refuses_plain_functions():
    with pytest.raises(TypeError, match=r"toolz\.compose_left"):
        modeswap.pipeline(modeswap.to_eval)  # type: ignore[arg-type]


def test_passes_compose_with_toolz(train_gm):
    round_trip = toolz.compose_left(modeswap.to_eval, modeswap.to_train)
    assert call_signature(round_trip(train_gm)) == call_signature(train_gm)


def test_pass_manager_adapter_returns_a_new_module(train_gm):
    manager = PassManager(passes=[passes.for_pass_manager(passes.swap_pipeline("eval"))])
    before = Snapshot.of(train_gm)
    result = manager(train_gm)
    assert result.modified
    assert result.graph_module is not train_gm
    assert modeswap.mode_of(result.graph_module).mode is Mode.EVAL
    assert Snapshot.of(train_gm) == before


def test_pass_manager_reports_unmodified(train_gm):
    evaluated = modeswap.to_eval(train_gm)
    result = passes.for_pass_manager(passes.swap_pipeline("eval"))(evaluated)
    assert not result.modified


def test_copy_has_every_tensor_under_its_old_name(train_gm):
    evaluated = modeswap.to_eval(train_gm)
    assert evaluated.state_dict().keys() == train_gm.state_dict().keys()
    assert dict(evaluated.named_buffers()).keys() == dict(train_gm.named_buffers()).keys()
    assert torch.equal(evaluated.offset, train_gm.offset)
    assert "bn.num_batches_tracked" in evaluated.state_dict()  # the eval graph stops reading it


def test_copy_clones_tensors(train_gm):
    evaluated = modeswap.to_eval(train_gm)
    old = {k: v.data_ptr() for k, v in train_gm.state_dict(keep_vars=True).items()}
    new = {k: v.data_ptr() for k, v in evaluated.state_dict(keep_vars=True).items()}
    assert not set(old.values()) & set(new.values())
    assert evaluated.offset.data_ptr() != train_gm.offset.data_ptr()
    assert isinstance(evaluated.conv.weight, nn.Parameter)


def test_share_weights_aliases_tensors(train_gm, x):
    trained = modeswap.swap(train_gm, "train", share_weights=True).module
    for (name, old), (_, new) in zip(
        train_gm.state_dict(keep_vars=True).items(), trained.state_dict(keep_vars=True).items(), strict=True
    ):
        assert new is old, name
    trained(x)
    assert train_gm.bn.num_batches_tracked.item() == 1  # documented aliasing: the run updated the shared buffer


def test_running_the_copy_leaves_the_input_buffers_alone(train_gm, x):
    before = Snapshot.of(train_gm)
    trained = modeswap.to_train(train_gm)
    for _ in range(3):
        trained(x)
    assert trained.bn.num_batches_tracked.item() == 3
    assert Snapshot.of(train_gm) == before


def test_copy_is_a_fresh_class_without_references_to_the_input(train_gm):
    evaluated = modeswap.to_eval(train_gm)
    assert type(evaluated) is not type(train_gm)
    assert isinstance(evaluated, type(train_gm).__mro__[1])
    for value in vars(evaluated).values():
        if isinstance(value, types.MethodType):
            assert value.__self__ is evaluated
    with pytest.raises(NotImplementedError):
        evaluated.train()


def test_guards_still_reject_wrong_shapes(train_gm):
    evaluated = modeswap.to_eval(train_gm)
    with pytest.raises(AssertionError, match=r"Guard failed: .*size\(\)\[1\] == 3"):
        evaluated(torch.randn(2, 5, 6, 6))


def test_node_meta_of_the_input_is_not_shared_mutably(train_gm):
    sdpa_free = modeswap.to_eval(train_gm)
    for node in sdpa_free.graph.nodes:
        original = next((n for n in train_gm.graph.nodes if n.name == node.name), None)
        if original is not None:
            assert node.meta is not original.meta


def test_deepcopy_of_a_swapped_module_runs(train_gm, x):
    evaluated = modeswap.to_eval(train_gm)
    clone = copy.deepcopy(evaluated)
    torch.testing.assert_close(clone(x), evaluated(x))


def test_a_generator_kernel_finishes_before_the_next_pass_runs(train_gm, x):
    def lazily(gm: torch.fx.GraphModule, context: modeswap.passes.Context):
        for node in gm.graph.nodes:
            if node.target is torch.ops.aten.dropout.default:
                node.args = (node.args[0], node.args[1], False)
                yield modeswap.Change(node.name, str(node.target), "train", True, False)

    rewritten = modeswap.pipeline(modeswap.Pass("lazily", lazily), passes.recompile)(train_gm)
    assert "0.25, False" in rewritten.code


def test_train_and_eval_of_a_swapped_module_point_to_modeswap(train_gm):
    evaluated = modeswap.to_eval(train_gm)
    for method in (evaluated.train, evaluated.eval):
        with pytest.raises(NotImplementedError, match=r"modeswap\.to_train\(gm\)"):
            method()
