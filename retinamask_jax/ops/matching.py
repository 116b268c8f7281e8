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

  Padded GT rows (gt_valid False) are masked out of the IoU matrix before both maxima, so they never
  match and never create best matches. An image without valid GT gets all anchors negative and
  matched_gt 0.

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
  gt_valid = jnp.asarray(gt_valid, bool)
  # -1 (below any IoU) on padded columns: a valid GT with IoU 0 still wins the argmax over padding.
  iou = jnp.where(gt_valid[None, :], box_iou(anchors, gt_boxes), -1.0)  # [A, G]
  iou = jax.lax.stop_gradient(iou)
  best_iou = jnp.max(iou, axis=1)  # [A]
  matched_gt = jnp.argmax(iou, axis=1).astype(jnp.int32)  # first index on ties, as torch.max
  labels = jnp.where(
      best_iou < negative_iou, NEGATIVE, jnp.where(best_iou < positive_iou, IGNORE, POSITIVE)
  ).astype(jnp.int32)

  gt_best = jnp.max(iou, axis=0)  # [G]; -1 on padded columns
  takes_part = gt_valid & (gt_best > 0) & (gt_best >= best_match_threshold)
  # Exact float equality against the same matrix: every tied anchor counts.
  is_best = jnp.any((iou == gt_best[None, :]) & takes_part[None, :], axis=1)  # [A]
  labels = jnp.where(is_best, POSITIVE, labels).astype(jnp.int32)
  return matched_gt, labels
