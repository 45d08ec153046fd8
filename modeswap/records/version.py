"""modeswap's version, which files it writes carry; pyproject.toml says the same."""

VERSION = "0.1.0"
