"""TFDS array_record sources (`tfds.data_source`, no TensorFlow needed) as a `CocoDataset`.

Maps the features of TFDS `coco/2017`-style datasets into the records `coco.load_coco` makes, so the
same pipeline, rules and evaluation apply:
  image          encoded image (read undecoded: PIL decodes it in the pipeline)
  image/id       -> image_id (default: the example index + 1); an example repeating an earlier id is
                 skipped with its objects (counted in `report['duplicate_image_id']`)
  image/filename -> file_name, for messages only (default: '<split>[<index>]')
  objects/bbox   normalized (ymin, xmin, ymax, xmax) -> pixel xyxy
  objects/label  ClassLabel 0..K-1 -> class 1..K (class names from the ClassLabel)
  objects/is_crowd, objects/id (annotation ids)
  objects/area   -> area (for COCOeval's area ranges; default: the mask's pixel count, else the box's)
  objects/mask   optional: per-object masks [H, W] or [H, W, 1] -> compressed RLE (when absent, the
                 mask targets are the filled boxes; TFDS `coco/2017` has no masks)
Through a COCO-format dict, so boxes are clipped, degenerate ones dropped, crowd handled
(`crowd='drop'|'ignore'`) and problems reported exactly as for a JSON file; `coco` is a pycocotools
object built from the same ground truth, so COCOeval works on TFDS validation splits.

The class of label k is k + 1; `category_ids` maps classes to the category ids written in results
(default 1..K; for TFDS coco pass the 80 COCO ids in label order to compare with official numbers).
Images are read lazily from the array_record files (`ImageRecord.image_ref`, picklable for grain
workers; each process opens the data source once) unless `in_memory=True`. Loading reads every
example once (annotations are stored with the images), without decoding the images: only their
headers are parsed, for the sizes.

Requires `tensorflow-datasets` (and its `array_record` dependency); imported on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image
from pycocotools import mask as mask_utils

from retinamask_jax.data import coco as coco_lib


def _tfds():
  try:
    import tensorflow_datasets as tfds  # noqa: PLC0415  (optional, heavy dependency)
  except ImportError as e:
    raise ImportError(
      'TFDS sources need tensorflow-datasets (pip install tensorflow-datasets); TensorFlow itself '
      'is not needed for array_record data'
    ) from e
  return tfds


@functools.lru_cache(maxsize=8)
def _source(builder_dir: str, split: str) -> Any:
  """The split's data source with undecoded images (once per process)."""
  tfds = _tfds()
  builder = tfds.builder_from_directory(builder_dir)
  return builder.as_data_source(split=split, decoders={'image': tfds.decode.SkipDecoding()})


@dataclasses.dataclass(frozen=True)
class TfdsImageRef:
  """Reads the encoded image of example `index` of a prepared TFDS split (picklable)."""

  builder_dir: str
  split: str
  index: int

  def read(self) -> bytes:
    return _source(self.builder_dir, self.split)[self.index]['image']


def _column(objects: dict[str, Any], key: str, n: int, default: Any) -> list[Any]:
  values = objects.get(key)
  if values is None:
    return [default] * n
  return list(values)


def load_tfds(
  name: str | None = None,
  *,
  split: str,
  data_dir: str | None = None,
  builder_dir: str | None = None,
  crowd: str = 'drop',
  category_ids: Sequence[int] | None = None,
  in_memory: bool = False,
) -> coco_lib.CocoDataset:
  """A prepared TFDS split (array_record) as a `CocoDataset`.

  Either `name` (e.g. 'coco/2017', with `data_dir`) or `builder_dir` (the prepared version directory,
  e.g. '~/tensorflow_datasets/coco/2017/1.1.0'). split: e.g. 'train', 'validation[:500]'.
  category_ids: the category id of each label (len K), for results files; default 1..K.
  """
  tfds = _tfds()
  if builder_dir is None:
    if name is None:
      raise ValueError('load_tfds needs a dataset name or a builder_dir')
    builder = tfds.builder(name, data_dir=data_dir)
    builder_dir = str(builder.data_dir)
  else:
    builder = tfds.builder_from_directory(builder_dir)
  label = builder.info.features['objects']['label']
  names = tuple(label.names)
  if category_ids is None:
    category_ids = tuple(range(1, len(names) + 1))
  if len(category_ids) != len(names):
    raise ValueError(f'{len(category_ids)} category_ids for {len(names)} labels')
  source = _source(builder_dir, split)

  images, annotations, refs, has_masks = [], [], {}, False
  duplicates: list[int] = []
  for index in range(len(source)):
    ex = source[index]
    image_id = int(ex.get('image/id', index + 1))
    if image_id in refs:
      # Skipped whole: passed on, its objects would join the first example's (annotations link by image id).
      duplicates.append(index)
      continue
    data = ex['image']
    with Image.open(io.BytesIO(data)) as img:  # header only: the size
      width, height = img.size
    file_name = ex.get('image/filename') or f'{split}[{index}]'
    if isinstance(file_name, bytes):
      file_name = file_name.decode()
    images.append({'id': image_id, 'file_name': str(file_name), 'height': height, 'width': width})
    refs[image_id] = data if in_memory else TfdsImageRef(builder_dir, split, index)
    objects = ex.get('objects', {})
    boxes = np.asarray(objects.get('bbox', np.zeros((0, 4))), np.float64).reshape(-1, 4)
    n = len(boxes)
    labels = _column(objects, 'label', n, 0)
    crowd_flags = _column(objects, 'is_crowd', n, False)
    ann_ids = _column(objects, 'id', n, None)
    areas = _column(objects, 'area', n, None)
    masks = objects.get('mask')
    has_masks = has_masks or masks is not None
    for k in range(n):
      ymin, xmin, ymax, xmax = boxes[k]
      x, y = xmin * width, ymin * height
      w, h = (xmax - xmin) * width, (ymax - ymin) * height
      ann: dict[str, Any] = {
        'id': int(ann_ids[k]) if ann_ids[k] is not None else len(annotations) + 1,
        'image_id': image_id,
        'category_id': int(category_ids[int(labels[k])]),
        'bbox': [float(x), float(y), float(w), float(h)],
        'iscrowd': int(bool(crowd_flags[k])),
      }
      mask_area = None
      if masks is not None:
        m = np.asarray(masks[k]).reshape(height, width) > 0
        rle = mask_utils.encode(np.asfortranarray(m, dtype=np.uint8))
        ann['segmentation'] = {'size': [height, width], 'counts': rle['counts'].decode('ascii')}
        mask_area = float(m.sum())
      # The dataset's own area first (COCO's: the mask's, not the box's): COCOeval sorts ground truth
      # into its small/medium/large ranges by it, so another area changes those numbers.
      if areas[k] is not None:
        ann['area'] = float(areas[k])
      elif mask_area is not None:
        ann['area'] = mask_area
      else:
        ann['area'] = float(w * h)
      annotations.append(ann)
  data = {
    'images': images,
    'annotations': annotations,
    'categories': [{'id': int(c), 'name': nm} for c, nm in zip(category_ids, names)],
  }
  ds = coco_lib.coco_from_dict(
    data, '', crowd=crowd, source=f'tfds:{builder_dir}[{split}]', expect_masks=has_masks
  )
  if duplicates:
    logging.warning(
      'tfds:%s[%s]: %d examples repeat an earlier image/id and are skipped (indices %s)',
      builder_dir,
      split,
      len(duplicates),
      ', '.join(map(str, duplicates[:10])) + (', ...' if len(duplicates) > 10 else ''),
    )
    ds.report['duplicate_image_id'] = len(duplicates)
  for record in ds.records:
    ref = refs[record.image_id]
    if in_memory:
      record.image_bytes = ref
    else:
      record.image_ref = ref
  return ds
