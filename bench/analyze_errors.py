"""Error analysis of one evaluation: where the AP of a run is lost, with pycocotools on its results JSON.

    python bench/analyze_errors.py --workdir runs/default                 # the latest eval/step_N of a train.py run
    python bench/analyze_errors.py --gt val/instances.json --results runs/x/eval/step_1500 --out report.json

Reports (markdown on stdout, every number also in --out as JSON):
- the validation set: instances by size (sqrt of the visible area) and by occlusion;
- box and mask AP overall, by size (tiny < 16 px, small 16-32, medium 32-96, large > 96, as sqrt of the area),
  by IoU threshold (0.50 ... 0.95) and by class;
- class-agnostic AP (COCOeval with useCats=0) against class-aware AP: what confusions cost, and the confusion
  matrix of the highest-scoring detection with IoU >= 0.5 (and score >= --score) of each ground-truth instance;
- recall at IoU 0.5 among each image's 100 detections, class-aware and class-agnostic, by size, by occlusion
  (whole / cut by the image border / occluded by a later shape) and for crowded instances (overlapping another
  ground-truth box);
- what the data's difficulties cost: AP on subsets of the images by background texture (the shapes generator's
  background kind, replayed from its seed) and box AP with the tiny instances (or the occluded ones) turned into
  ignore regions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import io
import json
import os
import sys
import zlib

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retinamask_jax.data import shapes  # noqa: E402

SIZE_BINS = (('tiny <16', 0, 16), ('small 16-32', 16, 32), ('medium 32-96', 32, 96), ('large >96', 96, 1e5))
IOUS = np.linspace(0.5, 0.95, 10)


def _quiet(fn, *args, **kwargs):
  with contextlib.redirect_stdout(io.StringIO()):
    return fn(*args, **kwargs)


def load_gt(data: dict) -> COCO:
  coco = COCO()
  coco.dataset = copy.deepcopy(data)
  _quiet(coco.createIndex)
  return coco


def run_cocoeval(gt: COCO, results: list, iou_type: str, *, use_cats: bool = True,
                 area_rngs: tuple = SIZE_BINS, img_ids: list | None = None) -> dict:
  """AP (%), AP by IoU threshold, by size bin, by category, AR100."""
  if not results:
    return {'AP': 0.0}
  dt = _quiet(gt.loadRes, copy.deepcopy(results))
  ev = COCOeval(gt, dt, iou_type)
  ev.params.useCats = int(use_cats)
  ev.params.areaRng = [[0, 1e10]] + [[lo * lo, hi * hi] for _, lo, hi in area_rngs]
  ev.params.areaRngLbl = ['all'] + [name for name, _, _ in area_rngs]
  if img_ids is not None:
    ev.params.imgIds = sorted(img_ids)
  _quiet(ev.evaluate)
  _quiet(ev.accumulate)
  p = ev.eval['precision']  # [T, R, K, A, M]
  r = ev.eval['recall']  # [T, K, A, M]

  def ap(sl):
    v = sl[sl > -1]
    return float(100 * v.mean()) if v.size else None

  out = {'AP': ap(p[:, :, :, 0, -1]), 'AP50': ap(p[0, :, :, 0, -1]), 'AP75': ap(p[5, :, :, 0, -1])}
  rec = r[:, :, 0, -1]
  out['AR100'] = float(100 * rec[rec > -1].mean()) if (rec > -1).any() else None
  out['by_iou'] = {f'{t:.2f}': ap(p[i, :, :, 0, -1]) for i, t in enumerate(IOUS)}
  out['by_size'] = {name: ap(p[:, :, :, a + 1, -1]) for a, (name, _, _) in enumerate(area_rngs)}
  if use_cats:
    out['by_class'] = {gt.cats[c]['name']: ap(p[:, :, k, 0, -1]) for k, c in enumerate(ev.params.catIds)}
  return out


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of xywh boxes a [M, 4] and b [K, 4] -> [M, K]."""
  if not len(a) or not len(b):
    return np.zeros((len(a), len(b)))
  return np.asarray(mask_utils.iou(a.tolist(), b.tolist(), [0] * len(b)))


def instance_table(data: dict) -> list[dict]:
  """Per ground-truth instance (non-crowd): id, image, class, size (sqrt area), occlusion kind, crowded flag."""
  images = {im['id']: im for im in data['images']}
  by_image: dict[int, list] = {}
  for a in data['annotations']:
    if not a.get('iscrowd', 0):
      by_image.setdefault(a['image_id'], []).append(a)
  rows = []
  for image_id, anns in by_image.items():
    im = images[image_id]
    boxes = np.array([a['bbox'] for a in anns], float)
    iou = _box_iou(boxes, boxes)
    np.fill_diagonal(iou, 0)
    for i, a in enumerate(anns):
      x, y, w, h = a['bbox']
      at_border = x <= 0 or y <= 0 or x + w >= im['width'] or y + h >= im['height']
      # The generator writes a polygon for a whole shape; an RLE for a ring, a border-cut or an occluded one.
      whole = isinstance(a['segmentation'], list)
      name = next(c['name'] for c in data['categories'] if c['id'] == a['category_id'])
      if whole or (name == 'ring' and not at_border):
        occlusion = 'whole' if whole else 'ring (unknown)'
      else:
        occlusion = 'border-cut' if at_border else 'occluded'
      rows.append({'id': a['id'], 'image_id': image_id, 'category_id': a['category_id'], 'class': name,
                   'size': float(np.sqrt(a['area'])), 'bbox': a['bbox'], 'occlusion': occlusion,
                   'crowded': bool((iou[i] > 0).any())})
  return rows


def add_contrast(instances: list[dict], data: dict, images_dir: str) -> None:
  """Adds 'contrast' to each instance: the distance (RGB, 0-255) between the mean colour of its visible pixels
  and the mean colour of the pixels in a 3-px band around them that belong to no instance (the background it
  stands on); None when no such band pixels exist."""
  from PIL import Image
  from scipy import ndimage

  images = {im['id']: im for im in data['images']}
  anns = {a['id']: a for a in data['annotations']}
  by_image: dict[int, list] = {}
  for inst in instances:
    by_image.setdefault(inst['image_id'], []).append(inst)
  for image_id, insts in by_image.items():
    im = images[image_id]
    h, w = im['height'], im['width']
    pixels = np.asarray(Image.open(os.path.join(images_dir, im['file_name'])).convert('RGB'), np.float32)
    masks = {}
    for a in data['annotations']:
      if a['image_id'] == image_id:
        seg = a['segmentation']
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg, list) or isinstance(seg['counts'], list) else \
            dict(seg, counts=seg['counts'].encode())
        m = mask_utils.decode(rle)
        masks[a['id']] = (m.max(-1) if m.ndim == 3 else m).astype(bool)
    anything = np.zeros((h, w), bool)
    for m in masks.values():
      anything |= m
    for inst in insts:
      m = masks[anns[inst['id']]['id']]
      band = ndimage.binary_dilation(m, iterations=3) & ~anything
      inst['contrast'] = (float(np.linalg.norm(pixels[m].mean(0) - pixels[band].mean(0)))
                          if band.any() and m.any() else None)


def recall_table(instances: list[dict], results: list, iou_thr: float = 0.5) -> list[dict]:
  """Adds 'found' (a same-class detection with IoU >= iou_thr among the image's results) and 'found_any' (any
  class) to each instance."""
  dets: dict[int, list] = {}
  for d in results:
    dets.setdefault(d['image_id'], []).append(d)
  by_image: dict[int, list] = {}
  for inst in instances:
    by_image.setdefault(inst['image_id'], []).append(inst)
  for image_id, insts in by_image.items():
    ds = dets.get(image_id, [])
    iou = _box_iou(np.array([i['bbox'] for i in insts], float), np.array([d['bbox'] for d in ds], float))
    cats = np.array([d['category_id'] for d in ds])
    for k, inst in enumerate(insts):
      hit = iou[k] >= iou_thr if len(ds) else np.zeros(0, bool)
      inst['found_any'] = bool(hit.any())
      inst['found'] = bool((hit & (cats == inst['category_id'])).any()) if len(ds) else False
  return instances


def confusion(instances: list[dict], results: list, names: dict, score: float) -> dict:
  """For each GT instance: the class of its highest-scoring detection among those with IoU >= 0.5 and a score >=
  `score` (the one a class-agnostic evaluation would match first), or 'missed'."""
  dets: dict[int, list] = {}
  for d in results:
    if d['score'] >= score:
      dets.setdefault(d['image_id'], []).append(d)
  table: dict[str, dict[str, int]] = {}
  for inst in instances:
    ds = dets.get(inst['image_id'], [])
    iou = _box_iou(np.array([inst['bbox']], float), np.array([d['bbox'] for d in ds], float))[0] if ds else []
    hits = [k for k in range(len(ds)) if iou[k] >= 0.5]
    label = names[ds[max(hits, key=lambda k: ds[k]['score'])]['category_id']] if hits else 'missed'
    row = table.setdefault(inst['class'], {})
    row[label] = row.get(label, 0) + 1
  return table


def background_kinds(data: dict) -> dict[int, str]:
  """The generator's background kind of each image, replayed from the seed recorded in the JSON's info (the same
  random draws as shapes._generate_image up to the background choice)."""
  info = data.get('info', {})
  if info.get('description') != 'retinamask-jax synthetic shapes':
    return {}
  split_code = zlib.crc32(info['split'].encode())
  kinds = {}
  for index in range(info['num_images']):
    rng = np.random.default_rng([info['seed'], split_code, index])
    shapes._image_hw(rng, tuple(info['image_size']))
    kinds[index + 1] = str(rng.choice(['noise', 'gradient', 'stripes', 'checker', 'blotches']))
  return kinds


def with_ignored(data: dict, ignore: set) -> COCO:
  """The GT with the annotations in `ignore` turned into ignore regions (iscrowd=1: detections on them neither
  count nor cost)."""
  d = copy.deepcopy(data)
  for a in d['annotations']:
    if a['id'] in ignore:
      a['iscrowd'] = 1
      if isinstance(a['segmentation'], list):  # crowd segmentations are RLE in COCO
        im = next(i for i in d['images'] if i['id'] == a['image_id'])
        rle = mask_utils.merge(mask_utils.frPyObjects(a['segmentation'], im['height'], im['width']))
        a['segmentation'] = {'size': rle['size'], 'counts': rle['counts'].decode()}
  return load_gt(d)


def _fmt(v) -> str:
  return '-' if v is None else f'{v:.1f}'


def analyze(gt_path: str, results_dir: str, score: float, images_dir: str | None = None) -> dict:
  with open(gt_path) as f:
    data = json.load(f)
  gt = load_gt(data)
  names = {c['id']: c['name'] for c in data['categories']}
  results = {}
  for kind in ('bbox', 'segm'):
    path = os.path.join(results_dir, f'{kind}_results.json')
    if os.path.exists(path):
      with open(path) as f:
        results[kind] = json.load(f)
  report: dict = {'gt': gt_path, 'results': results_dir, 'score': score}
  instances = recall_table(instance_table(data), results['bbox'])
  images_dir = images_dir or os.path.join(os.path.dirname(gt_path), 'images')
  if os.path.isdir(images_dir):
    add_contrast(instances, data, images_dir)
  sizes = np.array([i['size'] for i in instances])
  report['instances'] = {
      'total': len(instances), 'images': len(data['images']),
      'by_size': {name: int(((sizes >= lo) & (sizes < hi)).sum()) for name, lo, hi in SIZE_BINS},
      'by_occlusion': {k: sum(i['occlusion'] == k for i in instances)
                       for k in ('whole', 'border-cut', 'occluded', 'ring (unknown)')},
      'crowded': sum(i['crowded'] for i in instances),
  }
  for kind, res in results.items():
    report[kind] = run_cocoeval(gt, res, kind)
    report[f'{kind}_agnostic'] = run_cocoeval(gt, res, kind, use_cats=False)
  report['confusion'] = confusion(instances, results['bbox'], names, score)

  def recall(subset):
    subset = list(subset)
    if not subset:
      return {'n': 0}
    return {'n': len(subset), 'recall': 100 * np.mean([i['found'] for i in subset]),
            'recall_agnostic': 100 * np.mean([i['found_any'] for i in subset])}

  report['recall'] = {
      'all': recall(instances),
      **{f'size {name}': recall(i for i in instances if lo <= i['size'] < hi) for name, lo, hi in SIZE_BINS},
      **{f'occlusion {k}': recall(i for i in instances if i['occlusion'] == k)
         for k in ('whole', 'border-cut', 'occluded')},
      'crowded (box overlaps another GT box)': recall(i for i in instances if i['crowded']),
      'not crowded': recall(i for i in instances if not i['crowded']),
      # Size-matched: the occlusion effect among medium-sized instances only.
      'occluded, 32-96 px': recall(i for i in instances if i['occlusion'] == 'occluded' and 32 <= i['size'] < 96),
      'whole, 32-96 px': recall(i for i in instances if i['occlusion'] == 'whole' and 32 <= i['size'] < 96),
  }
  if any(i.get('contrast') is not None for i in instances):
    for name, lo, hi in (('< 20', 0, 20), ('20-40', 20, 40), ('40-80', 40, 80), ('>= 80', 80, 1e9)):
      report['recall'][f'contrast to surrounding background {name}'] = recall(
          i for i in instances if i.get('contrast') is not None and lo <= i['contrast'] < hi)
      report['recall'][f'contrast {name}, >= 16 px'] = recall(
          i for i in instances if i.get('contrast') is not None and lo <= i['contrast'] < hi and i['size'] >= 16)
  kinds = background_kinds(data)
  if kinds:
    report['by_background'] = {}
    for bg in sorted(set(kinds.values())):
      ids = [i for i, k in kinds.items() if k == bg]
      report['by_background'][bg] = {
          'images': len(ids), 'instances': sum(1 for i in instances if kinds.get(i['image_id']) == bg),
          **{kind: run_cocoeval(gt, res, kind, img_ids=ids)['AP'] for kind, res in results.items()}}
  tiny = {i['id'] for i in instances if i['size'] < 16}
  occluded = {i['id'] for i in instances if i['occlusion'] in ('occluded', 'border-cut')}
  report['ignoring'] = {
      'tiny (<16 px) as ignore regions': {kind: run_cocoeval(with_ignored(data, tiny), res, kind)['AP']
                                          for kind, res in results.items()},
      'occluded and border-cut as ignore regions': {
          kind: run_cocoeval(with_ignored(data, occluded), res, kind)['AP'] for kind, res in results.items()},
  }
  return report


def markdown(report: dict) -> str:
  lines = [f"Validation set: {report['instances']['images']} images, {report['instances']['total']} instances; "
           f"by size (sqrt area): {report['instances']['by_size']}; by occlusion: "
           f"{report['instances']['by_occlusion']}; crowded (box overlaps another GT box): "
           f"{report['instances']['crowded']}", '']
  kinds = [k for k in ('bbox', 'segm') if k in report]
  head = '| | ' + ' | '.join(f'{"box" if k == "bbox" else "mask"}' for k in kinds) + ' |'
  sep = '|---|' + '---|' * len(kinds)
  lines += ['AP (%) overall, class-aware and class-agnostic, by size and by IoU:', '', head, sep]
  rows = [('AP', lambda k: report[k]['AP']), ('AP50', lambda k: report[k]['AP50']),
          ('AP75', lambda k: report[k]['AP75']), ('AR100', lambda k: report[k]['AR100']),
          ('class-agnostic AP', lambda k: report[f'{k}_agnostic']['AP']),
          ('class-agnostic AP50', lambda k: report[f'{k}_agnostic']['AP50']),
          ('class-agnostic AR100', lambda k: report[f'{k}_agnostic']['AR100'])]
  rows += [(f'AP {name}', lambda k, n=name: report[k]['by_size'][n]) for name, _, _ in SIZE_BINS]
  rows += [(f'AP @IoU {t}', lambda k, t=t: report[k]['by_iou'][t]) for t in ('0.50', '0.60', '0.70', '0.80', '0.90')]
  rows += [(f'AP {c}', lambda k, c=c: report[k]['by_class'][c]) for c in report['bbox']['by_class']]
  for label, get in rows:
    lines.append(f'| {label} | ' + ' | '.join(_fmt(get(k)) for k in kinds) + ' |')
  lines += ['', 'Recall (%) at IoU 0.5 among the 100 detections of each image:', '',
            '| instances | n | class-aware | class-agnostic |', '|---|---|---|---|']
  for name, r in report['recall'].items():
    lines.append(f"| {name} | {r['n']} | {_fmt(r.get('recall'))} | {_fmt(r.get('recall_agnostic'))} |")
  classes = list(report['confusion'])
  cols = classes + ['missed']
  lines += ['', f'Confusions: the highest-scoring detection with IoU >= 0.5 and score >= {report["score"]} of each '
            'GT instance (rows: GT class):', '', '| GT \\ detected | ' + ' | '.join(cols) + ' |',
            '|---|' + '---|' * len(cols)]
  for c in classes:
    lines.append(f'| {c} | ' + ' | '.join(str(report['confusion'][c].get(x, 0)) for x in cols) + ' |')
  if 'by_background' in report:
    lines += ['', 'AP (%) by background texture (image subsets):', '',
              '| background | images | instances | ' + ' | '.join(kinds) + ' |', '|---|---|---|' + '---|' * len(kinds)]
    for bg, r in report['by_background'].items():
      lines.append(f"| {bg} | {r['images']} | {r['instances']} | " + ' | '.join(_fmt(r.get(k)) for k in kinds) + ' |')
  lines += ['', 'AP (%) with some instances turned into ignore regions:', '', '| | ' + ' | '.join(kinds) + ' |',
            '|---|' + '---|' * len(kinds), '| none (as evaluated) | ' + ' | '.join(_fmt(report[k]['AP']) for k in kinds)
            + ' |']
  for name, r in report['ignoring'].items():
    lines.append(f'| {name} | ' + ' | '.join(_fmt(r.get(k)) for k in kinds) + ' |')
  return '\n'.join(lines) + '\n'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', help='a train.py workdir: its shapes val split and latest eval/step_N')
  parser.add_argument('--gt', help='validation instances JSON (default: <workdir>/data/shapes/val/instances.json)')
  parser.add_argument('--results', help='folder with bbox_results.json / segm_results.json')
  parser.add_argument('--score', type=float, default=0.1, help='score threshold of the confusion matrix')
  parser.add_argument('--out', help='write the report as JSON here')
  args = parser.parse_args()
  gt = args.gt or os.path.join(args.workdir, 'data', 'shapes', 'val', 'instances.json')
  results = args.results
  if not results:
    steps = sorted(glob.glob(os.path.join(args.workdir, 'eval', 'step_*')), key=lambda p: int(p.rsplit('_', 1)[1]))
    if not steps:
      sys.exit(f'error: no eval/step_* in {args.workdir}')
    results = steps[-1]
  report = analyze(gt, results, args.score)
  print(markdown(report), end='')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=1)


if __name__ == '__main__':
  main()
