"""Timing and memory primitives: repetitions interleaved across contenders, and tensor storage accounting."""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

#: The call to time.
Thunk = Callable[[], object]
#: Builds what a repetition needs but must not pay for (a fresh copy for an in-place contender); returns the call.
Prepare = Callable[[], Thunk]
#: One repetition: (wall-clock seconds, CPU seconds of this process).
Sample = tuple[float, float]

T = TypeVar("T")


@dataclass
class Timing:
    """The times of one contender, in seconds, or the error that stopped it.

    ``times_s`` is wall-clock time; ``cpu_times_s`` the process's CPU time over
    the same calls, which a shared machine's other load disturbs less.
    """

    times_s: list[float] = field(default_factory=list)
    cpu_times_s: list[float] = field(default_factory=list)
    error: str | None = None

    def add(self, sample: Sample) -> None:
        self.times_s.append(sample[0])
        self.cpu_times_s.append(sample[1])

    @property
    def min_s(self) -> float | None:
        return min(self.times_s) if self.times_s else None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    def to_json(self) -> dict[str, Any]:
        cpu = self.cpu_times_s
        return {
            "min_s": self.min_s,
            "median_s": self.median_s,
            "cpu_min_s": min(cpu) if cpu else None,
            "cpu_median_s": statistics.median(cpu) if cpu else None,
            "reps": len(self.times_s),
            "times_s": self.times_s,
            "cpu_times_s": cpu,
            "error": self.error,
        }


@dataclass(frozen=True)
class Policy:
    """How many repetitions: as many as fit ``budget_s``, within ``[least, most]``."""

    budget_s: float
    least: int
    most: int
    warmup: bool = True

    def reps(self, estimate_s: float) -> int:
        fit = int(self.budget_s / max(estimate_s, 1e-6))
        return max(self.least, min(self.most, fit))


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


def time_once(prepare: Prepare) -> Sample:
    thunk = prepare()
    gc.collect()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = thunk()
    elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    del result, thunk  # freed after the clock stops
    return elapsed, elapsed_cpu


def measure(
    contenders: dict[str, Prepare],
    policy: Policy,
    *,
    seed_times: dict[str, list[Sample]] | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Timing]:
    """Time every contender, repetitions interleaved (round robin) so that machine noise hits all alike.

    Each contender runs once untimed first (``policy.warmup``); that run also
    sizes its repetitions. ``seed_times`` are samples taken elsewhere that count
    as repetitions (the export that made the graph is a re-export sample).
    ``gc.collect()`` runs before each repetition, outside the time.
    """
    timings = {name: Timing() for name in contenders}
    for name, samples in (seed_times or {}).items():
        for sample in samples:
            timings[name].add(sample)
    planned: dict[str, int] = {}
    for name, prepare in contenders.items():
        try:
            if policy.warmup:
                estimate = time_once(prepare)[0]  # not a sample: first calls fill caches
            elif timings[name].times_s:
                estimate = timings[name].times_s[0]
            else:
                sample = time_once(prepare)
                timings[name].add(sample)
                estimate = sample[0]
        except Exception as error:
            timings[name].error = describe(error)
            progress(f"  {name}: failed: {timings[name].error}")
            continue
        planned[name] = policy.reps(estimate)
    rounds = max(planned.values(), default=0)
    for i in range(rounds):
        for name, reps in planned.items():
            if len(timings[name].times_s) >= reps or timings[name].error:
                continue
            try:
                timings[name].add(time_once(contenders[name]))
            except Exception as error:
                timings[name].error = describe(error)
                progress(f"  {name}: failed at repetition {i}: {timings[name].error}")
    return timings


def _tensors(module: torch.nn.Module) -> Iterable[torch.Tensor]:
    for submodule in module.modules():
        yield from (t for t in submodule._parameters.values() if t is not None)
        yield from (t for t in submodule._buffers.values() if t is not None)
        yield from (v for v in vars(submodule).values() if isinstance(v, torch.Tensor))


def storages(module: torch.nn.Module) -> dict[int, int]:
    """The distinct tensor storages ``module`` holds (parameters, buffers, constants): address -> bytes."""
    found: dict[int, int] = {}
    for tensor in _tensors(module):
        storage = tensor.untyped_storage()
        if storage.nbytes():
            # Through const_data_ptr: data_ptr() would copy a copy-on-write storage, and move it.
            found[tensor.const_data_ptr() - tensor.storage_offset() * tensor.element_size()] = storage.nbytes()
    return found


def state_bytes(module: torch.nn.Module) -> int:
    return sum(storages(module).values())


def new_storage_bytes(result: torch.nn.Module, source: torch.nn.Module) -> int:
    """Bytes of the storages ``result`` holds that ``source`` does not: what a swap allocated and kept."""
    old = storages(source)
    return sum(nbytes for address, nbytes in storages(result).items() if address not in old)


def peak_allocated_bytes(fn: Thunk) -> int:
    """The peak of CPU memory allocated and not yet freed while ``fn`` runs, from torch.profiler's memory events.

    Each op's own allocations net of its own frees (``self_cpu_memory_usage``),
    plus allocations outside any op (``[memory]`` events), summed in start order.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def peak_rss_growth(fn: Callable[[], T]) -> tuple[T, int | None]:
    """Return what ``fn`` returns, and how far the process's resident set rose above its size before, at its peak.

    Linux only (None elsewhere): the peak is ``VmHWM`` in /proc/self/status, reset
    first through /proc/self/clear_refs. ``malloc_trim(0)`` first hands back to the
    system what was freed earlier, which ``fn`` would otherwise reuse unseen. It
    counts all the process touches: tensors, and the Python objects of graphs.
    """
    status = Path("/proc/self/status")
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_bytes(status, "VmRSS")
    except OSError:
        return fn(), None
    result = fn()
    return result, _status_bytes(status, "VmHWM") - before


def _status_bytes(status: Path, key: str) -> int:
    line = next(line for line in status.read_text().splitlines() if line.startswith(f"{key}:"))
    return int(line.split()[1]) * 1024  # in kB
