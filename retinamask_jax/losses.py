"""RetinaMask's losses: focal loss, (self-adjusting) smooth L1, the detection loss and the mask BCE.

References: authors_code_spec.md 2 (self-adjusting smooth L1), 3.3 (matching), 4 (detection
losses), 5.5 (mask). All math is float32 whatever the input dtype (bf16 logits are upcast).
Continuous knobs (alpha, gamma, beta, beta_max, IoU thresholds) may be traced scalars; only shapes
and `self_adjusting` are static.

Data parallelism. Under `jax.jit` with a sharded global batch (the main path) no `axis_name` is
needed: the functions see the global batch. Under `jax.pmap` / `shard_map` pass `axis_name`: the
normalizers (positive counts, image counts) and the self-adjusting statistics' sums are `psum`med,
so they are those of the global batch, and every returned loss is **this device's share** (local
sum / global normalizer). The global loss is then the psum of the shares and the global gradient
the psum of the per-device gradients. Computing the self-adjusting statistics over the global batch
(identical on every replica) is a documented deviation from the authors' per-GPU statistics
(DESIGN.md 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from retinamask_jax.hparams import HParams
from retinamask_jax.ops.boxes import BOX_WEIGHTS, encode_boxes
from retinamask_jax.ops.matching import POSITIVE, match_anchors

LossStats = dict[str, dict[str, jnp.ndarray]]

# Lower clamp of the self-adjusting beta (spec 2, step 3).
MIN_BETA = 1e-3


def _f32(x: Any) -> jnp.ndarray:
  return jnp.asarray(x).astype(jnp.float32)


def _psum(x: jnp.ndarray, axis_name: str | None) -> jnp.ndarray:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def sigmoid_focal_loss(
    logits: jnp.ndarray,
    targets: jnp.ndarray,
    alpha: float | jnp.ndarray = 0.25,
    gamma: float | jnp.ndarray = 2.0,
) -> jnp.ndarray:
  """Elementwise sigmoid focal loss (stable public API, DESIGN.md 8).

  With p = sigmoid(x): -alpha (1 - p)**gamma log(p) where the target is 1 and
  -(1 - alpha) p**gamma log(1 - p) where it is 0 (torchvision's
  `sigmoid_focal_loss(reduction='none')`, the authors' CUDA kernel). Computed from log-sigmoids, so
  it is finite with finite gradients for any finite logit and any gamma >= 0. As in torchvision, a
  negative alpha means no alpha weighting (checked with jnp.where, so alpha may be traced).

  Args:
    logits: [...] float (bf16 is computed in float32).
    targets: [...] in {0, 1} (one-hot), same shape as logits; any numeric dtype.
    alpha, gamma: scalars, possibly traced.
  Returns:
    [...] float32 loss, not reduced.
  """
  x = _f32(logits)
  t = _f32(targets)
  alpha = _f32(alpha)
  gamma = _f32(gamma)
  # -log p = softplus(-x) and -log(1 - p) = softplus(x) share log1p(exp(-|x|)): three transcendentals per
  # element (exp, log1p, exp) instead of five, on [N, A, K] (~8 M elements at 512 x 512, batch 2), and sums
  # of non-negative terms, so neither loses digits at large |x|. maximum/minimum (not relu/abs) split the
  # gradient at x = 0 evenly, which gives d softplus(x)/dx = sigmoid(0) = 0.5 there.
  shared = jnp.log1p(jnp.exp(jnp.minimum(x, -x)))
  neg_log_p = jnp.maximum(-x, 0.0) + shared
  neg_log_not_p = jnp.maximum(x, 0.0) + shared
  ce = t * neg_log_p + (1.0 - t) * neg_log_not_p
  # (1 - p_t)**gamma as exp(gamma log(1 - p_t)): no 0**gamma, whose gradient is NaN for gamma < 1.
  modulator = jnp.exp(-gamma * (t * neg_log_not_p + (1.0 - t) * neg_log_p))
  alpha_t = jnp.where(alpha >= 0, alpha * t + (1.0 - alpha) * (1.0 - t), 1.0)
  return alpha_t * modulator * ce


def smooth_l1_loss(diff: jnp.ndarray, beta: float | jnp.ndarray) -> jnp.ndarray:
  """Elementwise smooth L1 of d = |diff|: 0.5 d**2 / beta if d < beta, else d - 0.5 beta.

  Args:
    diff: [...] float (prediction - target).
    beta: scalar or broadcastable against diff (e.g. [4], one per box coordinate); 0 gives L1.
  Returns:
    [...] float32.
  """
  d = jnp.abs(_f32(diff))
  beta = _f32(beta)
  # The safe divisor keeps the unselected branch (and so the gradient) finite when beta is 0.
  quadratic = 0.5 * d * d / jnp.where(beta > 0, beta, 1.0)
  return jnp.where(d < beta, quadratic, d - 0.5 * beta)


def init_loss_stats(beta_max: float | jnp.ndarray) -> LossStats:
  """Initial self-adjusting statistics: running mean = beta_max, running var = 0, per coordinate.

  Returns:
    {'box': {'mean': [4] float32, 'var': [4] float32}}; the initial beta is therefore beta_max.
  """
  return {
      'box': {
          'mean': jnp.full((4,), beta_max, jnp.float32),
          'var': jnp.zeros((4,), jnp.float32),
      }
  }


def update_loss_stats(
    stats: LossStats,
    abs_err: jnp.ndarray,
    weights: jnp.ndarray,
    momentum: float | jnp.ndarray = 0.1,
    axis_name: str | None = None,
) -> LossStats:
  """One update of the self-adjusting smooth-L1 statistics (spec 2, step 2), without gradient.

  Per coordinate: the mean and the unbiased (n - 1) variance of abs_err over the rows with weight
  1; then running = (1 - momentum) running + momentum batch, only when the positive count n >= 2
  (else unchanged). The statistics are written through sums (count, sum, sum of squares about the
  previous running mean, which every replica shares), so with `axis_name` the psummed sums give
  exactly the global batch's statistics.

  Args:
    stats: {'box': {'mean': [4], 'var': [4]}}.
    abs_err: [P, 4] float |prediction - target| (any rows; masked by weights).
    weights: [P], 1 for positive rows, 0 otherwise (a mask; fractional weights are meaningless).
    momentum: weight of the new batch value.
    axis_name: psum the sums over this mapped axis (pmap / shard_map).
  Returns:
    new stats, same structure, float32.
  """
  mean = _f32(stats['box']['mean'])
  var = _f32(stats['box']['var'])
  e = jax.lax.stop_gradient(_f32(abs_err))
  w = jax.lax.stop_gradient(_f32(weights))[:, None]
  # Centring on the previous running mean (a replicated constant) keeps sums of squares accurate.
  shift = jax.lax.stop_gradient(mean)
  centred = (e - shift) * w
  n = _psum(jnp.sum(w), axis_name)
  s1 = _psum(jnp.sum(centred, axis=0), axis_name)
  s2 = _psum(jnp.sum(centred * (e - shift), axis=0), axis_name)
  enough = n >= 2
  n_safe = jnp.where(enough, n, 2.0)
  batch_mean = shift + s1 / n_safe
  batch_var = jnp.maximum((s2 - s1 * s1 / n_safe) / (n_safe - 1.0), 0.0)
  momentum = _f32(momentum)
  new_mean = jnp.where(enough, (1.0 - momentum) * mean + momentum * batch_mean, mean)
  new_var = jnp.where(enough, (1.0 - momentum) * var + momentum * batch_var, var)
  return {'box': {'mean': new_mean, 'var': new_var}}


def self_adjusting_beta(stats: LossStats, beta_max: float | jnp.ndarray) -> jnp.ndarray:
  """beta = clip(running_mean - running_var, 1e-3, beta_max) per coordinate, under stop_gradient.

  Returns:
    [4] float32.
  """
  mean = _f32(stats['box']['mean'])
  var = _f32(stats['box']['var'])
  beta = jnp.minimum(jnp.maximum(mean - var, MIN_BETA), _f32(beta_max))
  return jax.lax.stop_gradient(beta)


def detection_loss(
    cls_logits: jnp.ndarray,
    box_deltas: jnp.ndarray,
    anchors: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_classes: jnp.ndarray,
    hparams: HParams,
    loss_stats: Any,
    *,
    self_adjusting: bool,
    momentum: float | jnp.ndarray = 0.1,
    box_weights: Sequence[float] = BOX_WEIGHTS,
    axis_name: str | None = None,
) -> tuple[dict[str, jnp.ndarray], Any]:
  """RetinaNet classification and box losses with best matching (spec 3.3, 4; DESIGN.md 5).

  Matching per image with hparams.positive_iou / negative_iou / best_match_threshold. Focal loss
  (hparams.focal_alpha / focal_gamma) summed over non-ignored anchors x K classes, divided by
  (num_pos + N). Box loss: class-agnostic smooth L1 on the positives' encoded deltas, summed,
  divided by 4 max(num_pos, 1); beta is hparams.beta (self_adjusting False; a scalar or [4]) or the
  self-adjusting beta capped at hparams.beta_max, computed from statistics updated with this batch
  first (self_adjusting True). Images without GT are valid: all their anchors are negative and they
  still count in N. Loss weights are the caller's job.

  With `axis_name` (pmap / shard_map) num_pos, N and the statistics' sums are psummed; `cls` and
  `box` are this device's shares (local sum / global normalizer, so the psum over devices gives the
  global loss and gradient) and `num_pos` is the local count (its psum is the global count); `beta`
  and the new statistics are global (identical on every device).

  Args:
    cls_logits: [N, A, K] float (bf16 ok), class k+1 in channel k.
    box_deltas: [N, A, 4] float (bf16 ok).
    anchors: [A, 4] float32.
    gt_boxes: [N, G, 4] float32 xyxy, padded rows arbitrary.
    gt_classes: [N, G] int32, 0 = padding, 1..K.
    hparams: traced scalars (see hparams.HParams).
    loss_stats: {'box': {'mean': [4], 'var': [4]}} when self_adjusting; otherwise anything
      (returned unchanged).
    self_adjusting: static switch.
    momentum: self-adjusting statistics momentum.
    box_weights: box-coder weights (wx, wy, ww, wh).
    axis_name: the mapped axis under pmap / shard_map, else None.
  Returns:
    (losses, new_loss_stats); losses: 'cls' [] float32, 'box' [] float32 (unweighted),
    'num_pos' [] float32, 'beta' [4] float32 (the beta used).
  """
  cls_logits = _f32(cls_logits)
  box_deltas = _f32(box_deltas)
  anchors = _f32(anchors)
  gt_boxes = _f32(gt_boxes)
  gt_classes = jnp.asarray(gt_classes, jnp.int32)
  num_images, _, num_classes = cls_logits.shape

  def match_one(boxes: jnp.ndarray, valid: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    return match_anchors(
        anchors,
        boxes,
        valid,
        positive_iou=hparams.positive_iou,
        negative_iou=hparams.negative_iou,
        best_match_threshold=hparams.best_match_threshold,
    )

  matched, labels = jax.vmap(match_one)(gt_boxes, gt_classes > 0)  # [N, A] each
  positive = labels == POSITIVE  # [N, A]
  num_pos = jnp.sum(positive).astype(jnp.float32)
  num_pos_global = _psum(num_pos, axis_name)
  num_images_global = _psum(jnp.float32(num_images), axis_name)

  # Classification: one-hot of the matched GT class on positives, all-zero rows for negatives.
  matched_class = jnp.take_along_axis(gt_classes, matched, axis=1)  # [N, A]
  target_class = jnp.where(positive, matched_class, 0)
  targets = target_class[..., None] == jnp.arange(1, num_classes + 1, dtype=jnp.int32)  # [N, A, K]
  focal = sigmoid_focal_loss(cls_logits, targets, hparams.focal_alpha, hparams.focal_gamma)
  not_ignored = (labels >= 0)[..., None]
  cls_sum = jnp.sum(jnp.where(not_ignored, focal, 0.0))
  cls_loss = cls_sum / (num_pos_global + num_images_global)

  # Box regression on positives; negatives' targets (GT 0 or padding) are finite and masked out.
  matched_boxes = jax.vmap(lambda boxes, idx: boxes[idx])(gt_boxes, matched)  # [N, A, 4]
  box_targets = jax.lax.stop_gradient(encode_boxes(matched_boxes, anchors[None], box_weights))
  diff = box_deltas - box_targets  # [N, A, 4]
  if self_adjusting:
    new_stats = update_loss_stats(
        loss_stats,
        jnp.abs(diff).reshape(-1, 4),
        positive.reshape(-1).astype(jnp.float32),
        momentum=momentum,
        axis_name=axis_name,
    )
    beta = self_adjusting_beta(new_stats, hparams.beta_max)
  else:
    new_stats = loss_stats
    beta = jnp.broadcast_to(_f32(hparams.beta), (4,))
  box_sum = jnp.sum(jnp.where(positive[..., None], smooth_l1_loss(diff, beta), 0.0))
  box_loss = box_sum / (4.0 * jnp.maximum(num_pos_global, 1.0))
  losses = {'cls': cls_loss, 'box': box_loss, 'num_pos': num_pos, 'beta': beta}
  return losses, new_stats


def mask_loss(
    logits: jnp.ndarray,
    targets: jnp.ndarray,
    positive: jnp.ndarray,
    axis_name: str | None = None,
) -> jnp.ndarray:
  """Binary cross-entropy with logits, mean over positive proposals x S*S (spec 5.5).

  0 (with a gradient graph, zero gradient) when there is no positive proposal. With `axis_name` the
  positive count is psummed and the result is this device's share (local sum / global
  denominator).

  Args:
    logits: [N, R, S, S] float (the matched GT class's channel already selected; bf16 ok).
    targets: [N, R, S, S] in {0, 1}, any numeric dtype.
    positive: [N, R] bool, proposals matched to a GT.
    axis_name: the mapped axis under pmap / shard_map, else None.
  Returns:
    [] float32.
  """
  x = _f32(logits)
  t = _f32(targets)
  positive = jnp.asarray(positive, bool)
  bce = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
  total = jnp.sum(jnp.where(positive[:, :, None, None], bce, 0.0))
  pixels = x.shape[-2] * x.shape[-1]
  count = _psum(jnp.sum(positive).astype(jnp.float32), axis_name) * pixels
  return total / jnp.maximum(count, 1.0)
