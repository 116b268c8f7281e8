"""Tests for the grain input pipeline (retinamask_jax.data.pipeline): contract, order, shards."""

import collections
import copy
import dataclasses
import gc
import os
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from configs import base
from retinamask_jax.data import coco as coco_lib
from retinamask_jax.data import pipeline, shapes
from retinamask_jax.data import transforms as T

pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')

TRAIN_KEYS = {
    'image': np.float32, 'image_size': np.int32, 'orig_size': np.int32, 'image_id': np.int64,
    'scale': np.float32, 'gt_boxes': np.float32, 'gt_classes': np.int32, 'gt_masks': np.uint8,
    'valid': np.bool_, 'index': np.int64,
}


def _config(**data):
  c = base.get_config()
  c.seed = 11
  c.data.min_sizes = (64, 96)
  c.data.max_size = 160
  c.data.test_min_size = 80
  c.data.test_max_size = 160
  c.data.max_instances = 5
  c.data.mask_size = 16
  c.data.crowd = 'ignore'
  c.data.num_workers = 0
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


@pytest.fixture(scope='module')
def dataset_files(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('pipe'))
  return shapes.write_shapes_dataset(root, 'train', 40, image_size=(48, 112), seed=5)


@pytest.fixture(scope='module')
def dataset(dataset_files):
  return coco_lib.load_coco(*dataset_files, crowd='ignore')


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------------------- canvases


def test_canvases():
  c = pipeline.train_canvases((640, 800, 1000), 1333)
  assert c == {
      (0, 'landscape'): (640, 1408), (0, 'portrait'): (1408, 640),
      (1, 'landscape'): (896, 1408), (1, 'portrait'): (1408, 896),
      (2, 'landscape'): (1024, 1408), (2, 'portrait'): (1408, 1024),
  }
  assert pipeline.test_canvas(800, 1333, 'portrait') == (1408, 896)
  with pytest.raises(ValueError):
    pipeline.test_canvas(800, 1333, 'square')


@given(st.integers(1, 4000), st.integers(1, 4000), st.integers(16, 1200), st.integers(16, 1400))
def test_resized_image_fits_its_canvas(h, w, min_size, max_size):
  nh, nw = T.resized_hw(h, w, min_size, max_size)
  ch, cw = pipeline.test_canvas(min_size, max_size, 'landscape' if w >= h else 'portrait')
  # Rounding the short side moves the long one by at most aspect/2 + 1 pixels past max_size; the
  # canvas pads max_size up to a multiple of 128, so the fit is guaranteed whenever that slack covers it.
  slack = max(ch, cw) - max_size
  if max(h, w) / min(h, w) / 2 + 1 <= slack:
    assert nh <= ch and nw <= cw
  fh, fw = pipeline.fit_size('x.png', h, w, min_size, max_size, (ch, cw))
  assert fh <= ch and fw <= cw and (fh, fw) == (min(nh, ch), min(nw, cw))


# ---------------------------------------------------------------------------------------- order


def test_train_plan_epochs():
  landscape = np.array([True] * 13 + [False] * 9)
  plan = pipeline.TrainPlan(landscape, 4, num_scales=3, seed=1)
  assert plan.batches_per_epoch == 3 + 2
  for epoch in range(3):
    seen = []
    for k in range(plan.batches_per_epoch):
      b = plan.batch(epoch * plan.batches_per_epoch + k)
      assert len(b.records) == 4 and 0 <= b.scale_index < 3
      assert (landscape[b.records] == (b.orientation == 'landscape')).all()  # one orientation
      seen += b.records.tolist()
    assert len(seen) == len(set(seen)) == 20  # each image at most once; remainders dropped
  e0 = [plan.batch(k).records.tolist() for k in range(5)]
  e1 = [plan.batch(5 + k).records.tolist() for k in range(5)]
  assert e0 != e1  # reshuffled every epoch
  again = pipeline.TrainPlan(landscape, 4, num_scales=3, seed=1)
  assert [again.batch(k).records.tolist() for k in range(5)] == e0
  other = pipeline.TrainPlan(landscape, 4, num_scales=3, seed=2)
  assert [other.batch(k).records.tolist() for k in range(5)] != e0
  # Smaller than one batch in both groups: wrap-around batches, still one orientation each.
  tiny = pipeline.TrainPlan(np.array([True, True, False]), 4, num_scales=1, seed=0)
  assert tiny.batches_per_epoch == 2
  assert sorted(len(set(tiny.batch(k).records.tolist())) for k in range(2)) == [1, 2]


def test_flips_depend_on_batch_and_row_only():
  plan = pipeline.TrainPlan(np.ones(8, bool), 4, 1, seed=0)
  flips = [[plan.flip(i, r, 0.5) for r in range(4)] for i in range(50)]
  assert 0.3 < np.mean(flips) < 0.7
  assert all(plan.flip(i, r, 0.5) == flips[i][r] for i in range(50) for r in range(4))
  assert not any(plan.flip(i, 0, 0.0) for i in range(20))
  assert all(plan.flip(i, 0, 1.0) for i in range(20))


# ---------------------------------------------------------------------------------------- batches


def test_batch_contract(dataset):
  config = _config()
  canvases = set(pipeline.train_canvases(config.data.min_sizes, config.data.max_size).values())
  it = pipeline.make_train_iterator(dataset, config, global_batch_size=4, start_index=2)
  by_id = {r.image_id: r for r in dataset.records}
  for i, batch in enumerate(_take(it, 6)):
    assert set(batch) == set(TRAIN_KEYS)
    for k, dtype in TRAIN_KEYS.items():
      assert batch[k].dtype == dtype, k
    n, h, w, _ = batch['image'].shape
    assert n == 4 and (h, w) in canvases
    assert batch['gt_boxes'].shape == (4, 5, 4) and batch['gt_masks'].shape == (4, 5, 16, 16)
    assert int(batch['index']) == 2 + i and batch['index'].shape == ()
    assert batch['valid'].all()
    recs = [by_id[int(i)] for i in batch['image_id']]
    # One training scale for the whole batch, the authors' resize rule for each image.
    assert any(
        all(tuple(batch['image_size'][j]) == T.resized_hw(r.height, r.width, s, 160)
            for j, r in enumerate(recs))
        for s in config.data.min_sizes
    )
    for j, rec in enumerate(recs):
      ih, iw = batch['image_size'][j]
      assert tuple(batch['orig_size'][j]) == (rec.height, rec.width)
      assert (ih <= h) and (iw <= w)
      np.testing.assert_allclose(batch['scale'][j], min(ih, iw) / min(rec.height, rec.width))
      assert not batch['image'][j, ih:].any() and not batch['image'][j, :, iw:].any()
      cls = batch['gt_classes'][j]
      real = cls != 0
      n_inst = len(rec.boxes) + len(rec.crowd_boxes)
      assert real.sum() == min(n_inst, 5)
      assert set(np.unique(cls)) <= {-1, 0, 1, 2, 3, 4, 5, 6, 7}
      boxes = batch['gt_boxes'][j]
      assert not boxes[~real].any() and not batch['gt_masks'][j][~real].any()
      assert (boxes[real][:, 0::2] >= 0).all() and (boxes[real][:, 0::2] <= iw + 1e-3).all()
      assert (boxes[real][:, 1::2] >= 0).all() and (boxes[real][:, 1::2] <= ih + 1e-3).all()


def _reference_row(record, min_size, max_size, flip, config, g, m):
  """The expected image row and targets, computed directly from the files and the spec."""
  img = np.asarray(Image.open(record.file_name).convert('RGB'))
  nh, nw = T.resized_hw(record.height, record.width, min_size, max_size)
  img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR)).astype(np.float64)
  if flip:
    img = img[:, ::-1]
  bgr = img[..., ::-1] * config.data.pixel_range / 255.0
  norm = (bgr - np.array(config.data.pixel_mean)) / np.array(config.data.pixel_std)
  # Targets: real instances first by area (ties: annotation order), then crowd regions.
  rows = [(b, int(c), s) for b, c, s in zip(record.boxes, record.classes, record.segmentations)]
  rows += [(b, -1, s) for b, s in zip(record.crowd_boxes, record.crowd_segmentations)]
  order = sorted(range(len(rows)),
                 key=lambda i: (rows[i][1] < 0, -(rows[i][0][2] - rows[i][0][0])
                                * (rows[i][0][3] - rows[i][0][1]), i))
  kept = sorted(order[:g])
  fx, fy = nw / record.width, nh / record.height
  boxes, classes, full_masks = [], [], []
  for i in kept:
    b, c, seg = rows[i]
    x1, y1, x2, y2 = b[0] * fx, b[1] * fy, b[2] * fx, b[3] * fy
    if flip:
      x1, x2 = nw - x2, nw - x1
    boxes.append([x1, y1, x2, y2])
    classes.append(c)
    full_masks.append(_full_mask(seg, record.height, record.width, nh, nw, flip))
  return norm, (nh, nw), np.array(boxes), np.array(classes), full_masks


def _full_mask(seg, h, w, nh, nw, flip):
  if isinstance(seg, list):
    rle = mask_utils.merge(mask_utils.frPyObjects([p.tolist() for p in seg], h, w))
  elif isinstance(seg['counts'], list):
    rle = mask_utils.frPyObjects(seg, h, w)
  else:
    rle = dict(seg, counts=seg['counts'].encode())
  full = mask_utils.decode(rle)
  full = np.asarray(Image.fromarray(full * 255).resize((nw, nh), Image.NEAREST)) > 127
  return full[:, ::-1] if flip else full


def _paste(crop, box, nh, nw):
  """The M x M crop placed back into an (nh, nw) image, nearest neighbour at pixel centres."""
  out = np.zeros((nh, nw), bool)
  m = crop.shape[0]
  x1, y1, x2, y2 = box
  ys, xs = np.mgrid[0:nh, 0:nw] + 0.5
  inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
  j = np.clip(((xs - x1) / (x2 - x1) * m).astype(int), 0, m - 1)
  i = np.clip(((ys - y1) / (y2 - y1) * m).astype(int), 0, m - 1)
  out[inside] = crop[i[inside], j[inside]] > 0
  return out


@pytest.mark.parametrize('hflip_prob', [0.0, 1.0])
def test_rows_match_an_independent_reference(dataset, hflip_prob):
  """Pixels and boxes to float precision; masks by IoU after pasting back (the crop is coarse)."""
  config = _config(hflip_prob=hflip_prob, max_instances=3, mask_size=32)
  batches = _take(pipeline.make_train_iterator(dataset, config, global_batch_size=4), 4)
  by_id = {r.image_id: r for r in dataset.records}
  ious = []
  for batch in batches:
    for j in range(4):
      rec = by_id[int(batch['image_id'][j])]
      min_size = min(batch['image_size'][j])
      image, (nh, nw), boxes, classes, masks = _reference_row(
          rec, min_size, config.data.max_size, hflip_prob == 1.0, config, 3, 32)
      assert tuple(batch['image_size'][j]) == (nh, nw)
      np.testing.assert_allclose(batch['image'][j, :nh, :nw], image, atol=1e-4)
      k = len(classes)
      np.testing.assert_array_equal(batch['gt_classes'][j, :k], classes)
      np.testing.assert_allclose(batch['gt_boxes'][j, :k], boxes.reshape(-1, 4), rtol=1e-5,
                                 atol=1e-4)
      for g in range(k):
        if masks[g].sum() < 30:
          continue
        pasted = _paste(batch['gt_masks'][j, g], boxes[g], nh, nw)
        ious.append((pasted & masks[g]).sum() / (pasted | masks[g]).sum())
  assert len(ious) > 5 and np.mean(ious) > 0.85 and min(ious) > 0.6


def test_flip_mirrors_rows(dataset):
  a = next(pipeline.make_train_iterator(dataset, _config(hflip_prob=0.0), global_batch_size=4))
  b = next(pipeline.make_train_iterator(dataset, _config(hflip_prob=1.0), global_batch_size=4))
  np.testing.assert_array_equal(a['image_id'], b['image_id'])
  for j in range(4):
    nh, nw = a['image_size'][j]
    np.testing.assert_array_equal(b['image'][j, :nh, :nw], a['image'][j, :nh, :nw][:, ::-1])
    np.testing.assert_array_equal(b['gt_masks'][j], a['gt_masks'][j][..., ::-1])
    real = a['gt_classes'][j] != 0
    np.testing.assert_allclose(b['gt_boxes'][j][real], T.hflip_boxes(a['gt_boxes'][j][real], nw))


def test_sharding_and_resume(dataset):
  config = _config()
  full = _take(pipeline.make_train_iterator(dataset, config, global_batch_size=4), 7)
  p0 = _take(pipeline.make_train_iterator(dataset, config, global_batch_size=4, process_index=0,
                                          process_count=2), 7)
  p1 = _take(pipeline.make_train_iterator(dataset, config, global_batch_size=4, process_index=1,
                                          process_count=2), 7)
  for f, a, b in zip(full, p0, p1):
    assert a['image'].shape[1:] == b['image'].shape[1:]  # both processes on the same canvas
    for k in f:
      if k == 'index':
        assert int(a[k]) == int(b[k]) == int(f[k])
      else:
        np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), f[k], err_msg=k)
  # Resume: the stream from batch 3 equals the original stream from 3 on, across an epoch boundary
  # (40 images, batch 4: at most 10 batches per epoch).
  long = _take(pipeline.make_train_iterator(dataset, config, global_batch_size=4), 14)
  it = pipeline.make_train_iterator(dataset, config, global_batch_size=4, start_index=3)
  resumed = _take(it, 11)
  for a, b in zip(long[3:], resumed):
    _equal(a, b)
  with pytest.raises(ValueError):
    pipeline.make_train_iterator(dataset, config, global_batch_size=3, process_count=2)


def test_workers_give_the_same_stream(dataset):
  config = _config()
  ref = _take(pipeline.make_train_iterator(dataset, config, global_batch_size=4, start_index=5), 4)
  it = pipeline.make_train_iterator(dataset, config, global_batch_size=4, start_index=5,
                                    num_workers=2)
  got = _take(it, 4)
  for a, b in zip(ref, got):
    _equal(a, b)
  it.close()
  del got, it
  gc.collect()


def test_unreadable_images_are_replaced(dataset_files, tmp_path):
  json_path, images_dir = dataset_files
  copy_dir = str(tmp_path / 'images')
  shutil.copytree(images_dir, copy_dir)
  ds = coco_lib.load_coco(json_path, copy_dir, crowd='ignore')
  config = _config()
  clean = _take(pipeline.make_train_iterator(ds, config, global_batch_size=4), 10)
  first = next(r for r in ds.records if r.image_id == clean[0]['image_id'][0])
  os.remove(first.file_name)  # missing
  second_id = int(clean[1]['image_id'][2])
  second = next(r for r in ds.records if r.image_id == second_id)
  with open(second.file_name, 'wb') as f:
    f.write(b'garbage')  # undecodable
  before = T.REPORT_COUNTS['unreadable_image']
  runs = [
      _take(pipeline.make_train_iterator(ds, config, global_batch_size=4), 10) for _ in range(2)
  ]
  _equal(runs[0][0], runs[1][0])  # deterministic replacement
  assert T.REPORT_COUNTS['unreadable_image'] == before + 2  # each bad file reported once
  ids = collections.Counter()
  for b_clean, b in zip(clean, runs[0]):
    ids.update(b['image_id'].tolist())
    assert b['valid'].all() and b['image'].shape == b_clean['image'].shape
  assert first.image_id not in ids and second_id not in ids
  replaced = runs[0][0]['image_id'][0]
  rec = next(r for r in ds.records if r.image_id == replaced)
  assert rec.landscape == first.landscape and replaced != first.image_id


def test_truncation_keeps_largest_and_reports(dataset, tmp_path):
  config = _config(max_instances=1)
  rec = max(dataset.records, key=lambda r: len(r.boxes))
  assert len(rec.boxes) >= 2
  # A fresh file name: problems are reported once per file, and other tests read this one too.
  name = str(tmp_path / os.path.basename(rec.file_name))
  shutil.copy(rec.file_name, name)
  rec = dataclasses.replace(rec, file_name=name)
  small = copy.copy(dataset)
  small.records = [rec] * 4
  before = T.REPORT_COUNTS['gt_truncated']
  batch = next(pipeline.make_train_iterator(small, config, global_batch_size=4))
  assert T.REPORT_COUNTS['gt_truncated'] == before + 1
  areas = (rec.boxes[:, 2] - rec.boxes[:, 0]) * (rec.boxes[:, 3] - rec.boxes[:, 1])
  biggest = rec.boxes[np.argmax(areas)]
  s = batch['image_size'][0] / np.array([rec.height, rec.width])
  np.testing.assert_allclose(batch['gt_boxes'][0, 0, 1::2], biggest[1::2] * s[0], rtol=1e-5)
  assert batch['gt_classes'][0, 0] == rec.classes[np.argmax(areas)]


# ---------------------------------------------------------------------------------------- eval


@pytest.mark.parametrize(
    'process_count, batch_size, max_images', [(1, 3, 0), (2, 3, 0), (2, 2, 17)]
)
def test_eval_covers_every_image_once(dataset, process_count, batch_size, max_images):
  config = _config(hflip_prob=1.0)  # must be ignored in evaluation
  kwargs = dict(batch_size=batch_size, process_count=process_count, max_images=max_images)
  per_process = [
      list(pipeline.make_eval_iterator(dataset, config, process_index=p, **kwargs))
      for p in range(process_count)
  ]
  n = pipeline.num_eval_batches(dataset, config, **kwargs)
  assert all(len(b) == n for b in per_process)
  expected = [r.image_id for r in dataset.records[: max_images or None]]
  seen = []
  canvases = {pipeline.test_canvas(80, 160, o) for o in pipeline.ORIENTATIONS}
  for step in zip(*per_process):
    assert len({b['image'].shape for b in step}) == 1  # same canvas on every process
    for b in step:
      assert b['image'].shape[1:3] in canvases and 'gt_boxes' not in b
      assert (b['image_id'][~b['valid']] == -1).all()
      seen += b['image_id'][b['valid']].tolist()
      for j in np.flatnonzero(b['valid']):
        assert min(b['image_size'][j]) == 80 or max(b['image_size'][j]) == 160
  assert sorted(seen) == sorted(expected)
  # No flip in evaluation: the first row equals the reference resize of its file.
  b = per_process[0][0]
  rec = next(r for r in dataset.records if r.image_id == b['image_id'][0])
  ref, (nh, nw), *_ = _reference_row(rec, 80, 160, False, config, 1, 4)
  np.testing.assert_allclose(b['image'][0, :nh, :nw], ref, atol=1e-4)


def test_eval_unreadable_image_is_invalid_row(dataset_files, tmp_path):
  json_path, images_dir = dataset_files
  copy_dir = str(tmp_path / 'images')
  shutil.copytree(images_dir, copy_dir)
  ds = coco_lib.load_coco(json_path, copy_dir)
  os.remove(ds.records[0].file_name)
  batches = list(pipeline.make_eval_iterator(ds, _config(), batch_size=4, max_images=8))
  seen = [i for b in batches for i in b['image_id'][b['valid']].tolist()]
  assert ds.records[0].image_id not in seen and len(seen) == 7
