"""Issue 14's scale targets: swapping an LLM-sized graph, and swap time against graph size up to 100k nodes.

    python benchmarks/scale.py                          # full run, 35-45 minutes on 2 shared cores
    python benchmarks/scale.py --quick                  # a 58M-parameter Llama, stacks of 1k and 10k nodes: ~4 min
    python benchmarks/scale.py --out docs/performance   # the published scale.json and scale.md
    python benchmarks/scale.py --parts scaling --sizes 1000,10000 --profile
    python benchmarks/scale.py --parts archive          # save and load of the Llama's capture, ~10 minutes

1. LLM: a transformers ``LlamaForCausalLM`` built from its config with random
   weights (nothing is downloaded) in TinyLlama's shape: 22 layers, hidden 2048,
   intermediate 5632, 32 heads, 4 key-value heads, vocabulary 32000, 1.1B
   parameters in bf16, sdpa attention, attention_dropout 0.1. It is exported on
   CPU once in train mode and once in eval mode (1x16 tokens, no cache); the
   exports share the eager model's tensors, which is then dropped.
   ``to_eval`` runs on the train export's ``.module()`` and ``to_train``
   (attention_dropout=0.1) on the eval export's. Each is timed pure with
   deep-copied weights (the default), with ``copy_on_write=True`` and with
   ``share_weights=True``, next to bench.py's floor (``copy_module`` +
   ``recompile_all``). Then the peak extra memory of one swap of each kind is
   measured: the growth of the resident set, and torch.profiler's peak of
   allocated memory, each over the state's bytes. Last, ``allow_train_eval`` on
   the train export: how long it takes to build, and the storages it holds next
   to the source's.
2. Scaling: a tree of Linear(8,8)-BatchNorm1d-ReLU-Dropout blocks, each
   ``nn.Sequential`` holding at most 16 children (torch.export's ``.module()``
   is quadratic in the children of one module). The stack is exported for real
   at about 1k, 10k and 100k nodes, in the mode each direction starts from. The
   default swap is timed in both directions, and t(100k)/t(10k) is computed.
   Two references are timed next to it: the same swap with the cyclic garbage
   collector off, and bench.py's floor. When the largest step's ratio exceeds
   1.1 times the node ratio (or with ``--profile``), one swap at each of the two
   largest sizes runs under cProfile, and the report lists the functions whose
   time grows faster than the graph.

3. Archive (``--parts archive``, not in the default parts): the same Llama captured
   (``modeswap.capture``: its own copy of the weights), ``modeswap.save`` and
   ``modeswap.load`` of the capture next to ``torch.export.save`` and
   ``torch.export.load`` of its train export, and the archive's size
   (benchmarks/archive.py; the files go to /dev/shm, three of 2.2 GB while it runs).

Targets: on the LLM, ``to_eval`` and ``to_train`` each take under 1 s, and the
peak extra memory of a pure swap stays at most 5% of the state. Going from 10k
to 100k nodes, t(100k)/t(10k) stays at most 11 in both directions (default
swap).

Times are the min and median of interleaved repetitions, with ``gc.collect()``
before each and torch on one thread. As in bench.py, the source graphs are
frozen out of the collector (``gc.freeze()``). Most of a full run is spent
exporting the 100k-node stacks, 7-12 minutes per mode on 2 shared cores. The
script writes ``scale.json`` and ``scale.md`` to ``--out`` (default
build/bench/scale; docs/performance holds the published one), plus
``scale_profile_*.txt`` when it profiles. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import functools
import gc
import io
import itertools
import json
import os
import pstats
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import archive
import torch
from bench import count_nodes, floor, machine
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
from torch import nn
from torch.fx import GraphModule

import modeswap

START = time.perf_counter()

#: The LLM's swaps must each take less than this, in seconds.
TIME_LIMIT_S = 1.0
#: The peak extra memory of a pure swap, over the state's bytes.
MEMORY_RATIO = 0.05
#: t(big) / t(small) may exceed the node ratio by this factor: 11 for 10k to 100k nodes.
SCALING_SLACK = 1.1
#: Each stack module holds at most this many children.
FANOUT = 16

#: The weight policies of a pure swap: keyword arguments of modeswap.to_eval / to_train.
WEIGHTS: dict[str, dict[str, bool]] = {
    "default": {},
    "copy_on_write": {"copy_on_write": True},
    "share_weights": {"share_weights": True},
}
#: Each direction, and the mode its source graph is exported in (True: train).
DIRECTIONS: dict[str, bool] = {"to_eval": True, "to_train": False}

Swap = Callable[..., GraphModule]


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class LlmSpec:
    """A Llama decoder built from its config class, in bf16, with random weights."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    tokens: int = 16
    attention_dropout: float = 0.1

    def description(self) -> str:
        return (
            f"transformers LlamaForCausalLM, {self.layers} layers, hidden {self.hidden}, intermediate "
            f"{self.intermediate}, {self.heads} heads ({self.kv_heads} key-value), vocab {self.vocab}, bf16, sdpa, "
            f"attention_dropout {self.attention_dropout}, 1x{self.tokens} tokens, use_cache=False"
        )

    def build(self) -> nn.Module:
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            attention_dropout=self.attention_dropout,
            attn_implementation="sdpa",
            use_cache=False,
        )
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, self.vocab, (1, self.tokens)),)


#: TinyLlama-1.1B's shape.
FULL_LLM = LlmSpec("llama-1.1b", hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4)
QUICK_LLM = LlmSpec("llama-58m", hidden=512, intermediate=1376, layers=8, heads=8, kv_heads=8)


@dataclass(frozen=True)
class Settings:
    quick: bool
    llm: LlmSpec
    sizes: tuple[int, ...]  # the stack's sizes, in nodes (about)
    llm_swaps: Policy
    allow_reps: int  # repetitions of allow_train_eval on the LLM
    profile: bool  # cProfile the scaling even when it is linear

    def to_json(self) -> dict[str, Any]:
        return {
            "quick": self.quick,
            "llm": vars(self.llm),
            "sizes": list(self.sizes),
            "llm_swaps": vars(self.llm_swaps),
            "allow_reps": self.allow_reps,
            "profile": self.profile,
        }


def settings_for(quick: bool, sizes: str | None, profile: bool) -> Settings:
    default_sizes = (1_000, 10_000) if quick else (1_000, 10_000, 100_000)
    return Settings(
        quick=quick,
        llm=QUICK_LLM if quick else FULL_LLM,
        sizes=tuple(int(s) for s in sizes.split(",")) if sizes else default_sizes,
        llm_swaps=Policy(2.0, 3, 5) if quick else Policy(20.0, 3, 5),
        allow_reps=2 if quick else 3,
        profile=profile,
    )


def swapper(direction: str, attention_dropout: float | None = None) -> Swap:
    if direction == "to_eval":
        return modeswap.to_eval
    return functools.partial(modeswap.to_train, attention_dropout=attention_dropout)


def same(thunk: Callable[[], object]) -> Prepare:
    return lambda: thunk


def export(
    model: nn.Module, args: tuple[torch.Tensor, ...], *, train: bool
) -> tuple[GraphModule, dict[str, float | int]]:
    """``torch.export.export(model)`` in the given mode, then ``.module()``; both timed, with the graph's nodes."""
    model.train(train)
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        program = torch.export.export(model, args)
        exported = time.perf_counter()
        gm: GraphModule = program.module()  # type: ignore[assignment]
        end = time.perf_counter()
    return gm, {"nodes": count_nodes(gm), "export_s": exported - start, "module_s": end - exported}


def report_timings(timings: dict[str, Timing]) -> None:
    for name, t in timings.items():
        if t.error:
            log(f"    {name:<16} error: {t.error}")
        elif t.min_s is not None and t.median_s is not None:
            log(f"    {name:<16} min {t.min_s:9.3f} s  median {t.median_s:9.3f} s  ({len(t.times_s)} reps)")


def ratio(part: float | int | None, whole: float | int | None) -> float | None:
    return part / whole if part is not None and whole else None


# --- 1. LLM ---------------------------------------------------------------------------------------------------------


def swap_memory(call: Callable[[], GraphModule], source: GraphModule, state: int) -> dict[str, Any]:
    """Peak extra memory of one swap: resident set growth and torch.profiler's peak; what it keeps; its warnings."""
    try:
        gc.collect()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result, rss = peak_rss_growth(call)
        kept = new_storage_bytes(result, source)
        del result
        gc.collect()
        peak = peak_allocated_bytes(call)
    except Exception as error:
        return {"error": describe(error)}
    return {
        "peak_rss_growth_bytes": rss,
        "peak_rss_growth_ratio": ratio(rss, state),
        "peak_allocated_bytes": peak,
        "peak_allocated_ratio": ratio(peak, state),
        "new_storage_bytes": kept,
        "new_storage_ratio": ratio(kept, state),
        "warnings": sorted({f"{w.category.__name__}: {w.message}"[:300] for w in caught}),
    }


def llm_direction(direction: str, source: GraphModule, spec: LlmSpec, state: int, policy: Policy) -> dict[str, Any]:
    swap = swapper(direction, spec.attention_dropout)
    contenders: dict[str, Prepare] = {
        name: same(functools.partial(swap, source, **options)) for name, options in WEIGHTS.items()
    }
    contenders["floor"] = same(lambda: floor(source))
    log(f"  {direction}: timing the swaps ({', '.join(contenders)})")
    timings = measure(contenders, policy, progress=log)
    report_timings(timings)
    memory: dict[str, Any] = {}
    for name, options in WEIGHTS.items():
        log(f"  {direction}: peak memory of a {name} swap")
        memory[name] = swap_memory(functools.partial(swap, source, **options), source, state)
        log(
            f"    peak RSS growth / state {_fmt(memory[name].get('peak_rss_growth_ratio'))}, "
            f"peak allocated / state {_fmt(memory[name].get('peak_allocated_ratio'))}, "
            f"warnings {memory[name].get('warnings')}"
        )
    return {"timings": {name: t.to_json() for name, t in timings.items()}, "memory": memory}


def allow_train_eval_cost(source: GraphModule, state: int, reps: int) -> dict[str, Any]:
    """How long ``allow_train_eval`` takes to build, and which storages it holds next to its source's."""
    log("  allow_train_eval: timing")
    timing = measure({"allow": same(lambda: modeswap.allow_train_eval(source))}, Policy(0.0, reps, reps, False))
    report_timings(timing)
    try:
        gc.collect()
        modal, rss = peak_rss_growth(lambda: modeswap.allow_train_eval(source))
        held, own = storages(modal), storages(source)
        modal.eval()
        modal.train()
        after = storages(modal)
    except Exception as error:
        return {"time": timing["allow"].to_json(), "error": describe(error)}
    shared = held.keys() & own.keys()
    found = {
        "time": timing["allow"].to_json(),
        "source_storages": len(own),
        "source_bytes": sum(own.values()),
        "held_storages": len(held),
        "held_bytes": sum(held.values()),
        "shared_storages": len(shared),
        "shared_bytes": sum(held[k] for k in shared),
        "weight_sets": ratio(sum(held.values()), state),
        "held_bytes_after_eval_train": sum(after.values()),
        "peak_rss_growth_bytes": rss,
        "peak_rss_growth_ratio": ratio(rss, state),
    }
    log(
        f"    holds {found['held_storages']} storages, {found['held_bytes']:,} bytes "
        f"({_fmt(found['weight_sets'])} weight sets), {found['shared_storages']} shared with the source"
    )
    return found


def run_llm(settings: Settings) -> dict[str, Any]:
    spec = settings.llm
    log(f"llm: building {spec.name} ({spec.description()})")
    torch.manual_seed(0)
    start = time.perf_counter()
    model = spec.build()
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    log(f"  {params:,} parameters in {build_s:.1f} s")
    sources: dict[str, GraphModule] = {}
    exports: dict[str, dict[str, Any]] = {}
    eager = storages(model)
    for direction, train in DIRECTIONS.items():
        sources[direction], exports[direction] = export(model, spec.inputs(), train=train)
        shared = storages(sources[direction]).keys() & eager.keys()
        exports[direction]["storages_shared_with_eager"] = f"{len(shared)} of {len(eager)}"
        log(f"  exported in {'train' if train else 'eval'} mode: {exports[direction]}")
    del model, eager  # the exports hold the weights
    state = state_bytes(sources["to_eval"])
    result: dict[str, Any] = {
        "name": spec.name,
        "description": spec.description(),
        "params": params,
        "state_bytes": state,
        "state_storages": len(storages(sources["to_eval"])),
        "build_s": build_s,
        "exports": exports,
    }
    gc.collect()
    gc.freeze()
    try:
        for direction, source in sources.items():
            result[direction] = llm_direction(direction, source, spec, state, settings.llm_swaps)
        result["allow_train_eval"] = allow_train_eval_cost(sources["to_eval"], state, settings.allow_reps)
    finally:
        gc.unfreeze()
    return result


def run_llm_archive(settings: Settings) -> dict[str, Any]:
    """modeswap.save and load of the Llama's capture, next to torch's of its train export (benchmarks/archive.py)."""
    spec = settings.llm
    log(f"archive: building {spec.name} ({spec.description()})")
    torch.manual_seed(0)
    model = spec.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        program = torch.export.export(model.train(), spec.inputs())  # shares the eager model's tensors
        modal = modeswap.capture(model, spec.inputs())  # its own copy of them
        log(f"  exported and captured in {time.perf_counter() - start:.1f} s")
    del model
    gc.collect()
    gc.freeze()
    try:
        found = archive.run_archive(modal, program, Policy(0.0, 5, 5), log)
    finally:
        gc.unfreeze()
    report_timings({name: Timing(t["times_s"], t["cpu_times_s"], t["error"]) for name, t in found["timings"].items()})
    return {"name": spec.name, "description": spec.description(), **found}


# --- 2. Scaling -----------------------------------------------------------------------------------------------------


def block() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1))


def stack(blocks: int, fanout: int = FANOUT) -> nn.Sequential:
    """``blocks`` blocks run in order, in a tree of ``nn.Sequential`` with at most ``fanout`` children each."""
    if blocks <= fanout:
        return nn.Sequential(*(block() for _ in range(blocks)))
    span = fanout
    while span * fanout < blocks:
        span *= fanout
    return nn.Sequential(*(stack(min(span, blocks - first), fanout) for first in range(0, blocks, span)))


def stack_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 8),)  # batch 2: a train-mode batch norm refuses one value per channel


def nodes_per_block(train: bool) -> tuple[int, int]:
    """The nodes of an exported stack: ``(per block, fixed)``, from stacks of one and two blocks."""
    one, two = (export(stack(n), stack_inputs(), train=train)[1]["nodes"] for n in (1, 2))
    return two - one, 2 * one - two


def stack_policy(nodes: int) -> Policy:
    # Below 20k nodes a swap takes a few seconds at most; at 100k, 10-20 s.
    return Policy(10.0, 5, 15) if nodes < 20_000 else Policy(0.0, 3, 3, warmup=False)


def profile_swap(swap: Swap, source: GraphModule) -> pstats.Stats:
    profiler = cProfile.Profile()
    gc.collect()
    profiler.enable()
    swap(source)
    profiler.disable()
    return pstats.Stats(profiler)


def stats_text(stats: pstats.Stats, sort: str, top: int) -> str:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats(sort).print_stats(top)
    return "\n".join(line.replace(str(ROOT) + "/", "") for line in out.getvalue().splitlines() if line.strip())


def _where(key: tuple[str, int, str]) -> str:
    file, line, name = key
    return f"{file.split('site-packages/')[-1].replace(str(ROOT) + '/', '')}:{line}({name})"


def superlinear(small: pstats.Stats, big: pstats.Stats, node_ratio: float, top: int) -> list[dict[str, Any]]:
    """The functions whose time grows faster than the graph, the most excess time first.

    Excess is the big graph's time minus ``node_ratio`` times the small one's,
    for cumulative time and own time; calls show what the growth comes from.
    """
    rows = []
    small_stats: dict[Any, Any] = small.stats  # type: ignore[attr-defined]
    for key, (_, calls, own, cumulative, _) in big.stats.items():  # type: ignore[attr-defined]
        _, small_calls, small_own, small_cumulative, _ = small_stats.get(key, (0, 0, 0.0, 0.0, {}))
        rows.append(
            {
                "function": _where(key),
                "calls": [small_calls, calls],
                "own_s": [small_own, own],
                "cumulative_s": [small_cumulative, cumulative],
                "excess_own_s": own - node_ratio * small_own,
                "excess_cumulative_s": cumulative - node_ratio * small_cumulative,
            }
        )
    by_own = sorted(rows, key=lambda r: r["excess_own_s"], reverse=True)[:top]
    by_cumulative = sorted(rows, key=lambda r: r["excess_cumulative_s"], reverse=True)[:top]
    return [{"sort": "excess_own_s", "rows": by_own}, {"sort": "excess_cumulative_s", "rows": by_cumulative}]


def profile_growth(direction: str, graphs: dict[int, GraphModule], sizes: tuple[int, int], out: Path) -> dict[str, Any]:
    """cProfile of one swap of each of two sizes; writes both profiles and the growth to ``scale_profile_*.txt``."""
    small_size, big_size = sizes
    swap = swapper(direction)
    log(f"  {direction}: cProfile at {small_size} and {big_size} nodes")
    small, big = (profile_swap(swap, graphs[size]) for size in sizes)
    node_ratio = count_nodes(graphs[big_size]) / count_nodes(graphs[small_size])
    growth = superlinear(small, big, node_ratio, 25)
    lines = [f"# {direction}: cProfile of one default swap at {small_size} and at {big_size} nodes"]
    for size, stats in ((big_size, big), (small_size, small)):
        for sort in ("cumulative", "tottime"):
            lines += [f"\n## {size} nodes, by {sort}", stats_text(stats, sort, 40)]
    for table in growth:
        lines.append(f"\n## growth beyond the node ratio ({node_ratio:.2f}x), by {table['sort']}")
        lines.append(f"{'excess s':>9} {'small s':>9} {'big s':>9} {'calls small':>12} {'calls big':>10}  function")
        key = "own_s" if table["sort"] == "excess_own_s" else "cumulative_s"
        for row in table["rows"]:
            lines.append(
                f"{row[table['sort']]:9.3f} {row[key][0]:9.3f} {row[key][1]:9.3f} "
                f"{row['calls'][0]:12d} {row['calls'][1]:10d}  {row['function']}"
            )
    path = out / f"scale_profile_{direction}.txt"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    log(f"  wrote {path}")
    top = {t["sort"]: t["rows"][:10] for t in growth}
    return {"sizes": list(sizes), "node_ratio": node_ratio, "file": str(path), "top": top}


def gc_off(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the cyclic garbage collector off while it runs."""

    def run() -> object:
        gc.disable()
        try:
            return fn()
        finally:
            gc.enable()

    return run


def scaling_contenders(direction: str, gm: GraphModule) -> dict[str, Prepare]:
    """The default swap; the same with the collector off; the floor (``copy_module`` + ``recompile_all``)."""
    swap = swapper(direction)
    return {
        "default": same(lambda: swap(gm)),
        "default_gc_off": same(gc_off(lambda: swap(gm))),
        "floor": same(lambda: floor(gm)),
    }


def scaling_ratio(small: dict[str, Any], big: dict[str, Any]) -> dict[str, Any]:
    nodes = big["nodes"] / small["nodes"]
    found: dict[str, Any] = {
        "nodes": [small["nodes"], big["nodes"]],
        "node_ratio": nodes,
        "limit": SCALING_SLACK * nodes,
    }
    for name, t_big in big["timings"].items():
        t_small = small["timings"][name]
        found[name] = {
            "ratio_min": ratio(t_big["min_s"], t_small["min_s"]),
            "ratio_median": ratio(t_big["median_s"], t_small["median_s"]),
            "cpu_ratio_min": ratio(t_big["cpu_min_s"], t_small["cpu_min_s"]),
        }
    return found


def run_direction_scaling(direction: str, settings: Settings, out: Path) -> dict[str, Any]:
    train = DIRECTIONS[direction]
    per_block, fixed = nodes_per_block(train)
    log(f"scaling, {direction}: {per_block} nodes per block and {fixed} more in {'train' if train else 'eval'} mode")
    points: dict[int, dict[str, Any]] = {}
    graphs: dict[int, GraphModule] = {}
    for size in settings.sizes:
        blocks = max(1, round((size - fixed) / per_block))
        if len(points) >= 2:
            a, b = (points[s] for s in list(points)[-2:])
            growth = (b["export_s"] + b["module_s"]) / (a["export_s"] + a["module_s"]) / (b["nodes"] / a["nodes"])
            guess = (b["export_s"] + b["module_s"]) * (size / b["nodes"]) * max(1.0, growth)
            log(f"  {size} nodes: the export should take about {guess:.0f} s (growth {growth:.2f}x the linear)")
        log(f"  {size} nodes: exporting {blocks} blocks in {'train' if train else 'eval'} mode")
        torch.manual_seed(0)
        gm, found = export(stack(blocks), stack_inputs(), train=train)
        log(f"    {found['nodes']} nodes: export {found['export_s']:.1f} s, .module() {found['module_s']:.1f} s")
        gc.collect()
        gc.freeze()
        timings = measure(scaling_contenders(direction, gm), stack_policy(found["nodes"]), progress=log)
        report_timings(timings)
        points[size] = {"blocks": blocks, **found, "timings": {name: t.to_json() for name, t in timings.items()}}
        graphs[size] = gm
    result: dict[str, Any] = {"points": {str(k): v for k, v in points.items()}, "ratios": {}}
    sizes = list(points)
    for small, big in itertools.pairwise(sizes):
        found = scaling_ratio(points[small], points[big])
        result["ratios"][f"{big}/{small}"] = found
        for name in points[big]["timings"]:
            r = found[name]
            log(
                f"  {name}: t({big})/t({small}) {_fmt(r['ratio_min'])} (min), {_fmt(r['ratio_median'])} (median), "
                f"{_fmt(r['cpu_ratio_min'])} (CPU); nodes {found['node_ratio']:.2f}x, limit {found['limit']:.1f}"
            )
        default = found["default"]["ratio_min"]
        exceeded = default is not None and default > found["limit"]
        if big == sizes[-1] and (exceeded or settings.profile):
            result["profile"] = profile_growth(direction, graphs, (small, big), out)
    del graphs
    gc.unfreeze()
    gc.collect()
    return result


def run_scaling(settings: Settings, out: Path) -> dict[str, Any]:
    found: dict[str, Any] = {
        "model": f"tree of Linear(8,8)-BatchNorm1d-ReLU-Dropout blocks, {FANOUT} children per module at most, "
        "input 2x8, exported with torch.export.export (non-strict) and .module()",
        "swap": "default (deep copy)",
    }
    for direction in DIRECTIONS:
        found[direction] = run_direction_scaling(direction, settings, out)
    return found


# --- Targets and output ---------------------------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, note: str = "") -> None:
        met = None if value is None else value <= limit
        found.append({"name": name, "value": value, "limit": limit, "met": met, "note": note})

    llm = results.get("llm")
    if llm:
        for direction in DIRECTIONS:
            for name in WEIGHTS:
                timing = llm[direction]["timings"][name]
                add(
                    f"llm {direction} {name}: min s",
                    timing["min_s"],
                    TIME_LIMIT_S,
                    f"median {_fmt(timing['median_s'])}",
                )
            for name in WEIGHTS:
                memory = llm[direction]["memory"][name]
                note = f"peak allocated / state {_fmt(memory.get('peak_allocated_ratio'))}"
                add(
                    f"llm {direction} {name}: peak RSS growth / state",
                    memory.get("peak_rss_growth_ratio"),
                    MEMORY_RATIO,
                    note,
                )
    rows = results.get("archive")
    if rows and "timings" in rows:
        for what, (value, cpu) in archive.ratios(rows).items():
            if what in archive.limits():  # the others are reported, with no target
                add(f"archive {rows['name']} {what}", value, archive.limits()[what], f"CPU {_fmt(cpu)}")
    scaling = results.get("scaling")
    if scaling:
        for direction in DIRECTIONS:
            for step, r in scaling[direction]["ratios"].items():
                d, f = r["default"], r["floor"]
                note = (
                    f"median {_fmt(d['ratio_median'])}, CPU {_fmt(d['cpu_ratio_min'])}, collector off "
                    f"{_fmt(r['default_gc_off']['ratio_min'])}, floor {_fmt(f['ratio_min'])}; "
                    f"nodes {r['node_ratio']:.2f}x"
                )
                add(f"scaling {direction} t({step}): ratio of min", d["ratio_min"], r["limit"], note)
    return found


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _s(timing: dict[str, Any]) -> str:
    if timing.get("error"):
        return f"error: {timing['error']}"
    return f"{_fmt(timing['min_s'])} / {_fmt(timing['median_s'])}"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Scale: an LLM-sized graph, and graphs of up to 100k nodes",
        "",
        f"Measured {results['started']} ({'quick' if results['settings']['quick'] else 'full'} run, "
        f"{results.get('duration_s', 0):.0f} s) on {m['cpu']}, {m['cores']} cores (torch threads: 1); "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; modeswap at {m['commit']}"
        f"{' (modeswap/ modified)' if m['dirty'] else ''}; load average {m['load_average_start']} at start, "
        f"{m.get('load_average_end', 'n/a')} at end. Produced by `python benchmarks/scale.py`.",
        "",
        "Times in seconds, **min / median** of the repetitions (`gc.collect()` before each).",
    ]
    llm = results.get("llm")
    if llm:
        ex = llm["exports"]
        lines += [
            "",
            f"## {llm['name']}: to_eval and to_train",
            "",
            f"{llm['description']}. {llm['params']:,} parameters; state {llm['state_bytes']:,} bytes "
            f"({llm['state_bytes'] / 2**30:.2f} GiB) in {llm['state_storages']} storages. Train export: "
            f"{ex['to_eval']['nodes']} nodes, {ex['to_eval']['export_s']:.1f} s + {ex['to_eval']['module_s']:.1f} s "
            f"`.module()`; eval export: {ex['to_train']['nodes']} nodes, {ex['to_train']['export_s']:.1f} s + "
            f"{ex['to_train']['module_s']:.1f} s.",
            "",
            "Peak memory: resident set growth during one swap, and torch.profiler's peak of allocated memory, over "
            "the state's bytes; kept: storages the result holds that its source does not. floor: "
            "`copy_module` + `recompile_all` (clone the state, copy the graph, generate its code).",
            "",
            "| direction | weights | time (s) | peak RSS growth / state | peak allocated / state | kept / state |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for direction in DIRECTIONS:
            d = llm[direction]
            for name in (*WEIGHTS, "floor"):
                mem = d["memory"].get(name, {})
                cells = [
                    _fmt(mem.get(k)) if name in d["memory"] else ""
                    for k in ("peak_rss_growth_ratio", "peak_allocated_ratio", "new_storage_ratio")
                ]
                lines.append(f"| {direction} | {name} | {_s(d['timings'][name])} | {' | '.join(cells)} |")
        a = llm.get("allow_train_eval", {})
        if "held_bytes" in a:
            lines += [
                "",
                f"`allow_train_eval` on the train export: {_s(a['time'])} s to build. It holds "
                f"{a['held_storages']} storages, {a['held_bytes']:,} bytes ({_fmt(a['weight_sets'])} weight sets; "
                f"the same {a['held_bytes_after_eval_train']:,} bytes after `.eval()` and `.train()`); "
                f"{a['shared_storages']} of them are shared with the source, which holds {a['source_storages']}. "
                f"Peak RSS growth while building: {_fmt(a['peak_rss_growth_ratio'])} of the state.",
            ]
        elif a:
            lines += ["", f"`allow_train_eval`: {a.get('error')}"]
    scaling = results.get("scaling")
    if scaling:
        lines += [
            "",
            "## Scaling: the default swap against graph size",
            "",
            f"{scaling['model']}.",
            "",
            "Swap: the default `to_eval`/`to_train` (deep copy); collector off: the same with `gc.disable()` "
            "while it runs; floor: `copy_module` + `recompile_all`.",
            "",
            "| direction | blocks | nodes | export (s) | .module() (s) | swap (s) | collector off (s) | floor (s) "
            "| reps |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for direction in DIRECTIONS:
            for p in scaling[direction]["points"].values():
                t = p["timings"]
                lines.append(
                    f"| {direction} | {p['blocks']} | {p['nodes']} | {p['export_s']:.1f} | {p['module_s']:.1f} | "
                    f"{_s(t['default'])} | {_s(t['default_gc_off'])} | {_s(t['floor'])} | {t['default']['reps']} |"
                )
        lines += [
            "",
            "Ratios t(big)/t(small): of the min times, (median), [of the min CPU times].",
            "",
            "| direction | step | node ratio | limit | swap | collector off | floor |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for direction in DIRECTIONS:
            for step, r in scaling[direction]["ratios"].items():
                cells = [
                    f"{_fmt(r[k]['ratio_min'])} ({_fmt(r[k]['ratio_median'])}) [{_fmt(r[k]['cpu_ratio_min'])}]"
                    for k in ("default", "default_gc_off", "floor")
                ]
                lines.append(
                    f"| {direction} | {step} | {r['node_ratio']:.2f} | {r['limit']:.1f} | {' | '.join(cells)} |"
                )
    rows = results.get("archive")
    if rows:
        lines += ["", *archive.markdown({rows.get("name", "llm"): {"archive": rows}})]
    lines += ["", "## Targets", "", "| target | value | limit | met | |", "| --- | --- | --- | --- | --- |"]
    for t in results.get("targets", []):
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "**missed**")
        lines.append(f"| {t['name']} | {_fmt(t['value'])} | {_fmt(t['limit'])} | {met} | {t['note']} |")
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: Path) -> None:
    results["duration_s"] = time.perf_counter() - START
    results["targets"] = targets(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "scale.md").write_text(markdown(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 58M-parameter Llama and stacks of 1k and 10k nodes")
    parser.add_argument("--out", type=Path, default=ROOT / "build/bench/scale", help="where the outputs go")
    parser.add_argument(
        "--parts", default="llm,scaling", help="llm, scaling, archive (comma-separated; default llm,scaling)"
    )
    parser.add_argument("--sizes", help="the stack's sizes in nodes, comma-separated (default 1000,10000,100000)")
    parser.add_argument("--profile", action="store_true", help="cProfile the two largest stacks even when linear")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - {"llm", "scaling", "archive"}:
        raise SystemExit(f"unknown parts {sorted(parts - {'llm', 'scaling', 'archive'})}; known: llm, scaling, archive")
    torch.set_num_threads(1)
    settings = settings_for(args.quick, args.sizes, args.profile)
    results: dict[str, Any] = {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": settings.to_json(),
    }
    if "llm" in parts:
        results["llm"] = run_llm(settings)
        write(results, args.out)
    if "archive" in parts:
        results["archive"] = run_llm_archive(settings)
        write(results, args.out)
    if "scaling" in parts:
        results["scaling"] = run_scaling(settings, args.out)
    results["machine"]["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    write(results, args.out)
    for t in results["targets"]:
        log(f"target {t['name']}: {_fmt(t['value'])} (limit {_fmt(t['limit'])}) {t['met']}; {t['note']}")
    log(f"wrote {args.out}/scale.json and scale.md")


if __name__ == "__main__":
    main()
