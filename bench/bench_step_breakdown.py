"""Train-step time of a config with parts switched off: what the mask branch, the 1x1-as-matmul option and the
matmul kernel gradients ('taps') cost or save.

  python bench/bench_step_breakdown.py [--config configs/shapes.py] [--steps 10] [--canvas 256,384]
      [--variant model.mask.enabled=False] [--variant model.conv1x1_as_matmul=False]
      [--variant "model.conv_kernel_grad='xla'"]

Each variant (and the config as it is) trains on the same 3 batches of the shapes data at one canvas; the time is
the mean of `--steps` steps after the first (compile) one, measured until the result is ready.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402

from retinamask_jax.data import coco, pipeline, shapes  # noqa: E402
from retinamask_jax.models import retinamask  # noqa: E402
from retinamask_jax.train import loop  # noqa: E402
from retinamask_jax.train import step as step_lib  # noqa: E402


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _override(config, assignment: str) -> None:
  key, value = assignment.split('=', 1)
  *path, leaf = key.split('.')
  node = config
  for part in path:
    node = node[part]
  node[leaf] = ast.literal_eval(value)


def measure(config, dataset, canvas, steps: int) -> tuple[float, float]:
  """(compile + first step seconds, mean step seconds) at one canvas."""
  loop.resolve_classes(config, dataset)
  model, init = retinamask.build_model(config)
  state = loop.create_train_state(config, model, init, jax.random.key(0))
  batches, it = [], pipeline.make_train_iterator(dataset, config, global_batch_size=config.train.batch_size,
                                                 num_workers=0)
  while len(batches) < 3:
    batch = next(it)
    if tuple(batch['image'].shape[1:3]) == canvas:
      batches.append({k: batch[k] for k in loop.TRAIN_KEYS})
  train_step = jax.jit(step_lib.make_train_step(model, config), donate_argnums=(0,))
  t = time.perf_counter()
  state, metrics = train_step(state, batches[0], jax.random.key(0))
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t
  t = time.perf_counter()
  for i in range(steps):
    state, metrics = train_step(state, batches[i % 3], jax.random.key(i))
  jax.block_until_ready(metrics)
  return first, (time.perf_counter() - t) / steps


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'shapes.py'))
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--canvas', default='256,384')
  parser.add_argument('--variant', action='append', default=None)
  parser.add_argument('--data_dir', default=os.path.join(tempfile.gettempdir(), 'retinamask_bench_step'))
  args = parser.parse_args()
  variants = [''] + (args.variant or ['model.mask.enabled=False', 'model.conv1x1_as_matmul=False',
                                   "model.conv_kernel_grad='xla'"])
  canvas = tuple(int(v) for v in args.canvas.split(','))
  base = _load_config(args.config)
  size = tuple(base.data.shapes.image_size)
  json_path, images = shapes.write_shapes_dataset(args.data_dir, 'train', 64, image_size=size, seed=0)
  dataset = coco.load_coco(json_path, images)
  print('| variant | compile + first step (s) | step (ms) | images/s |\n|---|---|---|---|')
  for variant in variants:
    config = _load_config(args.config)
    if variant:
      _override(config, variant)
    first, step = measure(config, dataset, canvas, args.steps)
    print(f'| {variant or "as configured"} | {first:.1f} | {1000 * step:.0f} | {config.train.batch_size / step:.1f} |',
          flush=True)


if __name__ == '__main__':
  from retinamask_jax import host_malloc

  host_malloc.reexec_with_host_malloc()  # as train.py runs: tcmalloc or huge pages for XLA's buffers
  main()
