"""Traced hyperparameters: the continuous knobs of the method as a pytree of float32 scalars.

They reach the jitted loss and train step as data, not as Python constants, so one compilation serves a whole
sweep and `jax.vmap` over a stacked `HParams` trains several runs as one program (DESIGN.md 2.6).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
from flax import struct

# The best-matching policy is "off" when its threshold is above any IoU; +inf keeps that a traced value.
BEST_MATCH_OFF = math.inf


@struct.dataclass
class HParams:
  """Scalars (float32, shape [] or [S] when stacked for a vmapped sweep)."""

  best_match_threshold: jnp.ndarray  # matching.best_match_threshold; +inf = best matching off
  positive_iou: jnp.ndarray  # matching.positive_iou
  negative_iou: jnp.ndarray  # matching.negative_iou
  beta: jnp.ndarray  # loss.beta: fixed smooth-L1 beta
  beta_max: jnp.ndarray  # loss.beta_max: cap of the self-adjusting beta
  focal_alpha: jnp.ndarray  # loss.focal_alpha
  focal_gamma: jnp.ndarray  # loss.focal_gamma
  cls_weight: jnp.ndarray  # loss.cls_weight
  box_weight: jnp.ndarray  # loss.box_weight
  mask_weight: jnp.ndarray  # loss.mask_weight
  lr_scale: jnp.ndarray  # train.lr_scale

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> HParams:
    values = {}
    for field, key in CONFIG_KEYS.items():
      section, name = key.split('.')
      value = config[section][name]
      values[field] = BEST_MATCH_OFF if value is None else value  # only best_match_threshold may be None
    return cls(**{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})

  @classmethod
  def create(cls, **overrides: float) -> HParams:
    """The authors' values (configs/base.py), with `overrides` by field name; for tests and library use."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
      raise TypeError(f'unknown hyperparameters {sorted(unknown)}; known: {sorted(DEFAULTS)}')
    values = {**DEFAULTS, **overrides}
    return cls(**{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})


# The config key of each field (DESIGN.md 2.6). Runs whose configs differ only in these keys (and the seeds) share
# one compiled train step.
CONFIG_KEYS = dict(
    best_match_threshold='matching.best_match_threshold',
    positive_iou='matching.positive_iou',
    negative_iou='matching.negative_iou',
    beta='loss.beta',
    beta_max='loss.beta_max',
    focal_alpha='loss.focal_alpha',
    focal_gamma='loss.focal_gamma',
    cls_weight='loss.cls_weight',
    box_weight='loss.box_weight',
    mask_weight='loss.mask_weight',
    lr_scale='train.lr_scale',
)

DEFAULTS = dict(
    best_match_threshold=0.0,
    positive_iou=0.5,
    negative_iou=0.4,
    beta=0.11,
    beta_max=0.11,
    focal_alpha=0.25,
    focal_gamma=2.0,
    cls_weight=1.0,
    box_weight=1.0,
    mask_weight=1.0,
    lr_scale=1.0,
)
