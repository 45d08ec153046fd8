"""Put the checkout holding this file first on ``sys.path``: the benchmarks measure its modeswap, not an installed one.

Import it before ``modeswap``.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
