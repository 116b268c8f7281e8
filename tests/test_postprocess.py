"""postprocess_detections against a numpy reference with loops, written from spec section 6."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references

from retinamask_jax.ops.postprocess import postprocess_detections

STRIDES = (8, 16, 32)
CANVAS = (64, 64)  # (h, w)


def make_anchors(canvas_hw=CANVAS, strides=STRIDES):
  """Simple anchors, 3 shapes per cell, centred on it: [A, 4] float32 and A per level."""
  anchors, per_level = [], []
  for s in strides:
    level = []
    for y in range(canvas_hw[0] // s):
      for x in range(canvas_hw[1] // s):
        for ratio in (0.5, 1.0, 2.0):  # h / w
          w, h = 4 * s / math.sqrt(ratio), 4 * s * math.sqrt(ratio)
          cx, cy = (x + 0.5) * s, (y + 0.5) * s
          level.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    anchors += level
    per_level.append(len(level))
  return np.array(anchors, np.float32), tuple(per_level)


def sigmoid(x: float) -> float:
  return 1.0 / (1.0 + math.exp(-x))


def clip(v: float, hi: float) -> float:
  return min(max(v, 0.0), hi)


def postprocess_reference(cls_logits, box_deltas, anchors, anchors_per_level, image_size,
                          score_threshold, pre_nms_top_k, nms_iou, max_detections):
  """Spec 6, image by image, float64. Returns per image a list of (score, box, class) by score."""
  cls_logits = np.asarray(cls_logits, np.float64)
  n, _, k = cls_logits.shape
  results = []
  for i in range(n):
    h, w = (float(v) for v in image_size[i])
    candidates = []  # (score, box, class)
    start = 0
    for count in anchors_per_level:
      level = []
      for a in range(start, start + count):
        for c in range(k):
          score = sigmoid(cls_logits[i, a, c])
          if score > score_threshold:
            level.append((score, a, c + 1))
      level.sort(key=lambda t: -t[0])
      for score, a, c in level[:pre_nms_top_k]:
        x1, y1, x2, y2 = references.decode(box_deltas[i, a], anchors[a])
        box = np.array([clip(x1, w), clip(y1, h), clip(x2, w), clip(y2, h)])
        candidates.append((score, box, c))
      start += count
    detections = []
    for c in range(1, k + 1):  # the authors' loop over classes
      of_class = sorted([t for t in candidates if t[2] == c], key=lambda t: -t[0])
      kept = []
      for t in of_class:
        if all(references.box_iou(t[1][None], u[1][None])[0, 0] <= nms_iou for u in kept):
          kept.append(t)
      detections += kept
    detections.sort(key=lambda t: -t[0])
    results.append(detections[:max_detections])
  return results


def random_head_outputs(seed, n=2, k=4, max_score=0.1):
  """Head outputs with well-separated scores (a shuffled grid): float32/float64 orders agree.

  Scores are the midpoints (j + 0.5) * step, j = 0..n*A*K-1, with 0.01 a multiple of step: every
  multiple of 0.01 (the thresholds the tests use) lies half a step from the nearest score.
  """
  rng = np.random.default_rng(seed)
  anchors, per_level = make_anchors()
  a = len(anchors)
  step = 0.01 / math.ceil(0.01 * n * a * k / max_score)  # all scores < max_score
  probs = rng.permutation((np.arange(n * a * k) + 0.5) * step).reshape(n, a, k)
  logits = np.log(probs / (1 - probs)).astype(np.float32)
  deltas = rng.normal(0, 0.5, (n, a, 4)).astype(np.float32)
  return logits, deltas, anchors, per_level


def assert_matches_reference(out, expected, max_detections):
  out = jax.tree.map(np.asarray, out)
  for i, dets in enumerate(expected):
    num = len(dets)
    assert out['boxes'].shape == (len(expected), max_detections, 4)
    np.testing.assert_array_equal(out['valid'][i], np.arange(max_detections) < num)
    np.testing.assert_array_equal(out['classes'][i, :num], [d[2] for d in dets])
    np.testing.assert_allclose(out['scores'][i, :num], [d[0] for d in dets], rtol=1e-5)
    if num:
      np.testing.assert_allclose(out['boxes'][i, :num], np.stack([d[1] for d in dets]), atol=2e-4)
    # Invalid rows are zero.
    assert not np.any(out['boxes'][i, num:]) and not np.any(out['scores'][i, num:])
    assert not np.any(out['classes'][i, num:])


_jitted = jax.jit(postprocess_detections,
                  static_argnames=('anchors_per_level', 'pre_nms_top_k', 'max_detections'))


@pytest.mark.parametrize(('seed', 'pre_nms_top_k', 'max_detections'),
                         [(0, 40, 30), (1, 40, 300), (2, 1000, 50)])
def test_equals_reference(seed, pre_nms_top_k, max_detections):
  logits, deltas, anchors, per_level = random_head_outputs(seed)
  image_size = np.array([[64, 64], [50, 37]], np.int32)  # image 2 is padded: clipping binds
  out = _jitted(logits, deltas, anchors, per_level, image_size,
                score_threshold=jnp.float32(0.05), pre_nms_top_k=pre_nms_top_k,
                nms_iou=jnp.float32(0.4), max_detections=max_detections)
  expected = postprocess_reference(logits, deltas, anchors, per_level, image_size, 0.05,
                                   pre_nms_top_k, 0.4, max_detections)
  assert_matches_reference(out, expected, max_detections)
  # The draw exercises every stage: thresholding leaves fewer than top-k pairs on the coarsest
  # level (12 anchors x 4 classes), top-k binds on the finer ones, NMS removes candidates.
  if pre_nms_top_k == 40:
    above = 1 / (1 + np.exp(-logits.astype(np.float64))) > 0.05
    per_image = lambda lo, hi: above[:, lo:hi].reshape(2, -1).sum(1)
    assert 0 < per_image(-per_level[-1], None).max() < 40
    assert per_image(0, per_level[0]).min() > 40
    starts = np.cumsum((0,) + per_level)
    candidates = sum(np.minimum(per_image(lo, hi), 40) for lo, hi in zip(starts[:-1], starts[1:]))
    num_valid = np.asarray(out['valid']).sum(1)
    if max_detections == 300:  # NMS removes some, max_detections does not bind
      assert np.all(0 < num_valid) and np.all(num_valid < candidates)
    else:  # max_detections binds
      assert np.all(num_valid == max_detections)


def test_one_anchor_can_give_several_classes_and_levels_are_cut_separately():
  anchors = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 40, 40], [40, 40, 60, 60]],
                     np.float32)
  per_level = (2, 2)
  logit = lambda p: math.log(p / (1 - p))
  cls_logits = np.full((1, 4, 3), -10.0, np.float32)
  cls_logits[0, 0] = [logit(0.9), logit(0.8), logit(0.04)]  # anchor 0: classes 1 and 2 pass
  cls_logits[0, 1, 0] = logit(0.7)  # level 0's third pair: cut by top-2, though > level 1's best
  cls_logits[0, 3, 2] = logit(0.3)  # level 1's only candidate
  deltas = np.zeros((1, 4, 4), np.float32)
  out = _jitted(cls_logits, deltas, anchors, per_level, np.array([[100, 100]], np.int32),
                pre_nms_top_k=2, max_detections=5)
  np.testing.assert_array_equal(out['valid'][0], [True, True, True, False, False])
  np.testing.assert_array_equal(out['classes'][0], [1, 2, 3, 0, 0])
  np.testing.assert_allclose(out['scores'][0], [0.9, 0.8, 0.3, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(out['boxes'][0, :3], anchors[[0, 0, 3]], atol=1e-5)


def test_nothing_above_threshold_gives_no_valid_rows():
  logits, deltas, anchors, per_level = random_head_outputs(0, max_score=0.05)
  image_size = np.array([[64, 64]] * 2, np.int32)
  out = _jitted(logits, deltas, anchors, per_level, image_size)
  assert out['boxes'].shape == (2, 100, 4) and out['classes'].dtype == jnp.int32
  assert not np.any(out['valid'])
  assert not np.any(out['boxes']) and not np.any(out['scores']) and not np.any(out['classes'])


def test_traced_thresholds_do_not_recompile_and_are_honoured():
  logits, deltas, anchors, per_level = random_head_outputs(3)
  image_size = np.array([[64, 64], [64, 64]], np.int32)
  fn = jax.jit(functools.partial(postprocess_detections, anchors_per_level=per_level,
                                 pre_nms_top_k=40, max_detections=60))
  for score_threshold, nms_iou in ((0.05, 0.4), (0.08, 0.6)):
    out = fn(logits, deltas, anchors, image_size=image_size,
             score_threshold=jnp.float32(score_threshold), nms_iou=jnp.float32(nms_iou))
    expected = postprocess_reference(logits, deltas, anchors, per_level, image_size,
                                     score_threshold, 40, nms_iou, 60)
    assert_matches_reference(out, expected, 60)
  assert fn._cache_size() == 1


def test_vmap_over_thresholds_and_bfloat16_inputs():
  logits, deltas, anchors, per_level = random_head_outputs(4)
  image_size = np.array([[64, 64], [40, 64]], np.int32)

  @jax.jit
  def run(thr, lg, dl):
    return postprocess_detections(lg, dl, anchors, per_level, image_size, score_threshold=thr,
                                  pre_nms_top_k=40, max_detections=20)

  thresholds = jnp.array([0.05, 0.07, 0.09], jnp.float32)
  batched = jax.vmap(run, in_axes=(0, None, None))(thresholds, logits, deltas)
  for j, thr in enumerate(thresholds):
    single = run(thr, logits, deltas)
    assert np.sum(single['valid']) > 0
    for key in ('valid', 'classes'):
      np.testing.assert_array_equal(batched[key][j], single[key])
    for key in ('scores', 'boxes'):  # batched and single programs may differ in the last bit
      np.testing.assert_allclose(batched[key][j], single[key], rtol=1e-6, atol=1e-5)
  # bfloat16 head outputs are computed in float32: same as feeding their float32 values.
  lg16, dl16 = jnp.asarray(logits, jnp.bfloat16), jnp.asarray(deltas, jnp.bfloat16)
  out16 = run(0.05, lg16, dl16)
  out32 = run(0.05, lg16.astype(jnp.float32), dl16.astype(jnp.float32))
  assert out16['boxes'].dtype == jnp.float32 and out16['scores'].dtype == jnp.float32
  for key in out32:
    np.testing.assert_array_equal(out16[key], out32[key])


def test_score_threshold_is_strict():
  anchors = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
  cls_logits = np.array([[[0.0], [0.01]]], np.float32)  # sigmoid(0) = 0.5 exactly
  out = _jitted(cls_logits, np.zeros((1, 2, 4), np.float32), anchors, (2,),
                np.array([[64, 64]], np.int32), score_threshold=0.5, max_detections=2)
  np.testing.assert_array_equal(out['valid'][0], [True, False])
  np.testing.assert_allclose(out['boxes'][0, 0], anchors[1], atol=1e-5)
