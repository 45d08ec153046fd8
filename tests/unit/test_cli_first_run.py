"""What a new user meets before the first swap: the package import, the doc pages, the recipes, the warnings filter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

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
        "assert modeswap.fx.graphs.__name__ == 'modeswap.fx.graphs'  # submodules load on first use\n"
        "try:\n"
        "    modeswap.no_such_name\n"
        "except AttributeError as error:\n"
        "    print(error)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "module 'modeswap' has no attribute 'no_such_name'"


def test_a_doc_page_whose_extra_is_missing_skips(tmp_path):
    # A torchao that cannot be imported, as on a machine without the integration extra.
    (tmp_path / "torchao.py").write_text("raise ModuleNotFoundError(\"No module named 'torchao'\", name='torchao')\n")
    command = [sys.executable, "-m", "pytest", "docs/qat.md", "-q", "-rs", "-p", "no:randomly"]
    # A run of its own: not a worker of the pytest-xdist run this test may be in.
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_")}
    env = {**inherited, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "qat.md needs torchao: pip install -e '.[integration]'" in result.stdout


def _just() -> str | None:
    """The just binary; not pyenv's shim of it, which puts its own python first on PATH."""
    found = shutil.which("just")
    if found is not None and "/shims/" in found:
        real = subprocess.run(["pyenv", "which", "just"], capture_output=True, text=True, check=False)
        return real.stdout.strip() or None
    return found


@pytest.mark.skipif(_just() is None, reason="just is not installed")
def test_just_bench_says_which_extra_it_needs(tmp_path):
    # A python that sees no site-packages: none of the bench extra's packages can be found.
    bare = tmp_path / "python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    result = subprocess.run(
        [_just(), "bench", "--quick"], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT, env=env
    )
    assert result.returncode != 0
    assert "just bench needs the bench extra, and matplotlib is not installed: pip install -e '.[bench]'" in (
        result.stderr
    )
    assert "exporting" not in result.stdout + result.stderr  # refused before measuring anything


def test_torchs_python_3_13_0_guard_warning_is_not_an_error():
    # torch.compile warns so on CPython 3.13.0 only; filterwarnings = error must let it through.
    with warnings.catch_warnings(record=True) as caught:
        message = "Guards may run slower on Python 3.13.0. Consider upgrading to Python 3.13.1+."
        warnings.warn(message, RuntimeWarning, stacklevel=1)
    assert caught == []


def test_other_runtime_warnings_still_are_errors():
    with pytest.raises(RuntimeWarning):
        warnings.warn("Guards may run slower on Python 3.14.0.", RuntimeWarning, stacklevel=1)
