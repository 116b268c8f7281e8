"""Tests for the evaluation report: per-category AP (against pycocotools' own figures), '-' for COCOeval's -1,
the learning-curve plots and legible prediction drawings."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinamask_jax import cli
from retinamask_jax.evaluation import coco_eval, plots, visualize

# Three categories (non-contiguous ids), the third without ground truth; 4 images of 64 x 80; no object is
# larger than 96^2 px, so COCOeval's APl is -1.
CATS = [{'id': 2, 'name': 'ring'}, {'id': 5, 'name': 'bar'}, {'id': 9, 'name': 'star'}]
GT = [  # image_id, category_id, x, y, w, h
    (1, 2, 4, 4, 20, 20), (1, 5, 30, 10, 8, 30), (2, 2, 10, 10, 30, 30), (2, 2, 44, 30, 12, 12),
    (3, 5, 5, 5, 40, 6), (3, 5, 5, 30, 6, 25), (4, 2, 50, 2, 10, 10),
]
CROWD = (4, 5, 0, 40, 30, 20)
DETS = [  # image_id, category_id, x, y, w, h, score: hits, misses, duplicates, a confusion, a detection of 'star'
    (1, 2, 5, 4, 19, 21, 0.9), (1, 5, 30, 12, 8, 26, 0.8), (1, 2, 30, 10, 8, 30, 0.3),
    (2, 2, 12, 12, 28, 26, 0.95), (2, 2, 11, 11, 29, 29, 0.6), (2, 5, 44, 30, 12, 12, 0.7),
    (3, 5, 6, 5, 38, 7, 0.85), (3, 5, 5, 33, 6, 20, 0.4), (3, 9, 20, 20, 10, 10, 0.5),
    (4, 2, 52, 3, 9, 9, 0.65), (4, 2, 0, 40, 30, 20, 0.55),
]


def _poly(x, y, w, h):
  return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@pytest.fixture()
def coco_gt(tmp_path):
  anns = [{'id': i + 1, 'image_id': im, 'category_id': c, 'bbox': [x, y, w, h], 'area': float(w * h),
           'iscrowd': 0, 'segmentation': _poly(x, y, w, h)} for i, (im, c, x, y, w, h) in enumerate(GT)]
  im, c, x, y, w, h = CROWD
  anns.append({'id': 100, 'image_id': im, 'category_id': c, 'bbox': [x, y, w, h], 'area': float(w * h),
               'iscrowd': 1, 'segmentation': _poly(x, y, w, h)})
  data = {'images': [{'id': i, 'width': 80, 'height': 64, 'file_name': f'{i}.png'} for i in range(1, 5)],
          'annotations': anns, 'categories': CATS}
  path = tmp_path / 'gt.json'
  path.write_text(json.dumps(data))
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(str(path))


def _results():
  return [{'image_id': im, 'category_id': c, 'bbox': [x, y, w, h], 'score': s} for im, c, x, y, w, h, s in DETS]


def _pycocotools_per_category(coco_gt, results, iou_type='bbox'):
  """The reference: COCOeval run once per category (params.catIds = [c]); its stats[0] is that category's AP."""
  out = {}
  with contextlib.redirect_stdout(io.StringIO()):
    coco_dt = coco_gt.loadRes(results)
    for cat in CATS:
      ev = COCOeval(coco_gt, coco_dt, iou_type)
      ev.params.catIds = [cat['id']]
      ev.evaluate()
      ev.accumulate()
      ev.summarize()
      out[cat['name']] = ev.stats[0]
  return out


def test_per_category_ap_equals_pycocotools_per_category_runs(coco_gt):
  stats, table = coco_eval.coco_evaluate(coco_gt, _results(), 'bbox')
  reference = _pycocotools_per_category(coco_gt, _results())
  assert reference['star'] == -1  # no ground truth: COCOeval's -1
  assert stats['AP-star'] is None
  for name in ('ring', 'bar'):
    assert 0 < reference[name] < 1  # a non-trivial case: neither perfect nor empty
    np.testing.assert_allclose(stats[f'AP-{name}'], reference[name], rtol=0, atol=1e-12)
  assert stats['APl'] is None  # no objects above 96^2 px
  assert '=   -   (no objects of this size)' in table and '-1.000' not in table
  # The overall AP is the mean of the per-category APs that exist (COCOeval's own definition).
  np.testing.assert_allclose(stats['AP'], np.mean([reference['ring'], reference['bar']]), atol=1e-12)


def test_evaluate_writes_the_per_category_table_and_json(coco_gt, tmp_path):
  """The whole host path: detections in canvas pixels -> results JSON -> metrics.json / summary.txt."""
  ids = {c['id']: k + 1 for k, c in enumerate(CATS)}  # contiguous classes 1..K
  batches, dets_of = [], {}
  for image_id in range(1, 5):
    mine = [d for d in DETS if d[0] == image_id]
    boxes = np.array([[x, y, x + w, y + h] for _, _, x, y, w, h, _ in mine], np.float32)
    dets_of[image_id] = {
        'boxes': boxes[None], 'scores': np.array([[d[6] for d in mine]], np.float32),
        'classes': np.array([[ids[d[1]] for d in mine]], np.int32), 'valid': np.ones((1, len(mine)), bool),
        # all-ones 28 x 28 mask probabilities: each mask is its filled box, like the ground-truth rectangles
        'masks': np.ones((1, len(mine), 28, 28), np.float32),
    }
    batches.append({'image_id': np.array([image_id]), 'valid': np.array([True]),
                    'image_size': np.array([[64, 80]]), 'orig_size': np.array([[64, 80]])})
  out = tmp_path / 'eval'
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    metrics = coco_eval.evaluate(lambda b: dets_of[int(b['image_id'][0])], batches, coco_gt,
                                 [c['id'] for c in CATS], str(out), with_masks=True)
  bbox_ref = _pycocotools_per_category(coco_gt, json.loads((out / 'bbox_results.json').read_text()))
  segm_ref = _pycocotools_per_category(coco_gt, json.loads((out / 'segm_results.json').read_text()), 'segm')
  saved = json.loads((out / 'metrics.json').read_text())
  for kind, ref in (('bbox', bbox_ref), ('segm', segm_ref)):
    for name in ('ring', 'bar'):
      np.testing.assert_allclose(saved[f'{kind}/AP-{name}'], ref[name], atol=1e-12)
      np.testing.assert_allclose(metrics[f'{kind}/AP-{name}'], ref[name], atol=1e-12)
    assert saved[f'{kind}/AP-star'] is None and saved[f'{kind}/APl'] is None  # null in the JSON
  summary = (out / 'summary.txt').read_text()
  assert summary in printed.getvalue()
  rows = {ln.split('|')[1].strip(): [c.strip() for c in ln.split('|')[2:-1]]
          for ln in summary.splitlines() if ln.startswith('| ') and 'category' not in ln}
  # instances: non-crowd ground truth (the crowd region of image 4 is not counted)
  assert rows['ring'] == ['4', f'{100 * bbox_ref["ring"]:.1f}', f'{100 * segm_ref["ring"]:.1f}']
  assert rows['bar'] == ['3', f'{100 * bbox_ref["bar"]:.1f}', f'{100 * segm_ref["bar"]:.1f}']
  assert rows['star'] == ['0', '-', '-']


def test_no_detections_gives_zero_per_category(coco_gt):
  stats, table = coco_eval.coco_evaluate(coco_gt, [], 'bbox')
  assert stats['AP'] == 0.0 and stats['AP-ring'] == 0.0 and 'no detections' in table


def test_console_prints_a_dash_for_no_objects_of_a_size(capsys):
  cli._print_metrics({'bbox/AP': 0.3, 'bbox/APm': 0.25, 'bbox/APl': None, 'segm/AP': 0.2, 'segm/APl': -1.0})
  out = capsys.readouterr().out.splitlines()
  assert out == ['box  AP 30.0  APm 25.0  APl -', 'mask AP 20.0  APl -']
  assert '-100' not in ''.join(out)



def _metrics_lines(final_ap: float) -> list[dict]:
  lines = [{'step': s, 'loss': 2.0 / s} for s in range(1, 21)]
  lines += [{'step': 10, 'kind': 'eval', 'bbox/AP': final_ap / 2, 'segm/AP': final_ap / 3, 'bbox/APl': None,
             'wall_seconds': 30.0},
            {'step': 20, 'kind': 'eval', 'bbox/AP': final_ap, 'segm/AP': final_ap / 2, 'wall_seconds': 61.5}]
  return lines


def test_curves_read_eval_and_train_lines():
  c = plots.curves(_metrics_lines(0.4))
  assert c['box_ap_step'] == [(10, 20.0), (20, 40.0)]
  np.testing.assert_allclose(c['mask_ap_step'], [(10, 40 / 3), (20, 20.0)])
  assert c['box_ap_wall'] == [(0.5, 20.0), (61.5 / 60, 40.0)]
  assert len(c['loss']) == 20 and c['loss'][0] == (1, 2.0)


def test_plot_files_are_written(tmp_path):
  pytest.importorskip('matplotlib')
  from PIL import Image

  run = tmp_path / 'run'
  run.mkdir()
  (run / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in _metrics_lines(0.4)) + '\n{"cut by a cra')
  path = plots.plot_workdir(str(run))
  assert path == str(run / 'curves.png')
  with Image.open(path) as im:
    assert im.format == 'PNG' and im.size[0] > im.size[1] > 200
  # A sweep's plot: one curve per run.
  sweep_png = plots.plot_runs({'a': _metrics_lines(0.4), 'b': _metrics_lines(0.3)}, str(tmp_path / 's' / 'c.png'))
  assert sweep_png and os.path.getsize(sweep_png) > 0
  # A table's sweep (15 runs): the legend goes below the panels, which it would otherwise cover, so the figure grows.
  many = plots.plot_runs({f'run {i}': _metrics_lines(0.1 + i / 50) for i in range(15)}, str(tmp_path / 'm.png'))
  with Image.open(sweep_png) as few, Image.open(many) as table:
    assert table.size[0] == few.size[0] and table.size[1] > few.size[1] + 100
  # Nothing to plot: no file.
  assert plots.plot_runs({'a': []}, str(tmp_path / 'none.png')) is None and not (tmp_path / 'none.png').exists()


def test_plots_are_skipped_with_one_line_without_matplotlib(tmp_path, monkeypatch, capsys):
  import builtins

  real_import = builtins.__import__

  def no_matplotlib(name, *args, **kwargs):
    if name.startswith('matplotlib'):
      raise ImportError(name)
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', no_matplotlib)
  monkeypatch.setattr(plots, '_told_missing', False)
  for _ in range(2):
    assert plots.plot_runs({'a': _metrics_lines(0.4)}, str(tmp_path / 'c.png')) is None
  assert capsys.readouterr().out.count('matplotlib is not installed') == 1
  assert not (tmp_path / 'c.png').exists()


def test_small_images_are_enlarged_for_drawing_and_labels_do_not_overlap():
  assert visualize.draw_scale(64, 80, 512) == 4  # capped
  assert visualize.draw_scale(200, 300, 512) == 3 and visualize.draw_scale(600, 800, 512) == 1
  image = np.full((64, 80, 3), 128, np.uint8)
  boxes = np.array([[10, 20, 30, 40], [12, 22, 32, 42], [11, 21, 31, 41]], np.float32)  # three overlapping boxes
  masks = np.zeros((3, 64, 80), bool)
  masks[0, 20:40, 10:30] = True
  out = visualize.draw_detections(image, boxes, np.array([0.9, 0.8, 0.7]), [1, 2, 1], ['ring', 'bar'], masks)
  assert out.size == (320, 256)
  pixels = np.asarray(out)
  assert (pixels[100:140, 60:100] != 128).any()  # the mask, enlarged with the image (rows 80-160, cols 40-120)
  assert (pixels[200:, 200:] == 128).all()  # nothing drawn far from the boxes
  placed: list = []
  for box in boxes * 4:
    x, y = visualize._label_box(placed, list(box), (60, 12), (256, 320))
    placed.append((x, y, x + 60, y + 12))
  for i, a in enumerate(placed):
    for b in placed[i + 1:]:
      assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
