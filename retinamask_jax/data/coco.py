"""COCO-format instances JSON -> `CocoDataset` of picklable `ImageRecord`s (+ pycocotools COCO).

Rules (authors_code_spec.md 1.3 and 3.4, with our continuous xyxy convention):
- COCO `bbox` [x, y, w, h] -> (x, y, x + w, y + h), clipped to [0, width] x [0, height] of the image
  entry.
- Dropped annotations: boxes with w or h < 1 px after clipping (the authors' +1 rule removes the
  same ones), malformed or non-finite boxes, unknown category ids. Each is reported once and counted
  in `report`.
- Crowd (`iscrowd=1`): `crowd='drop'` removes them entirely (the authors); `crowd='ignore'` keeps
  them as ignore regions (`ImageRecord.crowd_*`), emitted by the pipeline as rows with class -1.
- Segmentations: polygons with fewer than 3 points (or an odd number of coordinates, or non-finite
  ones) are dropped one by one; an annotation left with no valid polygon keeps its box, and its mask
  target becomes the filled box (`segmentation = None`), reported as 'no_valid_polygon'. The same
  holds for missing segmentations and for RLEs whose `size` differs from the image's. Polygons are
  stored as float64 arrays (exact, and several times more compact than lists of Python floats when
  the records are pickled into grain workers).
- Images without any (remaining) annotation are kept: all-negative images are valid training images
  here.
- Image entries without a usable file name or size are skipped (reported). Image files are not
  opened here: a missing or undecodable file is reported when the pipeline first loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from pycocotools.coco import COCO

# At most this many individual log lines per problem kind; the rest only appear in the summary
# counts.
MAX_LOGGED_PER_KIND = 20


@dataclasses.dataclass
class ImageRecord:
  """One image and its training targets, in original image pixels (plain data, cheap to pickle).

  boxes: [n, 4] float32 continuous xyxy; classes: [n] int32 in 1..K; segmentations: n entries, each
  a list of float64 polygon arrays, an RLE dict, or None (filled box); ann_ids: [n] int64. crowd_*:
  the crowd annotations kept as ignore regions (crowd='ignore' only), same layouts.
  image_bytes / image_ref: the encoded file in memory / a reader of it (TFDS); `file_name` is then
  only a name for messages.
  """

  image_id: int
  file_name: str
  height: int
  width: int
  boxes: np.ndarray
  classes: np.ndarray
  segmentations: list[Any]
  ann_ids: np.ndarray
  crowd_boxes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 4), np.float32))
  crowd_segmentations: list[Any] = dataclasses.field(default_factory=list)
  crowd_ann_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int64))
  image_bytes: bytes | None = None
  # Where to read the encoded image when it is neither a file nor in memory (an object with a
  # picklable `read() -> bytes`, e.g. a TFDS array_record entry).
  image_ref: Any = None

  @property
  def landscape(self) -> bool:
    """Orientation group of the image: landscape when w >= h."""
    return self.width >= self.height


@dataclasses.dataclass
class CocoDataset:
  """A loaded COCO-format dataset.

  category_ids[k - 1] is the dataset category id of contiguous class k (1..K, sorted by category
  id); `category_to_class` maps the other way. `coco` is the pycocotools object (for COCOeval), None
  for sources without a JSON (TFDS). `report` counts every problem found, by kind.
  """

  records: list[ImageRecord]
  category_ids: tuple[int, ...]
  class_names: tuple[str, ...]
  coco: COCO | None
  report: dict[str, int]
  json_path: str = ''
  images_dir: str = ''

  @property
  def num_classes(self) -> int:
    return len(self.category_ids)

  @property
  def category_to_class(self) -> dict[int, int]:
    return {c: k + 1 for k, c in enumerate(self.category_ids)}

  @property
  def class_to_category(self) -> dict[int, int]:
    return {k + 1: c for k, c in enumerate(self.category_ids)}


# Kinds that are counted like problems but are ordinary COCO content, handled as detectron2 does: logged as
# information, not as warnings, and summed up apart from the data problems.
INFORMATION_KINDS = frozenset({'crowd_dropped'})


class _Reporter:
  """Counts problems by kind and logs the first MAX_LOGGED_PER_KIND of each (once per key)."""

  def __init__(self, source: str, silent: Sequence[str] = ()):
    self.source = source
    self.silent = frozenset(silent)  # expected conditions: neither logged nor counted
    self.counts: dict[str, int] = {}
    self._seen: set[tuple[str, Any]] = set()

  def __call__(self, kind: str, key: Any, what: str) -> None:
    if kind in self.silent or (kind, key) in self._seen:
      return
    self._seen.add((kind, key))
    n = self.counts.get(kind, 0) + 1
    self.counts[kind] = n
    # Information comes as one count (summary), not one line per annotation: debug level for those.
    log = logging.debug if kind in INFORMATION_KINDS else logging.warning
    if n <= MAX_LOGGED_PER_KIND:
      log('[data: %s] %s: %s', kind, self.source, what)
    elif n == MAX_LOGGED_PER_KIND + 1:
      log('[data: %s] %s: more of these; only the count is reported from now on', kind, self.source)

  def summary(self) -> None:
    problems = {k: v for k, v in self.counts.items() if k not in INFORMATION_KINDS}
    notes = {k: v for k, v in self.counts.items() if k in INFORMATION_KINDS}
    if problems:
      logging.warning(
        'data problems in %s (each handled as logged): %s',
        self.source,
        ', '.join(f'{k}={v}' for k, v in sorted(problems.items())),
      )
    if notes:
      logging.info('%s: %s', self.source, ', '.join(f'{k}={v}' for k, v in sorted(notes.items())))


def _fmt(box: np.ndarray) -> str:
  return '[' + ', '.join(f'{float(v):g}' for v in box) + ']'


def _finite(values: Sequence[Any]) -> bool:
  try:
    return all(math.isfinite(float(v)) for v in values)
  except (TypeError, ValueError):
    return False


def _clean_segmentation(seg: Any, ann_id: Any, height: int, width: int, report: _Reporter) -> Any:
  """Validated segmentation: float64 polygon arrays, an RLE dict, or None (use the filled box)."""
  if isinstance(seg, dict):
    size = seg.get('size')
    counts = seg.get('counts')
    if not (
      isinstance(size, (list, tuple)) and len(size) == 2 and isinstance(counts, (str, bytes, list))
    ):
      report('bad_rle', ann_id, f'annotation {ann_id}: malformed RLE; mask target = filled box')
      return None
    if (int(size[0]), int(size[1])) != (height, width):
      report(
        'rle_size_mismatch',
        ann_id,
        f'annotation {ann_id}: RLE size {list(size)} != image size [{height}, {width}]; '
        'mask target = filled box',
      )
      return None
    return {'size': [int(size[0]), int(size[1])], 'counts': counts}
  if not isinstance(seg, (list, tuple)) or not seg:
    report(
      'no_segmentation', ann_id, f'annotation {ann_id}: no segmentation; mask target = filled box'
    )
    return None
  if all(isinstance(v, (int, float)) for v in seg):
    seg = [seg]  # a single flat polygon instead of a list of polygons
  polys = []
  for p in seg:
    arr = None
    if isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0:
      try:
        arr = np.asarray(p, np.float64)
      except (TypeError, ValueError):
        arr = None
    if arr is not None and arr.ndim == 1 and np.isfinite(arr).all():
      polys.append(arr)
    else:
      report(
        'bad_polygon',
        ann_id,
        f'annotation {ann_id}: polygon with {len(p) if hasattr(p, "__len__") else "?"} coordinates '
        '(need an even number >= 6, finite) dropped',
      )
  if not polys:
    report(
      'no_valid_polygon',
      ann_id,
      f'annotation {ann_id}: no valid polygon left; mask target = filled box',
    )
    return None
  return polys


def _build_records(
  data: dict[str, Any],
  images_dir: str,
  crowd: str,
  category_to_class: dict[int, int],
  report: _Reporter,
) -> list[ImageRecord]:
  anns_by_image: dict[Any, list[dict[str, Any]]] = {}
  for ann in data.get('annotations', []) or []:
    anns_by_image.setdefault(ann.get('image_id'), []).append(ann)

  records: list[ImageRecord] = []
  seen_ids: set[Any] = set()
  for img in data.get('images', []) or []:
    image_id = img.get('id')
    file_name = img.get('file_name')
    try:
      height, width = int(img.get('height')), int(img.get('width'))
    except (TypeError, ValueError):
      height = width = 0
    if image_id is None or not file_name or height <= 0 or width <= 0:
      report(
        'bad_image_entry',
        image_id,
        f'image {image_id} ({file_name}): no id, file name or size; skipped',
      )
      continue
    if image_id in seen_ids:
      report(
        'duplicate_image_id', image_id, f'image id {image_id} appears twice; second entry skipped'
      )
      continue
    seen_ids.add(image_id)

    boxes, classes, segs, ann_ids = [], [], [], []
    cboxes, csegs, cids = [], [], []
    for ann in anns_by_image.get(image_id, []):
      ann_id = ann.get('id')
      is_crowd = bool(ann.get('iscrowd', 0))
      if is_crowd and crowd == 'drop':
        report('crowd_dropped', ann_id, f'annotation {ann_id}: crowd, dropped (data.crowd=drop)')
        continue
      cat = ann.get('category_id')
      if cat not in category_to_class:
        report(
          'unknown_category', ann_id, f'annotation {ann_id}: unknown category id {cat}; dropped'
        )
        continue
      bbox = ann.get('bbox')
      if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and _finite(bbox)):
        report('bad_bbox', ann_id, f'annotation {ann_id}: malformed bbox {bbox!r}; dropped')
        continue
      x, y, w, h = (float(v) for v in bbox)
      box = np.array([x, y, x + w, y + h], np.float64)
      clipped = box.copy()
      clipped[0::2] = np.clip(clipped[0::2], 0, width)
      clipped[1::2] = np.clip(clipped[1::2], 0, height)
      if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
        report(
          'degenerate_box',
          ann_id,
          f'annotation {ann_id}: box {_fmt(box)} smaller than 1 px inside the '
          f'{height}x{width} image; dropped',
        )
        continue
      if np.abs(clipped - box).max() > 1e-3:
        report(
          'box_clipped',
          ann_id,
          f'annotation {ann_id}: box {_fmt(box)} clipped to the '
          f'{height}x{width} image',
        )
      seg = _clean_segmentation(ann.get('segmentation'), ann_id, height, width, report)
      if is_crowd:
        cboxes.append(clipped)
        csegs.append(seg)
        cids.append(ann_id if isinstance(ann_id, int) else -1)
      else:
        boxes.append(clipped)
        classes.append(category_to_class[cat])
        segs.append(seg)
        ann_ids.append(ann_id if isinstance(ann_id, int) else -1)
    records.append(
      ImageRecord(
        image_id=int(image_id),
        file_name=os.path.join(images_dir, file_name),
        height=height,
        width=width,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        classes=np.asarray(classes, np.int32),
        segmentations=segs,
        ann_ids=np.asarray(ann_ids, np.int64),
        crowd_boxes=np.asarray(cboxes, np.float32).reshape(-1, 4),
        crowd_segmentations=csegs,
        crowd_ann_ids=np.asarray(cids, np.int64),
      )
    )
  orphans = set(anns_by_image) - seen_ids
  for image_id in orphans:
    report(
      'orphan_annotations',
      image_id,
      f'{len(anns_by_image[image_id])} annotations refer to image id {image_id}, not in "images"; '
      'dropped',
    )
  return records


def _is_polygon(p: Any) -> bool:
  # Structure only (a finiteness scan of every COCO coordinate would cost seconds).
  return isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0


def _eval_segmentation(seg: Any, size: Any, bbox: Sequence[float]) -> Any:
  """None when COCOeval can decode `seg`, else its valid polygons, else the box polygon."""
  if isinstance(seg, dict):
    if 'counts' in seg and list(seg.get('size') or ()) == size:
      return None
  elif isinstance(seg, list) and seg:
    valid = [p for p in seg if _is_polygon(p)]
    if len(valid) == len(seg):
      return None
    if valid:
      return valid
  x, y, w, h = (float(v) for v in bbox)
  return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _eval_ground_truth(data: dict[str, Any], report: _Reporter) -> dict[str, Any]:
  """The JSON as COCOeval needs it (problems fixed so that evaluation cannot crash).

  Annotations without id/image_id/category_id or a valid bbox are removed, missing area and iscrowd
  filled in, invalid polygons removed, and segmentations with nothing usable left (or RLEs of the
  wrong size) replaced by the box polygon, so that segm evaluation runs.

  Only entries that need a change are copied; a well-formed COCO file passes through untouched.
  """
  sizes = {
    img.get('id'): [img.get('height'), img.get('width')]
    for img in data.get('images', []) or []
    if isinstance(img, dict)
  }
  anns = []
  for ann in data.get('annotations', []) or []:
    if not isinstance(ann, dict) or any(k not in ann for k in ('id', 'image_id', 'category_id')):
      report(
        'eval_gt_dropped',
        id(ann),
        f'annotation {ann!r:.80}: no id/image_id/category_id; not evaluated',
      )
      continue
    bbox = ann.get('bbox')
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and _finite(bbox)):
      report('eval_gt_dropped', ann['id'], f'annotation {ann["id"]}: malformed bbox; not evaluated')
      continue
    fix: dict[str, Any] = {}
    if 'area' not in ann:
      fix['area'] = float(bbox[2]) * float(bbox[3])
    if 'iscrowd' not in ann:
      fix['iscrowd'] = 0
    seg = _eval_segmentation(ann.get('segmentation'), sizes.get(ann['image_id']), bbox)
    if seg is not None:
      fix['segmentation'] = seg
      report(
        'eval_gt_segmentation_fixed',
        ann['id'],
        f'annotation {ann["id"]}: segmentation not fully usable (invalid polygons or RLE size); '
        'segm evaluation uses its valid polygons, or else its box',
      )
    anns.append({**ann, **fix} if fix else ann)
  return {**data, 'annotations': anns}


def coco_from_dict(
  data: dict[str, Any],
  images_dir: str = '',
  *,
  crowd: str = 'drop',
  source: str = '<dict>',
  expect_masks: bool = True,
) -> CocoDataset:
  """A `CocoDataset` from an already parsed COCO instances dict (see `load_coco`).

  source: names the data in messages. expect_masks=False (box-only data, e.g. TFDS coco) stops
  reporting every annotation's missing segmentation: their mask targets are the filled boxes.
  """
  if crowd not in ('drop', 'ignore'):
    raise ValueError(f"crowd must be 'drop' or 'ignore', got {crowd!r}")
  if not isinstance(data, dict) or not isinstance(data.get('images'), list):
    raise ValueError(f'{source}: not a COCO instances file (no "images" list)')
  silent = () if expect_masks else ('no_segmentation', 'eval_gt_segmentation_fixed')
  report = _Reporter(source, silent=silent)

  categories: dict[int, str] = {}
  for cat in data.get('categories', []) or []:
    cid = cat.get('id')
    if not isinstance(cid, int) or cid in categories:
      report(
        'bad_category', cid, f'category entry {cat!r}: missing or duplicate integer id; ignored'
      )
      continue
    categories[cid] = str(cat.get('name', cid))
  if not categories:
    raise ValueError(f'{source}: no categories')
  category_ids = tuple(sorted(categories))
  category_to_class = {c: k + 1 for k, c in enumerate(category_ids)}

  records = _build_records(data, images_dir, crowd, category_to_class, report)

  # pycocotools prints progress to stdout; build it from the parsed dict instead of reading the file
  # twice.
  coco = COCO()
  coco.dataset = _eval_ground_truth(data, report)
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  report.summary()
  logging.info('%s: %d images, %d categories', source, len(records), len(category_ids))
  return CocoDataset(
    records=records,
    category_ids=category_ids,
    class_names=tuple(categories[c] for c in category_ids),
    coco=coco,
    report=dict(report.counts),
    json_path='',
    images_dir=images_dir,
  )


def load_coco(json_path: str, images_dir: str, *, crowd: str = 'drop') -> CocoDataset:
  """Reads a COCO instances JSON; `images_dir` holds the files named by `images[].file_name`.

  crowd: 'drop' (the authors: crowd annotations removed) or 'ignore' (kept as ignore regions).
  Returns a `CocoDataset` whose records follow the JSON's image order. Raises ValueError (naming the
  file) when the JSON is unreadable or has no categories.
  """
  if crowd not in ('drop', 'ignore'):
    raise ValueError(f"crowd must be 'drop' or 'ignore', got {crowd!r}")
  try:
    with open(json_path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{json_path}: cannot read COCO JSON ({e})') from e
  ds = coco_from_dict(data, images_dir, crowd=crowd, source=json_path)
  ds.json_path = json_path
  return ds
