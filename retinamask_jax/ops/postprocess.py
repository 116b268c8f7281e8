"""Detections from the RetinaNet head outputs (authors_code_spec.md 6; DESIGN.md 4, 5).

The same function serves inference and, under `jax.lax.stop_gradient` in the caller, the
training-time mask proposals (spec 5.1), so it is built from a few large ops: one sigmoid, one
`lax.top_k` per level over the flattened [A_l * K] (anchor, class) scores, a gather and decode of
the selected pairs, and one class-wise `batched_nms` per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from retinamask_jax.ops.boxes import BOX_WEIGHTS, MAX_LOG_RATIO, clip_boxes, decode_boxes
from retinamask_jax.ops.nms import batched_nms

__all__ = ['postprocess_detections']


def postprocess_detections(
    cls_logits: jax.Array,
    box_deltas: jax.Array,
    anchors: jax.Array,
    anchors_per_level: Sequence[int],
    image_size: jax.Array,
    *,
    score_threshold: float | jax.Array = 0.05,
    pre_nms_top_k: int = 1000,
    nms_iou: float | jax.Array = 0.4,
    max_detections: int = 100,
    box_weights: Sequence[float] = BOX_WEIGHTS,
    max_log_ratio: float = MAX_LOG_RATIO,
) -> dict[str, jax.Array]:
  """RetinaNet post-processing (spec 6): candidates per level, decode, clip, class-wise NMS.

  Per image: scores = sigmoid(logits); candidates are the (anchor, class) pairs with
  score > score_threshold (strict); per level, the top min(#candidates, pre_nms_top_k) pairs by
  score are kept (one anchor can give several classes); each is decoded from its anchor's
  class-agnostic deltas and clipped to the image's true size [0, w] x [0, h]; the levels are merged;
  class-wise greedy NMS suppresses IoU > nms_iou; the best max_detections survivors are returned,
  by score descending. The score is the raw sigmoid of the class (no objectness). Gradients are not
  stopped here.

  Differences from the authors' code, inherent to static shapes:
  - Pairs tied in score at the per-level top-k boundary: the lower (anchor, class) index wins
    (torch's topk leaves it unspecified).
  - Exactly max_detections are kept; the authors keep every detection tied with the
    max_detections-th score (kthvalue), so they can return a few more.
  - When nothing survives, all rows are invalid (valid False); the authors emit one dummy
    detection [0, 0, 0, 0], class 1, score 0.01, which matches nothing and never counts.
  - remove_small_boxes(min_size=0) removes nothing and is omitted.

  Args:
    cls_logits: [N, A, K] float32 or bfloat16, levels concatenated in (level, y, x, anchor) order.
    box_deltas: [N, A, 4] float32 or bfloat16, same order.
    anchors: [A, 4] float, xyxy.
    anchors_per_level: static tuple of ints, A_l per level; sums to A.
    image_size: [N, 2] int32 (h, w), the true image size after resize (boxes are clipped to it).
    score_threshold: float or traced float32 scalar.
    pre_nms_top_k: static int, candidates kept per level.
    nms_iou: float or traced float32 scalar.
    max_detections: static int, D.
    box_weights: (wx, wy, ww, wh) of the box coder.
    max_log_ratio: upper clamp of the decoded log width/height ratios.

  Returns:
    dict with boxes [N, D, 4] float32 (xyxy), scores [N, D] float32, classes [N, D] int32 in 1..K,
    valid [N, D] bool; sorted by score descending (valid rows first); invalid rows are all zero.
  """
  n, a, k = cls_logits.shape
  anchors_per_level = tuple(int(x) for x in anchors_per_level)
  consistent = sum(anchors_per_level) == a and box_deltas.shape == (n, a, 4)
  if a == 0 or not consistent or anchors.shape != (a, 4):
    raise ValueError(
        f'inconsistent shapes: cls_logits {cls_logits.shape}, box_deltas {box_deltas.shape}, '
        f'anchors {anchors.shape}, anchors_per_level {anchors_per_level}')
  scores = jax.nn.sigmoid(cls_logits.astype(jnp.float32))
  box_deltas = box_deltas.astype(jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  threshold = jnp.asarray(score_threshold, jnp.float32)
  image_size = jnp.asarray(image_size)

  level_boxes, level_scores, level_classes = [], [], []
  for level, count in enumerate(anchors_per_level):  # static: levels are structure, not data
    if count == 0:
      continue
    start = sum(anchors_per_level[:level])
    stop = start + count
    flat = scores[:, start:stop, :].reshape(n, count * k)
    # Pairs at or below the threshold become -inf, which batched_nms never selects.
    masked = jnp.where(flat > threshold, flat, -jnp.inf)
    top, pair = lax.top_k(masked, min(pre_nms_top_k, count * k))
    anchor = pair // k
    deltas = jnp.take_along_axis(box_deltas[:, start:stop], anchor[..., None], axis=1)
    boxes = decode_boxes(deltas, anchors[start:stop][anchor], box_weights, max_log_ratio)
    level_boxes.append(clip_boxes(boxes, image_size[:, None, :]))
    level_scores.append(top)
    level_classes.append((pair % k + 1).astype(jnp.int32))
  boxes = jnp.concatenate(level_boxes, axis=1)  # [N, C, 4]
  cand_scores = jnp.concatenate(level_scores, axis=1)  # [N, C]
  classes = jnp.concatenate(level_classes, axis=1)  # [N, C]

  nms = lambda b, s, c: batched_nms(b, s, c, nms_iou, max_detections)
  keep = jax.vmap(nms)(boxes, cand_scores, classes)  # [N, D]
  valid = keep >= 0
  index = jnp.maximum(keep, 0)
  take = lambda x: jnp.take_along_axis(x, index, axis=1)
  boxes = jnp.take_along_axis(boxes, index[..., None], axis=1)
  return dict(
      boxes=jnp.where(valid[..., None], boxes, 0.0),
      scores=jnp.where(valid, take(cand_scores), 0.0),
      classes=jnp.where(valid, take(classes), 0),
      valid=valid,
  )
