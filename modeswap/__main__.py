"""``python -m modeswap``: the ``modeswap`` command."""

import sys

from modeswap.cli import main

sys.exit(main())
