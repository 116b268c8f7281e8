"""Tests for copy-paste augmentation (retinamask_jax.data.copy_paste) and its place in the training pipeline."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from configs import base
from retinamask_jax.data import coco as coco_lib
from retinamask_jax.data import copy_paste, pipeline, shapes
from retinamask_jax.data import transforms as T

pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')


def _rle(mask):
  return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _record(h, w, rects, classes, first_id=1):
  """A record whose instances are the pixel rectangles (x0, y0, x1, y1), masks as compressed RLE."""
  masks = []
  for x0, y0, x1, y1 in rects:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    masks.append(m)
  return coco_lib.ImageRecord(
    image_id=first_id, file_name=f'im{first_id}.png', height=h, width=w,
    boxes=np.asarray(rects, np.float32).reshape(-1, 4), classes=np.asarray(classes, np.int32),
    segmentations=[_rle(m) for m in masks], ann_ids=np.arange(first_id, first_id + len(rects), dtype=np.int64))


def test_hand_worked_paste():
  """dst 20 x 20 with A [2, 8)^2 (36 px) and B x [10, 20) y [2, 6) (40 px); src 10 x 10 with one square
  [0, 7)^2. Scale 20 / 10 = 2: the pasted square is [0, 14)^2, offset 0 (same size). A is covered
  entirely: dropped. B keeps x [14, 20): 24 of 40 px (>= 0.5): kept, its box shrinks to the rest."""
  dst = _record(20, 20, [(2, 2, 8, 8), (10, 2, 20, 6)], [1, 2], first_id=10)
  src = _record(10, 10, [(0, 0, 7, 7)], [3], first_id=20)
  dst_image = np.zeros((20, 20, 3), np.uint8)
  src_image = np.full((10, 10, 3), 200, np.uint8)
  record, image = copy_paste.paste(dst, dst_image, src, src_image, np.random.default_rng(0))
  expected = np.zeros((20, 20, 3), np.uint8)
  expected[:14, :14] = 200
  np.testing.assert_array_equal(image, expected)
  assert dst_image.max() == 0  # the input is not modified
  np.testing.assert_array_equal(record.classes, [2, 3])
  np.testing.assert_array_equal(record.ann_ids, [11, -1])
  np.testing.assert_array_equal(record.boxes, [[14, 2, 20, 6], [0, 0, 14, 14]])
  crops = T.masks_to_crops(record.segmentations, record.boxes, 20, 20, 4)
  np.testing.assert_array_equal(crops, np.ones((2, 4, 4), np.uint8))  # both masks fill their new boxes
  assert record.image_id == 10 and (record.height, record.width) == (20, 20)
  # At the bound (24 of 40 px is 0.6) B is kept; 0.7 drops it.
  bound, _ = copy_paste.paste(dst, dst_image, src, src_image, np.random.default_rng(0), min_visible=0.6)
  np.testing.assert_array_equal(bound.classes, [2, 3])
  strict, _ = copy_paste.paste(dst, dst_image, src, src_image, np.random.default_rng(0), min_visible=0.7)
  np.testing.assert_array_equal(strict.classes, [3])


def test_untouched_instances_keep_their_annotation_and_nothing_to_paste_is_a_no_op():
  dst = _record(30, 40, [(30, 20, 40, 30)], [1])
  dst = dataclasses.replace(dst, boxes=np.array([[29.5, 19.5, 40, 30]], np.float32))  # looser than the mask
  src = _record(15, 20, [(0, 0, 5, 5)], [2], first_id=5)  # scale 2: [0, 10)^2 at offset (0..15, 0..20)
  image = np.zeros((30, 40, 3), np.uint8)
  record, _ = copy_paste.paste(dst, image, src, np.ones((15, 20, 3), np.uint8), np.random.default_rng(1))
  np.testing.assert_array_equal(record.boxes[0], [29.5, 19.5, 40, 30])
  assert record.segmentations[0] is dst.segmentations[0]
  empty = _record(15, 20, [], [], first_id=5)
  same, same_image = copy_paste.paste(dst, image, empty, np.ones((15, 20, 3), np.uint8), np.random.default_rng(1))
  assert same is dst and same_image is image


@settings(max_examples=40, deadline=None)
@given(st.integers(8, 40), st.integers(8, 40), st.integers(8, 40), st.integers(8, 40), st.integers(0, 2**31),
       st.floats(0.05, 1.0))
def test_paste_invariants(dh, dw, sh, sw, seed, min_visible):
  """On random rectangles, any sizes (scaled up or down, source larger or smaller than the destination): the
  image changes only where the source is painted (the source is 255, the destination < 100, so the painted set P
  is visible); each destination instance is exactly its mask minus P, kept iff that leaves >= min_visible of
  it, with the tight box of what is left when P touched it; pasted instances lie inside P."""
  rng = np.random.default_rng(seed)

  def rects(h, w, n):
    out = []
    for _ in range(n):
      x0, y0 = rng.integers(0, w), rng.integers(0, h)
      out.append((int(x0), int(y0), int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1))))
    return out

  dst_rects = rects(dh, dw, int(rng.integers(0, 4)))
  dst = _record(dh, dw, dst_rects, list(range(1, len(dst_rects) + 1)), first_id=1)
  src_rects = rects(sh, sw, int(rng.integers(1, 4)))
  src = _record(sh, sw, src_rects, list(range(5, 5 + len(src_rects))), first_id=50)
  dst_image = rng.integers(0, 100, (dh, dw, 3)).astype(np.uint8)
  src_image = np.full((sh, sw, 3), 255, np.uint8)
  record, image = copy_paste.paste(dst, dst_image, src, src_image, np.random.default_rng(seed),
                                   min_visible=min_visible)

  painted = (image == 255).all(-1)
  np.testing.assert_array_equal(image[~painted], dst_image[~painted])
  masks = [T.full_mask(seg, dh, dw).astype(bool) for seg in record.segmentations]
  kept = {int(a): k for k, a in enumerate(record.ann_ids) if a > 0}
  for k, (x0, y0, x1, y1) in enumerate(dst_rects):
    original = np.zeros((dh, dw), bool)
    original[y0:y1, x0:x1] = True
    left = original & ~painted
    assert (k + 1 in kept) == (left.sum() >= min_visible * original.sum() and left.any())
    if k + 1 not in kept:
      continue
    got = kept[k + 1]
    np.testing.assert_array_equal(masks[got], left)
    assert record.classes[got] == k + 1
    if left.sum() < original.sum():
      rows, cols = np.flatnonzero(left.any(1)), np.flatnonzero(left.any(0))
      np.testing.assert_array_equal(record.boxes[got], [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
    else:
      np.testing.assert_array_equal(record.boxes[got], [x0, y0, x1, y1])
  pasted = record.ann_ids == -1
  assert set(record.classes[pasted].tolist()) <= set(range(5, 5 + len(src_rects)))
  for m, p in zip(masks, pasted):
    if p:
      assert m.any() and not (m & ~painted).any()


# ----------------------------------------------------------------------------------------- pipeline


def _config(prob):
  c = base.get_config()
  c.seed = 3
  c.data.min_sizes = (64, 96)
  c.data.max_size = 160
  c.data.max_instances = 12
  c.data.mask_size = 16
  c.data.crowd = 'ignore'
  c.data.num_workers = 0
  c.data.copy_paste.prob = prob
  return c


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('cp'))
  return coco_lib.load_coco(*shapes.write_shapes_dataset(root, 'train', 24, image_size=(48, 112), seed=2),
                            crowd='ignore')


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_pipeline_pastes_deterministically_for_any_shard_or_resume(dataset):
  plain = _take(pipeline.make_train_iterator(dataset, _config(0.0), global_batch_size=4), 6)
  pasted = _take(pipeline.make_train_iterator(dataset, _config(1.0), global_batch_size=4), 6)
  again = _take(pipeline.make_train_iterator(dataset, _config(1.0), global_batch_size=4, start_index=2), 4)
  halves = [_take(pipeline.make_train_iterator(dataset, _config(1.0), global_batch_size=4, process_index=p,
                                               process_count=2), 6) for p in (0, 1)]
  for a, b in zip(pasted[2:], again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  for f, a, b in zip(pasted, *halves):
    for k in f:
      if k != 'index':
        np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), f[k], err_msg=k)
  # The same images in the same rows, with more instances on them.
  for a, b in zip(plain, pasted):
    np.testing.assert_array_equal(a['image_id'], b['image_id'])
  count = lambda batches: sum(int((b['gt_classes'] > 0).sum()) for b in batches)  # noqa: E731
  assert count(pasted) > 1.3 * count(plain)
  assert any(not np.array_equal(a['image'], b['image']) for a, b in zip(plain, pasted))
