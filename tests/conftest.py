"""hypothesis profiles, chosen with MODESWAP_PROFILE: ``dev`` (default, fast) or ``ci`` (the full count)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Exporting a model takes tens of milliseconds, far above hypothesis' deadline.
_common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}

settings.register_profile("dev", max_examples=10, **_common)
settings.register_profile("ci", max_examples=100, print_blob=True, **_common)
settings.load_profile(os.environ.get("MODESWAP_PROFILE", "dev"))
