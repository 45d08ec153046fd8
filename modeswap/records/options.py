"""What the user states that a graph does not record: training ``p`` per module, and modules to leave alone.

Both are keyed by module-path patterns, matched one path component at a time
as :func:`fnmatch.fnmatchcase` does: ``*`` and ``?`` stay within a component
(``layers.*`` matches ``layers.3``), and a ``**`` component matches any number
of components (``**.attention`` matches ``encoder.layers.3.attention``). A
pattern matches a site when it matches the path of the module that ran the
site or of any module enclosing it; the root module's path is ``""``, so ``""``
matches every site (as does ``**``: a trailing ``**`` adds nothing to the
modules a pattern reaches, and is dropped before ranking).

When several ``dropout`` patterns match a site, the one matching the innermost
module wins, then the one with more literal characters::

    dropout={"model.encoder": 0.1, "**.self_attn": 0.0}

gives 0.0 to ``model.encoder.layers.0.self_attn`` (its own path matches) and
0.1 to every other site under ``model.encoder``. Equally specific patterns with
different values are an error.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from modeswap.records.errors import InvalidOptionError
from modeswap.records.modes import Mode

_WILDCARDS = frozenset("*?[]!")


@attrs.frozen
class Options:
    """The training values and pins a user states for one swap; empty by default.

    ``dropout`` maps module-path patterns to the training ``p`` of dropout and
    attention sites whose graph holds 0.0 and records no training value;
    ``attention_dropout`` is that value for attention nodes no pattern matches;
    ``keep`` lists the patterns of modules whose sites no swap changes.
    ``within``, when given, names the only modules (exact paths) whose own
    sites this swap changes and whose traces its checks speak of: a
    ``ModalModule`` swaps the modules whose ``.training`` differs from the
    rest this way. Other sites stay as they are, and are not marked kept.
    ``exact`` makes each ``dropout`` key a module path that decides the sites
    that module runs itself, none of the modules inside it: values read per
    module off an export, as ``capture``'s are, say nothing of the modules
    inside.
    """

    dropout: tuple[tuple[str, float], ...] = ()
    attention_dropout: float | None = None
    keep: tuple[str, ...] = ()
    within: frozenset[str] | None = None
    exact: bool = False

    @classmethod
    def of(
        cls,
        mode: Mode,
        *,
        dropout: Mapping[str, float] | None = None,
        attention_dropout: float | None = None,
        keep: Sequence[str] | None = (),
    ) -> Options:
        """Check the options of a swap to ``mode`` and return them as a record."""
        if mode is not Mode.TRAIN:
            for name, value in (("dropout", dropout), ("attention_dropout", attention_dropout)):
                if value is not None:
                    msg = f"{name}={value!r} states training values; it only applies when swapping to train mode"
                    raise InvalidOptionError(msg)
        if dropout is not None and not isinstance(dropout, Mapping):
            msg = f"dropout takes a mapping of module-path pattern -> training p, got {dropout!r}"
            raise InvalidOptionError(msg)
        mapping = tuple(
            (_pattern(pattern, "dropout"), _probability(p, f"dropout[{pattern!r}]"))
            for pattern, p in (dropout or {}).items()
        )
        keep = () if keep is None else keep
        if isinstance(keep, str) or not isinstance(keep, Iterable):
            msg = f"keep takes a sequence of module-path patterns, got {keep!r}; write keep=({keep!r},)"
            raise InvalidOptionError(msg)
        pins = tuple(_pattern(pattern, "keep") for pattern in keep)
        attention = None if attention_dropout is None else _probability(attention_dropout, "attention_dropout")
        return cls(mapping, attention, pins)

    def __bool__(self) -> bool:
        return bool(self.dropout or self.attention_dropout is not None or self.keep)

    def kwargs(self) -> dict[str, Any]:
        """The options set, as keyword arguments: ``{"dropout": {...}, "attention_dropout": p, "keep": (...)}``."""
        kwargs: dict[str, Any] = {}
        if self.dropout:
            kwargs["dropout"] = dict(self.dropout)
        if self.attention_dropout is not None:
            kwargs["attention_dropout"] = self.attention_dropout
        if self.keep:
            kwargs["keep"] = self.keep
        return kwargs

    def __str__(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.kwargs().items())

    @classmethod
    def merged(cls, options: Iterable[Options]) -> Options:
        """The options of all of ``options`` at once (built to agree: the first value of an option wins)."""
        dropout: dict[str, float] = {}
        attention: float | None = None
        keep: dict[str, None] = {}
        for o in options:
            for pattern, p in o.dropout:
                dropout.setdefault(pattern, p)
            attention = o.attention_dropout if attention is None else attention
            keep.update(dict.fromkeys(o.keep))
        return cls(tuple(dropout.items()), attention, tuple(keep))

    def keeps(self, path: str) -> bool:
        """Whether a site run by the module at ``path`` is to be left as it is."""
        return any(matches(pattern, path) for pattern in self.keep)

    def reaches(self, path: str) -> bool:
        """Whether this swap is for the sites the module at ``path`` runs itself (see ``within``)."""
        return self.within is None or path in self.within

    def dropout_for(self, path: str) -> tuple[str, float] | None:
        """The pattern of ``dropout`` that decides a site run by the module at ``path``, and its ``p``."""
        if self.exact:
            return next(((pattern, p) for pattern, p in self.dropout if pattern == path), None)
        return decide(self.dropout, path)


def matches(pattern: str, path: str) -> bool:
    """Whether ``pattern`` matches the module at ``path`` or a module enclosing it."""
    return _depth(pattern, path) is not None


@functools.lru_cache(maxsize=1 << 16)
def decide(mapping: tuple[tuple[str, float], ...], path: str) -> tuple[str, float] | None:
    """The entry of ``mapping`` (pattern, value) that decides the module at ``path``; ``None`` if none matches."""
    ranks = {
        pattern: (depth, _literals(pattern)) for pattern, _ in mapping if (depth := _depth(pattern, path)) is not None
    }
    if not ranks:
        return None
    best = max(ranks.values())
    (pattern, p), *others = [(pattern, p) for pattern, p in mapping if ranks.get(pattern) == best]
    for other, q in others:
        if q != p:
            msg = (
                f"dropout patterns {pattern!r} (p={p}) and {other!r} (p={q}) are equally specific for "
                f"module {path!r}; add a pattern for it, or make one of them name more of its path"
            )
            raise InvalidOptionError(msg)
    return pattern, p


@functools.lru_cache(maxsize=1 << 16)
def _depth(pattern: str, path: str) -> int | None:
    """How deep the innermost module at or above ``path`` that ``pattern`` matches is; ``None`` if none.

    The root (``""``) is depth 0, ``encoder`` depth 1, ``encoder.layer`` depth 2.
    """
    parts, globs = _split(path), _split(pattern)
    while globs and globs[-1] == "**":
        globs = globs[:-1]  # "encoder.**" is "encoder": a pattern reaches the modules inside what it matches
    for depth in range(len(parts), -1, -1):
        if _glob(globs, parts[:depth]):
            return depth
    return None


def _split(path: str) -> tuple[str, ...]:
    return tuple(path.split(".")) if path else ()


def _glob(globs: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    if not globs:
        return not parts
    if globs[0] == "**":
        return any(_glob(globs[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], globs[0]) and _glob(globs[1:], parts[1:])


def _literals(pattern: str) -> int:
    return sum(char not in _WILDCARDS for char in pattern)


def _pattern(pattern: object, option: str) -> str:
    if not isinstance(pattern, str):
        msg = f"{option} patterns are module paths such as 'encoder.layers.*', got {pattern!r}"
        raise InvalidOptionError(msg)
    return pattern


def _probability(p: object, option: str) -> float:
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
        msg = f"{option} must be a probability in [0, 1], got {p!r}"
        raise InvalidOptionError(msg)
    return float(p)
