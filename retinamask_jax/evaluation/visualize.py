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


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: Sequence[int],
    class_names: Sequence[str],
    masks: np.ndarray | None = None,
    *,
    mask_alpha: float = 0.45,
) -> Image.Image:
  """image: uint8 [H, W, 3] RGB; boxes [D, 4] xyxy pixels; scores [D]; labels [D] contiguous 1..K;
  masks: optional bool [Dm, H, W] for the first Dm detections. Returns a PIL image."""
  colours = palette(max(len(class_names), 1) + 1)
  canvas = image.astype(np.float32).copy()
  if masks is not None:
    for m, label in zip(masks, labels):
      colour = colours[int(label)].astype(np.float32)
      canvas[m] = (1 - mask_alpha) * canvas[m] + mask_alpha * colour
  out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(out)
  font = ImageFont.load_default()
  for box, score, label in zip(boxes, scores, labels):
    colour = tuple(int(c) for c in colours[int(label)])
    x1, y1, x2, y2 = (float(v) for v in box)
    draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
    name = class_names[int(label) - 1] if 0 < int(label) <= len(class_names) else str(int(label))
    text = f'{name} {score:.2f}'
    left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
    ty = max(y1 - (bottom - top) - 2, 0)
    draw.rectangle([x1, ty, x1 + (right - left) + 4, ty + (bottom - top) + 2], fill=colour)
    draw.text((x1 + 2, ty), text, fill=(0, 0, 0), font=font)
  return out
