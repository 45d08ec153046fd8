"""The unit tests: one folder per layer of the package, one file per module (tests/unit/<layer>/test_<module>.py).

The folders are packages (``unit.rewrite.test_counters``), so that two layers may
hold test files of one name. This folder itself goes on ``sys.path``:
``archived_models`` and ``registering`` are imported by those names, the names
the archives that the tests write give their output types, as a fresh
interpreter that reads them imports them.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
