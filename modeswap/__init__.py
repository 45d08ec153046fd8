"""Switch graphs captured by ``torch.export`` between train and eval behaviour.

>>> evaluated = modeswap.to_eval(gm)
>>> report = modeswap.mode_of(evaluated)
"""

from modeswap import passes
from modeswap.errors import (
    InvalidOptionError,
    ModeswapError,
    ModeswapWarning,
    NotExportedError,
    UnknownModeError,
    UnknownTrainingValueWarning,
    UnsupportedGraphError,
)
from modeswap.exported import is_exported
from modeswap.modes import Change, Memo, Mode, ModeReport, Params, Site, Swap
from modeswap.passes import Pass, pipeline
from modeswap.swapping import mode_of, swap, to_eval, to_train

__version__ = "0.1.0"

__all__ = [
    "Change",
    "InvalidOptionError",
    "Memo",
    "Mode",
    "ModeReport",
    "ModeswapError",
    "ModeswapWarning",
    "NotExportedError",
    "Params",
    "Pass",
    "Site",
    "Swap",
    "UnknownModeError",
    "UnknownTrainingValueWarning",
    "UnsupportedGraphError",
    "is_exported",
    "mode_of",
    "passes",
    "pipeline",
    "swap",
    "to_eval",
    "to_train",
]
