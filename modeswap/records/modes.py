"""The mode enum and the immutable records modeswap returns.

Records hold node names and plain literals, never ``torch.fx.Node`` objects or
tensors, so they can be printed, compared, pickled and turned into JSON
(``attrs.asdict``). None of them is mutated after creation: change one with
``attrs.evolve``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Generic, Literal, NoReturn, TypeVar

import attrs

from modeswap.records.errors import UnknownModeError

if TYPE_CHECKING:
    from torch.fx import Node

#: A literal argument of a graph node, as it appears in ``node.args``.
Scalar = bool | int | float | str | None

#: What a site does: the row of the semantics table it belongs to. ``modeswap.table.rules.KINDS`` lists the
#: kinds its rules and idioms have, in this order; a test holds the two to the same list.
Kind = Literal["dropout", "batch_norm", "instance_norm", "rrelu", "attention", "rnn", "drop_path"]

M = TypeVar("M")


class Mode(enum.StrEnum):
    """The behaviour of ``nn.Module.train()`` or ``nn.Module.eval()``.

    A ``str`` enum, so a record holding one goes to JSON as ``"train"`` / ``"eval"``.
    """

    TRAIN = "train"
    EVAL = "eval"

    @classmethod
    def parse(cls, mode: Mode | str) -> Mode:
        """Return ``mode`` as a :class:`Mode`; ``"train"`` and ``"eval"`` are accepted."""
        if isinstance(mode, Mode):
            return mode
        if isinstance(mode, str):
            for member in cls:
                if mode.lower() == member.value:
                    return member
        valid = ", ".join(repr(m.value) for m in cls)
        msg = f"unknown mode {mode!r}; expected one of {valid} or a modeswap.Mode"
        raise UnknownModeError(msg)

    @property
    def other(self) -> Mode:
        """The other mode: ``Mode.EVAL.other`` is ``Mode.TRAIN``."""
        return Mode.EVAL if self is Mode.TRAIN else Mode.TRAIN


class Params(dict[str, Scalar]):
    """A read-only mapping of literal arguments.

    A ``dict`` subclass so that ``json.dumps`` and ``attrs.asdict`` take it as
    it is; every method that would change it raises ``TypeError``.
    """

    def __init__(self, items: Mapping[str, Scalar] | Iterable[tuple[str, Scalar]] = ()) -> None:
        super().__init__(items)

    def _read_only(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("Params is read-only; build a new one instead")

    __setitem__ = __delitem__ = _read_only
    clear = pop = popitem = setdefault = update = __ior__ = _read_only

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple[type[Params], tuple[dict[str, Scalar]]]:
        return (Params, (dict(self),))

    def __repr__(self) -> str:
        return f"Params({dict.__repr__(self)})"


@attrs.frozen
class Site:
    """One train/eval-sensitive node of a graph and the mode it is in.

    ``functional`` marks a call made outside a module of the op's own family
    (``F.dropout`` or ``F.batch_norm`` in a user's ``forward``): it may follow
    ``self.training`` or hard-code a mode, and the graph cannot tell which, so
    its mode is a guess from its arguments. ``kept`` marks a site a swap was
    told to leave as it is (``keep=``); later swaps leave it too. ``known`` is
    false when the graph does not record the value a swap to train would set
    (an eval dropout's ``p=0.0`` written outside an ``nn.Dropout``): state it
    with ``dropout=``.
    """

    node: str
    op: str
    kind: Kind
    mode: Mode
    module_path: str = ""
    params: Params = attrs.field(factory=Params, converter=Params)
    functional: bool = False
    kept: bool = False
    known: bool = True


@attrs.frozen
class Change:
    """One edit a rewrite made: ``field`` of ``node`` went from ``before`` to ``after``."""

    node: str
    op: str
    field: str
    before: Scalar
    after: Scalar


@attrs.frozen
class ModeReport:
    """What ``mode_of`` reads off a graph.

    ``mode`` is the mode every site that tells one agrees on, kept sites aside
    (attention at ``dropout_p=0.0`` is a site that tells none: train mode at a
    training ``p`` of 0.0 computes the same); it is ``None`` when no site tells
    a mode, or when they disagree, and then ``mixed`` is true. ``stochastic``
    names the nodes that draw random numbers and belong to no site, so an eval
    graph with an empty ``stochastic`` is deterministic.
    """

    mode: Mode | None
    mixed: bool
    sites: tuple[Site, ...]
    stochastic: tuple[str, ...]


@attrs.frozen
class Swap(Generic[M]):
    """The result of ``modeswap.swap``: the new module and every edit made to reach it."""

    module: M
    mode: Mode
    changes: tuple[Change, ...]


@attrs.frozen
class Memo:
    """Training-mode values an eval rewrite overwrote, kept for the way back.

    Lives in the rewritten node's ``meta["custom"]`` (see :data:`MEMO_KEY`).
    ``values`` maps a schema argument name to the value it had in train mode;
    ``counter`` names the node a batch norm incremented as ``num_batches_tracked``;
    ``removed`` is the JSON of the ops a drop path ran in train mode (see ``idioms``);
    ``kept`` marks a site a swap was told to leave as it is, so later swaps leave it too.
    """

    values: Params = attrs.field(factory=Params, converter=Params)
    counter: str | None = None
    removed: str | None = None
    kept: bool | None = None


#: The key under ``node.meta["custom"]`` where a rewrite keeps its :class:`Memo`.
#: ``torch.export.save`` keeps only ``meta["custom"]`` of a node's meta, as JSON,
#: so the memo is stored there, as a plain dict, to survive a save and load.
MEMO_KEY = "modeswap"


def memo_of(node: Node) -> Memo | None:
    """The memo a previous eval rewrite left on ``node``."""
    stored = node.meta.get("custom", {}).get(MEMO_KEY)
    return None if stored is None else Memo(**stored)


def set_memo(node: Node, memo: Memo | None) -> None:
    """Store ``memo`` on ``node`` (or remove it), leaving other ``custom`` entries alone.

    Node meta is copied shallowly with the graph, so ``meta["custom"]`` may be
    the very dict the original node holds: replace it, never edit it in place.
    """
    custom = {k: v for k, v in node.meta.get("custom", {}).items() if k != MEMO_KEY}
    if memo is not None:
        custom[MEMO_KEY] = {k: v for k, v in attrs.asdict(memo).items() if v is not None}
    if custom:
        node.meta["custom"] = custom
    else:
        node.meta.pop("custom", None)
