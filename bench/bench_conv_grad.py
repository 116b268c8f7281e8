"""One conv layer's training cost on CPU, part by part: why `model.conv_kernel_grad='taps'` is the CPU default.

  python bench/bench_conv_grad.py [--runs 5] [--threads 2] [--no-torch] [--out bench/results/conv_grad.json]

Per layer shape (the R-50 RetinaNet's own: head towers on P3/P4 at 512 x 512, the class predictor, a res5 3x3, a
strided 3x3, a ResNeXt grouped 3x3), median ms of:
- XLA: forward, input gradient, kernel gradient (XLA's weight-gradient convolution), and forward + both gradients;
- taps: the kernel gradient as one matmul per kernel tap (`layers.kernel_grad_by_taps`), and forward + both
  gradients through `layers.conv_with_tap_grad` (what the model runs with 'taps');
- torch (2 threads): forward, and forward + kernel gradient (`torch.autograd.grad` w.r.t. the weight only, so no
  input gradient), as a peer.
The matmul rate of the machine (a 2048^3 `jnp.dot`) is printed with the FLOP floor of each kernel gradient.
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

DEFAULT_OUT = os.path.join(BENCH, 'results', 'conv_grad.json')
# (name, N, H, W, Cin, Cout, k, stride, groups)
LAYERS = (
    ('head tower, P3 of 512x512', 1, 64, 64, 256, 256, 3, 1, 1),
    ('head tower, P4 of 512x512', 1, 32, 32, 256, 256, 3, 1, 1),
    ('class predictor, P3 of 512x512', 1, 64, 64, 256, 720, 3, 1, 1),
    ('res5 3x3, 800x1216', 1, 25, 38, 512, 512, 3, 1, 1),
    ('strided 3x3 (torchvision layout)', 1, 64, 64, 128, 128, 3, 2, 1),
    ('ResNeXt 32x8d grouped 3x3, res3', 1, 64, 64, 256, 256, 3, 1, 32),
)


def bench_layer(spec, runs: int, torch) -> dict:
  import jax
  import jax.numpy as jnp

  from retinamask_jax.models import layers

  name, n, h, w, cin, cout, k, s, groups = spec
  pad = k // 2
  strides, padding = (s, s), ((pad, pad), (pad, pad))
  x = jax.random.normal(jax.random.key(0), (n, h, w, cin))
  kernel = jax.random.normal(jax.random.key(1), (k, k, cin // groups, cout)) * 0.05
  conv = lambda x_, k_: layers._conv(x_, k_, strides, padding, groups, None)
  taps = lambda x_, k_: layers.conv_with_tap_grad(x_, k_, strides, padding, groups, None)
  y = conv(x, kernel)
  g = jax.random.normal(jax.random.key(2), y.shape)
  both = lambda f: jax.jit(jax.grad(lambda x_, k_: jnp.vdot(f(x_, k_), g), argnums=(0, 1)))
  fns = dict(
      xla_fwd=jax.jit(conv),
      xla_dx=jax.jit(lambda k_, g_: jax.vjp(lambda x_: conv(x_, k_), x)[1](g_)[0]),
      xla_dk=jax.jit(lambda x_, g_: jax.vjp(lambda k_: conv(x_, k_), kernel)[1](g_)[0]),
      taps_dk=jax.jit(lambda x_, g_: layers.kernel_grad_by_taps(x_, g_, kernel.shape, strides, padding, groups)),
      xla_all=both(conv),
      taps_all=both(taps),
  )
  args = dict(xla_fwd=(x, kernel), xla_dx=(kernel, g), xla_dk=(x, g), taps_dk=(x, g), xla_all=(x, kernel),
              taps_all=(x, kernel))
  row = dict(layer=name, shape=dict(n=n, h=h, w=w, cin=cin, cout=cout, k=k, stride=s, groups=groups))
  for key, fn in fns.items():
    row[key] = median_ms(lambda fn=fn, a=args[key]: jax.block_until_ready(fn(*a)), runs, 1)
  ref, ours = fns['xla_dk'](x, g), fns['taps_dk'](x, g)
  row['dk_max_rel_diff'] = float(jnp.max(jnp.abs(ours - ref)) / jnp.max(jnp.abs(ref)))
  row['dk_gflop'] = 2.0 * y.size * k * k * (cin // groups) / 1e9
  if torch is not None:
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    wt = torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1).copy()).requires_grad_()
    gt = torch.from_numpy(np.asarray(g).transpose(0, 3, 1, 2).copy())
    tconv = lambda: torch.nn.functional.conv2d(xt, wt, stride=s, padding=pad, groups=groups)

    def fwd():
      with torch.no_grad():
        tconv()

    row['torch_fwd'] = median_ms(fwd, runs, 1)
    row['torch_fwd_dk'] = median_ms(lambda: torch.autograd.grad(tconv(), (wt,), gt), runs, 1)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--threads', type=int, default=2, help='cores for JAX (affinity) and torch (0 = all)')
  parser.add_argument('--no-torch', dest='no_torch', action='store_true')
  parser.add_argument('--out', default=DEFAULT_OUT)
  args = parser.parse_args()
  threads, torch, peak = start_layer_bench(args.threads, args.no_torch)
  rows = []
  for spec in LAYERS:
    rows.append(bench_layer(spec, args.runs, torch))
    print(f'  {spec[0]}: done', flush=True)
  fmt = lambda v: '-' if v is None else f'{v:.1f}'
  print(f'\nOne conv layer, median ms of {args.runs}; {threads} cores')
  print('| layer | XLA fwd | XLA dx | XLA dK | taps dK | dK floor | XLA fwd+dx+dK | taps fwd+dx+dK | taps speed-up '
        '| torch fwd | torch fwd+dK | dK max rel diff |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    floor = r['dk_gflop'] / peak * 1e3
    print(f"| {r['layer']} | {r['xla_fwd']:.1f} | {r['xla_dx']:.1f} | {r['xla_dk']:.1f} | {r['taps_dk']:.1f} "
          f"| {floor:.1f} | {r['xla_all']:.1f} | {r['taps_all']:.1f} | {r['xla_all'] / r['taps_all']:.2f}x "
          f"| {fmt(r.get('torch_fwd'))} | {fmt(r.get('torch_fwd_dk'))} | {r['dk_max_rel_diff']:.1e} |")
  write_json(dict(benchmark='conv layer training cost, XLA vs taps vs torch', machine=machine_info(torch),
                  threads=threads, runs=args.runs, matmul_gflops=peak, rows=rows), args.out)


if __name__ == '__main__':
  from retinamask_jax import host_malloc

  host_malloc.reexec_with_host_malloc()  # as train.py runs: tcmalloc or huge pages for XLA's buffers
  main()
