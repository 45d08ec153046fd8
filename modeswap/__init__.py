"""Switch graphs captured by ``torch.export`` between train and eval behaviour.

>>> evaluated = modeswap.to_eval(gm)
>>> report = modeswap.mode_of(evaluated)
"""

from modeswap import passes
from modeswap.errors import (
    InvalidOptionError,
    ModeswapError,
    ModeswapWarning,
    NondeterministicEvalWarning,
    NotExportedError,
    TrainingBranchWarning,
    UnknownModeError,
    UnknownTrainingValueWarning,
    UnsupportedGraphError,
)
from modeswap.exported import is_exported
from modeswap.modal import ModalModule, allow_train_eval
from modeswap.modes import Change, Memo, Mode, ModeReport, Params, Site, Swap
from modeswap.pass_base import Pass, pipeline
from modeswap.swapping import mode_of, swap, to_eval, to_train

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # modeswap.testing needs hypothesis for its strategies; import it on first use only.
    if name == "testing":
        import importlib

        return importlib.import_module("modeswap.testing")
    msg = f"module 'modeswap' has no attribute {name!r}"
    raise AttributeError(msg)


__all__ = [
    "Change",
    "InvalidOptionError",
    "Memo",
    "ModalModule",
    "Mode",
    "ModeReport",
    "ModeswapError",
    "ModeswapWarning",
    "NondeterministicEvalWarning",
    "NotExportedError",
    "Params",
    "Pass",
    "Site",
    "Swap",
    "TrainingBranchWarning",
    "UnknownModeError",
    "UnknownTrainingValueWarning",
    "UnsupportedGraphError",
    "allow_train_eval",
    "is_exported",
    "mode_of",
    "passes",
    "pipeline",
    "swap",
    "testing",
    "to_eval",
    "to_train",
]
