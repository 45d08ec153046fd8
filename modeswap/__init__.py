"""Switch graphs captured by ``torch.export`` between train and eval behaviour.

>>> evaluated = modeswap.to_eval(gm)
>>> report = modeswap.mode_of(evaluated)

The names below load on first use (PEP 562), so that ``import modeswap`` and
``modeswap --version`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modeswap import passes, testing
    from modeswap.eager.check import capture, check
    from modeswap.eager.fidelity import Cause, Difference, Direction, Fidelity, Options
    from modeswap.files.archive import load, save
    from modeswap.forms.modal import ModalModule, allow_train_eval
    from modeswap.forms.swap import mode_of, swap, to_eval, to_train
    from modeswap.fx.exported import is_exported
    from modeswap.records.errors import (
        InvalidOptionError,
        MixedModeWarning,
        ModeswapError,
        ModeswapWarning,
        NondeterministicEvalWarning,
        NotExportedError,
        RecomputedUpdateWarning,
        TrainingBranchWarning,
        UnknownModeError,
        UnknownTrainingValueWarning,
        UnsupportedGraphError,
    )
    from modeswap.records.modes import Change, Memo, Mode, ModeReport, Params, Site, Swap
    from modeswap.rewrite.base import Pass, pipeline

from modeswap.records.version import VERSION

__version__ = VERSION

#: Where each public name lives; the imports above say the same to type checkers.
_HOMES = {
    "modeswap.files.archive": ("load", "save"),
    "modeswap.records.errors": (
        "InvalidOptionError",
        "MixedModeWarning",
        "ModeswapError",
        "ModeswapWarning",
        "NondeterministicEvalWarning",
        "NotExportedError",
        "RecomputedUpdateWarning",
        "TrainingBranchWarning",
        "UnknownModeError",
        "UnknownTrainingValueWarning",
        "UnsupportedGraphError",
    ),
    "modeswap.eager.check": ("capture", "check"),
    "modeswap.fx.exported": ("is_exported",),
    "modeswap.eager.fidelity": ("Cause", "Difference", "Direction", "Fidelity", "Options"),
    "modeswap.forms.modal": ("ModalModule", "allow_train_eval"),
    "modeswap.records.modes": ("Change", "Memo", "Mode", "ModeReport", "Params", "Site", "Swap"),
    "modeswap.rewrite.base": ("Pass", "pipeline"),
    "modeswap.forms.swap": ("mode_of", "swap", "to_eval", "to_train"),
}
_HOME_OF = {name: home for home, names in _HOMES.items() for name in names}


# Hidden from type checkers, which see the imports above and flag a misspelt name instead of typing it object.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        if name in _HOME_OF:
            value = getattr(importlib.import_module(_HOME_OF[name]), name)
            globals()[name] = value  # later lookups find it without coming here
            return value
        # A submodule (modeswap.passes, modeswap.testing, modeswap.fx.graphs) loads on first use too.
        try:
            return importlib.import_module(f"modeswap.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"modeswap.{name}":
                raise
        msg = f"module 'modeswap' has no attribute {name!r}"
        raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "Cause",
    "Change",
    "Difference",
    "Direction",
    "Fidelity",
    "InvalidOptionError",
    "Memo",
    "MixedModeWarning",
    "ModalModule",
    "Mode",
    "ModeReport",
    "ModeswapError",
    "ModeswapWarning",
    "NondeterministicEvalWarning",
    "NotExportedError",
    "Options",
    "Params",
    "Pass",
    "RecomputedUpdateWarning",
    "Site",
    "Swap",
    "TrainingBranchWarning",
    "UnknownModeError",
    "UnknownTrainingValueWarning",
    "UnsupportedGraphError",
    "allow_train_eval",
    "capture",
    "check",
    "is_exported",
    "load",
    "mode_of",
    "passes",
    "pipeline",
    "save",
    "swap",
    "testing",
    "to_eval",
    "to_train",
]
