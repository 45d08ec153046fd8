"""The passes layer: the pass machinery, the kernels that swap sites, the checks that warn, and reading a mode."""
