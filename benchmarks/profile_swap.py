"""Where a swap's time goes, next to the floor's: phases, cProfile, and the functions that cost more than the floor.

    python benchmarks/profile_swap.py                       # to_eval on chain-100 and resnet50
    python benchmarks/profile_swap.py --models bert --direction to_train --top 40

For each model: the minimum time of each phase of the swap (the module copy,
each pass's kernel, code generation, the rest of ``modeswap.swap``) against the
floor (``copy_module`` + ``recompile_all``); then cProfile of the swap and of the
floor, sorted by cumulative and by own time; then the functions whose own time
exceeds the floor's the most. Prints to stdout.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import io
import pstats
import warnings
from collections.abc import Callable

import torch
from checkout import ROOT  # first: modeswap from this checkout
from measure import Policy, Prepare, measure
from models import ModelSpec, all_specs
from torch.fx import GraphModule

import modeswap
from modeswap.fx.copying import copy_module, recompile_all


def on_copy(step: Callable[[GraphModule], object], source: GraphModule, *, share_weights: bool) -> Prepare:
    """Time ``step`` alone on a fresh copy of ``source`` each repetition (the copy not timed)."""

    def prepare() -> Callable[[], object]:
        copy = copy_module(source, share_weights=share_weights)
        return lambda: tuple(step(copy) or ())  # type: ignore[call-overload]

    return prepare


def phases(source: GraphModule, swap: Callable[..., GraphModule], mode: str, reps: int) -> None:
    """Print the minimum time of each phase of a swap next to the floor's, repetitions interleaved."""
    from modeswap.passes import set_training, swap_passes

    steps: dict[str, Prepare] = {
        "copy_module (clone)": lambda: lambda: copy_module(source),
        "copy_module (shared)": lambda: lambda: copy_module(source, share_weights=True),
        "recompile_all": on_copy(recompile_all, source, share_weights=True),
    }
    for p in (*swap_passes(mode), set_training(mode)):
        steps[f"kernel {p.name}"] = on_copy(p.edit, source, share_weights=True)
    steps["floor: copy_module + recompile_all"] = lambda: lambda: recompile_all(copy_module(source))
    steps["swap (pure)"] = lambda: lambda: swap(source)
    timings = measure(steps, Policy(0.0, reps, reps))
    best = {name: t.min_s or 0.0 for name, t in timings.items()}
    print(f"{'phase (min of ' + str(reps) + ', interleaved)':<48} {'ms':>9}")
    for name, seconds in best.items():
        print(f"{name:<48} {seconds * 1e3:9.2f}")
    parts = ("copy_module (clone)", "recompile_all")
    accounted = sum(best[k] for k in parts) + sum(v for k, v in best.items() if k.startswith("kernel"))
    floor_s, swap_s = best["floor: copy_module + recompile_all"], best["swap (pure)"]
    print(f"{'swap / floor':<48} {swap_s / floor_s:9.2f}x")
    print(f"{'swap - floor':<48} {(swap_s - floor_s) * 1e3:9.2f}")
    print(f"{'swap - (copy + kernels + recompile)':<48} {(swap_s - accounted) * 1e3:9.2f}")


def profile(fn: Callable[[], object], calls: int) -> pstats.Stats:
    profiler = cProfile.Profile()
    gc.collect()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    return pstats.Stats(profiler)


def print_stats(title: str, stats: pstats.Stats, sort: str, top: int) -> None:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats(sort).print_stats(top)
    print(f"--- {title}, by {sort} ---")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))


def above_floor(swap: pstats.Stats, floor: pstats.Stats, calls: int, top: int) -> None:
    """Print the functions whose own time per swap exceeds the floor's the most."""
    own_swap = {k: v[2] for k, v in swap.stats.items()}  # type: ignore[attr-defined]
    own_floor = {k: v[2] for k, v in floor.stats.items()}  # type: ignore[attr-defined]
    counts = {k: v[1] for k, v in swap.stats.items()}  # type: ignore[attr-defined]
    extra = {k: own_swap[k] - own_floor.get(k, 0.0) for k in own_swap}
    print(f"--- own time above the floor, ms per swap (cProfile, {calls} calls each) ---")
    print(f"{'extra ms':>9} {'swap ms':>9} {'floor ms':>9} {'calls':>8}  function")
    for key in sorted(extra, key=lambda k: extra[k], reverse=True)[:top]:
        file, line, name = key
        where = f"{file.split('site-packages/')[-1].replace(str(ROOT) + '/', '')}:{line}({name})"
        per = [x * 1e3 / calls for x in (extra[key], own_swap[key], own_floor.get(key, 0.0))]
        print(f"{per[0]:9.2f} {per[1]:9.2f} {per[2]:9.2f} {counts[key] // calls:8d}  {where}")
    total_swap, total_floor = swap.total_tt / calls, floor.total_tt / calls  # type: ignore[attr-defined]
    print(f"total under cProfile: swap {total_swap * 1e3:.1f} ms, floor {total_floor * 1e3:.1f} ms per call")


def run(spec: ModelSpec, direction: str, reps: int, calls: int, top: int) -> None:
    torch.manual_seed(0)
    eager, args = spec.build(), spec.inputs()
    source: GraphModule = torch.export.export(eager.train(direction == "to_eval"), args).module()  # type: ignore[assignment]
    nodes = sum(len(m.graph.nodes) for m in source.modules() if isinstance(m, GraphModule))
    if direction == "to_eval":
        swap: Callable[..., GraphModule] = modeswap.to_eval
    else:
        swap = functools.partial(modeswap.to_train, attention_dropout=spec.attention_dropout)
    print(f"=== {spec.name}: {direction}, {nodes} nodes ({spec.description}) ===")
    swap(source)  # warm caches
    gc.collect()
    gc.freeze()  # gc.collect() before each repetition then scans only what the swaps make
    try:
        report(spec, direction, source, swap, reps, calls, top)
    finally:
        gc.unfreeze()
    print()


def report(
    spec: ModelSpec,
    direction: str,
    source: GraphModule,
    swap: Callable[..., GraphModule],
    reps: int,
    calls: int,
    top: int,
) -> None:
    mode = "eval" if direction == "to_eval" else "train"
    phases(source, swap, mode, reps)
    swap_stats = profile(lambda: swap(source), calls)
    floor_stats = profile(lambda: recompile_all(copy_module(source)), calls)
    for sort in ("cumulative", "tottime"):
        print_stats(f"{spec.name} {direction} swap ({calls} calls)", swap_stats, sort, top)
        print_stats(f"{spec.name} floor ({calls} calls)", floor_stats, sort, top)
    above_floor(swap_stats, floor_stats, calls, top)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", default="chain-100,resnet50", help="comma-separated model names")
    parser.add_argument("--direction", choices=("to_eval", "to_train"), default="to_eval")
    parser.add_argument("--reps", type=int, default=15, help="repetitions per phase (minimum reported)")
    parser.add_argument("--calls", type=int, default=5, help="swaps per cProfile run")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    specs = {s.name: s for s in all_specs()}
    for name in args.models.split(","):
        run(specs[name], args.direction, args.reps, args.calls, args.top)


if __name__ == "__main__":
    main()
