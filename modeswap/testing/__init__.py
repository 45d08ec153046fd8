"""Tools to verify modeswap, and code that uses it, against eager PyTorch.

``assert_mode_equivalent`` needs only torch; the hypothesis strategies
(``cases``, ``layers``, ``build``, ``Case``, ``Layer``, and ``BUILDERS``, the registry they draw
layers from) need hypothesis installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from modeswap.eager.running import run_forward_backward
from modeswap.testing.models import Net
from modeswap.testing.oracle import (
    Observed,
    Snapshot,
    assert_mode_equivalent,
    assert_runs_as,
    assert_same_run,
    assert_same_state,
    assert_trains_like,
    call_signature,
    export,
    export_program,
    other,
    quiet,
    train_side_by_side,
)

_STRATEGIES = (
    "BUILDERS",
    "EXTRA_LAYERS",
    "LAYERS",
    "Builder",
    "Case",
    "Layer",
    "ModeCall",
    "build",
    "cases",
    "layers",
    "mode_calls",
)

__all__ = [
    "Net",
    "Observed",
    "Snapshot",
    "assert_mode_equivalent",
    "assert_runs_as",
    "assert_same_run",
    "assert_same_state",
    "assert_trains_like",
    "call_signature",
    "export",
    "export_program",
    "other",
    "quiet",
    "run_forward_backward",
    "train_side_by_side",
    *_STRATEGIES,
]


def __getattr__(name: str) -> Any:
    if name in _STRATEGIES:
        return getattr(importlib.import_module("modeswap.testing.strategies"), name)
    msg = f"module 'modeswap.testing' has no attribute {name!r}"
    raise AttributeError(msg)
