"""DDP, FSDP2 and distributed checkpoints over modal modules: 2 ranks on CPU (gloo), exact against eager.

Each test has :data:`distributed.WORLD` ranks forked (``distributed.launch``)
from a process that builds the modules they need, once; what each rank runs,
and checks, is in ``distributed.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import modeswap

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch was built without distributed or gloo", allow_module_level=True)

from . import distributed
from .distributed import SOURCES, WRAPPERS, launch

#: What most tests' ranks take: the eager model and a capture of it, with seed 0's weights.
CAPTURED = [("capture", 0)]


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("source", SOURCES)
def test_trains_and_validates_as_eager_wrapped_alike(source: str, wrapper: str, tmp_path: Path) -> None:
    launch(distributed.train_and_validate, source, wrapper, False, store=tmp_path / "store", needs=[(source, 0)])


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_frozen_block_and_batch_norm_in_eval_as_eager(wrapper: str, tmp_path: Path) -> None:
    launch(distributed.train_and_validate, "capture", wrapper, True, store=tmp_path / "store", needs=CAPTURED)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2 per block"])
def test_a_transformers_language_model_with_tied_embeddings_trains_as_eager(wrapper: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    launch(distributed.language_model, wrapper, store=tmp_path / "store", needs=[("gpt2", 0)])


def test_distributed_checkpoint_resumes_as_eager_from_either_checkpoint(tmp_path: Path) -> None:
    launch(distributed.checkpoint_and_resume, tmp_path, store=tmp_path / "store", needs=[*CAPTURED, ("capture", 1)])


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2 per block"])
def test_full_state_dict_round_trips(wrapper: str, tmp_path: Path) -> None:
    launch(distributed.full_state_round_trip, wrapper, store=tmp_path / "store", needs=[*CAPTURED, ("capture", 1)])


def test_blocks_sharded_without_the_root_are_refused_with_what_to_do(tmp_path: Path) -> None:
    launch(distributed.blocks_sharded_without_the_root, store=tmp_path / "store", needs=CAPTURED)


def test_sync_batch_norm_is_refused_in_train_and_runs_frozen_as_eager(tmp_path: Path) -> None:
    # Exported outside a process group, where SyncBatchNorm computes BatchNorm's statistics.
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(distributed.net())
    modeswap.save(modeswap.capture(model, (distributed.batch(0, 0),)), tmp_path / "synced.pt2")
    launch(distributed.synced, tmp_path, store=tmp_path / "store", needs=CAPTURED)
