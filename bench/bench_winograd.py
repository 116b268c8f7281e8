"""3x3 stride-1 convs on CPU: direct (XLA's conv, taps kernel gradient) against Winograd F(2x2, 3x3) and F(4x4, 3x3).

  python bench/bench_winograd.py [--runs 7] [--threads 2] [--no-torch] [--out bench/results/winograd.json]

Per layer shape of the models here (R-50 RetinaNet head towers per FPN level at 512x512 and 800x1216, the class
predictor, ResNet 3x3s, the mask head on 14x14 RoIs, the shapes recipe's 64-wide head), median ms of the forward
and of forward + input gradient + kernel gradient, for: the direct conv as the model runs it without Winograd
(`layers.conv_with_tap_grad`), `winograd.conv3x3` with m = 2 and m = 4, and torch's conv2d (2 threads) as a peer.
The tile the model picks (`winograd.tile_for`) is printed per row, with each variant's largest error relative to
the largest output of the direct conv. These rows set `winograd.MIN_ROWS` and `MIN_CHANNELS`.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import side_by_side  # noqa: E402, F401 (puts the repository root on sys.path)
from timing import machine_info, median_ms, start_layer_bench, write_json  # noqa: E402

DEFAULT_OUT = os.path.join(BENCH, 'results', 'winograd.json')
# (name, N, H, W, Cin, Cout)
LAYERS = (
    ('head tower P3, 512x512, batch 1', 1, 64, 64, 256, 256),
    ('head tower P3, 512x512, batch 2', 2, 64, 64, 256, 256),
    ('head tower P4, 512x512, batch 1', 1, 32, 32, 256, 256),
    ('head tower P4, 512x512, batch 2', 2, 32, 32, 256, 256),
    ('head tower P5, 512x512, batch 1', 1, 16, 16, 256, 256),
    ('head tower P5, 512x512, batch 2', 2, 16, 16, 256, 256),
    ('head tower P6, 512x512, batch 2', 2, 8, 8, 256, 256),
    ('head tower P3, 800x1216', 1, 100, 152, 256, 256),
    ('head tower P5, 800x1216', 1, 25, 38, 256, 256),
    ('class predictor P3, 512x512', 1, 64, 64, 256, 720),
    ('res2 3x3, 512x512', 1, 128, 128, 64, 64),
    ('res3 3x3, 512x512', 1, 64, 64, 128, 128),
    ('res4 3x3, 512x512', 1, 32, 32, 256, 256),
    ('res5 3x3, 512x512', 1, 16, 16, 512, 512),
    ('mask head, 16 RoIs x 2 images', 32, 14, 14, 256, 256),
    ('mask head, 100 RoIs', 100, 14, 14, 256, 256),
    ('shapes head P3, 384x384, batch 4', 4, 48, 48, 64, 64),
    ('shapes head P3, 384x384, batch 4, 128 wide', 4, 48, 48, 128, 128),
)


def bench_layer(spec, runs: int, torch) -> dict:
  import jax
  import jax.numpy as jnp

  from retinamask_jax.models import layers, winograd

  name, n, h, w, cin, cout = spec
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (n, h, w, cin)))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * (2.0 / (9 * cin)) ** 0.5
  variants = {
      'direct': lambda x_, k_: layers.conv_with_tap_grad(x_, k_, (1, 1), ((1, 1), (1, 1)), 1),
      'f2': lambda x_, k_: winograd.conv3x3(x_, k_, 2),
      'f4': lambda x_, k_: winograd.conv3x3(x_, k_, 4),
  }
  ref = jax.jit(variants['direct'])(x, kernel)
  g = jax.random.normal(jax.random.key(2), ref.shape)
  row = dict(layer=name, shape=dict(n=n, h=h, w=w, cin=cin, cout=cout), picked=winograd.tile_for(n, h, w, cin, cout),
             gflop=2.0 * ref.size * 9 * cin / 1e9)
  for key, f in variants.items():
    fwd = jax.jit(f)
    both = jax.jit(jax.grad(lambda x_, k_, f=f: jnp.vdot(f(x_, k_), g), argnums=(0, 1)))
    row[f'{key}_fwd'] = median_ms(lambda fwd=fwd: jax.block_until_ready(fwd(x, kernel)), runs, 1)
    row[f'{key}_train'] = median_ms(lambda both=both: jax.block_until_ready(both(x, kernel)), runs, 1)
    row[f'{key}_rel_err'] = float(jnp.max(jnp.abs(fwd(x, kernel) - ref)) / jnp.max(jnp.abs(ref)))
  if torch is not None:
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_()
    wt = torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1).copy()).requires_grad_()
    gt = torch.from_numpy(np.asarray(g).transpose(0, 3, 1, 2).copy())
    tconv = lambda: torch.nn.functional.conv2d(xt, wt, padding=1)

    def fwd():
      with torch.no_grad():
        tconv()

    row['torch_fwd'] = median_ms(fwd, runs, 1)
    row['torch_train'] = median_ms(lambda: torch.autograd.grad(tconv(), (xt, wt), gt), runs, 1)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', type=int, default=7)
  parser.add_argument('--threads', type=int, default=2, help='cores for JAX (affinity) and torch (0 = all)')
  parser.add_argument('--no-torch', dest='no_torch', action='store_true')
  parser.add_argument('--only', default='', help='run only layers whose name contains this')
  parser.add_argument('--out', default=DEFAULT_OUT)
  args = parser.parse_args()
  threads, torch, peak = start_layer_bench(args.threads, args.no_torch)
  rows = [bench_layer(spec, args.runs, torch) for spec in LAYERS if args.only in spec[0]]
  fmt = lambda v: '-' if v is None else f'{v:.1f}'
  print(f'\n3x3 stride-1 conv, median ms of {args.runs}, {threads} cores; fwd / fwd + dx + dK; floor = direct '
        'FLOPs / matmul peak')
  print('| layer | floor fwd | direct | F(2,3) | F(4,3) | torch | picked | speed-up of picked, fwd / train '
        '| rel err F2 / F4 |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    pick = {0: 'direct', 2: 'f2', 4: 'f4'}[r['picked']]
    print(f"| {r['layer']} | {r['gflop'] / peak * 1e3:.1f} | {r['direct_fwd']:.1f} / {r['direct_train']:.1f} "
          f"| {r['f2_fwd']:.1f} / {r['f2_train']:.1f} | {r['f4_fwd']:.1f} / {r['f4_train']:.1f} "
          f"| {fmt(r.get('torch_fwd'))} / {fmt(r.get('torch_train'))} | {pick} "
          f"| {r['direct_fwd'] / r[pick + '_fwd']:.2f}x / {r['direct_train'] / r[pick + '_train']:.2f}x "
          f"| {r['f2_rel_err']:.0e} / {r['f4_rel_err']:.0e} |")
  write_json(dict(benchmark='3x3 stride-1 conv: direct vs Winograd F(2,3) / F(4,3) vs torch',
                  machine=machine_info(torch), threads=threads, runs=args.runs, matmul_gflops=peak, rows=rows),
             args.out)


if __name__ == '__main__':
  from retinamask_jax import host_malloc

  host_malloc.reexec_with_host_malloc()  # as train.py runs: tcmalloc or huge pages for XLA's buffers
  main()
