"""SGD with the authors' schedule and parameter groups (spec section 7, "Solver").

- Momentum 0.9 in PyTorch's form (weight decay added to the gradient before the momentum trace).
- Learning rate: `train.base_lr` is for `train.lr_reference_batch` images and is scaled linearly to the global batch.
  Linear warmup from `warmup_factor` over `warmup_steps`, then x`lr_decay` at each of `lr_steps`.
- Parameter groups by leaf name: `kernel` (decay `weight_decay`), `bias` (LR x`bias_lr_factor`, no decay),
  normalization `scale` (decay `weight_decay_norm`; the authors decay GN gamma like a weight, the default here does
  not), and frozen-stage parameters, which get no update and no optimizer state.
- The traced `HParams.lr_scale` multiplies the final update, so a learning-rate sweep shares one compilation.

Off the authors' path, for short from-scratch schedules (the CPU default): `train.optimizer='adamw'` (Adam moments,
decoupled weight decay `weight_decay` x LR on the same groups) and `train.lr_schedule='cosine'` (after warmup, a
half cosine from the peak to 0 at `train.num_steps`, instead of the steps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any


def learning_rate(config: ml_collections.ConfigDict) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Schedule: 0-based update count -> LR (float32) for the global batch `train.batch_size`.

  The authors' scheduler steps before each iteration, so update `count` uses their iteration `count + 1`.
  """
  t = config.train
  peak = t.base_lr * t.batch_size / t.lr_reference_batch
  boundaries = jnp.asarray(sorted(t.lr_steps) or [2**31 - 1], jnp.int32)
  kind = t.get('lr_schedule', 'steps')
  if kind not in ('steps', 'cosine'):
    raise ValueError(f"train.lr_schedule must be 'steps' or 'cosine', got {kind!r}")

  def schedule(step: jnp.ndarray) -> jnp.ndarray:
    step = jnp.asarray(step, jnp.int32) + 1
    # The authors' WarmupMultiStepLR: factor = w * (1 - it / n) + it / n for it < n.
    progress = jnp.minimum(step.astype(jnp.float32) / max(t.warmup_steps, 1), 1.0)
    warmup = t.warmup_factor * (1.0 - progress) + progress
    if kind == 'cosine':
      span = max(t.num_steps - t.warmup_steps, 1)
      done = jnp.clip((step - t.warmup_steps).astype(jnp.float32) / span, 0.0, 1.0)
      return peak * warmup * 0.5 * (1.0 + jnp.cos(jnp.pi * done))
    decays = jnp.sum(step >= boundaries) if t.lr_steps else 0
    return peak * warmup * jnp.asarray(t.lr_decay, jnp.float32) ** decays

  return schedule


def param_labels(params: PyTree, frozen_mask: PyTree) -> PyTree:
  """Optimizer group of every parameter leaf: 'frozen', 'bias', 'norm' or 'weight'."""

  def label(path, frozen):
    if frozen:
      return 'frozen'
    name = getattr(path[-1], 'key', str(path[-1]))
    return {'bias': 'bias', 'scale': 'norm'}.get(name, 'weight')

  return jax.tree_util.tree_map_with_path(label, frozen_mask)


def make_optimizer(
    config: ml_collections.ConfigDict, params: PyTree, frozen_mask: PyTree
) -> optax.GradientTransformation:
  """The SGD transformation for `params`; `frozen_mask` (same tree, bool) marks frozen-stage parameters."""
  t = config.train
  schedule = learning_rate(config)
  kind = t.get('optimizer', 'sgd')
  if kind not in ('sgd', 'adamw'):
    raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {kind!r}")

  def adamw(weight_decay: float, lr_factor: float) -> optax.GradientTransformation:
    parts = [optax.scale_by_adam()]
    parts += [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    parts += [optax.scale_by_schedule(lambda s: -lr_factor * schedule(s))]
    return optax.chain(*parts)

  def sgd(weight_decay: float, lr_factor: float) -> optax.GradientTransformation:
    parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    parts += [optax.trace(decay=t.momentum), optax.scale_by_schedule(lambda s: -lr_factor * schedule(s))]
    return optax.chain(*parts)

  make = sgd if kind == 'sgd' else adamw
  groups = {
      'weight': make(t.weight_decay, 1.0),
      'bias': make(0.0, t.bias_lr_factor),
      'norm': make(t.weight_decay_norm, 1.0),
      'frozen': optax.set_to_zero(),
  }
  return optax.multi_transform(groups, param_labels(params, frozen_mask))
