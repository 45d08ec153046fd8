"""Measure modeswap on real torchvision and timm models: the traces of issue 24, and sections 3, 4, 5 of issue 20.

Not a pytest file: it prints a table per check and exits 1 if a check fails. Run it from
the repository root, in a virtual environment of its own (the PyPI torchvision wheel
breaks the main environment's torch, so never install it there)::

    python -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/tvenv/bin/pip install --no-deps timm
    /tmp/tvenv/bin/pip install attrs toolz pyyaml huggingface_hub safetensors hypothesis numpy
    /tmp/tvenv/bin/pip install --no-deps -e .
    /tmp/tvenv/bin/python -m tests.integration.check_torchvision_timm
        [--check traces recompute archive frozen-bn advice] [--model NAME ...]

Every model is built with random weights (nothing is downloaded), on one thread, one at a time.

1. ``traces`` (issue 24): ``torch.export.export(model.eval(), args)``, then ``modeswap.to_train``
   of the program and of ``program.module()``, and ``modeswap.allow_train_eval(program)``. Only
   GoogLeNet (``aux1``, ``aux2``) and Inception-v3 (``AuxLogits``) may get the
   ``TrainingBranchWarning`` that says "no node reads"; every other modeswap warning is listed,
   each judged against a train export of the model (did the modules it names run in train only, or
   in neither mode; what training ``p`` does the train export hold). Where a swap refuses a site
   (``UnsupportedGraphError``: a ViT's position dropout), it is said and the site kept (``keep=``)
   so that the rest can be measured.
2. ``recompute`` (issue 20, 5): ``capture(densenet121(memory_efficient=True).train())`` names the
   ``norm1`` of every dense layer in a ``RecomputedUpdateWarning``; ``memory_efficient=False`` warns
   not. After one train step, ``num_batches_tracked`` of eager (checkpointed) and of the capture.
3. ``archive`` (issue 20, 3): GoogLeNet and Inception-v3 captured in train, saved, loaded in a fresh
   process and run in train and eval against eager (output type, outputs, buffers, gradients); the
   archive through ``modeswap inspect`` and ``modeswap convert --to eval``.
4. ``frozen-bn`` (issue 20, 4): torchvision's and timm's ResNet-18, captured and through
   ``allow_train_eval`` of a train export, trained two SGD steps with every batch norm in eval
   (set by path with ``get_submodule``), against eager doing the same.
5. ``advice``: ``modeswap.check(model, args)`` on every model above, a small Swin (torchvision's and
   timm's) and timm's ViT with ``attn_drop_rate=0.1``, in train with a gradient on every parameter:
   rows per direction, causes, ``suggested``. ``check(model, args, **fidelity.suggested)`` must
   leave no row on a module that a row with options covered, and make exact each direction whose
   every row had options. Each such direction (or exact one) is then swapped from an export of
   its source mode with the suggested options (``keep=`` only, to eval) and run forward and
   backward against eager in its target mode under one seed. ``check`` must leave the model as it
   found it (``modeswap.testing.Observed``). A "swap refused" row (a ViT's position dropout) has no
   options and is expected to stay; a second row measures the rest with the refused site kept
   (``keep=``). A third, for a model with batch norms, has the first one in eval
   (``fidelity.mixed``; the eager model in train is taken as found).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

import modeswap
from modeswap.testing import Observed, assert_same_run, run_forward_backward

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5
RTOL = 1e-5


@dataclass(frozen=True)
class Spec:
    """A model, how to build it with random weights, and the input it runs on."""

    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...] = (2, 3, 64, 64)
    #: The modules that issue 24's "no node reads" warning must name after an eval export, and no other.
    unread: tuple[str, ...] = ()

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build()

    def inputs(self, shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor]:
        return (torch.randn(*(shape or self.shape), generator=torch.Generator().manual_seed(1)),)


def _tv(name: str, **options: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **options)  # type: ignore[no-any-return]

    return build


def _tv_small_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    # vit_b_16's class, two layers wide 32: nn.MultiheadAttention with dropout, on a 32x32 input.
    return VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        dropout=0.1,
        attention_dropout=0.1,
        num_classes=10,
    )


def _timm(name: str, **options: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **options)  # type: ignore[no-any-return]

    return build


GOOGLENET = Spec("tv googlenet", _tv("googlenet", aux_logits=True, init_weights=False), unread=("aux1", "aux2"))
# The auxiliary head runs in train mode only from 299x299 up (its 5x5 conv after a 5/3 pooling of Mixed_6e).
INCEPTION = Spec(
    "tv inception_v3",
    _tv("inception_v3", aux_logits=True, init_weights=False),
    shape=(2, 3, 299, 299),
    unread=("AuxLogits",),
)
DENSENET_EFFICIENT = Spec("tv densenet121 memory_efficient", _tv("densenet121", memory_efficient=True))
DENSENET = Spec("tv densenet121", _tv("densenet121", memory_efficient=False))
TV_RESNET = Spec("tv resnet18", _tv("resnet18"))
TIMM_RESNET = Spec("timm resnet18", _timm("resnet18"))

MODELS = (
    GOOGLENET,
    INCEPTION,
    DENSENET_EFFICIENT,
    DENSENET,
    TV_RESNET,
    Spec("tv mobilenet_v3_small", _tv("mobilenet_v3_small")),
    Spec("tv efficientnet_b0", _tv("efficientnet_b0")),
    Spec("tv regnet_y_400mf", _tv("regnet_y_400mf")),
    Spec("tv VisionTransformer (2 layers, 32 wide)", _tv_small_vit, shape=(2, 3, 32, 32)),
    TIMM_RESNET,
    Spec("timm efficientnet_b0", _timm("efficientnet_b0")),
    Spec("timm convnext_atto", _timm("convnext_atto")),
    Spec("timm convnext_atto drop_path_rate=0.1", _timm("convnext_atto", drop_path_rate=0.1)),
    Spec("timm vit_tiny_patch16_224", _timm("vit_tiny_patch16_224"), shape=(2, 3, 224, 224)),
    Spec("timm mobilenetv3_small_050", _timm("mobilenetv3_small_050")),
)


def _tv_small_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    # check_vendored_swin's SMALL: attention dropout 0.1, no other dropout, no stochastic depth.
    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=32,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=[4, 4],
        dropout=0.0,
        attention_dropout=0.1,
        stochastic_depth_prob=0.0,
        num_classes=10,
    )


#: Only ``advice`` runs these: attention dropout in a torchvision and a timm Swin and a timm ViT (12 blocks).
ADVICE_MODELS = (
    *MODELS,
    Spec("tv SwinTransformer (2 stages, 32 wide)", _tv_small_swin, shape=(2, 3, 32, 32)),
    Spec(
        "timm swin (2 stages, 32 wide) attn_drop_rate=0.1 drop_path_rate=0",
        _timm(
            "swin_tiny_patch4_window7_224",
            img_size=32,
            window_size=4,
            embed_dim=32,
            depths=(2, 2),
            num_heads=(2, 4),
            attn_drop_rate=0.1,
            drop_path_rate=0.0,  # timm's Swin defaults to 0.1; ConvNeXt measures drop path
            num_classes=10,
        ),
        shape=(2, 3, 32, 32),
    ),
    Spec(
        "timm vit_tiny (patch 8, 32x32) attn_drop_rate=0.1",
        _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, attn_drop_rate=0.1, num_classes=10),
        shape=(2, 3, 32, 32),
    ),
)

#: Eval exports only need a size the eval forward accepts: Inception-v3's is 75x75.
EVAL_SHAPES = {INCEPTION.name: (2, 3, 75, 75)}


@dataclass
class Seen:
    """One modeswap warning: where it came from, its class, the module paths it names, its message."""

    where: str
    category: str
    paths: tuple[str, ...]
    message: str

    @property
    def unread(self) -> bool:
        return self.category == "TrainingBranchWarning" and "no node reads" in self.message


_QUOTED = re.compile(r"'([\w.]*)'")


def _paths(warning: warnings.WarningMessage) -> tuple[str, ...]:
    message = warning.message
    groups = getattr(message, "groups", None)
    if groups:
        return tuple(path for paths in groups.values() for path in paths)
    keep = getattr(message, "keep", None)
    if keep:
        return tuple(keep)
    text = str(message)
    if "no node reads:" in text:
        text = text.split("no node reads:", 1)[1].split(". A module", 1)[0]
    return tuple(dict.fromkeys(_QUOTED.findall(text)))


@contextlib.contextmanager
def recording(where: str, into: list[Seen]) -> Iterator[None]:
    """Record each ``ModeswapWarning`` of the block into ``into``, also when it raises; let the others through."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for w in caught:
            if issubclass(w.category, modeswap.ModeswapWarning):
                into.append(Seen(where, w.category.__name__, _paths(w), str(w.message)))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@dataclass
class Row:
    """One line of a table: a model, what each column gave, and whether it passed."""

    model: str
    cells: dict[str, str]
    ok: bool
    details: list[str] = field(default_factory=list)


def _short(paths: tuple[str, ...] | list[str], shown: int = 4) -> str:
    listed = ", ".join(repr(p) for p in list(paths)[:shown])
    return listed + (f", ... ({len(paths)})" if len(paths) > shown else "")


def _failed(model: str, error: BaseException) -> Row:
    return Row(model, {"error": f"{type(error).__name__}: {error}"[:300]}, False, [traceback.format_exc()])


def _timed(f: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = f()
    return result, time.perf_counter() - start


# 1. Issue 24: the traces an eval export leaves ----------------------------------------------------------


def _ran(program: torch.export.ExportedProgram) -> set[str]:
    """The paths of the modules that ran a node of ``program``, and of the modules around them."""
    return {
        path
        for node in program.graph.nodes
        for path, _ in node.meta.get("nn_module_stack", {}).values()
        if isinstance(path, str)
    }


def _training_values(program: torch.export.ExportedProgram) -> dict[str, set[float]]:
    """The dropout ``p`` and attention ``dropout_p`` of ``program``'s nodes, by the innermost module that ran each."""
    found: dict[str, set[float]] = {}
    for node in program.graph.nodes:
        name = str(node.target)
        if node.op != "call_function" or not ("dropout" in name or "scaled_dot_product_attention" in name):
            continue
        if "scaled_dot_product_attention" in name:
            p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        else:
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else None)
        stack = list(node.meta.get("nn_module_stack", {}).values())
        if stack and isinstance(p, float):
            found.setdefault(stack[-1][0], set()).add(p)
    return found


_REFUSED_IN = re.compile(r"in module '([\w.]+)'")


def _swap_keeping(swap: Callable[[tuple[str, ...]], Any], refused: list[str]) -> Any:
    """Call ``swap(keep)``; while it refuses a site (``UnsupportedGraphError``), add the site's module to ``keep``.

    Each refusal's message goes to ``refused``: with the refused sites pinned, the
    rest of the swap, and its warnings, can still be measured.
    """
    keep: tuple[str, ...] = ()
    while True:
        try:
            return swap(keep)
        except modeswap.UnsupportedGraphError as error:
            found = _REFUSED_IN.search(str(error))
            refused.append(str(error))
            if found is None or found.group(1) in keep or len(keep) >= 8:
                raise
            keep += (found.group(1),)


def check_traces(spec: Spec) -> Row:
    model = spec.model().eval()
    args = spec.inputs(EVAL_SHAPES.get(spec.name))
    program, exported = _timed(lambda: torch.export.export(model, args))
    # What a warning should name: the modules that ran a node in train mode and none in eval.
    trained = torch.export.export(copy.deepcopy(model).train(), spec.inputs())
    train_only = _ran(trained) - _ran(program)
    train_values = _training_values(trained)
    seen: list[Seen] = []
    refused: dict[str, list[str]] = {}
    times = {"export": exported}
    swaps: dict[str, Callable[[tuple[str, ...]], Any]] = {
        "to_train(program)": lambda keep: modeswap.to_train(program, keep=keep),
        "to_train(module)": lambda keep: modeswap.to_train(program.module(), keep=keep),
        "allow_train_eval": lambda keep: modeswap.allow_train_eval(program, keep=keep),
    }
    for where, swap in swaps.items():
        with recording(where, seen):
            _, times[where] = _timed(lambda swap=swap, where=where: _swap_keeping(swap, refused.setdefault(where, [])))
    unread = {where: tuple(p for s in seen if s.where == where and s.unread for p in s.paths) for where in swaps}
    ok = all(sorted(paths) == sorted(spec.unread) for paths in unread.values())
    named = set(unread.values())
    others: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for s in seen:
        if not s.unread:
            others.setdefault((s.category, s.paths), []).append(s.where)

    def judged(category: str, paths: tuple[str, ...]) -> str:
        if category == "UnknownTrainingValueWarning":
            values = sorted({v for p in paths for v in train_values.get(p, {float("nan")})})
            return f"the train export holds p in {values}"
        idle = [p for p in paths if p not in train_only]
        return f"{len(paths) - len(idle)} run in train only, {len(idle)} in neither mode" if paths else "-"

    cells = {
        "no node reads": " / ".join(_short(paths) or "-" for paths in unread.values())
        if len(named) > 1
        else _short(next(iter(named))) or "-",
        "expected": _short(spec.unread) or "-",
        "other warnings": "; ".join(
            f"{category} [{_short(paths)}] in {len(set(where))}/3 ({judged(category, paths)})"
            for (category, paths), where in others.items()
        )
        or "-",
        "times (s)": " ".join(f"{t:.2f}" for t in times.values()),
    }
    if any(refused.values()):
        kept = {m.group(1) for messages in refused.values() for m in map(_REFUSED_IN.search, messages) if m}
        cells["refused, measured with keep="] = f"{sorted(kept)} (in {', '.join(w for w in refused if refused[w])})"
    messages: dict[tuple[str, str], list[str]] = {}
    for s in seen:
        messages.setdefault((s.category, s.message), [])
        if s.where not in messages[s.category, s.message]:
            messages[s.category, s.message].append(s.where)
    for where, errors in refused.items():
        for error in errors:
            messages.setdefault(("UnsupportedGraphError", error), []).append(where)
    details = [f"{category} (in {', '.join(where)}): {message}" for (category, message), where in messages.items()]
    for (category, paths), _ in others.items():
        idle = [p for p in paths if p not in train_only]
        if idle and category == "TrainingBranchWarning":
            details.append(f"{category}: named but run in neither mode (no node in the train export either): {idle}")
    return Row(spec.name, cells, ok, details)


# 2. Issue 20, section 5: batch norms that torch.utils.checkpoint recomputes -----------------------------


def _norm1_paths(model: nn.Module) -> list[str]:
    return [path for path, _ in model.named_modules() if path.endswith(".norm1") and ".denselayer" in path]


def _diagnose_recompute(model: nn.Module, args: tuple[Any, ...]) -> str:
    """What modeswap's own finder says without capture's gate, and which checkpoint this torch runs."""
    module = torch.utils.checkpoint
    renamed = hasattr(module, "_checkpoint_without_reentrant_generator_impl")
    called = "_checkpoint_without_reentrant_generator_impl" if renamed else "_checkpoint_without_reentrant_generator"
    said = f"this torch's checkpoint(use_reentrant=False) calls {called}"
    try:
        from modeswap.eager.recompute import recomputed_updates
    except ImportError as error:
        return f"{said}; modeswap.eager.recompute.recomputed_updates: {error}"
    return f"{said}; recomputed_updates(model, args) finds {len(recomputed_updates(model, args))} module(s)"


def check_recompute(spec: Spec) -> Row:
    model = spec.model().train()
    args = spec.inputs()
    seen: list[Seen] = []
    with recording("capture", seen):
        modal, took = _timed(lambda: modeswap.capture(model, args))
    named = [p for s in seen if s.category == "RecomputedUpdateWarning" for p in s.paths]
    layers = [m for m in model.modules() if hasattr(m, "memory_efficient")]
    efficient = any(m.memory_efficient for m in layers)
    expected = _norm1_paths(model) if efficient else []
    ok = sorted(named) == sorted(expected)
    missing, extra = sorted(set(expected) - set(named)), sorted(set(named) - set(expected))

    # One train step: eager as built, eager without checkpointing (same weights), and the capture.
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if hasattr(m, "memory_efficient"):
            m.memory_efficient = False
    buffers = {}
    for who, module in (("eager", copy.deepcopy(model)), ("eager unchecked", plain), ("capture", modal)):
        run_forward_backward(module, args, seed=0)
        buffers[who] = dict(module.named_buffers())
    norm1 = _norm1_paths(model)

    def counts(who: str) -> list[int]:
        return sorted({int(buffers[who][f"{p}.num_batches_tracked"]) for p in norm1})

    def worst(a: str, b: str) -> float:
        return max(_max_difference(buffers[a][k], buffers[b][k]) for k in buffers[a] if "running" in k)

    differing = [
        p
        for p in norm1
        if not torch.equal(buffers["eager"][f"{p}.num_batches_tracked"], buffers["capture"][f"{p}.num_batches_tracked"])
    ]
    cells = {
        "RecomputedUpdateWarning": f"{len(named)} modules" + (f" [{_short(named, 2)}]" if named else ""),
        "expected": f"{len(expected)} norm1",
        "missing/extra": f"{len(missing)}/{len(extra)}",
        "norm1 num_batches_tracked after 1 step": f"eager {counts('eager')}, capture {counts('capture')}, "
        f"eager without checkpointing {counts('eager unchecked')}; capture and eager differ in {len(differing)} of "
        f"{len(norm1)}",
        "max running-stat difference": f"capture vs eager {worst('eager', 'capture'):.1e}, "
        f"vs eager without checkpointing {worst('eager unchecked', 'capture'):.1e}",
        "capture (s)": f"{took:.1f}",
    }
    details = [f"{s.category}: {s.message}" for s in seen]
    if missing or extra:
        cells["diagnosis"] = _diagnose_recompute(model, args)
        details += [f"missing: {missing}"] if missing else []
        details += [f"extra: {extra}"] if extra else []
    return Row(spec.name, cells, ok, details)


# 3. Issue 20, section 3: save, load in a fresh process, the command line ----------------------------------


def _max_difference(expected: Any, actual: Any) -> float:
    """The largest absolute difference of two pytrees of tensors; NaN where only one side is, 0 where both are."""
    pairs = zip(pytree.tree_leaves(expected), pytree.tree_leaves(actual), strict=True)
    found = [_difference(e, a) for e, a in pairs if e.numel()]
    return float(torch.tensor(found).max()) if found else 0.0


def _difference(expected: torch.Tensor, actual: torch.Tensor) -> float:
    e, a = expected.detach().double(), actual.detach().double()
    both = torch.isnan(e) & torch.isnan(a)
    difference = torch.where(both, 0.0, (e - a).abs())
    return float(difference.max())  # torch's max, unlike Python's, keeps a NaN


def compare_modes(eager: nn.Module, modal: Callable[[], nn.Module], args: tuple[Any, ...]) -> dict[str, Any]:
    """Run copies of ``eager`` and fresh ``modal()`` in train then eval under one seed; say what differs."""
    found: dict[str, Any] = {}
    for mode in ("train", "eval"):
        theirs, ours = copy.deepcopy(eager).train(mode == "train"), modal().train(mode == "train")
        with torch.no_grad():
            torch.manual_seed(3)
            want = theirs(*args)
            torch.manual_seed(3)
            got = ours(*args)
        same_type = type(want) is type(got)
        entry: dict[str, Any] = {"eager type": type(want).__name__, "type": type(got).__name__, "same type": same_type}
        try:
            entry["max output difference"] = _max_difference(want, got)
        except ValueError as error:
            entry["max output difference"] = f"outputs differ in structure: {error}"
        expected = run_forward_backward(copy.deepcopy(eager).train(mode == "train"), args, seed=3)
        actual = run_forward_backward(modal().train(mode == "train"), args, seed=3)
        try:
            assert_same_run(expected, actual, atol=ATOL, rtol=RTOL)
            entry["same run"] = True
        except AssertionError as error:
            entry["same run"] = False
            entry["run difference"] = str(error)[:800]
        both = [k for k, g in expected["grads"].items() if g is not None and actual["grads"].get(k) is not None]
        entry["max grad difference"] = _max_difference(
            [expected["grads"][k] for k in both], [actual["grads"][k] for k in both]
        )
        found[mode] = entry
    return found


def _modes_ok(found: dict[str, Any]) -> bool:
    return all(e["same type"] and e["same run"] for e in found.values())


def _modes_cell(found: dict[str, Any]) -> str:
    def one(mode: str, e: dict[str, Any]) -> str:
        difference = e["max output difference"]
        shown = f"{difference:.1e}" if isinstance(difference, float) else "structure differs"
        verdict = "ok" if e["same type"] and e["same run"] else "FAIL"
        return f"{mode} {e['type']} {shown} {verdict}"

    return "; ".join(one(mode, e) for mode, e in found.items())


def loaded_side(spec_name: str, archive: str, state: str) -> dict[str, Any]:
    """In a fresh process: load ``archive`` and compare it in train and eval with the eager model of ``state``."""
    spec = next(s for s in MODELS if s.name == spec_name)
    eager = spec.model()
    eager.load_state_dict(torch.load(state))
    args = spec.inputs()
    result: dict[str, Any] = {}
    try:
        loaded, took = _timed(lambda: modeswap.load(archive))
        result["load (s)"] = took
        result["loaded mode"] = "train" if loaded.training else "eval"
        result["modes"] = compare_modes(eager, lambda: modeswap.load(archive), args)
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc()
    return result


def _head(text: str, lines: int = 12) -> str:
    kept = text.splitlines()[:lines]
    return "\n".join(kept) + (
        f"\n  ... ({len(text.splitlines())} lines)\n" if len(kept) < len(text.splitlines()) else "\n"
    )


def _cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("modeswap")), *arguments]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)


def check_archive(spec: Spec, folder: Path) -> Row:
    model = spec.model().train()
    args = spec.inputs()
    seen: list[Seen] = []
    with recording("capture", seen):
        modal, captured = _timed(lambda: modeswap.capture(model, args))
    here = compare_modes(model, lambda: copy.deepcopy(modal), args)
    cells: dict[str, str] = {"capture (s)": f"{captured:.1f}", "capture vs eager": _modes_cell(here)}
    details = [f"{s.category} (capture): {s.message}" for s in seen]
    ok = _modes_ok(here)
    if not ok:
        details.append(f"capture vs eager: {json.dumps(here, indent=1)}")
    archive, state = folder / f"{spec.name.replace(' ', '_')}.pt2", folder / "state.pt"
    torch.save(model.state_dict(), state)
    try:
        _, saved = _timed(lambda: modeswap.save(modal, archive))
    except Exception as error:
        cells["save"] = f"FAIL {type(error).__name__}: {error}"[:300]
        details.append(traceback.format_exc())
        return Row(spec.name, cells, False, details)
    cells["save (s)"] = f"{saved:.1f} ({archive.stat().st_size / 2**20:.0f} MiB)"
    command = [sys.executable, "-m", "tests.integration.check_torchvision_timm", "--loaded-side", spec.name]
    done = subprocess.run(
        [*command, str(archive), str(state)], capture_output=True, text=True, cwd=ROOT, timeout=600, check=False
    )
    try:
        there = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        there = {"error": f"the process exited {done.returncode}: {done.stderr[-2000:]}"}
    if "error" in there:
        cells["fresh load"] = f"FAIL {there['error']}"[:300]
        details.append(f"fresh load: {there.get('traceback', there['error'])}")
        ok = False
    else:
        cells["fresh load"] = f"{there['loaded mode']}, {there['load (s)']:.1f} s; {_modes_cell(there['modes'])}"
        if not _modes_ok(there["modes"]):
            ok = False
            details.append(f"fresh load vs eager: {json.dumps(there['modes'], indent=1)}")

    inspected = _cli("inspect", str(archive))
    cells["inspect"] = f"rc {inspected.returncode}"
    details.append(
        f"modeswap inspect (rc {inspected.returncode}), its first lines:\n"
        f"{_head(inspected.stdout)}{inspected.stderr[-1500:]}"
    )
    converted_path = folder / "converted.pt2"
    converted = _cli("convert", "--to", "eval", "-o", str(converted_path), "--force", str(archive))
    cell = f"rc {converted.returncode}"
    details.append(
        f"modeswap convert --to eval (rc {converted.returncode}):\n{converted.stdout[-800:]}{converted.stderr[-1500:]}"
    )
    ok = ok and inspected.returncode == 0 and converted.returncode == 0
    if converted.returncode == 0:
        program = torch.export.load(converted_path)
        with torch.no_grad():
            difference = _max_difference(copy.deepcopy(model).eval()(*args), program.module()(*args))
        cell += f", eval output vs eager {difference:.1e}"
        ok = ok and difference <= ATOL
    cells["convert --to eval"] = cell
    return Row(spec.name, cells, ok, details)


# 4. Issue 20, section 4: fine-tuning with frozen batch norms -----------------------------------------------


def _freeze_norms(module: nn.Module, paths: list[str]) -> nn.Module:
    module.train()
    for path in paths:
        module.get_submodule(path).eval()
    return module


def check_frozen_bn(spec: Spec) -> list[Row]:
    model = spec.model().train()
    args = spec.inputs()
    norms = [path for path, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    subjects: dict[str, Callable[[], nn.Module]] = {
        "capture": lambda: modeswap.capture(model, args),
        "allow_train_eval(train export)": lambda: modeswap.allow_train_eval(
            torch.export.export(copy.deepcopy(model).train(), args)
        ),
    }
    rows = []
    for subject, make in subjects.items():
        seen: list[Seen] = []
        try:
            with recording(subject, seen):
                modal, took = _timed(make)
                eager = _freeze_norms(copy.deepcopy(model), norms)
                _freeze_norms(modal, norms)
                # A rate at which two steps move the weights, and do not blow up a random ResNet with frozen norms.
                optimizers = [torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for m in (eager, modal)]
                worst = {"outputs": 0.0, "buffers": 0.0, "grads": 0.0}
                start = {k: v.clone() for k, v in eager.state_dict().items()}
                largest = 0.0
                failures = []
                for step in range(2):
                    expected = run_forward_backward(eager, args, seed=step)
                    actual = run_forward_backward(modal, args, seed=step)
                    largest = max(largest, *(float(o.abs().max()) for o in expected["outputs"]))
                    for key in worst:
                        pairs = (
                            zip(expected[key], actual[key], strict=True)
                            if key == "outputs"
                            else ((v, actual[key][k]) for k, v in expected[key].items())
                        )
                        found = [_max_difference(e, a) for e, a in pairs if e is not None and a is not None]
                        worst[key] = float(torch.tensor([worst[key], *found]).max())  # NaN wins
                    try:
                        assert_same_run(expected, actual, atol=ATOL, rtol=RTOL)
                    except AssertionError as error:
                        failures.append(f"step {step}: {error}")
                    for optimizer in optimizers:
                        optimizer.step()
                weights = float(
                    torch.tensor(
                        [_max_difference(v, modal.state_dict()[k]) for k, v in eager.state_dict().items()]
                    ).max()
                )
                moved = _max_difference(eager.state_dict(), start)
                frozen = all(not modal.get_submodule(p).training for p in norms) and modal.training
                # A control: the same comparison with the module's batch norms left in train must differ.
                with torch.no_grad():
                    control = _max_difference(eager(*args), copy.deepcopy(modal).train()(*args))
        except Exception as error:
            rows.append(_failed(f"{spec.name} / {subject}", error))
            continue
        cells = {
            "frozen norms": f"{len(norms)}" + ("" if frozen else " (modes did not hold!)"),
            "max diff outputs/buffers/grads": " / ".join(f"{v:.1e}" for v in worst.values()),
            "state after 2 steps": f"{weights:.1e} (eager's moved by up to {moved:.1e}; outputs up to {largest:.1e})",
            "control (norms not frozen)": f"output differs by {control:.1e}" + ("" if control > ATOL else " (!)"),
            "warnings": "; ".join(f"{s.category} [{_short(s.paths)}]" for s in seen) or "-",
            "build (s)": f"{took:.1f}",
        }
        details = failures + [f"{s.category} ({s.where}): {s.message}" for s in seen]
        rows.append(
            Row(
                f"{spec.name} / {subject}",
                cells,
                not failures and frozen and control > ATOL and weights <= ATOL,
                details,
            )
        )
    return rows


# 5. check's advice, taken ---------------------------------------------------------------------------------


def _with_gradients(model: nn.Module) -> nn.Module:
    """``model`` with a gradient on every parameter, as in the middle of training."""
    generator = torch.Generator().manual_seed(5)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
    return model


def _causes(direction: modeswap.Direction) -> str:
    """The causes of ``direction``'s rows, each with how many modules its rows cover."""
    counted: dict[str, int] = {}
    for d in direction.differences:
        counted[str(d.cause)] = counted.get(str(d.cause), 0) + len(d.paths)
    return ", ".join(f"{cause} x{n}" if n > 1 else cause for cause, n in counted.items()) or "exact"


def _fixable(direction: modeswap.Direction) -> bool:
    """Whether every row of ``direction`` carries options (an exact direction has nothing to fix)."""
    return all(d.options for d in direction.differences)


def _merged(*options: dict[str, Any]) -> dict[str, Any]:
    """Swap options, ``keep=`` patterns joined, ``dropout=`` mappings joined, the first ``attention_dropout``."""
    merged: dict[str, Any] = {}
    for o in options:
        if o.get("keep"):
            merged["keep"] = tuple(dict.fromkeys((*merged.get("keep", ()), *o["keep"])))
        if o.get("dropout"):
            merged["dropout"] = {**o["dropout"], **merged.get("dropout", {})}
        if o.get("attention_dropout") is not None:
            merged.setdefault("attention_dropout", o["attention_dropout"])
    return merged


def _as_found_in(model: nn.Module, mode: modeswap.Mode) -> nn.Module:
    """A copy of ``model`` in ``mode``: as found (modules in the other mode included) if that is its own mode."""
    copied = copy.deepcopy(model)
    return copied if copied.training == (mode is modeswap.Mode.TRAIN) else copied.train(mode is modeswap.Mode.TRAIN)


def _eager_match(
    model: nn.Module, args: tuple[Any, ...], direction: modeswap.Direction, options: dict[str, Any]
) -> None:
    """Swap an export of ``model`` in the source mode with ``options``; assert it runs as eager in the target mode.

    ``model``'s own mode is taken as found, each module's included (``check`` exports it so); the
    other mode is what ``model.train(mode)`` gives. One forward and backward under seed 0.
    """
    source, target = direction.source, direction.target
    program = torch.export.export(_as_found_in(model, source), args)
    if target is modeswap.Mode.TRAIN:
        swapped = modeswap.to_train(program, **options)
    else:
        swapped = modeswap.to_eval(program, keep=options.get("keep", ()))
    expected = run_forward_backward(_as_found_in(model, target), args, seed=0)
    actual = run_forward_backward(swapped.module(), args, seed=0)
    assert_same_run(expected, actual, atol=ATOL, rtol=RTOL)


def _advice_row(
    name: str, model: nn.Module, args: tuple[Any, ...], base: dict[str, Any]
) -> tuple[Row, modeswap.Fidelity]:
    """``check(model, args, **base)``; the options it suggests, taken by ``check`` and by a swap against eager."""
    seen: list[Seen] = []
    details: list[str] = []
    failures: list[str] = []
    before = Observed.of(model)
    with recording("check", seen):
        fidelity, took = _timed(lambda: modeswap.check(model, args, **base))
    changed = before.changed(Observed.of(model))
    suggested = fidelity.suggested
    options = _merged(base, suggested)
    details.append(f"print(fidelity):\n{fidelity}")
    times = {"check": took}
    directions = dict(zip(("train -> eval", "eval -> train"), fidelity.directions, strict=True))
    cells = {
        "rows": " / ".join(str(len(d.differences)) for d in directions.values()),
        "causes": " / ".join(_causes(d) for d in directions.values()),
        "suggested": repr(suggested) if suggested else "-",
    }
    if fidelity.mixed:
        cells["mixed"] = repr(list(fidelity.mixed))
    for direction in fidelity.directions:
        for d in direction.differences:
            if d.cause is modeswap.Cause.REFUSED:
                found = _REFUSED_IN.search(d.what)
                details.append(
                    f"{direction.name}: swap refused in {found.group(1) if found else '?'!r} "
                    "(expected for a ViT's position dropout; a row of its own below measures the rest with keep=)"
                )

    # 2. check again, with the suggested options.
    cells["again"] = "-"
    if suggested:
        try:
            with recording("check(**suggested)", seen):
                again, times["again"] = _timed(lambda: modeswap.check(model, args, **options))
        except modeswap.InvalidOptionError as error:
            cells["again"] = "refused"
            failures.append(f"check(model, args, **{options}) refused the suggestion: {error}")
        else:
            details.append(f"print(check(model, args, **{options})):\n{again}")
            fixed = {p for d in fidelity.directions for row in d.differences if row.options for p in row.paths}
            left = {p for d in again.directions for row in d.differences for p in row.paths}
            if fixed & left:
                failures.append(f"rows with options still differ with them: {sorted(fixed & left)}")
            for first, second in zip(fidelity.directions, again.directions, strict=True):
                if _fixable(first) and not second.exact:
                    failures.append(f"{first.name}: every row had options, yet the check with them is not exact")
            cells["again"] = " / ".join(
                "exact" if d.exact else f"{len(d.differences)} ({_causes(d)})" for d in again.directions
            )

    # 3. each direction the options fix (or exact): the swap with them against eager under one seed. The other
    # directions are run too, for the record: a difference there is what check said.
    matches = []
    for label, direction in directions.items():
        required = _fixable(direction)
        stated = options if direction.target is modeswap.Mode.TRAIN else {"keep": options.get("keep", ())}
        try:
            with recording(f"eager {label}", seen):
                start = time.perf_counter()
                _eager_match(model, args, direction, stated)
                times[f"eager {label}"] = time.perf_counter() - start
            matches.append(f"{label} ok" + ("" if required else " (not required: rows without options)"))
        except modeswap.InvalidOptionError as error:
            matches.append(f"{label} REFUSED")
            failures.append(f"{label}: the swap refused {stated}: {error}")
        except modeswap.ModeswapError as error:
            matches.append(f"{label} swap raised {type(error).__name__}" + ("" if required else " (as check said)"))
            if required:
                failures.append(f"{label}: the swap with {stated} raised: {error}")
        except AssertionError as error:
            if required:
                matches.append(f"{label} FAIL")
                failures.append(f"{label} with {stated} differs from eager: {str(error)[:1200]}")
            else:
                matches.append(f"{label} differs (as check said)")
    cells["eager match"] = "; ".join(matches)

    # 4. check leaves the model as it found it.
    cells["purity"] = "ok" if not changed else f"CHANGED {_short(changed)}"
    if changed:
        failures.append(f"check changed the model: {changed}")
    cells["seconds"] = " ".join(f"{k} {t:.1f}" for k, t in times.items())
    details += [f"FAIL: {message}" for message in failures]
    details += [f"{s.category} ({s.where}): {s.message}" for s in seen]
    return Row(name, cells, not failures, details), fidelity


def check_advice(spec: Spec) -> list[Row]:
    """The model in train with a gradient on every parameter; again with a site the swap refused kept; again with
    its first batch norm in eval."""
    model = _with_gradients(spec.model().train())
    args = spec.inputs()
    row, fidelity = _advice_row(spec.name, model, args, {})
    rows = [row]
    refused = [
        found.group(1)
        for direction in fidelity.directions
        for d in direction.differences
        if d.cause is modeswap.Cause.REFUSED
        for found in [_REFUSED_IN.search(d.what)]
        if found
    ]
    if refused:
        keep = tuple(dict.fromkeys(refused))
        rows.append(_advice_row(f"{spec.name} / keep={keep}", model, args, {"keep": keep})[0])
    norms = [path for path, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        mixed = copy.deepcopy(model)
        mixed.get_submodule(norms[0]).eval()
        row, _ = _advice_row(f"{spec.name} / {norms[0]} in eval", mixed, args, {})
        if row.cells.get("mixed") != repr([norms[0]]):
            row.ok = False
            row.details.append(f"FAIL: check with {norms[0]!r} in eval says mixed={row.cells.get('mixed')}")
        rows.append(row)
    return rows


# The tables ------------------------------------------------------------------------------------------------


def show(title: str, rows: list[Row]) -> None:
    print(f"\n== {title}")
    for row in rows:
        print(f"{'PASS' if row.ok else 'FAIL'}  {row.model}")
        for key, value in row.cells.items():
            print(f"        {key}: {value}")
    for row in rows:
        for detail in row.details:
            print(f"  -- {row.model}: {detail}")
    sys.stdout.flush()


def run(check: str, specs: list[Spec], folder: Path) -> list[Row]:
    rows = []
    for spec in specs:
        print(f"[{check}] {spec.name} ...", file=sys.stderr, flush=True)
        try:
            if check == "traces":
                rows.append(check_traces(spec))
            elif check == "recompute":
                rows.append(check_recompute(spec))
            elif check == "archive":
                rows.append(check_archive(spec, folder))
            elif check == "advice":
                rows.extend(check_advice(spec))
            else:
                rows.extend(check_frozen_bn(spec))
        except Exception as error:
            rows.append(_failed(spec.name, error))
    return rows


CHECKS = {
    "traces": ("1. issue 24: warnings after an eval export, to_train and allow_train_eval", MODELS),
    "recompute": ("2. issue 20, 5: capture of DenseNet-121 in train", (DENSENET_EFFICIENT, DENSENET)),
    "archive": ("3. issue 20, 3: save, load in a fresh process, inspect, convert", (GOOGLENET, INCEPTION)),
    "frozen-bn": ("4. issue 20, 4: two SGD steps with every batch norm frozen", (TV_RESNET, TIMM_RESNET)),
    "advice": ("5. check, its suggested options taken, against eager; check leaves the model as found", ADVICE_MODELS),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", nargs="*", choices=list(CHECKS), default=list(CHECKS))
    parser.add_argument("--model", nargs="*", help="run only the models whose name contains one of these")
    parser.add_argument("--loaded-side", nargs=3, metavar=("MODEL", "ARCHIVE", "STATE"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    if options.loaded_side:
        print(json.dumps(loaded_side(*options.loaded_side)))
        return 0
    try:
        import timm
        import torchvision
    except ImportError as error:
        print(f"skipped: this needs torchvision and timm ({error}); see the module's docstring")
        return 0
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, ", end="")
    print(f"modeswap {modeswap.__version__} ({Path(modeswap.__file__).parent}), {torch.get_num_threads()} thread")
    failed = []
    with tempfile.TemporaryDirectory() as folder:
        for check in options.check:
            title, specs = CHECKS[check]
            chosen = [s for s in specs if not options.model or any(m in s.name for m in options.model)]
            start = time.perf_counter()
            rows = run(check, chosen, Path(folder))
            show(f"{title} ({time.perf_counter() - start:.0f} s)", rows)
            failed += [f"{check}: {row.model}" for row in rows if not row.ok]
    print("\nfailed: " + ("; ".join(failed) if failed else "none"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
