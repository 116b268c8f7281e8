"""Every program lowers for TPU and GPU from this CPU host, and carries none of the CPU-only paths there (issue 23).

`jax.export` lowers a program for a platform the host does not have. Each program the library runs (the train step
jitted over a `data` mesh of 8 devices, the same step as a per-device program with its gradient all-reduce, the
vmapped sweep step, detection-only inference, inference with masks) is lowered here for ('tpu',) and ('cuda',), as
float32 and as `compute_dtype=bfloat16`, and its StableHLO is checked: no host callbacks, no float64, no CPU-only
custom calls, and XLA's `convolution` for every conv of the model (the number of `stablehlo.convolution` ops
equals that of the model with every CPU algorithm forced off, and for inference the number of conv applications
counted from the params tree; the `dot_general` count equals the forced-off model's too, so no Winograd
transform-point matmul or kernel-gradient tap is left). Lowered for ('cpu',), the same programs still hold the
CPU algorithms that `model.winograd='auto'` / `conv_kernel_grad='auto'` / `conv1x1_as_matmul` pick there.

Fast tests use a tiny config widened so that Winograd tiles pay on CPU (64-wide FPN, heads and mask head on a
256 x 256 canvas); the `slow` ones lower the real R-50 and X-101 configs at the COCO canvas.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from retinamask_jax.train.step import make_predict_fn, make_train_step

try:  # helper A1 is splitting loop.py; the program builder lives in train/programs.py after the split
  from retinamask_jax.train.programs import train_program
except ImportError:  # pragma: no cover
  from retinamask_jax.train.loop import train_program

DEVICES = 8
PER_DEVICE_BATCH = 2
# Custom-call targets that only a CPU backend has (LAPACK, the DUCC FFT, XLA:CPU's own kernels) and the host
# callbacks (jax.debug.print / pure_callback / io_callback lower to these).
CPU_ONLY_OR_HOST = re.compile(r'lapack|ducc|cpu|callback|host', re.IGNORECASE)
PROGRAMS = ('train_step', 'train_step_per_device', 'sweep_step', 'detect', 'detect_masks')


def small_config(compute_dtype: str = 'float32') -> ml_collections.ConfigDict:
  """configs/tiny.py at 64 channels from res4 up, in the FPN, the heads and the mask head, on a 256 x 256 canvas:
  wide and large enough that `winograd.tile_for` picks F(4x4, 3x3) for P3's head convs and the mask head on CPU."""
  from configs import tiny

  c = tiny.get_config()
  c.model.num_classes = 3
  c.model.fpn.channels = c.model.head.width = c.model.mask.head_width = 64
  c.model.head.depth = 2
  c.data.min_sizes, c.data.max_size = (256,), 256
  c.data.test_min_size = c.data.test_max_size = 256
  c.model.compute_dtype = compute_dtype
  return c


def forced_xla(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with every CPU algorithm forced off: XLA's convolution for every conv on every platform."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.winograd, c.model.conv_kernel_grad, c.model.conv1x1_as_matmul = 'off', 'xla', False
  return c


def canvas(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The (H, W) every program is lowered for: the config's first training canvas (landscape, multiples of 128)."""
  from retinamask_jax.data import pipeline as pipeline_lib

  return next(iter(pipeline_lib.train_canvases(tuple(config.data.min_sizes), config.data.max_size).values()))


def _batch_specs(config: ml_collections.ConfigDict, n: int, sharding: Any = None) -> dict[str, jax.ShapeDtypeStruct]:
  """The training batch contract (DESIGN.md 4) for n images on `canvas(config)`, as abstract arrays."""
  h, w = canvas(config)
  g, m = int(config.data.max_instances), int(config.data.mask_size)
  spec = functools.partial(jax.ShapeDtypeStruct, sharding=sharding)
  return dict(
      image=spec((n, h, w, 3), jnp.float32), image_size=spec((n, 2), jnp.int32),
      gt_boxes=spec((n, g, 4), jnp.float32), gt_classes=spec((n, g), jnp.int32),
      gt_masks=spec((n, g, m, m), jnp.uint8),
  )


def _abstract_state(config: ml_collections.ConfigDict, sharding: Any = None) -> Any:
  program = train_program(config)
  state = jax.eval_shape(functools.partial(program.create_state, config), jax.random.key(0))
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)


def traced(config: ml_collections.ConfigDict, program: str) -> jax.stages.Traced:
  """`program` of `config` traced once (abstract inputs only), to be lowered for any platforms.

  train_step: the step train.py runs (`TrainProgram.jitted_step`) on an abstract 8-device `data` mesh, the batch
  (2 images per device) sharded on `data`, the state replicated. train_step_per_device: the same step written per
  device (`make_train_step(axis_name='data')`, as under pmap) in a `shard_map` over that mesh: the gradient
  all-reduce is explicit in its StableHLO. sweep_step: `TrainProgram.vmapped_step`, 2 runs on one batch of 2.
  detect / detect_masks: `make_predict_fn` for 2 images without / with the mask head.
  """
  prog = train_program(config)
  if program == 'train_step':
    mesh = AbstractMesh((DEVICES,), ('data',))
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    args = (_abstract_state(config, replicated), _batch_specs(config, DEVICES * PER_DEVICE_BATCH, data),
            jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated))
    return prog.jitted_step(mesh).trace(*args)
  if program == 'train_step_per_device':
    mesh = AbstractMesh((DEVICES,), ('data',))
    step = make_train_step(prog.model, config, axis_name='data')
    # check_vma=False: pmap's semantics (the step's loops carry per-device values that start replicated).
    per_device = jax.shard_map(step, mesh=mesh, in_specs=(P(), P('data'), P()), out_specs=(P(), P()),
                               check_vma=False)
    args = (_abstract_state(config), _batch_specs(config, DEVICES * PER_DEVICE_BATCH),
            jax.ShapeDtypeStruct((2,), jnp.uint32))
    return jax.jit(per_device).trace(*args)
  if program == 'sweep_step':
    mesh = AbstractMesh((2, 1), ('sweep', 'data'))
    runs = jax.tree.map(lambda a: jax.ShapeDtypeStruct((2, *a.shape), a.dtype), _abstract_state(config))
    args = (runs, _batch_specs(config, PER_DEVICE_BATCH), jax.ShapeDtypeStruct((2, 2), jnp.uint32))
    return prog.vmapped_step(mesh).trace(*args)
  if program in ('detect', 'detect_masks'):
    variables = jax.eval_shape(lambda r: prog.init_variables(r, canvas(config)), jax.random.key(0))
    variables = {k: variables[k] for k in ('params', 'frozen')}
    h, w = canvas(config)
    predict = make_predict_fn(prog.model, config, with_masks=program == 'detect_masks')
    args = (variables, jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32), jax.ShapeDtypeStruct((2, 2), jnp.int32))
    return jax.jit(predict).trace(*args)
  raise ValueError(program)


def lowered_text(trace: jax.stages.Traced, platforms: tuple[str, ...]) -> str:
  return trace.lower(lowering_platforms=platforms).as_text()


def op_counts(text: str) -> collections.Counter:
  """How many of each StableHLO op the module holds (generic and pretty printed forms alike)."""
  return collections.Counter(re.findall(r'\b(?:stablehlo|sdy|mhlo|chlo)\.[a-z_]+(?=[ "(<{])', text))


def custom_call_targets(text: str) -> set[str]:
  return set(re.findall(r'custom_call\s*@([\w.]+)', text)) | set(re.findall(r'call_target_name = "([^"]+)"', text))


def assert_portable(text: str) -> None:
  """No host callback, no CPU-only custom call, no float64 anywhere in the module."""
  bad = {t for t in custom_call_targets(text) if CPU_ONLY_OR_HOST.search(t)}
  assert not bad, f'CPU-only or host custom calls: {bad}'
  assert 'has_side_effect = true' not in text
  assert not re.search(r'\bf64\b|xf64>', text), 'float64 in the module'


def conv_applications(config: ml_collections.ConfigDict, with_masks: bool) -> int:
  """Conv layers of the model counted from its params tree: every 4-D `kernel` except the mask head's
  kernel == stride deconv (one matmul on every platform, `layers.ConvTransposeNonOverlapping`), the RetinaNet head's
  counted once per detection level it runs on; the mask head only `with_masks`."""
  prog = train_program(config)
  params = jax.eval_shape(lambda r: prog.init_variables(r, canvas(config)), jax.random.key(0))['params']
  levels = config.model.fpn.max_level - config.model.fpn.min_level + 1
  count = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [getattr(k, 'key', None) for k in path]
    if names[-1] != 'kernel' or leaf.ndim != 4 or 'conv5_mask' in names:
      continue
    if names[0] == 'mask_head' and not with_masks:
      continue
    count += levels if names[0] == 'head' else 1
  return count


def all_reduce_groups(text: str) -> list[str]:
  """The replica groups of every all-reduce in the module, as written."""
  return re.findall(r'stablehlo\.all_reduce.*?replica_groups = dense<(\[\[.*?\]\])>', text, re.DOTALL)


@functools.cache
def _reference(config_json: str, program: str) -> tuple[collections.Counter, str]:
  """Op counts (and text) of `program` of the forced-off model lowered for TPU. The counts of a forced-off model do
  not depend on the compute dtype (the same ops in another dtype), so both dtypes of a test share one."""
  config = forced_xla(ml_collections.ConfigDict(json.loads(config_json)))
  config.model.compute_dtype = 'float32'
  text = lowered_text(traced(config, program), ('tpu',))
  return op_counts(text), text


def winograd_matmuls(text: str) -> int:
  """Batched matmuls over Winograd's transform points, F(4x4, 3x3) has 36 and F(2x2, 3x3) 16 (`winograd.py`):
  [points, rows, C] operands batched on the points, or [runs, points, rows, C] under the sweep's vmap."""
  plain = r'batching_dims = \[0\] x \[0\][^\n]*: \(tensor<(?:36|16)x\d+x\d+x[a-z]'
  vmapped = r'batching_dims = \[0, 1\] x \[0, 1\][^\n]*: \(tensor<\d+x(?:36|16)x\d+x\d+x[a-z]'
  return len(re.findall(plain, text)) + len(re.findall(vmapped, text))


def check_program(config: ml_collections.ConfigDict, program: str) -> dict[str, dict[str, int]]:
  """Lowers `program` for ('tpu',), ('cuda',) and ('cpu',) and checks the accelerator modules; returns per platform
  (and for the forced-off 'reference') the counts of convolutions, dot_generals and collectives."""
  auto = traced(config, program)
  key = config.to_dict()
  key['model']['compute_dtype'] = 'float32'
  ref, ref_text = _reference(json.dumps(key, sort_keys=True, default=list), program)
  found = {}
  for platforms in (('tpu',), ('cuda',)):
    text = lowered_text(auto, platforms)
    assert_portable(text)
    ops = op_counts(text)
    # One XLA convolution per conv the forced-off model computes, and no extra matmuls (Winograd's transform
    # points, per-tap kernel gradients and 1x1 matmuls are all dot_generals).
    assert ops['stablehlo.convolution'] == ref['stablehlo.convolution'], (platforms, ops, ref)
    assert ops['stablehlo.dot_general'] == ref['stablehlo.dot_general'], (platforms, ops, ref)
    assert winograd_matmuls(text) == 0
    if program in ('detect', 'detect_masks'):
      assert ops['stablehlo.convolution'] == conv_applications(config, program == 'detect_masks')
    elif program == 'train_step':
      # The batch is sharded on `data` over the 8-device mesh and the state replicated: the partitioner makes the
      # gradient sum over the batch an all-reduce over the mesh when it compiles the module.
      assert f'"data"={DEVICES}' in text and '[{"data"}' in text
    elif program == 'train_step_per_device':
      groups = all_reduce_groups(text)
      every_device = str([list(range(DEVICES))]).replace(' ', '')
      assert len(groups) >= len(jax.tree.leaves(_abstract_state(config).params)), len(groups)
      assert all(g.replace(' ', '') == every_device for g in groups), groups
    found[platforms[0]] = _summary(ops)
  cpu_text = lowered_text(auto, ('cpu',))
  found['cpu'] = _summary(op_counts(cpu_text)) | {'winograd_matmuls': winograd_matmuls(cpu_text)}
  found['reference'] = _summary(ref)
  if os.environ.get('LOWERING_COUNTS'):  # a JSON-lines file collecting the counts (for reports)
    with open(os.environ['LOWERING_COUNTS'], 'a') as f:
      f.write(json.dumps(dict(config=_config_label(config), program=program, found=found)) + '\n')
  return found


def _config_label(config: ml_collections.ConfigDict) -> str:
  b = config.model.backbone
  name = f'X-{b.depth}-{b.groups}x{b.width_per_group}d' if b.groups > 1 else f'R-{b.depth}'
  h, w = canvas(config)
  return f'{name} fpn {config.model.fpn.channels} canvas {h}x{w} {config.model.compute_dtype}'


def _summary(ops: collections.Counter) -> dict[str, int]:
  return {
      'convolution': ops['stablehlo.convolution'], 'dot_general': ops['stablehlo.dot_general'],
      'all_reduce': ops['stablehlo.all_reduce'], 'all_gather': ops['stablehlo.all_gather'],
      'reduce_scatter': ops['stablehlo.reduce_scatter'], 'all_to_all': ops['stablehlo.all_to_all'],
  }


@pytest.mark.parametrize('compute_dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('program', PROGRAMS)
def test_program_lowers_for_tpu_and_gpu_without_cpu_paths(program, compute_dtype):
  found = check_program(small_config(compute_dtype), program)
  # Lowered for CPU, 'auto' still picks the CPU algorithms: the 1x1 convs become matmuls (fewer convolutions, more
  # dot_generals) and in float32 Winograd computes the 3x3 convs where a tile pays (not in bfloat16).
  cpu, ref = found['cpu'], found['reference']
  assert cpu['convolution'] < ref['convolution'] and cpu['dot_general'] > ref['dot_general']
  assert (cpu['winograd_matmuls'] > 0) == (compute_dtype == 'float32')


def test_cpu_jit_compiles_exactly_the_cpu_algorithms():
  """A plain CPU jit of a conv with 'auto' options compiles to the program of the forced CPU algorithm, with no
  convolution left next to Winograd's matmuls: the platform switch is gone before XLA optimizes anything."""
  from retinamask_jax.models import layers

  x = jax.ShapeDtypeStruct((2, 32, 32, 64), jnp.float32)
  counts, convs = {}, {}
  for value in ('auto', True):
    conv = convs[value] = layers.Conv(64, (3, 3), padding=1, winograd=value, kernel_grad='auto')
    v = jax.eval_shape(conv.init, jax.random.key(0), x)
    grad = jax.jit(jax.grad(lambda v_, x_, c=conv: jnp.sum(c.apply(v_, x_) ** 2), argnums=(0, 1)))
    hlo = grad.lower(v, x).compile().as_text()
    counts[value] = collections.Counter(re.findall(r' ([a-z][a-z\-]*)\(', hlo))
  assert counts['auto']['convolution'] == 0 and counts['auto']['conditional'] == 0
  assert counts['auto'] == counts[True]
  tpu = op_counts(jax.jit(convs['auto'].apply).trace(v, x).lower(lowering_platforms=('tpu',)).as_text())
  assert tpu['stablehlo.convolution'] == 1 and tpu['stablehlo.dot_general'] == 0


_COMPILED_ALL_REDUCE = """
import collections, json, re, sys
import jax, numpy as np
from jax.sharding import Mesh
sys.path.insert(0, sys.argv[1])
import test_lowering as T

config = T.forced_xla(T.small_config())
mesh = Mesh(np.asarray(jax.devices()), ('data',))
step = T.train_program(config).jitted_step(mesh)
rep, data = jax.NamedSharding(mesh, jax.P()), jax.NamedSharding(mesh, jax.P('data'))
state = T._abstract_state(config, rep)
batch = T._batch_specs(config, T.DEVICES * T.PER_DEVICE_BATCH, data)
hlo = step.lower(state, batch, jax.ShapeDtypeStruct((2,), np.uint32, sharding=rep)).compile().as_text()
lines = [line for line in hlo.splitlines() if re.search(r' all-reduce(?:-start)?\\(', line)]
group = r'replica_groups=(mesh\\[[^\\]]*\\] \\{[^}]*\\}|\\{\\{[\\d,]*\\}\\}|\\[[\\d,]+\\]<=\\[\\d+\\]|\\{\\})'
groups = [re.search(group, line) for line in lines]
# The 4-D float32 arrays the all-reduces return: the conv kernels' gradients (XLA combines them into tuples).
kernels_reduced = sum(len(re.findall(r'f32\\[\\d+,\\d+,\\d+,\\d+\\]', line.split(' all-reduce')[0])) for line in lines)
kernels = sum(x.ndim == 4 for x in jax.tree.leaves(state.params))
print(json.dumps(dict(all_reduce=len(lines), groups=sorted({g.group(1) if g else 'none' for g in groups}),
                      devices=len(jax.devices()), kernels=kernels, kernels_reduced=kernels_reduced)))
"""


@pytest.mark.slow
def test_train_step_all_reduce_compiled_on_8_devices():
  """The jitted train step of train.py carries no collective in its StableHLO (the batch is only annotated as sharded
  on `data`); compiled for 8 (simulated CPU) devices, the partitioner turns the gradient sum over the batch into
  all-reduces over all 8. The partitioner is XLA's, the same for every backend."""
  import subprocess
  import sys

  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0'
  done = subprocess.run([sys.executable, '-c', _COMPILED_ALL_REDUCE, os.path.dirname(os.path.abspath(__file__))],
                        env=env, capture_output=True, text=True, timeout=1800)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert out['devices'] == DEVICES and out['all_reduce'] > 0, out
  # Every all-reduce is over all 8 devices (the mesh's one axis of 8, listed, or an iota), and together they carry
  # the gradient of every conv kernel.
  for g in out['groups']:
    assert re.fullmatch(r"mesh\['axis_0'=8[^\]]*\] \{'axis_0'\}|\{\{0,1,2,3,4,5,6,7\}\}|\[1,8\]<=\[8\]", g), out
  assert out['kernels_reduced'] >= out['kernels'] > 0, out


@pytest.mark.slow
@pytest.mark.parametrize('compute_dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('config_name', ['retinamask_r50_fpn_2x_ms', 'retinamask_x101_32x8d_fpn_2x_ms_gn'])
@pytest.mark.parametrize('program', PROGRAMS)
def test_real_configs_lower_for_tpu_and_gpu(config_name, program, compute_dtype):
  """The paper's configs at the COCO canvas: 800 x 1333 images on the landscape canvas 896 x 1408 (multiples of 128;
  the train step's 2 images per device of the 8-device mesh)."""
  import importlib

  c = importlib.import_module(f'configs.{config_name}').get_config()
  c.model.num_classes = 80
  c.model.backbone_init = ''
  c.model.compute_dtype = compute_dtype
  c.data.min_sizes, c.data.max_size = (800,), 1333
  c.data.test_min_size, c.data.test_max_size = 800, 1333
  check_program(c, program)


@pytest.mark.slow
def test_accelerator_memory_and_flops_of_the_r50_train_step():
  """bench/bench_accelerator_memory.py's figures for R-50 RetinaMask at 1024 x 1024, batch 2, float32: the state's
  bytes equal the parameter count (counted here from the params tree) times 4 (SGD: one momentum copy of the
  trainable ones), and XLA's FLOPs of the step are 2-4x those of its forward pass alone (the backward pass costs
  about twice the forward, less for the frozen stem and res2)."""
  import os
  import sys

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))
  import bench_accelerator_memory as bench

  row = bench.measure('retinamask_r50_fpn_2x_ms', 1024, 2, 'float32')
  c = bench.accelerator_config('retinamask_r50_fpn_2x_ms', 1024, 'float32')
  prog = train_program(c)
  variables = jax.eval_shape(lambda r: prog.init_variables(r, (1024, 1024)), jax.random.key(0))
  sizes = [x.size for x in jax.tree.leaves(variables['params'])]
  assert row['num_params'] == sum(sizes) and row['params_bytes'] == 4 * sum(sizes)
  assert 0.5 * row['params_bytes'] < row['opt_state_bytes'] <= row['params_bytes']
  inference = {k: variables[k] for k in ('params', 'frozen')}
  # The training forward pass of one image: the detector, and the mask head on its 100 detections + G GT boxes.
  rois = jax.ShapeDtypeStruct((1, 100 + c.data.max_instances, 14, 14, c.model.fpn.channels), jnp.float32)
  forward = 0.0
  for fn, x in ((prog.model.apply, jax.ShapeDtypeStruct((1, 1024, 1024, 3), jnp.float32)),
                (functools.partial(prog.model.apply, method='mask_logits'), rois)):
    cost = jax.jit(fn).lower(inference, x).compile().cost_analysis()
    forward += (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']
  assert 2.0 * forward < row['flops_per_image'] < 4.0 * forward, (row['flops_per_image'], forward)
  # At least the activations the backward pass needs of the stem: [2, 512, 512, 64] float32.
  assert row['temp_bytes'] > 2 * 512 * 512 * 64 * 4
