"""Fixtures for the real-model tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # The models are tiny: a second intra-op thread only adds overhead, and on a busy machine its
    # OpenMP spin-waits make each forward and backward 10 to 50 times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # `-m "not integration"` leaves the real models and engines out for a quick run; CI runs them all.
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.integration)
