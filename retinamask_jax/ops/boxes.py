"""Box primitives: area, IoU, clipping and the RetinaNet box coder (authors_code_spec.md 3.2, 4.3).

Boxes are continuous xyxy floats: (x1, y1, x2, y2), area = (x2 - x1) * (y2 - y1), no +1 pixel.
This is the authors' +1 convention translated exactly (their inclusive x2 is our x2 - 1), so IoU
and the coder reproduce theirs. Everything is plain jnp, shape-polymorphic over leading
dimensions, and safe under jit/vmap/grad.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp

# Box-coder weights (wx, wy, ww, wh) and the dw/dh clamp of the authors' RetinaNet (spec 1.1, 4.3).
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
MAX_LOG_RATIO = math.log(1000.0 / 16.0)

# Widths/heights are clamped at this before division/log so that degenerate rows (e.g. all-zero
# padded GT) encode to finite values: a NaN in an entry that is later masked with jnp.where still
# poisons gradients. No real box is this thin (float32 resolution at 1000 px is ~6e-5).
_MIN_SIZE = 1e-6


def _float_dtype(*xs) -> jnp.dtype:
  # At least float32 (bf16 inputs are computed in float32), float64 kept when x64 is on.
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
  """Area of xyxy boxes; negative extents count as 0.

  Args:
    boxes: [..., 4] float.
  Returns:
    [...] float (at least float32).
  """
  boxes = jnp.asarray(boxes)
  boxes = boxes.astype(_float_dtype(boxes))
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return w * h


def box_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Pairwise IoU of two sets of xyxy boxes (stable public API, DESIGN.md 8).

  Args:
    a: [M, 4] float.
    b: [K, 4] float.
  Returns:
    [M, K] float32 (float64 under x64 with float64 inputs); 0 where the union is 0 (never NaN).
  """
  a = jnp.asarray(a)
  b = jnp.asarray(b)
  dtype = _float_dtype(a, b)
  a = a.astype(dtype)
  b = b.astype(dtype)
  area_a = box_area(a)  # [M]
  area_b = box_area(b)  # [K]
  # Written per coordinate (not as [M, K, 2] stacks) so XLA fuses it into one [M, K] pass.
  iw = jnp.maximum(
      jnp.minimum(a[:, None, 2], b[None, :, 2]) - jnp.maximum(a[:, None, 0], b[None, :, 0]), 0.0
  )
  ih = jnp.maximum(
      jnp.minimum(a[:, None, 3], b[None, :, 3]) - jnp.maximum(a[:, None, 1], b[None, :, 1]), 0.0
  )
  inter = iw * ih
  union = area_a[:, None] + area_b[None, :] - inter
  positive = union > 0
  # The safe denominator keeps the unselected branch finite, so gradients stay finite too.
  return jnp.where(positive, inter / jnp.where(positive, union, 1.0), 0.0)


def clip_boxes(boxes: jnp.ndarray, image_size: jnp.ndarray) -> jnp.ndarray:
  """Clip xyxy boxes to [0, w] x [0, h].

  Args:
    boxes: [..., 4] float.
    image_size: [..., 2] (h, w), int or float; its leading dims must broadcast against boxes'
      leading dims with numpy rules (e.g. boxes [N, D, 4] with image_size [N, 1, 2], or one [2]).
  Returns:
    [..., 4] with boxes' dtype (at least float32).
  """
  boxes = jnp.asarray(boxes)
  boxes = boxes.astype(_float_dtype(boxes))
  size = jnp.asarray(image_size).astype(boxes.dtype)
  h = size[..., 0]
  w = size[..., 1]
  x1 = jnp.clip(boxes[..., 0], 0.0, w)
  y1 = jnp.clip(boxes[..., 1], 0.0, h)
  x2 = jnp.clip(boxes[..., 2], 0.0, w)
  y2 = jnp.clip(boxes[..., 3], 0.0, h)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


def _centre_size(boxes: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode_boxes(
    boxes: jnp.ndarray, anchors: jnp.ndarray, weights: Sequence[float] = BOX_WEIGHTS
) -> jnp.ndarray:
  """Regression targets of `boxes` relative to `anchors` (spec 4.3 in continuous coordinates).

  dx = wx (gcx - acx) / aw, dy = wy (gcy - acy) / ah, dw = ww log(gw / aw), dh = wh log(gh / ah).
  Widths and heights are clamped at 1e-6 first, so degenerate boxes (zero-size, inverted, all-zero
  padding) give large but finite deltas.

  Args:
    boxes: [..., 4] float, the target boxes.
    anchors: [..., 4] float, broadcastable against boxes.
    weights: (wx, wy, ww, wh), Python floats or traced scalars.
  Returns:
    deltas: [..., 4] float32 (at least).
  """
  boxes = jnp.asarray(boxes)
  anchors = jnp.asarray(anchors)
  dtype = _float_dtype(boxes, anchors)
  gcx, gcy, gw, gh = _centre_size(boxes.astype(dtype))
  acx, acy, aw, ah = _centre_size(anchors.astype(dtype))
  gw = jnp.maximum(gw, _MIN_SIZE)
  gh = jnp.maximum(gh, _MIN_SIZE)
  aw = jnp.maximum(aw, _MIN_SIZE)
  ah = jnp.maximum(ah, _MIN_SIZE)
  wx, wy, ww, wh = weights
  return jnp.stack(
      [
          wx * (gcx - acx) / aw,
          wy * (gcy - acy) / ah,
          ww * jnp.log(gw / aw),
          wh * jnp.log(gh / ah),
      ],
      axis=-1,
  )


def decode_boxes(
    deltas: jnp.ndarray,
    anchors: jnp.ndarray,
    weights: Sequence[float] = BOX_WEIGHTS,
    max_log_ratio: float = MAX_LOG_RATIO,
) -> jnp.ndarray:
  """Boxes from regression deltas (inverse of `encode_boxes`), dw/dh clamped from above (spec 4.3).

  Args:
    deltas: [..., 4] float (bf16 is computed in float32).
    anchors: [..., 4] float, broadcastable against deltas.
    weights: (wx, wy, ww, wh).
    max_log_ratio: upper clamp of dw / ww and dh / wh (log(1000/16) in the authors' code).
  Returns:
    [..., 4] float32 (at least) xyxy boxes, not clipped.
  """
  deltas = jnp.asarray(deltas)
  anchors = jnp.asarray(anchors)
  dtype = _float_dtype(deltas, anchors)
  deltas = deltas.astype(dtype)
  acx, acy, aw, ah = _centre_size(anchors.astype(dtype))
  wx, wy, ww, wh = weights
  dx = deltas[..., 0] / wx
  dy = deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, max_log_ratio)
  dh = jnp.minimum(deltas[..., 3] / wh, max_log_ratio)
  cx = dx * aw + acx
  cy = dy * ah + acy
  half_w = 0.5 * jnp.exp(dw) * aw
  half_h = 0.5 * jnp.exp(dh) * ah
  return jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)
