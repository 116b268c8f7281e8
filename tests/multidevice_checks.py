"""The programs behind tests/test_multidevice.py, each run in a fresh process (the device count is fixed at import).

`python tests/multidevice_checks.py <check> <out_dir> <train_json> <train_images> [args]`; the caller sets XLA_FLAGS
(`--xla_force_host_platform_device_count=N`) and JAX_PLATFORMS=cpu. Each check writes its results under out_dir
(`.npz` of flattened arrays, `.json` of timings and image ids) and the test compares them, so the tolerances live
in the test file. Checks:

  data_parallel  (8 devices) 3 steps on a global batch of 8: jit on a 1-device mesh, jit on an 8-device mesh, pmap
                 over 8 devices; one bfloat16 step; a checkpoint of the 8-device state and its detections.
  multihost      (2 devices, args: port process_id) one of 2 processes of `jax.distributed`: the same 3 steps on
                 the same global batches of 8, of which this process loads only its half.
  ckpt_restore   (1 or 4 devices, args: source) restore a checkpoint data_parallel wrote (`eight_devices`: state
                 replicated on 8 devices; `one_device`: state on one device) onto a ('data',) mesh of all this
                 process's devices; its arrays, its detections, and one more sharded step from it.
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import tiny  # noqa: E402
from retinamask_jax.data import coco as coco_lib  # noqa: E402
from retinamask_jax.data import pipeline  # noqa: E402
from retinamask_jax.models import retinamask  # noqa: E402
from retinamask_jax.train import loop  # noqa: E402
from retinamask_jax.train import step as step_lib  # noqa: E402
from retinamask_jax.train.checkpoint import Checkpointer  # noqa: E402

NUM_STEPS = 3


def make_config(global_batch: int) -> ml_collections.ConfigDict:
  """`configs/tiny.py` at `global_batch` images per step; every check of this file trains with it."""
  c = tiny.get_config()
  c.train.batch_size = global_batch
  # SGD, not the recipe's AdamW: Adam divides by sqrt(v), so a gradient that is zero up to float32 rounding moves
  # its parameter by a whole learning rate either way, and the comparisons would measure that, not the sharding.
  c.train.optimizer = 'sgd'
  # Detections down to any score: two steps from scratch score everything below the default threshold, and an
  # empty detection list would make "identical detections" vacuous.
  c.postprocess.score_threshold = 0.0
  return c


def build(train_json: str, train_images: str, global_batch: int):
  """(config, dataset, model, fresh TrainState from key 0): the same start in every process."""
  c = make_config(global_batch)
  ds = coco_lib.load_coco(train_json, train_images)
  loop.resolve_classes(c, ds)
  model, init = retinamask.build_model(c)
  state = loop.create_train_state(c, model, init, jax.random.key(0))
  return c, ds, model, state


def read_batches(ds, c, global_batch: int, process_index: int = 0, process_count: int = 1) -> list[dict]:
  """The first NUM_STEPS batches of this process (its rows of each global batch)."""
  it = pipeline.make_train_iterator(ds, c, global_batch_size=global_batch, process_index=process_index,
                                    process_count=process_count, num_workers=0)
  return [next(it) for _ in range(NUM_STEPS)]


def train_jit(model, c, state, batches: list[dict], devices) -> tuple:
  """`len(batches)` jitted steps on a ('data',) mesh of `devices`: state replicated, batch sharded (loop.py's path).

  Returns (state, [metrics dict per step], seconds of the steps after the first (compiling) one).
  """
  mesh = Mesh(np.asarray(devices), ('data',))
  replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  state = jax.device_put(state, replicated)
  train_step = jax.jit(step_lib.make_train_step(model, c), out_shardings=(replicated, replicated))
  metrics, t0 = [], None
  for i, batch in enumerate(batches):
    inputs = loop._to_global(batch, loop.TRAIN_KEYS, data_sharding)
    state, m = train_step(state, inputs, jax.random.key(i))
    metrics.append(m)
    if i == 0:
      jax.block_until_ready(state)
      t0 = time.perf_counter()
  jax.block_until_ready(state)
  return state, metrics, time.perf_counter() - t0


def train_pmap(model, c, state, batches: list[dict]) -> tuple:
  """The same steps under `jax.pmap` over all local devices, one image per device; returns device 0's state."""
  import flax.jax_utils

  n = jax.local_device_count()
  train_step = jax.pmap(step_lib.make_train_step(model, c, axis_name='data'), axis_name='data', in_axes=(0, 0, None))
  state = flax.jax_utils.replicate(state, axis_name='data')  # pmap's own output mesh: no recompile
  metrics = []
  for i, batch in enumerate(batches):
    inputs = {k: batch[k].reshape(n, -1, *batch[k].shape[1:]) for k in loop.TRAIN_KEYS}
    state, m = train_step(state, inputs, jax.random.key(i))
    metrics.append(m)
  return flax.jax_utils.unreplicate(state), [jax.tree.map(lambda x: x[0], m) for m in metrics]


def local_value(x) -> np.ndarray:
  """A replicated array's value from this process's first copy (works when other processes hold copies too)."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def flatten(state, metrics: list[dict] | None = None) -> dict[str, np.ndarray]:
  """{'params/<path>', 'loss_stats/<path>', 'metrics/<step>/<name>': numpy}, for np.savez."""
  out = {}
  for prefix, tree in (('params', state.params), ('loss_stats', state.loss_stats)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      out[prefix + jax.tree_util.keystr(path)] = local_value(leaf)
  for i, m in enumerate(metrics or []):
    for k, v in m.items():
      out[f'metrics/{i}/{k}'] = local_value(v)
  return out


def detections(c, model, variables, images: list[str]) -> dict[str, np.ndarray]:
  """Detector.predict's results for `images`, flattened for np.savez."""
  from retinamask_jax import export

  out = {}
  for i, det in enumerate(export.Detector(model, c, jax.device_get(variables)).predict(images)):
    for k in ('boxes', 'scores', 'classes', 'masks'):
      out[f'{i}/{k}'] = np.asarray(det[k])
  return out


# ------------------------------------------------------------------------------------------------ checks


def data_parallel(out: str, train_json: str, train_images: str) -> None:
  """Checks a-d's first half, in one process to pay its start-up and the shared compilations once."""
  assert jax.device_count() == 8, jax.devices()
  c, ds, model, state0 = build(train_json, train_images, 8)
  batches = read_batches(ds, c, 8)
  np.savez(os.path.join(out, 'init.npz'), **flatten(state0))  # the tests compare updates from here
  timings, states = {}, {}
  for name, devices in (('one_device', jax.devices()[:1]), ('eight_devices', jax.devices())):
    t0 = time.perf_counter()
    states[name], metrics, steps_s = train_jit(model, c, state0, batches, devices)
    timings[name] = {'total_s': time.perf_counter() - t0, 'steps_after_first_s': steps_s}
    np.savez(os.path.join(out, f'{name}.npz'), **flatten(states[name], metrics))

  t0 = time.perf_counter()
  state, metrics = train_pmap(model, c, state0, batches)
  timings['pmap'] = {'total_s': time.perf_counter() - t0}
  np.savez(os.path.join(out, 'pmap.npz'), **flatten(state, metrics))

  # bf16: one step from the same start on the same first batch; its metrics['loss'] is the loss at the initial
  # params, which one_device.npz holds for float32 (metrics/0/loss).
  c16 = make_config(8)
  c16.model.compute_dtype = 'bfloat16'
  loop.resolve_classes(c16, ds)
  model16, _ = retinamask.build_model(c16)
  t0 = time.perf_counter()
  state, metrics, _ = train_jit(model16, c16, state0, batches[:1], jax.devices()[:1])
  timings['bf16_step'] = {'total_s': time.perf_counter() - t0}
  np.savez(os.path.join(out, 'bf16.npz'), **flatten(state, metrics))

  # Checkpoints of the state trained on 8 devices (every leaf replicated on all 8) and of the one trained on one
  # device, with their detections: ckpt_restore puts them on other meshes (8 -> 1, 1 -> 4).
  assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(states['eight_devices'].params))
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(states['one_device'].params))
  t0 = time.perf_counter()
  images = [r.file_name for r in ds.records[:4]]
  for name, state in states.items():
    checkpointer = Checkpointer(os.path.join(out, f'checkpoints_{name}'), async_save=False)
    checkpointer.save(int(state.step), state, {'next_index': int(state.step)}, c)
    checkpointer.close()
    np.savez(os.path.join(out, f'{name}_detections.npz'), **detections(c, model, state.variables, images))
  timings['save_and_detect'] = {'total_s': time.perf_counter() - t0}
  with open(os.path.join(out, 'data_parallel.json'), 'w') as f:
    json.dump({'timings': timings, 'image_ids': [b['image_id'].tolist() for b in batches]}, f)


def multihost(out: str, train_json: str, train_images: str, port: str, process_id: str) -> None:
  pid = int(process_id)
  # Before anything touches a device: from here on jax.devices() is the 4 devices of both processes.
  jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2, process_id=pid,
                             initialization_timeout=120)
  assert (jax.process_count(), jax.process_index()) == (2, pid)
  assert (jax.device_count(), jax.local_device_count()) == (4, 2), jax.devices()
  c, ds, model, state = build(train_json, train_images, 8)
  batches = read_batches(ds, c, 8, process_index=pid, process_count=2)
  assert all(len(b['image']) == 4 for b in batches)  # this process's half of each global batch of 8
  t0 = time.perf_counter()
  state, metrics, _ = train_jit(model, c, state, batches, jax.devices())
  np.savez(os.path.join(out, f'process_{pid}.npz'), **flatten(state, metrics))
  with open(os.path.join(out, f'process_{pid}.json'), 'w') as f:
    json.dump({'image_ids': [b['image_id'].tolist() for b in batches], 'train_s': time.perf_counter() - t0}, f)
  jax.distributed.shutdown()


def ckpt_restore(out: str, train_json: str, train_images: str, source: str) -> None:
  c, ds, model, template = build(train_json, train_images, 8)
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  checkpointer = Checkpointer(os.path.join(out, f'checkpoints_{source}'), async_save=False)
  state, data_state = checkpointer.restore(template, sharding=NamedSharding(mesh, P()))
  checkpointer.close()
  assert int(state.step) == NUM_STEPS and data_state == {'next_index': NUM_STEPS}, (int(state.step), data_state)
  assert all(x.sharding.device_set == set(jax.devices()) for x in jax.tree.leaves(state.params))
  tag = f'{source}_on_{jax.device_count()}'
  images = [r.file_name for r in ds.records[:4]]
  np.savez(os.path.join(out, f'{tag}_params.npz'), **flatten(state))
  np.savez(os.path.join(out, f'{tag}_detections.npz'), **detections(c, model, state.variables, images))
  # The restored state trains on this mesh: one more step, batch sharded over all its devices.
  batch = read_batches(ds, c, 8)[0]
  state, metrics, _ = train_jit(model, c, state, [batch], jax.devices())
  assert int(state.step) == NUM_STEPS + 1 and np.isfinite(float(local_value(metrics[0]['loss'])))


CHECKS = {f.__name__: f for f in (data_parallel, multihost, ckpt_restore)}

if __name__ == '__main__':
  CHECKS[sys.argv[1]](*sys.argv[2:])
