"""Evaluation of a run: COCO bbox (+ segm) AP of variables on the validation data over the device mesh, PNGs of
sample predictions, and `evaluate_checkpoint` (what `eval.py` runs)."""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from retinamask_jax.config_check import ConfigError, validate_config
from retinamask_jax.data import coco as coco_lib
from retinamask_jax.data import pipeline as pipeline_lib
from retinamask_jax.evaluation import coco_eval
from retinamask_jax.models import retinamask as retinamask_lib
from retinamask_jax.train import sharding
from retinamask_jax.train import workdir as workdir_lib
from retinamask_jax.train.checkpoint import Checkpointer
from retinamask_jax.train.datasets import prepare_datasets, resolve_classes
from retinamask_jax.train.metrics_writer import ProgressBar
from retinamask_jax.train.programs import create_train_state, train_program


def _eval_predictor(config: ml_collections.ConfigDict, variables: Any, mesh: Mesh, with_masks: bool):
  """`run(batch) -> detections` (numpy, this process's rows) for host batches of the eval pipeline."""
  predict = train_program(config).predictor(config, with_masks)
  data_sharding = sharding.data_sharded(mesh)

  def run(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inputs = sharding.to_global(batch, ('image', 'image_size'), data_sharding)
    dets = predict(variables, inputs['image'], inputs['image_size'])
    return {k: sharding.local_numpy(v) for k, v in dets.items()}

  return run


def eval_batch_per_process(batch_size: int) -> int:
  """Images per process in each evaluation batch: `eval.batch_size` rounded up to a multiple of the device count
  (the global batch is sharded over every device), split over the processes. The rows beyond the dataset's images
  are blank and marked invalid (the eval pipeline pads every group's last batch that way already), so the padding
  changes no result, only how many images share a batch.
  """
  n = jax.device_count()
  padded = -(-batch_size // n) * n
  if padded != batch_size:
    logging.info('eval.batch_size %d padded to %d: a multiple of the %d devices (the extra rows are blank)',
                 batch_size, padded, n)
  return padded // jax.process_count()


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
  per_process = eval_batch_per_process(config.eval.batch_size)
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


def write_sample_predictions(
    config: ml_collections.ConfigDict, model: Any, variables: Any, dataset: coco_lib.CocoDataset, out_dir: str
) -> None:
  """PNGs of the first `eval.num_prediction_images` readable validation images with the final model's detections."""
  from retinamask_jax import export
  from retinamask_jax.data import transforms as T

  images, names = [], []
  for record in dataset.records:
    if len(images) == config.eval.num_prediction_images:
      break
    try:
      images.append(pipeline_lib.load_record_image(record))
    except T.DataError:
      continue  # evaluation has reported it and left it out; a drawing is no reason to stop a finished run
    names.append(os.path.splitext(os.path.basename(record.file_name))[0])
  detector = export.Detector(model, config, jax.device_get(variables))
  export.write_predictions(detector, images, out_dir, names=names, score_threshold=0.3)
  print(f'prediction images: {out_dir}', flush=True)


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> dict[str, float]:
  """Evaluate a checkpoint of `<workdir>/checkpoints` on the validation data.

  Default: the newest one that restores (a damaged newer one is named on stderr and skipped, not moved: a training
  run may be using the directory). A damaged `step` given explicitly raises DamagedCheckpointError.
  """
  workdir = os.path.abspath(workdir)
  validate_config(config)
  train_ds, val_ds = prepare_datasets(config, workdir)
  if val_ds is None:
    raise ConfigError('data.val_json is not set: nothing to evaluate on')
  resolve_classes(config, train_ds)
  mesh = sharding.make_mesh()
  model, init_variables = retinamask_lib.build_model(config)
  state = create_train_state(config, model, init_variables, jax.random.key(config.seed))
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep)
  if checkpointer.latest_step() is None:
    raise ConfigError(f'no checkpoint in {checkpointer.directory}')
  replicated = sharding.replicated(mesh)
  if step is not None:
    state, _ = checkpointer.restore(state, step=step, sharding=replicated)
  else:
    found = workdir_lib.restore_newest_intact(
        checkpointer.all_steps(), lambda s: checkpointer.restore(state, step=s, sharding=replicated),
        functools.partial(workdir_lib.report_damaged, doing='evaluating'))
    if found is None:
      raise FileNotFoundError(f'no checkpoint in {checkpointer.directory} restores (each one named above)')
    state = found[1][0]
  checkpointer.close()
  step = int(state.step)
  metrics = run_evaluation(config, model, state.variables, val_ds,
                           os.path.join(workdir, 'eval', f'step_{step}'), mesh)
  return {'step': step, **metrics}
