"""Weights shared under several names: which names are one tensor, and making them one tensor again.

A module can reach one parameter under several names: tied input and output
embeddings (every transformers language model), BART's ``shared`` and its
encoder's and decoder's ``embed_tokens``, a module registered under two names.
Eager PyTorch keeps them one object, so the gradient of every use lands on it
and ``.to()`` moves it once. ``torch.export.load`` gives them back as several
``Parameter`` objects over one storage (its file records storage, not
identity): the graph reads one name, so the gradient lands there and the other
names get ``None``, and after ``.double()`` or ``.to()`` the copies part.
:func:`alias_groups` records which names are one object, at save time;
:func:`tie` makes them one object again, from that record, or, without one,
from what ``torch.export.load`` makes of tied weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def alias_groups(named: Mapping[str, object]) -> tuple[tuple[str, ...], ...]:
    """Return the groups (of two or more) of names in ``named`` whose values are one object, in ``named``'s order.

    >>> alias_groups(dict(model.named_parameters(remove_duplicate=False)))
    (('emb.weight', 'out.weight'),)
    """
    by_object: dict[int, list[str]] = {}
    for name, value in named.items():
        by_object.setdefault(id(value), []).append(name)
    return tuple(tuple(names) for names in by_object.values() if len(names) > 1)


def tie(tensors: Mapping[str, T], groups: Iterable[Sequence[str]] | None = None) -> dict[str, T]:
    """Return ``tensors`` with the names of each group one object: the value of the group's first name in ``tensors``.

    ``groups`` are the names recorded as one tensor (:func:`alias_groups` at
    save time); names not in ``tensors`` are passed over. Without ``groups``,
    names whose values are distinct tensors that ``torch.export.load`` would
    make of one tied tensor are tied: of the same kind (both ``Parameter`` or
    both not, with the same ``requires_grad``) over the same memory, with the
    same dtype, device, storage offset, size and stride. Tensors without
    memory of their own (meta, fake, a subclass, no bytes) are never tied
    without a record. Nothing else changes; ``tensors`` is not modified.

    >>> state = tie(program.state_dict)
    >>> state["out.weight"] is state["emb.weight"]
    True
    """
    tied = dict(tensors)
    if groups is None:
        groups = _views(tensors)
    for group in groups:
        present = [name for name in group if name in tied]
        for name in present[1:]:
            tied[name] = tied[present[0]]
    return tied


def _views(tensors: Mapping[str, object]) -> list[list[str]]:
    groups: dict[tuple[object, ...], list[str]] = {}
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and (key := _view_key(value)) is not None:
            groups.setdefault((type(value), value.requires_grad, *key), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _view_key(t: torch.Tensor) -> tuple[object, ...] | None:
    # The address of the memory, not the storage object: torch.export.load gives each name a storage
    # object of its own over the one buffer it read. Only plain tensors and Parameters: a subclass
    # (a fake tensor, a quantized weight) has no memory of its own to compare.
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.is_meta:
        return None
    storage = t.untyped_storage()
    if storage.nbytes() == 0:
        return None
    return (t.device, storage.data_ptr(), storage.nbytes(), t.dtype, t.storage_offset(), t.shape, t.stride())
