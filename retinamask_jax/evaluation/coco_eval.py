"""Detections -> COCO results JSON -> pycocotools COCOeval (bbox and segm).

Inference is one jitted function per canvas (`train.step.make_predict_fn`); this module does the host side:
mapping detections from canvas pixels back to original image coordinates, pasting masks and RLE-encoding them,
writing the results files and running COCOeval, with per-category AP as detectron2 reports it. Box results keep
all `postprocess.max_detections` (100) boxes per image; mask results cover the top `mask.num_masks_test` (50). (The
authors' MASK_ON evaluation scored boxes on the 50 masked detections only; scoring 100 boxes is what their separate
bbox-only run reports.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from retinamask_jax.ops import masks as masks_lib

METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


def detections_to_results(
    dets: dict[str, np.ndarray],
    batch: dict[str, np.ndarray],
    category_ids: Sequence[int],
    *,
    mask_threshold: float = 0.5,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """COCO result entries (bbox, segm) for one batch of detections, in original image coordinates.

  dets: numpy `boxes [N, D, 4]` canvas pixels, `scores [N, D]`, `classes [N, D]` (1..K), `valid [N, D]`, and
  optionally `masks [N, Dm, S, S]` probabilities. batch: `valid [N]`, `image_id [N]`, `image_size [N, 2]` (resized
  h, w), `orig_size [N, 2]`. category_ids[k - 1] is the dataset category id of contiguous class k.
  """
  category_ids = np.asarray(category_ids)
  bbox_results, segm_results = [], []
  for i in range(len(batch['image_id'])):
    if not batch['valid'][i]:
      continue
    (h, w), (oh, ow) = batch['image_size'][i], batch['orig_size'][i]
    keep = dets['valid'][i]
    # Per-axis factors: the resize truncates sides to integers, so x and y scales differ slightly.
    factor = np.array([ow / w, oh / h, ow / w, oh / h], np.float32)
    boxes = dets['boxes'][i] * factor
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, ow)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, oh)
    image_id = int(batch['image_id'][i])
    cats = category_ids[dets['classes'][i] - 1]
    scores = dets['scores'][i]
    for j in np.flatnonzero(keep):
      x1, y1, x2, y2 = (float(v) for v in boxes[j])
      bbox_results.append({
          'image_id': image_id,
          'category_id': int(cats[j]),
          'bbox': [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
          'score': round(float(scores[j]), 5),
      })
    if 'masks' in dets:
      k = dets['masks'].shape[1]
      idx = np.flatnonzero(keep[:k])
      if len(idx):
        pasted = masks_lib.paste_masks(
            dets['masks'][i][idx], boxes[idx], (int(oh), int(ow)), threshold=mask_threshold
        )
        for j, rle in zip(idx, masks_lib.encode_rle(pasted)):
          segm_results.append({
              'image_id': image_id,
              'category_id': int(cats[j]),
              'segmentation': rle,
              'score': round(float(scores[j]), 5),
          })
  return bbox_results, segm_results


def coco_evaluate(
    coco_gt: Any, results: list[dict[str, Any]], iou_type: str, image_ids: Sequence[int] | None = None
) -> tuple[dict[str, float | None], str]:
  """Run COCOeval on `image_ids` (default: all GT images).

  Returns ({AP, AP50, AP75, APs, APm, APl} as fractions, then `AP-<category name>` for every category, the
  summary table COCOeval prints). A value is None where COCOeval has nothing to score (its -1: no objects of that
  size, or a category without ground truth in these images).
  """
  stats, table, _ = _coco_evaluate(coco_gt, results, iou_type, image_ids)
  return stats, table


def _no_objects(value: float) -> float | None:
  # COCOeval's -1 means "no objects here", not zero AP: None (JSON null, printed '-').
  return None if value < 0 else float(value)


def per_category_ap(evaluator: Any) -> dict[str, float | None]:
  """Per-category AP (IoU 0.50:0.95, all sizes, 100 detections) from an accumulated COCOeval, as detectron2
  computes it: the mean of `eval['precision'][:, :, k, 0, -1]` ([T IoUs, R recalls]) over the entries > -1, keyed
  by category name; None for a category without ground truth in the evaluated images."""
  precision = evaluator.eval['precision']  # [T, R, K, A, M]
  out: dict[str, float | None] = {}
  for k, cat_id in enumerate(evaluator.params.catIds):
    p = precision[:, :, k, 0, -1]
    p = p[p > -1]
    out[evaluator.cocoGt.cats[cat_id]['name']] = float(np.mean(p)) if p.size else None
  return out


def _coco_evaluate(
    coco_gt: Any, results: list[dict[str, Any]], iou_type: str, image_ids: Sequence[int] | None
) -> tuple[dict[str, float | None], str, dict[str, float | None]]:
  from pycocotools.cocoeval import COCOeval

  names = [coco_gt.cats[c]['name'] for c in sorted(coco_gt.getCatIds())]
  if not results:
    stats = {k: 0.0 for k in METRIC_NAMES}
    per_cat = {n: 0.0 for n in names}
    return {**stats, **{f'AP-{n}': v for n, v in per_cat.items()}}, f'{iou_type}: no detections\n', per_cat
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    coco_dt = coco_gt.loadRes(results)
    evaluator = COCOeval(coco_gt, coco_dt, iou_type)
    if image_ids is not None:
      evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  stats = {k: _no_objects(v) for k, v in zip(METRIC_NAMES, evaluator.stats[:6])}
  per_cat = per_category_ap(evaluator)
  stats.update({f'AP-{n}': v for n, v in per_cat.items()})
  summary = buf.getvalue()
  lines = [ln.replace('= -1.000', '=   -   (no objects of this size)') for ln in summary.splitlines()
           if ln.startswith(' Average Precision')]
  return stats, f'{iou_type}:\n' + '\n'.join(lines) + '\n', per_cat


def _fmt(value: float | None) -> str:
  return '-' if value is None else f'{100 * value:.1f}'


def per_category_table(
    coco_gt: Any, per_cat: dict[str, dict[str, float | None]], image_ids: Sequence[int] | None = None
) -> str:
  """The per-category AP table of summary.txt (detectron2's "Per-category bbox AP", box and mask side by side).

  per_cat: {'bbox': {name: AP fraction or None}, 'segm': {...}}. Columns: category, ground-truth instances
  (non-crowd, in the evaluated images), then AP in percent per iou type ('-' = no ground truth).
  """
  ids = set(int(i) for i in image_ids) if image_ids is not None else None
  counts: dict[int, int] = {}
  for ann in coco_gt.dataset.get('annotations', []):
    if ann.get('iscrowd', 0) or (ids is not None and ann['image_id'] not in ids):
      continue
    counts[ann['category_id']] = counts.get(ann['category_id'], 0) + 1
  kinds = [k for k in ('bbox', 'segm') if k in per_cat]
  header = ['category', 'instances'] + [f'{"box" if k == "bbox" else "mask"} AP' for k in kinds]
  rows = [[coco_gt.cats[c]['name'], str(counts.get(c, 0))] + [_fmt(per_cat[k].get(coco_gt.cats[c]['name']))
                                                              for k in kinds]
          for c in sorted(coco_gt.getCatIds())]
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

  def line(cells: list[str]) -> str:
    return '| ' + ' | '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + ' |'

  out = ['per category (AP in %, IoU 0.50:0.95, all sizes, 100 detections):', line(header),
         '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
  return '\n'.join(out + [line(r) for r in rows]) + '\n'


def evaluate(
    predict: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    batches: Iterable[dict[str, np.ndarray]],
    coco_gt: Any,
    category_ids: Sequence[int],
    out_dir: str,
    *,
    with_masks: bool,
    num_batches: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, float | None]:
  """Run `predict` over `batches`, write `bbox_results.json` (and `segm_results.json`) and score them.

  predict(batch) -> numpy detections (see `detections_to_results`). Returns flat metrics: `bbox/AP`, ...,
  `bbox/APl`, `bbox/AP-<category name>` per category, the same for `segm/`, plus `eval_seconds` and
  `postprocess_seconds` (host-side share of eval time). Values are fractions; None (null in `metrics.json`) where
  COCOeval has nothing to score (no objects of that size, no ground truth of that category). `summary.txt` holds
  COCOeval's tables and the per-category table.
  """
  start = time.perf_counter()
  host_time = 0.0
  bbox_results, segm_results, image_ids = [], [], []
  for index, batch in enumerate(batches):
    image_ids += [int(i) for i, v in zip(batch['image_id'], batch['valid']) if v]
    dets = predict(batch)
    t0 = time.perf_counter()
    b, s = detections_to_results(dets, batch, category_ids)
    host_time += time.perf_counter() - t0
    bbox_results += b
    segm_results += s
    if progress is not None:
      progress(index + 1, num_batches)
  os.makedirs(out_dir, exist_ok=True)
  metrics: dict[str, float | None] = {}
  report = ''
  per_cat: dict[str, dict[str, float | None]] = {}
  kinds = [('bbox', bbox_results)] + ([('segm', segm_results)] if with_masks else [])
  for iou_type, results in kinds:
    with open(os.path.join(out_dir, f'{iou_type}_results.json'), 'w') as f:
      json.dump(results, f)
    t0 = time.perf_counter()
    stats, table, per_cat[iou_type] = _coco_evaluate(coco_gt, results, iou_type, image_ids)
    host_time += time.perf_counter() - t0
    metrics.update({f'{iou_type}/{k}': v for k, v in stats.items()})
    report += table
  report += per_category_table(coco_gt, per_cat, image_ids)
  metrics['eval_seconds'] = time.perf_counter() - start
  metrics['postprocess_seconds'] = host_time
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(metrics, f, indent=1)
  with open(os.path.join(out_dir, 'summary.txt'), 'w') as f:
    f.write(report)
  print(report, end='', flush=True)
  return metrics
