"""Which optional kernel packages this machine has, looked up once without importing them."""
from __future__ import annotations

import importlib.util
import os

FLASH_AVAILABLE = importlib.util.find_spec("flash_attn") is not None
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter, for tests
