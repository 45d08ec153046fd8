"""``modeswap.save`` and ``modeswap.load``: a :class:`ModalModule`'s two programs in one PT2 archive.

The file is torch's own PT2 archive (``torch.export.pt2_archive``), the format
``torch.export.save`` writes, holding two programs instead of one: ``train``
and ``eval``, each with the module's parameters and buffers, and the extra file
``modeswap.json`` that marks it as modeswap's (the format version and the mode
the module was in). ``torch.export.pt2_archive._package.load_pt2`` reads it
without modeswap.
"""

from __future__ import annotations

import os

from torch.export import ExportedProgram

from modeswap.errors import NotExportedError
from modeswap.files import load_archive, save_archive
from modeswap.modal import ModalModule, modal_of
from modeswap.modes import Mode


def save(modal: ModalModule, path: str | os.PathLike[str]) -> None:
    """Write ``modal`` to ``path``, a ``.pt2`` file: each mode's program, with the module's tensors as they are now.

    The parameters and buffers saved are the module's at the time of the call,
    after training steps, ``.to()`` or ``load_state_dict``; ``modal`` is not
    modified. The file is written next to ``path`` and renamed, so it appears
    complete or not at all; an existing file is replaced. :func:`load` reads it.

    >>> modal = modeswap.capture(model, (x,))
    >>> modeswap.save(modal, "model.pt2")
    """
    save_archive(programs_of(modal), Mode.TRAIN if modal.training else Mode.EVAL, path)


def load(path: str | os.PathLike[str]) -> ModalModule:
    """Return the :class:`ModalModule` that :func:`save` wrote to ``path``, in the mode it was saved in.

    Each parameter and buffer is loaded into the module once, and its
    ``state_dict`` is the saved module's. Loading a file runs torch's
    deserializer on it: load only files you trust.

    >>> modal = modeswap.load("model.pt2")
    >>> evaluated = modal.eval()
    """
    programs, mode = load_archive(path)
    # The loaded train program's tensors are ours alone: the module takes them; the eval program's go.
    return modal_of(programs, training=mode is Mode.TRAIN, share_weights=True)


def programs_of(modal: ModalModule) -> dict[Mode, ExportedProgram]:
    """Return the ``ExportedProgram`` of each mode of ``modal``, holding its parameters and buffers as they are now.

    The programs' state dicts and constants are ``modal``'s own tensors, not copies.
    """
    if not isinstance(modal, ModalModule):
        msg = (
            f"modeswap.save takes a ModalModule, from modeswap.capture or modeswap.allow_train_eval; got "
            f"{type(modal).__name__}. An ExportedProgram is saved with torch.export.save"
        )
        raise NotExportedError(msg)
    programs: dict[Mode, ExportedProgram] = {}
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
        programs[mode] = skeleton.program(modal)
    return programs
