"""The optimizer against the authors' solver: a numpy re-statement and torch.optim.SGD as references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import requires_torchvision

from configs import base
from retinamask_jax.hparams import HParams
from retinamask_jax.train import optim
from retinamask_jax.train.state import TrainState


def authors_lr(it: int, base_lr: float, warmup_iters: int, warmup_factor: float, steps, gamma: float) -> float:
  """maskrcnn-benchmark WarmupMultiStepLR at iteration `it` (their iterations start at 1)."""
  factor = 1.0
  if it < warmup_iters:
    alpha = it / warmup_iters
    factor = warmup_factor * (1 - alpha) + alpha
  return base_lr * factor * gamma ** sum(1 for s in steps if s <= it)


def small_config(batch_size=8):
  c = base.get_config()
  c.train.batch_size = batch_size
  c.train.warmup_steps = 5
  c.train.lr_steps = (7, 9)
  return c


def test_schedule_matches_authors_warmup_multistep():
  c = small_config(batch_size=8)
  schedule = optim.learning_rate(c)
  peak = c.train.base_lr * 8 / 16  # linear scaling to the global batch
  for count in range(12):
    expected = authors_lr(count + 1, peak, 5, 1 / 3, (7, 9), 0.1)
    np.testing.assert_allclose(float(schedule(count)), expected, rtol=1e-6)


def _params():
  rng = np.random.default_rng(0)
  return {
      'backbone': {'stem': {'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)}}},
      'head': {
          'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 4, 4)), jnp.float32),
                   'bias': jnp.asarray(rng.normal(size=4), jnp.float32)},
          'norm': {'scale': jnp.asarray(rng.normal(size=4), jnp.float32),
                   'bias': jnp.asarray(rng.normal(size=4), jnp.float32)},
      },
  }


def _frozen_mask(params):
  mask = jax.tree.map(lambda _: False, params)
  mask['backbone']['stem']['conv']['kernel'] = True
  return mask


def test_param_groups():
  params = _params()
  labels = optim.param_labels(params, _frozen_mask(params))
  assert labels['backbone']['stem']['conv']['kernel'] == 'frozen'
  assert labels['head']['conv'] == {'kernel': 'weight', 'bias': 'bias'}
  assert labels['head']['norm'] == {'scale': 'norm', 'bias': 'bias'}


def _grads(step):
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), _params())


def _run_ours(config, steps, lr_scale=1.0):
  params = _params()
  tx = optim.make_optimizer(config, params, _frozen_mask(params))
  state = TrainState.create({'params': params}, tx, HParams.create(lr_scale=lr_scale))
  for s in range(steps):
    state = state.apply_gradients(_grads(s), state.loss_stats)
  return state


def _run_numpy(config, steps, lr_scale=1.0, norm_decay=0.0):
  """PyTorch-style SGD written out: v = mu * v + (g + wd * w); w -= lr * factor * v."""
  t = config.train
  peak = t.base_lr * t.batch_size / t.lr_reference_batch
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), _params())
  velocity = jax.tree.map(np.zeros_like, params)
  groups = optim.param_labels(params, _frozen_mask(params))
  for s in range(steps):
    lr = authors_lr(s + 1, peak, t.warmup_steps, t.warmup_factor, t.lr_steps, t.lr_decay) * lr_scale
    grads = jax.tree.map(lambda g: np.asarray(g, np.float64), _grads(s))

    def update(w, g, v, group, lr=lr):
      if group == 'frozen':
        return w, v
      wd = {'weight': t.weight_decay, 'bias': 0.0, 'norm': norm_decay}[group]
      factor = t.bias_lr_factor if group == 'bias' else 1.0
      v = t.momentum * v + (g + wd * w)
      return w - lr * factor * v, v

    out = jax.tree.map(update, params, grads, velocity, groups)
    params = jax.tree.map(lambda o: o[0], out, is_leaf=lambda x: isinstance(x, tuple))
    velocity = jax.tree.map(lambda o: o[1], out, is_leaf=lambda x: isinstance(x, tuple))
  return params


@pytest.mark.parametrize('lr_scale', [1.0, 0.3])
def test_sgd_matches_written_out_reference(lr_scale):
  config = small_config()
  ours = _run_ours(config, 11, lr_scale)
  ref = _run_numpy(config, 11, lr_scale)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=2e-5, atol=1e-6), ours.params, ref)
  # Frozen parameters never move and carry no optimizer state.
  np.testing.assert_array_equal(ours.params['backbone']['stem']['conv']['kernel'],
                                _params()['backbone']['stem']['conv']['kernel'])


def test_lr_scale_is_traced():
  config = small_config()
  params = _params()
  tx = optim.make_optimizer(config, params, _frozen_mask(params))
  apply = jax.jit(lambda state, g: state.apply_gradients(g, state.loss_stats))
  for scale in (1.0, 0.5, 2.0):
    state = TrainState.create({'params': params}, tx, HParams.create(lr_scale=scale))
    apply(state, _grads(0))
  assert apply._cache_size() == 1


@requires_torchvision
@pytest.mark.filterwarnings('ignore:Detected call of')
def test_sgd_matches_torch_optim():
  import torch

  config = small_config()
  t = config.train
  peak = t.base_lr * t.batch_size / t.lr_reference_batch
  flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(_params())[0]}
  labels = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(optim.param_labels(_params(), _frozen_mask(_params())))[0]}
  tensors = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in flat.items()}
  groups = [
      {'params': [tensors[k] for k in flat if labels[k] == 'weight'], 'weight_decay': t.weight_decay, 'lr': peak},
      {'params': [tensors[k] for k in flat if labels[k] == 'bias'], 'weight_decay': 0.0,
       'lr': peak * t.bias_lr_factor},
      {'params': [tensors[k] for k in flat if labels[k] == 'norm'], 'weight_decay': 0.0, 'lr': peak},
  ]
  sgd = torch.optim.SGD(groups, lr=peak, momentum=t.momentum)
  lam = lambda it: authors_lr(it, 1.0, t.warmup_steps, t.warmup_factor, t.lr_steps, t.lr_decay)
  sched = torch.optim.lr_scheduler.LambdaLR(sgd, lam)
  for s in range(11):
    sched.step()  # the authors step the scheduler before each iteration
    grads = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(_grads(s))[0]}
    for k, tensor in tensors.items():
      tensor.grad = torch.tensor(grads[k], dtype=torch.float64)
    sgd.step()
  ours = _run_ours(config, 11)
  for path, value in jax.tree_util.tree_flatten_with_path(ours.params)[0]:
    key = jax.tree_util.keystr(path)
    np.testing.assert_allclose(np.asarray(value), tensors[key].detach().numpy(), rtol=2e-5, atol=1e-6)


def test_cosine_schedule_hand_values():
  c = small_config(batch_size=16)
  c.train.lr_schedule = 'cosine'
  c.train.num_steps = 25
  schedule = optim.learning_rate(c)
  peak = c.train.base_lr
  # Warmup as the authors' over iterations 1..4; from iteration 5 a half cosine over the remaining 20 to 0.
  for count, expected in ((0, peak * (1 / 3 * 0.8 + 0.2)), (4, peak), (14, peak * 0.5), (24, 0.0), (30, 0.0)):
    np.testing.assert_allclose(float(schedule(count)), expected, rtol=1e-6, atol=1e-12)
  c.train.lr_schedule = 'linear'
  with pytest.raises(ValueError, match='lr_schedule'):
    optim.learning_rate(c)


def test_adamw_matches_written_out_reference():
  """Adam moments (b1 0.9, b2 0.999, eps 1e-8, bias-corrected), then decoupled decay, per group, frozen untouched."""
  c = small_config(batch_size=16)
  c.train.optimizer = 'adamw'
  c.train.weight_decay = 0.05
  c.train.weight_decay_norm = 0.0
  params = _params()
  tx = optim.make_optimizer(c, params, _frozen_mask(params))
  opt_state = tx.init(params)
  schedule = optim.learning_rate(c)
  groups = optim.param_labels(params, _frozen_mask(params))
  ref = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  m = jax.tree.map(np.zeros_like, ref)
  v = jax.tree.map(np.zeros_like, ref)
  rng = np.random.default_rng(1)
  for step in range(3):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    lr = float(schedule(step))

    def update(w, g, m_, v_, group, step=step, lr=lr):
      if group == 'frozen':
        return w, m_, v_
      g = np.asarray(g, np.float64)
      m_ = 0.9 * m_ + 0.1 * g
      v_ = 0.999 * v_ + 0.001 * g * g
      u = (m_ / (1 - 0.9 ** (step + 1))) / (np.sqrt(v_ / (1 - 0.999 ** (step + 1))) + 1e-8)
      wd = {'weight': 0.05, 'norm': 0.0, 'bias': 0.0}[group]
      factor = c.train.bias_lr_factor if group == 'bias' else 1.0
      return w - lr * factor * (u + wd * w), m_, v_

    out = jax.tree.map(update, ref, grads, m, v, groups)
    is_triple = lambda x: isinstance(x, tuple)
    ref = jax.tree.map(lambda t: t[0], out, is_leaf=is_triple)
    m = jax.tree.map(lambda t: t[1], out, is_leaf=is_triple)
    v = jax.tree.map(lambda t: t[2], out, is_leaf=is_triple)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6), params, ref)
