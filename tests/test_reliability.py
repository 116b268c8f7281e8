"""Issue 8, reliability: preemption and exact resume, bad data, bad numbers, bad configs, untrusted files.

In-process runs share one compiled tiny program (same `program_key`); the kill tests run `train.py` as a
subprocess with JAX's persistent compilation cache shared between its restarts, so that only the first compiles.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from configs import tiny
from retinamask_jax import cli
from retinamask_jax.data import coco as coco_lib
from retinamask_jax.data import pipeline
from retinamask_jax.models import retinamask
from retinamask_jax.train import loop
from retinamask_jax.train.checkpoint import Checkpointer, ShapeMismatchError
from tests import reliability_checks as rc

ROOT = rc.ROOT
IN_MAIN_THREAD = threading.current_thread() is threading.main_thread()


def _config(num_steps: int = 6) -> ml_collections.ConfigDict:
  c = tiny.get_config()
  c.data.shapes.num_train = 24
  c.data.shapes.num_val = 2
  c.train.num_steps = num_steps
  c.train.log_every_steps = 1
  c.checkpoint.every_steps = 3
  c.eval.num_prediction_images = 0
  return c


def _inject(monkeypatch, actions):
  """Makes the training iterator apply actions[i](batch) to global batch i (i = step - 1)."""
  real = pipeline.make_train_iterator

  def wrapped(*args, **kwargs):
    for batch in real(*args, **kwargs):
      action = actions.get(int(batch['index']))
      yield action(batch) if action else batch

  monkeypatch.setattr(pipeline, 'make_train_iterator', wrapped)


def _poison(value):
  def action(batch):
    batch = dict(batch)
    batch['image'] = np.full_like(batch['image'], value)
    return batch

  return action


def _signal(sig):
  def action(batch):
    os.kill(os.getpid(), sig)  # handled in this (the main) thread before the step it belongs to ends
    return batch

  return action


def _zero_state(c: ml_collections.ConfigDict):
  """A TrainState of `c`'s model with zeros for values: shapes without running (or compiling) the initializer."""
  model, init = retinamask.build_model(c)
  shapes = jax.eval_shape(lambda rng: loop.create_train_state(c, model, init, rng), jax.random.key(0))
  return model, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)


# ------------------------------------------------------------------------------------------ preemption


@pytest.mark.slow  # ~100 s; the default suite keeps the bitwise resume of tests/test_faults.py
@pytest.mark.skipif(not IN_MAIN_THREAD, reason='signal handlers need the main thread')
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_then_resume_exactly(tmp_path, monkeypatch, capsys):
  straight = str(tmp_path / 'straight')
  loop.train_and_evaluate(_config(), straight)

  workdir = str(tmp_path / 'preempted')
  # SIGTERM arrives while step 2 runs (its batch is fetched), SIGINT during step 3 of the resumed run.
  _inject(monkeypatch, {1: _signal(signal.SIGTERM)})
  with pytest.raises(SystemExit) as exit_info:
    loop.train_and_evaluate(_config(), workdir)
  assert exit_info.value.code == 128 + signal.SIGTERM
  assert 'Stopped by signal 15 at step 2; checkpoint saved' in capsys.readouterr().out
  assert Checkpointer(os.path.join(workdir, 'checkpoints')).all_steps() == [2]
  assert signal.getsignal(signal.SIGTERM) is not None and signal.getsignal(signal.SIGINT) is not None

  # SIGINT while step 3 (a checkpoint step) runs: the periodic save and the preemption save are the same one.
  _inject(monkeypatch, {2: _signal(signal.SIGINT)})
  with pytest.raises(SystemExit) as exit_info:
    loop.train_and_evaluate(_config(), workdir)
  assert exit_info.value.code == 128 + signal.SIGINT
  assert Checkpointer(os.path.join(workdir, 'checkpoints')).all_steps() == [2, 3]

  monkeypatch.undo()
  loop.train_and_evaluate(_config(), workdir)
  assert [r['step'] for r in rc.train_lines(workdir)] == list(range(1, 7))
  assert [r['loss'] for r in rc.train_lines(workdir)] == [r['loss'] for r in rc.train_lines(straight)]
  rc.assert_bitwise_equal(rc.restore_raw(workdir)[0], rc.restore_raw(straight)[0])


@pytest.mark.slow  # ~125 s; tests/test_faults.py keeps a bitwise resume (from a set-aside damaged step) by default
def test_kill9_three_times_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
  """SIGKILL at three random moments of one run (one right after a checkpoint step, while its async save is
  likely in flight); the resumed run's final state equals a straight run's bit for bit, every step logged once."""
  env = rc.subprocess_env(str(tmp_path / 'jax_cache'))
  overrides = ('--config.train.num_steps=24', '--config.train.log_every_steps=1', '--config.checkpoint.every_steps=4',
               '--config.eval.num_prediction_images=0', '--config.data.shapes.num_val=1')
  straight = str(tmp_path / 'straight' / 'run')
  proc = rc.start(straight, overrides, env, 'log.txt')
  assert rc.finish(proc, 600) == 0, rc.read_log(straight, 'log.txt')[-3000:]

  rng = random.Random(8)
  workdir = str(tmp_path / 'killed' / 'run')
  kills = []
  # A random early step, checkpoint step 8 with no delay (its asynchronous save likely still in flight), a random
  # late step; spaced so that the lines a killed run logged past its checkpoint never satisfy the next wait.
  moments = ((rng.randint(2, 5), rng.uniform(0.0, 0.3)), (8, 0.0), (rng.randint(12, 20), rng.uniform(0.0, 0.3)))
  for target, delay in moments:
    proc = rc.start(workdir, overrides, env, f'log{len(kills)}.txt')
    seen = rc.wait_for_step(proc, workdir, target, timeout=300)
    assert seen is not None, rc.read_log(workdir, f'log{len(kills)}.txt')[-3000:]
    time.sleep(delay)
    assert rc.kill(proc) == -signal.SIGKILL
    kills.append((target, rc.train_lines(workdir)[-1]['step']))
  proc = rc.start(workdir, overrides, env, 'log_final.txt')
  assert rc.finish(proc, 600) == 0, rc.read_log(workdir, 'log_final.txt')[-3000:]

  lines = rc.all_lines(workdir)
  assert [r['step'] for r in lines if r.get('kind') is None] == list(range(1, 25)), kills
  assert [r['step'] for r in lines if r.get('kind') == 'eval'] == [24]
  ref = [r['loss'] for r in rc.train_lines(straight)]
  assert [r['loss'] for r in rc.train_lines(workdir)] == ref  # full float32 values, bit for bit
  state, data = rc.restore_raw(workdir)
  ref_state, ref_data = rc.restore_raw(straight)
  rc.assert_bitwise_equal(state, ref_state)
  assert data == ref_data == {'step': 24, 'next_index': 24, 'nonfinite_steps': 0}


_SAVE_AND_WAIT = r'''
import sys, time
import ml_collections, numpy as np
from retinamask_jax.train.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], keep=5)
big = lambda v: {'w': np.full((4096, 4096), v, np.float32), 'b': np.full((7,), v, np.float32)}
if ckpt.latest_step() is None:
  ckpt.save(1, big(1.0), {'next_index': 1}, ml_collections.ConfigDict())
  ckpt.wait()
print('saved', flush=True)
ckpt.save(2, big(2.0), {'next_index': 2}, ml_collections.ConfigDict())  # asynchronous: killed while it writes
time.sleep(600)
'''


@pytest.mark.parametrize('when', ['mid-save', 0.03, 0.3])
def test_kill_during_a_checkpoint_save_leaves_the_previous_one_restorable(tmp_path, when):
  """SIGKILL while Orbax writes step 2 (as soon as its temporary directory appears), or after a delay (cut or done,
  whichever it was): the latest checkpoint restores whole, and step 1 is intact."""
  directory = str(tmp_path / 'checkpoints')
  proc = subprocess.Popen([sys.executable, '-c', _SAVE_AND_WAIT, directory], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  assert proc.stdout.readline().strip() == 'saved'
  if when == 'mid-save':
    deadline = time.monotonic() + 60
    while not [n for n in os.listdir(directory) if n.startswith('2.') and 'tmp' in n]:
      assert time.monotonic() < deadline
      time.sleep(0.001)
  else:
    time.sleep(when)
  rc.kill(proc)
  ckpt = Checkpointer(directory)
  template = {'w': np.zeros((4096, 4096), np.float32), 'b': np.zeros((7,), np.float32)}
  # Either the save of step 2 was cut (step 1 is the latest) or it had completed; never a broken latest step.
  latest = ckpt.latest_step()
  assert latest == 1 if when == 'mid-save' else latest in (1, 2)
  state, data = ckpt.restore(template)
  assert data == {'next_index': latest}
  assert np.all(state['w'] == latest) and np.all(state['b'] == latest)
  state, _ = ckpt.restore(template, step=1)
  assert np.all(state['w'] == 1.0)
  # The leftovers of the cut save do not stand in the way of saving that step again.
  assert ckpt.save(3, template, {'next_index': 3}, ml_collections.ConfigDict())
  ckpt.close()
  assert Checkpointer(directory).latest_step() == 3


# ------------------------------------------------------------------------------------------ bad numbers


# slow: 69 s, the default suite's 4th longest; tests/test_step.py::test_nonfinite_step_leaves_the_state_unchanged keeps
# the skip itself in the default run.
@pytest.mark.slow
@pytest.mark.skipif(not IN_MAIN_THREAD, reason='signal handlers need the main thread')
def test_nonfinite_steps_are_skipped_and_counted_across_a_resume(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  # NaN images at step 2, SIGTERM during step 4, Inf images at step 5 (of the resumed run).
  _inject(monkeypatch, {1: _poison(np.nan), 3: _signal(signal.SIGTERM), 4: _poison(np.inf)})
  with pytest.raises(SystemExit):
    loop.train_and_evaluate(_config(), workdir)
  _, data = rc.restore_raw(workdir)
  assert data == {'step': 4, 'next_index': 4, 'nonfinite_steps': 1}
  loop.train_and_evaluate(_config(), workdir)
  lines = rc.train_lines(workdir)
  assert [r['step'] for r in lines] == list(range(1, 7))
  assert [r['nonfinite'] for r in lines] == [0, 1, 0, 0, 1, 0]
  assert [r['nonfinite_steps'] for r in lines] == [0, 1, 1, 1, 2, 2]
  assert all(np.isfinite(r['loss']) for i, r in enumerate(lines) if i not in (1, 4))
  state, data = rc.restore_raw(workdir)
  assert data == {'step': 6, 'next_index': 6, 'nonfinite_steps': 2}
  assert int(state["['step']"]) == 4  # 6 steps taken, 2 updates skipped
  assert all(np.isfinite(v).all() for v in state.values())


# Slow (72 s on 2 cores): the default suite stood at 14 min 57 s of its 15; the skipping half of the same
# mechanism (above) and the step's own non-finite guard (test_step.py) stay in it.
@pytest.mark.slow
def test_nonfinite_stop_raises_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  c = _config()
  c.train.nonfinite = 'stop'
  _inject(monkeypatch, {4: _poison(np.nan)})  # step 5, after the checkpoint of step 3
  with pytest.raises(loop.NonFiniteError, match=r'^step 5: the loss or a gradient is NaN/Inf .* last good '
                                                r'checkpoint is step 3'):
    loop.train_and_evaluate(c, workdir)
  assert Checkpointer(os.path.join(workdir, 'checkpoints')).all_steps() == [3]
  state, data = rc.restore_raw(workdir)
  assert data['step'] == 3 and all(np.isfinite(v).all() for v in state.values())

  # Fixed data, same command: resumes from the good checkpoint; steps 4.. are logged again, once.
  monkeypatch.undo()
  loop.train_and_evaluate(c, workdir)
  assert [r['step'] for r in rc.train_lines(workdir)] == list(range(1, 7))
  assert [r['nonfinite_steps'] for r in rc.train_lines(workdir)] == [0] * 6


def test_cli_turns_a_nonfinite_stop_into_one_line(capsys):
  def boom():
    raise loop.NonFiniteError('step 7: the loss or a gradient is NaN/Inf')

  with pytest.raises(SystemExit) as exit_info:
    cli.run(boom)
  assert exit_info.value.code == cli.EXIT_NONFINITE
  assert capsys.readouterr().err == 'error: step 7: the loss or a gradient is NaN/Inf\n'


# ------------------------------------------------------------------------------------------ bad data


def test_bad_data_trains_and_evaluates_reporting_each_problem_once(tmp_path, monkeypatch, caplog, capsys):
  bad = rc.write_bad_dataset(str(tmp_path / 'data'))
  c = _config()  # 6 steps of 2 images: one epoch of the 12
  c.data.train_json, c.data.val_json = bad['train_json'], bad['val_json']
  c.data.train_images = c.data.val_images = bad['images_dir']
  seen_ids = set()
  real = pipeline.make_train_iterator

  def spy(*args, **kwargs):
    for batch in real(*args, **kwargs):
      seen_ids.update(int(i) for i in batch['image_id'])
      yield batch

  monkeypatch.setattr(pipeline, 'make_train_iterator', spy)
  caplog.set_level(logging.WARNING)
  metrics = loop.train_and_evaluate(c, str(tmp_path / 'run'))

  assert np.isfinite(metrics['bbox/AP']) and np.isfinite(metrics['segm/AP'])
  lines = rc.train_lines(str(tmp_path / 'run'))
  assert [r['step'] for r in lines] == list(range(1, 7)) and all(np.isfinite(r['loss']) for r in lines)
  ids = bad['ids']
  assert {ids[k] for k in ('gray', 'cmyk', 'sixteen', 'crowded', 'crowd_only', 'annotated')} <= seen_ids
  assert not {ids['truncated'], ids['missing'], ids['not_an_image']} & seen_ids

  reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith('[data: ')]
  for (kind, _key), fragment in bad['expect'].items():
    hits = [m for m in reports if m.startswith(f'[data: {kind}]') and re.search(re.escape(fragment) + r'\b', m)]
    # Crowd regions dropped are information (logged at INFO), not a warning.
    assert len(hits) == (0 if kind in coco_lib.INFORMATION_KINDS else 1), (kind, fragment, hits)
  assert len(reports) == len(set(reports))  # nothing reported twice
  # Converted without complaint: grayscale, CMYK, 16-bit.
  assert not [m for m in reports if re.search(r'(gray\.png|cmyk\.jpg|sixteen\.png)', m)]

  out = capsys.readouterr().out.splitlines()
  summary = [line for line in out if line.startswith('data problems')]
  assert len(summary) == 1
  for part in ('degenerate_box=3', 'bad_polygon=1', 'no_valid_polygon=1', 'unknown_category=1',
               'gt_truncated=1', 'unreadable_image=3'):
    assert part in summary[0], (part, summary[0])
  assert 'crowd_dropped' not in summary[0]  # information, on its own line
  assert [line for line in out if line.startswith('data (information)') and 'crowd_dropped=2' in line]
  assert any(r.getMessage() == summary[0] for r in caplog.records)  # logged too


def test_problems_found_in_worker_processes_are_reported_once_in_the_main_process(tmp_path, caplog):
  bad = rc.write_bad_dataset(str(tmp_path / 'data'))
  ds = coco_lib.load_coco(bad['train_json'], bad['images_dir'])
  c = _config()
  caplog.set_level(logging.WARNING)
  before = pipeline.data_problem_counts().get('unreadable_image', 0)
  it = pipeline.make_train_iterator(ds, c, global_batch_size=2, num_workers=2)
  for _ in range(6):  # one epoch: every image is met, in two worker processes
    batch = next(it)
    assert not [k for k in batch if k.startswith('_')]
  it.close()
  unreadable = [r.getMessage() for r in caplog.records if r.getMessage().startswith('[data: unreadable_image]')]
  assert len(unreadable) == 3 and len(set(unreadable)) == 3, unreadable
  assert pipeline.data_problem_counts()['unreadable_image'] == before + 3


# ------------------------------------------------------------------------------------------ bad configs


def _set(c, key, value):
  node = c
  *parents, leaf = key.split('.')
  for name in parents:
    node = node[name]
  with c.unlocked(), c.ignore_type():
    node[leaf] = value


@pytest.mark.parametrize('key, value, message', [
    ('train.num_step', 10, r'^train\.num_step: unknown config key \(did you mean train\.num_steps\?\)'),
    ('model.backbone.dpeth', 18, r'^model\.backbone\.dpeth: unknown config key'),
    ('train.num_steps', '100', r'^train\.num_steps: expected a value like .* \(int\), got .100. \(str\)'),
    ('train.hflip', True, r'^train\.hflip: unknown config key'),
    ('data.min_sizes', ('128',), r'^data\.min_sizes: expected'),
    ('train.base_lr', -0.01, r'^train\.base_lr must be > 0, got -0\.01'),
    ('train.base_lr', 0.0, r'^train\.base_lr must be > 0'),
    ('data.min_sizes', (0, 128), r'^data\.min_sizes must be a non-empty sequence of positive integers'),
    ('data.min_sizes', (), r'^data\.min_sizes must be a non-empty sequence'),
    ('data.max_size', -128, r'^data\.max_size must be a positive integer'),
    ('data.test_min_size', 0, r'^data\.test_min_size must be a positive integer'),
    ('train.nonfinite', 'ignore', r"^train\.nonfinite must be 'skip' or 'stop'"),
    ('checkpoint.every_steps', 0, r'^checkpoint\.every_steps must be >= 1'),
    ('train.batch_size', 0, r'^train\.batch_size must be >= 1'),
    ('data.shapes.train_mean_objects', 0.5, r'^data\.shapes\.train_mean_objects must be >= 1, got 0\.5'),
    ('data.copy_paste.prob', 1.5, r'^data\.copy_paste\.prob must be in \[0, 1\], got 1\.5'),
    ('data.copy_paste.min_visible', 0.0, r'^data\.copy_paste\.min_visible must be in \(0, 1\], got 0\.0'),
])
def test_bad_config_is_rejected_naming_the_key_before_anything_runs(tmp_path, key, value, message):
  c = _config()
  _set(c, key, value)
  with pytest.raises(loop.ConfigError, match=message):
    loop.train_and_evaluate(c, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')  # rejected before data, checkpoints or compilation


def test_batch_not_divisible_by_the_device_count_is_rejected(tmp_path, monkeypatch):
  monkeypatch.setattr(loop.jax, 'device_count', lambda: 4)
  c = _config()
  c.train.batch_size = 6
  with pytest.raises(loop.ConfigError, match=r'^train\.batch_size = 6 is not divisible by the 4 devices'):
    loop.train_and_evaluate(c, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')
  # An eval batch is padded up to a multiple of the device count instead (issue 22; tests/test_faults.py).
  c.train.batch_size, c.eval.batch_size = 8, 6
  loop.validate_config(c)


def test_every_shipped_config_passes_validation():
  import importlib

  for name in sorted(os.listdir(os.path.join(ROOT, 'configs'))):
    if name.endswith('.py') and name != '__init__.py':
      config = importlib.import_module(f'configs.{name[:-3]}').get_config()
      config.train.batch_size = 8  # the R-50 configs' 16 on however many devices this machine has
      config.eval.batch_size = 8
      loop.validate_config(config)


@given(st.lists(st.integers(1, 4000), min_size=1, max_size=4), st.integers(1, 4000), st.integers(1, 4000),
       st.integers(1, 4000))
def test_any_positive_sizes_give_canvases_that_are_multiples_of_128(min_sizes, max_size, test_min, test_max):
  """Why no 'canvas not a multiple of 128' error exists: the canvases are rounded up, for every size."""
  c = tiny.get_config()
  c.data.min_sizes, c.data.max_size = tuple(min_sizes), max_size
  c.data.test_min_size, c.data.test_max_size = test_min, test_max
  loop.validate_config(c)
  for h, w in pipeline.train_canvases(tuple(min_sizes), max_size).values():
    assert h % 128 == 0 and w % 128 == 0 and h >= 128 and w >= 128


@pytest.mark.parametrize('override, message', [
    ('--config.train.nmu_steps=5', "error: --config.train.nmu_steps: no such config key 'nmu_steps'; did you mean "
                                   "'num_steps'?"),
    ('--config.trian.num_steps=5', "error: --config.trian.num_steps: no such config key 'trian'"),
    ('--config.train.num_steps=ten', 'error: flag --config.train.num_steps=ten: invalid literal for int()'),
    ('--config.train.base_lr=-1', 'error: train.base_lr must be > 0, got -1.0'),
    ('--config.data.min_sizes=(100,abc)', 'error: data.min_sizes'),
])
def test_bad_command_line_config_is_one_error_line_naming_the_key(tmp_path, override, message):
  """train.py parses its flags with `cli.parse_flags` and runs with `cli.run`."""
  workdir = str(tmp_path / 'run')
  proc = subprocess.run([sys.executable, 'train.py', '--config', rc.TINY, '--workdir', workdir, override],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == cli.EXIT_USAGE, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr and not os.path.exists(workdir)


def test_checkpoint_with_other_shapes_names_the_first_mismatching_parameter(tmp_path, capsys):
  c = _config()
  c.model.num_classes = 3
  _, state = _zero_state(c)
  ckpt = Checkpointer(str(tmp_path / 'checkpoints'))
  ckpt.save(1, state, {'next_index': 1}, c)
  ckpt.wait()
  wider = _config()
  wider.model.num_classes = 3
  wider.model.head.width = 48
  _, template = _zero_state(wider)
  with pytest.raises(ShapeMismatchError) as error:
    ckpt.restore(template)
  text = str(error.value)
  match = re.search(r"at (\['params'\]\S+) the checkpoint has shape (\(.*?\)), the model expects shape (\(.*?\))",
                    text)
  assert match, text
  path, saved, expected = match.groups()
  assert 'head' in path.lower() and '32' in saved and '48' in expected
  # Through the entry point: one line, exit code 2.
  with pytest.raises(SystemExit) as exit_info:
    cli.run(ckpt.restore, template)
  assert exit_info.value.code == cli.EXIT_USAGE
  assert capsys.readouterr().err.startswith(f'error: checkpoint {ckpt.directory} step 1 does not match')
  ckpt.close()


# ------------------------------------------------------------------------------------------ untrusted files

_UNSAFE_CALLS = {'pickle.load', 'pickle.loads', 'pickle.Unpickler', 'cPickle.load', 'dill.load', 'dill.loads',
                 'cloudpickle.load', 'cloudpickle.loads', 'joblib.load', 'marshal.load', 'marshal.loads',
                 'shelve.open', 'yaml.load', 'yaml.unsafe_load', 'eval', 'exec'}


def _call_name(node: ast.Call) -> str:
  f = node.func
  parts = []
  while isinstance(f, ast.Attribute):
    parts.append(f.attr)
    f = f.value
  if isinstance(f, ast.Name):
    parts.append(f.id)
  return '.'.join(reversed(parts))


def test_no_code_path_unpickles_or_evaluates_file_contents():
  """Weights, checkpoints, exports and annotation files are read as arrays (Orbax/tensorstore), JSON and images;
  config files are the only code that runs. Every unpickling or eval call of the library and entry points fails
  this test, except torch.load(weights_only=True) (tensors only, the torchvision converter); np.load must keep
  allow_pickle off."""
  sources = [os.path.join(ROOT, n) for n in ('train.py', 'eval.py', 'predict.py')]
  for base, _, files in os.walk(os.path.join(ROOT, 'retinamask_jax')):
    sources += [os.path.join(base, f) for f in files if f.endswith('.py')]
  found = []
  for path in sources:
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Call):
        name = _call_name(node)
        if name in _UNSAFE_CALLS or name.endswith('.Unpickler'):
          found.append(f'{path}:{node.lineno} {name}')
        if name.endswith('load') and any(k.arg == 'allow_pickle' for k in node.keywords):
          found.append(f'{path}:{node.lineno} {name}(allow_pickle=...)')
        weights_only = [k.value for k in node.keywords if k.arg == 'weights_only']
        if name == 'torch.load' and not (weights_only and isinstance(weights_only[0], ast.Constant)
                                         and weights_only[0].value is True):
          found.append(f'{path}:{node.lineno} torch.load without weights_only=True')
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
        found += [f'{path}:{node.lineno} import {n}' for n in names
                  if n and n.split('.')[0] in ('pickle', 'cPickle', 'dill', 'cloudpickle', 'joblib', 'shelve')]
  assert not found, found


class _Payload:
  """Unpickling this creates a marker file: evidence of code execution."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_pickles_planted_in_checkpoints_and_exports_are_never_executed(tmp_path):
  marker = str(tmp_path / 'pwned')
  payload = pickle.dumps(_Payload(marker))
  c = _config()
  c.model.num_classes = 3
  c.model.category_ids, c.model.class_names = (1, 2, 3), ('a', 'b', 'c')
  model, state = _zero_state(c)
  directory = str(tmp_path / 'run' / 'checkpoints')
  ckpt = Checkpointer(directory)
  ckpt.save(1, state, {'next_index': 1}, c)
  ckpt.close()

  from retinamask_jax.export import Detector

  for planted in ('checkpoint', 'export'):
    target = directory if planted == 'checkpoint' else str(tmp_path / 'export')
    if planted == 'export':
      Detector(model, c, state.variables).export(target)
    files = [os.path.join(b, f) for b, _, fs in os.walk(target) for f in fs]
    assert files
    for path in files:  # every file of it, whatever Orbax or the export reads
      with open(path, 'wb') as f:
        f.write(payload)
    with pytest.raises(Exception):  # noqa: B017  (which error depends on the file read first; any is fine)
      if planted == 'checkpoint':
        Checkpointer(directory).restore(state)
      else:
        Detector.from_checkpoint(target)
    assert not os.path.exists(marker), f'a pickle planted in the {planted} was executed'
  pickle.loads(payload).close()  # the payload is live: unpickled, it does leave the marker
  assert os.path.exists(marker)


# ------------------------------------------------------------------------------------------ soak


@pytest.mark.slow
def test_soak_2000_steps_with_random_kills_nothing_lost_and_no_memory_growth(tmp_path):
  """2,000 steps of the tiny config, SIGKILLed and restarted at random moments; then the RSS of one long
  uninterrupted stretch (> 500 steps), sampled from /proc, may not grow by more than rss_growth_bound_mib (100 MiB)
  from its first 200 steady steps (median, from 100 steps after the restart) to its end (median of the last 10)."""
  rss_growth_bound_mib = 100.0
  env = rc.subprocess_env(str(tmp_path / 'jax_cache'))
  overrides = ('--config.train.num_steps=2000', '--config.train.log_every_steps=1',
               '--config.checkpoint.every_steps=50', '--config.eval.num_prediction_images=0',
               '--config.data.shapes.num_val=4')
  workdir = str(tmp_path / 'soak' / 'run')
  rng = random.Random(2000)
  # Spaced by more than a checkpoint interval, so that lines a killed run logged past its last checkpoint never
  # satisfy the next wait.
  targets = sorted(rng.sample(range(20, 1400, 70), 6))
  for i, target in enumerate(targets):
    proc = rc.start(workdir, overrides, env, f'log{i}.txt')
    seen = rc.wait_for_step(proc, workdir, target, timeout=900)
    assert seen is not None, rc.read_log(workdir, f'log{i}.txt')[-3000:]
    time.sleep(rng.uniform(0.0, 1.0))
    if i % 3:
      assert rc.kill(proc, signal.SIGKILL) == -signal.SIGKILL
    else:  # some preemptions are polite: checkpoint, then exit 128 + 15
      assert rc.kill(proc, signal.SIGTERM) == 128 + signal.SIGTERM, rc.read_log(workdir, f'log{i}.txt')[-3000:]
  proc = rc.start(workdir, overrides, env, 'log_final.txt')
  sampler = rc.RssSampler(proc.pid, workdir)
  assert rc.finish(proc, 1800) == 0, rc.read_log(workdir, 'log_final.txt')[-3000:]
  sampler.stop()

  lines = rc.all_lines(workdir)
  assert [r['step'] for r in lines if r.get('kind') is None] == list(range(1, 2001))
  assert [r['step'] for r in lines if r.get('kind') == 'eval'] == [2000]
  assert all(np.isfinite(r['loss']) for r in lines if r.get('kind') is None)
  _, data = rc.restore_raw(workdir)
  assert data['step'] == 2000

  # Steady state only: the first steps of a process hold compilation and cache-loading peaks.
  resumed_at = min(s for _, s, _ in sampler.samples if s > 0)
  training = [(s, rss) for _, s, rss in sampler.samples if resumed_at + 100 < s < 2000]
  assert len(training) > 40 and training[-1][0] - training[0][0] > 500
  early = float(np.median([rss for s, rss in training if s <= training[0][0] + 200]))
  late = float(np.median([rss for _, rss in training[-10:]]))
  growth = late - early
  print(f'soak: RSS {early:.0f} MiB over steps {training[0][0]}-{training[0][0] + 200}, {late:.0f} MiB at the '
        f'end ({training[-1][0]}); growth {growth:.1f} MiB (bound {rss_growth_bound_mib:.0f})')
  with open(os.path.join(os.path.dirname(workdir), 'rss.json'), 'w') as f:
    json.dump(sampler.samples, f)
  assert growth < rss_growth_bound_mib
