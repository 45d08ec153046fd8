"""The doc pages run as tests (``--doctest-glob=*.md``); a page that needs an extra skips without it."""

from __future__ import annotations

import pytest

#: Page -> the modules it imports, with how to install each.
NEEDS = {
    "qat.md": {"torchao": "pip install -e '.[integration]'"},
    "scale.md": {
        "torchao": "pip install -e '.[integration]'",
        "executorch": "pip install --no-deps executorch==1.5.1 && pip install -e '.[executorch]'",
    },
}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for module, install in NEEDS.get(item.path.name, {}).items():
        pytest.importorskip(module, reason=f"{item.path.name} needs {module}: {install}")
