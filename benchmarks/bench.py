"""Benchmark modeswap's swaps side by side with torchao, re-exporting and the copy floor.

    python benchmarks/bench.py                  # full run, about 10-15 minutes
    python benchmarks/bench.py --quick          # chains of 10 and 100 blocks and ResNet-50, about two minutes
    python benchmarks/bench.py --models chain-10,bert --out /tmp/bench
    python benchmarks/bench.py --render docs/performance/results.json --out docs/performance  # re-render only
    python benchmarks/bench.py --only archive   # save and load of ResNet-50's and BERT's captures, a few minutes
    python benchmarks/bench.py --only modal     # check and capture next to two exports (modal.json, modal.md), 5 min

Writes ``results.json`` (raw times, memory, node counts, machine), ``table.md``
and ``plot.png`` to ``--out``: by default ``docs/performance`` for a full run,
``build/bench`` for ``--quick``, ``--models`` or ``--render``, so that those
never overwrite the published results. Progress goes to stderr.

Each model is exported once in train mode (the source of ``to_eval``) and once
in eval mode (the source of ``to_train``); on each source, these are timed in
interleaved repetitions with ``gc.collect()`` before each:

- ``modeswap`` / ``modeswap_shared``: ``modeswap.to_eval``/``to_train``, pure and with ``share_weights=True``;
- ``modeswap_cow``: the same, pure with ``copy_on_write=True`` (weights cloned lazily);
- ``floor`` / ``floor_shared``: ``copy_module`` (tensors cloned or shared) and one ``recompile_all``;
- ``modeswap_first_call`` / ``floor_first_call``: the same plus one forward on the result (lazy code generation);
- ``torchao``: ``move_exported_model_to_eval``/``_train`` on a fresh deep copy, the copy not timed;
- ``reexport``: ``torch.export.export`` of the eager model in the target mode.

Also measured: tensor memory of a swap, and the cost of one ``.train()``/``.eval()``
switch with ``modeswap.allow_train_eval`` (when modeswap has it) and torchao's
``allow_exported_model_train_eval``.

On ResNet-50 and BERT, a to_eval under each weight policy (cloned, copy-on-write,
shared) alone and followed by the first thing a caller does with the result: a
forward, an optimizer step, ``load_state_dict``, ``torch.export.save`` (after a
swap of the program).

On ResNet-50 and BERT, ``modeswap.save`` and ``modeswap.load`` of a capture next to ``torch.export.save`` and
``torch.export.load`` of its train program, and the archive's size (benchmarks/archive.py);
``--only archive`` measures these rows alone.

On chain-100, ResNet-50, BERT, VGG-11-bn and AlexNet, from the eager model:
``modeswap.check``, ``check`` with ``seeds=()`` (no second opinion's runs,
``check_unrun``) and ``modeswap.capture`` next to ``two_exports``,
``torch.export.export`` in train mode then in eval mode, interleaved; what
``check`` finds; and the memory of a capture: the tensor storages it holds next
to the model's, and its peak (the resident set, and in a full run
torch.profiler's allocations). ``--only modal`` measures these rows alone.

Torch runs on one thread: on a small, shared machine OpenMP's spinning threads
make every timing noisier.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import gc
import io
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import archive
import torch
from checkout import ROOT
from measure import (
    Policy,
    Prepare,
    Timing,
    describe,
    measure,
    new_storage_bytes,
    peak_allocated_bytes,
    peak_rss_growth,
    state_bytes,
    storages,
)
from models import ModelSpec, all_specs, chain, quick_specs
from render import machine_line, markdown, modal_markdown, plot
from targets import check
from torch.fx import GraphModule

import modeswap
from modeswap.fx.copying import copy_module, recompile_all

START = time.perf_counter()

#: Where check and capture are timed: a repetition of their three contenders exports the model six times.
#: VGG-11-bn and AlexNet: few nodes, large convolutions and fully connected layers (check's runs, not its exports).
MODAL_MODELS = ("chain-100", "resnet50", "bert", "vgg11_bn", "alexnet")
#: Where a to_eval is timed with the first thing a caller does to its result, under each weight policy.
WRITES_MODELS = ("resnet50", "bert")
#: Where modeswap.save and modeswap.load of a capture are timed next to torch.export.save and load.
ARCHIVE_MODELS = ("resnet50", "bert")
#: How a swap gives its result tensors: modeswap's options for each.
POLICIES: dict[str, dict[str, bool]] = {
    "clone": {},
    "copy_on_write": {"copy_on_write": True},
    "share_weights": {"share_weights": True},
}


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Settings:
    quick: bool
    swaps: Policy  # modeswap and the floors
    torchao: Policy
    reexport: Policy
    switch_budget_s: float  # the most time spent on modeswap's 1,000 switches
    torchao_switches: int  # halved on graphs of more than 2,000 nodes (several seconds each)
    modal: Policy  # check, capture and two exports
    writes: Policy  # a swap and the first thing done to its result, per weight policy
    capture_profiled: bool  # whether a capture's peak allocation is profiled (several seconds on ResNet-50)
    archive: Policy  # modeswap.save and load of a capture, torch.export.save and load of a program

    def to_json(self) -> dict[str, Any]:
        policies = {k: vars(getattr(self, k)) for k in ("swaps", "torchao", "reexport", "modal", "writes", "archive")}
        return {
            "quick": self.quick,
            **policies,
            "switch_budget_s": self.switch_budget_s,
            "torchao_switches": self.torchao_switches,
            "capture_profiled": self.capture_profiled,
        }


FULL = Settings(
    False,
    swaps=Policy(2.0, 5, 20),
    torchao=Policy(6.0, 2, 4),
    reexport=Policy(5.0, 1, 3, warmup=False),
    switch_budget_s=5.0,
    torchao_switches=4,
    modal=Policy(10.0, 3, 5, warmup=False),
    writes=Policy(3.0, 3, 7),
    capture_profiled=True,
    archive=Policy(10.0, 5, 9),
)
QUICK = Settings(
    True,
    swaps=Policy(0.5, 3, 10),
    torchao=Policy(1.0, 1, 1, warmup=False),
    reexport=Policy(0.0, 1, 1, warmup=False),
    switch_budget_s=1.0,
    torchao_switches=2,
    modal=Policy(0.0, 1, 1, warmup=False),
    writes=Policy(0.0, 1, 1, warmup=False),
    capture_profiled=False,
    archive=Policy(0.0, 3, 3),
)


@dataclass(frozen=True)
class Direction:
    """One way to swap: the graph swapped, modeswap's and torchao's function, and the eager mode to re-export in."""

    name: str
    source: GraphModule
    swap: Callable[..., GraphModule]
    torchao: Callable[[GraphModule], object]
    train: bool
    export_s: tuple[float, float]  # the export that made the other mode's graph: a first re-export sample


def floor(gm: GraphModule, *, share_weights: bool = False) -> GraphModule:
    """The least a pure swap must do: copy the module (clone its tensors unless shared), generate code once."""
    new = copy_module(gm, share_weights=share_weights)
    recompile_all(new)
    return new


def count_nodes(gm: torch.nn.Module) -> int:
    return sum(len(m.graph.nodes) for m in gm.modules() if isinstance(m, GraphModule))


def same(thunk: Callable[[], object]) -> Prepare:
    return lambda: thunk


def swap_contenders(d: Direction, args: tuple[torch.Tensor, ...]) -> dict[str, Prepare]:
    src = d.source
    return {
        "modeswap": same(lambda: d.swap(src)),
        "modeswap_shared": same(lambda: d.swap(src, share_weights=True)),
        "modeswap_cow": same(lambda: d.swap(src, copy_on_write=True)),
        "floor": same(lambda: floor(src)),
        "floor_shared": same(lambda: floor(src, share_weights=True)),
        "modeswap_first_call": same(lambda: d.swap(src)(*args)),
        "floor_first_call": same(lambda: floor(src)(*args)),
    }


def torchao_contender(d: Direction) -> Prepare:
    def prepare() -> Callable[[], object]:
        fresh = copy.deepcopy(d.source)  # torchao rewrites in place
        return lambda: d.torchao(fresh)

    return prepare


def reexport_contender(d: Direction, eager: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> Prepare:
    def prepare() -> Callable[[], object]:
        eager.train(d.train)
        return lambda: torch.export.export(eager, args)

    return prepare


def torchao_functions() -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]] | str:
    try:
        from torchao.quantization.pt2e import (
            allow_exported_model_train_eval,
            move_exported_model_to_eval,
            move_exported_model_to_train,
        )
    except Exception as error:
        return describe(error)
    return move_exported_model_to_eval, move_exported_model_to_train, allow_exported_model_train_eval


def unavailable(error: str) -> Callable[[GraphModule], object]:
    def fail(gm: GraphModule) -> object:
        raise RuntimeError(f"torchao unavailable: {error}")

    return fail


def report_timings(timings: dict[str, Timing]) -> None:
    for name, t in timings.items():
        if t.error:
            log(f"    {name:<20} error: {t.error}")
        elif t.min_s is not None and t.median_s is not None:
            log(f"    {name:<20} min {t.min_s * 1e3:10.2f} ms  median {t.median_s * 1e3:10.2f} ms  ({len(t.times_s)})")


def measure_memory(d: Direction) -> dict[str, dict[str, int | str]]:
    """Tensor bytes each swap keeps, and for modeswap's the peak it allocates (profiled: slow on big graphs)."""
    calls: dict[str, tuple[Callable[[], GraphModule], bool]] = {
        "modeswap": (lambda: d.swap(d.source), True),
        "modeswap_shared": (lambda: d.swap(d.source, share_weights=True), True),
        "modeswap_cow": (lambda: d.swap(d.source, copy_on_write=True), True),
        "floor": (lambda: floor(d.source), False),
        "floor_shared": (lambda: floor(d.source, share_weights=True), False),
    }
    found: dict[str, dict[str, int | str]] = {}
    for name, (call, peak) in calls.items():
        gc.collect()
        try:
            found[name] = {"new_storage_bytes": new_storage_bytes(call(), d.source)}
            if peak:
                gc.collect()
                found[name]["peak_allocated_bytes"] = peak_allocated_bytes(call)
        except Exception as error:
            found[name] = {"error": describe(error)}
    return found


def codegen_deferred(d: Direction) -> bool | None:
    """Whether the swapped module generates its code on its first call (torch.fx's lazy recompile)."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule

        result = d.swap(d.source)
    except Exception:
        return None
    return isinstance(result, _LazyGraphModule) and result._needs_recompile()


def forward_time(gm: GraphModule, args: tuple[torch.Tensor, ...], reps: int = 5) -> float:
    gm(*args)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        gm(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def run_direction(
    d: Direction, eager: torch.nn.Module, args: tuple[torch.Tensor, ...], settings: Settings
) -> dict[str, Any]:
    log(f"  {d.name}: modeswap and the floors")
    timings = measure(swap_contenders(d, args), settings.swaps, progress=log)
    log(f"  {d.name}: torchao")
    timings |= measure({"torchao": torchao_contender(d)}, settings.torchao, progress=log)
    log(f"  {d.name}: re-export")
    reexport = {"reexport": reexport_contender(d, eager, args)}
    timings |= measure(reexport, settings.reexport, seed_times={"reexport": [d.export_s]}, progress=log)
    report_timings(timings)
    log(f"  {d.name}: memory")
    return {
        "nodes": count_nodes(d.source),
        "timings": {name: t.to_json() for name, t in timings.items()},
        "memory": measure_memory(d),
        "codegen_deferred": codegen_deferred(d),
        "forward_s": forward_time(floor(d.source), args),
    }


def modeswap_switch(gm: GraphModule, args: tuple[torch.Tensor, ...], budget_s: float) -> dict[str, Any]:
    """Mean cost of one switch over up to 1,000 alternating ``.train()``/``.eval()`` calls."""
    allow = getattr(modeswap, "allow_train_eval", None)
    if allow is None:
        return {"skipped": "modeswap has no allow_train_eval yet"}
    try:
        wrap = Timing([_timed(lambda: allow(gm)) for _ in range(3)])
        module = allow(gm)
        module.train()
        module(*args)
        module.eval()
        module(*args)
        switches, start = 0, time.perf_counter()
        while switches < 1000 and time.perf_counter() - start < budget_s:
            for _ in range(10):
                module.train()
                module.eval()
            switches += 20
        mean_switch = (time.perf_counter() - start) / switches
        start = time.perf_counter()
        for _ in range(10):
            module.train()
            module(*args)
            module.eval()
            module(*args)
        mean_switch_and_call = (time.perf_counter() - start) / 20
        forward = forward_time(module, args)
    except Exception as error:
        return {"error": describe(error)}
    return {
        "allow_train_eval_min_s": wrap.min_s,
        "allow_train_eval_s": wrap.to_json(),
        "switches": switches,
        "mean_switch_s": mean_switch,
        "mean_switch_and_call_s": mean_switch_and_call,
        "forward_s": forward,
    }


def torchao_switch(gm: GraphModule, allow: Callable[[GraphModule], Any], switches: int) -> dict[str, Any]:
    """Mean cost of torchao's ``.eval()``/``.train()`` (alternating, first to eval) on a switchable copy."""
    try:
        module = allow(copy.deepcopy(gm))
        times = [_timed(module.eval if i % 2 == 0 else module.train) for i in range(switches)]
    except Exception as error:
        return {"error": describe(error)}
    return {"switches": switches, "times_s": times, "mean_switch_s": sum(times) / len(times)}


def modal_contenders(spec: ModelSpec, eager: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> dict[str, Prepare]:
    """Two plain exports (train, then eval; no ``.module()``), ``check`` (with and without runs), ``capture``."""

    def two_exports() -> object:
        programs = []
        for train in (True, False):
            eager.train(train)
            programs.append(torch.export.export(eager, args))
        return programs

    return {
        "two_exports": same(two_exports),
        "check": same(lambda: modeswap.check(eager, args, attention_dropout=spec.attention_dropout)),
        # What check costs without its second opinion's runs.
        "check_unrun": same(lambda: modeswap.check(eager, args, attention_dropout=spec.attention_dropout, seeds=())),
        "capture": same(lambda: modeswap.capture(eager, args)),
    }


def check_found(spec: ModelSpec, eager: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Per target mode of ``modeswap.check``: the causes of the swap's differences (none: exact)."""
    try:
        fidelity = modeswap.check(eager, args, attention_dropout=spec.attention_dropout)
    except Exception as error:
        return {"error": describe(error)}
    return {d.target.value: sorted({str(x.cause) for x in d.differences}) for d in fidelity.directions}


def capture_memory(eager: torch.nn.Module, args: tuple[torch.Tensor, ...], *, profiled: bool) -> dict[str, Any]:
    """The tensor storages a capture holds next to the eager model's, and how much memory it takes at its peak."""
    model = storages(eager)
    try:
        gc.collect()
        modal, rss = peak_rss_growth(lambda: modeswap.capture(eager, args))
        held = storages(modal)
        found: dict[str, Any] = {
            "model_storages": len(model),
            "model_bytes": sum(model.values()),
            "captured_storages": len(held),
            "captured_bytes": sum(held.values()),
            "shared_storages": len(held.keys() & model.keys()),
            "new_storage_bytes": new_storage_bytes(modal, eager),
            "peak_rss_growth_bytes": rss,
        }
        del modal
        if profiled:
            gc.collect()
            found["peak_allocated_bytes"] = peak_allocated_bytes(lambda: modeswap.capture(eager, args))
    except Exception as error:
        return {"error": describe(error)}
    return found


def run_modal(
    spec: ModelSpec, eager: torch.nn.Module, args: tuple[torch.Tensor, ...], settings: Settings
) -> dict[str, Any]:
    log("  check and capture next to two exports")
    timings = measure(modal_contenders(spec, eager, args), settings.modal, progress=log)
    report_timings(timings)
    log("  what check finds, memory of a capture")
    return {
        "timings": {name: t.to_json() for name, t in timings.items()},
        "check_found": check_found(spec, eager, args),
        "memory": capture_memory(eager, args, profiled=settings.capture_profiled),
    }


def first_writes(
    program: torch.export.ExportedProgram, source: GraphModule, args: tuple[torch.Tensor, ...]
) -> dict[str, Callable[[dict[str, bool]], object]]:
    """A to_eval under a weight policy, alone and followed by the first thing a caller does with its result.

    The forward reads the weights; the optimizer step (after a backward) and
    ``load_state_dict`` write every parameter, which is where copy-on-write pays
    the copy it deferred; ``torch.export.save`` follows a swap of the program.
    """
    state = {k: v.clone() for k, v in source.state_dict().items()}

    def step(result: GraphModule) -> None:
        outputs = [t for t in torch.utils._pytree.tree_leaves(result(*args)) if isinstance(t, torch.Tensor)]
        sum(t.float().sum() for t in outputs if t.is_floating_point()).backward()
        torch.optim.SGD(result.parameters(), lr=1e-3).step()

    def save(options: dict[str, bool]) -> None:
        swapped = modeswap.swap(program, "eval", **options).module
        torch.export.save(swapped, io.BytesIO())

    return {
        "swap": lambda options: modeswap.to_eval(source, **options),
        "swap + forward": lambda options: modeswap.to_eval(source, **options)(*args),
        "swap + optimizer step": lambda options: step(modeswap.to_eval(source, **options)),
        "swap + load_state_dict": lambda options: modeswap.to_eval(source, **options).load_state_dict(state),
        "program swap + torch.export.save": save,
    }


def run_writes(
    program: torch.export.ExportedProgram, source: GraphModule, args: tuple[torch.Tensor, ...], settings: Settings
) -> dict[str, Any]:
    """Times of :func:`first_writes` under each policy, all interleaved; keys ``"<what> | <policy>"``."""
    log("  to_eval and the first write to its result, per weight policy")
    contenders = {
        f"{what} | {policy}": same(functools.partial(call, options))
        for what, call in first_writes(program, source, args).items()
        for policy, options in POLICIES.items()
    }
    timings = measure(contenders, settings.writes, progress=log)
    report_timings(timings)
    return {name: t.to_json() for name, t in timings.items()}


def _timed(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_export(
    eager: torch.nn.Module, args: tuple[torch.Tensor, ...], *, train: bool
) -> tuple[torch.export.ExportedProgram, tuple[float, float]]:
    eager.train(train)
    gc.collect()
    start, start_cpu = time.perf_counter(), time.process_time()
    program = torch.export.export(eager, args)
    sample = time.perf_counter() - start, time.process_time() - start_cpu
    return program, sample


def run_model(spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    log(f"{spec.name}: building and exporting ({spec.description})")
    torch.manual_seed(0)
    eager, args = spec.build(), spec.inputs()
    train_program, train_export_s = timed_export(eager, args, train=True)
    eval_program, eval_export_s = timed_export(eager, args, train=False)
    train_graph, eval_graph = train_program.module(), eval_program.module()
    log(
        f"  exported: {count_nodes(train_graph)} nodes in train mode ({train_export_s[0]:.2f} s), "
        f"{count_nodes(eval_graph)} in eval mode ({eval_export_s[0]:.2f} s)"
    )
    functions = torchao_functions()
    if isinstance(functions, str):
        to_eval_ao, to_train_ao, allow_ao = unavailable(functions), unavailable(functions), None
    else:
        to_eval_ao, to_train_ao, allow_ao = functions
    to_train = functools.partial(modeswap.to_train, attention_dropout=spec.attention_dropout)
    directions = [
        Direction("to_eval", train_graph, modeswap.to_eval, to_eval_ao, train=False, export_s=eval_export_s),
        Direction("to_train", eval_graph, to_train, to_train_ao, train=True, export_s=train_export_s),
    ]
    # gc.collect() runs before every repetition; frozen, the objects that outlive them are not scanned each time.
    gc.collect()
    gc.freeze()
    try:
        return measure_model(spec, eager, args, directions, train_program, allow_ao, settings)
    finally:
        gc.unfreeze()


def measure_model(
    spec: ModelSpec,
    eager: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    directions: list[Direction],
    train_program: torch.export.ExportedProgram,
    allow_ao: Callable[[GraphModule], Any] | None,
    settings: Settings,
) -> dict[str, Any]:
    train_graph = directions[0].source
    result: dict[str, Any] = {
        "description": spec.description,
        "is_chain": spec.is_chain,
        "state_bytes": state_bytes(train_graph),
    }
    for d in directions:
        result[d.name] = run_direction(d, eager, args, settings)
    log("  switching in place")
    switches = settings.torchao_switches if count_nodes(train_graph) <= 2000 else max(2, settings.torchao_switches // 2)
    result["switch"] = {
        "modeswap": modeswap_switch(train_graph, args, settings.switch_budget_s),
        "torchao": torchao_switch(train_graph, allow_ao, switches) if allow_ao else {"error": "torchao unavailable"},
    }
    if spec.name in WRITES_MODELS:
        result["writes"] = run_writes(train_program, train_graph, args, settings)
    if spec.name in MODAL_MODELS:
        result["modal"] = run_modal(spec, eager, args, settings)
    if spec.name in ARCHIVE_MODELS:
        result["archive"] = run_archive(eager, args, train_program, settings)
    return result


def run_archive(
    eager: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    program: torch.export.ExportedProgram,
    settings: Settings,
) -> dict[str, Any]:
    """modeswap.save and load of a capture of ``eager``, next to torch's of ``program`` (see benchmarks/archive.py)."""
    log("  save and load of a capture next to torch.export.save and load of one program")
    try:
        modal = modeswap.capture(eager, args)
        found = archive.run_archive(modal, program, settings.archive, log)
    except Exception as error:
        return {"error": describe(error)}
    report_timings({name: Timing(t["times_s"], t["cpu_times_s"], t["error"]) for name, t in found["timings"].items()})
    for what, (value, cpu) in archive.ratios(found).items():
        log(f"    {what}: {value:.3f} (CPU {cpu:.3f})" if value is not None and cpu is not None else f"    {what}: n/a")
    return found


def _started(settings: Settings, only: str) -> dict[str, Any]:
    """The results of an ``--only`` run as it starts: when, where, with what settings; no model yet."""
    return {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": settings.to_json(),
        "only": only,
        "models": {},
    }


def _ended(results: dict[str, Any], out: Path) -> None:
    """Close an ``--only`` run's ``results``: its duration, the load at its end, its targets; make ``out``."""
    results["duration_s"] = time.perf_counter() - START
    results["machine"]["load_average_end"] = _load()
    results["targets"] = [t.to_json() for t in check(results)]
    out.mkdir(parents=True, exist_ok=True)


def only_archive(specs: list[ModelSpec], settings: Settings, out: Path) -> None:
    """``--only archive``: the archive rows of each model alone, to ``out``/results.json and archive.md."""
    results = _started(settings, "archive")
    for spec in specs:
        log(f"{spec.name}: building, exporting and capturing ({spec.description})")
        torch.manual_seed(0)
        eager, args = spec.build(), spec.inputs()
        program = torch.export.export(eager.train(), args)
        gc.collect()
        gc.freeze()
        try:
            found = run_archive(eager, args, program, settings)
        finally:
            gc.unfreeze()
        results["models"][spec.name] = {"description": spec.description, "archive": found}
    _ended(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = archive.markdown(results["models"])
    (out / "archive.md").write_text(
        "\n".join([f"Measured {results['started']} on {machine_line(results)}.", "", *table])
    )
    log(f"wrote {out}/results.json and archive.md")


def only_modal(specs: list[ModelSpec], settings: Settings, out: Path) -> None:
    """``--only modal``: check and capture next to two exports on each model, to ``out``/modal.json and modal.md.

    Not results.json: ``--out docs/performance`` publishes these rows beside the full run's results.
    """
    results = _started(settings, "modal")
    log(f"warming up torch.export; {len(specs)} models: {', '.join(s.name for s in specs)}")
    torch.export.export(chain(1), (torch.randn(2, 16, 8, 8),))
    for spec in specs:
        log(f"{spec.name}: building and exporting ({spec.description})")
        torch.manual_seed(0)
        eager, args = spec.build(), spec.inputs()
        nodes = [count_nodes(timed_export(eager, args, train=train)[0].module()) for train in (True, False)]
        gc.collect()
        gc.freeze()
        try:
            found = run_modal(spec, eager, args, settings)
        finally:
            gc.unfreeze()
        results["models"][spec.name] = {"description": spec.description, "modal": {**found, "nodes": nodes}}
    _ended(results, out)
    (out / "modal.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "modal.md").write_text(modal_markdown(results))
    log(f"wrote {out}/modal.json and modal.md")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "torchao": _version("torchao"),
        "modeswap": modeswap.__version__,
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--", "modeswap")),
        "load_average_start": _load(),
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def write(results: dict[str, Any], out: Path, *, final: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["targets"] = [t.to_json() for t in check(results)]
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if final:
        (out / "table.md").write_text(markdown(results))
        plot(results, out / "plot.png")


def select(quick: bool, names: str | None) -> list[ModelSpec]:
    specs = quick_specs() if quick and not names else all_specs()
    if names:
        wanted = names.split(",")
        unknown = set(wanted) - {s.name for s in specs}
        if unknown:
            raise SystemExit(f"unknown models {sorted(unknown)}; known: {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in wanted]
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="chains of 10 and 100 blocks and ResNet-50, few reps")
    parser.add_argument("--out", type=Path, help="where the outputs go (default: see above)")
    parser.add_argument("--models", help="comma-separated model names, e.g. chain-10,resnet50")
    parser.add_argument("--render", type=Path, help="re-render table.md and plot.png from this results.json")
    parser.add_argument(
        "--only",
        choices=["archive", "modal"],
        help="only these rows: archive, save and load of a capture (resnet50, bert); modal, check and capture",
    )
    args = parser.parse_args()
    if args.out is None:
        partial = args.quick or args.models or args.render or args.only
        args.out = ROOT / ("build/bench" if partial else "docs/performance")
    if args.render:
        write(json.loads(args.render.read_text()), args.out, final=True)
        return
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    settings = QUICK if args.quick else FULL
    if args.only == "archive":
        specs = [s for s in select(False, args.models) if args.models or s.name in ARCHIVE_MODELS]
        only_archive(specs, settings, args.out)
        return
    if args.only == "modal":
        specs = [s for s in select(False, args.models) if args.models or s.name in MODAL_MODELS]
        only_modal(specs, settings, args.out)
        return
    specs = select(args.quick, args.models)
    results: dict[str, Any] = {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": settings.to_json(),
        "models": {},
    }
    log(f"warming up torch.export; {len(specs)} models: {', '.join(s.name for s in specs)}")
    torch.export.export(chain(1), (torch.randn(2, 16, 8, 8),))
    for spec in specs:
        results["models"][spec.name] = run_model(spec, settings)
        results["duration_s"] = time.perf_counter() - START
        write(results, args.out, final=False)
    results["machine"]["load_average_end"] = _load()
    write(results, args.out, final=True)
    log(f"wrote {args.out}/results.json, table.md and plot.png")


if __name__ == "__main__":
    main()
