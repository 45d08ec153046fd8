"""The exceptions and warnings modeswap raises.

Every error derives from :class:`ModeswapError`; the leaves also derive from the
builtin a caller would catch anyway, as ``attrs`` does with its own exceptions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class ModeswapError(Exception):
    """Root of every error modeswap raises."""


class NotExportedError(ModeswapError, TypeError):
    """The input is not a graph captured by ``torch.export``."""


class UnknownModeError(ModeswapError, ValueError):
    """A mode is neither a :class:`modeswap.Mode` nor one of its names."""


class UnsupportedGraphError(ModeswapError, ValueError):
    """The graph has a site whose other mode no rewrite can express exactly."""


class ModeswapWarning(UserWarning):
    """Root of every warning modeswap emits."""


class UnknownTrainingValueWarning(ModeswapWarning):
    """A swap to train mode met sites whose training value the eval graph does not record.

    ``groups`` maps each module type to the paths of its modules that hold such
    sites; ``suggestion`` is a ``dropout=`` mapping that would state them, with
    the value each holds now, for the user to edit.
    """

    def __init__(
        self,
        message: str,
        *,
        suggestion: Mapping[str, float] | None = None,
        groups: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.suggestion = dict(suggestion or {})
        self.groups = {name: tuple(paths) for name, paths in (groups or {}).items()}


class InvalidOptionError(ModeswapError, ValueError):
    """A keyword option has a value modeswap cannot use."""


class ProgramFileError(ModeswapError, ValueError):
    """A ``.pt2`` file cannot be read, or a swapped program cannot be written where asked."""


class NondeterministicEvalWarning(ModeswapWarning):
    """A swap to eval mode left ops that draw random numbers and that no rule owns.

    Eager eval is deterministic for nearly every model; such an op is the one
    trace that a ``self.training`` branch (a noise layer) leaves in a graph.
    """


class TrainingBranchWarning(ModeswapWarning):
    """The graph holds modules whose forward branches on ``self.training``: export kept the side that ran.

    A drop path an eval export erased, ``nn.MultiheadAttention(need_weights=True)``
    exported in eval, a spectral norm's power iteration: no swap can change them.
    """


class RecomputedUpdateWarning(ModeswapWarning):
    """Eager updates a module's buffers again in backward, where ``torch.utils.checkpoint`` recomputes it.

    A batch norm in train mode inside a checkpointed region updates its running
    stats in the forward and again in the recompute; an export traces the
    forward once and updates them once, as eager does without checkpointing.
    """


class MixedModeWarning(ModeswapWarning):
    """A swap changed sites of a mixed graph whose mode differed from the rest of it.

    That is what a batch norm frozen while fine-tuning, Monte Carlo dropout or
    ``F.batch_norm(training=False)`` in a train graph looks like: sites that
    hold their mode whatever the model's. ``keep`` lists the module paths that
    ``keep=`` would leave as they are.
    """

    def __init__(self, message: str, *, keep: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.keep = tuple(keep)


def lowered(found: str) -> UnsupportedGraphError:
    """The one refusal of a graph or program that ``run_decompositions()`` lowered; ``found`` says what shows it."""
    return UnsupportedGraphError(
        "the graph was lowered by ExportedProgram.run_decompositions(), not the TRAINING IR torch.export.export "
        f"returns: {found}. Lowering erases an eval dropout and fuses batch norm, so no swap can tell what "
        "the model did. Swap the program torch.export.export returns, then call run_decompositions() on the result."
    )
