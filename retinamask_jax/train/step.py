"""The jitted computations: RetinaMask's training loss, the train step, and inference.

Everything here is a pure function of arrays with static shapes (DESIGN.md 2.1-2.2): anchors are numpy constants
computed at trace time from the canvas shape, so a run compiles once per canvas; the continuous knobs arrive in
`state.hparams` as traced scalars (DESIGN.md 2.6). The same functions run under `jax.jit` with a sharded global
batch (no `axis_name`) and under `jax.pmap` (`axis_name='data'`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from retinamask_jax import losses
from retinamask_jax.hparams import HParams
from retinamask_jax.ops import anchors as anchors_lib
from retinamask_jax.ops import masks as masks_lib
from retinamask_jax.ops import postprocess as postprocess_lib
from retinamask_jax.ops import roi_align as roi_align_lib
from retinamask_jax.train import optim
from retinamask_jax.train.state import TrainState

PyTree = Any
Batch = dict[str, jnp.ndarray]


def canvas_anchors(
    config: ml_collections.ConfigDict, canvas_hw: tuple[int, int]
) -> tuple[np.ndarray, tuple[int, ...]]:
  """Anchors [A_total, 4] float32 for a canvas, and the anchor count per level (P3..P7)."""
  a, f = config.model.anchors, config.model.fpn
  kwargs = dict(
      min_level=f.min_level,
      max_level=f.max_level,
      sizes=tuple(a.sizes),
      aspect_ratios=tuple(a.aspect_ratios),
      scales_per_octave=a.scales_per_octave,
      preset=a.preset,
  )
  canvas_hw = (int(canvas_hw[0]), int(canvas_hw[1]))
  return (
      anchors_lib.generate_anchors(canvas_hw, **kwargs),
      anchors_lib.anchors_per_level(canvas_hw, **kwargs),
  )


def detect(
    config: ml_collections.ConfigDict,
    cls_logits: jnp.ndarray,
    box_deltas: jnp.ndarray,
    image_size: jnp.ndarray,
    canvas_hw: tuple[int, int],
) -> dict[str, jnp.ndarray]:
  """Detections from head outputs (spec section 6): boxes [N, D, 4], scores, classes (1..K), valid [N, D]."""
  anchors, per_level = canvas_anchors(config, canvas_hw)
  p = config.postprocess
  return postprocess_lib.postprocess_detections(
      cls_logits,
      box_deltas,
      jnp.asarray(anchors),
      per_level,
      image_size,
      score_threshold=p.score_threshold,
      pre_nms_top_k=p.pre_nms_top_k,
      nms_iou=p.nms_iou,
      max_detections=p.max_detections,
      box_weights=tuple(config.model.box_coder.weights),
      max_log_ratio=config.model.box_coder.max_log_ratio,
  )


def mask_logits_for_boxes(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    variables: PyTree,
    features: dict[int, jnp.ndarray],
    boxes: jnp.ndarray,
    classes: jnp.ndarray,
) -> jnp.ndarray:
  """Mask logits [N, R, S, S] float32 of `classes` [N, R] (1..K) for `boxes` [N, R, 4] in canvas pixels."""
  m = config.model.mask
  levels = roi_align_lib.assign_levels(
      boxes, m.min_level, m.max_level, canonical_level=m.canonical_level, canonical_size=m.canonical_size
  )
  rois = roi_align_lib.multilevel_roi_align(
      [features[level] for level in range(m.min_level, m.max_level + 1)],
      boxes,
      levels,
      min_level=m.min_level,
      output_size=m.pooler_resolution,
      sampling_ratio=m.sampling_ratio,
      aligned=m.aligned,
  )
  logits = model.apply(variables, rois, method=model.mask_logits)  # [N, R, S, S, K]
  channel = jnp.maximum(classes - 1, 0)[:, :, None, None, None]
  return jnp.take_along_axis(logits, channel, axis=-1)[..., 0].astype(jnp.float32)


def compute_loss(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    params: PyTree,
    frozen: PyTree,
    loss_stats: PyTree,
    hparams: HParams,
    batch: Batch,
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, tuple[dict[str, jnp.ndarray], PyTree]]:
  """RetinaMask's training loss on one (global or per-device) batch.

  Returns (total loss float32 [], (metrics, new_loss_stats)). Under `axis_name` the loss is this device's share
  (see `losses.detection_loss`): the global loss is the psum over devices.
  """
  variables = {'params': params, 'frozen': frozen}
  images = batch['image']
  canvas_hw = images.shape[1:3]
  outputs = model.apply(variables, images)
  anchors, _ = canvas_anchors(config, canvas_hw)
  # Crowd ignore-region rows (class -1) are not targets: treat them as padding here.
  gt_classes = jnp.maximum(batch['gt_classes'], 0)
  det, new_stats = losses.detection_loss(
      outputs['cls_logits'],
      outputs['box_deltas'],
      jnp.asarray(anchors),
      batch['gt_boxes'],
      gt_classes,
      hparams,
      loss_stats,
      self_adjusting=config.loss.self_adjusting,
      momentum=config.loss.self_adjusting_momentum,
      box_weights=tuple(config.model.box_coder.weights),
      axis_name=axis_name,
  )
  total = hparams.cls_weight * det['cls'] + hparams.box_weight * det['box']
  metrics = {
      'cls_loss': det['cls'],
      'box_loss': det['box'],
      'num_pos': det['num_pos'],
      'beta': jnp.mean(det['beta']),
  }

  if config.model.mask.enabled:
    m = config.model.mask
    # The detector's own detections are the mask proposals; no gradient flows through their selection.
    dets = detect(
        config,
        jax.lax.stop_gradient(outputs['cls_logits']),
        jax.lax.stop_gradient(outputs['box_deltas']),
        batch['image_size'],
        canvas_hw,
    )
    props = masks_lib.mask_proposals(
        dets['boxes'],
        dets['valid'],
        batch['gt_boxes'],
        gt_classes,
        iou_threshold=m.proposal_iou,
        max_proposals=m.max_proposals,
    )
    logits = mask_logits_for_boxes(
        model, config, variables, outputs['features'], props['boxes'], props['classes']
    )
    targets = masks_lib.mask_targets(
        batch['gt_masks'], batch['gt_boxes'], props['boxes'], props['gt_index'], resolution=m.resolution
    )
    mask_loss = losses.mask_loss(logits, targets, props['positive'], axis_name=axis_name)
    total = total + hparams.mask_weight * mask_loss
    metrics.update(
        mask_loss=mask_loss,
        num_mask_pos=jnp.sum(props['positive']).astype(jnp.float32),
        mask_pos_dropped=jnp.sum(props['num_positive_dropped']).astype(jnp.float32),
        num_detections=jnp.sum(dets['valid']).astype(jnp.float32),
    )
  metrics['loss'] = total
  return total, (metrics, new_stats)


def make_detection_loss(
    model: nn.Module, config: ml_collections.ConfigDict
) -> Callable[..., tuple[jnp.ndarray, dict[str, jnp.ndarray], PyTree]]:
  """Jitted `detection_loss(variables, batch, hparams=None) -> (loss, aux, new_loss_stats)`.

  variables: `{'params', 'frozen', 'loss_stats'}` (as `build_model`'s init returns them); batch: the training batch
  contract of DESIGN.md 4 (`image [N, H, W, 3] float32`, `image_size [N, 2] int32`, `gt_boxes [N, G, 4]`,
  `gt_classes [N, G] int32`, `gt_masks [N, G, M, M]`); hparams: the traced knobs (default: from `config`).
  Returns the total loss (float32 []), aux metrics (cls/box/mask losses, counts, beta) and the updated
  self-adjusting statistics. The mask loss is included when the mask branch is on.
  """
  default_hparams = HParams.from_config(config)

  @jax.jit
  def detection_loss(variables: PyTree, batch: Batch, hparams: HParams | None = None):
    hparams = default_hparams if hparams is None else hparams
    loss, (aux, new_stats) = compute_loss(
        model, config, variables['params'], variables.get('frozen', {}), variables['loss_stats'], hparams, batch
    )
    return loss, aux, new_stats

  return detection_loss


def _all_finite(tree: PyTree) -> jnp.ndarray:
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_train_step(
    model: nn.Module, config: ml_collections.ConfigDict, axis_name: str | None = None
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jnp.ndarray]]]:
  """`train_step(state, batch, rng) -> (state, metrics)`, pure; jit it (sharded batch) or pmap it (axis_name).

  `rng` is accepted for stochastic layers; the default model has none and ignores it. A step whose loss or
  gradients are not finite leaves the state unchanged (metrics['nonfinite'] = 1) so one bad batch never destroys
  a run; the loop counts these and can stop on them.
  """
  schedule = optim.learning_rate(config)
  # Under pmap, metrics that are sums over the batch are summed across devices; ratios are averaged.
  summed = ('loss', 'cls_loss', 'box_loss', 'mask_loss', 'num_pos', 'num_mask_pos', 'mask_pos_dropped',
            'num_detections')

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    del rng

    def loss_fn(params):
      return compute_loss(
          model, config, params, state.frozen, state.loss_stats, state.hparams, batch, axis_name
      )

    (_, (metrics, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
      # Each device's loss is its share of the global loss, so the global gradient is the sum of the shares'.
      grads = jax.lax.psum(grads, axis_name)
      metrics = {
          k: jax.lax.psum(v, axis_name) if k in summed else jax.lax.pmean(v, axis_name)
          for k, v in metrics.items()
      }
    # The rate this update uses (the schedule counts updates from 0), whether or not it is applied.
    lr = schedule(state.step) * state.hparams.lr_scale
    ok = _all_finite(grads) & jnp.isfinite(metrics['loss'])
    new_state = state.apply_gradients(grads, new_stats)
    state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    metrics['nonfinite'] = 1.0 - ok.astype(jnp.float32)
    metrics['lr'] = lr
    metrics['grad_norm'] = optax.tree.norm(grads)
    return state, metrics

  return train_step


def make_predict_fn(
    model: nn.Module, config: ml_collections.ConfigDict, with_masks: bool
) -> Callable[[PyTree, jnp.ndarray, jnp.ndarray], dict[str, jnp.ndarray]]:
  """`predict(variables, images [N, H, W, 3], image_size [N, 2]) -> detections` in canvas pixels.

  Detections: boxes [N, D, 4], scores [N, D], classes [N, D] int32 (1..K), valid [N, D]; with masks also
  masks [N, Dm, S, S] float32 probabilities of the predicted class for the top Dm = `mask.num_masks_test`
  detections. Without masks the mask head is never built into the program (detection costs what RetinaNet costs).
  """

  def predict(variables: PyTree, images: jnp.ndarray, image_size: jnp.ndarray) -> dict[str, jnp.ndarray]:
    outputs = model.apply(variables, images)
    dets = detect(config, outputs['cls_logits'], outputs['box_deltas'], image_size, images.shape[1:3])
    if with_masks:
      k = min(config.model.mask.num_masks_test, dets['boxes'].shape[1])
      logits = mask_logits_for_boxes(
          model, config, variables, outputs['features'], dets['boxes'][:, :k], dets['classes'][:, :k]
      )
      dets['masks'] = jax.nn.sigmoid(logits) * dets['valid'][:, :k, None, None]
    return dets

  return predict

