"""What each rank of tests/integration/test_distributed.py runs: an eager model and a modal module, wrapped alike.

:func:`launch` forks :data:`WORLD` ranks on a gloo process group. Each takes
a copy of the same eager model and of a modal module of it from one source
(:data:`SOURCES`), wraps both the same way (:data:`WRAPPERS`), and trains and
validates them side by side on batches and seeds of its rank's own: every
loss, validation output, parameter and buffer must be equal, on every rank.
A failure on any rank fails the test, with that rank's traceback.
"""

from __future__ import annotations

import atexit
import copy
import functools
import os
import signal
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import modeswap

WORLD = 2
#: Seconds a test's ranks may take, the launcher's first start and builds included (a few, here).
TIMEOUT = 300

#: Where the modal module comes from: two exports of the eager model, one swapped export of either mode, a file.
SOURCES = ("capture", "train export", "eval export", "load")
#: How both modules are wrapped: DDP with buffers broadcast from rank 0 before each forward or kept per rank,
#: FSDP2 whole or per block.
WRAPPERS = ("ddp", "ddp, buffers per rank", "fsdp2", "fsdp2 per block")


def launch(function: Callable[..., None], *args: Any, store: Path, needs: Sequence[tuple[str, int]] = ()) -> None:
    """Run ``function(rank, *args)`` on :data:`WORLD` ranks of a gloo group that meets in the file ``store``.

    The ranks are forked from a process of their own (:class:`_Launcher`),
    after it has :func:`built` each ``(source, seed)`` of ``needs``: what a
    rank takes with :func:`pair` it does not build again.
    """
    error = _launcher().run(function, args, str(store), needs)
    if error is not None:
        raise AssertionError(error)


class _Launcher:
    """A process that builds modules and forks ranks from itself, one call at a time, for as long as this one lives.

    A forked rank starts in milliseconds, with torch, modeswap and this module
    imported and the modules built (a spawned or forkserver rank took 4 to 8
    seconds here, and built them again). The test process itself cannot fork:
    once it has run a backward, autograd's threads forbid it (on torch's CUDA
    builds). This process never runs one, and keeps the test process'
    warning filters.
    """

    def __init__(self) -> None:
        context = mp.get_context("spawn")
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(theirs, list(warnings.filters)), name="ranks")
        self.process.start()
        atexit.register(self.close)  # before multiprocessing's own exit handler joins it

    def run(self, function: Callable[..., None], args: tuple[Any, ...], store: str, needs: Sequence[Any]) -> str | None:
        """Fork the ranks; return the error of the first that failed, or ``None``."""
        self.connection.send((function, args, store, tuple(needs)))
        if not self.connection.poll(TIMEOUT):  # a rank waits on a collective that another never makes
            os.killpg(self.process.pid, signal.SIGKILL)  # and the ranks: they are in its process group
            _launcher.cache_clear()
            return f"the ranks of {function.__name__} did not finish in {TIMEOUT} s"
        answer: str | None = self.connection.recv()
        return answer

    def close(self) -> None:
        self.connection.close()
        self.process.join()


@functools.cache
def _launcher() -> _Launcher:
    return _Launcher()


def _serve(connection: Any, filters: list[Any]) -> None:
    os.setpgrp()  # a process group of its own, which its ranks join: one signal stops them all
    torch.set_num_threads(1)
    warnings.filters[:] = filters
    while True:
        try:
            function, args, store, needs = connection.recv()
        except EOFError:
            return
        try:
            for source, seed in needs:
                built(source, seed)
            mp.start_processes(_rank, args=(function, store, args), nprocs=WORLD, start_method="fork")
        except Exception as error:  # a rank's failure, with its traceback
            connection.send(f"{type(error).__name__}: {error}")
        else:
            connection.send(None)


def _rank(rank: int, function: Callable[..., None], store: str, args: tuple[Any, ...]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        function(rank, *args)
    finally:
        dist.destroy_process_group()


class Block(nn.Sequential):
    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__(
            nn.Conv2d(channels_in, channels_out, 3, padding=1),
            nn.BatchNorm2d(channels_out, momentum=0.2),
            nn.ReLU(),
            nn.Dropout(0.3),
        )


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(3, 4), Block(4, 4))
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).flatten(1))


def batch(rank: int, step: int) -> torch.Tensor:
    """This rank's batch for ``step``: the ranks see different data, so that gradients and statistics differ."""
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1000 * rank + step))


def pair(source: str = "capture", seed: int = 0) -> tuple[Net, modeswap.ModalModule]:
    """A copy of an eager model with ``seed``'s weights and of a modal module of it from ``source``, in train mode.

    Each is built once per process (:func:`built`): the launcher builds what a
    test's ranks need (``needs=``), and the forked ranks take copies.
    """
    return copy.deepcopy(built(source, seed))


def gpt2(seed: int = 0) -> nn.Module:
    """A two-layer GPT-2 language model from its config, random weights with ``seed``, in train mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16, use_cache=False)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).train()


def tokens(rank: int, step: int) -> torch.Tensor:
    """This rank's batch of token ids for ``step``."""
    return torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1000 * rank + step))


def net(seed: int = 0) -> Net:
    """The eager model with ``seed``'s weights, in train mode: the same on every rank, as DDP and FSDP2 expect."""
    torch.manual_seed(seed)
    return Net().train()


@functools.cache
def built(source: str, seed: int = 0) -> tuple[Net, modeswap.ModalModule]:
    model = net(seed)
    x = batch(0, 0)
    if source == "capture":
        modal = modeswap.capture(model, (x,))
    elif source == "train export":
        modal = modeswap.allow_train_eval(torch.export.export(copy.deepcopy(model), (x,)))
    elif source == "eval export":
        evaluated = torch.export.export(copy.deepcopy(model).eval(), (x,)).module()
        modal = modeswap.allow_train_eval(evaluated).train()
    elif source == "gpt2":  # a model nobody here wrote, with tied embeddings, from its config
        model, x = gpt2(seed), tokens(0, 0)
        modal = modeswap.capture(model, (x,))
    elif source == "load":
        path = Path(_FILES.name) / f"seed{seed}.pt2"
        modeswap.save(modeswap.capture(model, (x,)), path)
        modal = modeswap.load(path)
    else:
        raise ValueError(source)
    return model, modal


#: Where the ``load`` source saves: it lives as long as the process, whose ranks may read it on a mode's first use.
_FILES = tempfile.TemporaryDirectory(prefix="modeswap-distributed-")


def wrap(wrapper: str, module: nn.Module, blocks: str = "blocks") -> nn.Module:
    """``module`` wrapped by ``wrapper``; FSDP2 per block shards each child of the module at ``blocks`` first."""
    if wrapper == "ddp":
        return DistributedDataParallel(module)
    if wrapper == "ddp, buffers per rank":
        # broadcast_buffers=False before torch 2.13; the ranks start alike, so the sync at init changes nothing.
        return DistributedDataParallel(module, forward_sync_buffers=False)
    mesh = init_device_mesh("cpu", (WORLD,))
    if wrapper == "fsdp2 per block":
        for block in module.get_submodule(blocks).children():
            fully_shard(block, mesh=mesh)
    return fully_shard(module, mesh=mesh)  # type: ignore[return-value]  # the module itself, FSDP's class mixed in


def inner(wrapped: nn.Module) -> nn.Module:
    """The module a wrapper wraps (DDP holds it; FSDP2 is the module itself)."""
    return wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped


def full(value: Any) -> Any:
    """A tensor whole on every rank (a collective for a DTensor: every rank calls it in the same order)."""
    return value.full_tensor() if isinstance(value, DTensor) else value


class SideBySide:
    """An eager module and a modal one, wrapped alike, with an optimizer each; every step compares them."""

    def __init__(
        self, eager: nn.Module, modal: nn.Module, rank: int, inputs: Callable[[int, int], torch.Tensor] = batch
    ) -> None:
        self.modules = (eager, modal)
        self.optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in self.modules]
        self.rank = rank
        #: This rank's input for a step: ``inputs(rank, step)``.
        self.inputs = inputs

    def train(self, steps: range, *, frozen: Sequence[str] = ()) -> None:
        """Train both on ``steps``, the modules at ``frozen`` in eval mode (a frozen batch norm)."""
        for step in steps:
            losses = []
            for module, optimizer in zip(self.modules, self.optimizers, strict=True):
                module.train()
                for path in frozen:
                    inner(module).get_submodule(path).eval()
                torch.manual_seed(1000 * self.rank + step)  # this rank's dropout masks, the same for both
                loss = first(module(self.inputs(self.rank, step))).square().mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.detach())
            same(f"step {step} loss", *losses)
        self.same_state(f"after step {steps[-1]}")

    def validate(self, step: int) -> torch.Tensor:
        outputs = []
        with torch.no_grad():
            for module in self.modules:
                torch.manual_seed(step)
                outputs.append(first(module.eval()(self.inputs(self.rank, step))))
        same(f"validation {step}", *outputs)
        self.same_state(f"after validation {step}")
        return outputs[0]

    def same_state(self, when: str) -> None:
        eager, modal = (inner(module).state_dict() for module in self.modules)
        assert list(modal) == list(eager), f"{when}: state_dict keys differ: {list(modal)} vs {list(eager)}"
        for key in eager:
            same(f"{when}: {key}", full(eager[key]), full(modal[key]))


def first(output: Any) -> torch.Tensor:
    """The output itself, or the first of a tuple of them (a transformers ``ModelOutput``'s logits)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def same(what: str, want: torch.Tensor, got: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=0.0, rtol=0.0, msg=lambda message: f"{what}: {message}")


def train_and_validate(rank: int, source: str, wrapper: str, freeze: bool) -> None:
    """Train, validate, train again; with ``freeze``, a frozen first block and, later, a batch norm put in eval."""
    eager, modal = pair(source)
    if freeze:  # before wrapping: DDP and FSDP2 read requires_grad when they wrap
        for module in (eager, modal):
            module.get_submodule("blocks.0").requires_grad_(False)
    both = SideBySide(wrap(wrapper, eager), wrap(wrapper, modal), rank)
    both.train(range(1, 3))
    both.validate(3)
    # With freeze, the second block's batch norm keeps its running statistics from here on.
    both.train(range(4, 6), frozen=["blocks.1.1"] if freeze else [])
    both.validate(6)
    if freeze:
        frozen = [full(inner(module).state_dict()["blocks.1.1.num_batches_tracked"]) for module in both.modules]
        assert frozen == [torch.tensor(2), torch.tensor(2)], f"a frozen batch norm counted batches: {frozen}"


def checkpoint_and_resume(rank: int, directory: Path) -> None:
    """FSDP2 per block: save both sides with DCP; resume fresh modules, the modal one from either checkpoint."""
    eager, modal = pair()
    both = SideBySide(wrap("fsdp2 per block", eager), wrap("fsdp2 per block", modal), rank)
    both.train(range(1, 3))
    both.validate(3)
    for name, module, optimizer in zip(("eager", "modal"), both.modules, both.optimizers, strict=True):
        dcp.save(_checkpointed(module, optimizer), checkpoint_id=directory / name)
    for checkpoint in ("modal", "eager"):  # the names are eager's: either checkpoint serves either module
        eager, modal = pair(seed=1)  # other weights
        again = SideBySide(wrap("fsdp2 per block", eager), wrap("fsdp2 per block", modal), rank)
        for module, optimizer, name in zip(again.modules, again.optimizers, ("eager", checkpoint), strict=True):
            state = _checkpointed(module, optimizer)
            dcp.load(state, checkpoint_id=directory / name)
            set_model_state_dict(module, state["model"])
            set_optimizer_state_dict(module, optimizer, state["optim"])
        again.same_state(f"resumed from the {checkpoint} checkpoint")
        again.train(range(4, 6))
        again.validate(6)


def _checkpointed(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": get_model_state_dict(module), "optim": get_optimizer_state_dict(module, optimizer)}


def full_state_round_trip(rank: int, wrapper: str) -> None:
    """The whole ``get_model_state_dict`` of the wrapped modal module is eager's; ``set_model_state_dict`` takes it."""
    eager, modal = pair()
    both = SideBySide(wrap(wrapper, eager), wrap(wrapper, modal), rank)
    both.train(range(1, 3))
    options = StateDictOptions(full_state_dict=True)
    want, got = (get_model_state_dict(module, options=options) for module in both.modules)
    assert list(got) == list(want), f"full state dict keys differ: {list(got)} vs {list(want)}"
    for key in want:
        same(f"full state dict: {key}", want[key], got[key])
    # Into fresh modules with other weights, then on alike.
    fresh = SideBySide(*(wrap(wrapper, module) for module in pair(seed=1)), rank)  # other weights
    for module in fresh.modules:
        set_model_state_dict(module, dict(want), options=options)  # it empties the dict it is given
    fresh.same_state("after set_model_state_dict")
    fresh.train(range(3, 5))
    fresh.validate(5)


def blocks_sharded_without_the_root(rank: int) -> None:
    """FSDP2 on the blocks alone: eager takes the first block as its root; the modal module says what to do."""
    eager, modal = pair()
    mesh = init_device_mesh("cpu", (WORLD,))
    for module in (eager, modal):
        for block in module.get_submodule("blocks").children():
            fully_shard(block, mesh=mesh)
    eager(batch(rank, 1)).sum().backward()
    with pytest.raises(modeswap.UnsupportedGraphError, match=r"fully_shard\(modal\)"):
        modal(batch(rank, 1))


def synced(rank: int, directory: Path) -> None:
    """A program exported from SyncBatchNorm, loaded on each rank: refused in train mode, as eager on CPU."""
    eager = nn.SyncBatchNorm.convert_sync_batchnorm(pair()[0])
    modal = modeswap.load(directory / "synced.pt2")
    with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
        # Eager SyncBatchNorm synchronises CUDA tensors only; a copy, as it counts the batch before it refuses.
        copy.deepcopy(eager).train()(batch(rank, 1))
    refused = r"'blocks\.0\.1', 'blocks\.1\.1' was exported from a torch\.nn\.SyncBatchNorm"
    with pytest.raises(modeswap.UnsupportedGraphError, match=refused):
        modal.train()(batch(rank, 1))  # the graph has no all-reduce of the statistics
    # In eval, and in train with the batch norms frozen, SyncBatchNorm computes what BatchNorm does (unwrapped:
    # DDP takes SyncBatchNorm on GPU modules only).
    both = SideBySide(eager, modal, rank)
    both.validate(2)
    both.train(range(3, 5), frozen=["blocks.0.1", "blocks.1.1"])
    both.validate(5)


def language_model(rank: int, wrapper: str) -> None:
    """GPT-2, its embeddings tied, captured and wrapped: trains, validates and trains again as eager."""
    eager, modal = pair("gpt2")
    assert modal.get_submodule("lm_head").weight is modal.get_submodule("transformer.wte").weight, "the tie is lost"
    wrapped = [wrap(wrapper, module, blocks="transformer.h") for module in (eager, modal)]
    both = SideBySide(*wrapped, rank, inputs=tokens)
    both.train(range(1, 3))
    assert type(wrapped[1](tokens(rank, 0))) is type(wrapped[0](tokens(rank, 0)))  # a CausalLMOutput...
    both.validate(3)
    both.train(range(4, 6))
    both.validate(6)
