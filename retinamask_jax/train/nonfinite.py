"""Steps with a non-finite loss or gradient: the step function leaves the state as it was and flags them; this
counts them on device (no host sync per step), warns at log steps and before saves, and stops the run when
`train.nonfinite` is 'stop'."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding

from retinamask_jax.train.checkpoint import Checkpointer


class NonFiniteError(RuntimeError):
  """A step's loss or gradients were not finite and `train.nonfinite` is 'stop'."""


@jax.jit
def _tally(count: jax.Array, first: jax.Array, nonfinite: jax.Array, step: jax.Array):
  bad = nonfinite > 0
  return count + bad.astype(count.dtype), jnp.where(bad & (first < 0), step, first).astype(first.dtype)


class NonFiniteMonitor:
  """This session's count of non-finite steps (int32 scalars on device) on top of `before` from the checkpoint.

  `close` (waits for the checkpoint saves in flight, closes the logs) runs before NonFiniteError is raised.
  """

  def __init__(self, config: ml_collections.ConfigDict, before: int, replicated: NamedSharding,
               checkpointer: Checkpointer, close: Callable[[], None]):
    self.stop = config.train.get('nonfinite', 'skip') == 'stop'
    self.before = before
    self.checkpointer = checkpointer
    self._close = close
    self._count = jax.device_put(np.zeros((), np.int32), replicated)  # this session's
    self._first = jax.device_put(np.full((), -1, np.int32), replicated)  # the first bad step, -1: none yet
    self._logged = 0

  def record(self, nonfinite: jax.Array, step: int) -> None:
    """After step `step` (1-based) ran; `nonfinite` is its metrics' flag. No host sync."""
    self._count, self._first = _tally(self._count, self._first, nonfinite, step)

  def total_without_check(self) -> int:
    """Non-finite steps of the run so far (syncs), without warning or stopping."""
    return self.before + int(self._count)

  def total(self) -> int:
    """Non-finite steps of the run so far; warns when new ones appeared, raises NonFiniteError to stop."""
    count = int(self._count)
    if count > self._logged:
      self._logged = count
      logging.warning('%d step(s) with a non-finite loss or gradient so far (the first at step %d); %s',
                      self.before + count, int(self._first),
                      'stopping (train.nonfinite=stop)' if self.stop else 'their updates were skipped')
    if self.stop and count:
      # Nothing of this session after the bad step is saved: the latest checkpoint stays the last good state.
      self._close()
      raise NonFiniteError(
          f'step {int(self._first)}: the loss or a gradient is NaN/Inf and train.nonfinite is "stop"; the '
          f'last good checkpoint is step {self.checkpointer.latest_step()} in {self.checkpointer.directory} '
          '(nothing after the bad step was saved). Set --config.train.nonfinite=skip to skip such steps instead.')
    return self.before + count
