"""The device mesh and the moves between host numpy batches and global arrays (DESIGN.md 6): one `data` axis over
every device JAX sees (of every process), batches sharded on it, the state replicated."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh() -> Mesh:
  """A 1-D mesh named ('data',) over all devices, in `jax.devices()` order."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (the train state)."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over the `data` axis."""
  return NamedSharding(mesh, P('data'))


def to_global(batch: dict[str, np.ndarray], keys: tuple[str, ...], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Global arrays of `batch[k]` for k in `keys`, from this process's rows ([N_local, ...] each)."""
  return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in keys}


def local_numpy(x: jax.Array) -> np.ndarray:
  """This process's rows of an array sharded on its leading axis (all of it on one process)."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])
