"""The explicit training state (DESIGN.md 2.3): one pytree, checkpointed whole, vmappable for sweeps."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from retinamask_jax.hparams import HParams

PyTree = Any


@struct.dataclass
class TrainState:
  """Everything a train step reads and writes.

  step: int32 [] number of updates applied. params: trainable variables (`params` collection; frozen-stage entries
  are in here too but the optimizer never moves them). frozen: frozen-BN affine constants. loss_stats: running
  statistics of the self-adjusting smooth L1. opt_state: optax state. hparams: the traced knobs of DESIGN.md 2.6;
  they travel with the state so that a stacked state trains several runs of a sweep as one program, but they are
  always reset from the config on restore (the config is the source of truth). tx is static (not a pytree leaf).
  """

  step: jnp.ndarray
  params: PyTree
  frozen: PyTree
  loss_stats: PyTree
  opt_state: optax.OptState
  hparams: HParams
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @classmethod
  def create(
      cls, variables: dict[str, PyTree], tx: optax.GradientTransformation, hparams: HParams
  ) -> TrainState:
    params = variables['params']
    return cls(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=variables.get('frozen', {}),
        loss_stats=variables.get('loss_stats', {}),
        opt_state=tx.init(params),
        hparams=hparams,
        tx=tx,
    )

  @property
  def variables(self) -> dict[str, PyTree]:
    """The model variables (`params`, `frozen`) as `module.apply` takes them."""
    return {'params': self.params, 'frozen': self.frozen}

  def apply_gradients(self, grads: PyTree, loss_stats: PyTree) -> TrainState:
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    updates = jax.tree.map(lambda u: u * self.hparams.lr_scale.astype(u.dtype), updates)
    return self.replace(
        step=self.step + 1,
        params=optax.apply_updates(self.params, updates),
        opt_state=opt_state,
        loss_stats=loss_stats,
    )
