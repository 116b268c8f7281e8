"""Orbax checkpoints of the whole training state under `<workdir>/checkpoints/` (DESIGN.md 6).

One checkpoint per saved step holds three items: `state` (step, params, frozen, loss_stats, opt_state, hparams as a
nested dict of arrays), `data` (the input pipeline's position, JSON) and `config` (JSON, for the record). Saves are
asynchronous and atomic (Orbax writes to a temporary directory and renames), so a crash during a save leaves the
previous checkpoint restorable. Restores place arrays with the caller's shardings, so a checkpoint written on one
mesh restores onto any other (8 devices -> 1, 1 -> 4).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

PyTree = Any


class ShapeMismatchError(ValueError):
  """A checkpoint does not fit the model/optimizer built from the config."""


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
    self._saved.add(step)
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_state_dict(state)),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config.to_dict()),
        ),
        force=True,
    )
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
    target = _state_dict(template)
    saved_meta = self._manager.item_metadata(step)['state']
    check_compatible(saved_meta, target, f'{self.directory} step {step}')

    def abstract(leaf):
      leaf_sharding = sharding if sharding is not None else getattr(leaf, 'sharding', None)
      return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=leaf_sharding)

    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree.map(abstract, target)),
            data=ocp.args.JsonRestore(),
        ),
    )
    state = serialization.from_state_dict(template, restored['state'])
    return state, dict(restored['data'] or {})

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
