"""Time ``modeswap.to_eval`` against its floor (copy the module, recompile once) in one run.

    python benchmarks/swap_cost.py [--blocks 10] [--repeat 20]

The model is a chain of conv-bn-relu-dropout blocks exported in train mode.
Reported: min and median of ``--repeat`` runs, ``gc.collect()`` before each.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import modeswap


def chain(blocks: int, channels: int = 16) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.Dropout(0.1)]
    return nn.Sequential(*layers)


def measure(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    x = torch.randn(2, 16, 8, 8)
    gm = torch.export.export(chain(args.blocks).train(), (x,)).module()
    nodes = len(gm.graph.nodes)
    contenders = {
        "to_eval": lambda: modeswap.to_eval(gm),
        "to_eval(share_weights)": lambda: modeswap.to_eval(gm, share_weights=True),
        "floor: copy + recompile": lambda: modeswap.pipeline()(gm),
        "floor without clone": lambda: modeswap.pipeline().rewrite(gm, share_weights=True),
    }
    results = {name: measure(fn, args.repeat) for name, fn in contenders.items()}
    print(f"{args.blocks}-block conv-bn-relu-dropout chain, {nodes} nodes, torch {torch.__version__}")
    for name, (best, median) in results.items():
        print(f"  {name:<26} min {best * 1e3:7.2f} ms   median {median * 1e3:7.2f} ms")
    ratio = results["to_eval"][0] / results["floor: copy + recompile"][0]
    shared = results["to_eval(share_weights)"][0] / results["floor without clone"][0]
    print(f"  to_eval / floor = {ratio:.2f} (min over min); with share_weights {shared:.2f}")


if __name__ == "__main__":
    main()
