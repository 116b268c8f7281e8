"""Inference latency of our R-50 models next to torchvision's, on the same machine and the same images.

  python bench/bench_inference.py [--sizes 512x512,800x1216] [--runs 10] [--warmup 2] [--threads 2]
      [--score_threshold 0.0] [--no-torch] [--quick] [--out bench/results/inference.json]

Rows, per image size (batch 1, one image exactly that size, so neither side pads or rescales):
- detection only: ours = `make_predict_fn(..., with_masks=False)` of `configs/retinanet_r50_fpn_1x.py` (what
  `Detector.predict` and evaluation jit), peer = torchvision RetinaNet R50-FPN;
- with masks: ours = the same with `with_masks=True` of `configs/retinamask_r50_fpn_2x_ms.py` (masks for the top
  `mask.num_masks_test` = 50 detections), peer = torchvision Mask R-CNN R50-FPN (masks for all its 100 detections).
How the peers are built (frozen BN, stem + res2 frozen, 80 classes) is in bench/side_by_side.py.

Timing: median of `--runs` calls after `--warmup`, inputs already in memory, until the result is ready. Ours is the
jitted program on a normalized float32 [1, H, W, 3] array; torchvision's time is its whole `model([image])` in
`torch.inference_mode()`: its GeneralizedRCNNTransform (normalize, resize at scale 1, pad to 32) and post-processing
included. Our compile time is `jit(...).lower(...)` plus `.compile()` of that program.

Random weights make every score ~0.01 (the prior), below the usual 0.05 threshold: torchvision would then skip
its NMS and mask head while our static-shape program does the same work at any score. So both use score threshold
`--score_threshold` (default 0): ours and torchvision RetinaNet both take the top 1,000 candidates on each of the 5
levels into class-wise NMS (IoU 0.4, our config's value, set on the peer too) and keep 100. Mask R-CNN's box
threshold is set, from one probe run, so that about the same number of (box, class) candidates (5 x 1,000) reach its
NMS; it then computes masks for its 100 detections.

FLOPs: XLA's cost analysis of our compiled program ('flops'; a multiply-add counts 2). The floor is FLOPs / this
machine's float32 matmul rate, measured as a 2048^3 `jnp.dot` (2 n^3 FLOPs / median time); torch.mm's rate is
reported next to it. "ours / floor" is how far the program is from running every FLOP at matmul speed.

Threads: `--threads N` (default 2) pins the process to N cores before JAX starts (XLA sizes its CPU thread pool from
the affinity) and sets `torch.set_num_threads(N)`; XLA_FLAGS is left as the environment has it and recorded.
`--quick` is a smoke test (128x128, a narrow ResNet-18 for ours, 2 runs): its numbers are meaningless.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import side_by_side as sbs  # noqa: E402
from timing import machine_info, median_ms, start_side_by_side, write_json, xla_flops  # noqa: E402

DEFAULT_OUT = os.path.join(BENCH, 'results', 'inference.json')
CANDIDATES = 5 * 1000  # (box, class) pairs entering NMS on our side: top 1,000 on each of P3-P7


def bench_ours(mode: str, size_hw: tuple[int, int], args: argparse.Namespace) -> dict:
  """Our jitted inference program for `mode` at `size_hw`: compile time, FLOPs, median latency."""
  import jax
  import jax.numpy as jnp

  from retinamask_jax.models import retinamask
  from retinamask_jax.train import step as step_lib

  config = sbs.our_config(mode, size_hw, shrink=args.quick)
  config.postprocess.score_threshold = args.score_threshold
  config.model.winograd = args.winograd
  with_masks = mode == 'retinamask'
  model, init = retinamask.build_model(config)
  variables = init(jax.random.key(0), size_hw)
  variables = {k: variables[k] for k in ('params', 'frozen')}  # what Detector keeps for inference
  images = jnp.asarray(sbs.synthetic_images(1, size_hw))
  image_size = jnp.asarray([size_hw], jnp.int32)
  predict = jax.jit(step_lib.make_predict_fn(model, config, with_masks))
  t0 = time.perf_counter()
  lowered = predict.lower(variables, images, image_size)
  t1 = time.perf_counter()
  compiled = lowered.compile()  # also fills predict's cache: the calls below do not compile again
  t2 = time.perf_counter()
  run = lambda: jax.block_until_ready(predict(variables, images, image_size))
  dets = run()
  ms = median_ms(run, args.runs, args.warmup)
  executed_flops = xla_flops(compiled)
  # The floor counts the model's FLOPs (direct convs), not the fewer that Winograd's algorithm executes.
  flops = sbs.direct_conv_flops(config, lambda m: jax.jit(step_lib.make_predict_fn(m, config, with_masks)).lower(
      variables, images, image_size)) if model.winograd else executed_flops
  return dict(
      lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2), ms=ms,
      gflops=None if flops is None else flops / 1e9,
      executed_gflops=None if executed_flops is None else executed_flops / 1e9, winograd=model.winograd,
      detections=int(np.asarray(dets['valid']).sum()),
      masks=int(dets['masks'].shape[1]) if with_masks else 0,
      nms_iou=float(config.postprocess.nms_iou),
  )


def _maskrcnn_threshold(torch, model, image, candidates: int) -> float:
  """The box-score threshold at which about `candidates` (box, class) pairs of Mask R-CNN's box head pass, read
  from one probe run (threshold 1: nothing passes, so the probe skips NMS and the mask head)."""
  captured = []
  hook = model.roi_heads.box_predictor.register_forward_hook(lambda m, i, out: captured.append(out[0]))
  model.roi_heads.score_thresh = 1.0
  with torch.inference_mode():
    model([image])
  hook.remove()
  scores = torch.softmax(captured[0], -1)[:, 1:].flatten()  # column 0 is the background
  k = min(candidates, scores.numel())
  return float(torch.topk(scores, k).values[-1]) * (1 - 1e-6)


def bench_torch(torch, torchvision, mode: str, size_hw: tuple[int, int], nms_iou: float,
                args: argparse.Namespace) -> dict:
  """torchvision's peer of `mode` at `size_hw`: median latency of `model([image])` and its detection count."""
  torch.manual_seed(0)
  if mode == 'retinanet':
    kwargs = dict(score_thresh=args.score_threshold, nms_thresh=nms_iou, detections_per_img=100,
                  topk_candidates=1000)
  else:
    kwargs = dict(box_detections_per_img=100)
  model = sbs.torchvision_detector(torchvision, mode, size_hw, **kwargs).eval()
  image = torch.from_numpy(sbs.synthetic_images(1, size_hw)[0].transpose(2, 0, 1).copy())
  row = {}
  if mode == 'retinamask':
    model.roi_heads.score_thresh = row['box_score_thresh'] = _maskrcnn_threshold(torch, model, image, CANDIDATES)

  def run():
    with torch.inference_mode():
      return model([image])

  out = run()
  row.update(ms=median_ms(run, args.runs, args.warmup), detections=int(len(out[0]['boxes'])),
             masks=int(len(out[0]['masks'])) if 'masks' in out[0] else 0)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', default='512x512,800x1216', help='comma-separated HxW image sizes')
  parser.add_argument('--modes', default='retinanet,retinamask', help='retinanet (detection only), retinamask')
  parser.add_argument('--runs', type=int, default=10, help='timed calls per row (median)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed calls after compiling')
  parser.add_argument('--threads', type=int, default=2, help='cores for JAX (affinity) and torch (0 = all)')
  parser.add_argument('--score_threshold', type=float, default=0.0, help='score threshold of both sides')
  parser.add_argument('--matmul_n', type=int, default=2048, help='side of the matmul that measures the peak')
  parser.add_argument('--winograd', default='auto', choices=('auto', 'on', 'off'),
                      help="our model.winograd: 3x3 stride-1 convs by Winograd's algorithm ('auto': on CPU, float32)")
  parser.add_argument('--no-torch', dest='no_torch', action='store_true', help='skip torchvision')
  parser.add_argument('--quick', action='store_true', help='smoke test: 128x128, narrow ResNet-18, 2 runs')
  parser.add_argument('--out', default=None, help='JSON results file (default bench/results/inference.json, '
                      'inference_quick.json with --quick)')
  args = parser.parse_args()
  if args.quick:
    args.sizes, args.runs, args.warmup, args.matmul_n = '128x128', 2, 1, 512
  args.out = args.out or (DEFAULT_OUT.replace('.json', '_quick.json') if args.quick else DEFAULT_OUT)
  threads, torch, torchvision, peak = start_side_by_side(args.threads, args.no_torch, args.matmul_n)

  rows = []
  for size in args.sizes.split(','):
    size_hw = sbs.parse_hw(size)
    for mode in args.modes.split(','):
      row = dict(size=f'{size_hw[0]}x{size_hw[1]}', mode=mode, ours=bench_ours(mode, size_hw, args))
      ours = row['ours']
      if ours['gflops'] is not None:
        ours['floor_ms'] = ours['gflops'] / peak['jax_gflops'] * 1e3
        ours['over_floor'] = ours['ms'] / ours['floor_ms']
      if torch is not None:
        row['peer'] = sbs.peer_name(mode)
        row['torchvision'] = bench_torch(torch, torchvision, mode, size_hw, ours['nms_iou'], args)
        row['ours_over_torchvision'] = ours['ms'] / row['torchvision']['ms']
      rows.append(row)
      print(f'  {row["size"]} {mode}: ours {ours["ms"]:.1f} ms'
            + (f', {row["peer"]} {row["torchvision"]["ms"]:.1f} ms' if 'peer' in row else ''), flush=True)

  print(f'\nInference, batch 1, median of {args.runs}; {threads} cores; score threshold {args.score_threshold}')
  print('| image | mode | ours (ms) | peer | peer (ms) | ours / peer | our compile (s) | GFLOPs (XLA) | floor (ms) '
        '| ours / floor | detections ours / peer | masks ours / peer |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    o, t = r['ours'], r.get('torchvision', {})
    fmt = lambda v, f: '-' if v is None else format(v, f)
    print(f"| {r['size']} | {'det + masks' if r['mode'] == 'retinamask' else 'det only'} | {o['ms']:.1f} "
          f"| {r.get('peer', '-')} | {fmt(t.get('ms'), '.1f')} | {fmt(r.get('ours_over_torchvision'), '.2f')} "
          f"| {o['lower_s'] + o['compile_s']:.1f} | {fmt(o['gflops'], '.1f')} | {fmt(o.get('floor_ms'), '.1f')} "
          f"| {fmt(o.get('over_floor'), '.1f')} | {o['detections']} / {t.get('detections', '-')} "
          f"| {o['masks']} / {t.get('masks', '-')} |")

  result = dict(
      benchmark='inference latency, ours vs torchvision', machine=machine_info(torch), threads=threads,
      quick=args.quick, runs=args.runs, warmup=args.warmup, batch=1, score_threshold=args.score_threshold,
      winograd=args.winograd, maskrcnn_candidates=CANDIDATES, matmul_peak=peak, rows=rows,
  )
  write_json(result, args.out)


if __name__ == '__main__':
  from retinamask_jax import host_malloc

  host_malloc.reexec_with_host_malloc()  # as train.py runs: tcmalloc or huge pages for XLA's buffers
  main()
