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
from typing import Any, NamedTuple

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError
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

# Images with more pixels than this (width x height, read from the file's header) are refused before anything is
# decoded: a PNG of a few MB can declare 40000 x 40000 pixels (4.8 GB as RGB). 2^28 = 16384 x 16384 keeps a 200 MP
# phone photo and a 12000 x 9000 one. For the files read here it replaces PIL's own check (`Image.MAX_IMAGE_PIXELS`:
# a warning above 89 M pixels, an error above 179 M); set it higher for larger trusted images.
MAX_IMAGE_PIXELS = 1 << 28

# With a `max_side` hint, a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's `draft`) only
# while its long side stays at least this many times max_side, so the antialiased resize that follows still
# shrinks by 2x or more (PIL's `Image.thumbnail` keeps the same reducing gap). Smaller images decode exactly.
DRAFT_REDUCING_GAP = 2.0

_ORIENTATION_TAG = 0x0112
# EXIF orientation value -> the transposition of the stored pixels that gives the upright image (the one viewers
# show), as `PIL.ImageOps.exif_transpose` does it.
_UPRIGHT = {
  2: Image.Transpose.FLIP_LEFT_RIGHT,
  3: Image.Transpose.ROTATE_180,
  4: Image.Transpose.FLIP_TOP_BOTTOM,
  5: Image.Transpose.TRANSPOSE,
  6: Image.Transpose.ROTATE_270,  # turn 90 degrees clockwise: the usual portrait phone photo
  7: Image.Transpose.TRANSVERSE,
  8: Image.Transpose.ROTATE_90,
}

# PIL's switches (Image.MAX_IMAGE_PIXELS) are module globals; the lock keeps two threads of this process from
# restoring one under each other. (Another thread's Image.open that happens while it is off skips PIL's check.)
_PIL_SWITCH_LOCK = threading.Lock()


class DecodedImage(NamedTuple):
  """An image file decoded by `decode_image`."""

  image: np.ndarray  # uint8 [h, w, 3] RGB
  full_hw: tuple[int, int]  # (H, W) of the same image at full resolution: image.shape[:2] unless reduced on decode


def _open(source: str | bytes, name: str) -> Image.Image:
  """Opens the file (PIL reads the header only) and refuses it by name when it has more than MAX_IMAGE_PIXELS."""
  fp = io.BytesIO(source) if isinstance(source, bytes) else source
  with _PIL_SWITCH_LOCK:
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # PIL's check warns from 89 M pixels; ours below is the one that applies
    try:
      img = Image.open(fp)
    finally:
      Image.MAX_IMAGE_PIXELS = previous
  w, h = img.size
  if w * h > MAX_IMAGE_PIXELS:
    img.close()
    raise DataError(
      f'{name}: {w} x {h} = {w * h / 1e6:.0f} M pixels, over the limit of {MAX_IMAGE_PIXELS / 1e6:.0f} M '
      '(retinamask_jax.data.transforms.MAX_IMAGE_PIXELS); refused without decoding it (a decompression bomb?)'
    )
  return img


def draft_scale(width: int, height: int, max_side: int | None) -> int:
  """The JPEG reduction (1, 2, 4 or 8) `decode_image` asks for: the largest that keeps the long side >=
  DRAFT_REDUCING_GAP * max_side (1 without a hint)."""
  if max_side is None:
    return 1
  for s in (8, 4, 2):
    if max(width, height) / s >= DRAFT_REDUCING_GAP * max_side and min(width, height) >= s:
      return s
  return 1


def _orientation(img: Image.Image) -> int:
  try:
    value = int(img.getexif().get(_ORIENTATION_TAG, 1))
  except Exception:  # noqa: BLE001  (a damaged EXIF block only loses the orientation)
    return 1
  return value if value in _UPRIGHT else 1


def _failure(e: BaseException) -> str:
  if isinstance(e, UnidentifiedImageError):
    return 'not an image (no format PIL reads)'
  # Pillow reports truncation as OSError('image file is truncated ...'), a broken data stream or a premature end.
  msg = str(e).lower()
  if isinstance(e, OSError) and any(s in msg for s in ('truncated', 'broken data stream', 'premature')):
    return f'truncated image file ({e})'
  return f'cannot decode image ({type(e).__name__}: {e})'


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
  if img.mode != 'RGB':
    img = img.convert('RGB')  # (an RGB image is not copied first: a large photo is big enough once)
  return np.asarray(img, dtype=np.uint8)


def decode_image(
  source: str | bytes,
  *,
  name: str | None = None,
  max_side: int | None = None,
  grid_hw: tuple[int, int] | None = None,
) -> DecodedImage:
  """Decodes an image file (a path, or the file's bytes) to uint8 `[h, w, 3]` RGB, refusing what cannot be used.

  Refused with `DataError` naming the file (nothing is half-loaded): a missing file, a file that is not an image,
  a truncated or damaged one, and one with more than `MAX_IMAGE_PIXELS` pixels (checked in the header, before any
  pixel is decoded). Grayscale, palette, CMYK, RGBA / LA (alpha dropped) and 16-bit files are converted.

  Args:
    source: a path or the file's bytes.
    name: how messages name the file (default: the path).
    max_side: the longest side the caller will resize the image to. A JPEG at least 2 x DRAFT_REDUCING_GAP times
      larger is decoded at 1/2, 1/4 or 1/8 scale (`draft_scale`); then `image` is smaller than `full_hw`. None
      (the default): exact, full-resolution decoding (what training and evaluation use).
    grid_hw: the (height, width) the caller's annotations give the image. The EXIF orientation is applied (the
      upright image, as viewers show it) except when grid_hw is the stored size and not the upright one (a
      quarter-turn tag on a non-square image whose annotations are in the stored pixel grid): then the stored
      grid is kept and that is reported once. None: always upright.
  Returns:
    `DecodedImage(image, full_hw)`: image uint8 `[h, w, 3]`, full_hw the (H, W) of the same (upright) image at
    full resolution.
  """
  name = name or (source if isinstance(source, str) else '<bytes>')
  try:
    img = _open(source, name)
  except DataError:
    raise
  except FileNotFoundError as e:
    raise DataError(f'{name}: image file not found') from e
  except Exception as e:  # noqa: BLE001  (PIL raises several types for non-images)
    raise DataError(f'{name}: {_failure(e)}') from e
  with img:
    full_w, full_h = img.size
    try:
      scale = draft_scale(full_w, full_h, max_side)
      if scale > 1:  # JPEG and MPO (phones' multi-picture JPEGs) decode reduced; other formats ignore it
        img.draft(None, (max(1, full_w // scale), max(1, full_h // scale)))
      img.load()  # open is lazy: decode now so that errors surface here
    except Exception as e:  # noqa: BLE001  (whatever the decoder raises, the file is unusable)
      raise DataError(f'{name}: {_failure(e)}') from e
    orientation = _orientation(img)
    full_hw = (full_h, full_w)
    if orientation != 1:
      turned = (full_w, full_h) if orientation >= 5 else full_hw
      if grid_hw is not None and tuple(grid_hw) == full_hw != turned:
        report_once(
          'exif_orientation_ignored',
          name,
          '%s: EXIF orientation %d, but the annotations give the stored size %dx%d: kept the stored pixel grid',
          name,
          orientation,
          full_h,
          full_w,
        )
      else:
        # On the PIL image: its blocked transpose is ~3x faster than a strided numpy copy of a large image.
        img, full_hw = img.transpose(_UPRIGHT[orientation]), turned
    try:
      return DecodedImage(_to_rgb_uint8(img), full_hw)
    except Exception as e:  # noqa: BLE001
      raise DataError(f'{name}: cannot convert image mode {img.mode!r} to RGB ({e})') from e


def load_image(
  source: str | bytes,
  *,
  name: str | None = None,
  max_side: int | None = None,
  grid_hw: tuple[int, int] | None = None,
) -> np.ndarray:
  """`decode_image(...).image`: uint8 `[h, w, 3]` RGB, upright (EXIF orientation applied unless `grid_hw` says
  the annotations are in the stored grid); raises `DataError` naming the file when it cannot be used."""
  return decode_image(source, name=name, max_side=max_side, grid_hw=grid_hw).image


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


# How images are resized (`data.resize`): 'pil' = `resized_hw` + `resize_image` on uint8 (the authors' rule);
# 'torchvision' = `torchvision_resized_hw` + `resize_float_bilinear` on the normalized float image, as
# torchvision's `GeneralizedRCNNTransform` does (for converted torchvision models).
RESIZE_MODES = ('pil', 'torchvision')


def torchvision_resized_hw(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
  """torchvision's `GeneralizedRCNNTransform` size rule: scale = min(min_size / short, max_size / long) in Python
  floats (double), then `F.interpolate(scale_factor=scale, recompute_scale_factor=True)`'s output size
  floor(side * scale) per side. Returns (nh, nw); no resize when scale is 1 (both sides unchanged)."""
  scale = min(float(min_size) / min(h, w), float(max_size) / max(h, w))
  return int(math.floor(float(h) * scale)), int(math.floor(float(w) * scale))


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(i0, i1, w0, w1) of ATen's CPU bilinear kernel along one axis (align_corners=False, no scale given, so
  scale = in / out as float32): src = max(scale * (dst + 0.5) - 0.5, 0) (one rounding), i0 = min(floor(src), in - 1),
  i1 = i0 + 1 unless at the last pixel, w1 = clamp(src - i0, 0, 1), w0 = 1 - w1; all in float32 like ATen."""
  scale = np.float32(in_size) / np.float32(out_size)
  # ATen's compiled kernel fuses scale * (dst + 0.5) - 0.5 into one multiply-add (one rounding): the float64
  # product of two float32 values is exact, so computing it in float64 and rounding once gives the same source
  # coordinate (measured: without this, 1 column in ~200 gets a weight off by 3e-5).
  dst = np.arange(out_size, dtype=np.float64) + 0.5
  src = (np.float64(scale) * dst - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
  w1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
  return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


def resize_float_bilinear(image: np.ndarray, size_hw: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
  """float32 `[h, w, C]` -> `[nh, nw, C]` as `torch.nn.functional.interpolate(mode='bilinear',
  align_corners=False, antialias=False)` computes it on CPU from an output size (no antialiasing when shrinking):
  each output pixel is the 2x2 weighted sum of its source pixels, with ATen's float32 source coordinates.

  Separable (rows, then columns); equal to ATen's result to float32 rounding (~1e-7 relative), which sums the
  same four products in another order. Written into `out` (float32 `[nh, nw, C]`, e.g. a canvas view) when given.
  """
  nh, nw = (int(v) for v in size_hw)
  h, w = image.shape[:2]
  image = np.asarray(image, np.float32)
  if out is None:
    out = np.empty((nh, nw) + image.shape[2:], np.float32)
  if (h, w) == (nh, nw):
    out[...] = image
    return out
  y0, y1, wy0, wy1 = _linear_taps(h, nh)
  x0, x1, wx0, wx1 = _linear_taps(w, nw)
  extra = (None,) * (image.ndim - 2)
  rows = image[y0] * wy0[(slice(None), None, *extra)] + image[y1] * wy1[(slice(None), None, *extra)]
  np.multiply(rows[:, x0], wx0[(None, slice(None), *extra)], out=out)
  out += rows[:, x1] * wx1[(None, slice(None), *extra)]
  return out


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


def crop_window(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
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


def full_mask(seg: Any, height: int, width: int) -> np.ndarray:
  """An instance's segmentation (polygons, RLE or an array, as in `masks_to_crops`) over the whole image:
  uint8 [height, width]."""
  return _window_mask(seg, (0, 0, width, height), height, width)


def _window_mask(
  seg: Any, window: tuple[int, int, int, int], height: int, width: int
) -> np.ndarray:
  """The instance mask restricted to the pixel window, uint8 [y1 - y0, x1 - x0]."""
  x0, y0, x1, y1 = window
  if isinstance(seg, np.ndarray):
    if seg.shape != (height, width):
      raise ValueError(f'mask array of shape {seg.shape} for a {height}x{width} image')
    return seg[y0:y1, x0:x1].astype(np.uint8, copy=False)
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
  w]), a bool / uint8 array [height, width] (copy-paste's masks), or None (no mask: the filled box; so
  are polygon lists without a valid polygon).
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
    window = crop_window(box, height, width)
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
