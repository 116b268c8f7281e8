"""COCO evaluation time of our evaluation path, phase by phase: how much of evaluation the host post-processing is.

  python bench/bench_eval.py [--images 500] [--inference_size 896x1408] [--inference_runs 3] [--inference_ms MS]
      [--threads 2] [--quick] [--out bench/results/eval.json]

Data: a synthetic COCO ground truth written as an instances JSON (`--images` images of COCO sizes, 480 x 640 and the
like in both orientations, ~7 objects each, 80 categories, ellipse polygons) and, per image, the detections our
jitted predictor returns: 100 boxes in canvas pixels (the image resized by the test rule 800 / 1333), scores sorted
high to low, classes, and 28 x 28 mask probabilities for the top 50 (`mask.num_masks_test`); 60% of the boxes
are jittered copies of GT objects, so COCOeval has matches to score.

Phases (host side, `retinamask_jax/evaluation/coco_eval.py`'s path, batches of `eval.batch_size` = 8 images):
- `detections_to_results`, the whole call, and its parts measured separately: box results only (masks removed:
  canvas -> original coordinates, result dicts), `paste_masks` (28 x 28 -> full image, bool), `encode_rle`;
- writing the results JSON files; COCOeval bbox and segm (`coco_evaluate`: loadRes, evaluate, accumulate, summarize).
Host post-processing = the `detections_to_results` call + JSON + both COCOevals. `coco_eval.evaluate` itself is
also run end to end on the same detections with a predictor that just returns them (its `postprocess_seconds` and
`eval_seconds`): a check that the phases account for the library's time.

Inference: our RetinaMask R-50 predictor with masks (`configs/retinamask_r50_fpn_2x_ms.py`, random weights, score
threshold 0 so every image has its 100 detections) at `--inference_size` (default 896 x 1408, the canvas evaluation
runs COCO's 800 / 1333 images on), batch 1, median of `--inference_runs` after one warm-up call; or `--inference_ms`
from elsewhere (e.g. bench/results/inference.json). Share = host post-processing / (host post-processing + images x
inference ms). Issue 7's target: <= 20%.

Threads: `--threads N` (default 2) pins the process to N cores before JAX starts (XLA sizes its thread pool from the
affinity; pycocotools and numpy run single-threaded here); XLA_FLAGS is recorded as the environment has it.
`--quick` is a smoke test (20 images; inference of a narrow ResNet-18 at 128 x 128): its numbers are meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import side_by_side as sbs  # noqa: E402 (puts the repository root on sys.path)
from timing import limit_threads, machine_info, median_ms, write_json  # noqa: E402

DEFAULT_OUT = os.path.join(BENCH, 'results', 'eval.json')
IMAGE_SIZES = ((480, 640), (640, 480), (427, 640), (640, 427), (375, 500), (500, 375), (512, 640), (640, 512))
DETECTIONS, MASKS, MASK_SIDE, EVAL_BATCH = 100, 50, 28, 8
TEST_MIN, TEST_MAX = 800, 1333


def _ellipse_polygon(box: np.ndarray, points: int = 16) -> list[float]:
  """COCO polygon [x0, y0, x1, y1, ...] of the ellipse inscribed in xyxy `box`."""
  t = np.linspace(0, 2 * np.pi, points, endpoint=False)
  cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
  rx, ry = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
  return np.round(np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1).reshape(-1), 2).tolist()


def _boxes(rng: np.random.Generator, k: int, h: int, w: int) -> np.ndarray:
  """[k, 4] float64 xyxy boxes inside (h, w), sides log-uniform 12..400 px (COCO has many small objects)."""
  wh = np.minimum(np.exp(rng.uniform(np.log(12), np.log(400), (k, 2))), (w - 1, h - 1))
  x1y1 = rng.uniform(0, 1, (k, 2)) * ((w, h) - wh)
  return np.concatenate([x1y1, x1y1 + wh], 1)


def make_dataset(num_images: int, seed: int) -> tuple[dict, list[dict[str, np.ndarray]]]:
  """(COCO instances dict, per-image arrays: orig_hw, resized_hw, gt boxes / classes) for `num_images` images."""
  from retinamask_jax.data import transforms

  rng = np.random.default_rng(seed)
  images, annotations, per_image = [], [], []
  for image_id in range(1, num_images + 1):
    h, w = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
    images.append(dict(id=image_id, height=h, width=w, file_name=f'{image_id:012d}.jpg'))
    k = max(1, rng.poisson(7))
    boxes, classes = _boxes(rng, k, h, w), rng.integers(1, 81, k)
    for box, cls in zip(boxes, classes):
      bw, bh = box[2] - box[0], box[3] - box[1]
      annotations.append(dict(
          id=len(annotations) + 1, image_id=image_id, category_id=int(cls), iscrowd=0,
          bbox=[round(float(v), 2) for v in (box[0], box[1], bw, bh)], area=float(np.pi * bw * bh / 4),
          segmentation=[_ellipse_polygon(box)],
      ))
    per_image.append(dict(orig_hw=(h, w), resized_hw=transforms.resized_hw(h, w, TEST_MIN, TEST_MAX),
                          boxes=boxes, classes=classes))
  categories = [dict(id=c, name=f'class{c}', supercategory='thing') for c in range(1, 81)]
  return dict(images=images, annotations=annotations, categories=categories), per_image


def make_detections(per_image: list[dict[str, np.ndarray]], seed: int) -> list[dict[str, np.ndarray]]:
  """One image's predictor output each (numpy, batch axis of 1): boxes [1, 100, 4] float32 canvas pixels, scores
  [1, 100] sorted descending, classes [1, 100] int32 in 1..80, valid [1, 100] bool, masks [1, 50, 28, 28] float32."""
  rng = np.random.default_rng(seed + 1)
  # Mask probabilities: a soft ellipse filling the box, with noise, as a trained head gives (about half the box).
  yy, xx = (np.mgrid[:MASK_SIDE, :MASK_SIDE] + 0.5) / MASK_SIDE * 2 - 1
  blob = 1 / (1 + np.exp(-8 * (1 - (yy**2 + xx**2))))
  out = []
  for p in per_image:
    (h, w), (rh, rw) = p['orig_hw'], p['resized_hw']
    on_gt = int(0.6 * DETECTIONS)
    pick = rng.integers(len(p['boxes']), size=on_gt)
    gt = p['boxes'][pick]
    jitter = rng.normal(0, 0.1, (on_gt, 4)) * np.tile(gt[:, 2:] - gt[:, :2], 2)
    boxes = np.concatenate([gt + jitter, _boxes(rng, DETECTIONS - on_gt, h, w)])
    boxes = np.clip(boxes, 0, (w, h, w, h)) * (rw / w, rh / h, rw / w, rh / h)
    classes = np.concatenate([np.where(rng.random(on_gt) < 0.8, p['classes'][pick], rng.integers(1, 81, on_gt)),
                              rng.integers(1, 81, DETECTIONS - on_gt)])
    order = rng.permutation(DETECTIONS)
    masks = np.clip(blob + rng.normal(0, 0.1, (MASKS, MASK_SIDE, MASK_SIDE)), 0, 1)
    out.append(dict(
        boxes=boxes[order][None].astype(np.float32),
        scores=np.sort(rng.uniform(0.05, 1.0, DETECTIONS))[::-1][None].astype(np.float32),
        classes=classes[order][None].astype(np.int32),
        valid=np.ones((1, DETECTIONS), bool),
        masks=masks[None].astype(np.float32),
    ))
  return out


def make_batches(per_image, detections) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
  """(batch, detections) pairs of EVAL_BATCH images, in the layout evaluation hands to `detections_to_results`."""
  pairs = []
  for start in range(0, len(per_image), EVAL_BATCH):
    idx = range(start, min(start + EVAL_BATCH, len(per_image)))
    batch = dict(
        valid=np.ones(len(idx), bool),
        image_id=np.array([i + 1 for i in idx], np.int64),
        image_size=np.array([per_image[i]['resized_hw'] for i in idx], np.int32),
        orig_size=np.array([per_image[i]['orig_hw'] for i in idx], np.int32),
    )
    dets = {k: np.concatenate([detections[i][k] for i in idx]) for k in detections[0]}
    pairs.append((batch, dets))
  return pairs


def time_phases(pairs, coco_gt, category_ids, out_dir: str) -> dict[str, float]:
  """Seconds per host phase over all `pairs`."""
  from retinamask_jax.evaluation import coco_eval
  from retinamask_jax.ops import masks as masks_lib

  t = {}
  start = time.perf_counter()
  bbox, segm = [], []
  for batch, dets in pairs:
    b, s = coco_eval.detections_to_results(dets, batch, category_ids)
    bbox += b
    segm += s
  t['detections_to_results'] = time.perf_counter() - start

  start = time.perf_counter()
  for batch, dets in pairs:
    coco_eval.detections_to_results({k: v for k, v in dets.items() if k != 'masks'}, batch, category_ids)
  t['box_results_only'] = time.perf_counter() - start

  # The mask part of detections_to_results, split: the same boxes (canvas -> original) and masks as it pastes.
  paste = rle = 0.0
  for batch, dets in pairs:
    for i in range(len(batch['image_id'])):
      (h, w), (oh, ow) = batch['image_size'][i], batch['orig_size'][i]
      boxes = dets['boxes'][i, :MASKS] * np.array([ow / w, oh / h, ow / w, oh / h], np.float32)
      boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, ow)
      boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, oh)
      t0 = time.perf_counter()
      pasted = masks_lib.paste_masks(dets['masks'][i], boxes, (int(oh), int(ow)), threshold=0.5)
      t1 = time.perf_counter()
      masks_lib.encode_rle(pasted)
      t2 = time.perf_counter()
      paste, rle = paste + t1 - t0, rle + t2 - t1
  t['paste_masks'], t['encode_rle'] = paste, rle

  start = time.perf_counter()
  for name, results in (('bbox', bbox), ('segm', segm)):
    with open(os.path.join(out_dir, f'{name}_results.json'), 'w') as f:
      json.dump(results, f)
  t['write_json'] = time.perf_counter() - start
  image_ids = [int(i) for batch, _ in pairs for i in batch['image_id']]
  for name, results in (('bbox', bbox), ('segm', segm)):
    start = time.perf_counter()
    stats, _ = coco_eval.coco_evaluate(coco_gt, results, name, image_ids)
    t[f'cocoeval_{name}'] = time.perf_counter() - start
    t[f'{name}_AP'] = stats['AP']
  t['host_total'] = t['detections_to_results'] + t['write_json'] + t['cocoeval_bbox'] + t['cocoeval_segm']
  t['num_bbox_results'], t['num_segm_results'] = len(bbox), len(segm)
  return t


def time_library(pairs, coco_gt, category_ids, out_dir: str) -> dict[str, float]:
  """`coco_eval.evaluate` end to end with a predictor that returns the prepared detections (no inference)."""
  import contextlib
  import io

  from retinamask_jax.evaluation import coco_eval

  dets_of = {int(batch['image_id'][0]): dets for batch, dets in pairs}
  with contextlib.redirect_stdout(io.StringIO()):  # evaluate prints the AP tables
    metrics = coco_eval.evaluate(lambda batch: dets_of[int(batch['image_id'][0])], [b for b, _ in pairs], coco_gt,
                                 category_ids, out_dir, with_masks=True)
  return dict(eval_seconds=metrics['eval_seconds'], postprocess_seconds=metrics['postprocess_seconds'])


def time_inference(size_hw: tuple[int, int], runs: int, quick: bool) -> dict:
  """Our RetinaMask predictor with masks at `size_hw`, batch 1: median ms and compile seconds."""
  import jax
  import jax.numpy as jnp

  from retinamask_jax.models import retinamask
  from retinamask_jax.train import step as step_lib

  config = sbs.our_config('retinamask', size_hw, shrink=quick)
  config.postprocess.score_threshold = 0.0  # random weights score ~0.01: keep the 100 detections a trained model has
  model, init = retinamask.build_model(config)
  variables = init(jax.random.key(0), size_hw)
  variables = {k: variables[k] for k in ('params', 'frozen')}
  images = jnp.asarray(sbs.synthetic_images(1, size_hw))
  image_size = jnp.asarray([size_hw], jnp.int32)
  predict = jax.jit(step_lib.make_predict_fn(model, config, True))
  start = time.perf_counter()
  predict.lower(variables, images, image_size).compile()
  compile_s = time.perf_counter() - start
  ms = median_ms(lambda: jax.block_until_ready(predict(variables, images, image_size)), runs, 1)
  return dict(size=f'{size_hw[0]}x{size_hw[1]}', ms=ms, compile_s=round(compile_s, 2), runs=runs, batch=1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=500)
  parser.add_argument('--inference_size', default='896x1408', help='HxW canvas of the timed inference')
  parser.add_argument('--inference_runs', type=int, default=3, help='timed inference calls (median)')
  parser.add_argument('--inference_ms', type=float, default=None, help='use this per-image time, do not measure')
  parser.add_argument('--threads', type=int, default=2, help='cores for JAX (affinity; 0 = all)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--no-library', dest='no_library', action='store_true',
                      help='skip the end-to-end coco_eval.evaluate check')
  parser.add_argument('--quick', action='store_true', help='smoke test: 20 images, narrow model at 128x128')
  parser.add_argument('--out', default=None, help='JSON results file (default bench/results/eval.json, '
                      'eval_quick.json with --quick)')
  args = parser.parse_args()
  if args.quick:
    args.images, args.inference_size, args.inference_runs = 20, '128x128', 2
  args.out = args.out or (DEFAULT_OUT.replace('.json', '_quick.json') if args.quick else DEFAULT_OUT)
  threads = limit_threads(args.threads)

  import contextlib
  import io

  from pycocotools.coco import COCO

  work = tempfile.mkdtemp(prefix='retinamask_bench_eval_')
  gt, per_image = make_dataset(args.images, args.seed)
  gt_path = os.path.join(work, 'instances_synthetic.json')
  with open(gt_path, 'w') as f:
    json.dump(gt, f)
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO(gt_path)
  pairs = make_batches(per_image, make_detections(per_image, args.seed))
  category_ids = list(range(1, 81))
  print(f'{args.images} images, {len(gt["annotations"])} GT objects, {DETECTIONS} detections / {MASKS} masks per '
        f'image; GT json {gt_path}', flush=True)

  phases = time_phases(pairs, coco_gt, category_ids, work)
  library = None if args.no_library else time_library(pairs, coco_gt, category_ids, os.path.join(work, 'lib'))
  if args.inference_ms is None:
    inference = time_inference(sbs.parse_hw(args.inference_size), args.inference_runs, args.quick)
  else:
    inference = dict(size=args.inference_size, ms=args.inference_ms, given=True, batch=1)
  inference_s = args.images * inference['ms'] / 1e3
  host = phases['host_total']
  share = host / (host + inference_s)

  n = args.images
  print(f'\nEvaluation of {n} images x {DETECTIONS} detections ({MASKS} with masks); {threads} cores')
  print('| phase | s | ms / image | share of eval |\n|---|---|---|---|')
  given = ', given' if inference.get('given') else ''
  rows = [(f'inference (ours, with masks, {inference["size"]}, batch 1{given})', inference_s)]
  # The parts of detections_to_results (measured apart) get no share: detections_to_results already counts them.
  rows += [(f'(part) {k}', phases[k]) for k in ('box_results_only', 'paste_masks', 'encode_rle')]
  rows += [(k, phases[k]) for k in ('detections_to_results', 'write_json', 'cocoeval_bbox', 'cocoeval_segm')]
  for name, seconds in rows:
    part = '' if name.startswith('(part)') else f'{seconds / (host + inference_s):.1%}'
    print(f'| {name} | {seconds:.2f} | {1e3 * seconds / n:.1f} | {part} |')
  print(f'| host post-processing (detections_to_results + json + COCOeval) | {host:.2f} | {1e3 * host / n:.1f} '
        f'| {share:.1%} |')
  if library is not None:
    print(f'coco_eval.evaluate end to end without inference: {library["eval_seconds"]:.2f} s '
          f'(its postprocess_seconds {library["postprocess_seconds"]:.2f} s; phases above: {host:.2f} s)')
  print(f'host post-processing share with inference at {inference["size"]}: {share:.1%} (target <= 20%)')

  result = dict(
      benchmark='COCO evaluation phases', machine=machine_info(), threads=threads, quick=args.quick, images=n,
      gt_objects=len(gt['annotations']), detections_per_image=DETECTIONS, masks_per_image=MASKS,
      eval_batch=EVAL_BATCH, phases_s=phases, library=library, inference=inference, inference_total_s=inference_s,
      host_share=share, target_share=0.20,
  )
  write_json(result, args.out)


if __name__ == '__main__':
  from retinamask_jax import host_malloc

  host_malloc.reexec_with_host_malloc()  # as train.py runs: tcmalloc or huge pages for XLA's buffers
  main()
