"""``modeswap demo``: export a model in train mode, swap it to eval and back, check each step against eager."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modeswap.cli.tables import changes_table, report_table
from modeswap.eager.running import run_forward_backward
from modeswap.forms.swap import mode_of, swap, to_eval, to_train
from modeswap.records.modes import Mode
from modeswap.rewrite.base import pipeline
from modeswap.testing.oracle import Snapshot, call_signature


class DemoNet(nn.Module):
    """The demo's model: conv, batch norm with custom momentum and eps, dropout, attention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, momentum=0.05, eps=1e-3)
        self.drop = nn.Dropout(0.2)
        self.attention_p = 0.1
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.relu(self.bn(self.conv(x))))
        tokens = x.flatten(2).transpose(1, 2).unsqueeze(1)  # (batch, 1 head, positions, channels)
        p = self.attention_p if self.training else 0.0
        attended = F.scaled_dot_product_attention(tokens, tokens, tokens, dropout_p=p)
        return self.head(attended.mean(dim=2).squeeze(1))  # type: ignore[no-any-return]


NEXT_STEPS = """\
Next:
  modeswap inspect MODEL.pt2                          the mode of each site of a program saved with torch.export.save
  modeswap convert MODEL.pt2 --to eval -o EVAL.pt2    write a swapped copy (modeswap convert --help for the options)
  evaluated = modeswap.to_eval(gm)                    the same from Python: to_train, swap, mode_of, allow_train_eval
                                                      (README.md and docs/guide.md)"""


def _max_difference(expected: dict[str, Any], actual: dict[str, Any]) -> float:
    pairs = list(zip(expected["outputs"], actual["outputs"], strict=True))
    pairs += [(expected["buffers"][k], actual["buffers"][k]) for k in expected["buffers"]]
    pairs += [(expected["grads"][k], actual["grads"][k]) for k in expected["grads"] if expected["grads"][k] is not None]
    return max(float((e.double() - a.double()).abs().max()) for e, a in pairs)


def fastest_seconds(fn: Callable[[], object], repeat: int = 7) -> float:
    """Return the shortest of ``repeat`` timed calls of ``fn``: the run the rest of the machine disturbed least."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def demo() -> int:
    """Export a model in train mode, swap it to eval and back, and check every step against eager."""
    torch.manual_seed(0)
    model = DemoNet()
    x = torch.randn(4, 3, 8, 8)
    checks: list[tuple[str, bool]] = []

    def check(what: str, ok: bool) -> None:
        checks.append((what, ok))
        print(f"  [{'ok' if ok else 'FAILED'}] {what}")

    print("1. Export DemoNet (conv, batch norm momentum=0.05 eps=1e-3, dropout p=0.2, attention p=0.1) in train mode")
    gm = torch.export.export(copy.deepcopy(model).train(), (x,)).module()
    before = Snapshot.of(gm)
    print(report_table(mode_of(gm)))

    print("\n2. Swap to eval")
    evaluated = swap(gm, "eval")
    print(changes_table(evaluated.changes))
    expected = run_forward_backward(copy.deepcopy(model).eval(), (x,), seed=1)
    actual = run_forward_backward(evaluated.module, (x,), seed=1)
    difference = _max_difference(expected, actual)
    print(f"  max |eager eval - swapped| over outputs, buffers and gradients: {difference:.3g}")
    check("eval graph matches eager model.eval() (outputs, buffers, gradients)", difference == 0.0)
    check("mode_of says eval", mode_of(evaluated.module).mode is Mode.EVAL)

    print("\n3. Swap back to train")
    trained = to_train(evaluated.module)
    eager_train = copy.deepcopy(model).train()
    expected = run_forward_backward(eager_train, (x,), seed=2)
    actual = run_forward_backward(trained, (x,), seed=2)
    difference = _max_difference(expected, actual)
    print(f"  max |eager train - swapped| under one seed: {difference:.3g}")
    print(f"  num_batches_tracked after one forward: {int(actual['buffers']['bn.num_batches_tracked'])}")
    check("train graph matches eager model.train() (outputs, buffers, gradients, dropout masks)", difference == 0.0)
    check(
        "round trip gives back the exported train graph",
        call_signature(trained) == call_signature(gm),
    )

    print("\n4. The input was never touched")
    check("exported module: same code, nodes, meta, tensors and storage", Snapshot.of(gm) == before)

    print("\n5. Time (fastest of 7 runs)")
    swap_time = fastest_seconds(lambda: to_eval(gm))
    floor_time = fastest_seconds(lambda: pipeline()(gm))
    print(
        f"  to_eval: {swap_time * 1e3:.1f} ms; floor: {floor_time * 1e3:.1f} ms "
        "(copying the module and generating its code, which any pure swap pays)"
    )

    failed = [what for what, ok in checks if not ok]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks held.")
    print(f"\n{NEXT_STEPS}")
    return 1 if failed else 0
