"""The training loop: data, state, the jitted step over a device mesh, logging, checkpoints, evaluation.

`train_and_evaluate(config, workdir)` is what `train.py` runs. It resumes from the latest checkpoint in
`<workdir>/checkpoints/` by itself, trains to `train.num_steps`, evaluates and returns the final metrics. One code
path for 1 CPU to many hosts (DESIGN.md 6): a `data` mesh over every device JAX sees, the global batch sharded on
it, the state replicated; each process reads only its shard of the data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from retinamask_jax import losses
from retinamask_jax.data import coco as coco_lib
from retinamask_jax.data import pipeline as pipeline_lib
from retinamask_jax.data import shapes as shapes_lib
from retinamask_jax.evaluation import coco_eval
from retinamask_jax.hparams import CONFIG_KEYS as HPARAM_CONFIG_KEYS
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


class NonFiniteError(RuntimeError):
  """A step's loss or gradients were not finite and `train.nonfinite` is 'stop'."""


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
    config: ml_collections.ConfigDict,
    model: Any,
    init_variables: Any,
    rng: jax.Array,
    tx: optax.GradientTransformation | None = None,
) -> TrainState:
  """A fresh state from `rng`; `tx` (default: built from the config) is the optimizer definition."""
  del model  # the variables come from init_variables
  variables = init_variables(rng, _first_canvas(config))
  # From this run's config: a program shared by a beta_max sweep was built with another point's value.
  variables['loss_stats'] = losses.init_loss_stats(config.loss.beta_max)
  if config.model.get('backbone_init'):
    # Pretrained (converted) backbone over the fresh init; the optimizer state below is created from it.
    from retinamask_jax.convert import init_backbone

    variables = init_backbone(variables, config)
  if tx is None:
    tx = optim.make_optimizer(
        config, variables['params'], retinamask_lib.frozen_params_mask(variables['params'], config)
    )
  return TrainState.create(variables, tx, HParams.from_config(config))


def _first_canvas(config: ml_collections.ConfigDict) -> tuple[int, int]:
  return next(iter(pipeline_lib.train_canvases(tuple(config.data.min_sizes), config.data.max_size).values()))


# Config entries the compiled train step does not read: the traced knobs arrive in state.hparams, the seeds only
# change the data and the initial values, and the rest is bookkeeping outside the step.
_NOT_IN_PROGRAM = (
    ('seed',), ('data',), ('eval',), ('checkpoint',), ('train', 'log_every_steps'),
    ('model', 'category_ids'), ('model', 'class_names'), ('model', 'backbone_init'), ('train', 'nonfinite'),
    ('sweep',),
) + tuple(tuple(key.split('.')) for key in HPARAM_CONFIG_KEYS.values())


def config_key(config: ml_collections.ConfigDict, without: tuple[tuple[str, ...], ...]) -> str:
  """`config` as canonical JSON with the entries at the paths `without` (e.g. ('train', 'lr_scale')) removed."""
  tree = config.to_dict()
  for path in without:
    node = tree
    for name in path[:-1]:
      node = node.get(name, {})
    node.pop(path[-1], None)
  return json.dumps(tree, sort_keys=True, default=repr)


def program_key(config: ml_collections.ConfigDict) -> str:
  """The part of `config` the compiled train step depends on, as canonical JSON.

  Runs whose keys are equal (e.g. the points of a best-match-threshold sweep, or several seeds) share one
  `TrainProgram`, hence one compilation per canvas.
  """
  return config_key(config, _NOT_IN_PROGRAM)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """What every run with the same `program_key` shares within a process: the module, its initializer, the
  optimizer definition, the pure train step, and its compiled forms (one per mesh and kind)."""

  model: Any
  init_variables: Any
  tx: optax.GradientTransformation
  step_fn: Any  # train_step(state, batch, rng) -> (state, metrics), pure
  compiled: dict[Any, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def create_state(self, config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
    return create_train_state(config, self.model, self.init_variables, rng, tx=self.tx)

  def jitted_step(self, mesh: Mesh) -> Any:
    """The step jitted for a replicated state and a batch sharded on `mesh`'s `data` axis; state donated."""
    key = ('jit', mesh)
    if key not in self.compiled:
      replicated = NamedSharding(mesh, P())
      self.compiled[key] = jax.jit(self.step_fn, donate_argnums=(0,), out_shardings=(replicated, replicated))
    return self.compiled[key]

  def vmapped_step(self, mesh: Mesh) -> Any:
    """`step(states, batch, rngs)` over states and rngs stacked on a leading run axis (sharded on `mesh`'s
    `sweep` axis) and one batch shared by every run (sharded on `data`): several runs as one program."""
    key = ('vmap', mesh)
    if key not in self.compiled:
      stacked = NamedSharding(mesh, P('sweep'))
      self.compiled[key] = jax.jit(
          jax.vmap(self.step_fn, in_axes=(0, None, 0)), donate_argnums=(0,), out_shardings=(stacked, stacked)
      )
    return self.compiled[key]

  def predictor(self, config: ml_collections.ConfigDict, with_masks: bool) -> Any:
    """Jitted `predict(variables, images, image_size)` (see `make_predict_fn`)."""
    key = ('predict', with_masks)
    if key not in self.compiled:
      self.compiled[key] = jax.jit(make_predict_fn(self.model, config, with_masks))
    return self.compiled[key]


_PROGRAMS: dict[str, TrainProgram] = {}


def train_program(config: ml_collections.ConfigDict) -> TrainProgram:
  """The shared `TrainProgram` of `config` (built on first use in this process)."""
  key = program_key(config)
  if key not in _PROGRAMS:
    model, init_variables = retinamask_lib.build_model(config)
    params = jax.eval_shape(lambda rng: init_variables(rng, _first_canvas(config)), jax.random.key(0))['params']
    tx = optim.make_optimizer(config, params, retinamask_lib.frozen_params_mask(params, config))
    _PROGRAMS[key] = TrainProgram(model, init_variables, tx, make_train_step(model, config))
  return _PROGRAMS[key]


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks that need no data and no compilation; each error names the key.

  Keys and types are checked against `configs/base.py` (every knob, with its default) when the repo's configs
  are importable: a key that is not there is a typo (an unlocked ConfigDict would silently carry it), a value of
  another type would fail late or not at all. Canvases need no check of their own: `pipeline.train_canvases`
  rounds every training and test size up to a multiple of 128, so any positive size gives valid canvases; what can
  be wrong is a size that is not a positive integer.
  """
  _check_against_defaults(config)
  n = jax.device_count()
  t, d = config.train, config.data

  def need(ok: bool, message: str) -> None:
    if not ok:
      raise ConfigError(message)

  need(t.batch_size >= 1, f'train.batch_size must be >= 1, got {t.batch_size}')
  need(t.batch_size % n == 0, f'train.batch_size = {t.batch_size} is not divisible by the {n} devices')
  need(t.batch_size % jax.process_count() == 0,
       f'train.batch_size = {t.batch_size} is not divisible by the {jax.process_count()} processes')
  need(t.num_steps >= 0, f'train.num_steps must be >= 0, got {t.num_steps}')
  need(t.base_lr > 0, f'train.base_lr must be > 0, got {t.base_lr}')
  need(t.get('lr_scale', 1.0) > 0, f'train.lr_scale must be > 0, got {t.get("lr_scale")}')
  need(t.log_every_steps >= 1, f'train.log_every_steps must be >= 1, got {t.log_every_steps}')
  need(t.get('nonfinite', 'skip') in ('skip', 'stop'),
       f"train.nonfinite must be 'skip' or 'stop', got {t.get('nonfinite')!r}")
  need(config.checkpoint.every_steps >= 1, f'checkpoint.every_steps must be >= 1, got {config.checkpoint.every_steps}')
  need(config.checkpoint.keep >= 1, f'checkpoint.keep must be >= 1, got {config.checkpoint.keep}')
  need(config.eval.batch_size >= 1, f'eval.batch_size must be >= 1, got {config.eval.batch_size}')
  need(config.eval.batch_size % n == 0,
       f'eval.batch_size = {config.eval.batch_size} is not divisible by the {n} devices')
  need(config.eval.batch_size % jax.process_count() == 0,
       f'eval.batch_size = {config.eval.batch_size} is not divisible by the {jax.process_count()} processes')
  sizes = tuple(d.min_sizes) if isinstance(d.min_sizes, (tuple, list)) else ()
  need(len(sizes) > 0 and all(_positive_int(v) for v in sizes),
       f'data.min_sizes must be a non-empty sequence of positive integers, got {d.min_sizes!r}')
  for key in ('max_size', 'test_min_size', 'test_max_size', 'max_instances', 'mask_size'):
    need(_positive_int(d[key]), f'data.{key} must be a positive integer, got {d[key]!r}')
  need(d.crowd in ('drop', 'ignore'), f"data.crowd must be 'drop' or 'ignore', got {d.crowd!r}")
  need(0.0 <= d.hflip_prob <= 1.0, f'data.hflip_prob must be in [0, 1], got {d.hflip_prob}')
  need(d.num_workers >= 0, f'data.num_workers must be >= 0, got {d.num_workers}')
  need(config.model.compute_dtype in ('float32', 'bfloat16'),
       f"model.compute_dtype must be 'float32' or 'bfloat16', got {config.model.compute_dtype!r}")
  canvases = list(pipeline_lib.train_canvases(sizes, d.max_size).values())
  canvases += [pipeline_lib.test_canvas(d.test_min_size, d.test_max_size, o) for o in pipeline_lib.ORIENTATIONS]
  # The model's coarsest level (stride 2^max_level <= 128) needs whole cells: a guard on train_canvases itself.
  need(all(h % 128 == 0 and w % 128 == 0 for h, w in canvases),
       f'data.min_sizes / data.max_size: canvases {canvases} are not all multiples of 128')


def _positive_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def _flat_items(tree: Any, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat_items(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _same_kind(value: Any, default: Any) -> bool:
  """Whether `value` may stand where `default` is: same type, ints for floats, lists for tuples (JSON)."""
  if default is None or value is None:
    return True  # placeholders (e.g. matching.best_match_threshold = None turns a feature off)
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      return False
    kinds = {type(v) for v in default}
    return len(kinds) != 1 or not default or all(_same_kind(v, default[0]) for v in value)
  return isinstance(value, type(default))


def _check_against_defaults(config: ml_collections.ConfigDict) -> None:
  try:
    from configs import base as base_config
  except ImportError:  # the library used without the repo's configs/: nothing to check against
    return
  if not hasattr(base_config, 'get_config'):
    return
  import difflib

  defaults = _flat_items(base_config.get_config().to_dict())
  for key, value in _flat_items(config.to_dict()).items():
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=1)
      hint = f' (did you mean {close[0]}?)' if close else ''
      raise ConfigError(f'{key}: unknown config key{hint}; every key is in configs/base.py')
    if not _same_kind(value, defaults[key]):
      raise ConfigError(f'{key}: expected a value like {defaults[key]!r} ({type(defaults[key]).__name__}), '
                        f'got {value!r} ({type(value).__name__})')


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


def _eval_predictor(config, variables, mesh: Mesh, with_masks: bool):
  predict = train_program(config).predictor(config, with_masks)
  data_sharding = NamedSharding(mesh, P('data'))

  def run(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inputs = _to_global(batch, ('image', 'image_size'), data_sharding)
    dets = predict(variables, inputs['image'], inputs['image_size'])
    return {k: _local_numpy(v) for k, v in dets.items()}

  return run


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
  del model  # the program shared by every run of this config's structure brings its own
  predict = _eval_predictor(config, variables, mesh, with_masks)
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
  program = train_program(config)
  model, train_step = program.model, program.jitted_step(mesh)
  state = program.create_state(config, jax.random.key(config.seed))

  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep)
  writer = MetricsWriter(workdir, enabled=is_main)
  data_state: dict[str, Any] = {}
  if checkpointer.latest_step() is not None:
    state, data_state = checkpointer.restore(state, sharding=replicated)
    # The config is the source of truth for the traced knobs (a resumed sweep point keeps its own values).
    state = state.replace(hparams=HParams.from_config(config))
  state = jax.device_put(state, replicated)
  # Steps taken, skipped non-finite ones included: state.step counts the updates applied, and the data position
  # and metrics.jsonl follow the steps taken (checkpoints from before the skip counting hold only next_index).
  start_step = int(data_state.get('step', data_state.get('next_index', state.step)))
  # Also without a checkpoint: a run killed before its first save completed leaves lines that step 1 repeats.
  dropped = writer.truncate_after(start_step)
  if data_state:
    logging.info('resumed from step %d (%d metrics lines after it dropped)', start_step, dropped)
    if is_main:
      print(f'Resuming from checkpoint at step {start_step}.', flush=True)
  elif dropped:
    logging.info('no checkpoint to resume from: %d metrics lines of an earlier attempt dropped', dropped)
  num_steps = config.train.num_steps
  problems_before = pipeline_lib.data_problem_counts()

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

  # Non-finite steps (the step function leaves the state as it was): counted on device without a sync per step,
  # fetched at log steps and before every save.
  stop_on_nonfinite = config.train.get('nonfinite', 'skip') == 'stop'
  nonfinite_before = int(data_state.get('nonfinite_steps', 0))
  nonfinite_count = jax.device_put(np.zeros((), np.int32), replicated)  # this session's
  first_nonfinite = jax.device_put(np.full((), -1, np.int32), replicated)
  nonfinite_logged = 0

  @jax.jit
  def tally(count, first, nonfinite, step):
    bad = nonfinite > 0
    return count + bad.astype(count.dtype), jax.numpy.where(bad & (first < 0), step, first).astype(first.dtype)

  def nonfinite_total() -> int:
    nonlocal nonfinite_logged
    count = int(nonfinite_count)
    if count > nonfinite_logged:
      nonfinite_logged = count
      logging.warning('%d step(s) with a non-finite loss or gradient so far (the first at step %d); %s',
                      nonfinite_before + count, int(first_nonfinite),
                      'stopping (train.nonfinite=stop)' if stop_on_nonfinite else 'their updates were skipped')
    if stop_on_nonfinite and count:
      # Nothing of this session after the bad step is saved: the latest checkpoint stays the last good state.
      checkpointer.close()
      writer.close()
      bar.close()
      raise NonFiniteError(
          f'step {int(first_nonfinite)}: the loss or a gradient is NaN/Inf and train.nonfinite is "stop"; the '
          f'last good checkpoint is step {checkpointer.latest_step()} in {checkpointer.directory} (nothing after '
          'the bad step was saved). Set --config.train.nonfinite=skip to skip such steps instead.')
    return nonfinite_before + count

  def report_data_problems() -> None:
    # One summary of what was reported one by one: the annotation files' problems (found when loaded) and the
    # images' problems this session's pipeline met (unreadable files, truncated GT, ...). Process 0's view: other
    # processes read other images and report those themselves.
    now = pipeline_lib.data_problem_counts()
    parts = {
        'train annotations': train_ds.report,
        'val annotations': val_ds.report if val_ds is not None else {},
        'images': {k: v - problems_before.get(k, 0) for k, v in now.items() if v > problems_before.get(k, 0)},
    }
    text = '; '.join(f'{where}: ' + ', '.join(f'{k}={v}' for k, v in sorted(counts.items()))
                     for where, counts in parts.items() if counts)
    if text and is_main:
      line = f'data problems (each reported once above, with what was done): {text}'
      logging.warning(line)
      print(line, flush=True)

  def save(step: int) -> None:
    skipped = nonfinite_total()
    checkpointer.save(step, state, {'step': step, 'next_index': step, 'nonfinite_steps': skipped}, config)

  with _Preemption() as preemption:
    while step < num_steps:
      batch = next(batches)
      inputs = _to_global(batch, TRAIN_KEYS, data_sharding)
      state, metrics = train_step(state, inputs, jax.random.fold_in(step_rng, step))
      nonfinite_count, first_nonfinite = tally(nonfinite_count, first_nonfinite, metrics['nonfinite'], step + 1)
      step += 1
      log_now = step % config.train.log_every_steps == 0 or step == num_steps
      if log_now:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        images_per_s = (step - last_log_step) * config.train.batch_size / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, step
        record = {k: float(v) for k, v in metrics.items()}
        record.update(images_per_s=images_per_s, canvas=list(batch['image'].shape[1:3]),
                      train_step_compilations=int(train_step._cache_size()),
                      nonfinite_steps=nonfinite_before + int(nonfinite_count))
        writer.write(step, record)
        bar.update(step, f"loss {record['loss']:.4f} {images_per_s:.1f} img/s")
        nonfinite_total()
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
        break
    if preemption.signum is None:
      checkpointer.wait()  # the final save; a signal now still ends the run cleanly, below
    if preemption.signum is not None:
      save(step)  # a no-op when this step was just saved
      checkpointer.close()
      writer.close()
      bar.close()
      report_data_problems()
      print(f'Stopped by signal {preemption.signum} at step {step}; checkpoint saved, '
            're-run the same command to resume.', flush=True)
      raise SystemExit(128 + preemption.signum)
  bar.close()

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
  report_data_problems()
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

