"""Registers :class:`archived_models.Unregistered` with torch: the module a reader imports first (``--import``)."""

from __future__ import annotations

import torch
from archived_models import Unregistered

torch.export.register_dataclass(Unregistered, serialized_type_name="archived_models.Unregistered")
