"""The embedded default dataset: synthetic shapes on textured backgrounds, on disk in COCO format.

Every command works offline with it, and it stands in for unknown held-out COCO-format data, so it is varied on
purpose: 7 classes with non-contiguous category ids (circle 1, rectangle 2, triangle 5, star 7, ring 8 (a shape
with a hole), bar 11 (thin and elongated: the case best-matching anchors are for), cross 13); sizes from 16 px to
most of the image, random aspect ratios, rotations, colours and fills (each shape's colours differ from most of
what lies under it); textured backgrounds (smooth noise, gradients, stripes, checkerboards, blotches); later shapes
occlude earlier ones and the annotation is the visible part (instances with less than half of their area visible
are dropped); a quarter of the shapes may be cut by the image border; images with no objects; landscape, portrait
and square images of varied sizes; JPEG and PNG files; and in the train split a few `iscrowd=1` regions (clusters of
small shapes, uncompressed RLE) to exercise crowd handling.

Masks: an unoccluded shape fully inside the image is annotated with its polygon (the pixels drawn
are exactly pycocotools' rasterization of that polygon), an occluded or border-cut one and every
ring with a compressed RLE (`counts` a str). `bbox` is the visible mask's pixel extent, `area` its
pixel count.

Output is deterministic in (split, num_images, image_size, seed): the same bytes twice. Writing is
atomic and cached (see `write_shapes_dataset`).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import math
import os
import shutil
import zlib
from typing import Any

import numpy as np
from absl import logging
from PIL import Image
from pycocotools import mask as mask_utils

# Bump when the generated content changes: cached datasets with another version are regenerated.
GENERATOR_VERSION = 2
# Version 2 (issue 25's error analysis of version 1, BENCHMARKS.md) removed difficulties that made the task harder
# without making it more like photographs: shapes as small as 8 px (a 2-px-thick bar), fills drawn in the colour of
# the background under them (invisible objects, annotated), instances with 15 % of their area visible, and shapes
# cut by the border into the outline of another class (a rectangle's corner is a triangle).

CATEGORIES = (
  (1, 'circle'),
  (2, 'rectangle'),
  (5, 'triangle'),
  (7, 'star'),
  (8, 'ring'),
  (11, 'bar'),
  (13, 'cross'),
)
_CLASS_NAMES = tuple(name for _, name in CATEGORIES)
_CATEGORY_ID = {name: cid for cid, name in CATEGORIES}

_P_EMPTY = 0.08  # images without objects
_P_PNG = 0.3
_P_CROWD = 0.06  # train split only
_MIN_SIZE = 16.0  # px across, before occlusion and border cuts
_MIN_VISIBLE_PX = 64  # instances with less visible area are dropped (their pixels stay in the image)
_MIN_VISIBLE_FRACTION = 0.5
# Shapes are told apart by their outline, so a border cut can turn one class into another (a rectangle's corner is a
# triangle): most shapes are placed wholly inside the image when they fit, the others anywhere.
_P_INSIDE = 0.75
# A fill colour is redrawn while more than _MAX_SIMILAR of the pixels under the shape lie within _SIMILAR_DISTANCE
# of it (RGB distance, of 441): camouflage exists in photographs, an object of the background's exact colour does
# not, and annotating one only teaches noise.
_SIMILAR_DISTANCE = 60.0
_MAX_SIMILAR = 0.25
_COLOUR_TRIES = 20


# -------------------------------------------------------------------------------------- backgrounds


def _colour(rng: np.random.Generator) -> np.ndarray:
  return rng.uniform(0, 255, size=3).astype(np.float32)


def _smooth_noise(
  rng: np.random.Generator, h: int, w: int, cells: int, channels: int
) -> np.ndarray:
  """Low-frequency noise in [0, 1]: a tiny random image upsampled bilinearly. float32 [h, w, c]."""
  gh = max(2, int(round(cells * h / max(h, w))))
  gw = max(2, int(round(cells * w / max(h, w))))
  small = (rng.uniform(0, 255, size=(gh, gw, channels))).astype(np.uint8)
  mode = 'RGB' if channels == 3 else 'L'
  img = Image.fromarray(small if channels == 3 else small[..., 0], mode).resize(
    (w, h), Image.BILINEAR
  )
  out = np.asarray(img, np.float32) / 255.0
  return out.reshape(h, w, channels)


def _rotated_coord(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """x cos(t) + y sin(t) for a random direction t; float32 [h, w]."""
  t = rng.uniform(0, np.pi)
  ys = np.arange(h, dtype=np.float32)[:, None]
  xs = np.arange(w, dtype=np.float32)[None, :]
  return xs * np.float32(np.cos(t)) + ys * np.float32(np.sin(t))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """float32 [h, w, 3] in [0, 255]."""
  kind = rng.choice(['noise', 'gradient', 'stripes', 'checker', 'blotches'])
  c0, c1 = _colour(rng), _colour(rng)
  if kind == 'noise':
    t = _smooth_noise(rng, h, w, int(rng.integers(8, 64)), 1)
    img = c0 + (c1 - c0) * t
  elif kind == 'gradient':
    coord = _rotated_coord(rng, h, w)
    t = (coord - coord.min()) / max(float(np.ptp(coord)), 1.0)
    img = c0 + (c1 - c0) * t[..., None]
  elif kind == 'stripes':
    period = rng.uniform(4, 48)
    t = (_rotated_coord(rng, h, w) / period) % 1.0 < rng.uniform(0.3, 0.7)
    img = np.where(t[..., None], c0, c1)
  elif kind == 'checker':
    cell = rng.uniform(4, 48)
    ys = (np.arange(h)[:, None] // cell).astype(np.int64)
    xs = (np.arange(w)[None, :] // cell).astype(np.int64)
    img = np.where(((ys + xs) % 2 == 0)[..., None], c0, c1)
  else:  # blotches
    img = _smooth_noise(rng, h, w, int(rng.integers(3, 9)), 3) * 255.0
  img = img.astype(np.float32)
  if rng.random() < 0.5:  # fine texture on top
    img += np.float32(rng.uniform(2, 12)) * rng.standard_normal((h, w, 1), dtype=np.float32)
  return img


# ------------------------------------------------------------------------------------------- shapes


def _regular(n: int, radius: float, phase: float) -> np.ndarray:
  a = phase + 2 * np.pi * np.arange(n) / n
  return np.stack([radius * np.cos(a), radius * np.sin(a)], 1)


def _outline(rng: np.random.Generator, name: str, size: float) -> np.ndarray:
  """Vertices [V, 2] of a polygonal shape centred at the origin, unrotated, about `size` across."""
  r = size / 2
  if name == 'circle':
    return _regular(int(np.clip(size, 16, 72)), r, 0.0)
  if name == 'rectangle':
    aspect = math.exp(rng.uniform(math.log(0.4), math.log(2.5)))
    hw, hh = r * math.sqrt(aspect), r / math.sqrt(aspect)
    return np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
  if name == 'triangle':
    a = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-15, 15, size=3))
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)
  if name == 'star':
    n = int(rng.choice([5, 6]))
    outer = _regular(n, r, 0.0)
    inner = _regular(n, r * rng.uniform(0.38, 0.55), np.pi / n)
    return np.stack([outer, inner], 1).reshape(-1, 2)
  if name == 'bar':
    aspect = rng.uniform(5, 14)
    hw, hh = r, max(r / aspect, 2.0)  # at least 4 px thick
    return np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
  if name == 'cross':
    t = r * rng.uniform(0.3, 0.45)
    return np.array(
      [
        [-t, -r],
        [t, -r],
        [t, -t],
        [r, -t],
        [r, t],
        [t, t],
        [t, r],
        [-t, r],
        [-t, t],
        [-r, t],
        [-r, -t],
        [-t, -t],
      ]
    )
  raise ValueError(name)


def _place(vertices: np.ndarray, angle: float, cx: float, cy: float) -> np.ndarray:
  c, s = math.cos(angle), math.sin(angle)
  rot = np.array([[c, -s], [s, c]])
  return vertices @ rot.T + np.array([cx, cy])


def _rasterize_polygon(flat: list[float], h: int, w: int) -> np.ndarray:
  """bool [h, w]: pycocotools' rasterization of one polygon (the rule every COCO evaluator uses)."""
  rle = mask_utils.frPyObjects([flat], h, w)
  return mask_utils.decode(rle)[..., 0].astype(bool)


def _ring_mask(
  rng: np.random.Generator, size: float, cx: float, cy: float, h: int, w: int
) -> np.ndarray:
  """bool [h, w]: an elliptical ring, tested at pixel centres."""
  r = size / 2
  aspect = rng.uniform(0.7, 1.0)
  inner = rng.uniform(0.45, 0.7)
  angle = rng.uniform(0, np.pi)
  ys = np.arange(h, dtype=np.float32)[:, None] + 0.5 - np.float32(cy)
  xs = np.arange(w, dtype=np.float32)[None, :] + 0.5 - np.float32(cx)
  c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
  u = (xs * c + ys * s) / np.float32(r)
  v = (-xs * s + ys * c) / np.float32(r * aspect)
  d2 = u * u + v * v
  return (d2 <= 1.0) & (d2 >= inner * inner)


def _distinct_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
  """A colour that differs from most of `under` (the pixels the shape covers, float32 [P, 3]). float32 [3]."""
  c = _colour(rng)
  if not len(under):
    return c
  sample = under[:: max(1, len(under) // 4096)]
  for _ in range(_COLOUR_TRIES):
    if np.mean(np.linalg.norm(sample - c, axis=1) < _SIMILAR_DISTANCE) <= _MAX_SIMILAR:
      break
    c = _colour(rng)
  return c


def _fill(rng: np.random.Generator, mask: np.ndarray, under: np.ndarray) -> np.ndarray:
  """A shape's paint at its P mask pixels: solid colour (60%), gradient or noisy. float32 [P, 3].

  under: float32 [P, 3], the image there before painting; the colours are drawn to stand out from it.
  """
  c0 = _distinct_colour(rng, under)
  kind = rng.random()
  n = int(mask.sum())
  if kind < 0.6:
    return np.broadcast_to(c0, (n, 3))
  if kind < 0.8:
    c1 = _distinct_colour(rng, under)
    ys, xs = np.nonzero(mask)
    t = rng.uniform(0, np.pi)
    coord = xs * np.float32(np.cos(t)) + ys * np.float32(np.sin(t))
    lo, hi = (float(coord.min()), float(coord.max())) if n else (0.0, 1.0)
    frac = ((coord - lo) / max(hi - lo, 1.0)).astype(np.float32)
    return c0 + (c1 - c0) * frac[:, None]
  return c0 + 20.0 * rng.standard_normal((n, 3), dtype=np.float32)


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
  """COCO uncompressed RLE (column-major run lengths, zeros first) of a bool [h, w] mask."""
  flat = np.asarray(mask, bool).T.ravel()
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  runs = np.diff(bounds).tolist()
  if flat.size and flat[0]:
    runs = [0] + runs
  return {'size': [int(mask.shape[0]), int(mask.shape[1])], 'counts': [int(r) for r in runs]}


def _compressed_rle(mask: np.ndarray) -> dict[str, Any]:
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {'size': [int(v) for v in rle['size']], 'counts': rle['counts'].decode('ascii')}


# ---------------------------------------------------------------------------------------- one image


def _image_hw(rng: np.random.Generator, image_size: tuple[int, int]) -> tuple[int, int]:
  lo, hi = int(image_size[0]), int(image_size[1])
  short = int(rng.integers(lo, hi + 1))
  long = short if rng.random() < 0.1 else int(rng.integers(short, hi + 1))
  return (long, short) if rng.random() < 0.4 else (short, long)


def _generate_image(
  rng: np.random.Generator, image_size: tuple[int, int], with_crowd: bool, mean_objects: float
) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """One image (uint8 [h, w, 3]) and its annotations (without ids)."""
  h, w = _image_hw(rng, image_size)
  img = _background(rng, h, w)
  label = np.full((h, w), -1, np.int16)
  # Each layer: (class name, full mask, polygon or None, is_crowd), painted in order (later on top).
  layers: list[tuple[str, np.ndarray, list[float] | None, bool]] = []

  if with_crowd and rng.random() < _P_CROWD:
    name = str(rng.choice(['circle', 'star']))
    region = np.zeros((h, w), bool)
    cx0, cy0 = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    spread = rng.uniform(0.08, 0.2) * min(h, w)
    for _ in range(int(rng.integers(6, 16))):
      v = _place(
        _outline(rng, name, rng.uniform(6, 14)),
        rng.uniform(0, 2 * np.pi),
        cx0 + rng.normal(0, spread),
        cy0 + rng.normal(0, spread),
      )
      region |= _rasterize_polygon(np.round(v, 2).ravel().tolist(), h, w)
    if region.sum() >= _MIN_VISIBLE_PX:
      layers.append((name, region, None, True))

  # Geometric counts (many images with few objects, a tail of crowded ones); before occlusion drops.
  cap = max(9, int(3 * mean_objects))
  num_objects = 0 if rng.random() < _P_EMPTY else int(min(rng.geometric(1 / mean_objects), cap))
  max_size = 0.9 * min(h, w)
  for _ in range(num_objects):
    name = str(rng.choice(_CLASS_NAMES))
    size = math.exp(rng.uniform(math.log(_MIN_SIZE), math.log(max(max_size, _MIN_SIZE))))
    if name == 'bar':
      size = min(size * 1.5, 1.2 * max(h, w))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    if rng.random() < _P_INSIDE:
      cx = float(np.clip(cx, size / 2, w - size / 2)) if size < w else cx
      cy = float(np.clip(cy, size / 2, h - size / 2)) if size < h else cy
    if name == 'ring':
      layers.append((name, _ring_mask(rng, size, cx, cy, h, w), None, False))
      continue
    angle = 0.0 if name == 'circle' else rng.uniform(0, 2 * np.pi)
    v = np.round(_place(_outline(rng, name, size), angle, cx, cy), 2)
    inside = bool(
      (v[:, 0] >= 0).all()
      and (v[:, 0] <= w).all()
      and (v[:, 1] >= 0).all()
      and (v[:, 1] <= h).all()
    )
    flat = v.ravel().tolist()
    layers.append((name, _rasterize_polygon(flat, h, w), flat if inside else None, False))

  for i, (_, mask, _, _) in enumerate(layers):
    label[mask] = i
    img[mask] = _fill(rng, mask, img[mask])

  if rng.random() < 0.5:  # sensor-like noise over everything
    img += np.float32(rng.uniform(1, 6)) * rng.standard_normal((h, w, 3), dtype=np.float32)
  image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

  anns = []
  for i, (name, mask, flat, is_crowd) in enumerate(layers):
    visible = label == i
    area = int(visible.sum())
    full = int(mask.sum())
    if area < _MIN_VISIBLE_PX or area < _MIN_VISIBLE_FRACTION * full:
      continue
    rows = np.flatnonzero(visible.any(1))
    cols = np.flatnonzero(visible.any(0))
    x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
    if is_crowd:
      seg: Any = _uncompressed_rle(visible)
    elif flat is not None and area == full:
      seg = [flat]
    else:
      seg = _compressed_rle(visible)
    anns.append(
      {
        'category_id': _CATEGORY_ID[name],
        'bbox': [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        'area': float(area),
        'iscrowd': int(is_crowd),
        'segmentation': seg,
      }
    )
  return image, anns


def _encode(rng: np.random.Generator, image: np.ndarray) -> tuple[bytes, str]:
  buf = io.BytesIO()
  if rng.random() < _P_PNG:
    Image.fromarray(image).save(buf, 'PNG', compress_level=1)
    return buf.getvalue(), 'png'
  Image.fromarray(image).save(buf, 'JPEG', quality=int(rng.integers(80, 96)))
  return buf.getvalue(), 'jpg'


# ------------------------------------------------------------------------------------------ dataset


def _info(
  split: str, num_images: int, image_size: tuple[int, int], seed: int, mean_objects: float
) -> dict[str, Any]:
  return {
    'mean_objects': float(mean_objects),
    'description': 'retinamask-jax synthetic shapes',
    'generator_version': GENERATOR_VERSION,
    'split': split,
    'num_images': int(num_images),
    'image_size': [int(image_size[0]), int(image_size[1])],
    'seed': int(seed),
  }


def _cached(json_path: str, images_dir: str, info: dict[str, Any]) -> bool:
  try:
    with open(json_path) as f:
      data = json.load(f)
  except (OSError, ValueError):
    return False
  if data.get('info') != info or not os.path.isdir(images_dir):
    return False
  names = {img['file_name'] for img in data.get('images', [])}
  return len(names) == info['num_images'] and names <= set(os.listdir(images_dir))


def generate_shapes(
  split: str,
  num_images: int,
  *,
  image_size: tuple[int, int] = (256, 384),
  seed: int = 0,
  mean_objects: float = 3.5,
):
  """Yields (file_name, encoded bytes, image entry, annotations) per image; deterministic.

  image_size is the (min, max) side range; mean_objects the mean number of shapes drawn per
  non-empty image (some are then hidden by occlusion). Annotations have no ids yet.
  """
  split_code = zlib.crc32(split.encode())
  with_crowd = split.startswith('train')
  for index in range(num_images):
    rng = np.random.default_rng([seed, split_code, index])
    image, anns = _generate_image(rng, image_size, with_crowd, mean_objects)
    data, ext = _encode(rng, image)
    image_id = index + 1
    file_name = f'{image_id:06d}.{ext}'
    entry = {
      'id': image_id,
      'file_name': file_name,
      'height': int(image.shape[0]),
      'width': int(image.shape[1]),
    }
    yield file_name, data, entry, anns


def _write_split(tmp_dir: str, info: dict[str, Any]) -> None:
  """Writes `tmp_dir/images/*` and `tmp_dir/instances.json`."""
  os.makedirs(os.path.join(tmp_dir, 'images'))
  images, annotations = [], []
  for file_name, data, entry, anns in generate_shapes(
    info['split'],
    info['num_images'],
    image_size=tuple(info['image_size']),
    seed=info['seed'],
    mean_objects=info['mean_objects'],
  ):
    with open(os.path.join(tmp_dir, 'images', file_name), 'wb') as f:
      f.write(data)
    images.append(entry)
    for ann in anns:
      annotations.append({'id': len(annotations) + 1, 'image_id': entry['id'], **ann})
  dataset = {
    'info': info,
    'images': images,
    'annotations': annotations,
    'categories': [{'id': cid, 'name': name, 'supercategory': 'shape'} for cid, name in CATEGORIES],
  }
  with open(os.path.join(tmp_dir, 'instances.json'), 'w') as f:
    json.dump(dataset, f, separators=(',', ':'))


def write_shapes_dataset(
  root: str,
  split: str,
  num_images: int,
  *,
  image_size: tuple[int, int] = (256, 384),
  seed: int = 0,
  mean_objects: float = 3.5,
) -> tuple[str, str]:
  """Writes (or finds) the shapes dataset in `root/<split>/`; returns (json_path, images_dir).

  Cached: when `root/<split>/instances.json` exists, records the same parameters and generator
  version in its `info`, and all its images are present, nothing is written. Otherwise the split is
  generated into a temporary directory and renamed into place, the JSON last, so a killed run never
  leaves a dataset that looks complete. A lock file serialises concurrent writers of the same split
  (local file systems).

  image_size: (min, max) range of image sides. mean_objects: mean number of shapes drawn per
  non-empty image (COCO averages ~7 instances per image; small defaults keep CPU training quick).
  Splits whose name starts with 'train' also get a few crowd regions.
  """
  if num_images < 0:
    raise ValueError(f'num_images must be >= 0, got {num_images}')
  lo, hi = int(image_size[0]), int(image_size[1])
  if not 8 <= lo <= hi:
    raise ValueError(f'image_size must be (min, max) sides with 8 <= min <= max, got {image_size}')
  if mean_objects < 1:
    raise ValueError(f'mean_objects must be >= 1, got {mean_objects}')
  info = _info(split, num_images, (lo, hi), seed, mean_objects)
  split_dir = os.path.join(root, split)
  json_path = os.path.join(split_dir, 'instances.json')
  images_dir = os.path.join(split_dir, 'images')
  if _cached(json_path, images_dir, info):
    return json_path, images_dir

  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f'.{split}.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if _cached(json_path, images_dir, info):  # another process finished it while we waited
        return json_path, images_dir
      logging.info('writing %d synthetic shapes images to %s', num_images, split_dir)
      # Leftovers of killed writers of this split (we hold its lock, so none is running).
      for name in os.listdir(root):
        if name.startswith(f'.{split}.tmp-'):
          shutil.rmtree(os.path.join(root, name), ignore_errors=True)
      tmp_dir = os.path.join(root, f'.{split}.tmp-{os.getpid()}')
      try:
        _write_split(tmp_dir, info)
        # Invalidate the old split first (its JSON), then swap the directory in; the JSON moves
        # into place last.
        with contextlib.suppress(FileNotFoundError):
          os.remove(json_path)
        shutil.rmtree(split_dir, ignore_errors=True)
        os.makedirs(split_dir)
        os.rename(os.path.join(tmp_dir, 'images'), images_dir)
        os.replace(os.path.join(tmp_dir, 'instances.json'), json_path)
      finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return json_path, images_dir
