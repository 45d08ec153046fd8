"""What a new user meets before the first swap: the package import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def python(code: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", code]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)


def test_importing_modeswap_does_not_import_torch_until_a_name_is_used():
    result = python(
        "import sys, modeswap\nprint('torch' in sys.modules)\nmodeswap.to_eval\nprint('torch' in sys.modules)\n"
    )
    assert result.stdout.split() == ["False", "True"], result.stderr


def test_every_public_name_resolves_both_ways():
    result = python(
        "import modeswap\n"
        "from modeswap import *\n"
        "from modeswap import Mode, swap, to_eval, passes, testing, UnknownTrainingValueWarning\n"
        "missing = [name for name in modeswap.__all__ if name not in globals()]\n"
        "assert not missing, missing\n"
        "assert set(modeswap.__all__) <= set(dir(modeswap))\n"
        "assert modeswap.swap is swap and modeswap.passes is passes and modeswap.Mode.EVAL.value == 'eval'\n"
        "assert modeswap.graphs.__name__ == 'modeswap.graphs'  # submodules load on first use\n"
        "try:\n"
        "    modeswap.no_such_name\n"
        "except AttributeError as error:\n"
        "    print(error)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "module 'modeswap' has no attribute 'no_such_name'"
