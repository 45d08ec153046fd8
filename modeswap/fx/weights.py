"""How a copy of a graph gets its parameters and buffers: cloned, shared, or copy-on-write.

A swap copies every tensor its input holds (``copy.deepcopy``, aliasing
between them kept; a fake tensor in its own fake mode), aliases them with
``share_weights=True``, or, with ``copy_on_write=True``, gives the copy tensors
that share memory with the input's until either side writes
(``torch._lazy_clone``). docs/semantics.md says
why copy-on-write is an option and not the default.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from modeswap.fx.torch_private import FakeTensor, lazy_clone, storage_id
from modeswap.records.errors import InvalidOptionError

Tensors = Callable[[torch.Tensor], torch.Tensor]


def tensor_copier(*, share_weights: bool = False, copy_on_write: bool = False) -> Tensors:
    """Return the function that gives one copy of a module or program its tensors.

    The function keeps aliasing: a tensor met twice, or two views of one
    storage, come back as one tensor, or views of one storage. Raises
    :class:`InvalidOptionError` when both options are set.
    """
    if share_weights and copy_on_write:
        msg = (
            "share_weights=True and copy_on_write=True cannot be combined: share_weights gives the result the "
            "input's own parameters and buffers, copy_on_write gives it copies that share memory with them until "
            "either side writes. Pass one of them"
        )
        raise InvalidOptionError(msg)
    if share_weights:
        return _same
    memo: dict[int, Any] = {}
    if copy_on_write:
        return _CopyOnWrite(memo)
    return lambda t: copy_tensor(t, memo)


def copy_tensor(t: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    """``copy.deepcopy(t, memo)``, except that a fake tensor is cloned in its own fake mode.

    ``Tensor.__deepcopy__`` asks a tensor subclass for its ``data_ptr()`` (torch
    warns that this will become an error for a fake tensor) and deep-copies its
    ``__dict__``, which holds a fake tensor's ``FakeTensorMode``: the copy would
    live in a copied mode, which refuses the caller's fake inputs and whose
    ``StorageWeakRef`` objects (raw pointers) are freed twice, a crash.
    """
    if not isinstance(t, FakeTensor):
        return copy.deepcopy(t, memo)
    if id(t) in memo:
        return memo[id(t)]  # type: ignore[no-any-return]
    memo.setdefault(id(t.fake_mode), t.fake_mode)  # the one mode, never a copy of it
    with torch.no_grad():
        new = t.clone()  # dispatched to t.fake_mode: no memory
    if t.requires_grad:
        new.requires_grad_()
    new.__dict__ = copy.deepcopy(vars(t), memo)  # nn.Parameter's mark, the fake device; the mode itself
    memo[id(t)] = new
    return new


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def can_copy_on_write(t: torch.Tensor) -> bool:
    """Whether ``t`` can be copied lazily and then written on either side safely; reads no data.

    Everything else is copied as the default swap copies it (``copy_tensor``):
    tensor subclasses (fake tensors among them), sparse, quantized and nested
    tensors, meta tensors, conjugate and negative views, tensors that are not
    graph leaves or carry a gradient, and storages that are not resizable,
    which covers memory torch did not allocate itself (``torch.load``,
    ``torch.export.load``, NumPy, mmap, DLPack, shared memory).
    """
    # Checked in this order so that a fake or meta tensor is never asked for its storage.
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.layout is torch.strided
        and t.device.type in ("cpu", "cuda")
        and not t.is_quantized  # a lazy clone drops the quantizer: reading the scale crashes
        and not t.is_nested
        and not t.is_conj()  # the conjugate and negative bits belong to the view, not the storage
        and not t.is_neg()
        and t.is_leaf  # deepcopy refuses the others; so does this copy, by falling back to it
        and (type(t) is torch.nn.Parameter or t.grad is None)  # deepcopy copies a plain tensor's gradient
        # A storage torch.load or torch.export.load made has no allocator, and the first write after a
        # lazy clone asks it to copy: a crash. Such storages, and foreign memory, are not resizable.
        and t.untyped_storage().resizable()
    )


class _CopyOnWrite:
    """Copies tensors lazily, one ``torch._lazy_clone`` per storage, and the others as ``copy_tensor`` does.

    Each storage is cloned once, with the first tensor met on it, and every
    other tensor on it is rebuilt as a view of that clone, so tensors that alias
    in the input alias in the copy; cloning each tensor on its own would part
    them at the first write.
    """

    def __init__(self, memo: dict[int, Any]) -> None:
        self.memo = memo
        #: storage id -> (the input's storage, kept alive so that the id stays its own; its lazy clone)
        self.storages: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if id(t) in self.memo:
            return self.memo[id(t)]  # type: ignore[no-any-return]
        if not can_copy_on_write(t):
            return copy_tensor(t, self.memo)
        storage = t.untyped_storage()
        if storage_id(storage) in self.storages:
            _, clone = self.storages[storage_id(storage)]
            with torch.no_grad():
                new = torch.empty(0, dtype=t.dtype, device=t.device)
                new.set_(clone, t.storage_offset(), t.size(), t.stride())
        else:
            new = lazy_clone(t.detach())  # the same view of a lazy clone of the whole storage
            self.storages[storage_id(storage)] = (storage, new.untyped_storage())
        if type(t) is torch.nn.Parameter:
            new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
        else:
            new.requires_grad_(t.requires_grad)
            if vars(t):  # what deepcopy keeps of a plain tensor: nn.Buffer's marks, user attributes
                new.__dict__ = copy.deepcopy(vars(t), self.memo)
        self.memo[id(t)] = new
        return new
