"""Anchor-to-GT assignment with the best-matching policy (authors_code_spec.md 3.3, DESIGN.md 5).

One image per call; callers vmap over the batch. Thresholds may be traced float32 scalars, so one
compilation serves every threshold of an ablation (the paper's Table 1 is a sweep over
`best_match_threshold`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from retinamask_jax.ops.boxes import box_iou

POSITIVE = 1
NEGATIVE = 0
IGNORE = -1


def match_anchors(
    anchors: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_valid: jnp.ndarray,
    *,
    positive_iou: float | jnp.ndarray,
    negative_iou: float | jnp.ndarray,
    best_match_threshold: float | jnp.ndarray | None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Assigns each anchor of one image a GT index and a label.

  With best_iou / best_gt the max / first argmax of an anchor's IoU over the valid GT:
  label 0 (negative) if best_iou < negative_iou, else -1 (ignore) if best_iou < positive_iou,
  else 1 (positive). Best matching then makes positive, for every valid GT g whose max IoU over all
  anchors q_g satisfies q_g > 0 and q_g >= best_match_threshold, every anchor whose IoU with g
  equals q_g exactly (all ties), whatever its IoU. Such an anchor keeps its own best_gt as its match
  (which in rare overlaps is not g: the authors' / torchvision's quirk). best_match_threshold = +inf
  (hparams.BEST_MATCH_OFF) or None turns it off; 0.0 is the authors' default (any overlap), 0.5
  plain RetinaNet, 0.4 Detectron.

  Padded GT rows (gt_valid False) count as IoU -1 in both maxima, so they never match and never
  create best matches; rows after the last valid one are not visited at all, so the cost is one pass
  over the anchors per GT up to the last valid row (padding at the end is free). An image without
  valid GT gets all anchors negative and matched_gt 0. No gradient flows through the matching.

  Args:
    anchors: [A, 4] float32 xyxy.
    gt_boxes: [G, 4] float32 xyxy (padded rows arbitrary).
    gt_valid: [G] bool.
    positive_iou, negative_iou, best_match_threshold: float32 scalars, possibly traced.
  Returns:
    matched_gt: [A] int32 in [0, G), the anchor's best valid GT (0 when there is none).
    labels: [A] int32 in {1, 0, -1}.
  """
  if best_match_threshold is None:
    best_match_threshold = math.inf
  anchors = jax.lax.stop_gradient(jnp.asarray(anchors, jnp.float32))
  gt_boxes = jax.lax.stop_gradient(jnp.asarray(gt_boxes, jnp.float32))
  gt_valid = jnp.asarray(gt_valid, bool)
  num_gt = gt_boxes.shape[0]
  # One pass over the anchors per GT row, up to the last valid row: the cost follows the real GT count,
  # not the padded G (a dense [A, G] matrix at G = 100 slots for 4 real boxes was ~40 ms per 512x512
  # image on 2 CPU cores; this is ~1 ms). Each row's IoUs are computed once and used for both maxima
  # and the tie test, so "exact float equality" compares the very values the max was taken over (two
  # XLA fusions recomputing the same IoU could round differently and drop ties).
  num_rows = jnp.max(jnp.where(gt_valid, jnp.arange(1, num_gt + 1), 0))

  def one_gt(g: jnp.ndarray, carry: tuple[jnp.ndarray, ...]) -> tuple[jnp.ndarray, ...]:
    best_iou, matched_gt, is_best = carry
    valid = gt_valid[g]
    # -1 (below any IoU) on padded rows: a valid GT with IoU 0 still beats padding.
    iou = jnp.where(valid, box_iou(anchors, jax.lax.dynamic_slice_in_dim(gt_boxes, g, 1))[:, 0], -1.0)
    better = iou > best_iou  # strict: the first GT wins ties, as torch.max
    best_iou = jnp.where(better, iou, best_iou)
    matched_gt = jnp.where(better, g, matched_gt)
    gt_best = jnp.max(iou)
    takes_part = valid & (gt_best > 0) & (gt_best >= best_match_threshold)
    is_best = is_best | ((iou == gt_best) & takes_part)  # every tied anchor counts
    return best_iou, matched_gt, is_best

  num_anchors = anchors.shape[0]
  init = (
      jnp.full((num_anchors,), -1.0, jnp.float32),
      jnp.zeros((num_anchors,), jnp.int32),
      jnp.zeros((num_anchors,), bool),
  )
  best_iou, matched_gt, is_best = jax.lax.fori_loop(0, num_rows, one_gt, init)
  labels = jnp.where(
      best_iou < negative_iou, NEGATIVE, jnp.where(best_iou < positive_iou, IGNORE, POSITIVE)
  )
  labels = jnp.where(is_best, POSITIVE, labels).astype(jnp.int32)
  return matched_gt, labels
