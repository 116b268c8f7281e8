"""What the entry points (train.py, eval.py, predict.py) run once flags are parsed.

Expected failures (a bad config or flag, missing data, a checkpoint that does not fit or is damaged (given by
step), a workdir another run holds: exit code 2; a non-finite loss with train.nonfinite = 'stop': exit code 3; a
checkpoint that could not be written: exit code 1) end the process with a one-line reason on stderr; anything else
is a bug and keeps its traceback. Preemption (SIGTERM/SIGINT) saves a checkpoint and exits with 128 + the signal.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import flags

EXIT_USAGE = 2  # the run cannot start: a bad config or flag, missing data, a checkpoint that does not fit
EXIT_NONFINITE = 3  # a non-finite loss or gradient with train.nonfinite = 'stop'; the last good checkpoint is kept
EXIT_CHECKPOINT_WRITE = 1  # a checkpoint could not be written (disk full, quota, permissions); earlier ones are intact

# Multi-host (DESIGN.md 6): every process runs the same command; JAX's own runtime connects them.
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-host: host:port of process 0 (with --num_processes and --process_id). '
    'Not needed on TPU pod slices and under SLURM, where the processes find each other.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: how many processes in all.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process, 0 .. num_processes - 1.')


class _UsageError(Exception):
  """Flags that cannot work together."""


def auto_detected_cluster(env: dict[str, str]) -> bool:
  """Whether the environment is one `jax.distributed.initialize()` can configure by itself with > 1 process:
  a SLURM job step with several tasks, or a multi-host Cloud TPU slice (several worker hostnames)."""
  if int(env.get('SLURM_STEP_NUM_TASKS', env.get('SLURM_NTASKS', '1')) or 1) > 1:
    return True
  return len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1


def _initialize_distributed() -> None:
  """Connects the processes of a multi-host run before anything touches a device; single-process runs skip it."""
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise _UsageError('--coordinator_address, --num_processes and --process_id go together')
    import jax

    jax.distributed.initialize(coordinator_address=explicit[0], num_processes=explicit[1], process_id=explicit[2])
  elif auto_detected_cluster(dict(os.environ)):
    import jax

    jax.distributed.initialize()


class _OwnInfoOnly(logging.Filter):
  """Keeps our INFO lines and everyone's warnings; drops the libraries' INFO chatter (Orbax logs ~20 per save)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f'{os.sep}retinamask_jax{os.sep}' in record.pathname


class _NoBackgroundTracebacks(logging.Filter):
  """Drops the tracebacks Orbax's background threads and asyncio log when a checkpoint write or read fails: the
  failure reaches the user as one line (`error: checkpoint ... could not be written`, `warning: checkpoint ... is
  damaged`), and the same traceback otherwise comes a dozen times."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == 'asyncio' and record.levelno >= logging.ERROR:  # "Task exception was never retrieved"
      return False
    return not (record.exc_info and f'{os.sep}orbax{os.sep}' in record.pathname)


def _drop_event_loop_closed(unraisable: Any, default: Callable[[Any], None] = sys.unraisablehook) -> None:
  """sys.unraisablehook without TensorStore's callbacks into the event loop of an Orbax write that already failed
  ("RuntimeError: Event loop is closed", one per array still in flight)."""
  if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed':
    return
  default(unraisable)


def _quiet_libraries() -> None:
  if 'verbosity' in flags.FLAGS and flags.FLAGS['verbosity'].present:
    return  # the user asked for a level: give them everything at it
  for handler in logging.getLogger('absl').handlers + logging.getLogger().handlers:
    handler.addFilter(_OwnInfoOnly())
    handler.addFilter(_NoBackgroundTracebacks())
  sys.unraisablehook = _drop_event_loop_closed


def _expected_errors() -> tuple[type[BaseException], ...]:
  from retinamask_jax.config_check import ConfigError
  from retinamask_jax.data.transforms import DataError
  from retinamask_jax.train.checkpoint import DamagedCheckpointError, ShapeMismatchError
  from retinamask_jax.train.nonfinite import NonFiniteError
  from retinamask_jax.train.workdir import WorkdirBusyError

  return (ConfigError, ShapeMismatchError, DataError, FileNotFoundError, _UsageError, NonFiniteError,
          DamagedCheckpointError, WorkdirBusyError)


def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
  """Calls fn; an expected failure becomes `error: <reason>` on stderr and exit code 2 (3: non-finite stop, 1: a
  checkpoint that could not be written)."""
  _quiet_libraries()
  try:
    if flags.FLAGS.is_parsed():
      _initialize_distributed()
    return fn(*args, **kwargs)
  except Exception as e:  # the error types are imported only now: train.py locks its workdir before jax loads
    from retinamask_jax.train.workdir import WorkdirBusyError

    if isinstance(e, WorkdirBusyError):
      _fail(str(e))  # without importing jax: a second run is refused at once
    from retinamask_jax.train.checkpoint import CheckpointWriteError
    from retinamask_jax.train.nonfinite import NonFiniteError

    if isinstance(e, CheckpointWriteError):
      print(f'error: {e}', file=sys.stderr, flush=True)
      sys.stdout.flush()
      # Not sys.exit: Orbax's writes of the failed step are still in flight in its threads, and the interpreter's
      # shutdown would print their tracebacks after this line. The earlier checkpoints are finalized on disk, the
      # logs closed (train loop), and the kernel releases the workdir lock.
      os._exit(EXIT_CHECKPOINT_WRITE)
    if not isinstance(e, _expected_errors()):
      raise
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(EXIT_NONFINITE if isinstance(e, NonFiniteError) else EXIT_USAGE)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for the entry points (`app.run(main, flags_parser=cli.parse_flags)`), where a bad flag ends
  with one line `error: <reason>` naming it and exit code 2, like every other bad input: absl alone prints two
  lines for a value of the wrong type and a traceback for an override of a config key that does not exist."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # e.g. flag --config.train.num_steps=abc: invalid literal for int() ...
    _fail(str(e))
  except (AttributeError, KeyError) as e:
    # ml_collections' override parser raises these for a key the config lacks, naming only that component.
    text = str(e)
    missing = re.search(r"'(\w+)\\?'", text)
    name = missing.group(1) if missing else ''
    overrides = [a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]
    culprits = [a for a in overrides if name in a[len('--config.'):].split('.')]
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    hint = f'; did you mean {suggestion.group(1)!r}?' if suggestion else ''
    _fail(f'{culprits[0] if culprits else "--config"}: no such config key {name!r}{hint} '
          '(every key is in configs/base.py)')
  raise AssertionError('unreachable')


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USAGE)


def _print_metrics(metrics: dict[str, float]) -> None:
  for kind in ('bbox', 'segm'):
    # None (or an old record's -1): COCOeval had no objects of that size to score.
    values = {name: metrics[f'{kind}/{name}'] for name in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
              if f'{kind}/{name}' in metrics}
    row = [f'{name} -' if v is None or v < 0 else f'{name} {100 * v:.1f}' for name, v in values.items()]
    if row:
      print(f'{"box " if kind == "bbox" else "mask"} {"  ".join(row)}', flush=True)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  from retinamask_jax.train.workdir import WorkdirLock

  # A workdir that exists may be a live run's: refuse at once, before seconds of imports and device setup. (A new
  # one is locked by train_and_evaluate after the config is validated, so that a bad config leaves nothing behind;
  # in multi-process runs only process 0 holds it, and which process this is is known once JAX is connected.)
  with WorkdirLock(workdir, enabled=os.path.isdir(workdir) and not _multi_process()):
    from retinamask_jax.train import loop

    metrics = loop.train_and_evaluate(config, workdir)
  _print_metrics(metrics)
  return metrics


def _multi_process() -> bool:
  explicit = _NUM_PROCESSES.value if flags.FLAGS.is_parsed() else None
  return (explicit or 1) > 1 or auto_detected_cluster(dict(os.environ))


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict[str, float]:
  from retinamask_jax.train import loop

  metrics = loop.evaluate_checkpoint(config, workdir, step)
  _print_metrics(metrics)
  print(f'results: {os.path.join(os.path.abspath(workdir), "eval", "step_" + str(metrics["step"]))}', flush=True)
  return metrics


def predict(
    workdir: str, images: list[str], out_dir: str | None, *, step: int | None = None, score_threshold: float = 0.3
) -> list[str]:
  """Runs the checkpoint in `workdir` on `images`; writes one PNG per image and detections.json to out_dir.

  An image that cannot be used (missing, not an image, truncated, too many pixels) is skipped with one line
  `skipped <file>: <reason>` on stderr and an `error` entry in detections.json; the others are still predicted.
  When every image was skipped this raises DataError (exit code 2 through `run`).
  """
  from retinamask_jax import export
  from retinamask_jax.data.transforms import DataError

  detector = export.Detector.from_checkpoint(workdir, step)
  out_dir = out_dir or os.path.join(workdir, 'predictions')
  skipped = []

  def report(path: str, reason: str) -> None:
    skipped.append(path)
    print(f'skipped {path}: {reason}', file=sys.stderr, flush=True)

  paths = export.write_predictions(detector, images, out_dir, score_threshold=score_threshold, on_error=report)
  print(f'wrote {len(paths)} images and detections.json to {os.path.abspath(out_dir)}'
        + (f' ({len(skipped)} skipped)' if skipped else ''), flush=True)
  if images and not paths:
    raise DataError(f'none of the {len(images)} images could be used (each is named above)')
  return paths
