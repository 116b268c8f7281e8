"""What every bench script shares: the timing rule and writing the results JSON."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def median_ms(fn: Callable[[], Any], runs: int, warmup: int) -> float:
  """Median wall time of `fn()` in milliseconds over `runs` calls after `warmup` untimed ones; `fn` must block
  until its result is ready (e.g. end with `jax.block_until_ready`)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def write_json(result: dict[str, Any], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'wrote {path}')
