"""Train-step time, compile time and peak memory of our R-50 models next to torchvision's, on the same machine.

  python bench/bench_train_step.py [--size 512x512] [--batches 1,2] [--modes retinanet,retinamask,retinamask@64]
      [--steps 5] [--warmup 2] [--threads 2] [--compute_dtype float32] [--no-torch] [--quick]
      [--out bench/results/train_step.json]

On a GPU (issue 5's images/s, float32 and bfloat16 at the authors' size), e.g.:
  python bench/bench_train_step.py --size 800x1344 --batches 2,8 --modes retinanet,retinamask --threads 0 \
      --no-torch --compute_dtype bfloat16 --out bench/results/train_step_gpu_bf16.json

Rows: (RetinaNet mode, RetinaMask mode) x (batch 1, 2) x (ours, torchvision), each measured in a fresh subprocess
so that the peak memory (max RSS, `resource.getrusage`) is that row's alone and nothing compiled or cached by one
row helps the next.
- ours, RetinaNet mode: `configs/retinanet_r50_fpn_1x.py` (no mask branch; fixed smooth-L1 beta);
  RetinaMask mode: `configs/retinamask_r50_fpn_2x_ms.py` (mask branch on the detector's own top-100 detections plus
  the GT, self-adjusting smooth L1); `retinamask@K` the same with the mask head run on at most K proposals per
  image, positives first (`model.mask.max_proposals`; only positives carry mask loss, so the loss is the authors'
  whenever an image has at most K positives). 80 classes, random initialization, the config's SGD (LR scaled to
  the batch).
  The step is `jax.jit(make_train_step(model, config), donate_argnums=(0,))`, as the training loop runs it.
- torchvision, RetinaNet mode: RetinaNet R50-FPN; RetinaMask mode: Mask R-CNN R50-FPN (frozen BN, stem + layer1
  frozen, see bench/side_by_side.py); `model(images, targets)` in train mode, sum of its losses, backward,
  `torch.optim.SGD` (the same LR, momentum 0.9, weight decay 1e-4) step.
Both sides get the same images (512 x 512, no rescale or padding on either side) and the same 4 boxes per image
with ellipse masks: torchvision as full-image masks, ours as the pipeline's 112 x 112 box crops with the GT padded
to `data.max_instances` = 100 rows.

Per row: mean step time over `--steps` steps after the first step and `--warmup` more (each step measured until
its result is ready; the median and every step's time are in the JSON, with the page faults and kernel time per step,
bench/timing.py `timed_steps`); ours also: `lower` + `compile` time of the step, XLA's FLOPs of the compiled step (a
multiply-add counts 2) and its temporary buffers, how many times `jit(train_step)` compiled (counted from
`jax_log_compiles` records, and the jitted function's cache size): it must stay 1 after the first step. Peak RSS
includes everything the process did, for ours the XLA compilation too. The FLOP floor is the step's FLOPs / this
machine's float32 matmul rate (a 2048^3 `jnp.dot`, measured in the parent process), as in bench_inference.py.
"Mask branch adds" = ours RetinaMask step / ours RetinaNet step - 1 at the same batch.

Environment: the script re-executes itself as train.py does (retinamask_jax/host_malloc.py: tcmalloc preloaded where
installed, else glibc's large blocks on huge pages) and every row's subprocess, torchvision's too, inherits it;
`RETINAMASK_TCMALLOC=0` keeps glibc's malloc for all rows. The JSON records LD_PRELOAD and GLIBC_TUNABLES.

Threads: `--threads N` (default 2) pins the parent, and so every row's subprocess, to N cores (XLA sizes its CPU
thread pool from the affinity) and sets `torch.set_num_threads(N)` in the torchvision rows; XLA_FLAGS is inherited
from the environment and recorded. `--quick` is a smoke test (128x128, batch 1, a narrow ResNet-18 for ours, 2
steps): its numbers are meaningless.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import side_by_side as sbs  # noqa: E402
from timing import (  # noqa: E402
  import_torch,
  limit_threads,
  machine_info,
  max_rss_mb,
  start_side_by_side,
  timed_steps,
  write_json,
  xla_flops,
)

DEFAULT_OUT = os.path.join(BENCH, 'results', 'train_step.json')
ROW_PREFIX = 'ROW_RESULT '  # the line a row's subprocess prints its result on


class _CompileCounter(logging.Handler):
  """Counts JAX's 'Finished XLA compilation of jit(<name>)' records (jax_log_compiles) for one function name."""

  def __init__(self, name: str):
    super().__init__(logging.DEBUG)
    self.needle = f'Finished XLA compilation of jit({name})'
    self.count = 0

  def emit(self, record: logging.LogRecord) -> None:
    if self.needle in record.getMessage():
      self.count += 1


def row_ours(spec: dict) -> dict:
  """One row of ours in this (fresh) process: spec has mode, size_hw, batch, steps, warmup, quick."""
  rss_start = max_rss_mb()
  import jax
  import jax.numpy as jnp

  from retinamask_jax.models import retinamask
  from retinamask_jax.train import loop
  from retinamask_jax.train import step as step_lib

  counter = _CompileCounter('train_step')
  jax.config.update('jax_log_compiles', True)
  jax_logger = logging.getLogger('jax')
  jax_logger.addHandler(counter)  # also keeps the records off stderr (no lastResort handler)
  jax_logger.setLevel(logging.DEBUG)

  size_hw, n = tuple(spec['size_hw']), spec['batch']
  config = sbs.our_config(spec['mode'], size_hw, batch_size=n, shrink=spec['quick'])
  config.model.compute_dtype = spec['compute_dtype']
  config.model.winograd = spec['winograd']
  model, init = retinamask.build_model(config)
  state = loop.create_train_state(config, model, init, jax.random.key(0))
  trainable = jax.tree.leaves(jax.tree.map(
      lambda p, frozen: 0 if frozen else p.size, state.params, retinamask.frozen_params_mask(state.params, config)))
  batch = sbs.our_train_batch(sbs.synthetic_images(n, size_hw), sbs.synthetic_targets(n, size_hw), config)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  train_step = jax.jit(step_lib.make_train_step(model, config), donate_argnums=(0,))
  rng = jax.random.key(0)

  t0 = time.perf_counter()
  lowered = train_step.lower(state, batch, rng)
  t1 = time.perf_counter()
  compiled = lowered.compile()  # fills train_step's cache: the first call below must not compile again
  t2 = time.perf_counter()
  memory = compiled.memory_analysis()
  executed_flops = xla_flops(compiled)
  # The floor counts the model's FLOPs (direct convs), not the fewer that Winograd's algorithm executes.
  flops = sbs.direct_conv_flops(config, lambda m: jax.jit(step_lib.make_train_step(m, config)).lower(
      state, batch, rng)) if model.winograd else executed_flops
  metrics, nonfinite = {}, []

  def one_step():
    nonlocal state, metrics
    state, metrics = train_step(state, batch, rng)
    jax.block_until_ready((state, metrics))
    nonfinite.append(float(metrics['nonfinite']))  # a skipped (non-finite) step would not be a full step

  one_step()
  first_step_s = time.perf_counter() - t2
  timing = timed_steps(one_step, spec['steps'], spec['warmup'])
  metrics = jax.device_get(metrics)
  return dict(
      lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2), first_step_s=round(first_step_s, 3),
      ms=timing['mean_ms'],
      gflops=None if flops is None else flops / 1e9,
      executed_gflops=None if executed_flops is None else executed_flops / 1e9, winograd=model.winograd,
      xla_temp_mb=None if memory is None else memory.temp_size_in_bytes / 1e6,
      compilations=counter.count, cache_size=int(train_step._cache_size()),
      loss=float(metrics['loss']), nonfinite_steps=int(sum(nonfinite)),
      trainable_params=int(sum(trainable)), rss_start_mb=rss_start, peak_rss_mb=max_rss_mb(), **timing,
  )


def row_torch(spec: dict) -> dict:
  """One row of torchvision in this (fresh) process."""
  rss_start = max_rss_mb()
  torch, torchvision = import_torch(spec['threads'])
  if torch is None:
    raise RuntimeError('torch / torchvision not importable')
  size_hw, n, mode = tuple(spec['size_hw']), spec['batch'], spec['mode']
  torch.manual_seed(0)
  model = sbs.torchvision_detector(torchvision, mode, size_hw).train()
  params = [p for p in model.parameters() if p.requires_grad]
  # The LR our configs use at this batch (0.01 for 16 images, scaled linearly); its value does not change the time.
  optimizer = torch.optim.SGD(params, lr=0.01 * n / 16, momentum=0.9, weight_decay=1e-4)
  images = [torch.from_numpy(x.transpose(2, 0, 1).copy()) for x in sbs.synthetic_images(n, size_hw)]
  with_masks = sbs.split_mode(mode)[0] == 'retinamask'
  targets = sbs.torch_targets(torch, sbs.synthetic_targets(n, size_hw), size_hw, with_masks=with_masks)
  losses = []

  def one_step():
    loss = sum(model(images, targets).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(float(loss))

  t0 = time.perf_counter()
  one_step()
  first_step_s = time.perf_counter() - t0
  timing = timed_steps(one_step, spec['steps'], spec['warmup'])
  return dict(
      first_step_s=round(first_step_s, 3), ms=timing['mean_ms'], loss=losses[-1],
      trainable_params=int(sum(p.numel() for p in params)),
      torch_threads=torch.get_num_threads(), rss_start_mb=rss_start, peak_rss_mb=max_rss_mb(), **timing,
  )


def run_row(spec: dict) -> dict:
  """Runs one row in a fresh subprocess of this script; returns its result (raises with its output on failure)."""
  cmd = [sys.executable, os.path.abspath(__file__), '--_row', json.dumps(spec)]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(ROW_PREFIX)]
  if proc.returncode or not lines:
    raise RuntimeError(f'row {spec} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len(ROW_PREFIX):])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', default='512x512', help='HxW of every image')
  parser.add_argument('--batches', default='1,2', help='comma-separated batch sizes')
  parser.add_argument('--modes', default='retinanet,retinamask,retinamask@64,retinamask@16',
                      help="retinanet, retinamask (all 100 + G mask proposals, the authors'), retinamask@K (at most K "
                           'per image, positives first: model.mask.max_proposals)')
  parser.add_argument('--steps', type=int, default=5, help='timed steps per row (mean)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after the first one')
  parser.add_argument('--threads', type=int, default=2, help='cores for JAX (affinity) and torch (0 = all)')
  parser.add_argument('--matmul_n', type=int, default=2048, help='side of the matmul that measures the peak')
  parser.add_argument('--compute_dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='our model.compute_dtype (params stay float32); torchvision always runs float32')
  parser.add_argument('--winograd', default='auto', choices=('auto', 'on', 'off'),
                      help="our model.winograd: 3x3 stride-1 convs by Winograd's algorithm ('auto': on CPU, float32)")
  parser.add_argument('--no-torch', dest='no_torch', action='store_true', help='skip torchvision')
  parser.add_argument('--quick', action='store_true', help='smoke test: 128x128, batch 1, narrow ResNet-18, 2 steps')
  parser.add_argument('--out', default=None, help='JSON results file (default bench/results/train_step.json, '
                      'train_step_quick.json with --quick)')
  parser.add_argument('--_row', default=None, help=argparse.SUPPRESS)  # internal: run one row, print its result
  args = parser.parse_args()

  if args._row is not None:
    spec = json.loads(args._row)
    limit_threads(spec['threads'])
    result = row_ours(spec) if spec['framework'] == 'ours' else row_torch(spec)
    print(ROW_PREFIX + json.dumps(result), flush=True)
    return

  if args.quick:
    args.size, args.batches, args.steps, args.warmup, args.matmul_n = '128x128', '1', 2, 0, 512
  args.out = args.out or (DEFAULT_OUT.replace('.json', '_quick.json') if args.quick else DEFAULT_OUT)
  threads, torch, _, peak = start_side_by_side(args.threads, args.no_torch, args.matmul_n)

  size_hw = sbs.parse_hw(args.size)
  frameworks = ['ours'] + ([] if torch is None else ['torchvision'])
  rows, peer_rows = [], {}
  for mode in args.modes.split(','):
    for batch in (int(b) for b in args.batches.split(',')):
      row = dict(mode=mode, batch=batch, size=f'{size_hw[0]}x{size_hw[1]}')
      for framework in frameworks:
        spec = dict(framework=framework, mode=mode, size_hw=size_hw, batch=batch, steps=args.steps,
                    warmup=args.warmup, threads=threads, quick=args.quick, compute_dtype=args.compute_dtype,
                    winograd=args.winograd)
        if framework == 'torchvision':  # one peer row serves every cap of the RetinaMask mode
          key = (sbs.split_mode(mode)[0], batch)
          if key not in peer_rows:
            peer_rows[key] = run_row(dict(spec, mode=key[0]))
          row[framework] = peer_rows[key]
        else:
          row[framework] = run_row(spec)
        r = row[framework]
        print(f'  {mode} batch {batch} {framework}: {r["ms"]:.0f} ms/step, peak RSS {r["peak_rss_mb"]:.0f} MB, '
              f'{r.get("minflt_per_step", float("nan")):.0f} page faults and '
              f'{r.get("sys_s_per_step", float("nan")):.2f} s system time per step', flush=True)
      ours = row['ours']
      if ours['gflops'] is not None:
        ours['floor_ms'] = ours['gflops'] / peak['jax_gflops'] * 1e3
        ours['over_floor'] = ours['ms'] / ours['floor_ms']
      if 'torchvision' in row:
        row['peer'] = sbs.peer_name(mode)
        row['ours_over_torchvision'] = ours['ms'] / row['torchvision']['ms']
      rows.append(row)

  def find(mode, batch):
    return next((r for r in rows if r['mode'] == mode and r['batch'] == batch), None)

  mask_cost = {}
  for batch in (int(b) for b in args.batches.split(',')):
    net = find('retinanet', batch)
    for mode in [m for m in args.modes.split(',') if m.startswith('retinamask')]:
      mask = find(mode, batch)
      if net and mask:
        cost = mask_cost.setdefault(f'{mode} batch {batch}', {})
        cost['ours'] = mask['ours']['ms'] / net['ours']['ms'] - 1
        if 'torchvision' in net:
          cost['maskrcnn_over_retinanet'] = mask['torchvision']['ms'] / net['torchvision']['ms'] - 1

  fmt = lambda v, f: '-' if v is None else format(v, f)
  print(f'\nTrain step at {args.size}, mean of {args.steps} steps; {threads} cores; LD_PRELOAD='
        f'{os.environ.get("LD_PRELOAD", "")!r}')
  print('| mode | batch | ours (ms) | ours images/s | peer | peer (ms) | ours / peer | our compile (s) | compilations '
        '| GFLOPs (XLA) '
        '| floor (ms) | ours / floor | peak RSS ours / peer (MB) |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    o, t = r['ours'], r.get('torchvision', {})
    print(f"| {r['mode']} | {r['batch']} | {o['ms']:.0f} | {1e3 * r['batch'] / o['ms']:.2f} | {r.get('peer', '-')} "
          f"| {fmt(t.get('ms'), '.0f')} "
          f"| {fmt(r.get('ours_over_torchvision'), '.2f')} | {o['lower_s'] + o['compile_s']:.1f} "
          f"| {o['compilations']} (cache {o['cache_size']}) | {fmt(o['gflops'], '.1f')} "
          f"| {fmt(o.get('floor_ms'), '.0f')} | {fmt(o.get('over_floor'), '.1f')} "
          f"| {o['peak_rss_mb']:.0f} / {fmt(t.get('peak_rss_mb'), '.0f')} |")
  for which, cost in mask_cost.items():
    line = f'mask branch ({which}) adds {100 * cost["ours"]:.0f}% to our RetinaNet step'
    if 'maskrcnn_over_retinanet' in cost:
      line += (f' (torchvision: Mask R-CNN is {100 * cost["maskrcnn_over_retinanet"]:+.0f}% vs RetinaNet, a '
               'different detector)')
    print(line)
  recompiled = [r for r in rows if r['ours']['compilations'] != 1 or r['ours']['cache_size'] != 1]
  print('no recompilation after the first step' if not recompiled else
        f'RECOMPILED: {[(r["mode"], r["batch"], r["ours"]["compilations"]) for r in recompiled]}')

  result = dict(
      benchmark='train step, ours vs torchvision', machine=machine_info(torch), threads=threads, quick=args.quick,
      size=args.size, steps=args.steps, warmup=args.warmup, compute_dtype=args.compute_dtype, winograd=args.winograd,
      boxes_per_image=sbs.BOXES_PER_IMAGE, matmul_peak=peak,
      rows=rows, mask_branch_adds={str(k): v for k, v in mask_cost.items()},
      no_recompilation=not recompiled,
  )
  write_json(result, args.out)


if __name__ == '__main__':
  from retinamask_jax import host_malloc

  host_malloc.reexec_with_host_malloc()  # as train.py runs: tcmalloc or huge pages for XLA's buffers
  main()
