"""Benchmark of `multilevel_roi_align` (jitted, default JAX backend) vs torchvision's `roi_align`.

  python bench/bench_roi_align.py [--runs 10] [--warmup 2] [--channels 256 64]
                                  [--out bench/results/roi_align.json]

Setting (the mask branch in training, DESIGN.md 5): N = 2 images, R = 200 proposals each, FPN levels
P3-P5 of a 512 x 512 canvas (64x64, 32x32, 16x16 maps), 14 x 14 output, sampling ratio 2, legacy
(aligned=False), boxes of 4 to 512 px (log-uniform) so that all three levels are used; levels from
`assign_levels`. Timed: the forward pass, and forward + backward (gradient w.r.t. the features of
sum(output * cotangent)). Times are medians of `--runs` calls after `--warmup` calls, inputs already
on the device, measured until the result is ready. torchvision (CPU, when installed) pools the boxes
of each level with `torchvision.ops.roi_align` and scatters them back, as `MultiScaleRoIAlign` does;
its output is checked against ours. "ratio" is torchvision time / ours (> 1: ours is faster).
`temp MB` is XLA's compiled temporary-buffer size (memory_analysis), i.e. the working memory
beyond inputs and outputs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import median_ms, write_json  # noqa: E402

from retinamask_jax.ops.roi_align import assign_levels, multilevel_roi_align  # noqa: E402

LEVELS = (3, 4, 5)


def make_inputs(n: int, r: int, c: int, canvas: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  feats = [rng.normal(size=(n, canvas >> lv, canvas >> lv, c)).astype(np.float32) for lv in LEVELS]
  ctr = rng.uniform(0, canvas, (n, r, 2))
  wh = np.exp(rng.uniform(np.log(4), np.log(512), (n, r, 2)))
  boxes = np.clip(np.concatenate([ctr - wh / 2, ctr + wh / 2], -1), 0, canvas).astype(np.float32)
  cot = rng.normal(size=(n, r, 14, 14, c)).astype(np.float32)
  return dict(feats=feats, boxes=boxes, cot=cot)


def bench_jax(inp: dict, runs: int, warmup: int) -> tuple[dict, np.ndarray]:
  feats = [jnp.asarray(f) for f in inp['feats']]
  boxes = jnp.asarray(inp['boxes'])
  cot = jnp.asarray(inp['cot'])
  levels = assign_levels(boxes, LEVELS[0], LEVELS[-1])

  def forward(fs, b, lv):
    return multilevel_roi_align(
        fs, b, lv, min_level=LEVELS[0], output_size=14, sampling_ratio=2, aligned=False
    )

  def loss(fs, b, lv, ct):
    return jnp.sum(forward(fs, b, lv) * ct)

  fwd = jax.jit(forward)
  fwd_bwd = jax.jit(jax.value_and_grad(loss))
  temp_fwd = fwd.lower(feats, boxes, levels).compile().memory_analysis()
  temp_bwd = fwd_bwd.lower(feats, boxes, levels, cot).compile().memory_analysis()
  out = np.asarray(fwd(feats, boxes, levels))
  run_fwd = lambda: fwd(feats, boxes, levels).block_until_ready()
  run_fwd_bwd = lambda: jax.block_until_ready(fwd_bwd(feats, boxes, levels, cot))
  res = dict(
      forward_ms=median_ms(run_fwd, runs, warmup),
      forward_backward_ms=median_ms(run_fwd_bwd, runs, warmup),
      forward_temp_mb=None if temp_fwd is None else temp_fwd.temp_size_in_bytes / 1e6,
      forward_backward_temp_mb=None if temp_bwd is None else temp_bwd.temp_size_in_bytes / 1e6,
      level_counts={str(lv): int((np.asarray(levels) == lv).sum()) for lv in LEVELS},
  )
  return res, out


def bench_torch(inp: dict, runs: int, warmup: int) -> tuple[dict, np.ndarray] | None:
  try:
    import torch
    import torchvision
  except ImportError:
    return None
  n, r = inp['boxes'].shape[:2]
  feats = [torch.tensor(f).permute(0, 3, 1, 2).contiguous() for f in inp['feats']]
  batch_index = np.repeat(np.arange(n), r)[:, None]
  rois = np.concatenate([batch_index, inp['boxes'].reshape(-1, 4)], 1).astype(np.float32)
  rois = torch.tensor(rois)
  levels = np.asarray(assign_levels(inp['boxes'], LEVELS[0], LEVELS[-1])).reshape(-1)
  per_level = [torch.tensor(np.nonzero(levels == lv)[0]) for lv in LEVELS]
  c = feats[0].shape[1]
  cot = torch.tensor(inp['cot']).reshape(n * r, 14, 14, c).permute(0, 3, 1, 2).contiguous()

  def forward(fs):
    # MultiScaleRoIAlign's loop: pool each level's boxes on that level, scatter into the output.
    out = fs[0].new_zeros((n * r, c, 14, 14))
    for f, lv, idx in zip(fs, LEVELS, per_level):
      out[idx] = torchvision.ops.roi_align(f, rois[idx], 14, 2.0**-lv, 2, False)
    return out

  def fwd():
    with torch.no_grad():
      forward(feats)

  leaf = [f.clone().requires_grad_(True) for f in feats]

  def fwd_bwd():
    for f in leaf:
      f.grad = None
    (forward(leaf) * cot).sum().backward()

  with torch.no_grad():
    out = forward(feats).permute(0, 2, 3, 1).reshape(n, r, 14, 14, c).numpy()
  res = dict(
      forward_ms=median_ms(fwd, runs, warmup),
      forward_backward_ms=median_ms(fwd_bwd, runs, warmup),
      torch_threads=torch.get_num_threads(),
      torch_version=torch.__version__,
      torchvision_version=torchvision.__version__,
  )
  return res, out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--images', type=int, default=2)
  parser.add_argument('--proposals', type=int, default=200)
  parser.add_argument('--canvas', type=int, default=512)
  parser.add_argument('--channels', type=int, nargs='+', default=[256, 64])
  parser.add_argument('--no-torch', action='store_true', help='skip the torchvision comparison')
  here = os.path.dirname(os.path.abspath(__file__))
  default_out = os.path.join(here, 'results', 'roi_align.json')
  parser.add_argument('--out', default=default_out)
  args = parser.parse_args()

  rows = []
  for c in args.channels:
    inp = make_inputs(args.images, args.proposals, c, args.canvas, seed=0)
    ours, out = bench_jax(inp, args.runs, args.warmup)
    row = dict(
        images=args.images, proposals=args.proposals, channels=c, canvas=args.canvas, jax=ours
    )
    theirs = None if args.no_torch else bench_torch(inp, args.runs, args.warmup)
    if theirs is not None:
      tv, tv_out = theirs
      tv['max_abs_diff_vs_ours'] = float(np.abs(tv_out - out).max())
      row['torchvision'] = tv
    rows.append(row)

  header = f"{'C':>4} {'pass':<17} {'jax ms':>9} {'temp MB':>9} {'torchvision ms':>15} {'ratio':>7}"
  print(
      f'multilevel ROI-Align, N={args.images}, R={args.proposals}, '
      f'P3-P5 of {args.canvas}x{args.canvas}, 14x14, ratio 2; '
      f'JAX backend: {jax.default_backend()} ({jax.devices()[0].device_kind})'
  )
  print(header)
  print('-' * len(header))
  for row in rows:
    for key, name in (('forward', 'forward'), ('forward_backward', 'forward+backward')):
      ours_ms = row['jax'][f'{key}_ms']
      temp = row['jax'][f'{key}_temp_mb']
      tv = row.get('torchvision')
      tv_ms = f"{tv[f'{key}_ms']:15.1f}" if tv else f"{'-':>15}"
      ratio = f"{tv[f'{key}_ms'] / ours_ms:7.2f}" if tv else f"{'-':>7}"
      temp = float('nan') if temp is None else temp
      print(f"{row['channels']:>4} {name:<17} {ours_ms:9.1f} {temp:9.1f} {tv_ms} {ratio}")
    if row.get('torchvision'):
      print(f"     max |ours - torchvision| = {row['torchvision']['max_abs_diff_vs_ours']:.2e}")

  result = dict(
      benchmark='multilevel_roi_align',
      jax_backend=jax.default_backend(),
      device=str(jax.devices()[0].device_kind),
      jax_version=jax.__version__,
      cpu_count=os.cpu_count(),
      platform=platform.platform(),
      runs=args.runs,
      warmup=args.warmup,
      rows=rows,
  )
  write_json(result, args.out)


if __name__ == '__main__':
  from retinamask_jax import host_malloc

  host_malloc.reexec_with_host_malloc()  # as train.py runs: tcmalloc or huge pages for XLA's buffers
  main()
