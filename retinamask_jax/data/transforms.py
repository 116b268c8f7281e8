"""Host-side image and annotation transforms: pure numpy / PIL functions, no jax.

Coordinates are continuous xyxy (a box is (x1, y1, x2, y2) floats, pixel i covers [i, i + 1)), image
sizes are (h, w) pairs. Per image, the training pipeline does what `load_image` -> `resized_hw` /
`resize_image` -> optional `hflip_image` -> `normalize` -> `pad_to_canvas` describe (fused: the
flip is a view and `normalize` writes into the zero-padded batch), and to its annotations
`select_instances` (truncation to G), `masks_to_crops` (in the original image), `scale_boxes`,
`hflip_boxes` / `hflip_crops`.

Problems with the data are reported through `report_once`: logged once per (kind, key) with what was
done, and counted in `REPORT_COUNTS`, so a dataset with many bad annotations does not flood the log
and nothing crashes.
"""

from __future__ import annotations

import collections
import io
import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image, ImageFile
from pycocotools import mask as mask_utils


class DataError(Exception):
  """An input file cannot be used (missing, not an image); the message names the file."""


# ---------------------------------------------------------------------------------------- reporting

_REPORT_LOCK = threading.Lock()
_REPORTED: set[tuple[str, str]] = set()
# Per-process counts of reported problems by kind (each (kind, key) counted once).
REPORT_COUNTS: collections.Counter[str] = collections.Counter()
# In grain worker processes (`defer_reports`) problems are not logged there but queued, and the pipeline hands them
# to the main process with the batch they came up in (`take_deferred_reports` -> `absorb_reports`). So each problem
# is logged once per run and counted where the summary is printed, however many workers found it.
_DEFERRED = False
_PENDING: list[tuple[str, str, str]] = []


def _record(kind: str, key: str, text: str) -> bool:
  with _REPORT_LOCK:
    if (kind, key) in _REPORTED:
      return False
    _REPORTED.add((kind, key))
    REPORT_COUNTS[kind] += 1
    if _DEFERRED:
      _PENDING.append((kind, key, text))
      return True
  logging.warning('[data: %s] %s', kind, text)
  return True


def report_once(kind: str, key: Any, message: str, *args: Any) -> bool:
  """Logs `message % args` (WARNING) the first time (kind, key) is seen in this process; counts it.

  Returns True when this call was the first report of (kind, key). Keys are compared by `repr`. In grain worker
  processes the report travels to the main process with the batch and is logged and counted there (once).
  """
  return _record(kind, repr(key), message % args if args else message)


def defer_reports() -> None:
  """Queue reports instead of logging them (called in grain worker processes)."""
  global _DEFERRED
  _DEFERRED = True


def take_deferred_reports() -> list[tuple[str, str, str]]:
  """The (kind, key, message) reports queued since the last call (empty unless `defer_reports` was called)."""
  with _REPORT_LOCK:
    out = list(_PENDING)
    _PENDING.clear()
  return out


def absorb_reports(reports: Sequence[tuple[str, str, str]]) -> None:
  """Logs and counts reports queued in a worker process (each (kind, key) once in this process)."""
  for kind, key, text in reports:
    _record(str(kind), str(key), str(text))


def report_counts() -> dict[str, int]:
  """This process's count of reported problems by kind (worker reports included once absorbed)."""
  with _REPORT_LOCK:
    return dict(REPORT_COUNTS)


# ----------------------------------------------------------------------------------------- decoding

# PIL's switch for truncated files is a module global; the lock keeps two threads of this process
# from restoring it under each other. (Another thread's decode that happens while it is set is also
# lenient.)
_TRUNCATED_LOCK = threading.Lock()


def _decode(source: str | bytes, name: str, allow_truncated: bool) -> Image.Image:
  fp = io.BytesIO(source) if isinstance(source, bytes) else source
  with Image.open(fp) as img:
    # Open is lazy; load() decodes now so that errors surface here. No EXIF transpose on purpose:
    # COCO annotations are in the raw pixel grid of the stored file.
    if allow_truncated:
      with _TRUNCATED_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
          img.load()
        finally:
          ImageFile.LOAD_TRUNCATED_IMAGES = previous
    else:
      img.load()
    return img.copy()


def _to_rgb_uint8(img: Image.Image) -> np.ndarray:
  mode = img.mode
  if mode.startswith('I;16') or mode in ('I', 'F'):
    # High-bit-depth grayscale: PIL's convert('RGB') would clip at 255, so rescale 16-bit ranges
    # ourselves.
    a = np.asarray(img).astype(np.float64)
    if mode.startswith('I;16') or (a.size and a.max() > 255):
      a = a / 257.0
    g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)
  if mode in ('RGBA', 'LA', 'PA') or (mode == 'P' and 'transparency' in img.info):
    # Alpha is dropped (the colour channels are kept as stored), not composited on a background.
    img = img.convert('RGBA')
  return np.asarray(img.convert('RGB'), dtype=np.uint8)


def load_image(source: str | bytes, *, name: str | None = None) -> np.ndarray:
  """Decodes an image file (a path, or the file's bytes) to uint8 `[H, W, 3]` RGB.

  Grayscale, palette, CMYK, RGBA (alpha dropped) and 16-bit files are converted. A truncated file is
  loaded if PIL can (the missing part is grey) and reported once. The EXIF orientation tag is
  ignored: COCO annotations are in the stored pixel grid. Raises `DataError` naming the file when it
  is missing or not a decodable image.
  """
  name = name or (source if isinstance(source, str) else '<bytes>')
  try:
    img = _decode(source, name, allow_truncated=False)
  except FileNotFoundError as e:
    raise DataError(f'{name}: image file not found') from e
  except OSError as e:
    # Pillow reports truncation as OSError('image file is truncated ...') or a premature end of the
    # stream.
    msg = str(e).lower()
    if 'truncated' not in msg and 'broken data stream' not in msg and 'premature' not in msg:
      raise DataError(f'{name}: cannot decode image ({e})') from e
    try:
      img = _decode(source, name, allow_truncated=True)
    except Exception as e2:  # noqa: BLE001  (whatever PIL raises, the file is unusable)
      raise DataError(f'{name}: truncated image that cannot be decoded ({e2})') from e2
    report_once('truncated_image', name, '%s: truncated image file, loaded the readable part', name)
  except Exception as e:  # noqa: BLE001  (PIL raises several types for non-images)
    raise DataError(f'{name}: cannot decode image ({type(e).__name__}: {e})') from e
  try:
    return _to_rgb_uint8(img)
  except Exception as e:  # noqa: BLE001
    raise DataError(f'{name}: cannot convert image mode {img.mode!r} to RGB ({e})') from e


# ----------------------------------------------------------------------------------------- geometry


def resized_hw(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
  """The authors' resize rule (spec 1.3): short side -> min_size unless long side exceeds max_size.

  If long/short * min_size > max_size, the target short side becomes round(max_size * short / long)
  (Python round, half to even); the long side is int() truncated: int(size * long / short). Returns
  (nh, nw).
  """
  size = min_size
  short, long = float(min(h, w)), float(max(h, w))
  if max_size is not None and long / short * size > max_size:
    size = int(round(max_size * short / long))
  if (w <= h and w == size) or (h <= w and h == size):
    return int(h), int(w)
  if w < h:
    return int(size * h / w), int(size)
  return int(size), int(size * w / h)


def resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
  """uint8 `[h, w, 3]` -> `[nh, nw, 3]`, PIL bilinear (antialiased when shrinking, as theirs)."""
  nh, nw = size_hw
  if image.shape[:2] == (nh, nw):
    return image
  return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))


def scale_boxes(boxes: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
  """Boxes `[n, 4]` float32 from an (h, w) image to a resized (nh, nw) one: x * nw/w, y * nh/h."""
  fy = to_hw[0] / from_hw[0]
  fx = to_hw[1] / from_hw[1]
  return (np.asarray(boxes, np.float32) * np.array([fx, fy, fx, fy], np.float32)).astype(np.float32)


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
  """Clamps `[n, 4]` boxes to [0, width] x [0, height]."""
  b = np.array(boxes, np.float32, copy=True).reshape(-1, 4)
  b[:, 0::2] = np.clip(b[:, 0::2], 0, width)
  b[:, 1::2] = np.clip(b[:, 1::2], 0, height)
  return b


def hflip_image(image: np.ndarray) -> np.ndarray:
  """Mirrors `[h, w, C]` left-right."""
  return np.ascontiguousarray(image[:, ::-1])


def hflip_boxes(boxes: np.ndarray, width: int | float) -> np.ndarray:
  """Mirrors `[n, 4]` xyxy boxes in an image of width W: x' = W - x (x1' = W - x2, x2' = W - x1)."""
  b = np.asarray(boxes, np.float32)
  return np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], axis=1).astype(np.float32)


def hflip_crops(crops: np.ndarray) -> np.ndarray:
  """Mirrors box-relative mask crops `[n, M, M]` (an image flip mirrors each crop in its box)."""
  return np.ascontiguousarray(crops[..., ::-1])


def normalize(
  image: np.ndarray,
  *,
  channel_order: str = 'bgr',
  pixel_range: float = 255.0,
  mean: Sequence[float] = (0.0, 0.0, 0.0),
  std: Sequence[float] = (1.0, 1.0, 1.0),
  out: np.ndarray | None = None,
) -> np.ndarray:
  """uint8 RGB `[h, w, 3]` -> float32 `(pixel * pixel_range / 255 - mean) / std`, `channel_order`.

  mean and std are given in the output channel order ('bgr': the authors' Caffe2 weights; 'rgb':
  torchvision). Computed as pixel * a + b in float32 (a = pixel_range / 255 / std, b = -mean / std)
  through a 256-entry table per channel (3x faster than the arithmetic on a large image), written
  into `out` (float32 `[h, w, 3]`, e.g. a view of a batch) when given.
  """
  if channel_order not in ('rgb', 'bgr'):
    raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
  std64 = np.asarray(std, np.float64)
  a = (pixel_range / 255.0 / std64).astype(np.float32)
  b = (-np.asarray(mean, np.float64) / std64).astype(np.float32)
  table = np.arange(256, dtype=np.float32)[:, None] * a + b  # [256, 3]
  x = image[..., ::-1] if channel_order == 'bgr' else image
  if out is None:
    out = np.empty(x.shape, np.float32)
  for c in range(3):
    np.take(table[:, c], x[..., c], out=out[..., c], mode='clip')  # uint8: always in range
  return out


def pad_to_canvas(image: np.ndarray, canvas_hw: tuple[int, int]) -> np.ndarray:
  """Zero-pads `[h, w, C]` at the bottom/right to `[H, W, C]`; ValueError if it does not fit."""
  h, w = image.shape[:2]
  ch, cw = canvas_hw
  if h > ch or w > cw:
    raise ValueError(f'image {h}x{w} does not fit the canvas {ch}x{cw}')
  out = np.zeros((ch, cw) + image.shape[2:], image.dtype)
  out[:h, :w] = image
  return out


# -------------------------------------------------------------------------------------------- masks


def _is_polygons(seg: Any) -> bool:
  return isinstance(seg, (list, tuple))


def _bilinear_integral(integral: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
  """The mask's area integral from the window origin to each (y, x): float64 [len(ys), len(xs)].

  integral[j, i] is the mask sum over pixels [0, j) x [0, i) (shape [h + 1, w + 1]). For a mask that
  is constant on every pixel, the area integral at a continuous point is exactly the bilinear
  interpolation of that table, so any rectangle's covered area costs four lookups.
  """
  h, w = integral.shape[0] - 1, integral.shape[1] - 1
  ys = np.clip(ys, 0, h)
  xs = np.clip(xs, 0, w)
  j0 = np.minimum(np.floor(ys).astype(np.int64), max(h - 1, 0))
  i0 = np.minimum(np.floor(xs).astype(np.int64), max(w - 1, 0))
  fy = (ys - j0)[:, None]
  fx = (xs - i0)[None, :]
  j1, i1 = np.minimum(j0 + 1, h), np.minimum(i0 + 1, w)
  a = integral[j0][:, i0]
  b = integral[j0][:, i1]
  c = integral[j1][:, i0]
  d = integral[j1][:, i1]
  return a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx


def _crop_window(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
  """Integer pixel window [x0, x1) x [y0, y1) covering the continuous box, inside the image."""
  x0 = min(max(int(math.floor(box[0])), 0), width)
  y0 = min(max(int(math.floor(box[1])), 0), height)
  x1 = min(max(int(math.ceil(box[2])), x0), width)
  y1 = min(max(int(math.ceil(box[3])), y0), height)
  return x0, y0, x1, y1


# Up to this image size, polygons are rasterized over the whole image (exactly what COCO tools
# decode); above it only over the box window (see _window_mask).
_FULL_DECODE_MAX_PIXELS = 1 << 20


def _valid_polys(seg: Any) -> list[list[float]]:
  # Fewer than 3 points is not a polygon (and pycocotools would read a 4-number list as a bbox).
  return [np.asarray(p, np.float64).tolist() for p in seg if len(p) >= 6 and len(p) % 2 == 0]


def _full_polygon_mask(seg: Any, height: int, width: int) -> np.ndarray:
  polys = _valid_polys(seg)
  if not polys:
    return np.ones((height, width), np.uint8)
  return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, height, width)))


def _window_mask(
  seg: Any, window: tuple[int, int, int, int], height: int, width: int
) -> np.ndarray:
  """The instance mask restricted to the pixel window, uint8 [y1 - y0, x1 - x0]."""
  x0, y0, x1, y1 = window
  if _is_polygons(seg) and height * width <= _FULL_DECODE_MAX_PIXELS:
    return _full_polygon_mask(seg, height, width)[y0:y1, x0:x1]
  if _is_polygons(seg):
    polys = [np.asarray(p, np.float64).reshape(-1, 2) for p in _valid_polys(seg)]
    if not polys:
      return np.ones((y1 - y0, x1 - x0), np.uint8)
    # Rasterize a window that starts at the box window, or further up/left where the polygon
    # does: pycocotools rounds negative coordinates toward zero, so they must stay non-negative
    # unless they are negative in the image too (then the window starts at the image edge). The
    # result then equals the full-image rasterization except where an edge point lies exactly
    # half-way (float rounding).
    lo = np.min([p.min(0) for p in polys], axis=0)
    ox = max(0, min(x0, int(math.floor(lo[0]))))
    oy = max(0, min(y0, int(math.floor(lo[1]))))
    shifted = [(p - np.array([ox, oy], np.float64)).ravel().tolist() for p in polys]
    rles = mask_utils.frPyObjects(shifted, y1 - oy, x1 - ox)
    return mask_utils.decode(mask_utils.merge(rles))[y0 - oy :, x0 - ox :]
  rle = seg
  if isinstance(rle.get('counts'), list):
    rle = mask_utils.frPyObjects(rle, *rle['size'])
  elif isinstance(rle.get('counts'), str):
    rle = dict(rle, counts=rle['counts'].encode('ascii'))
  full = mask_utils.decode(rle)
  return full[y0:y1, x0:x1]


def masks_to_crops(
  segmentations: Sequence[Any],
  boxes: np.ndarray,
  height: int,
  width: int,
  mask_size: int,
  *,
  name: str = '',
) -> np.ndarray:
  """Each instance's mask cropped to its own box, resampled to M x M: uint8 `[n, M, M]` in {0, 1}.

  segmentations: per instance, COCO polygons (a list of flat [x0, y0, x1, y1, ...] lists or arrays,
  >= 3 points each), an RLE dict (`counts` compressed str/bytes or an uncompressed list, `size` [h,
  w]), or None (no mask: the filled box; so are polygon lists without a valid polygon).
  boxes: `[n, 4]` float32 continuous xyxy in the original `height x width` image.

  Sampling rule (area resampling): crop cell (i, j) is the rectangle
  [x1 + j * bw / M, x1 + (j + 1) * bw / M] x [y1 + i * bh / M, y1 + (i + 1) * bh / M] of the box;
  its value is 1 when the mask covers at least half of that rectangle's area (pixel p covers
  [p, p + 1); 1e-6 relative slack for rounding). This is exact both when enlarging small boxes and
  when shrinking large ones (areas come from the mask's integral image: four lookups per cell), and
  the crop depends only on the box, so resizing the image does not change it and flipping mirrors
  it. Polygons are rasterized only inside the box window when the image is large; RLEs are decoded
  at image size, then sliced. A segmentation that pycocotools cannot decode becomes the filled box
  (reported once, `name` in the message).
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  out = np.zeros((len(boxes), mask_size, mask_size), np.uint8)
  for k, (seg, box) in enumerate(zip(segmentations, boxes)):
    bw, bh = box[2] - box[0], box[3] - box[1]
    if not (bw > 0 and bh > 0):
      continue
    if seg is None:
      out[k] = 1
      continue
    window = _crop_window(box, height, width)
    x0, y0, x1, y1 = window
    if x1 <= x0 or y1 <= y0:
      continue
    try:
      m = _window_mask(seg, window, height, width)
    except Exception as e:  # noqa: BLE001  (pycocotools raises various errors on corrupt RLE)
      report_once(
        'bad_mask',
        (name, k),
        '%s: instance %d: cannot decode its segmentation (%s); filled box',
        name,
        k,
        e,
      )
      out[k] = 1
      continue
    integral = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.float64)
    np.cumsum(np.cumsum(m, axis=0), axis=1, out=integral[1:, 1:])
    # Cell edges in window coordinates; the area outside the window (and the image) holds no mask.
    ys = box[1] - y0 + bh * np.arange(mask_size + 1) / mask_size
    xs = box[0] - x0 + bw * np.arange(mask_size + 1) / mask_size
    f = _bilinear_integral(integral, ys, xs)
    covered = f[1:, 1:] - f[:-1, 1:] - f[1:, :-1] + f[:-1, :-1]
    # At least half the cell's area, with a little slack for the rounding of the sums.
    out[k] = covered >= (0.5 - 1e-6) * (bw / mask_size) * (bh / mask_size)
  return out


# --------------------------------------------------------------------------------------- GT padding


def select_instances(
  areas: np.ndarray, max_instances: int, *, priority: np.ndarray | None = None
) -> np.ndarray:
  """Rows to keep when padding GT to `max_instances`: all of them if they fit, else the largest.

  areas: `[n]` box areas. priority: optional `[n]` bool, rows that win over non-priority rows
  regardless of area (real instances over crowd ignore regions). Returns sorted int64 indices (the
  kept rows stay in input order).
  """
  n = len(areas)
  if n <= max_instances:
    return np.arange(n, dtype=np.int64)
  key = np.asarray(areas, np.float64)
  if priority is not None:
    # Priority rows first, then by area descending; the stable sort keeps earlier rows on ties.
    order = np.lexsort((-key, ~np.asarray(priority, bool)))
  else:
    order = np.argsort(-key, kind='stable')
  return np.sort(order[:max_instances]).astype(np.int64)


def pad_rows(x: np.ndarray, rows: int, fill: float | int = 0) -> np.ndarray:
  """Pads (or checks) the leading axis of `x` to `rows`, filling with `fill`."""
  if len(x) > rows:
    raise ValueError(f'{len(x)} rows do not fit {rows}')
  out = np.full((rows,) + x.shape[1:], fill, x.dtype)
  out[: len(x)] = x
  return out
