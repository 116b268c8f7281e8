"""Issue 22, faults beyond a kill: damaged checkpoints, two runs on one workdir, checkpoint writes that fail, an
eval batch that does not divide the device count.

Each fault goes through the real entry points (`train.py`, `eval.py` as subprocesses) on copies of one trained
tiny workdir (6 steps, checkpoints at 3 and 6), and each test asserts the exit code, the line that names the fault
and that nothing already safe is lost: the resumed run equals the uninterrupted one bit for bit, every step is
logged once. The subprocesses share the test run's persistent compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from retinamask_jax import cli
from retinamask_jax.export import Detector
from retinamask_jax.models import retinamask
from retinamask_jax.train import programs
from retinamask_jax.train import workdir as workdir_lib
from retinamask_jax.train.checkpoint import Checkpointer, DamagedCheckpointError
from tests import reliability_checks as rc

ROOT = rc.ROOT
STEPS = 6
OVERRIDES = ('--config.train.log_every_steps=1', '--config.checkpoint.every_steps=3',
             '--config.eval.num_prediction_images=0', '--config.data.shapes.num_val=1')


def _args(num_steps: int = STEPS) -> tuple[str, ...]:
  return (*OVERRIDES, f'--config.train.num_steps={num_steps}')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(workdir, env): an uninterrupted train.py run of STEPS steps with checkpoints 3 and 6 (copy it, never edit)."""
  root = tmp_path_factory.mktemp('faults')
  env = rc.subprocess_env(str(root / 'jax_cache'))
  workdir = str(root / 'straight' / 'run')
  proc = rc.start(workdir, _args(), env, 'log.txt')
  assert rc.finish(proc, 900) == 0, rc.read_log(workdir, 'log.txt')[-3000:]
  return workdir, env


@pytest.fixture(scope='module')
def step3(trained):
  """The uninterrupted run's checkpoint of step 3: every array by key path."""
  return rc.restore_raw(trained[0], 3)[0]


@pytest.fixture(scope='module')
def template():
  """A zero TrainState of the tiny model (7 shapes classes), the restore target: shapes only, nothing runs."""
  c = tiny.get_config()
  c.model.num_classes = 7
  model, init = retinamask.build_model(c)
  shapes = jax.eval_shape(lambda rng: programs.create_train_state(c, model, init, rng), jax.random.key(0))
  return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)


def _copy(trained, tmp_path) -> str:
  workdir = str(tmp_path / 'copy' / 'run')
  shutil.copytree(trained[0], workdir)
  return workdir


def _run(argv: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, **kwargs)


def _assert_same_run(workdir: str, straight: str, num_steps: int = STEPS) -> None:
  """Every step logged once, with the straight run's losses (full float32), and the same final state, bitwise."""
  lines = rc.train_lines(workdir)
  assert [r['step'] for r in lines] == list(range(1, num_steps + 1))
  assert [r['loss'] for r in lines] == [r['loss'] for r in rc.train_lines(straight)]
  rc.assert_bitwise_equal(rc.restore_raw(workdir)[0], rc.restore_raw(straight)[0])


def _no_noise(stderr: str) -> None:
  assert 'Traceback' not in stderr and 'Event loop is closed' not in stderr, stderr[-3000:]


def damage(step_dir: str, kind: str) -> list[str]:
  """Damages a checkpoint step in place as a dying host or a bad disk would; returns the files touched."""
  arrays = sorted(glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_*', 'd', '*')))
  assert arrays
  if kind == 'truncated':
    for path in arrays:
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    return arrays
  if kind == 'missing':
    for path in arrays:
      os.remove(path)
    return arrays
  assert kind == 'metadata'
  path = os.path.join(step_dir, 'state', '_METADATA')
  with open(path, 'w') as f:
    f.write('\0{not json')
  return [path]


# ------------------------------------------------------------------------------------------ damaged checkpoints


def test_damaged_newest_checkpoint_is_set_aside_the_run_resumes_bitwise_and_a_second_run_is_refused(trained,
                                                                                                   tmp_path):
  """The newest checkpoint's arrays truncated: train.py names it in one line, sets it aside, resumes from step 3 and
  ends bit for bit as the uninterrupted run. While it runs, a second train.py on the same workdir is refused at
  once naming it (exit 2), and the first is unharmed: every step logged once."""
  straight, env = trained
  workdir = _copy(trained, tmp_path)
  checkpoints = os.path.join(workdir, 'checkpoints')
  truncated = damage(os.path.join(checkpoints, '6'), 'truncated')
  sizes = {os.path.relpath(p, checkpoints): os.path.getsize(p) for p in truncated}
  lock = os.path.join(workdir, workdir_lib.LOCK_FILE)

  first = rc.start(workdir, _args(), env, 'first.txt')
  deadline = time.monotonic() + 300
  while not (os.path.exists(lock) and open(lock).read().startswith(f'pid {first.pid} ')):
    assert first.poll() is None and time.monotonic() < deadline, rc.read_log(workdir, 'first.txt')[-3000:]
    time.sleep(0.02)
  start = time.monotonic()
  second = _run(rc.train_args(workdir, *_args()), env)
  refused_after = time.monotonic() - start
  assert second.returncode == cli.EXIT_USAGE, second.stderr[-3000:]
  assert second.stderr.strip().splitlines()[-1].startswith(
      f'error: {workdir} is in use by another run: pid {first.pid} on host {socket.gethostname()}, since ')
  assert 'train.py' in second.stderr.strip().splitlines()[-1]
  _no_noise(second.stderr)
  print(f'second train.py refused after {refused_after:.1f} s')

  assert rc.finish(first, 900) == 0, rc.read_log(workdir, 'first.txt')[-3000:]
  log = rc.read_log(workdir, 'first.txt')
  named = [line for line in log.splitlines() if 'is damaged' in line]
  assert len(named) == 1, log[-3000:]
  assert re.fullmatch(
      rf'warning: checkpoint 6 in {re.escape(checkpoints)} is damaged \(ValueError: OUT_OF_RANGE: Error reading '
      rf'"[^"]+": .*\); set aside as {re.escape(checkpoints)}/6\.damaged; resuming from step 3 instead', named[0])
  assert 'Resuming from checkpoint at step 3.' in log
  _no_noise(log)
  # Kept aside as it was (nothing deleted) and ignored by Orbax; the run saved a new step 6.
  assert sorted(os.listdir(checkpoints)) == ['3', '6', '6.damaged']
  assert Checkpointer(checkpoints).all_steps() == [3, 6]
  for name, size in sizes.items():
    assert os.path.getsize(os.path.join(checkpoints, name.replace('6', '6.damaged', 1))) == size
  _assert_same_run(workdir, straight)
  assert [r['step'] for r in rc.all_lines(workdir) if r.get('kind') == 'eval'] == [STEPS]


# Orbax leaves TensorStore reads of the damaged step unfinished; their callbacks raise into closed event loops.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('kind', ['truncated', 'missing', 'metadata'])
def test_each_kind_of_damage_is_named_by_restore_and_skipped_by_from_checkpoint(trained, template, step3, tmp_path,
                                                                                 kind, capsys):
  workdir = _copy(trained, tmp_path)
  checkpoints = os.path.join(workdir, 'checkpoints')
  damage(os.path.join(checkpoints, '6'), kind)
  ckpt = Checkpointer(checkpoints)
  with pytest.raises(DamagedCheckpointError, match=rf'^checkpoint 6 in {re.escape(checkpoints)} is damaged: \w+'):
    ckpt.restore(template, step=6)
  ckpt.close()

  capsys.readouterr()
  detector = Detector.from_checkpoint(workdir)  # a reader: names the damaged step, loads step 3, moves nothing
  err = capsys.readouterr().err
  assert re.search(rf'warning: checkpoint 6 in {re.escape(checkpoints)} is damaged \(.+\); loading step 3 instead',
                   err), err
  assert np.array_equal(detector.variables['params']['head']['cls_logits']['kernel'],
                        step3["['params']['head']['cls_logits']['kernel']"])
  assert sorted(os.listdir(checkpoints)) == ['3', '6']
  with pytest.raises(DamagedCheckpointError, match='^checkpoint 6 in '):
    Detector.from_checkpoint(workdir, step=6)


def test_eval_of_a_damaged_step_given_explicitly_exits_2_naming_it(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  damage(os.path.join(workdir, 'checkpoints', '6'), 'missing')
  proc = _run([sys.executable, 'eval.py', '--config', rc.TINY, '--workdir', workdir, '--step', '6', *OVERRIDES],
              trained[1])
  assert proc.returncode == cli.EXIT_USAGE, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: checkpoint 6 in {workdir}/checkpoints is damaged: ValueError: FAILED_PRECONDITION')
  _no_noise(proc.stderr)


# ------------------------------------------------------------------------------------------ one writer per workdir


_HOLD = r'''
import sys, time
from retinamask_jax.train.workdir import WorkdirLock
with WorkdirLock(sys.argv[1]):
  print('locked', flush=True)
  time.sleep(600)
'''


def test_the_lock_dies_with_its_holder_even_on_kill9(tmp_path):
  workdir = str(tmp_path / 'run')
  holder = subprocess.Popen([sys.executable, '-c', _HOLD, workdir], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'locked'
  with pytest.raises(workdir_lib.WorkdirBusyError, match=rf'in use by another run: pid {holder.pid} on host'):
    with workdir_lib.WorkdirLock(workdir):
      pass
  assert rc.kill(holder) == -signal.SIGKILL
  with workdir_lib.WorkdirLock(workdir):  # no stale lock
    with workdir_lib.WorkdirLock(workdir):  # re-entrant within a process (train.py takes it twice)
      pass
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE)) as f:
    assert f.read().startswith(f'pid {os.getpid()} ')


# ------------------------------------------------------------------------------------------ writes that fail


# Runs argv[2:] with a file-size limit of argv[1] bytes: writes past it fail with EFBIG, as on a full disk
# (SIGXFSZ ignored, else it would kill the process; both survive the exec).
_LIMITED = r'''
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2)
os.execv(sys.argv[2], sys.argv[2:])
'''


def _fail_a_save(trained, step3, tmp_path) -> str:
  """A copy resumed from step 3 under a file-size limit that step 6's arrays exceed: its save of step 6 fails."""
  env = trained[1]
  workdir = _copy(trained, tmp_path)
  checkpoints = os.path.join(workdir, 'checkpoints')
  shutil.rmtree(os.path.join(checkpoints, '6'))  # as if the run had stopped after its checkpoint of step 3
  # Orbax's array metadata (state/_METADATA, 400 KB for the tiny model) and its arrays (9 MB, in one or several
  # files) cannot be written; metrics.jsonl and the TensorBoard events (a few KB) can.
  limit = 128 * 1024
  assert os.path.getsize(os.path.join(checkpoints, '3', 'state', '_METADATA')) > limit

  proc = _run([sys.executable, '-c', _LIMITED, str(limit), *rc.train_args(workdir, *_args())], env)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f'error: checkpoint 6 could not be written to {checkpoints}: [Errno 27] File too large (EFBIG)')
  _no_noise(proc.stderr)
  # The previous checkpoint is the latest and restores, unchanged.
  assert Checkpointer(checkpoints).all_steps() == [3]
  state, data = rc.restore_raw(workdir)
  assert data['step'] == 3
  rc.assert_bitwise_equal(state, step3)
  return workdir


def test_a_checkpoint_write_that_fails_stops_with_one_line_keeping_the_previous_checkpoint(trained, step3, tmp_path):
  _fail_a_save(trained, step3, tmp_path)


@pytest.mark.slow
def test_after_a_failed_checkpoint_write_the_same_command_resumes_as_the_uninterrupted_run(trained, step3, tmp_path):
  workdir = _fail_a_save(trained, step3, tmp_path)
  proc = _run(rc.train_args(workdir, *_args()), trained[1])  # space is back
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resuming from checkpoint at step 3.' in proc.stdout
  _assert_same_run(workdir, trained[0])


# ------------------------------------------------------------------------------------------ multi-device eval


@pytest.mark.slow
def test_eval_batch_not_divisible_by_the_device_count_is_padded_with_the_same_results(trained, tmp_path):
  """eval.py on 8 simulated devices with eval.batch_size 3 (was: "not divisible by the 8 devices"; now padded to 8
  with blank rows) writes the same detections, for every image once, as with eval.batch_size 8."""
  env = dict(trained[1], JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0')
  workdir = _copy(trained, tmp_path)
  results = {}
  for batch in (8, 3):
    proc = _run([sys.executable, 'eval.py', '--config', rc.TINY, '--workdir', workdir, *OVERRIDES,
                 '--config.data.shapes.num_val=5', '--config.train.batch_size=8', f'--config.eval.batch_size={batch}'],
                env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith('box ') or 'box  AP' in proc.stdout, proc.stdout[-2000:]
    with open(os.path.join(workdir, 'eval', f'step_{STEPS}', 'bbox_results.json')) as f:
      results[batch] = json.load(f)
  assert results[8] and results[3] == results[8]
  detections = [(r['image_id'], r['category_id'], tuple(r['bbox']), r['score']) for r in results[8]]
  assert len(set(detections)) == len(detections)  # no image predicted twice (the padding rows are not images)


@pytest.mark.slow
def test_train_py_on_8_devices_with_the_tiny_eval_batch(trained, tmp_path):
  """The issue's case: the tiny config on 8 devices with train.batch_size=8 stopped with "eval.batch_size = 4 is
  not divisible by the 8 devices"; it trains and evaluates."""
  env = dict(trained[1], JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0')
  workdir = str(tmp_path / 'run')
  proc = _run(rc.train_args(workdir, *OVERRIDES, '--config.train.batch_size=8', '--config.train.num_steps=2'), env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [r['step'] for r in rc.all_lines(workdir) if r.get('kind') == 'eval'] == [2]
