"""Tests for retinamask_jax.data.coco: the reader's rules on a hand-written JSON with faults."""

import contextlib
import io
import json
import logging
import pickle

import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from retinamask_jax.data import coco as coco_lib

pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')

SQUARE = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]


def _ann(ann_id, image_id, cat, bbox, seg=SQUARE, **kw):
  return dict(id=ann_id, image_id=image_id, category_id=cat, bbox=bbox, segmentation=seg,
              area=float(bbox[2] * bbox[3]) if len(bbox) == 4 else 0.0, iscrowd=0, **kw)


def _dataset():
  images = [
      {'id': 1, 'file_name': 'a.jpg', 'height': 40, 'width': 60},
      {'id': 2, 'file_name': 'b.jpg', 'height': 50, 'width': 30},  # no annotations: kept
      {'id': 3, 'file_name': 'c.jpg', 'width': 30},  # no height: skipped
      {'id': 4, 'file_name': 'd.jpg', 'height': 40, 'width': 60},
  ]
  crowd_rle = {'size': [40, 60], 'counts': [100, 20, 2280]}
  anns = [
      _ann(1, 1, 10, [10, 10, 20, 20]),  # normal, class 3 (categories 1, 3, 10 -> 1, 2, 3)
      _ann(2, 1, 1, [50, 30, 20, 20]),  # sticks out: clipped to (50, 30, 60, 40)
      _ann(3, 1, 3, [59.5, 5, 10, 10]),  # clipped to 0.5 px wide: degenerate, dropped
      _ann(4, 1, 7, [5, 5, 10, 10]),  # unknown category: dropped
      _ann(5, 1, 3, [0, 0, 10, 10], seg=[[1, 2, 3, 4], [0, 0, 5]]),  # no valid polygon: box kept
      _ann(6, 1, 3, [0, 0, 10, 10], seg=[[1, 2, 3, 4], SQUARE[0]]),  # one valid polygon kept
      _ann(7, 1, 1, [0, 0, 5, 5], seg={'size': [10, 10], 'counts': 'abc'}),  # RLE size mismatch
      _ann(8, 1, 1, [1, 2, 3]),  # malformed bbox: dropped
      _ann(9, 1, 1, [float('nan'), 2, 3, 4]),  # non-finite bbox: dropped
      _ann(10, 1, 1, [0, 0, 30, 20], seg=crowd_rle) | {'iscrowd': 1},  # crowd
      _ann(11, 99, 1, [0, 0, 5, 5]),  # image 99 does not exist
      _ann(12, 4, 3, [1.25, 2.5, 3.5, 4.75]),  # float box, continuous xyxy
  ]
  cats = [{'id': 10, 'name': 'ten'}, {'id': 1, 'name': 'one'}, {'id': 3, 'name': 'three'}]
  return {'images': images, 'annotations': anns, 'categories': cats}


def _write(tmp_path, data):
  path = tmp_path / 'instances.json'
  path.write_text(json.dumps(data))
  return str(path)


def test_load_coco_rules(tmp_path, caplog):
  path = _write(tmp_path, _dataset())
  with caplog.at_level(logging.WARNING):
    ds = coco_lib.load_coco(path, str(tmp_path / 'images'))
  assert ds.category_ids == (1, 3, 10)
  assert ds.class_names == ('one', 'three', 'ten')
  assert ds.num_classes == 3
  assert ds.category_to_class == {1: 1, 3: 2, 10: 3}
  assert ds.class_to_category == {1: 1, 2: 3, 3: 10}
  assert [r.image_id for r in ds.records] == [1, 2, 4]
  r1, r2, r4 = ds.records
  assert r1.file_name == str(tmp_path / 'images' / 'a.jpg')
  assert (r1.height, r1.width) == (40, 60) and r2.boxes.shape == (0, 4) and r2.classes.shape == (0,)
  np.testing.assert_array_equal(r1.ann_ids, [1, 2, 5, 6, 7])
  np.testing.assert_array_equal(r1.classes, [3, 1, 2, 2, 1])
  assert r1.boxes.dtype == np.float32 and r1.classes.dtype == np.int32
  np.testing.assert_array_equal(
      r1.boxes, [[10, 10, 30, 30], [50, 30, 60, 40], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 5, 5]]
  )
  np.testing.assert_allclose(r4.boxes, [[1.25, 2.5, 4.75, 7.25]])
  # Segmentations: polygons as float64 arrays; invalid ones dropped; none left / bad RLE -> None.
  assert isinstance(r1.segmentations[0], list) and r1.segmentations[0][0].dtype == np.float64
  np.testing.assert_array_equal(r1.segmentations[0][0], SQUARE[0])
  assert r1.segmentations[2] is None
  assert len(r1.segmentations[3]) == 1
  assert r1.segmentations[4] is None
  assert r1.crowd_boxes.shape == (0, 4)  # crowd='drop'
  report = {k: v for k, v in ds.report.items() if not k.startswith('eval_')}
  assert report == {
      'box_clipped': 1, 'degenerate_box': 1, 'unknown_category': 1, 'bad_polygon': 2,
      'no_valid_polygon': 1, 'rle_size_mismatch': 1, 'bad_bbox': 2, 'crowd_dropped': 1,
      'bad_image_entry': 1, 'orphan_annotations': 1,
  }
  # Once per (annotation, kind): annotation 5 has two bad polygons but one 'bad_polygon' line.
  messages = [r.getMessage() for r in caplog.records]
  assert sum('annotation 5:' in m and 'bad_polygon' in m for m in messages) == 1
  assert sum('annotation 6:' in m and 'bad_polygon' in m for m in messages) == 1
  assert any('annotation 3:' in m and 'dropped' in m for m in messages)
  # Crowd regions are ordinary COCO: counted, but logged as information, apart from the problems' summary line.
  assert not any('crowd_dropped' in m for m in messages)
  assert ds.report['eval_gt_dropped'] == 2 and ds.report['eval_gt_segmentation_fixed'] == 3
  # Records are plain data: they pickle (grain workers).
  again = pickle.loads(pickle.dumps(ds.records))
  np.testing.assert_array_equal(again[0].boxes, r1.boxes)


def test_load_coco_crowd_ignore(tmp_path):
  ds = coco_lib.load_coco(_write(tmp_path, _dataset()), str(tmp_path), crowd='ignore')
  r1 = ds.records[0]
  np.testing.assert_array_equal(r1.crowd_boxes, [[0, 0, 30, 20]])
  np.testing.assert_array_equal(r1.crowd_ann_ids, [10])
  assert r1.crowd_segmentations[0]['counts'] == [100, 20, 2280]
  assert 10 not in r1.ann_ids and 'crowd_dropped' not in ds.report
  with pytest.raises(ValueError, match='crowd'):
    coco_lib.load_coco(_write(tmp_path, _dataset()), str(tmp_path), crowd='keep')


def test_load_coco_bad_files(tmp_path):
  with pytest.raises(ValueError, match='nope.json'):
    coco_lib.load_coco(str(tmp_path / 'nope.json'), str(tmp_path))
  bad = tmp_path / 'bad.json'
  bad.write_text('{"images": [')
  with pytest.raises(ValueError, match='bad.json'):
    coco_lib.load_coco(str(bad), str(tmp_path))
  with pytest.raises(ValueError, match='no categories'):
    coco_lib.load_coco(_write(tmp_path, {'images': [], 'annotations': []}), str(tmp_path))


def test_coco_object_evaluates_perfect_detections(tmp_path):
  """The pycocotools object evaluates to AP 1 when the detections are the (valid) ground truth."""
  data = _dataset()
  ds = coco_lib.load_coco(_write(tmp_path, data), str(tmp_path))
  gt_ids = ds.coco.getAnnIds()
  results = []
  for ann in ds.coco.loadAnns(gt_ids):
    if ann['iscrowd'] or ann['image_id'] not in ds.coco.imgs:
      continue
    results.append({'image_id': ann['image_id'], 'category_id': ann['category_id'],
                    'bbox': ann['bbox'], 'score': 1.0})
  with contextlib.redirect_stdout(io.StringIO()):
    dt = ds.coco.loadRes(results)
    ev = COCOeval(ds.coco, dt, 'bbox')
    ev.params.imgIds = [1, 4]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  assert ev.stats[1] == pytest.approx(1.0)  # AP50
  # Segm evaluation runs too: unusable GT segmentations were fixed (COCOeval converts them in place,
  # so look first).
  assert ds.coco.anns[5]['segmentation'] == [[0.0, 0.0, 10.0, 0.0, 10.0, 10.0, 0.0, 10.0]]
  assert ds.coco.anns[6]['segmentation'] == SQUARE  # the invalid polygon removed
  assert ds.coco.anns[7]['segmentation'] == [[0.0, 0.0, 5.0, 0.0, 5.0, 5.0, 0.0, 5.0]]  # bad RLE
  assert ds.coco.anns[10]['segmentation']['counts'] == [100, 20, 2280]  # good RLE untouched
  assert data['annotations'][4]['segmentation'] == [[1, 2, 3, 4], [0, 0, 5]]  # input not mutated
  with contextlib.redirect_stdout(io.StringIO()):
    ev = COCOeval(ds.coco, dt, 'segm')
    ev.params.imgIds = [1, 4]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  assert ev.stats[1] >= 0  # -1 would mean nothing was evaluated
