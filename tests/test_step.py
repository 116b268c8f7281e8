"""The jitted loss over the batch contract, and the train step's guard against non-finite steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from retinamask_jax import losses
from retinamask_jax.data import coco as coco_lib
from retinamask_jax.data import pipeline, shapes
from retinamask_jax.models import retinamask
from retinamask_jax.train import loop
from retinamask_jax.train import step as step_lib


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  c = tiny.get_config()
  json_path, images = shapes.write_shapes_dataset(str(tmp_path_factory.mktemp('d')), 'train', 6, image_size=(96, 128),
                                                  seed=5)
  ds = coco_lib.load_coco(json_path, images)
  loop.resolve_classes(c, ds)
  model, init = retinamask.build_model(c)
  variables = init(jax.random.key(0), (128, 128))
  batch = next(pipeline.make_train_iterator(ds, c, global_batch_size=2, num_workers=0))
  return c, model, variables, {k: jnp.asarray(batch[k]) for k in loop.TRAIN_KEYS}


def test_detection_loss_is_the_sum_of_its_parts_and_updates_the_statistics(setup):
  c, model, variables, batch = setup
  detection_loss = step_lib.make_detection_loss(model, c)
  loss, aux, new_stats = detection_loss(variables, batch)
  np.testing.assert_allclose(float(loss), float(aux['cls_loss'] + aux['box_loss'] + aux['mask_loss']), rtol=1e-6)
  assert float(aux['num_pos']) > 0 and np.isfinite(float(loss))
  # Self-adjusting statistics move from their initial value when there are >= 2 positives.
  init_stats = losses.init_loss_stats(c.loss.beta_max)
  assert jax.tree.structure(new_stats) == jax.tree.structure(init_stats)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(init_stats)))
  # The weights are traced knobs: zeroing the mask weight drops exactly the mask term, without recompiling.
  hp = step_lib.HParams.from_config(c).replace(mask_weight=jnp.float32(0.0))
  loss0, aux0, _ = detection_loss(variables, batch, hp)
  np.testing.assert_allclose(float(loss0), float(aux0['cls_loss'] + aux0['box_loss']), rtol=1e-6)
  assert detection_loss._cache_size() == 2  # None and an HParams pytree are two call signatures, nothing more


def test_nonfinite_step_leaves_the_state_unchanged(setup):
  c, model, variables, batch = setup
  state = loop.create_train_state(c, model, lambda rng, canvas: variables, jax.random.key(0))
  train_step = jax.jit(step_lib.make_train_step(model, c))
  bad = dict(batch, image=batch['image'].at[0, 0, 0, 0].set(jnp.nan))
  new_state, metrics = train_step(state, bad, jax.random.key(0))
  assert float(metrics['nonfinite']) == 1.0
  jax.tree.map(np.testing.assert_array_equal, new_state.params, state.params)
  assert int(new_state.step) == int(state.step)
  good_state, metrics = train_step(state, batch, jax.random.key(0))
  assert float(metrics['nonfinite']) == 0.0 and int(good_state.step) == int(state.step) + 1
