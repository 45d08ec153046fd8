"""The doc pages run as tests (``--doctest-glob=*.md``); a page that needs an extra skips without it."""

from __future__ import annotations

import pytest

#: Page -> (the module it imports, the extra that installs it).
NEEDS = {"qat.md": ("torchao", "integration")}


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.path.name in NEEDS:
        module, extra = NEEDS[item.path.name]
        reason = f"{item.path.name} needs {module}: pip install -e '.[{extra}]'"
        pytest.importorskip(module, reason=reason)
