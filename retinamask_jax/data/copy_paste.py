"""Copy-paste augmentation (Ghiasi et al. 2021, "Simple Copy-Paste"): a training image gets the objects of another.

A short run from scratch is limited by how many instances its classifier sees (BENCHMARKS.md, "Denser training
images"): training on images with more objects teaches more per step at the same step cost. Copy-paste makes any
COCO-format dataset denser without generating it so: the instances of a source image (another training image of
the same orientation group) are cut out along their masks and pasted onto the destination image, at the scale
they have in their own image after the training resize (both images are resized to the same short side, so the
source is scaled by dst_short / src_short) and at a random offset. The destination's instances lose the pixels
the pasted ones cover: their masks shrink, their boxes become the remaining masks' tight boxes, and one left
with less than `min_visible` of its pixels is dropped (as the shapes generator drops a shape under half visible).
Pasted instances cut by the destination's border obey the same rule. Crowd regions are not pasted and keep
their place in the destination (they are ignore regions, not objects).

Cost: masks are handled over the whole image, one bool plane per instance of either image (~10 ms per image of
256-384 px, ~35 ms at 480 x 640 with ~7 instances each; memory instances x pixels, e.g. 30 MB for 100 instances of a
640 x 480 image). Working on the pasted window only is the next step for large photos.

Everything here is a pure function of its inputs and the numpy Generator it is given: the pipeline keys that
Generator on (seed, batch index, row), so pasting is the same after a resume and for any number of workers or
processes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from retinamask_jax.data import transforms as T
from retinamask_jax.data.coco import ImageRecord


def full_masks(record: ImageRecord) -> np.ndarray:
  """Every non-crowd instance's mask over the whole image: bool [n, height, width].

  A segmentation of None (no mask) is its filled box, as in `transforms.masks_to_crops`; one that cannot be
  decoded is its filled box too (reported once).
  """
  h, w = record.height, record.width
  out = np.zeros((len(record.boxes), h, w), bool)
  for k, (seg, box) in enumerate(zip(record.segmentations, record.boxes)):
    if seg is not None:
      try:
        out[k] = T.full_mask(seg, h, w)
        continue
      except Exception as e:  # noqa: BLE001  (pycocotools raises various errors on corrupt RLE)
        T.report_once('bad_mask', (record.file_name, k), '%s: instance %d: cannot decode its segmentation (%s); '
                      'filled box', record.file_name, k, e)
    x0, y0, x1, y1 = T.crop_window(np.asarray(box, np.float64), h, w)
    out[k, y0:y1, x0:x1] = True
  return out


def mask_boxes(masks: np.ndarray) -> np.ndarray:
  """Tight continuous xyxy boxes of bool masks [n, h, w] (pixel p covers [p, p + 1)): float32 [n, 4].

  An empty mask gets a zero box.
  """
  boxes = np.zeros((len(masks), 4), np.float32)
  for k, m in enumerate(masks):
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if len(rows):
      boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
  return boxes


def _resize_nearest(masks: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
  """bool [n, h, w] -> bool [n, H, W], each pixel taking the source pixel its centre falls in."""
  h, w = masks.shape[1:]
  ys = np.minimum(((np.arange(size_hw[0]) + 0.5) * h / size_hw[0]).astype(np.int64), h - 1)
  xs = np.minimum(((np.arange(size_hw[1]) + 0.5) * w / size_hw[1]).astype(np.int64), w - 1)
  return masks[:, ys][:, :, xs]


def _offset(rng: np.random.Generator, src: int, dst: int) -> int:
  """Where the source's first row (column) lands: uniform over the placements where the two overlap fully on
  this axis (the smaller one inside the larger)."""
  lo, hi = min(0, dst - src), max(0, dst - src)
  return int(rng.integers(lo, hi + 1))


def paste(
  dst: ImageRecord,
  dst_image: np.ndarray,
  src: ImageRecord,
  src_image: np.ndarray,
  rng: np.random.Generator,
  *,
  min_visible: float = 0.5,
) -> tuple[ImageRecord, np.ndarray]:
  """Pastes all of `src`'s non-crowd instances onto `dst` (see the module docstring).

  dst_image / src_image: uint8 [h, w, 3] of the records (their JSON sizes). rng: decides the offset.
  min_visible: in (0, 1], the fraction of an instance's pixels that must stay visible for it to be kept.
  Returns the new record (segmentations of the instances kept are full-image bool masks [h, w], boxes their
  tight boxes; ann_ids of pasted instances are -1) and the composite uint8 image, a new array. With nothing to
  paste, returns `dst` and `dst_image` unchanged.
  """
  if len(src.boxes) == 0:
    return dst, dst_image
  h, w = dst.height, dst.width
  scale = min(h, w) / min(src.height, src.width)
  sh, sw = max(1, round(src.height * scale)), max(1, round(src.width * scale))
  src_masks = _resize_nearest(full_masks(src), (sh, sw))
  pixels_before = src_masks.sum((1, 2))
  scaled = src_image if (sh, sw) == src_image.shape[:2] else T.resize_image(src_image, (sh, sw))
  oy, ox = _offset(rng, sh, h), _offset(rng, sw, w)

  # The part of the scaled source that lands inside the destination.
  y0, x0 = max(oy, 0), max(ox, 0)
  y1, x1 = min(oy + sh, h), min(ox + sw, w)
  pasted = np.zeros((len(src_masks), h, w), bool)
  pasted[:, y0:y1, x0:x1] = src_masks[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox]
  cover = pasted.any(0)
  image = dst_image.copy()
  image[y0:y1, x0:x1][cover[y0:y1, x0:x1]] = scaled[y0 - oy : y1 - oy, x0 - ox : x1 - ox][cover[y0:y1, x0:x1]]

  dst_masks = full_masks(dst)
  dst_before = dst_masks.sum((1, 2))
  dst_masks &= ~cover
  masks = np.concatenate([dst_masks, pasted])
  before = np.concatenate([dst_before, pixels_before])
  after = masks.sum((1, 2))
  keep = (after > 0) & (after >= min_visible * np.maximum(before, 1))
  # Untouched destination instances keep their own boxes and segmentations (a COCO box may be looser than its
  # mask); the others are described by what is left of their masks.
  touched = np.concatenate([dst_before != after[: len(dst_masks)], np.ones(len(pasted), bool)])
  boxes = np.where(touched[:, None], mask_boxes(masks), np.concatenate([dst.boxes, np.zeros_like(src.boxes)]))
  segs: list[Any] = [masks[k] if touched[k] else dst.segmentations[k] for k in range(len(dst.boxes))]
  segs += list(pasted)
  record = dataclasses.replace(
    dst,
    boxes=boxes[keep].astype(np.float32),
    classes=np.concatenate([dst.classes, src.classes])[keep].astype(np.int32),
    segmentations=[segs[k] for k in np.flatnonzero(keep)],
    ann_ids=np.concatenate([dst.ann_ids, np.full(len(src.boxes), -1, np.int64)])[keep],
    image_bytes=None,
    image_ref=None,
  )
  return record, image

