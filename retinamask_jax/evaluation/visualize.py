"""Drawing detections (boxes, labels, scores, masks) onto images, for predict.py and the end of training."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(n: int) -> np.ndarray:
  """n distinct, saturated RGB colours (uint8 [n, 3]), stable per class index."""
  hues = (np.arange(n) * 0.618033988749895) % 1.0
  h = hues * 6.0
  i = np.floor(h).astype(int) % 6
  f = h - np.floor(h)
  v, s = 0.95, 0.85
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  table = np.stack([
      np.choose(i, [v, q, p, p, t, v]),
      np.choose(i, [t, v, v, q, p, p]),
      np.choose(i, [p, p, t, v, v, q]),
  ], -1)
  return (table * 255).astype(np.uint8)


def draw_scale(height: int, width: int, min_side: int) -> int:
  """The integer factor small images are enlarged by for drawing: the smallest that brings the short side to
  `min_side` px (1 for images already that large, at most 4). Labels keep a fixed pixel size, so on an enlarged
  image they cover less of each object and stop overlapping one another."""
  short = max(min(height, width), 1)
  return int(min(max(-(-min_side // short), 1), 4))


def _label_box(placed: list[tuple[float, float, float, float]], box: Sequence[float], size: tuple[int, int],
               image_hw: tuple[int, int]) -> tuple[float, float]:
  """Top-left corner for a label of `size` (w, h) beside `box`: above it, inside its top, below it, inside its
  bottom, the first that stays in the image and overlaps no label placed so far (else the first in the image)."""
  x1, y1, x2, y2 = box
  w, h = size
  x = min(max(x1, 0), max(image_hw[1] - w, 0))
  candidates = [y1 - h, y1, y2, y2 - h]
  inside = [y for y in candidates if 0 <= y <= image_hw[0] - h] or [max(min(y1, image_hw[0] - h), 0)]
  for y in inside:
    if not any(x < bx2 and bx1 < x + w and y < by2 and by1 < y + h for bx1, by1, bx2, by2 in placed):
      return x, y
  return x, inside[0]


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: Sequence[int],
    class_names: Sequence[str],
    masks: np.ndarray | None = None,
    *,
    mask_alpha: float = 0.45,
    min_side: int = 512,
) -> Image.Image:
  """image: uint8 [H, W, 3] RGB; boxes [D, 4] xyxy pixels; scores [D]; labels [D] contiguous 1..K;
  masks: optional bool [Dm, H, W] for the first Dm detections. Returns a PIL image, enlarged by the integer
  `draw_scale(H, W, min_side)` (nearest neighbour) when the image is small, so that labels stay legible."""
  scale = draw_scale(image.shape[0], image.shape[1], min_side)
  if scale > 1:
    image = np.repeat(np.repeat(image, scale, 0), scale, 1)
    boxes = np.asarray(boxes, np.float32) * scale
    if masks is not None:
      masks = np.repeat(np.repeat(np.asarray(masks, bool), scale, 1), scale, 2)
  colours = palette(max(len(class_names), 1) + 1)
  canvas = image.astype(np.float32).copy()
  if masks is not None:
    for m, label in zip(masks, labels):
      colour = colours[int(label)].astype(np.float32)
      canvas[m] = (1 - mask_alpha) * canvas[m] + mask_alpha * colour
  out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(out)
  font = ImageFont.load_default()
  placed: list[tuple[float, float, float, float]] = []
  for box, label in zip(boxes, labels):
    colour = tuple(int(c) for c in colours[int(label)])
    x1, y1, x2, y2 = (float(v) for v in box)
    draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
  # Labels after all boxes, so no box outline is drawn over a label.
  for box, score, label in zip(boxes, scores, labels):
    colour = tuple(int(c) for c in colours[int(label)])
    name = class_names[int(label) - 1] if 0 < int(label) <= len(class_names) else str(int(label))
    text = f'{name} {score:.2f}'
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    size = (right - left + 4, bottom - top + 2)
    tx, ty = _label_box(placed, [float(v) for v in box], size, (out.height, out.width))
    placed.append((tx, ty, tx + size[0], ty + size[1]))
    draw.rectangle([tx, ty, tx + size[0], ty + size[1]], fill=colour)
    draw.text((tx + 2, ty - top), text, fill=(0, 0, 0), font=font)
  return out
