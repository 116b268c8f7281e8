"""Shared test setup: the repo root on sys.path (for `configs`), float64-free JAX, hypothesis profiles."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Hypothesis: jit compiles on first call, so the first example is slow; no deadline, modest example counts.
settings.register_profile('default', deadline=None, max_examples=60, derandomize=True)
settings.register_profile('thorough', deadline=None, max_examples=1000)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'default'))


def _has_torchvision() -> bool:
  try:
    import torch  # noqa: F401
    import torchvision  # noqa: F401
  except Exception:  # noqa: BLE001  (any import failure means: no reference available)
    return False
  return True


HAS_TORCHVISION = _has_torchvision()
requires_torchvision = pytest.mark.skipif(not HAS_TORCHVISION, reason='torch/torchvision not installed')
