"""The training loop: `train_and_evaluate(config, workdir)` is what `train.py` runs.

It resumes from the latest checkpoint in `<workdir>/checkpoints/` by itself, trains to `train.num_steps`,
evaluates and returns the final metrics. One code path for 1 CPU to many hosts (DESIGN.md 6): a `data` mesh over
every device JAX sees, the global batch sharded on it, the state replicated; each process reads only its shard of
the data. Each job the loop calls on has its own module:

  config_check.py (retinamask_jax/)  validation: every key, type and value, before anything runs
  datasets.py     the training / validation datasets, classes, the data problem summary
  programs.py     the train program shared by runs of one structure (module, optimizer, jitted step)
  sharding.py     the mesh and host batch -> global array moves
  workdir.py      the workdir: one writer (lock), restoring with a fallback past damaged checkpoints
  nonfinite.py    counting (or stopping on) non-finite steps
  preemption.py   SIGTERM / SIGINT -> save and exit
  evaluation.py   COCO evaluation, sample predictions, `evaluate_checkpoint` (eval.py)

The names other modules and tests import from here are re-exported below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from retinamask_jax.config_check import ConfigError, _check_against_defaults, validate_config
from retinamask_jax.data import coco as coco_lib
from retinamask_jax.data import pipeline as pipeline_lib
from retinamask_jax.evaluation import plots
from retinamask_jax.hparams import HParams
from retinamask_jax.train import sharding
from retinamask_jax.train import workdir as workdir_lib
from retinamask_jax.train.checkpoint import Checkpointer, CheckpointWriteError, DamagedCheckpointError
from retinamask_jax.train.datasets import DataProblemReport, prepare_datasets, resolve_classes
from retinamask_jax.train.evaluation import evaluate_checkpoint, run_evaluation, write_sample_predictions
from retinamask_jax.train.metrics_writer import MetricsWriter, ProgressBar
from retinamask_jax.train.nonfinite import NonFiniteError, NonFiniteMonitor
from retinamask_jax.train.preemption import Preemption
from retinamask_jax.train.programs import (
    _PROGRAMS,
    TRAIN_KEYS,
    TrainProgram,
    config_key,
    create_train_state,
    program_key,
    train_program,
)
from retinamask_jax.train.sharding import make_mesh
from retinamask_jax.train.workdir import WorkdirLock

# Names importers use from here (sweep.py, cli.py, tests, bench/), kept after the split into modules.
_Preemption = Preemption
_to_global = sharding.to_global
_local_numpy = sharding.local_numpy
__all__ = [
    'ConfigError', 'NonFiniteError', 'TRAIN_KEYS', 'TrainProgram', '_PROGRAMS', '_Preemption',
    '_check_against_defaults', '_local_numpy', '_to_global', 'config_key', 'create_train_state',
    'evaluate_checkpoint', 'make_mesh', 'prepare_datasets', 'program_key', 'resolve_classes', 'run_evaluation',
    'train_and_evaluate', 'train_program', 'validate_config',
]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Train to `train.num_steps` (resuming from `<workdir>/checkpoints/`), then evaluate. Returns eval metrics."""
  workdir = os.path.abspath(workdir)
  validate_config(config)
  with WorkdirLock(workdir, enabled=jax.process_index() == 0):  # one writer per workdir: a second run stops here
    train_ds, val_ds = prepare_datasets(config, workdir)
    resolve_classes(config, train_ds)
    logging.info('training data: %d images, %d classes', len(train_ds.records), config.model.num_classes)

    run = _Run.start(config, workdir, val_ds)
    state, data_state = run.restore_newest_intact()
    start_step = _steps_taken(state, data_state)
    run.forget_metrics_after(start_step, resumed=bool(data_state))
    run.open_progress(train_ds, start_step, data_state)

    with Preemption() as preemption:
      state, step = _train(run, state, start_step, _train_batches(run, train_ds, data_state, start_step), preemption)
      if preemption.signum is None:
        run.wait_for_saves()  # the final save; a signal now still ends the run cleanly, below
      if preemption.signum is not None:
        _stop_for_signal(run, state, step, preemption.signum)
    run.bar.close()

    final = _final_evaluation(run, state, step, start_step, val_ds)
    run.problems.report()
    run.close()
    return final


# ------------------------------------------------------------------------------------------------ one session


@dataclasses.dataclass
class _Run:
  """What one session of a run holds: config, devices, program, checkpoints, logs."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  program: TrainProgram
  checkpointer: Checkpointer
  writer: MetricsWriter
  val_ds: coco_lib.CocoDataset | None
  is_main: bool
  bar: ProgressBar | None = None
  nonfinite: NonFiniteMonitor | None = None
  problems: DataProblemReport | None = None
  started: float = dataclasses.field(default_factory=time.perf_counter)
  wall_offset: float = 0.0  # wall_seconds of the earlier sessions (a resumed run's curve goes on from there)

  @classmethod
  def start(cls, config: ml_collections.ConfigDict, workdir: str, val_ds: coco_lib.CocoDataset | None) -> _Run:
    is_main = jax.process_index() == 0
    return cls(
        config=config, workdir=workdir, mesh=make_mesh(), program=train_program(config),
        checkpointer=Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep),
        writer=MetricsWriter(workdir, enabled=is_main), val_ds=val_ds, is_main=is_main,
    )

  def restore_newest_intact(self) -> tuple[Any, dict[str, Any]]:
    """The newest checkpoint that restores (state, data position), damaged newer ones set aside; a fresh state and
    {} when there is none."""
    replicated = sharding.replicated(self.mesh)
    state = self.program.create_state(self.config, jax.random.key(self.config.seed))
    data_state: dict[str, Any] = {}
    found = workdir_lib.restore_newest_intact(
        self.checkpointer.all_steps(),
        lambda step: self.checkpointer.restore(state, step=step, sharding=replicated),
        self._set_aside)
    if found is not None:
      state, data_state = found[1]
      # The config is the source of truth for the traced knobs (a resumed sweep point keeps its own values).
      state = state.replace(hparams=HParams.from_config(self.config))
    return jax.device_put(state, replicated), data_state

  def _set_aside(self, error: DamagedCheckpointError, next_step: int | None) -> None:
    """Renames a damaged checkpoint aside (process 0; the others list the steps again once it has) and says so."""
    path = self.checkpointer.set_aside(error.step) if self.is_main else None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f'checkpoint {error.step} set aside')
      self.checkpointer.reload()
    if self.is_main:
      workdir_lib.report_damaged(error, next_step, set_aside_as=path)

  def forget_metrics_after(self, start_step: int, resumed: bool) -> None:
    """Drops metrics.jsonl lines after `start_step`: each logged step appears once however often a run restarts."""
    # Also without a checkpoint: a run killed before its first save completed leaves lines that step 1 repeats.
    dropped = self.writer.truncate_after(start_step)
    self.wall_offset = max([r['wall_seconds'] for r in self.writer.read() if 'wall_seconds' in r], default=0.0)
    if resumed:
      logging.info('resumed from step %d (%d metrics lines after it dropped)', start_step, dropped)
      if self.is_main:
        print(f'Resuming from checkpoint at step {start_step}.', flush=True)
    elif dropped:
      logging.info('no checkpoint to resume from: %d metrics lines of an earlier attempt dropped', dropped)

  def open_progress(self, train_ds: coco_lib.CocoDataset, start_step: int, data_state: dict[str, Any]) -> None:
    c = self.config
    self.problems = DataProblemReport(train_ds, self.val_ds, enabled=self.is_main)
    self.bar = ProgressBar(c.train.num_steps, start_step, enabled=self.is_main, every=c.train.log_every_steps)
    self.nonfinite = NonFiniteMonitor(c, int(data_state.get('nonfinite_steps', 0)),
                                      sharding.replicated(self.mesh), self.checkpointer, close=self.close)

  def save(self, state: Any, step: int) -> None:
    """Starts an asynchronous save of `step`; CheckpointWriteError when it (or the save in flight) fails."""
    skipped = self.nonfinite.total()
    with self._closing_logs_on(CheckpointWriteError):
      self.checkpointer.save(step, state, {'step': step, 'next_index': step, 'nonfinite_steps': skipped},
                             self.config)

  def wait_for_saves(self) -> None:
    with self._closing_logs_on(CheckpointWriteError):
      self.checkpointer.wait()

  @contextlib.contextmanager
  def _closing_logs_on(self, error: type[Exception]):
    """The logs are flushed and closed when `error` ends the run (the checkpointer cannot be closed then)."""
    try:
      yield
    except error:
      self.writer.close()
      if self.bar is not None:
        self.bar.close()
      raise

  def wall_seconds(self) -> float:
    """Seconds of this run so far (all sessions; compilation and evaluations included)."""
    return self.wall_offset + time.perf_counter() - self.started

  def evaluate(self, state: Any, step: int) -> dict[str, float]:
    """COCO evaluation at `step`: its metrics.jsonl line (with wall_seconds) and the learning curves."""
    metrics = run_evaluation(self.config, self.program.model, state.variables, self.val_ds,
                             os.path.join(self.workdir, 'eval', f'step_{step}'), self.mesh)
    metrics['wall_seconds'] = self.wall_seconds()
    self.writer.write(step, metrics, kind='eval')
    if self.is_main and plots.plot_workdir(self.workdir):
      print(f'learning curves: {os.path.join(self.workdir, plots.CURVES_FILE)}', flush=True)
    return metrics

  def close(self) -> None:
    """Waits for the saves in flight and closes the logs; the progress bar's line ends."""
    self.checkpointer.close()
    self.writer.close()
    if self.bar is not None:
      self.bar.close()


def _steps_taken(state: Any, data_state: dict[str, Any]) -> int:
  """Steps taken, skipped non-finite ones included: state.step counts the updates applied, and the data position
  and metrics.jsonl follow the steps taken (checkpoints from before the skip counting hold only next_index)."""
  return int(data_state.get('step', data_state.get('next_index', state.step)))


def _train_batches(
    run: _Run, train_ds: coco_lib.CocoDataset, data_state: dict[str, Any], start_step: int
) -> Iterator[dict[str, np.ndarray]]:
  return pipeline_lib.make_train_iterator(
      train_ds, run.config,
      global_batch_size=run.config.train.batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      start_index=int(data_state.get('next_index', start_step)),
  )


def _train(
    run: _Run, state: Any, step: int, batches: Iterator[dict[str, np.ndarray]], preemption: Preemption
) -> tuple[Any, int]:
  """Steps from `step` to train.num_steps (or a preemption signal): log, save and evaluate on their schedules."""
  c = run.config
  num_steps = c.train.num_steps
  train_step = run.program.jitted_step(run.mesh)
  data_sharding = sharding.data_sharded(run.mesh)
  step_rng = jax.random.key(c.seed + 1)
  last_log = (time.perf_counter(), step)
  while step < num_steps:
    batch = next(batches)
    inputs = sharding.to_global(batch, TRAIN_KEYS, data_sharding)
    state, metrics = train_step(state, inputs, jax.random.fold_in(step_rng, step))
    run.nonfinite.record(metrics['nonfinite'], step + 1)
    step += 1
    if step % c.train.log_every_steps == 0 or step == num_steps:
      last_log = _log(run, step, metrics, batch, last_log, train_step)
    else:
      run.bar.update(step)
    if step % c.checkpoint.every_steps == 0 or step == num_steps:
      run.save(state, step)
    if c.eval.every_steps and step % c.eval.every_steps == 0 and step < num_steps and run.val_ds:
      run.wait_for_saves()
      run.evaluate(state, step)
    if preemption.signum is not None:
      break
  return state, step


def _log(run: _Run, step: int, metrics: Any, batch: dict[str, np.ndarray], last_log: tuple[float, int],
         train_step: Any) -> tuple[float, int]:
  """One metrics.jsonl line for `step` and the progress bar's loss; returns the new (time, step) of the last log."""
  metrics = jax.device_get(metrics)
  now = time.perf_counter()
  images_per_s = (step - last_log[1]) * run.config.train.batch_size / max(now - last_log[0], 1e-9)
  record = {k: float(v) for k, v in metrics.items()}
  record.update(images_per_s=images_per_s, canvas=list(batch['image'].shape[1:3]),
                train_step_compilations=int(train_step._cache_size()),
                nonfinite_steps=run.nonfinite.total_without_check(), wall_seconds=run.wall_seconds())
  run.writer.write(step, record)
  run.bar.update(step, f"loss {record['loss']:.4f} {images_per_s:.1f} img/s")
  run.nonfinite.total()
  return now, step


def _stop_for_signal(run: _Run, state: Any, step: int, signum: int) -> None:
  """Saves `step` (a no-op when it was just saved), closes everything and exits with 128 + signum."""
  run.save(state, step)
  run.close()
  run.problems.report()
  print(f'Stopped by signal {signum} at step {step}; checkpoint saved, re-run the same command to resume.',
        flush=True)
  raise SystemExit(128 + signum)


def _final_evaluation(
    run: _Run, state: Any, step: int, start_step: int, val_ds: coco_lib.CocoDataset | None
) -> dict[str, float]:
  """The final evaluation (or the one on record when a finished run is re-run) and the sample predictions."""
  final: dict[str, float] = {}
  if val_ds is None:
    return final
  done = [r for r in run.writer.read() if r.get('kind') == 'eval' and r['step'] == step]
  if done and start_step == step:
    final = {k: v for k, v in done[-1].items() if k not in ('step', 'kind')}
    if run.is_main:
      print(f'Training already finished at step {step}; evaluation on record:', flush=True)
      print('\n'.join(f'  {k}: {v}' for k, v in final.items() if '/' in k), flush=True)
  else:
    final = run.evaluate(state, step)
  if run.is_main and run.config.eval.num_prediction_images:
    write_sample_predictions(run.config, run.program.model, state.variables, val_ds,
                             os.path.join(run.workdir, 'predictions'))
  return final
