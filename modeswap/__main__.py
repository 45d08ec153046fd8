"""``python -m modeswap``: the ``modeswap`` command."""

import sys

from modeswap.cli.main import main

sys.exit(main())
