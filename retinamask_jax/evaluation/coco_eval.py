"""Detections -> COCO results JSON -> pycocotools COCOeval (bbox and segm).

Inference is one jitted function per canvas (`train.step.make_predict_fn`); this module does the host side:
mapping detections from canvas pixels back to original image coordinates, pasting masks and RLE-encoding them,
writing the results files and running COCOeval. Box results keep all `postprocess.max_detections` (100) boxes per
image; mask results cover the top `mask.num_masks_test` (50). (The authors' MASK_ON evaluation scored boxes on the
50 masked detections only; scoring 100 boxes is what their separate bbox-only run reports.)
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
) -> tuple[dict[str, float], str]:
  """Run COCOeval on `image_ids` (default: all GT images).

  Returns ({AP, AP50, AP75, APs, APm, APl} as fractions, the summary table COCOeval prints).
  """
  from pycocotools.cocoeval import COCOeval

  if not results:
    return {k: 0.0 for k in METRIC_NAMES}, f'{iou_type}: no detections\n'
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    coco_dt = coco_gt.loadRes(results)
    evaluator = COCOeval(coco_gt, coco_dt, iou_type)
    if image_ids is not None:
      evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  # COCOeval reports -1 for an empty area range; keep it, it means "no such objects", not zero AP.
  stats = {k: float(v) for k, v in zip(METRIC_NAMES, evaluator.stats[:6])}
  summary = buf.getvalue()
  lines = [ln for ln in summary.splitlines() if ln.startswith(' Average Precision')]
  return stats, f'{iou_type}:\n' + '\n'.join(lines) + '\n'


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
) -> dict[str, float]:
  """Run `predict` over `batches`, write `bbox_results.json` (and `segm_results.json`) and score them.

  predict(batch) -> numpy detections (see `detections_to_results`). Returns flat metrics: `bbox/AP`, ...,
  `segm/AP`, ..., plus `eval_seconds` and `postprocess_seconds` (host-side share of eval time).
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
  metrics: dict[str, float] = {}
  report = ''
  kinds = [('bbox', bbox_results)] + ([('segm', segm_results)] if with_masks else [])
  for iou_type, results in kinds:
    with open(os.path.join(out_dir, f'{iou_type}_results.json'), 'w') as f:
      json.dump(results, f)
    t0 = time.perf_counter()
    stats, table = coco_evaluate(coco_gt, results, iou_type, image_ids)
    host_time += time.perf_counter() - t0
    metrics.update({f'{iou_type}/{k}': v for k, v in stats.items()})
    report += table
  metrics['eval_seconds'] = time.perf_counter() - start
  metrics['postprocess_seconds'] = host_time
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(metrics, f, indent=1)
  with open(os.path.join(out_dir, 'summary.txt'), 'w') as f:
    f.write(report)
  print(report, end='', flush=True)
  return metrics
