"""Mask branch ops: proposals and targets (jnp, in the train step); pasting and RLE (numpy, host).

Training (authors_code_spec.md 5.1, 5.2; DESIGN.md 4, 5):
  - `mask_proposals`: detections + all GT boxes, each matched to its max-IoU GT, positive at
    IoU >= 0.5.
  - `mask_targets`: each proposal's S x S binary target, bilinearly resampled from its matched GT's
    M x M box-relative crop and thresholded at 0.5 (a documented deviation from the authors'
    per-proposal polygon rasterization, spec 10: same result up to resampling, and it runs on the
    accelerator).
Inference (spec 5.6):
  - `paste_masks`: the authors' Masker adapted to continuous coordinates.
  - `encode_rle`: COCO RLE via pycocotools.

Crop convention (shared with `data/transforms.masks_to_crops`): crop pixel (i, j) of a GT box
(x1, y1, x2, y2) covers the image rectangle [x1 + j * bw / M, x1 + (j + 1) * bw / M] x
[y1 + i * bh / M, y1 + (i + 1) * bh / M], so its centre is at (x1 + (j + 0.5) * bw / M, ...).
Image pixel (r, c) covers [c, c + 1) x [r, r + 1), centre (c + 0.5, r + 0.5), as in pycocotools'
rasterization.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from retinamask_jax.ops.boxes import box_iou

# Boxes thinner than this (pixels) are treated as empty when dividing by their size.
_MIN_SIZE = 1e-6
# paste_masks works on chunks of detections whose padded box regions hold at most this many values.
_PASTE_CHUNK_VALUES = 1 << 24


# ---------------------------------------------------------------------------------------- training


def mask_proposals(
    det_boxes: jnp.ndarray,
    det_valid: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_classes: jnp.ndarray,
    *,
    iou_threshold: float | jnp.ndarray = 0.5,
    max_proposals: int = 0,
) -> dict[str, jnp.ndarray]:
  """The mask head's training proposals: detections + GT boxes, matched to the GT (spec 5.1, 5.2).

  Proposal p of image n (the D detections, then the G GT rows) is valid when its detection is valid
  or its GT row is real (gt_classes > 0). A valid proposal is matched to its max-IoU real GT (first
  index on ties) and is positive when that IoU >= iou_threshold (Matcher(0.5, 0.5) without
  low-quality matches). Padded GT rows never match; an image without GT has no positives.

  Args:
    det_boxes: [N, D, 4] float32 xyxy canvas pixels (detached by the caller; stop_gradient is
      applied anyway).
    det_valid: [N, D] bool.
    gt_boxes: [N, G, 4] float32 xyxy.
    gt_classes: [N, G] int32, 0 = padding.
    iou_threshold: float32 scalar, may be traced.
    max_proposals: static. 0 (or >= D + G) keeps all D + G proposals in their order. Otherwise
      R = max_proposals per image are kept, positives first (each group in its original order):
      a cap for speed, since only positives carry mask loss.
  Returns:
    dict with
      boxes: [N, R, 4] float32 proposal boxes.
      gt_index: [N, R] int32, the matched GT row where positive, 0 elsewhere.
      classes: [N, R] int32, the matched GT's class where positive, 0 elsewhere.
      positive: [N, R] bool.
      num_positive_dropped: [N] int32, positives beyond the cap (0 when nothing binds), for logging.
  """
  det_boxes = jnp.asarray(det_boxes, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  gt_classes = jnp.asarray(gt_classes, jnp.int32)
  boxes = jax.lax.stop_gradient(jnp.concatenate([det_boxes, gt_boxes], axis=1))  # [N, P, 4]
  gt_real = gt_classes > 0
  valid = jnp.concatenate([jnp.asarray(det_valid, bool), gt_real], axis=1)  # [N, P]

  match_boxes, match_classes, match_real = gt_boxes, gt_classes, gt_real
  if gt_boxes.shape[1] == 0:
    # No GT slots at all: match against one padding row so the reductions below have something to
    # reduce.
    match_boxes = jnp.zeros((gt_boxes.shape[0], 1, 4), jnp.float32)
    match_classes = jnp.zeros((gt_boxes.shape[0], 1), jnp.int32)
    match_real = match_classes > 0
  iou = jax.vmap(box_iou)(boxes, jax.lax.stop_gradient(match_boxes))  # [N, P, G]
  # -1 on padded columns: below any real IoU, so padding never wins the max nor the argmax.
  iou = jnp.where(match_real[:, None, :], iou, -1.0)
  best_iou = jnp.max(iou, axis=2)
  best_gt = jnp.argmax(iou, axis=2).astype(jnp.int32)  # first index on ties
  positive = valid & (best_iou >= iou_threshold)
  gt_index = jnp.where(positive, best_gt, 0)
  classes = jnp.where(positive, jnp.take_along_axis(match_classes, gt_index, axis=1), 0)

  num_props = boxes.shape[1]
  num_pos = jnp.sum(positive, axis=1, dtype=jnp.int32)
  if max_proposals <= 0 or max_proposals >= num_props:
    dropped = jnp.zeros(num_pos.shape, jnp.int32)
  else:
    # A stable sort on "not positive" puts the positives first and keeps each group's order.
    order = jnp.argsort((~positive).astype(jnp.int32), axis=1, stable=True)[:, :max_proposals]
    boxes = jnp.take_along_axis(boxes, order[..., None], axis=1)
    gt_index = jnp.take_along_axis(gt_index, order, axis=1)
    classes = jnp.take_along_axis(classes, order, axis=1)
    positive = jnp.take_along_axis(positive, order, axis=1)
    dropped = jnp.maximum(num_pos - max_proposals, 0)
  return dict(
      boxes=boxes,
      gt_index=gt_index,
      classes=classes,
      positive=positive,
      num_positive_dropped=dropped,
  )


def _crop_taps(
    p_lo: jnp.ndarray, p_hi: jnp.ndarray, g_lo: jnp.ndarray, g_hi: jnp.ndarray, m: int, s: int
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Along one axis: where the S sample centres of each proposal fall in its GT's M-pixel crop.

  Args:
    p_lo, p_hi: [N, R] proposal extent; g_lo, g_hi: [N, R] matched GT extent (image pixels).
  Returns:
    lo, hi: [N, R, S] int32 crop indices.
    w_lo, w_hi: [N, R, S] float32 bilinear weights, zero for samples outside [g_lo, g_hi).
  """
  t = (np.arange(s, dtype=np.float32) + 0.5) / np.float32(s)
  x = p_lo[..., None] + t * (p_hi - p_lo)[..., None]  # sample centres in image pixels
  inside = (x >= g_lo[..., None]) & (x < g_hi[..., None])
  size = jnp.maximum(g_hi - g_lo, _MIN_SIZE)[..., None]
  # Crop pixel j has its centre at g_lo + (j + 0.5) * size / M, i.e. at continuous index j; points
  # in the outer half pixel of the crop read the edge pixel (clamp), as bilinear resizing does.
  u = jnp.clip((x - g_lo[..., None]) * (m / size) - 0.5, 0.0, m - 1.0)
  lo = jnp.floor(u)
  frac = u - lo
  hi = jnp.minimum(lo + 1.0, m - 1.0)
  inside = inside.astype(jnp.float32)
  return lo.astype(jnp.int32), hi.astype(jnp.int32), (1.0 - frac) * inside, frac * inside


def mask_targets(
    gt_masks: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    proposal_boxes: jnp.ndarray,
    gt_index: jnp.ndarray,
    resolution: int = 28,
) -> jnp.ndarray:
  """Binary S x S mask targets of proposals, resampled from their matched GT's crop (DESIGN.md 4).

  Target pixel (i, j) of a proposal (x1, y1, x2, y2) is the GT crop's bilinear value at the image
  point (x1 + (j + 0.5) * (x2 - x1) / S, y1 + (i + 0.5) * (y2 - y1) / S), 0 when that point is
  outside the GT box [gx1, gx2) x [gy1, gy2), then thresholded: 1 where the value >= 0.5. Inside the
  GT box, crop pixel (a, b) sits at continuous crop coordinates (a, b) (see the module docstring),
  clamped at the crop's edges. A proposal equal to its GT box with M = S reproduces the crop
  exactly.

  Args:
    gt_masks: [N, G, M, M] uint8 (or bool/float) in {0, 1}: each GT's mask cropped to its box,
      resized to M x M.
    gt_boxes: [N, G, 4] float32 xyxy canvas pixels.
    proposal_boxes: [N, R, 4] float32 xyxy canvas pixels.
    gt_index: [N, R] int32 in [0, G), the GT each proposal is matched to (rows of non-positives are
      ignored by the loss; any in-range index works).
    resolution: S, static.
  Returns:
    [N, R, S, S] float32 in {0, 1}.
  """
  gt_masks = jnp.asarray(gt_masks)
  n, g, m, _ = gt_masks.shape
  s = resolution
  r = proposal_boxes.shape[1]
  gt_index = jnp.clip(jnp.asarray(gt_index, jnp.int32), 0, max(g - 1, 0))
  props = jax.lax.stop_gradient(jnp.asarray(proposal_boxes, jnp.float32))
  gt_boxes = jax.lax.stop_gradient(jnp.asarray(gt_boxes, jnp.float32))
  gb = jnp.take_along_axis(gt_boxes, gt_index[..., None], axis=1)  # [N, R, 4]

  ylo, yhi, wylo, wyhi = _crop_taps(props[..., 1], props[..., 3], gb[..., 1], gb[..., 3], m, s)
  xlo, xhi, wxlo, wxhi = _crop_taps(props[..., 0], props[..., 2], gb[..., 0], gb[..., 2], m, s)

  # One flat [N, G * M * M] table per image; four corner gathers of [N, R * S * S] each.
  table = gt_masks.reshape(n, g * m * m).astype(jnp.float32)
  base = (gt_index * (m * m))[..., None, None]  # [N, R, 1, 1]

  def corner(rows, cols, wy, wx):
    idx = base + rows[..., :, None] * m + cols[..., None, :]  # [N, R, S, S]
    vals = jnp.take_along_axis(table, idx.reshape(n, r * s * s), axis=1).reshape(n, r, s, s)
    return vals * (wy[..., :, None] * wx[..., None, :])

  value = (
      corner(ylo, xlo, wylo, wxlo)
      + corner(ylo, xhi, wylo, wxhi)
      + corner(yhi, xlo, wyhi, wxlo)
      + corner(yhi, xhi, wyhi, wxhi)
  )
  return (value >= 0.5).astype(jnp.float32)


# --------------------------------------------------------------------------------------- inference


def _paste_support(
    lo: np.ndarray, hi: np.ndarray, s: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
  """First image pixel and pixel count a mask can touch along one axis, clipped to [0, length).

  Mask pixel k of a box [lo, hi] has its centre at lo + (k + 0.5) * (hi - lo) / S, and the zero ring
  of the padded map one mask pixel further out, so values can be nonzero only for pixel centres
  strictly inside (lo - pitch / 2, hi + pitch / 2), pitch = (hi - lo) / S. Empty (zero or negative
  size) boxes touch nothing.

  Args:
    lo, hi: [B] float64 box extent along the axis (image pixels).
  Returns:
    first, count: [B] int64.
  """
  size = hi - lo
  nonempty = size > 0
  pitch = np.where(nonempty, size, 1.0) / s
  first = np.clip(np.floor(lo - 0.5 * pitch - 0.5), 0, length)
  last = np.clip(np.ceil(hi + 0.5 * pitch - 0.5), -1, length - 1)
  count = np.where(nonempty, np.maximum(last - first + 1, 0), 0)
  return first.astype(np.int64), count.astype(np.int64)


def _paste_axis(
    lo: np.ndarray, hi: np.ndarray, s: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
  """Along one axis: the image pixels a mask can touch and their weights over the S mask pixels.

  The weight of mask pixel k at image pixel centre c + 0.5 is the hat function max(0, 1 - |u - k|)
  with u = (c + 0.5 - lo) * S / (hi - lo) - 0.5: bilinear interpolation of the authors' zero-padded
  (S + 2) map.

  Args:
    lo, hi: [B] float64 box extent along the axis (image pixels).
  Returns:
    pix: [B, L] int64 image pixel indices, L = the widest support in the batch (at least 1); padding
      entries point at `length`, a dump row/column the caller slices off.
    weights: [B, L, S] float64, zero on padding entries.
  """
  first, count = _paste_support(lo, hi, s, length)
  num = max(int(count.max(initial=0)), 1)
  pix = first[:, None] + np.arange(num)[None, :]
  valid = np.arange(num)[None, :] < count[:, None]
  size = hi - lo
  pitch = np.where(size > 0, size, 1.0) / s
  u = (pix + 0.5 - lo[:, None]) / pitch[:, None] - 0.5  # [B, L]
  weights = np.maximum(0.0, 1.0 - np.abs(u[:, :, None] - np.arange(s)[None, None, :]))
  weights *= valid[:, :, None]
  return np.where(valid, pix, length), weights


def paste_masks(
    masks: np.ndarray,
    boxes: np.ndarray,
    image_hw: tuple[int, int],
    threshold: float = 0.5,
) -> np.ndarray:
  """Pastes S x S mask probabilities into an image: the authors' Masker in continuous coordinates.

  Rule (spec 5.6 adapted): the S x S map is zero-padded to (S + 2) x (S + 2) and stretched over the
  box expanded by (S + 2) / S about its centre, so mask pixel (i, j) is centred at
  (x1 + (j + 0.5) * bw / S, y1 + (i + 0.5) * bh / S) and the zero ring one mask pixel further out.
  Image pixel (r, c) takes the bilinear value of that padded map at its centre (c + 0.5, r + 0.5),
  i.e. sum_ij m[i, j] * hat(v - i) * hat(u - j) with u = (c + 0.5 - x1) * S / bw - 0.5,
  v = (r + 0.5 - y1) * S / bh - 0.5, hat(t) = max(0, 1 - |t|), and is foreground where that value
  > threshold. Pixels outside the image are dropped (clipping); a box with zero width or height
  pastes nothing. With a uniform mask of ones the value crosses 0.5 at the box edges, so the pasted
  region is the pixels whose centres lie inside the box (a sub-pixel box holding no pixel centre
  pastes nothing).

  Deviations from the authors (whose boxes are inclusive-integer): no int truncation of the expanded
  box, and point sampling instead of PIL's bilinear resize, which also averages (antialiases) when
  a box is smaller than S + 2 pixels. The work is separable: per detection, [rows, S] and [cols, S]
  weight matrices over the box's support only (not the whole image), batched over detections.

  Args:
    masks: [D, S, S] float probabilities.
    boxes: [D, 4] float xyxy in original-image pixels.
    image_hw: (h, w) of the original image.
    threshold: foreground where the interpolated probability > threshold.
  Returns:
    [D, h, w] bool.
  """
  masks = np.asarray(masks, np.float64)
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  h, w = int(image_hw[0]), int(image_hw[1])
  d = masks.shape[0]
  if boxes.shape[0] != d:
    raise ValueError(f'{d} masks but {boxes.shape[0]} boxes')
  s = masks.shape[1]
  # One extra row and column take the writes of padding entries; sliced off at the end.
  out = np.zeros((d, h + 1, w + 1), bool)
  # Detections are processed in chunks whose padded box regions hold at most _PASTE_CHUNK_VALUES
  # values: vectorized, but a few image-sized boxes among many small ones cannot blow up memory.
  budget = _PASTE_CHUNK_VALUES
  _, hcount = _paste_support(boxes[:, 1], boxes[:, 3], s, h)
  _, wcount = _paste_support(boxes[:, 0], boxes[:, 2], s, w)
  hcount = np.maximum(hcount, 1)
  wcount = np.maximum(wcount, 1)
  start = 0
  while start < d:
    stop = start + 1
    hmax, wmax = hcount[start], wcount[start]
    while stop < d:
      hm, wm = max(hmax, hcount[stop]), max(wmax, wcount[stop])
      if (stop + 1 - start) * hm * wm > budget:
        break
      hmax, wmax, stop = hm, wm, stop + 1
    b = boxes[start:stop]
    rows, wy = _paste_axis(b[:, 1], b[:, 3], s, h)  # [B, Hb], [B, Hb, S]
    cols, wx = _paste_axis(b[:, 0], b[:, 2], s, w)  # [B, Wb], [B, Wb, S]
    values = wy @ masks[start:stop] @ np.swapaxes(wx, 1, 2)  # [B, Hb, Wb]
    chunk = np.arange(stop - start)[:, None, None]
    out[start + chunk, rows[:, :, None], cols[:, None, :]] = values > threshold
    start = stop
  return out[:, :h, :w]


def encode_rle(masks: np.ndarray) -> list[dict]:
  """COCO RLEs of binary masks, JSON-ready.

  Args:
    masks: [D, h, w] bool (or {0, 1} integers).
  Returns:
    D dicts {'size': [h, w], 'counts': str}: pycocotools' compressed RLEs, counts decoded to
    ASCII.
  """
  from pycocotools import mask as mask_utils

  masks = np.asarray(masks)
  if masks.shape[0] == 0:
    return []
  rles = mask_utils.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
  for rle in rles:
    rle['counts'] = rle['counts'].decode('ascii')
  return rles
