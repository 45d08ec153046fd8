"""The layer registry of the hypothesis strategies against the rule table.

Every kind of ``modeswap.table.rules.KINDS`` has a builder in
``modeswap.testing.strategies.BUILDERS``, the registry names no other kind, and
each builder's layer, built and exported in train mode, has a site of its kind:
a kind added to the table without a layer that exercises it fails here.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import modeswap
from modeswap.table.rules import KINDS
from modeswap.testing import export
from modeswap.testing.strategies import BUILDERS, EXACT_LAYERS, EXTRA_LAYERS, LAYERS, Layer, build, layers

#: The layers that exercise a kind of site.
SITED = [name for name, builder in BUILDERS.items() if builder.kind is not None]


def test_every_kind_of_the_rule_table_has_a_builder() -> None:
    covered = {builder.kind for builder in BUILDERS.values()}
    missing = [kind for kind in KINDS if kind not in covered]
    assert not missing, (
        f"no layer of modeswap.testing.strategies.BUILDERS exercises the kinds {missing} of "
        "modeswap.table.rules.KINDS: add a Builder whose kind is each"
    )


def test_the_registry_names_no_kind_the_rule_table_lacks() -> None:
    unknown = {name: builder.kind for name, builder in BUILDERS.items() if builder.kind not in (*KINDS, None)}
    assert not unknown, f"layers of BUILDERS name kinds that modeswap.table.rules.KINDS lacks: {unknown}"


def test_the_layer_lists_are_read_from_the_registry() -> None:
    assert sorted((*LAYERS, *EXTRA_LAYERS)) == sorted(BUILDERS)
    assert set(EXACT_LAYERS) <= set(LAYERS)


def site_kinds(layer: Layer, dims: int) -> list[str]:
    """The kinds of ``mode_of``'s sites in a train export of a model of ``layer`` alone."""
    model = build((layer,), dims=dims, channels=2, width=3)
    x = torch.randn(2, 2, *[3] * dims, generator=torch.Generator().manual_seed(0))
    return [site.kind for site in modeswap.mode_of(export(model, (x,), "train")).sites]


@pytest.mark.parametrize("name", SITED)
@given(data=st.data())
def test_each_builder_leaves_a_site_of_its_kind(name: str, data: st.DataObject) -> None:
    builder = BUILDERS[name]
    dims = data.draw(st.integers(1, 3), label="dims")
    # Unsatisfiable when no options of the layer leave a site.
    sited = layers(dims, kinds=(name,)).filter(lambda layer: builder.has_site(dict(layer.options)))
    layer = data.draw(sited, label="layer")
    assert builder.kind in site_kinds(layer, dims)


@pytest.mark.parametrize("name", SITED)
@given(data=st.data())
def test_a_builder_says_when_its_layer_has_no_site(name: str, data: st.DataObject) -> None:
    builder = BUILDERS[name]
    dims = data.draw(st.integers(1, 3), label="dims")
    layer = data.draw(layers(dims, kinds=(name,)), label="layer")
    assert (builder.kind in site_kinds(layer, dims)) == builder.has_site(dict(layer.options))


def test_an_unknown_layer_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown layer kind 'nope'"):
        build((Layer("nope"),), dims=1, channels=2, width=3)
