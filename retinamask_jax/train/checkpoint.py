"""Orbax checkpoints of the whole training state under `<workdir>/checkpoints/` (DESIGN.md 6).

One checkpoint per saved step holds three items: `state` (step, params, frozen, loss_stats, opt_state, hparams as a
nested dict of arrays), `data` (the input pipeline's position, JSON) and `config` (JSON, for the record). Saves are
asynchronous and atomic (Orbax writes to a temporary directory and renames), so a crash during a save leaves the
previous checkpoint restorable. Restores place arrays with the caller's shardings, so a checkpoint written on one
mesh restores onto any other (8 devices -> 1, 1 -> 4).

A finalized checkpoint can still be damaged later (a dying host, a bad disk: truncated or missing array files,
unreadable metadata): restoring it raises `DamagedCheckpointError` naming the step and the reason, and
`set_aside` renames it to `<step>.damaged` (a name Orbax does not take for a step) so that it can be inspected.
A save that fails (no space, file too large, permission denied, a bucket error) raises `CheckpointWriteError`
naming the step and the OS error, at the next `save`, `wait` or `close` when it failed in Orbax's background
thread; the step's temporary directory is never finalized, so the previous checkpoints stay restorable.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

PyTree = Any


class ShapeMismatchError(ValueError):
  """A checkpoint does not fit the model/optimizer built from the config."""


class DamagedCheckpointError(Exception):
  """A checkpoint step exists but cannot be read back (truncated or missing files, unreadable metadata)."""

  def __init__(self, directory: str, step: int, reason: str):
    super().__init__(f'checkpoint {step} in {directory} is damaged: {reason}')
    self.directory, self.step, self.reason = directory, step, reason


class CheckpointWriteError(Exception):
  """A checkpoint could not be written (no space left, file too large, permission denied, a bucket error); the
  checkpoints written before it are intact (Orbax finalizes a step by renaming its temporary directory)."""

  def __init__(self, directory: str, step: int | None, reason: str):
    super().__init__(f'checkpoint {step} could not be written to {directory}: {reason}')
    self.directory, self.step, self.reason = directory, step, reason


def os_error_text(error: BaseException) -> str:
  """The OS error behind a failed write, as `[Errno 27] File too large (EFBIG)`: an OSError in the exception's
  chain, or the `os_error_code` TensorStore appends to its messages; else `failure_reason(error)` (e.g. a bucket's
  HTTP error)."""
  seen, e = set(), error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return f'[Errno {e.errno}] {os.strerror(e.errno)} ({errno.errorcode.get(e.errno, "?")})'
    match = re.search(r"\[os_error_code='?(\d+)'?\]", str(e))
    if match:
      code = int(match.group(1))
      return f'[Errno {code}] {os.strerror(code)} ({errno.errorcode.get(code, "?")})'
    e = e.__cause__ or e.__context__
  return failure_reason(error)


def failure_reason(error: BaseException, limit: int = 300) -> str:
  """The root cause of `error` in one line: the innermost exception of its `raise ... from` chain (TensorStore's
  `OUT_OF_RANGE: ...` rather than Orbax's wrapper, which prints the whole TensorStore spec), its first line, at most
  `limit` characters."""
  seen = set()
  while error.__cause__ is not None and id(error) not in seen:
    seen.add(id(error))
    error = error.__cause__
  text = re.sub(r' in OCDBT database at [^:]*"', '', str(error).strip())  # the directory is named already
  lines = text.splitlines()
  text = f'{type(error).__name__}: {lines[0]}' if lines else type(error).__name__
  return text if len(text) <= limit else text[: limit - 3] + '...'


def _state_dict(state: Any) -> PyTree:
  """The checkpointed part of a TrainState (everything but the static optimizer definition)."""
  return serialization.to_state_dict(state)


def _paths_and_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(getattr(leaf, "shape", np.shape(leaf))) for path, leaf in flat}


def check_compatible(saved: PyTree, expected: PyTree, where: str) -> None:
  """Raise ShapeMismatchError naming the first parameter path whose presence or shape differs."""
  saved_shapes = _paths_and_shapes(saved)
  expected_shapes = _paths_and_shapes(expected)
  # Parameters first: a mismatch there is the cause; optimizer-state mismatches are its echo.
  paths = sorted(set(saved_shapes) | set(expected_shapes), key=lambda p: (not p.startswith("['params']"), p))
  for path in paths:
    s, e = saved_shapes.get(path), expected_shapes.get(path)
    if s != e:
      raise ShapeMismatchError(
          f'checkpoint {where} does not match the model built from the config: at {path} the checkpoint has '
          f'{"no entry" if s is None else "shape " + str(s)}, the model expects '
          f'{"no entry" if e is None else "shape " + str(e)}'
      )


class Checkpointer:
  """Save/restore TrainState + data position + config; keeps the last `keep` checkpoints."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    handlers = {
        'state': ocp.StandardCheckpointHandler(),
        'data': ocp.JsonCheckpointHandler(),
        'config': ocp.JsonCheckpointHandler(),
    }
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._saved: set[int] = set()  # steps this object saved, async saves in flight included
    self._in_flight: int | None = None  # the step of the asynchronous save not yet waited for

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(
      self, step: int, state: Any, data_state: dict[str, Any], config: ml_collections.ConfigDict
  ) -> bool:
    """Starts an asynchronous save of `step`; False (nothing written) when that step is already saved.

    Saving a step twice happens legitimately (a preemption signal that arrives during a step that was just
    saved periodically); Orbax would raise for it, and the saved state of a step cannot differ anyway.
    """
    step = int(step)
    if step in self._saved or step in self._manager.all_steps():
      return False
    self.wait()  # a failure of the save in flight is that step's, not this one's
    self._saved.add(step)
    self._in_flight = step
    try:
      self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(_state_dict(state)),
              data=ocp.args.JsonSave(data_state),
              config=ocp.args.JsonSave(config.to_dict()),
          ),
          force=True,
      )
    except Exception as e:  # the synchronous part: directories, metadata, (on some backends) the arrays
      raise CheckpointWriteError(self.directory, step, os_error_text(e)) from e
    return True

  def restore(
      self, template: Any, step: int | None = None, sharding: jax.sharding.Sharding | None = None
  ) -> tuple[Any, dict[str, Any]]:
    """Restore onto `template` (a TrainState of the right structure, e.g. freshly initialized).

    Arrays are placed with `sharding` (default: the template leaves' shardings). Returns (state, data_state).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    if step not in self.all_steps():
      raise FileNotFoundError(f'no checkpoint step {step} in {self.directory} (steps: {self.all_steps()})')
    target = _state_dict(template)
    try:
      saved_meta = self._manager.item_metadata(step)['state']
    except Exception as e:  # whatever the damage, Orbax and TensorStore raise their own types
      raise DamagedCheckpointError(self.directory, step, f'metadata unreadable, {failure_reason(e)}') from e
    check_compatible(saved_meta, target, f'{self.directory} step {step}')  # a config mismatch: not damage

    def abstract(leaf):
      leaf_sharding = sharding if sharding is not None else getattr(leaf, 'sharding', None)
      return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=leaf_sharding)

    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(jax.tree.map(abstract, target)),
              data=ocp.args.JsonRestore(),
          ),
      )
    except Exception as e:
      raise DamagedCheckpointError(self.directory, step, failure_reason(e)) from e
    state = serialization.from_state_dict(template, restored['state'])
    return state, dict(restored['data'] or {})

  def set_aside(self, step: int) -> str:
    """Renames step `step`'s directory to `<step>.damaged` (`.damaged.2`, ... when taken); returns the new path.

    Orbax then no longer lists it: a step is a name of digits (or `<prefix>_<digits>`, hence no underscore here).
    """
    source = os.path.join(self.directory, str(step))
    target = f'{source}.damaged'
    n = 1
    while os.path.exists(target):
      n += 1
      target = f'{source}.damaged.{n}'
    os.rename(source, target)
    self.reload()
    return target

  def reload(self) -> None:
    """Lists the directory's steps again (after another process changed it)."""
    self._manager.reload()

  def wait(self) -> None:
    """Waits for the save in flight; raises CheckpointWriteError (once) when it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # Orbax re-raises the background thread's error here
      step, self._in_flight = self._in_flight, None
      raise CheckpointWriteError(self.directory, step, os_error_text(e)) from e
    self._in_flight = None

  def close(self) -> None:
    self.wait()
    self._manager.close()
