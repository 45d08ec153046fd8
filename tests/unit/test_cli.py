"""The ``modeswap`` command, run as a user runs it: the installed executable in a subprocess."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import modeswap

EXECUTABLE = shutil.which("modeswap")
pytestmark = pytest.mark.skipif(EXECUTABLE is None, reason="the modeswap executable is not installed")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    assert EXECUTABLE is not None
    return subprocess.run([EXECUTABLE, *args], capture_output=True, text=True, timeout=300, check=False)


def test_demo_passes_every_check():
    result = run("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 of 5 checks held." in result.stdout
    assert "FAILED" not in result.stdout
    assert "num_batches_tracked.add_(1)  True -> False" in result.stdout
    assert "momentum=0.05, eps=0.001" in result.stdout


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"modeswap {modeswap.__version__}"


def test_help_lists_the_demo():
    result = run("--help")
    assert result.returncode == 0
    assert "demo" in result.stdout


def test_unknown_command_is_a_usage_error():
    result = run("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
