"""The archive rows: ``modeswap.save`` and ``modeswap.load`` of a capture, next to ``torch.export.save``/``load``.

For one model, side by side in interleaved repetitions (``gc.collect()`` before each):

- ``torch_save`` / ``torch_load``: ``torch.export.save`` of the train program alone, and ``torch.export.load`` of
  its file;
- ``save``: ``modeswap.save`` of the capture, both programs and its tensors once, its graphs' records
  serialized already (a second save, or a save of a loaded module);
- ``save_cold``: the same with the records forgotten first (the first save of a capture), untimed;
- ``load``: ``modeswap.load`` of the archive, the module ready to run in the mode it was saved in (the
  other mode's program is deserialized on its first use);
- ``load_both``: the same and the other mode built, what a first switch adds (no target: reported).

Every repetition starts once the file the last save wrote is deleted and every write is on the disk
(``os.sync()``, untimed): a write of gigabytes otherwise waits for the writeback of the one before.
Sizes: the archive, the state (the bytes of the module's distinct storages), the graphs (both programs'
``models/*.json`` and sample inputs), and torch's file of one program. Targets (issue 20): the archive
at most 1.05x the state plus the graphs, ``load`` at most 1.2x ``torch_load``, ``save`` and
``save_cold`` at most 1.2x ``torch_save``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from measure import Policy, Prepare, measure, storages

import modeswap
from modeswap.files.archive import skeletons_of
from modeswap.forms import program as program_form

#: The archive's size over the state and the graphs.
SIZE_RATIO = 1.05
#: modeswap's save and load over torch's, of one program.
TIME_RATIO = 1.2


def contenders(modal: modeswap.ModalModule, program: torch.export.ExportedProgram, folder: Path) -> dict[str, Prepare]:
    """The four calls to time, each writing or reading its own file in ``folder``."""
    torch.export.save(program, folder / "one.pt2")
    modeswap.save(modal, folder / "modal.pt2")

    def cold() -> Callable[[], object]:
        # The records each skeleton remembers, forgotten: what the first save of a capture serializes.
        program_form._RECORDS.clear()
        return lambda: modeswap.save(modal, folder / "written.pt2")

    calls: dict[str, Prepare] = {
        "torch_save": lambda: lambda: torch.export.save(program, folder / "written.pt2"),
        "save": lambda: lambda: modeswap.save(modal, folder / "written.pt2"),
        "save_cold": cold,
        "torch_load": lambda: lambda: torch.export.load(folder / "one.pt2"),
        "load": lambda: lambda: modeswap.load(folder / "modal.pt2"),
        "load_both": lambda: lambda: modeswap.load(folder / "modal.pt2").variants,
    }
    return {name: _fresh(prepare, folder / "written.pt2") for name, prepare in calls.items()}


def _fresh(prepare: Prepare, written: Path) -> Prepare:
    """``prepare``, once the file the last save wrote is gone and every write has reached the disk.

    Each save writes a new file, not over an old one, and none waits for the
    writeback of the one before, or for memory that the page cache holds.
    """

    def fresh() -> Callable[[], object]:
        written.unlink(missing_ok=True)
        os.sync()
        return prepare()

    return fresh


def sizes(modal: modeswap.ModalModule, folder: Path) -> dict[str, int]:
    """The archive's bytes, the state's, the graphs' and torch's file of one program's."""
    graphs = sum(len(record) for s in skeletons_of(modal).values() for record in s.records())
    return {
        "archive_bytes": (folder / "modal.pt2").stat().st_size,
        "state_bytes": sum(storages(modal).values()),
        "graph_bytes": graphs,
        "torch_file_bytes": (folder / "one.pt2").stat().st_size,
    }


def run_archive(
    modal: modeswap.ModalModule,
    program: torch.export.ExportedProgram,
    policy: Policy,
    progress: Callable[[str], None],
    where: Path | None = None,
) -> dict[str, Any]:
    """Time the archive rows of ``modal`` (a capture) and ``program`` (its train export); their sizes.

    The files go to ``where``, by default ``/dev/shm`` where there is one: in
    memory, so that the disk's writeback and discards (ext4 mounted with
    ``discard`` trims the blocks of each deleted file) do not decide the times.
    """
    if where is None and Path("/dev/shm").is_dir():
        where = Path("/dev/shm")
    if where is not None:
        where.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=where, prefix="archive-") as name:
        folder = Path(name)
        prepared = contenders(modal, program, folder)
        found_sizes = sizes(modal, folder)
        timings = measure(prepared, policy, progress=progress)
    return {"timings": {name: t.to_json() for name, t in timings.items()}, "sizes": found_sizes}


def ratios(found: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    """Each target's ratio of minimum wall-clock times and of minimum CPU times (size: the same twice)."""
    timings, s = found["timings"], found["sizes"]

    def over(top: str, bottom: str, clock: str) -> float | None:
        a, b = timings.get(top, {}).get(clock), timings.get(bottom, {}).get(clock)
        return a / b if a is not None and b else None

    size = s["archive_bytes"] / (s["state_bytes"] + s["graph_bytes"])
    found_ratios: dict[str, tuple[float | None, float | None]] = {"size / (state + graphs)": (size, size)}
    pairs = (("load", "torch_load"), ("load_both", "torch_load"), ("save", "torch_save"), ("save_cold", "torch_save"))
    for top, bottom in pairs:
        found_ratios[f"{top} / {bottom}"] = (over(top, bottom, "min_s"), over(top, bottom, "cpu_min_s"))
    return found_ratios


def limits() -> dict[str, float]:
    return {
        "size / (state + graphs)": SIZE_RATIO,
        "load / torch_load": TIME_RATIO,
        "save / torch_save": TIME_RATIO,
        "save_cold / torch_save": TIME_RATIO,
    }


def markdown(models: dict[str, dict[str, Any]]) -> list[str]:
    """The archive rows of each model that has them, as markdown lines."""
    errors = [f"- {name}: `{m['archive']['error']}`" for name, m in models.items() if "error" in m.get("archive", {})]
    found = {name: m["archive"] for name, m in models.items() if "timings" in m.get("archive", {})}
    if not found and not errors:
        return []
    lines = [
        "## Saving and loading a capture",
        "",
        "`modeswap.save` (records serialized already; cold: the first save of a capture) and `modeswap.load` of "
        "a capture, next to `torch.export.save` and `torch.export.load` of its train program alone; load both: "
        "`load` and the first use of the mode it was not saved in. Times in ms, **min / median**; sizes in MiB.",
        "",
        "| model | torch save | save | save cold | torch load | load | load both | archive | state | graphs "
        "| torch file |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, archive in found.items():
        t, s = archive["timings"], archive["sizes"]
        cells = [
            _ms(t[k]) if k in t else "n/a"
            for k in ("torch_save", "save", "save_cold", "torch_load", "load", "load_both")
        ]
        sizes_mib = [f"{s[k] / 2**20:.1f}" for k in ("archive_bytes", "state_bytes", "graph_bytes", "torch_file_bytes")]
        lines.append(f"| {name} | {' | '.join(cells)} | {' | '.join(sizes_mib)} |")
    lines += ["", "| model | ratio | value (CPU) | limit | met |", "| --- | --- | --- | --- | --- |"]
    for name, archive in found.items():
        for what, (value, cpu) in ratios(archive).items():
            limit = limits().get(what)  # None: reported, no target
            met = "n/a" if value is None or limit is None else ("met" if value <= limit else "**missed**")
            lines.append(f"| {name} | {what} | {_fmt(value)} ({_fmt(cpu)}) | {limit or 'none'} | {met} |")
    if errors:
        lines += ["", "Failed:", "", *errors]
    return [*lines, ""]


def _ms(timing: dict[str, Any]) -> str:
    if timing.get("error"):
        return f"error: {timing['error'][:60]}"
    return f"{timing['min_s'] * 1e3:.0f} / {timing['median_s'] * 1e3:.0f}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
