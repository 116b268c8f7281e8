"""What an accelerator user asks first, estimated on a CPU host: the R-50 RetinaMask train step's memory and FLOPs.

  python bench/bench_accelerator_memory.py [--config retinamask_r50_fpn_2x_ms] [--size 1024] [--batches 1,2,4,8]
      [--dtypes float32,bfloat16] [--out bench/results/accelerator_memory.json]

Per compute dtype and batch, for the train step of one device (each of `--batches` images per device, `--size` x
`--size` canvas, 80 classes, the config's SGD with momentum; under data parallelism every device runs this
program on its share of the batch, plus the gradient all-reduce):
- params_bytes, frozen_bytes: the model's variables (float32 whatever the compute dtype), summed leaf by leaf;
- opt_state_bytes: the optimizer state (SGD momentum: one float32 copy of the trainable parameters);
- temp_bytes: XLA's temporary buffers of the compiled program (`compiled.memory_analysis().temp_size_in_bytes`),
  the activations the backward pass keeps plus scratch; argument_bytes / output_bytes / alias_bytes beside it;
- flops_per_image: XLA's cost analysis of the compiled step (a multiply-add counts 2) / batch;
- device_bytes: argument_bytes + temp_bytes + output_bytes - alias_bytes (the donated state is updated in place):
  what the program needs resident at its peak, by XLA:CPU's buffer assignment.

Measured platform: the CPU (no accelerator was available). The program compiled is the one GPUs and TPUs get:
the model with every CPU algorithm forced off (`model.winograd='off'`, `conv_kernel_grad='xla'`,
`conv1x1_as_matmul=False`), i.e. one XLA convolution per conv as tests/test_lowering.py checks for ('cuda',) and
('tpu',). XLA:CPU's buffer assignment is a proxy for an accelerator's: GPU and TPU compilers fuse and schedule
differently (and XLA:CPU may compute bfloat16 convolutions through float32 copies), so treat temp_bytes as an
estimate within tens of percent, not a device measurement.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402


def accelerator_config(config_name: str, size: int, compute_dtype: str) -> ml_collections.ConfigDict:
  """`configs/<config_name>.py` at a square `size` canvas, 80 classes, no pretrained backbone to read, and the
  convolutions GPUs and TPUs get (every CPU algorithm off)."""
  c = importlib.import_module(f'configs.{config_name}').get_config()
  c.model.num_classes = 80
  c.model.backbone_init = ''
  c.model.compute_dtype = compute_dtype
  c.model.winograd, c.model.conv_kernel_grad, c.model.conv1x1_as_matmul = 'off', 'xla', False
  c.data.min_sizes, c.data.max_size = (size,), size
  c.data.test_min_size = c.data.test_max_size = size
  return c


def tree_bytes(tree: Any) -> int:
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def measure(config_name: str = 'retinamask_r50_fpn_2x_ms', size: int = 1024, batch: int = 2,
            compute_dtype: str = 'float32') -> dict[str, Any]:
  """Bytes of the state and XLA's temp buffers and FLOPs of the compiled single-device train step (see the module
  docstring). Compiles the step once (R-50 at 1024 x 1024: minutes on 2 cores)."""
  try:
    from retinamask_jax.train.programs import train_program
  except ImportError:  # before the split of train/loop.py
    from retinamask_jax.train.loop import train_program

  c = accelerator_config(config_name, size, compute_dtype)
  program = train_program(c)
  state = jax.eval_shape(functools.partial(program.create_state, c), jax.random.key(0))
  g, m = int(c.data.max_instances), int(c.data.mask_size)
  spec = jax.ShapeDtypeStruct
  batch_specs = dict(
      image=spec((batch, size, size, 3), jnp.float32), image_size=spec((batch, 2), jnp.int32),
      gt_boxes=spec((batch, g, 4), jnp.float32), gt_classes=spec((batch, g), jnp.int32),
      gt_masks=spec((batch, g, m, m), jnp.uint8),
  )
  step = jax.jit(program.step_fn, donate_argnums=(0,))
  t0 = time.perf_counter()
  lowered = step.lower(state, batch_specs, spec((2,), jnp.uint32))
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(
      config=config_name, size=size, batch_per_device=batch, compute_dtype=compute_dtype,
      params_bytes=tree_bytes(state.params), frozen_bytes=tree_bytes(state.frozen),
      opt_state_bytes=tree_bytes(state.opt_state), num_params=int(sum(x.size for x in jax.tree.leaves(state.params))),
      temp_bytes=int(memory.temp_size_in_bytes), argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
      device_bytes=int(memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
                       - memory.alias_size_in_bytes),
      flops_per_image=float(cost['flops']) / batch, lower_s=round(t1 - t0, 1), compile_s=round(t2 - t1, 1),
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='retinamask_r50_fpn_2x_ms')
  parser.add_argument('--size', type=int, default=1024)
  parser.add_argument('--batches', default='1,2,4,8', help='images per device, comma-separated')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--out', default=os.path.join(ROOT, 'bench', 'results', 'accelerator_memory.json'))
  args = parser.parse_args()
  rows = []
  for dtype, batch in [(d, int(b)) for d in args.dtypes.split(',') for b in args.batches.split(',')]:
    row = measure(args.config, args.size, batch, dtype)
    gib = 2.0 ** 30
    print(f"{dtype} batch {batch}: device {row['device_bytes'] / gib:.2f} GiB, params "
          f"{row['params_bytes'] / gib:.3f} GiB, opt state {row['opt_state_bytes'] / gib:.3f} GiB, "
          f"temp {row['temp_bytes'] / gib:.2f} GiB, {row['flops_per_image'] / 1e12:.3f} TFLOP/image "
          f"(lower {row['lower_s']} s, compile {row['compile_s']} s)", flush=True)
    rows.append(row)
  result = dict(
      command='python bench/bench_accelerator_memory.py ' + ' '.join(sys.argv[1:]),
      date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d'),
      commit=subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip(),
      measured_on=f'{jax.default_backend()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), '
                  f'jax {jax.__version__}',
      program='single-device train step, every CPU algorithm off (the convolutions GPUs and TPUs get)',
      rows=rows,
  )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
