"""Benchmark `batched_nms` (jitted, default JAX backend) against torchvision's `batched_nms`.

  python bench/bench_nms.py [--runs 50] [--warmup 5] [--out bench/results/nms.json]

Inputs imitate a detector's pre-NMS candidates on an 800 x 1333 image, 80 classes: most candidates
are jittered copies of a few objects (mostly with the object's class, sometimes a confused one), the
rest are background boxes with random classes and lower scores. Times are medians of `--runs` calls
after `--warmup` calls, inputs already on the device, measured until the result is ready.
torchvision (CPU) runs on the same input when it is installed; ratio = torchvision time / ours
(> 1: ours is faster); "same" says whether both returned the same indices.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import median_ms, write_json  # noqa: E402

from retinamask_jax.ops import nms  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'nms.json')


def make_candidates(num: int, num_classes: int, seed: int,
                    image_hw: tuple[int, int] = (800, 1333)) -> dict[str, np.ndarray]:
  """Clustered candidates: boxes [num, 4] float32, scores [num] float32, classes [num] int32."""
  rng = np.random.default_rng(seed)
  h, w = image_hw
  num_objects = 20
  obj_wh = np.exp(rng.uniform(np.log(24), np.log(500), (num_objects, 2)))
  obj_ctr = rng.uniform(0, 1, (num_objects, 2)) * (w, h)
  obj_class = rng.integers(0, num_classes, num_objects)
  obj_score = rng.uniform(0.3, 0.95, num_objects)

  on_object = rng.random(num) < 0.8
  k = rng.integers(0, num_objects, num)
  ctr = np.where(on_object[:, None], obj_ctr[k] + rng.normal(0, 0.15, (num, 2)) * obj_wh[k],
                 rng.uniform(0, 1, (num, 2)) * (w, h))
  wh = np.where(on_object[:, None], obj_wh[k] * np.exp(rng.normal(0, 0.25, (num, 2))),
                np.exp(rng.uniform(np.log(16), np.log(400), (num, 2))))
  boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], 1)
  boxes = np.clip(boxes, 0, (w, h, w, h)).astype(np.float32)
  own_class = on_object & (rng.random(num) >= 0.2)
  classes = np.where(own_class, obj_class[k], rng.integers(0, num_classes, num))
  scores = np.where(on_object, obj_score[k] * rng.uniform(0.1, 1.0, num),
                    rng.uniform(0.05, 0.3, num))
  return dict(boxes=boxes, scores=scores.astype(np.float32), classes=classes.astype(np.int32))


def bench_case(num: int, max_output: int, args: argparse.Namespace, torch, torchvision) -> dict:
  """Times one (candidates, max_output) case; returns a row of the table."""
  data = make_candidates(num, args.num_classes, args.seed)
  fn = jax.jit(lambda b, s, c, t: nms.batched_nms(b, s, c, t, max_output,
                                                  tile_size=args.tile_size))
  inputs = [jax.device_put(data[key]) for key in ('boxes', 'scores', 'classes')]
  inputs.append(jax.device_put(jnp.float32(args.iou)))
  start = time.perf_counter()
  ours = np.asarray(fn(*inputs))
  compile_s = time.perf_counter() - start
  row = dict(candidates=num, max_output=max_output, num_classes=args.num_classes,
             tile_size=args.tile_size, kept=int(np.sum(ours >= 0)), compile_s=round(compile_s, 3),
             jax_ms=median_ms(lambda: fn(*inputs).block_until_ready(), args.runs, args.warmup))
  if torchvision is not None:
    tb, ts, tc = (torch.from_numpy(data[key]) for key in ('boxes', 'scores', 'classes'))
    run_tv = lambda: torchvision.ops.batched_nms(tb, ts, tc, args.iou)[:max_output]
    theirs = run_tv().numpy()
    row['torchvision_ms'] = median_ms(run_tv, args.runs, args.warmup)
    row['ratio'] = row['torchvision_ms'] / row['jax_ms']
    n = len(theirs)
    row['same_result'] = bool(np.array_equal(ours[:n], theirs) and np.all(ours[n:] == -1))
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', type=int, default=50, help='timed calls per case (median)')
  parser.add_argument('--warmup', type=int, default=5, help='untimed calls after compiling')
  parser.add_argument('--iou', type=float, default=0.4, help='IoU threshold')
  parser.add_argument('--tile-size', type=int, default=nms.DEFAULT_TILE_SIZE)
  parser.add_argument('--num-classes', type=int, default=80)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--cases', default='5000:100,1000:100',
                      help='comma-separated candidates:max_output pairs')
  parser.add_argument('--no-torch', action='store_true', help='skip torchvision')
  parser.add_argument('--out', default=DEFAULT_OUT, help='JSON results file')
  args = parser.parse_args()

  torch = torchvision = None
  if not args.no_torch:
    try:
      import torch
      import torchvision
    except ImportError:
      torch = torchvision = None

  rows = []
  for case in args.cases.split(','):
    num, max_output = (int(v) for v in case.split(':'))
    rows.append(bench_case(num, max_output, args, torch, torchvision))

  device = jax.devices()[0]
  print(f'batched_nms on {device.device_kind} ({jax.default_backend()}), IoU {args.iou}, '
        f'{args.num_classes} classes, tile {args.tile_size}, median of {args.runs} runs')
  print(f"{'candidates':>10} {'max_out':>7} {'kept':>5} {'jax ms':>8} {'torchvision ms':>14} "
        f"{'ratio':>6} same")
  for r in rows:
    line = f"{r['candidates']:>10} {r['max_output']:>7} {r['kept']:>5} {r['jax_ms']:8.3f}"
    if 'ratio' in r:
      line += f" {r['torchvision_ms']:14.3f} {r['ratio']:6.1f} {r['same_result']}"
    print(line)

  result = dict(
      benchmark='batched_nms', backend=jax.default_backend(), device=device.device_kind,
      jax_version=jax.__version__, platform=platform.platform(), cpu_count=os.cpu_count(),
      torch_version=None if torch is None else torch.__version__,
      torchvision_version=None if torchvision is None else torchvision.__version__,
      torch_threads=None if torch is None else torch.get_num_threads(),
      runs=args.runs, warmup=args.warmup, iou_threshold=args.iou, seed=args.seed, rows=rows)
  write_json(result, args.out)


if __name__ == '__main__':
  from retinamask_jax import host_malloc

  host_malloc.reexec_with_host_malloc()  # as train.py runs: tcmalloc or huge pages for XLA's buffers
  main()
