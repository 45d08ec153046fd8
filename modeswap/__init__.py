"""Switch graphs captured by ``torch.export`` between train and eval behaviour.

>>> evaluated = modeswap.to_eval(gm)
>>> report = modeswap.mode_of(evaluated)

The names below load on first use (PEP 562), so that ``import modeswap`` and
``modeswap --version`` do not pay for importing torch.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the one list of public names: type checkers read it, and so does _homes() below
    from modeswap import passes as passes, testing as testing
    from modeswap.eager.check import capture as capture, check as check
    from modeswap.eager.fidelity import (
        Cause as Cause,
        Difference as Difference,
        Direction as Direction,
        Fidelity as Fidelity,
    )
    from modeswap.files.archive import load as load, save as save
    from modeswap.forms.modal import ModalModule as ModalModule, allow_train_eval as allow_train_eval
    from modeswap.forms.swap import mode_of as mode_of, swap as swap, to_eval as to_eval, to_train as to_train
    from modeswap.fx.exported import is_exported as is_exported
    from modeswap.records.errors import (
        InvalidOptionError as InvalidOptionError,
        MixedModeWarning as MixedModeWarning,
        ModeswapError as ModeswapError,
        ModeswapWarning as ModeswapWarning,
        NondeterministicEvalWarning as NondeterministicEvalWarning,
        NotExportedError as NotExportedError,
        RecomputedUpdateWarning as RecomputedUpdateWarning,
        TrainingBranchWarning as TrainingBranchWarning,
        UnknownModeError as UnknownModeError,
        UnknownTrainingValueWarning as UnknownTrainingValueWarning,
        UnsupportedGraphError as UnsupportedGraphError,
    )
    from modeswap.records.modes import (
        Change as Change,
        Memo as Memo,
        Mode as Mode,
        ModeReport as ModeReport,
        Params as Params,
        Site as Site,
        Swap as Swap,
    )
    from modeswap.records.options import Options as Options
    from modeswap.rewrite.base import Pass as Pass, pipeline as pipeline

from modeswap.records.version import VERSION

__version__ = VERSION


def _homes() -> dict[str, str]:
    """Each public name -> the module that defines it (a submodule -> itself), read off the imports above.

    The imports under ``TYPE_CHECKING`` are the one list of the public names
    (scientific-python's ``lazy_loader.attach_stub`` reads a stub file so):
    type checkers see them, and at run time each name loads on first use.
    """
    tree = ast.parse(pathlib.Path(__file__).read_text(encoding="utf-8"))
    (block,) = (node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    return {
        alias.asname or alias.name: (f"{imp.module}.{alias.name}" if imp.module == __name__ else str(imp.module))
        for imp in block.body
        if isinstance(imp, ast.ImportFrom)
        for alias in imp.names
    }


_HOME_OF = _homes()
__all__ = sorted(_HOME_OF)


# Hidden from type checkers, which see the imports above and flag a misspelt name instead of typing it object.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        if name in _HOME_OF:
            home = importlib.import_module(_HOME_OF[name])
            value = home if home.__name__ == f"{__name__}.{name}" else getattr(home, name)
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
