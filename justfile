# Chores for modeswap. `just --list` shows them.

# The whole suite with the full hypothesis counts (what CI runs), on every core (pytest-xdist).
test:
    MODESWAP_PROFILE=ci python -m pytest -n auto

# The whole suite with few hypothesis examples, for quick feedback.
test-fast:
    MODESWAP_PROFILE=dev python -m pytest -n auto

lint:
    ruff check modeswap tests benchmarks docs
    ruff format --check modeswap tests benchmarks docs

typecheck:
    mypy modeswap

demo:
    modeswap demo

# Swap cost next to torchao, re-export and the copy floor; allow_train_eval switch cost; check and capture next to two exports.
# Full run (10-15 min) rewrites docs/performance/; `just bench --quick` (about two minutes) writes build/bench/.
# Needs the bench extra: checked first, so that a missing package is not found after minutes of measuring.
bench *args:
    #!/usr/bin/env bash
    set -euo pipefail
    for module in matplotlib transformers torchao; do
        if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)"; then
            echo "just bench needs the bench extra, and $module is not installed: pip install -e '.[bench]'" >&2
            exit 1
        fi
    done
    python benchmarks/bench.py {{args}}

# A 1.1B-parameter Llama swapped per weight policy, and swap time on exported stacks of 1k/10k/100k nodes.
# Full run (35-45 min, mostly exporting the 100k-node stacks) writes build/bench/scale; `--out docs/performance`
# publishes it; `just bench-scale --quick` takes about four minutes. Needs transformers (the bench extra).
bench-scale *args:
    python benchmarks/scale.py {{args}}

# docs/coverage.md: every architecture of the integration zoo, swapped both ways, against eager.
coverage:
    python -m tests.integration.coverage --out docs/coverage.md
