"""``modeswap.save`` and ``modeswap.load``: a :class:`ModalModule`'s two programs in one PT2 archive.

The file is torch's own PT2 archive (``torch.export.pt2_archive``), the format
``torch.export.save`` writes, holding two programs instead of one, ``train``
and ``eval``, whose tables name one record per storage, so that a tensor both
programs hold is stored, and loaded, once (:mod:`modeswap.files.packing`). The extra
file ``modeswap.json`` marks it as modeswap's and records what the programs do
not: every module's mode, which tensor names are one tensor, the modules that
define the output types (:class:`modeswap.files.disk.Header`).
``torch.export.pt2_archive._package.load_pt2`` reads the programs without
modeswap.
"""

from __future__ import annotations

import os
from pathlib import Path

from modeswap.files.disk import MODAL_FORMAT, Header, load_archive, save_archive
from modeswap.files.packing import Packed, identities
from modeswap.forms.modal import Layout, ModalModule, modal_of
from modeswap.forms.program import Skeleton
from modeswap.records.errors import NotExportedError, ProgramFileError
from modeswap.records.modes import Mode


def save(modal: ModalModule, path: str | os.PathLike[str]) -> None:
    """Write ``modal`` to ``path``, a ``.pt2`` file: each mode's program, with the module's tensors as they are now.

    The parameters and buffers saved are the module's at the time of the call,
    after training steps, ``.to()`` or ``load_state_dict``, each stored once;
    names that share one tensor (tied weights) stay one tensor, and every
    submodule's mode is recorded. ``modal`` is not modified. The file is
    written next to ``path`` and renamed, so it appears complete or not at
    all; an existing file is replaced. :func:`load` reads it.

    >>> modal = modeswap.capture(model, (x,))
    >>> modeswap.save(modal, "model.pt2")
    """
    skeletons = skeletons_of(modal)
    packed: dict[Mode, Packed] = {}
    types: dict[str, str] = {}
    for mode, skeleton in skeletons.items():
        program, inputs = skeleton.records()
        packed[mode] = Packed(program, inputs, *skeleton.tensors(modal))
        types |= skeleton.output_types()
    layout = modal.layout
    called = None if layout.called is None else {mode.value: sorted(paths) for mode, paths in layout.called.items()}
    header = Header(
        MODAL_FORMAT,
        Mode.TRAIN if modal.training else Mode.EVAL,
        training=modal.flags(),
        overrides={mode.value: sorted(paths) for mode, paths in layout.overrides.items()},
        shared=[list(paths) for paths in layout.shared],
        called=called,
        trains={path: {m.value: sorted(paths) for m, paths in left.items()} for path, left in layout.trains.items()},
        tensors=identities({mode.value: part for mode, part in packed.items()}),
        types=types,
    )
    save_archive(path, packed, header)


def load(path: str | os.PathLike[str]) -> ModalModule:
    """Return the :class:`ModalModule` that :func:`save` wrote to ``path``, in the mode it was saved in.

    Each parameter and buffer is read once, and names that were one tensor are
    one tensor again; ``state_dict`` and every submodule's mode are the saved
    module's. Loading a file runs torch's deserializer on it and imports the
    modules that define its output types: load only files you trust.

    >>> modal = modeswap.load("model.pt2")
    >>> evaluated = modal.eval()
    """
    # The program of the mode the module was saved in is deserialized now, the other on first use of it.
    archive = load_archive(path, lazily=True)
    header = archive.header
    overrides = {mode: frozenset(header.overrides.get(mode.value, ())) for mode in Mode}
    called = None if header.called is None else {Mode(m): frozenset(paths) for m, paths in header.called.items()}
    trains = {path: {Mode(m): frozenset(paths) for m, paths in left.items()} for path, left in header.trains.items()}
    layout = Layout(overrides, tuple(tuple(paths) for paths in header.shared), called, trains)
    # The saved mode's program's tensors are the module's own; the other one reads them by name.
    modal = modal_of(
        {**archive.programs, **archive.deferred},
        training=header.mode is Mode.TRAIN,
        share_weights=True,
        layout=layout,
    )
    for name, training in (header.training or {}).items():
        try:
            module = modal.get_submodule(name)
        except AttributeError as error:
            msg = (
                f"{Path(path)}: the archive records the mode of a module at {name!r}, which the module it loads "
                "lacks; it was saved by another modeswap, which gives modules this one does not: load it with that one"
            )
            raise ProgramFileError(msg) from error
        module.training = training  # not train(), which would set its submodules too
    return modal


def skeletons_of(modal: ModalModule) -> dict[Mode, Skeleton]:
    """Return the :class:`Skeleton` of each mode of ``modal``; raise :class:`NotExportedError` where there is none."""
    if not isinstance(modal, ModalModule):
        msg = (
            f"modeswap.save takes a ModalModule, from modeswap.capture or modeswap.allow_train_eval; got "
            f"{type(modal).__name__}. An ExportedProgram is saved with torch.export.save"
        )
        raise NotExportedError(msg)
    skeletons: dict[Mode, Skeleton] = {}
    for mode in Mode:
        skeleton = modal.variants[mode].skeleton
        if skeleton is None:
            msg = (
                "this ModalModule was made by modeswap.allow_train_eval from a GraphModule, which carries no "
                "ExportedProgram to save. Make it from the program, modeswap.allow_train_eval(ep) with the "
                "ExportedProgram torch.export.export returned, or with modeswap.capture(model, args); "
                "load_state_dict() this module's state_dict() into that one and save it"
            )
            raise NotExportedError(msg)
        skeletons[mode] = skeleton
    return skeletons
