"""What :func:`modeswap.check` reports: whether a swap is exact for a model, and where it is not.

The records hold module paths, node names and sentences, never nodes or tensors,
so a report can be printed, compared, pickled and written as JSON.
"""

from __future__ import annotations

import enum
import itertools
import json
import textwrap

import attrs

from modeswap.modes import Mode


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

    ``module_path`` is where it is (``""`` for the root or when unknown),
    ``nodes`` the nodes involved (names in the graph that has them), ``what``
    what differs, ``cause`` why, and ``fix`` what to do about it.
    """

    module_path: str
    nodes: tuple[str, ...]
    what: str
    cause: Cause
    fix: str


@attrs.frozen
class Direction:
    """A swap of one mode's export to the other mode, compared with the other mode's own export."""

    source: Mode
    target: Mode
    differences: tuple[Difference, ...] = ()

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

    ``to_eval`` swaps the train export to eval, ``to_train`` the eval export to train.

    >>> fidelity = modeswap.check(model, (x,))
    >>> exact = fidelity.exact
    """

    to_eval: Direction
    to_train: Direction

    @property
    def directions(self) -> tuple[Direction, Direction]:
        """Both directions: train -> eval, then eval -> train."""
        return self.to_eval, self.to_train

    @property
    def exact(self) -> bool:
        """Whether both swaps are exact."""
        return self.to_eval.exact and self.to_train.exact

    def to_json(self) -> str:
        """Return the report as a JSON object: per direction, ``exact`` and the differences."""
        return json.dumps(
            {
                d.name: {"exact": d.exact, "differences": [attrs.asdict(x) for x in d.differences]}
                for d in self.directions
            },
            indent=2,
        )

    def __str__(self) -> str:
        lines: list[str] = []
        for d in self.directions:
            verdict = "exact" if d.exact else f"{len(d.differences)} difference(s)"
            lines.append(f"{d.name}: {verdict}")
            if d.differences:
                lines.extend(_table(d.differences))
        return "\n".join(lines)


#: The widest each column of the table may be; longer cells wrap onto more lines.
_WIDTHS = (28, 20, 56, 40)


def _table(differences: tuple[Difference, ...]) -> list[str]:
    header = ("module", "cause", "what differs", "what to do")
    rows = [header, *((d.module_path or "(root)", str(d.cause), d.what, d.fix) for d in differences)]
    cells = [
        [textwrap.wrap(cell, width, break_on_hyphens=False) or [""] for cell, width in zip(row, _WIDTHS, strict=True)]
        for row in rows
    ]
    widths = [max(len(line) for row in cells for line in row[i]) for i in range(len(header))]
    lines = []
    for row in cells:
        for parts in itertools.zip_longest(*row, fillvalue=""):
            lines.append("  " + "  ".join(part.ljust(w) for part, w in zip(parts, widths, strict=True)).rstrip())
    return lines
