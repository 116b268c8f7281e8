"""The training loop: data, state, the jitted step over a device mesh, logging, checkpoints, evaluation.

`train_and_evaluate(config, workdir)` is what `train.py` runs. It resumes from the latest checkpoint in
`<workdir>/checkpoints/` by itself, trains to `train.num_steps`, evaluates and returns the final metrics. One code
path for 1 CPU to many hosts (DESIGN.md 6): a `data` mesh over every device JAX sees, the global batch sharded on
it, the state replicated; each process reads only its shard of the data.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from retinamask_jax.data import coco as coco_lib
from retinamask_jax.data import pipeline as pipeline_lib
from retinamask_jax.data import shapes as shapes_lib
from retinamask_jax.evaluation import coco_eval
from retinamask_jax.hparams import HParams
from retinamask_jax.models import retinamask as retinamask_lib
from retinamask_jax.train import optim
from retinamask_jax.train.checkpoint import Checkpointer
from retinamask_jax.train.metrics_writer import MetricsWriter, ProgressBar
from retinamask_jax.train.state import TrainState
from retinamask_jax.train.step import make_predict_fn, make_train_step

# Arrays of the batch contract (DESIGN.md 4) that the jitted train step reads.
TRAIN_KEYS = ('image', 'image_size', 'gt_boxes', 'gt_classes', 'gt_masks')


class ConfigError(ValueError):
  """The config cannot work; raised before anything compiles."""


# ------------------------------------------------------------------------------------------------ data


def prepare_datasets(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[coco_lib.CocoDataset, coco_lib.CocoDataset | None]:
  """The training and validation datasets; the shapes dataset is generated in the workdir when none is set."""
  d = config.data
  if d.get('coco_root'):
    root = d.coco_root
    with config.unlocked():
      for split in ('train', 'val'):
        if not d[f'{split}_json']:
          d[f'{split}_json'] = os.path.join(root, 'annotations', f'instances_{split}2017.json')
        if not d[f'{split}_images']:
          d[f'{split}_images'] = os.path.join(root, f'{split}2017')
  if not d.train_json:
    root = os.path.join(workdir, 'data', 'shapes')
    s = d.shapes
    train_json, train_images = shapes_lib.write_shapes_dataset(
        root, 'train', s.num_train, image_size=tuple(s.image_size), seed=s.seed
    )
    val_json, val_images = shapes_lib.write_shapes_dataset(
        root, 'val', s.num_val, image_size=tuple(s.image_size), seed=s.seed + 1
    )
  else:
    train_json, train_images = d.train_json, d.train_images
    val_json, val_images = d.val_json, d.val_images
  for key, path in (('data.train_json', train_json), ('data.train_images', train_images)):
    if not path or not os.path.exists(path):
      raise ConfigError(f'{key}: {path!r} does not exist')
  if val_json and (not os.path.exists(val_json) or not val_images or not os.path.exists(val_images)):
    raise ConfigError(f'data.val_json / data.val_images: {val_json!r} / {val_images!r} do not exist')
  train = coco_lib.load_coco(train_json, train_images, crowd=d.crowd)
  val = coco_lib.load_coco(val_json, val_images, crowd='drop') if val_json else None
  if not train.records:
    raise ConfigError(f'data.train_json: {train_json} has no images')
  return train, val


def resolve_classes(config: ml_collections.ConfigDict, dataset: coco_lib.CocoDataset) -> None:
  """Set model.num_classes / category_ids / class_names from the training dataset (in place)."""
  with config.unlocked():
    if config.model.num_classes == 0:
      config.model.num_classes = dataset.num_classes
    elif config.model.num_classes != dataset.num_classes:
      raise ConfigError(
          f'model.num_classes = {config.model.num_classes} but the training data has '
          f'{dataset.num_classes} categories; set model.num_classes=0 to take them from the data'
      )
    config.model.category_ids = tuple(int(i) for i in dataset.category_ids)
    config.model.class_names = tuple(str(n) for n in dataset.class_names)


# ------------------------------------------------------------------------------------------------ state


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ('data',))


def create_train_state(
    config: ml_collections.ConfigDict, model: Any, init_variables: Any, rng: jax.Array
) -> TrainState:
  canvas = next(iter(pipeline_lib.train_canvases(tuple(config.data.min_sizes), config.data.max_size).values()))
  variables = init_variables(rng, canvas)
  frozen_mask = retinamask_lib.frozen_params_mask(variables['params'], config)
  tx = optim.make_optimizer(config, variables['params'], frozen_mask)
  return TrainState.create(variables, tx, HParams.from_config(config))


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks that need no data and no compilation; each error names the key."""
  n = jax.device_count()
  if config.train.batch_size % n:
    raise ConfigError(f'train.batch_size = {config.train.batch_size} is not divisible by the {n} devices')
  if config.train.batch_size % jax.process_count():
    raise ConfigError(f'train.batch_size must be divisible by the {jax.process_count()} processes')
  if config.train.num_steps < 0:
    raise ConfigError('train.num_steps must be >= 0')
  if config.train.base_lr <= 0:
    raise ConfigError(f'train.base_lr must be > 0, got {config.train.base_lr}')
  if config.eval.batch_size % n:
    raise ConfigError(f'eval.batch_size = {config.eval.batch_size} is not divisible by the {n} devices')


# ------------------------------------------------------------------------------------------------ helpers


def _local_numpy(x: jax.Array) -> np.ndarray:
  """This process's rows of an array sharded on its leading axis (all of it on one process)."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def _to_global(batch: dict[str, np.ndarray], keys: tuple[str, ...], sharding: NamedSharding):
  return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in keys}


class _Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step (save, then exit)."""

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # a second signal: stop waiting
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _eval_predictor(model, config, variables, mesh: Mesh, with_masks: bool):
  predict = jax.jit(make_predict_fn(model, config, with_masks))
  data_sharding = NamedSharding(mesh, P('data'))

  def run(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inputs = _to_global(batch, ('image', 'image_size'), data_sharding)
    dets = predict(variables, inputs['image'], inputs['image_size'])
    return {k: _local_numpy(v) for k, v in dets.items()}

  return run, predict


def run_evaluation(
    config: ml_collections.ConfigDict,
    model: Any,
    variables: Any,
    dataset: coco_lib.CocoDataset,
    out_dir: str,
    mesh: Mesh,
) -> dict[str, float]:
  """COCO bbox (+ segm) evaluation of `variables` on `dataset`; results JSON and tables in out_dir."""
  with_masks = bool(config.model.mask.enabled)
  predict, _ = _eval_predictor(model, config, variables, mesh, with_masks)
  per_process = config.eval.batch_size // jax.process_count()
  kwargs = dict(batch_size=per_process, process_index=jax.process_index(),
                process_count=jax.process_count())
  if config.eval.max_images:
    kwargs['max_images'] = config.eval.max_images
  batches = pipeline_lib.make_eval_iterator(dataset, config, **kwargs)
  total = pipeline_lib.num_eval_batches(dataset, config, **kwargs)
  bar = ProgressBar(total, desc='eval', enabled=jax.process_index() == 0, every=max(total // 10, 1))
  metrics = coco_eval.evaluate(
      predict, batches, dataset.coco, config.model.category_ids, out_dir,
      with_masks=with_masks, num_batches=total, progress=lambda i, n: bar.update(i),
  )
  bar.close()
  return metrics


def _write_sample_predictions(config, model, variables, dataset: coco_lib.CocoDataset, out_dir: str) -> None:
  """PNGs of the first `eval.num_prediction_images` validation images with the final model's detections."""
  from retinamask_jax import export

  records = dataset.records[: config.eval.num_prediction_images]
  images = [pipeline_lib.load_record_image(r) for r in records]
  names = [os.path.splitext(os.path.basename(r.file_name))[0] for r in records]
  detector = export.Detector(model, config, jax.device_get(variables))
  export.write_predictions(detector, images, out_dir, names=names, score_threshold=0.3)
  print(f'prediction images: {out_dir}', flush=True)


# ------------------------------------------------------------------------------------------------ main loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Train to `train.num_steps` (resuming from `<workdir>/checkpoints/`), then evaluate. Returns eval metrics."""
  workdir = os.path.abspath(workdir)
  validate_config(config)
  is_main = jax.process_index() == 0
  train_ds, val_ds = prepare_datasets(config, workdir)
  resolve_classes(config, train_ds)
  logging.info('training data: %d images, %d classes', len(train_ds.records), config.model.num_classes)

  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P('data'))
  model, init_variables = retinamask_lib.build_model(config)
  rng = jax.random.key(config.seed)
  state = create_train_state(config, model, init_variables, rng)

  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep)
  writer = MetricsWriter(workdir, enabled=is_main)
  data_state = {'next_index': 0}
  if checkpointer.latest_step() is not None:
    state, data_state = checkpointer.restore(state, sharding=replicated)
    # The config is the source of truth for the traced knobs (a resumed sweep point keeps its own values).
    state = state.replace(hparams=HParams.from_config(config))
    dropped = writer.truncate_after(int(state.step))
    logging.info('resumed from step %d (%d metrics lines after it dropped)', int(state.step), dropped)
    if is_main:
      print(f'Resuming from checkpoint at step {int(state.step)}.', flush=True)
  state = jax.device_put(state, replicated)
  start_step = int(state.step)
  num_steps = config.train.num_steps

  train_step = jax.jit(
      make_train_step(model, config), donate_argnums=(0,), out_shardings=(replicated, replicated)
  )
  batches: Iterator[dict[str, np.ndarray]] = pipeline_lib.make_train_iterator(
      train_ds, config,
      global_batch_size=config.train.batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      start_index=int(data_state.get('next_index', start_step)),
  )
  bar = ProgressBar(num_steps, start_step, enabled=is_main, every=config.train.log_every_steps)
  step = start_step
  last_log_time, last_log_step = time.perf_counter(), start_step
  step_rng = jax.random.key(config.seed + 1)

  def save(step: int) -> None:
    checkpointer.save(step, state, {'next_index': step}, config)

  with _Preemption() as preemption:
    while step < num_steps:
      batch = next(batches)
      inputs = _to_global(batch, TRAIN_KEYS, data_sharding)
      state, metrics = train_step(state, inputs, jax.random.fold_in(step_rng, step))
      step += 1
      log_now = step % config.train.log_every_steps == 0 or step == num_steps
      if log_now:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        images_per_s = (step - last_log_step) * config.train.batch_size / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, step
        record = {k: float(v) for k, v in metrics.items()}
        record.update(images_per_s=images_per_s, canvas=list(batch['image'].shape[1:3]),
                      train_step_compilations=int(train_step._cache_size()))
        writer.write(step, record)
        bar.update(step, f"loss {record['loss']:.4f} {images_per_s:.1f} img/s")
      else:
        bar.update(step)
      if step % config.checkpoint.every_steps == 0 or step == num_steps:
        save(step)
      if config.eval.every_steps and step % config.eval.every_steps == 0 and step < num_steps and val_ds:
        checkpointer.wait()
        metrics = run_evaluation(config, model, state.variables, val_ds,
                                 os.path.join(workdir, 'eval', f'step_{step}'), mesh)
        writer.write(step, metrics, kind='eval')
      if preemption.signum is not None:
        save(step)
        checkpointer.close()
        writer.close()
        bar.close()
        print(f'Stopped by signal {preemption.signum} at step {step}; checkpoint saved, '
              're-run the same command to resume.', flush=True)
        raise SystemExit(128 + preemption.signum)
  bar.close()
  checkpointer.wait()

  final: dict[str, float] = {}
  if val_ds is not None:
    done = [r for r in writer.read() if r.get('kind') == 'eval' and r['step'] == step]
    if done and start_step == step:
      final = {k: v for k, v in done[-1].items() if k not in ('step', 'kind')}
      if is_main:
        print(f'Training already finished at step {step}; evaluation on record:', flush=True)
        print('\n'.join(f'  {k}: {v}' for k, v in final.items() if '/' in k), flush=True)
    else:
      final = run_evaluation(config, model, state.variables, val_ds,
                             os.path.join(workdir, 'eval', f'step_{step}'), mesh)
      writer.write(step, final, kind='eval')
    if is_main and config.eval.num_prediction_images:
      _write_sample_predictions(config, model, state.variables, val_ds, os.path.join(workdir, 'predictions'))
  checkpointer.close()
  writer.close()
  return final


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> dict[str, float]:
  """Evaluate a checkpoint of `<workdir>/checkpoints` (default: the latest) on the validation data."""
  workdir = os.path.abspath(workdir)
  validate_config(config)
  train_ds, val_ds = prepare_datasets(config, workdir)
  if val_ds is None:
    raise ConfigError('data.val_json is not set: nothing to evaluate on')
  resolve_classes(config, train_ds)
  mesh = make_mesh()
  model, init_variables = retinamask_lib.build_model(config)
  state = create_train_state(config, model, init_variables, jax.random.key(config.seed))
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep)
  if checkpointer.latest_step() is None:
    raise ConfigError(f'no checkpoint in {checkpointer.directory}')
  state, _ = checkpointer.restore(state, step=step, sharding=NamedSharding(mesh, P()))
  checkpointer.close()
  step = int(state.step)
  metrics = run_evaluation(config, model, state.variables, val_ds,
                           os.path.join(workdir, 'eval', f'step_{step}'), mesh)
  return {'step': step, **metrics}

