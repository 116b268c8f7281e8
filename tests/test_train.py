"""Training end to end in-process on `configs/tiny.py`: the step learns; a resumed run equals a straight one."""

import dataclasses
import json
import os

import jax
import numpy as np

from configs import tiny
from retinamask_jax.data import coco as coco_lib
from retinamask_jax.data import pipeline, shapes
from retinamask_jax.models import retinamask
from retinamask_jax.train import loop
from retinamask_jax.train import step as step_lib


def _lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _train_lines(workdir):
  return [r for r in _lines(workdir) if r.get('kind') != 'eval']


def test_overfit_two_images_cuts_the_loss_5x(tmp_path):
  """30 SGD steps on one fixed batch of two synthetic images: the total loss (cls + box + mask) drops >= 5x."""
  c = tiny.get_config()
  c.train.num_steps = 30  # the cosine schedule reaches 0 at the last step
  c.data.hflip_prob = 0.0
  json_path, images = shapes.write_shapes_dataset(str(tmp_path), 'train', 8, image_size=(96, 128), seed=3)
  ds = coco_lib.load_coco(json_path, images)
  ds = dataclasses.replace(ds, records=[r for r in ds.records if len(r.boxes) >= 2][:2])
  loop.resolve_classes(c, ds)
  model, init = retinamask.build_model(c)
  state = loop.create_train_state(c, model, init, jax.random.key(0))
  batch = next(pipeline.make_train_iterator(ds, c, global_batch_size=2, num_workers=0))
  batch = {k: batch[k] for k in loop.TRAIN_KEYS}
  train_step = jax.jit(step_lib.make_train_step(model, c))
  losses = []
  for i in range(30):
    state, metrics = train_step(state, batch, jax.random.key(i))
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert losses[0] / np.mean(losses[-3:]) >= 5.0, losses
  assert float(metrics['num_mask_pos']) > 0  # the mask branch trained too


def _tiny_config(num_steps):
  c = tiny.get_config()
  c.data.shapes.num_train = 24
  c.data.shapes.num_val = 4
  c.train.num_steps = num_steps
  c.train.log_every_steps = 1
  c.checkpoint.every_steps = 3
  c.eval.num_prediction_images = 0
  return c


def test_resume_continues_at_the_right_step_with_the_same_data(tmp_path):
  """A run stopped at step 3 and resumed equals an uninterrupted run; lines a crash logged after it are dropped."""
  straight = str(tmp_path / 'straight')
  loop.train_and_evaluate(_tiny_config(6), straight)
  resumed = str(tmp_path / 'resumed')
  loop.train_and_evaluate(_tiny_config(3), resumed)
  # What a crash after the checkpoint leaves behind: steps logged past it, and a torn last line.
  with open(os.path.join(resumed, 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps({'step': 4, 'loss': 123.0}) + '\n{"step": 5, "lo')
  loop.train_and_evaluate(_tiny_config(6), resumed)
  a, b = _train_lines(straight), _train_lines(resumed)
  assert [r['step'] for r in b] == list(range(1, 7))
  np.testing.assert_allclose([r['loss'] for r in b], [r['loss'] for r in a], rtol=1e-5)
  assert [r['canvas'] for r in b] == [r['canvas'] for r in a]
