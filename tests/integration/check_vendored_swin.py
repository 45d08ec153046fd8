"""Check that ``torchvision_swin.py`` is torchvision's Swin: same parameters, same runs, same exported graphs.

Run from an environment that has torchvision (the test environment has none)::

    python -m tests.integration.check_vendored_swin

For each configuration it builds the model twice under one seed, from torchvision
and from the vendored copy, and checks that the module paths and parameters are
equal, that both run bit for bit alike in eval and in train (outputs, buffers,
gradients; one seed for the dropout masks), and that their eval and train exports
have equal ``call_signature``s, each call in the same module. Without torchvision
it says so and exits 0.

torchvision's own ``__init__`` loads its compiled ops; a wheel built for another
torch (a CUDA build beside a CPU torch) fails there with a ``RuntimeError``. The
Swin code is pure Python, so in that case the package is loaded without its
``__init__`` (see :func:`torchvision_swin_module`).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modeswap.testing import call_signature, export
from modeswap.testing.oracle import assert_same_run, run_forward_backward

from . import torchvision_swin


@dataclass(frozen=True)
class Config:
    """A Swin configuration and the input it is run on."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, ...] = (2, 3, 32, 32)

    def inputs(self) -> tuple[torch.Tensor]:
        return (torch.randn(*self.shape, generator=torch.Generator().manual_seed(1)),)

    def build(self, swin: Any, seed: int = 0) -> nn.Module:
        """Build ``swin.SwinTransformer`` (torchvision's module or the vendored one) under ``seed``."""
        torch.manual_seed(seed)
        return swin.SwinTransformer(**self.options)  # type: ignore[no-any-return]


#: The issue's case, small: attention dropout 0.1, projection and MLP dropout 0.0, no stochastic depth.
SMALL = Config(
    "small",
    {
        "patch_size": [4, 4],
        "embed_dim": 32,
        "depths": [2, 2],
        "num_heads": [2, 4],
        "window_size": [4, 4],
        "dropout": 0.0,
        "attention_dropout": 0.1,
        "stochastic_depth_prob": 0.0,
        "num_classes": 10,
    },
)

#: Every dropout on, stochastic depth too, and a padded, shifted last window (32 / 4 / 2 = 4 < 5).
ALL_DROPOUTS = Config(
    "small-all-dropouts",
    {**SMALL.options, "window_size": [5, 5], "dropout": 0.2, "stochastic_depth_prob": 0.3},
)

#: torchvision's swin_t with the issue's dropouts (``swin_t`` itself fixes stochastic_depth_prob=0.2).
SWIN_T = Config(
    "swin_t",
    {
        "patch_size": [4, 4],
        "embed_dim": 96,
        "depths": [2, 2, 6, 2],
        "num_heads": [3, 6, 12, 24],
        "window_size": [7, 7],
        "dropout": 0.0,
        "attention_dropout": 0.1,
        "stochastic_depth_prob": 0.0,
    },
    shape=(1, 3, 224, 224),
)

CONFIGS = (SMALL, ALL_DROPOUTS, SWIN_T)


def torchvision_swin_module() -> types.ModuleType:
    """Return ``torchvision.models.swin_transformer``; raise ``ImportError`` if torchvision is not installed.

    If torchvision is installed but its ``__init__`` fails on its compiled ops, load
    the package without running that ``__init__``: the Swin code needs none of them.
    """
    try:
        return importlib.import_module("torchvision.models.swin_transformer")
    except ImportError:
        raise
    except RuntimeError:
        pass
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("torchvision")
    assert spec is not None
    assert spec.submodule_search_locations is not None
    package = types.ModuleType("torchvision")
    package.__file__ = spec.origin
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torchvision"] = package
    return importlib.import_module("torchvision.models.swin_transformer")


def torchvision_version() -> str:
    return str(importlib.import_module("torchvision.version").__version__)


def _structure(model: nn.Module) -> list[tuple[str, str]]:
    return [(path, type(module).__name__) for path, module in model.named_modules()]


def _module_paths(gm: torch.fx.GraphModule) -> list[tuple[str, ...]]:
    """Each call's ``nn_module_stack`` as module paths: the class names differ (torchvision's or ours)."""
    return [
        tuple(path for path, _ in node.meta.get("nn_module_stack", {}).values())
        for node in gm.graph.nodes
        if node.op == "call_function"
    ]


def check(config: Config, real: types.ModuleType, *, say: Callable[[str], None] = print) -> None:
    """Assert that the vendored Swin and ``real`` build, run and export alike under ``config``."""
    theirs, ours = config.build(real), config.build(torchvision_swin)
    assert _structure(theirs) == _structure(ours), "module trees differ"
    state, vendored = theirs.state_dict(), ours.state_dict()
    assert list(state) == list(vendored), "state_dict keys differ"
    for key in state:
        assert torch.equal(state[key], vendored[key]), f"{key} differs"
    say(f"  {len(state)} tensors equal, {len(_structure(ours))} modules at the same paths")

    args = config.inputs()
    for mode in ("eval", "train"):
        expected = run_forward_backward(copy.deepcopy(theirs).train(mode == "train"), args, seed=3)
        actual = run_forward_backward(copy.deepcopy(ours).train(mode == "train"), args, seed=3)
        assert_same_run(expected, actual, atol=0.0, rtol=0.0)
        say(f"  {mode}: outputs, buffers and gradients identical")

        their_graph, our_graph = export(theirs, args, mode), export(ours, args, mode)
        exported = call_signature(their_graph)
        assert exported == call_signature(our_graph), f"{mode} exports differ"
        assert _module_paths(their_graph) == _module_paths(our_graph), f"{mode} exports differ in nn_module_stack"
        dropouts = sum(1 for target, _, _ in exported if "dropout" in target)
        say(f"  {mode} export: the same {len(exported)} calls ({dropouts} dropouts) in the same modules")


def main() -> int:
    try:
        real = torchvision_swin_module()
    except ImportError as error:
        print(f"skipped: torchvision is not installed here ({error})")
        return 0
    torch.set_num_threads(1)
    print(f"torchvision {torchvision_version()} ({real.__file__}), torch {torch.__version__}")
    for config in CONFIGS:
        print(f"{config.name}: {config.options}, input {list(config.shape)}")
        check(config, real)
    print("the vendored Swin is torchvision's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
