"""losses.py vs numpy float64 references written from the spec (2, 3.3, 4, 5.5) and torchvision."""

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
from conftest import requires_torchvision
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from retinamask_jax import losses
from retinamask_jax.hparams import HParams

# -------------------------------------------------------------------------------------- references


def focal_reference(x, t, alpha=0.25, gamma=2.0):
  """Spec 4.1: -a (1-p)^g log p for target 1, -(1-a) p^g log(1-p) for target 0, in float64."""
  x = np.asarray(x, np.float64)
  t = np.asarray(t, np.float64)
  p = 1.0 / (1.0 + np.exp(-x))
  not_p = 1.0 / (1.0 + np.exp(x))
  # log p, log(1 - p) and 1 - p from the logit (spec 4.1 computes log(1 - p) this way): 1 - p and
  # log(p) of p ~ 1 - 1e-12 would lose 4 digits even in float64.
  log_p = -np.logaddexp(0.0, -x)
  log_not_p = -np.logaddexp(0.0, x)
  pos = -alpha * not_p**gamma * log_p
  neg = -(1.0 - alpha) * p**gamma * log_not_p
  return np.where(t == 1, pos, neg)


def smooth_l1_reference(d, beta):
  out = np.zeros(np.broadcast(d, beta).shape)
  d, beta = np.broadcast_arrays(np.abs(np.asarray(d, np.float64)), np.asarray(beta, np.float64))
  for i in np.ndindex(d.shape):
    out[i] = 0.5 * d[i] ** 2 / beta[i] if d[i] < beta[i] else d[i] - 0.5 * beta[i]
  return out


def stats_step_reference(mean, var, abs_err, weights, momentum=0.1):
  """Spec 2 step 2: unbiased variance over the positive rows; no update with fewer than 2 rows."""
  rows = np.asarray(abs_err, np.float64)[np.asarray(weights) > 0]
  if len(rows) < 2:
    return mean.copy(), var.copy()
  batch_mean = np.array([sum(rows[:, c]) / len(rows) for c in range(4)])
  batch_var = np.array([sum((rows[:, c] - batch_mean[c]) ** 2) / (len(rows) - 1) for c in range(4)])
  return (1 - momentum) * mean + momentum * batch_mean, (1 - momentum) * var + momentum * batch_var


def beta_reference(mean, var, beta_max):
  return np.array([min(max(m - v, 1e-3), beta_max) for m, v in zip(mean, var)])


def match_reference(anchors, gt, valid, pos, neg, thr):
  """Spec 3.3 (see tests/test_matching.py for the property tests of the JAX matcher)."""
  idx = [g for g in range(len(gt)) if valid[g]]
  matched = np.zeros(len(anchors), np.int64)
  labels = np.zeros(len(anchors), np.int64)
  if not idx:
    return matched, labels
  iou = references.box_iou(anchors, gt[idx])
  for a in range(len(anchors)):
    j = int(np.argmax(iou[a]))  # first max
    matched[a] = idx[j]
    labels[a] = 0 if iou[a, j] < neg else (-1 if iou[a, j] < pos else 1)
  if thr is not None:
    for j in range(len(idx)):
      q = iou[:, j].max()
      if q > 0 and q >= thr:
        labels[iou[:, j] == q] = 1
  return matched, labels


def detection_loss_reference(logits, deltas, anchors, gt_boxes, gt_classes, hp, stats, adjusting):
  """Spec 3.3 + 4 + 2 for a batch, plain loops in float64."""
  n, a_total, k = logits.shape
  cls_sum, box_sum, num_pos = 0.0, 0.0, 0
  pos_err = []
  box_terms = []
  for i in range(n):
    matched, labels = match_reference(
        anchors, gt_boxes[i], gt_classes[i] > 0, hp['positive_iou'], hp['negative_iou'], hp['thr']
    )
    for a in range(a_total):
      if labels[a] < 0:
        continue
      for c in range(k):
        t = 1.0 if (labels[a] == 1 and gt_classes[i, matched[a]] == c + 1) else 0.0
        cls_sum += float(focal_reference(logits[i, a, c], t, hp['alpha'], hp['gamma']))
      if labels[a] == 1:
        num_pos += 1
        target = references.encode(gt_boxes[i, matched[a]], anchors[a])
        diff = np.asarray(deltas[i, a], np.float64) - target
        pos_err.append(np.abs(diff))
        box_terms.append(diff)
  mean, var = np.array(stats[0], np.float64), np.array(stats[1], np.float64)
  if adjusting:
    err = np.array(pos_err).reshape(-1, 4)
    mean, var = stats_step_reference(mean, var, err, np.ones(len(err)))
    beta = beta_reference(mean, var, hp['beta_max'])
  else:
    beta = np.full(4, hp['beta'])
  for diff in box_terms:
    box_sum += float(np.sum(smooth_l1_reference(diff, beta)))
  return {
      'cls': cls_sum / (num_pos + n),
      'box': box_sum / (4 * max(num_pos, 1)),
      'num_pos': num_pos,
      'beta': beta,
      'mean': mean,
      'var': var,
  }


# -------------------------------------------------------------------------------------- focal loss

# One shape: one compilation for all examples.
_logits = hnp.arrays(np.float32, (16,), elements=st.floats(-30, 30, width=32))


_focal = jax.jit(losses.sigmoid_focal_loss)
_ALPHA_GAMMA = st.sampled_from([(0.25, 2.0), (0.5, 0.0), (0.75, 1.0), (0.25, 0.5), (0.1, 3.0)])


@given(_logits, st.data(), _ALPHA_GAMMA)
def test_focal_matches_spec_reference(x, data, alpha_gamma):
  t = data.draw(hnp.arrays(np.int32, x.shape, elements=st.integers(0, 1)))
  alpha, gamma = alpha_gamma
  got = np.asarray(_focal(x, t, alpha, gamma))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, focal_reference(x, t, alpha, gamma), rtol=3e-5, atol=1e-30)


@requires_torchvision
def test_focal_matches_torchvision():
  import torch
  from torchvision.ops import sigmoid_focal_loss as tv_focal

  rng = np.random.default_rng(0)
  x = (rng.normal(size=(6, 7)) * 4).astype(np.float32)
  t = (rng.uniform(size=(6, 7)) < 0.3).astype(np.float32)
  for alpha, gamma in [(0.25, 2.0), (0.5, 1.0), (-1.0, 2.0)]:
    want = tv_focal(
        torch.from_numpy(x), torch.from_numpy(t), alpha=alpha, gamma=gamma, reduction='none'
    ).numpy()
    got = np.asarray(losses.sigmoid_focal_loss(x, t, alpha, gamma))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def test_focal_gradient_matches_finite_differences_of_reference():
  x = np.array([-12.0, -3.0, -0.5, 0.0, 0.7, 2.5, 9.0, -4.0, 1.5], np.float32)
  t = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1], np.float32)
  for alpha, gamma in [(0.25, 2.0), (0.25, 0.5), (0.4, 0.0)]:
    loss = lambda v, a=alpha, g=gamma: jnp.sum(losses.sigmoid_focal_loss(v, t, a, g))
    got = np.asarray(jax.grad(loss)(x))
    eps = 1e-5
    xd = x.astype(np.float64)
    fd = focal_reference(xd + eps, t, alpha, gamma) - focal_reference(xd - eps, t, alpha, gamma)
    fd /= 2 * eps
    np.testing.assert_allclose(got, fd, rtol=1e-4, atol=1e-7)


def test_focal_is_stable_at_extreme_logits_bf16_and_traced_knobs():
  x = jnp.array([-1e4, -100.0, 100.0, 1e4, -100.0, 100.0], jnp.bfloat16)
  t = jnp.array([0, 0, 0, 0, 1, 1])

  @jax.jit
  def f(x, alpha, gamma):
    return losses.sigmoid_focal_loss(x, t, alpha, gamma)

  for gamma in (0.0, 0.5, 2.0):
    out = f(x, jnp.float32(0.25), jnp.float32(gamma))
    assert out.dtype == jnp.float32
    loss = lambda v, g=gamma: jnp.sum(f(v, jnp.float32(0.25), jnp.float32(g)))
    g = jax.grad(loss)(x.astype(jnp.float32))
    assert np.all(np.isfinite(np.asarray(out))) and np.all(np.isfinite(np.asarray(g)))
    # Confident right answers cost ~0, confident wrong ones alpha_t * |x| (log-sigmoid, no clamp).
    np.testing.assert_allclose(np.asarray(out)[[0, 1, 5]], 0.0, atol=1e-30)
    np.testing.assert_allclose(np.asarray(out)[2], 0.75 * 100.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out)[4], 0.25 * 100.0, rtol=1e-6)


# --------------------------------------------------------------------------------------- smooth L1


@given(
    hnp.arrays(np.float32, (5, 4), elements=st.floats(-2, 2, width=32)),
    hnp.arrays(np.float32, (4,), elements=st.floats(float(np.float32(1e-3)), 1.0, width=32)),
)
def test_smooth_l1_matches_reference(diff, beta):
  got = np.asarray(losses.smooth_l1_loss(diff, beta))
  np.testing.assert_allclose(got, smooth_l1_reference(diff, beta), rtol=1e-6, atol=1e-7)
  got = np.asarray(losses.smooth_l1_loss(diff, 0.11))
  np.testing.assert_allclose(got, smooth_l1_reference(diff, 0.11), rtol=1e-6, atol=1e-7)


def test_smooth_l1_beta_zero_is_l1_with_finite_gradient():
  d = jnp.array([-1.0, 0.0, 0.5])
  np.testing.assert_allclose(np.asarray(losses.smooth_l1_loss(d, 0.0)), [1.0, 0.0, 0.5])
  g = np.asarray(jax.grad(lambda v: jnp.sum(losses.smooth_l1_loss(v, 0.0)))(d))
  assert np.all(np.isfinite(g))  # at 0 any subgradient in [-1, 1] is fine
  np.testing.assert_array_equal(g[[0, 2]], [-1.0, 1.0])


# ------------------------------------------------------------------------ self-adjusting smooth L1


def test_init_loss_stats():
  s = losses.init_loss_stats(0.11)
  np.testing.assert_allclose(np.asarray(s['box']['mean']), [0.11] * 4)
  np.testing.assert_array_equal(np.asarray(s['box']['var']), [0.0] * 4)
  np.testing.assert_allclose(np.asarray(losses.self_adjusting_beta(s, 0.11)), [0.11] * 4)


@pytest.mark.parametrize('beta_max,scale', [(0.11, 0.2), (1.0, 1.5), (0.11, 3.0)])
def test_running_statistics_and_beta_over_5_steps_equal_reference(beta_max, scale):
  """The issue's check: stats and beta over 5 steps, including 0 and 1 positives (no update)."""
  rng = np.random.default_rng(1)
  num_rows = 12
  positives = [6, 0, 1, 9, 2]
  mean, var = np.full(4, beta_max), np.zeros(4)
  stats = losses.init_loss_stats(beta_max)
  step = jax.jit(
      lambda s, e, w: (lambda new: (new, losses.self_adjusting_beta(new, beta_max)))(
          losses.update_loss_stats(s, e, w, momentum=0.1)
      )
  )
  betas = []
  for count in positives:
    err = rng.uniform(size=(num_rows, 4)) * scale * np.array([1.0, 0.5, 2.0, 1.5])
    err = err.astype(np.float32)
    w = np.zeros(num_rows, np.float32)
    w[rng.choice(num_rows, count, replace=False)] = 1.0
    old = jax.tree.map(np.asarray, stats)
    stats, beta = step(stats, err, w)
    mean, var = stats_step_reference(mean, var, err, w)
    np.testing.assert_allclose(np.asarray(stats['box']['mean']), mean, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(stats['box']['var']), var, rtol=2e-5, atol=1e-8)
    want_beta = beta_reference(mean, var, beta_max)
    np.testing.assert_allclose(np.asarray(beta), want_beta, rtol=2e-5, atol=1e-7)
    if count < 2:  # must not move at all
      np.testing.assert_array_equal(np.asarray(stats['box']['mean']), old['box']['mean'])
      np.testing.assert_array_equal(np.asarray(stats['box']['var']), old['box']['var'])
    betas.append(np.asarray(beta))
  # The sequence really adapts (a test that cannot fail is worse than none).
  assert not np.allclose(betas[0], betas[-1])


def test_self_adjusting_gradient_equals_plain_smooth_l1_at_the_same_beta():
  rng = np.random.default_rng(2)
  pred = jnp.asarray(rng.normal(size=(10, 4)) * 0.2, jnp.float32)
  target = jnp.asarray(rng.normal(size=(10, 4)) * 0.2, jnp.float32)
  w = jnp.asarray([1, 1, 0, 1, 1, 0, 1, 1, 1, 0], jnp.float32)
  stats = _stats([0.15, 0.2, 0.1, 0.3], [0.01, 0.02, 0.05, 0.1])
  beta_max = 0.5

  def adjusting(p):
    d = p - target
    new = losses.update_loss_stats(stats, jnp.abs(d), w)
    beta = losses.self_adjusting_beta(new, beta_max)
    return jnp.sum(w[:, None] * losses.smooth_l1_loss(d, beta)), beta

  (_, beta), g_adj = jax.value_and_grad(adjusting, has_aux=True)(pred)
  g_plain = jax.grad(lambda p: jnp.sum(w[:, None] * losses.smooth_l1_loss(p - target, beta)))(pred)
  np.testing.assert_array_equal(np.asarray(g_adj), np.asarray(g_plain))
  # The betas differ per coordinate and errors fall on both sides of them: the check has teeth.
  assert len(set(np.asarray(beta).tolist())) > 1
  d = np.abs(np.asarray(pred - target))
  assert np.any(d < np.asarray(beta)) and np.any(d > np.asarray(beta))


# ---------------------------------------------------------------------------------- detection loss


def _case(seed=0, num_anchors=24, k=3, dtype=np.float32):
  """3 images: 2 GT + a padded row with a real-looking box; no GT at all; 3 GT. Few anchors."""
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, 48, (num_anchors, 2))
  wh = rng.uniform(6, 24, (num_anchors, 2))
  anchors = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  gt = np.zeros((3, 3, 4), np.float32)
  cls = np.zeros((3, 3), np.int32)

  def near(a):  # a GT jittered around an anchor, so there are positives and ignores
    box = anchors[a] + rng.uniform(-3, 3, 4)
    return np.array([box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1)], np.float32)

  gt[0, 0], gt[0, 1], cls[0, :2] = near(1), near(7), [1, 3]
  gt[0, 2] = near(3)  # padded row (class 0) with a box that would match: must be ignored
  gt[1, 1] = near(5)  # image 1: padding only
  gt[2] = [near(10), near(11), [30, 2, 33, 60]]  # the last is tall and thin: only best-matched
  cls[2] = [2, 2, 1]
  logits = (rng.normal(size=(3, num_anchors, k)) * 2).astype(dtype)
  deltas = (rng.normal(size=(3, num_anchors, 4)) * 0.3).astype(dtype)
  return logits, deltas, anchors, gt, cls


def _stats(mean, var):
  return {'box': {'mean': jnp.array(mean, jnp.float32), 'var': jnp.array(var, jnp.float32)}}


_HP = dict(positive_iou=0.5, negative_iou=0.4, alpha=0.25, gamma=2.0, beta=0.11, beta_max=0.11)


@pytest.mark.parametrize(
    'self_adjusting,thr,beta_max',
    [(True, 0.0, 0.11), (False, 0.0, 0.11), (True, None, 0.5), (False, 0.3, 0.11)],
)
def test_detection_loss_matches_reference(self_adjusting, thr, beta_max):
  logits, deltas, anchors, gt, cls = _case()
  beta = 0.2 if thr else 0.11
  hp = HParams.create(
      best_match_threshold=math.inf if thr is None else thr, beta_max=beta_max, beta=beta
  )
  stats = _stats([0.3, 0.2, 0.5, 0.4], [0.05, 0.0, 0.2, 0.1])
  fn = jax.jit(
      lambda c, b, s, h: losses.detection_loss(
          c, b, anchors, gt, cls, h, s, self_adjusting=self_adjusting
      )
  )
  out, new_stats = fn(logits, deltas, stats, hp)
  ref = detection_loss_reference(
      logits, deltas, anchors, gt, cls,
      dict(_HP, thr=thr, beta_max=beta_max, beta=beta),
      (np.asarray(stats['box']['mean']), np.asarray(stats['box']['var'])),
      self_adjusting,
  )  # fmt: skip
  assert ref['num_pos'] >= 4  # the case exercises positives in two images
  assert float(out['num_pos']) == ref['num_pos']
  np.testing.assert_allclose(float(out['cls']), ref['cls'], rtol=1e-5)
  np.testing.assert_allclose(float(out['box']), ref['box'], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out['beta']), ref['beta'], rtol=1e-5)
  assert all(v.dtype == jnp.float32 for v in out.values())
  if self_adjusting:
    np.testing.assert_allclose(np.asarray(new_stats['box']['mean']), ref['mean'], rtol=1e-5)
    new_var = np.asarray(new_stats['box']['var'])
    np.testing.assert_allclose(new_var, ref['var'], rtol=1e-5, atol=1e-8)
  else:  # returned unchanged
    jax.tree.map(np.testing.assert_array_equal, new_stats, stats)


def test_detection_loss_vmaps_over_stacked_hparams():
  """An ablation sweep as one program: vmap over HParams equals separate calls."""
  logits, deltas, anchors, gt, cls = _case(seed=8)
  settings = [dict(best_match_threshold=0.0), dict(best_match_threshold=math.inf, beta_max=0.5)]
  hps = [HParams.create(**s) for s in settings]
  stacked = jax.tree.map(lambda *v: jnp.stack(v), *hps)
  stats = losses.init_loss_stats(0.11)

  def one(hp):
    return losses.detection_loss(logits, deltas, anchors, gt, cls, hp, stats, self_adjusting=True)

  swept, swept_stats = jax.jit(jax.vmap(one))(stacked)
  for i, hp in enumerate(hps):
    out, new = jax.jit(one)(hp)
    for key in out:
      np.testing.assert_allclose(np.asarray(swept[key][i]), np.asarray(out[key]), rtol=1e-6)
    swept_var = np.asarray(swept_stats['box']['var'][i])
    np.testing.assert_allclose(swept_var, np.asarray(new['box']['var']), rtol=1e-6)
  assert float(swept['num_pos'][0]) > float(swept['num_pos'][1])  # best matching adds positives


def test_detection_loss_image_without_gt_is_all_negative_and_counts_in_normalizer():
  logits, deltas, anchors, gt, cls = _case(seed=3)
  hp = HParams.create()
  stats = losses.init_loss_stats(0.11)
  loss = jax.jit(
      lambda d: losses.detection_loss(
          logits[1:2], d, anchors, gt[1:2], cls[1:2], hp, stats, self_adjusting=True
      )
  )
  out, new = loss(deltas[1:2])
  assert float(out['num_pos']) == 0.0
  # Every anchor x class is a negative; the normalizer is num_pos + N = 1.
  want = focal_reference(logits[1], np.zeros_like(logits[1])).sum() / 1.0
  np.testing.assert_allclose(float(out['cls']), want, rtol=1e-5)
  assert float(out['box']) == 0.0
  # No positives: the statistics do not move and the box gradient is zero, not NaN.
  np.testing.assert_array_equal(np.asarray(new['box']['mean']), np.asarray(stats['box']['mean']))
  g = jax.grad(lambda d: loss(d)[0]['box'])(jnp.asarray(deltas[1:2]))
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_detection_loss_bfloat16_inputs():
  logits, deltas, anchors, gt, cls = _case(seed=4)
  lb, db = jnp.asarray(logits, jnp.bfloat16), jnp.asarray(deltas, jnp.bfloat16)
  hp = HParams.create()
  stats = losses.init_loss_stats(0.11)
  fn = jax.jit(
      lambda c, d: losses.detection_loss(c, d, anchors, gt, cls, hp, stats, self_adjusting=True)
  )
  out, _ = fn(lb, db)
  ref = detection_loss_reference(
      np.asarray(lb.astype(jnp.float32)), np.asarray(db.astype(jnp.float32)), anchors, gt, cls,
      dict(_HP, thr=0.0), (np.full(4, 0.11), np.zeros(4)), True,
  )  # fmt: skip
  assert out['cls'].dtype == jnp.float32
  np.testing.assert_allclose(float(out['cls']), ref['cls'], rtol=1e-5)
  np.testing.assert_allclose(float(out['box']), ref['box'], rtol=1e-5)


def test_detection_loss_self_adjusting_gradient_equals_fixed_beta_gradient():
  logits, deltas, anchors, gt, cls = _case(seed=5)
  stats = _stats([0.3, 0.2, 0.5, 0.4], [0.05, 0.0, 0.2, 0.1])
  hp = HParams.create(beta_max=0.3)

  def total(c, d, h, adjusting):
    out, _ = losses.detection_loss(c, d, anchors, gt, cls, h, stats, self_adjusting=adjusting)
    return out['cls'] + out['box'], out['beta']

  grad = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True), static_argnums=3)
  (_, beta), g_adj = grad(logits, deltas, hp, True)
  (_, beta_fixed), g_fix = grad(logits, deltas, hp.replace(beta=beta), False)
  np.testing.assert_array_equal(np.asarray(beta), np.asarray(beta_fixed))
  assert len(set(np.asarray(beta).tolist())) > 1
  for a, b in zip(g_adj, g_fix):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
  assert np.abs(np.asarray(g_adj[1])).sum() > 0


# --------------------------------------------------------------------------------------- mask loss


def mask_loss_reference(x, t, positive):
  x = np.asarray(x, np.float64)
  total, count = 0.0, 0
  for i, r in zip(*np.nonzero(positive)):
    p = 1 / (1 + np.exp(-x[i, r]))
    total += float(np.sum(-(t[i, r] * np.log(p) + (1 - t[i, r]) * np.log(1 - p))))
    count += x.shape[-1] * x.shape[-2]
  return total / count if count else 0.0


def test_mask_loss_matches_reference():
  rng = np.random.default_rng(6)
  x = (rng.normal(size=(2, 5, 4, 4)) * 3).astype(np.float32)
  t = (rng.uniform(size=(2, 5, 4, 4)) < 0.5).astype(np.uint8)
  positive = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], bool)
  got = float(jax.jit(losses.mask_loss)(x, t, positive))
  np.testing.assert_allclose(got, mask_loss_reference(x, t, positive), rtol=1e-5)
  got_bf16 = float(losses.mask_loss(jnp.asarray(x, jnp.bfloat16), t, positive))
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(got_bf16, mask_loss_reference(xb, t, positive), rtol=1e-5)


def test_mask_loss_without_positives_is_zero_with_zero_gradient():
  x = jnp.ones((2, 3, 4, 4)) * 50.0
  t = jnp.zeros((2, 3, 4, 4))
  positive = jnp.zeros((2, 3), bool)
  value, g = jax.value_and_grad(lambda v: losses.mask_loss(v, t, positive))(x)
  assert float(value) == 0.0
  np.testing.assert_array_equal(np.asarray(g), 0.0)


# ---------------------------------------------------------------------------- pmap share semantics

_PMAP_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
    os.environ['JAX_PLATFORMS'] = 'cpu'
    import sys
    sys.path[:0] = [{root!r}]
    import jax, jax.numpy as jnp, numpy as np
    from retinamask_jax import losses
    from retinamask_jax.hparams import HParams
    assert jax.device_count() == 2, jax.devices()

    case = np.load({case!r})
    logits, deltas, anchors, gt, cls, mx, mt, mp = (
        case[k] for k in ('logits', 'deltas', 'anchors', 'gt', 'cls', 'mx', 'mt', 'mp'))
    hp = HParams.create(beta_max=0.3)
    mean, var = jnp.array([0.3, 0.2, 0.5, 0.4]), jnp.array([0.05, 0.0, 0.2, 0.1])
    stats = {{'box': {{'mean': mean, 'var': var}}}}

    def total(c, d, g, k, x, t, p, axis_name):
      out, new = losses.detection_loss(
          c, d, anchors, g, k, hp, stats, self_adjusting=True, axis_name=axis_name)
      m = losses.mask_loss(x, t, p, axis_name=axis_name)
      return out['cls'] + out['box'] + m, (out, new, m)

    grad = jax.value_and_grad(total, argnums=(0, 1, 4), has_aux=True)
    (v_glob, (o_glob, s_glob, m_glob)), g_glob = jax.jit(lambda *a: grad(*a, None))(
        logits, deltas, gt, cls, mx, mt, mp)
    split = lambda a: a.reshape((2, a.shape[0] // 2) + a.shape[1:])
    (v_dev, (o_dev, s_dev, m_dev)), g_dev = jax.pmap(lambda *a: grad(*a, 'data'), axis_name='data')(
        *map(split, (logits, deltas, gt, cls, mx, mt, mp)))

    def close(a, b):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)

    close(v_dev.sum(), v_glob)                      # global loss = psum of the shares
    close(o_dev['cls'].sum(), o_glob['cls'])
    close(o_dev['box'].sum(), o_glob['box'])
    close(m_dev.sum(), m_glob)
    close(o_dev['num_pos'].sum(), o_glob['num_pos'])  # local counts
    assert float(o_dev['num_pos'][0]) > 0 and float(o_dev['num_pos'][1]) > 0
    for d in range(2):                               # global statistics, identical on each device
      close(o_dev['beta'][d], o_glob['beta'])
      close(s_dev['box']['mean'][d], s_glob['box']['mean'])
      close(s_dev['box']['var'][d], s_glob['box']['var'])
    for a, b in zip(g_dev, g_glob):                  # per-device gradients = global gradient slices
      close(np.asarray(a).reshape(b.shape), b)
    print('PMAP-OK')
    """
)


def test_pmap_shares_sum_to_the_global_loss_and_gradient(tmp_path):
  # 4 images: per device [image with 2 GT, image with no GT] and [no GT, 3 GT].
  logits, deltas, anchors, gt, cls = _case(seed=7)
  order = [0, 1, 1, 2]
  rng = np.random.default_rng(0)
  np.savez(
      tmp_path / 'case.npz',
      logits=logits[order],
      deltas=deltas[order],
      anchors=anchors,
      gt=gt[order],
      cls=cls[order],
      mx=rng.normal(size=(4, 3, 4, 4)).astype(np.float32),
      mt=(rng.uniform(size=(4, 3, 4, 4)) < 0.5).astype(np.float32),
      mp=np.array([[1, 0, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1]], bool),
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = _PMAP_SCRIPT.format(root=root, case=str(tmp_path / 'case.npz'))
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  proc = subprocess.run(
      [sys.executable, '-c', script],
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
      check=False,
  )
  report = proc.stdout[-3000:] + proc.stderr[-5000:]
  assert proc.returncode == 0 and 'PMAP-OK' in proc.stdout, report
