# Chores for modeswap. `just --list` shows them.

# The whole suite with the full hypothesis counts (what CI runs).
test:
    MODESWAP_PROFILE=ci python -m pytest

# The whole suite with few hypothesis examples, for quick feedback.
test-fast:
    MODESWAP_PROFILE=dev python -m pytest

lint:
    ruff check modeswap tests benchmarks
    ruff format --check modeswap tests benchmarks

typecheck:
    mypy modeswap

demo:
    modeswap demo

# to_eval against the copy+recompile floor on a conv-bn-relu-dropout chain.
bench blocks="10":
    python benchmarks/swap_cost.py --blocks {{blocks}}

# docs/coverage.md: every architecture of the integration zoo, swapped both ways, against eager.
coverage:
    python -m tests.integration.coverage --out docs/coverage.md
