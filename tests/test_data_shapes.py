"""Tests for the synthetic shapes dataset writer (retinamask_jax.data.shapes)."""

import collections
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from retinamask_jax.data import coco as coco_lib
from retinamask_jax.data import shapes

pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')

SIZE = (48, 112)


@pytest.fixture(scope='module')
def train_split(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('shapes'))
  json_path, images_dir = shapes.write_shapes_dataset(root, 'train', 120, image_size=SIZE, seed=3)
  with open(json_path) as f:
    return root, json_path, images_dir, json.load(f)


def _decode(seg, h, w):
  if isinstance(seg, list):
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))).astype(bool)
  if isinstance(seg['counts'], list):
    return mask_utils.decode(mask_utils.frPyObjects(seg, h, w)).astype(bool)
  return mask_utils.decode(dict(seg, counts=seg['counts'].encode())).astype(bool)


def test_layout_and_content(train_split):
  root, json_path, images_dir, data = train_split
  assert json_path == os.path.join(root, 'train', 'instances.json')
  assert images_dir == os.path.join(root, 'train', 'images')
  cat_ids = [c['id'] for c in data['categories']]
  assert cat_ids == [1, 2, 5, 7, 8, 11, 13]  # non-contiguous on purpose
  assert data['info']['generator_version'] == shapes.GENERATOR_VERSION
  images = data['images']
  assert len(images) == 120 and len({i['id'] for i in images}) == 120
  exts = collections.Counter(os.path.splitext(i['file_name'])[1] for i in images)
  assert exts['.jpg'] > 0 and exts['.png'] > 0
  orientations = collections.Counter(i['width'] >= i['height'] for i in images)
  assert orientations[True] > 0 and orientations[False] > 0
  for img in images:
    short, long = sorted((img['height'], img['width']))
    assert SIZE[0] <= short <= long <= SIZE[1]
    with Image.open(os.path.join(images_dir, img['file_name'])) as f:
      assert f.size == (img['width'], img['height']) and f.mode == 'RGB'
  per_image = collections.Counter(a['image_id'] for a in data['annotations'])
  assert sum(1 for i in images if per_image[i['id']] == 0) > 0  # some images have no objects
  assert max(per_image.values()) >= 4
  assert {a['category_id'] for a in data['annotations']} == set(cat_ids)


def test_annotations_match_their_masks(train_split):
  _, _, _, data = train_split
  sizes = {i['id']: (i['height'], i['width']) for i in data['images']}
  by_image = collections.defaultdict(list)
  kinds = collections.Counter()
  areas = []
  for ann in data['annotations']:
    h, w = sizes[ann['image_id']]
    mask = _decode(ann['segmentation'], h, w)
    ys, xs = np.nonzero(mask)
    x, y, bw, bh = ann['bbox']
    # bbox is the mask's pixel extent, area its pixel count.
    assert (x, y, x + bw, y + bh) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert ann['area'] == mask.sum() >= 20
    seg = ann['segmentation']
    if ann['iscrowd']:
      kinds['crowd'] += 1
      assert isinstance(seg['counts'], list)  # uncompressed RLE, as COCO crowd regions
    elif isinstance(seg, list):
      kinds['polygon'] += 1
      assert ann['category_id'] != 8  # rings (holes) are never polygons
    else:
      kinds['rle'] += 1
      assert isinstance(seg['counts'], str)
    by_image[ann['image_id']].append(mask)
    areas.append(ann['area'] / (h * w))
  assert kinds['polygon'] > 0 and kinds['rle'] > 0 and kinds['crowd'] > 0
  # Annotations are visible parts: the masks of one image never overlap.
  for masks in by_image.values():
    assert (np.sum(masks, axis=0) <= 1).all()
  # Sizes span small (< 1% of the image) to large (> 20%).
  assert min(areas) < 0.01 and max(areas) > 0.2


def test_rings_have_holes(train_split):
  _, _, _, data = train_split
  sizes = {i['id']: (i['height'], i['width']) for i in data['images']}
  holes = 0
  for ann in data['annotations']:
    if ann['category_id'] != 8 or ann['area'] < 200:
      continue
    h, w = sizes[ann['image_id']]
    mask = _decode(ann['segmentation'], h, w)
    x, y, bw, bh = (int(v) for v in ann['bbox'])
    cy, cx = y + bh // 2, x + bw // 2
    holes += not mask[cy, cx]
  assert holes > 0


def test_deterministic_and_cached(tmp_path, monkeypatch):
  a = shapes.write_shapes_dataset(str(tmp_path / 'a'), 'val', 12, image_size=SIZE, seed=7)
  b = shapes.write_shapes_dataset(str(tmp_path / 'b'), 'val', 12, image_size=SIZE, seed=7)
  assert open(a[0], 'rb').read() == open(b[0], 'rb').read()
  for name in sorted(os.listdir(a[1])):
    with open(os.path.join(a[1], name), 'rb') as fa, open(os.path.join(b[1], name), 'rb') as fb:
      assert fa.read() == fb.read()
  data = json.load(open(a[0]))
  assert not any(ann['iscrowd'] for ann in data['annotations'])  # crowd regions: train only
  other = shapes.write_shapes_dataset(str(tmp_path / 'c'), 'val', 12, image_size=SIZE, seed=8)
  assert open(other[0], 'rb').read() != open(a[0], 'rb').read()

  # Cached: a second call writes nothing.
  def boom(*args, **kwargs):
    raise AssertionError('regenerated a cached dataset')

  monkeypatch.setattr(shapes, 'generate_shapes', boom)
  assert shapes.write_shapes_dataset(str(tmp_path / 'a'), 'val', 12, image_size=SIZE, seed=7) == a
  # Different parameters, or a missing image, regenerate.
  with pytest.raises(AssertionError, match='regenerated'):
    shapes.write_shapes_dataset(str(tmp_path / 'a'), 'val', 13, image_size=SIZE, seed=7)
  monkeypatch.undo()
  os.remove(os.path.join(a[1], sorted(os.listdir(a[1]))[0]))
  again = shapes.write_shapes_dataset(str(tmp_path / 'a'), 'val', 12, image_size=SIZE, seed=7)
  assert open(again[0], 'rb').read() == open(b[0], 'rb').read()
  assert sorted(os.listdir(again[1])) == sorted(os.listdir(b[1]))


def test_killed_run_leaves_no_complete_looking_dataset(tmp_path, monkeypatch):
  root = str(tmp_path)
  shapes.write_shapes_dataset(root, 'train', 4, image_size=SIZE, seed=0)
  real = shapes.generate_shapes

  def dies_midway(*args, **kwargs):
    for i, item in enumerate(real(*args, **kwargs)):
      if i == 3:
        raise KeyboardInterrupt
      yield item

  monkeypatch.setattr(shapes, 'generate_shapes', dies_midway)
  with pytest.raises(KeyboardInterrupt):
    shapes.write_shapes_dataset(root, 'train', 6, image_size=SIZE, seed=0)
  monkeypatch.undo()
  # The old split is still complete (the new one never replaced it), and a new run finishes.
  json_path, images_dir = shapes.write_shapes_dataset(root, 'train', 4, image_size=SIZE, seed=0)
  assert len(os.listdir(images_dir)) == 4
  json_path, images_dir = shapes.write_shapes_dataset(root, 'train', 6, image_size=SIZE, seed=0)
  assert len(json.load(open(json_path))['images']) == 6 and len(os.listdir(images_dir)) == 6
  assert not [n for n in os.listdir(root) if '.tmp' in n]


def test_loads_cleanly(train_split):
  _, json_path, images_dir, data = train_split
  ds = coco_lib.load_coco(json_path, images_dir, crowd='ignore')
  assert ds.num_classes == 7 and len(ds.records) == 120
  assert ds.report == {}  # a well-formed dataset: nothing to report
  assert sum(len(r.crowd_boxes) for r in ds.records) > 0
  with pytest.raises(ValueError):
    shapes.write_shapes_dataset('/tmp/unused', 'x', 1, image_size=(4, 2))


def test_v2_instances_are_visible_enough(train_split):
  """Generator v2 keeps no sliver: every non-crowd instance shows at least _MIN_VISIBLE_PX pixels."""
  _, _, _, data = train_split
  areas = [a['area'] for a in data['annotations'] if not a['iscrowd']]
  assert areas and min(areas) >= shapes._MIN_VISIBLE_PX


@pytest.mark.parametrize('background', ['uniform', 'two_colour_stripes'])
def test_fill_colours_stand_out_from_what_lies_under_them(background):
  """_distinct_colour's contract, checked in float64: at most _MAX_SIMILAR of the covered pixels lie within
  _SIMILAR_DISTANCE of the colour, for backgrounds where a random colour often fails it."""
  rng = np.random.default_rng(0)
  grey = np.full((400, 3), 128.0, np.float32)
  if background == 'uniform':
    under = grey
  else:
    under = np.concatenate([grey[:200], np.full((200, 3), 30.0, np.float32)])
  for _ in range(50):
    c = shapes._distinct_colour(rng, under).astype(np.float64)
    near = np.linalg.norm(under.astype(np.float64) - c, axis=1) < shapes._SIMILAR_DISTANCE
    assert near.mean() <= shapes._MAX_SIMILAR



def _generated_counts(tmp_path, **shapes_config) -> list[int]:
  """Visible instances in the train and val splits that `prepare_datasets` generates from the tiny config."""
  from configs import tiny
  from retinamask_jax.train import datasets

  c = tiny.get_config()
  c.data.shapes.num_train = c.data.shapes.num_val = 12
  c.data.shapes.update(shapes_config)
  train, val = datasets.prepare_datasets(c, str(tmp_path))
  return [sum(len(r.boxes) for r in d.records) for d in (train, val)]


def test_config_mean_objects_sets_both_splits_and_train_mean_objects_the_train_split(tmp_path):
  """`data.shapes.mean_objects` is how many shapes each generated image draws on average, in both splits;
  `train_mean_objects`, when set, overrides it for the train split alone (the same val bytes)."""
  sparse = _generated_counts(tmp_path / 'a', mean_objects=2.0)
  dense = _generated_counts(tmp_path / 'b', mean_objects=8.0)
  assert dense[0] > 1.5 * sparse[0] and dense[1] > 1.5 * sparse[1], (sparse, dense)
  dense_train = _generated_counts(tmp_path / 'c', mean_objects=2.0, train_mean_objects=8.0)
  assert dense_train == [dense[0], sparse[1]], (sparse, dense, dense_train)
  with open(os.path.join(str(tmp_path / 'c'), 'data', 'shapes', 'val', 'images', '..', 'instances.json')) as f:
    assert json.load(f)['info']['mean_objects'] == 2.0
