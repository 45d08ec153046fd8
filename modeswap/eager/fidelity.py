"""What :func:`modeswap.check` reports: whether a swap is exact for a model, and where it is not.

The records hold module paths, node names and sentences, never nodes or tensors,
so a report can be printed, compared, pickled and written as JSON.
"""

from __future__ import annotations

import enum
import json
import re
import shutil
import sys
import textwrap
from typing import Any

import attrs

from modeswap.records.modes import Mode
from modeswap.records.options import Options


class Cause(enum.StrEnum):
    """Why a swap differs from the other mode's own export: what the graph of one mode could not tell."""

    #: Code that runs only in one mode (``if self.training:``): an extra op, an
    #: extra output, a buffer update, a noise layer.
    TRAINING_BRANCH = "training branch"
    #: Stochastic depth, which an eval export traces as the identity.
    DROP_PATH = "drop path lost by an eval export"
    #: A dropout whose training probability an eval export writes as 0.0.
    DROPOUT_UNKNOWN = "dropout p unknown"
    #: Attention whose training ``dropout_p`` an eval export writes as 0.0.
    ATTENTION_DROPOUT_UNKNOWN = "attention dropout unknown"
    #: A site held in one mode by its model (a ``train()`` override, a frozen batch norm).
    PINNED = "site does not follow the mode"
    #: The swap refused the graph.
    REFUSED = "swap refused"
    #: The graphs read the same, yet running them gave different values.
    VALUES = "values differ"


@attrs.frozen
class Difference:
    """One place where a swapped graph differs from the other mode's own export.

    ``module_path`` is where it is: a module path (``""`` for the root or when
    unknown), or, for one row of the same difference in several modules, a
    pattern (``blocks.*.attn``) of the modules listed in ``paths``. ``nodes``
    are the nodes involved (names in the graph that has them), ``what`` what
    differs, ``cause`` why, ``fix`` what to do about it, and ``options`` the
    swap options that fix it (empty when none does), as a swap takes them:
    ``modeswap.to_train(gm, **difference.options.kwargs())``.
    """

    module_path: str
    nodes: tuple[str, ...]
    what: str
    cause: Cause
    fix: str
    options: Options = attrs.field(factory=Options)
    paths: tuple[str, ...] = attrs.field()

    @paths.default
    def _one_path(self) -> tuple[str, ...]:
        return (self.module_path,)


@attrs.frozen
class Direction:
    """A swap of one mode's export to the other mode, compared with the other mode's own export.

    ``unrun`` says what the second opinion could not run, and why (a backward
    the eager model's own autograd refuses); the verdict then rests on what
    could be compared.
    """

    source: Mode
    target: Mode
    differences: tuple[Difference, ...] = ()
    unrun: str = ""

    @property
    def exact(self) -> bool:
        """Whether the swap computes what the target mode's own export computes."""
        return not self.differences

    @property
    def name(self) -> str:
        """``"train -> eval"`` or ``"eval -> train"``."""
        return f"{self.source.value} -> {self.target.value}"


@attrs.frozen
class Fidelity:
    """What :func:`modeswap.check` found: for each direction, whether the swap is exact and where not.

    ``to_eval`` swaps the train export to eval, ``to_train`` the eval export to
    train. ``mixed`` lists the modules that were in the other mode than the
    model when ``check`` was called (``model.train(); model.bn.eval()``):
    ``check`` exported that mode as it found it, and the swaps differ there
    unless ``keep=`` pins them. ``suggested`` holds the options that fix every
    difference an option can fix, for ``to_train`` and ``check`` alike.

    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
    >>> fidelity = modeswap.check(model, (torch.randn(8, 4),))
    >>> fidelity.exact, fidelity.suggested
    (True, {})
    """

    to_eval: Direction
    to_train: Direction
    mixed: tuple[str, ...] = ()

    @property
    def directions(self) -> tuple[Direction, Direction]:
        """Both directions: train -> eval, then eval -> train."""
        return self.to_eval, self.to_train

    @property
    def exact(self) -> bool:
        """Whether both swaps are exact."""
        return self.to_eval.exact and self.to_train.exact

    @property
    def suggested(self) -> dict[str, Any]:
        """The keyword options that fix, at once, every difference an option fixes; ``{}`` when none does.

        ``modeswap.to_train(gm, **fidelity.suggested)`` and
        ``modeswap.check(model, args, **fidelity.suggested)`` take them as they are.
        """
        return Options.merged(d.options for direction in self.directions for d in direction.differences).kwargs()

    def to_json(self) -> str:
        """Return the report as a JSON object: per direction, ``exact``, the differences and what was not run."""
        report: dict[str, Any] = {
            d.name: {
                "exact": d.exact,
                "differences": [
                    {**attrs.asdict(x, recurse=False), "options": x.options.kwargs()} for x in d.differences
                ],
                "unrun": d.unrun,
            }
            for d in self.directions
        }
        return json.dumps({**report, "mixed": list(self.mixed), "suggested": self.suggested}, indent=2)

    def __str__(self) -> str:
        return self.format()

    def format(self, width: int | None = None) -> str:
        """The report as ``str()`` gives it, its lines at most ``width`` characters (a terminal's, or 100).

        A module path or a piece of code is never broken across lines; one
        longer than the width overflows it.
        """
        if width is None:
            width = shutil.get_terminal_size((100, 24)).columns if sys.stdout.isatty() else 100
        width = max(width, 40)
        lines: list[str] = []
        if self.mixed:
            lines += _wrap(
                f"check found {_some(self.mixed)} in the other mode than the model, and exported the model's mode "
                "as it found it: the swaps differ there unless `keep=` pins them",
                width,
            )
        for d in self.directions:
            count = len(d.differences)
            lines.append(f"{d.name}: " + ("exact" if d.exact else f"{count} difference{'s' * (count != 1)}"))
            for x in d.differences:
                lines += _wrap(f"{x.module_path or '(root)'}: {x.cause}", width, indent="  ")
                if len(x.paths) > 1:
                    lines += _wrap(f"{len(x.paths)} modules: {_some(x.paths, quoted=False)}", width, indent="    ")
                lines += _wrap(x.what, width, indent="    ")
                lines += _wrap(f"fix: {x.fix}", width, indent="    ")
            if d.unrun:
                lines += _wrap(
                    f"not run: {d.unrun} (the verdict rests on the graphs and on what ran)", width, indent="  "
                )
        suggested = Options.merged(x.options for d in self.directions for x in d.differences)
        if suggested:
            lines += _wrap(f"suggested: `{suggested}`", width)
        return "\n".join(lines)


def _some(paths: tuple[str, ...], shown: int = 3, *, quoted: bool = True) -> str:
    names = ", ".join(repr(p) if quoted else p for p in paths[:shown])
    return names + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def _wrap(text: str, width: int, indent: str = "") -> list[str]:
    """``text`` wrapped at ``width``: breaks only between words, never inside a `code span` or a long word."""
    # textwrap breaks at ASCII whitespace only: a no-break space holds a code span together.
    held = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\N{NO-BREAK SPACE}"), text)
    lines = textwrap.wrap(
        held, width, initial_indent=indent, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )
    return [line.replace("\N{NO-BREAK SPACE}", " ") for line in lines]
