"""Turn the benchmark's raw results into a markdown table and a log-log plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import archive
from targets import (
    CAPTURE_RATIO,
    CHECK_MEDIAN_RATIO,
    CHECK_RATIO,
    COW_MEMORY_RATIO,
    COW_SHARED_RATIO,
    FLOOR_RATIO,
    MEMORY_RATIO,
    Results,
    Target,
    check,
    memory,
    memory_ratio,
    modal_targets,
    ratio,
)

#: Contender keys, in table order, with their column titles.
CONTENDERS = {
    "modeswap": "modeswap",
    "modeswap_shared": "modeswap share_weights",
    "modeswap_cow": "modeswap copy_on_write",
    "floor": "floor",
    "floor_shared": "floor no clone",
    "modeswap_first_call": "modeswap + 1st call",
    "floor_first_call": "floor + 1st call",
    "torchao": "torchao",
    "reexport": "re-export",
}

DIRECTIONS = {
    "to_eval": "to_eval: graphs exported in train mode",
    "to_train": "to_train: graphs exported in eval mode",
}


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def _cell(timing: dict[str, Any] | None) -> str:
    if timing is None:
        return "-"
    if timing.get("error"):
        return "error"
    return f"{_ms(timing['min_s'])} / {_ms(timing['median_s'])}"


def _mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:,.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x" if value < 10 else f"{value:.0f}x"


def _mark(value: float | None, limit: float, *, at_least: bool = False) -> str:
    if value is None:
        return "-"
    met = value >= limit if at_least else value <= limit
    return f"{_x(value)} {'met' if met else '**missed**'}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def machine_line(results: Results) -> str:
    m = results["machine"]
    return (
        f"{m['cpu']}, {m['cores']} cores (torch threads: {m['torch_threads']}), {m['platform']}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, torchao {m['torchao']}; "
        f"modeswap {m['modeswap']} at {m['commit']}{' (dirty)' if m['dirty'] else ''}; "
        f"load average {m.get('load_average_start', '?')} at start, {m.get('load_average_end', '?')} at end"
    )


def timing_table(results: Results, direction: str) -> list[str]:
    header = ["model", "nodes", *CONTENDERS.values()]
    rows = []
    for name, model in results["models"].items():
        if direction not in model:
            continue
        timings = model[direction]["timings"]
        rows.append([name, str(model[direction]["nodes"]), *(_cell(timings.get(key)) for key in CONTENDERS)])
    return _table(header, rows)


def ratio_table(results: Results, direction: str) -> list[str]:
    header = [
        "model",
        "modeswap / floor",
        "share_weights / no-clone floor",
        "+ 1st call / floor + 1st call",
        "copy_on_write / share_weights",
        "torchao / modeswap",
        "torchao / copy_on_write",
        "re-export / modeswap",
    ]
    rows = []
    for name, model in results["models"].items():
        if direction not in model:
            continue
        rows.append(
            [
                name,
                _mark(ratio(results, name, direction, "modeswap", "floor"), FLOOR_RATIO),
                _mark(ratio(results, name, direction, "modeswap_shared", "floor_shared"), FLOOR_RATIO),
                _mark(ratio(results, name, direction, "modeswap_first_call", "floor_first_call"), FLOOR_RATIO),
                _mark(ratio(results, name, direction, "modeswap_cow", "modeswap_shared"), COW_SHARED_RATIO),
                _x(ratio(results, name, direction, "torchao", "modeswap")),
                _x(ratio(results, name, direction, "torchao", "modeswap_cow")),
                _x(ratio(results, name, direction, "reexport", "modeswap")),
            ]
        )
    return _table(header, rows)


def memory_table(results: Results) -> list[str]:
    header = [
        "model",
        "state MiB",
        "modeswap kept MiB",
        "modeswap peak MiB",
        "peak / state",
        "copy_on_write kept / peak MiB",
        "copy_on_write peak / state",
        "share_weights kept / peak bytes",
        "floor kept MiB",
    ]
    rows = []
    for name, model in results["models"].items():
        if "to_eval" not in model:
            continue
        shared = [memory(results, name, "to_eval", "modeswap_shared", k) for k in _KEPT_PEAK]
        rows.append(
            [
                name,
                _mb(model["state_bytes"]),
                _mb(memory(results, name, "to_eval", "modeswap", "new_storage_bytes")),
                _mb(memory(results, name, "to_eval", "modeswap", "peak_allocated_bytes")),
                _mark(memory_ratio(results, name, "to_eval"), MEMORY_RATIO),
                " / ".join(_mb(memory(results, name, "to_eval", "modeswap_cow", k)) for k in _KEPT_PEAK),
                _mark(memory_ratio(results, name, "to_eval", "modeswap_cow"), COW_MEMORY_RATIO),
                " / ".join("-" if v is None else str(v) for v in shared),
                _mb(memory(results, name, "to_eval", "floor", "new_storage_bytes")),
            ]
        )
    return _table(header, rows)


_KEPT_PEAK = ("new_storage_bytes", "peak_allocated_bytes")

#: The weight policies of the first-write table, in column order.
POLICIES = ("clone", "copy_on_write", "share_weights")


def writes_table(results: Results) -> list[str]:
    """Per model and first write: each policy's min / median ms, and copy-on-write's and sharing's min over clone's."""
    header = ["model", "what", *POLICIES, "copy_on_write / clone", "share_weights / clone"]
    rows = []
    for name, model in results["models"].items():
        timings = model.get("writes", {})
        for what in dict.fromkeys(key.partition(" | ")[0] for key in timings):
            cells = {policy: timings.get(f"{what} | {policy}") for policy in POLICIES}
            mins = {policy: (c or {}).get("min_s") for policy, c in cells.items()}
            over = [_x(mins[p] / mins["clone"] if mins[p] and mins["clone"] else None) for p in POLICIES[1:]]
            rows.append([name, what, *(_cell(cells[p]) for p in POLICIES), *over])
    return _table(header, rows)


def switch_table(results: Results) -> list[str]:
    header = [
        "model",
        "nodes",
        "allow_train_eval (once)",
        "modeswap switch",
        "modeswap switch + call",
        "forward",
        "torchao switch",
    ]
    rows = []
    for name, model in results["models"].items():
        switch = model.get("switch")
        if not switch:
            continue
        ours, theirs = switch.get("modeswap", {}), switch.get("torchao", {})
        rows.append(
            [
                name,
                str(model["to_eval"]["nodes"]),
                _switch_cell(ours, "allow_train_eval_min_s"),
                _switch_cell(ours, "mean_switch_s"),
                _switch_cell(ours, "mean_switch_and_call_s"),
                _ms(ours.get("forward_s")),
                _switch_cell(theirs, "mean_switch_s"),
            ]
        )
    return _table(header, rows)


def modal_table(results: Results) -> list[str]:
    header = [
        "model",
        "nodes (train / eval)",
        "two exports",
        "check",
        "check seeds=()",
        "capture",
        "check / two exports",
        "check seeds=() / two exports",
        "capture / two exports",
        "check found (to eval; to train)",
    ]
    rows = []
    for name, model in results["models"].items():
        modal = model.get("modal")
        if not modal:
            continue
        timings = modal["timings"]
        nodes = modal.get("nodes") or [model[d]["nodes"] for d in ("to_eval", "to_train")]
        rows.append(
            [
                name,
                f"{nodes[0]} / {nodes[1]}",
                *(_cell(timings.get(key)) for key in ("two_exports", "check", "check_unrun", "capture")),
                _modal_ratios(results, name, "check", CHECK_RATIO),
                _modal_ratios(results, name, "check_unrun", CHECK_RATIO),
                _modal_ratios(results, name, "capture", CAPTURE_RATIO),
                _found(modal.get("check_found", {})),
            ]
        )
    return _table(header, rows)


def _modal_ratios(results: Results, model: str, contender: str, limit: float) -> str:
    """min / median ratio, the min one marked against ``limit``."""
    low = ratio(results, model, "modal", contender, "two_exports")
    middle = ratio(results, model, "modal", contender, "two_exports", "median_s")
    cpu = ratio(results, model, "modal", contender, "two_exports", "cpu_min_s")
    return f"{_mark(low, limit)} / {_x(middle)} (CPU {_x(cpu)})"


def _found(found: dict[str, Any]) -> str:
    if found.get("error"):
        return "error"
    return "; ".join(", ".join(found[mode]) or "exact" for mode in ("eval", "train") if mode in found) or "-"


def capture_memory_table(results: Results) -> list[str]:
    header = [
        "model",
        "model: storages / MiB",
        "capture: storages / MiB",
        "shared with the model",
        "capture kept MiB",
        "kept / state",
        "peak allocated MiB",
        "peak RSS growth MiB",
    ]
    rows = []
    for name, model in results["models"].items():
        found = model.get("modal", {}).get("memory")
        if not found:
            continue
        if found.get("error"):
            rows.append([name, "error", *["-"] * (len(header) - 2)])
            continue
        kept, state = found["new_storage_bytes"], found["model_bytes"]
        rows.append(
            [
                name,
                f"{found['model_storages']} / {_mb(state)}",
                f"{found['captured_storages']} / {_mb(found['captured_bytes'])}",
                str(found["shared_storages"]),
                _mb(kept),
                _x(kept / state) if state else "-",
                _mb(found.get("peak_allocated_bytes")),
                _mb(found.get("peak_rss_growth_bytes")),
            ]
        )
    return _table(header, rows)


def _switch_cell(entry: dict[str, Any], key: str) -> str:
    if entry.get("skipped"):
        return "n/a"
    if entry.get("error"):
        return "error"
    return _ms(entry.get(key))


def target_table(targets: list[Target]) -> list[str]:
    rows = []
    for t in targets:
        value = "-" if t.value is None else f"{t.value:,.3g}"
        cpu = "-" if t.cpu_value is None else f"{t.cpu_value:,.3g}"
        status = {True: "met", False: "**missed**", None: "not measured"}[t.met]
        limit = f"{'>=' if t.at_least else '<='} {t.limit:g}"
        rows.append([t.name, value, cpu, limit, t.where or "-", status])
    return _table(["target", "value", "CPU-time value", "limit", "model", "status"], rows)


def errors(results: Results) -> list[str]:
    lines = []
    for name, model in results["models"].items():
        for direction in DIRECTIONS:
            for key, timing in model.get(direction, {}).get("timings", {}).items():
                if timing.get("error"):
                    lines.append(f"- {name} {direction} {key}: `{timing['error']}`")
        for key, entry in model.get("switch", {}).items():
            if entry.get("error"):
                lines.append(f"- {name} switch {key}: `{entry['error']}`")
        for key, timing in model.get("writes", {}).items():
            if timing.get("error"):
                lines.append(f"- {name} {key}: `{timing['error']}`")
        modal = model.get("modal", {})
        for key, timing in modal.get("timings", {}).items():
            if timing.get("error"):
                lines.append(f"- {name} {key}: `{timing['error']}`")
        for key in ("check_found", "memory"):
            if modal.get(key, {}).get("error"):
                lines.append(f"- {name} {key}: `{modal[key]['error']}`")
    return lines


def markdown(results: Results) -> str:
    targets = check(results)
    run = "quick run (--quick)" if results["settings"]["quick"] else "full run"
    lines = [
        "# Swap cost: modeswap, torchao, re-export and the floor",
        "",
        f"Measured {results['started']} ({run}, {results['duration_s']:.0f} s) on {machine_line(results)}.",
        "",
        "Times in ms, **min / median** of the repetitions (`gc.collect()` before each). "
        "floor: clone the state, copy the graph and generate its code once (`copy_module` + `recompile_all`); "
        "floor no clone: the same sharing the tensors. torchao: `move_exported_model_to_eval/_train` on a fresh "
        "deep copy each repetition, copy not timed. re-export: `torch.export.export` of the eager model in the "
        "other mode (without `.module()`). + 1st call: the swap and one forward on the result.",
        "",
    ]
    for direction, title in DIRECTIONS.items():
        lines += [f"## {title}", "", *timing_table(results, direction), "", *ratio_table(results, direction), ""]
    lines += [
        "## Targets",
        "",
        "Ratios of minimum wall-clock times decide; the same ratios of minimum CPU times (this process's, "
        "less disturbed by other load on a shared machine) are there to tell noise from cost.",
        "",
        *target_table(targets),
        "",
    ]
    lines += archive.markdown(results["models"])
    lines += [
        "## Memory of a to_eval",
        "",
        "kept: bytes of tensor storage the result holds that the input does not. peak: most CPU memory "
        "allocated and not yet freed during the swap (torch.profiler memory events). share_weights in bytes.",
        "",
        *memory_table(results),
        "",
    ]
    lines += [
        "## A to_eval and the first write to its result",
        "",
        "In ms, min / median, per weight policy: clone (the default), `copy_on_write=True`, `share_weights=True`. "
        "forward reads the weights; an optimizer step (after a forward and a backward) and `load_state_dict` "
        "write every parameter, so a copy-on-write result pays there the copies its swap deferred; "
        "`torch.export.save` follows a swap of the `ExportedProgram`.",
        "",
        *writes_table(results),
        "",
    ]
    lines += [
        "## Switching in place (`allow_train_eval`)",
        "",
        "In ms. allow_train_eval (once): making the switchable module (min of 3). Switch: mean cost of one "
        "`.train()`/`.eval()` on it, over up to 1,000 alternating switches after one forward in each mode; "
        "switch + call: one switch and one forward, against forward alone. torchao: mean of its "
        "`.eval()`/`.train()` after `allow_exported_model_train_eval`, which rewrite the graph each time.",
        "",
        *switch_table(results),
        "",
    ]
    lines += modal_section(results)
    if failures := errors(results):
        lines += ["## Errors", "", *failures, ""]
    return "\n".join(lines)


_STYLES = {
    "modeswap": ("tab:blue", "-"),
    "modeswap_shared": ("tab:cyan", "--"),
    "modeswap_cow": ("tab:green", "-."),
    "floor": ("black", "-"),
    "floor_shared": ("gray", "--"),
    "modeswap_first_call": ("tab:purple", ":"),
    "floor_first_call": ("tab:brown", ":"),
    "torchao": ("tab:red", "-"),
    "reexport": ("tab:orange", "-"),
}
_MARKERS = {"resnet50": "s", "mobilenet_v2": "^", "bert": "D"}


def plot(results: Results, path: Path) -> None:
    """Log-log plot of min time against node count, one line per contender; chains joined, other models marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6), sharey=True)
    for ax, direction in zip(axes, DIRECTIONS, strict=True):
        for key, label in CONTENDERS.items():
            color, style = _STYLES[key]
            chains = _chain_points(results, direction, key)
            if chains:
                xs, ys = zip(*chains, strict=True)
                ax.plot(xs, ys, style, color=color, marker="o", label=label)
            for name, x, y in _named_points(results, direction, key):
                ax.plot([x], [y], _MARKERS.get(name, "x"), color=color, markersize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("nodes in the graph")
        ax.set_title(DIRECTIONS[direction])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time, s (min of repetitions)")
    for name, marker in _MARKERS.items():
        axes[1].plot([], [], marker, color="black", linestyle="none", label=name)
    axes[1].plot([], [], "o-", color="black", label="chains (10-1000 blocks)")
    fig.legend(*axes[1].get_legend_handles_labels(), loc="lower center", ncol=6, fontsize=9)
    fig.suptitle(f"Swap cost against graph size ({results['machine']['cpu']}, min of repetitions)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _chain_points(results: Results, direction: str, key: str) -> list[tuple[int, float]]:
    points = []
    for model in results["models"].values():
        if not model.get("is_chain") or direction not in model:
            continue
        timing = model[direction]["timings"].get(key)
        if timing and timing.get("min_s") is not None:
            points.append((model[direction]["nodes"], timing["min_s"]))
    return sorted(points)


def _named_points(results: Results, direction: str, key: str) -> list[tuple[str, int, float]]:
    points = []
    for name, model in results["models"].items():
        if model.get("is_chain") or direction not in model:
            continue
        timing = model[direction]["timings"].get(key)
        if timing and timing.get("min_s") is not None:
            points.append((name, model[direction]["nodes"], timing["min_s"]))
    return points


def modal_section(results: Results) -> list[str]:
    """check and capture next to two exports, and the memory of a capture: a section of table.md, or modal.md."""
    return [
        "## check and capture next to two exports",
        "",
        "From the eager model, in ms, min / median. two exports: `torch.export.export` in train mode, then in "
        "eval mode (without `.module()`). check: "
        "`modeswap.check(model, args)`, which exports once per mode, swaps each export and compares it with the "
        "other mode's, then, as a second opinion where the comparison cannot vouch for the values, runs both "
        "forward and backward (see docs/eager.md; none of these models needs it); check seeds=(): the same, "
        "never running them, so that the two differ by the machine's noise. capture: "
        "`modeswap.capture(model, args)`, "
        "which exports once per mode and builds one module holding "
        "one copy of the weights. Ratios: min / min (marked against the targets: issue 21's "
        f"{CHECK_RATIO:g} for check on every model, {CHECK_MEDIAN_RATIO:g} at the median; our "
        f"{CAPTURE_RATIO:g} for capture), median / median, and the ratio of minimum CPU times. check found: the "
        "causes it reports for each swap.",
        "",
        *modal_table(results),
        "",
        "The memory of a capture, next to the eager model's state (its parameters, buffers and tensor "
        "attributes): distinct tensor storages and their MiB; shared: storages the capture holds that the model "
        "does too; kept: MiB of the capture's storages that the model does not hold. peak allocated: most CPU "
        "memory allocated and not yet freed during the capture (torch.profiler memory events; full run only). "
        "peak RSS growth: how far the process's resident set rose above its size before the capture (VmHWM, "
        "reset through /proc/self/clear_refs after `malloc_trim(0)`), the graphs' Python objects included.",
        "",
        *capture_memory_table(results),
        "",
    ]


def modal_markdown(results: Results) -> str:
    """``bench.py --only modal``'s page: the section of :func:`modal_section`, and its targets."""
    run = "quick run (--quick)" if results["settings"]["quick"] else "full settings"
    lines = [
        "# check and capture next to two exports (`bench.py --only modal`)",
        "",
        f"Measured {results['started']} ({run}, {results['duration_s']:.0f} s) on {machine_line(results)}.",
        "",
        *modal_section(results)[2:],
        "## Targets",
        "",
        *target_table(modal_targets(results)),
        "",
    ]
    if failures := errors(results):
        lines += ["## Errors", "", *failures, ""]
    return "\n".join(lines)
