"""batched_nms against a plain greedy numpy reference, hand-worked cases and torchvision."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
from conftest import requires_torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from retinamask_jax.ops.nms import batched_nms


def greedy_nms_reference(boxes, scores, classes, iou_threshold, max_output, valid=None):
  """Greedy class-wise NMS written from the definition, float64, one box at a time.

  Visit candidates by score, highest first (equal scores: lower index first); keep a candidate
  unless a kept box of the same class overlaps it with IoU > iou_threshold; stop at max_output.
  Candidates with score -inf or NaN, or valid False, are never visited.
  Returns a list of max_output indices padded with -1.
  """
  boxes = np.asarray(boxes, np.float64)
  scores = np.asarray(scores, np.float64)
  iou = references.box_iou(boxes, boxes)
  candidates = [
      i for i in range(len(scores))
      if not math.isnan(scores[i]) and scores[i] != -math.inf and (valid is None or valid[i])
  ]
  candidates.sort(key=lambda i: (-scores[i], i))
  kept = []
  for i in candidates:
    if len(kept) == max_output:
      break
    if all(not (classes[j] == classes[i] and iou[j, i] > iou_threshold) for j in kept):
      kept.append(i)
  return kept + [-1] * (max_output - len(kept))


@functools.partial(jax.jit, static_argnames=('max_output', 'tile_size'))
def _nms(boxes, scores, classes, iou_threshold, valid, max_output, tile_size):
  return batched_nms(boxes, scores, classes, iou_threshold, max_output, valid, tile_size=tile_size)


def _run(boxes, scores, classes, iou_threshold, max_output, valid=None, tile_size=256):
  """Jitted, with a traced threshold and always a valid mask, so examples share compilations."""
  if valid is None:
    valid = np.ones(len(scores), bool)
  out = _nms(
      jnp.asarray(boxes, jnp.float32), jnp.asarray(scores, jnp.float32),
      jnp.asarray(classes, jnp.int32), jnp.float32(iou_threshold), jnp.asarray(valid),
      max_output=max_output, tile_size=tile_size)
  return np.asarray(out)


# ------------------------------------------------------------------------------ hand-worked cases


def test_greedy_chain_keeps_box_whose_suppressor_was_suppressed():
  # A suppresses B (IoU 0.6); B would suppress C (IoU 0.6) but is itself gone, so greedy keeps C.
  # A and C overlap less (IoU 1/3). A "suppressed by any better box" shortcut would drop C.
  boxes = np.array([[0, 0, 10, 10], [2.5, 0, 12.5, 10], [5, 0, 15, 10]], np.float32)
  iou = references.box_iou(boxes, boxes)
  assert iou[0, 1] == pytest.approx(0.6) and iou[1, 2] == pytest.approx(0.6)
  assert iou[0, 2] == pytest.approx(1 / 3)
  scores = np.array([0.9, 0.8, 0.7], np.float32)
  for tile_size in (1, 2, 3, 256):
    out = _run(boxes, scores, [1, 1, 1], 0.5, 4, tile_size=tile_size)
    np.testing.assert_array_equal(out, [0, 2, -1, -1])
  # Inputs reversed: the scores decide the order, indices refer to the inputs.
  out = _run(boxes[::-1], scores[::-1], [1, 1, 1], 0.5, 3)
  np.testing.assert_array_equal(out, [2, 0, -1])


def test_classes_do_not_suppress_each_other():
  boxes = np.array([[0, 0, 10, 10]] * 3, np.float32)
  out = _run(boxes, [0.5, 0.9, 0.7], [2, 1, 2], 0.5, 4)
  np.testing.assert_array_equal(out, [1, 2, -1, -1])


def test_iou_equal_to_threshold_does_not_suppress():
  # inter 2 x 1 = 2, union 3 + 3 - 2 = 4: IoU exactly 0.5.
  boxes = np.array([[0, 0, 3, 1], [1, 0, 4, 1]], np.float32)
  assert references.box_iou(boxes, boxes)[0, 1] == 0.5
  np.testing.assert_array_equal(_run(boxes, [0.9, 0.8], [1, 1], 0.5, 2), [0, 1])
  np.testing.assert_array_equal(_run(boxes, [0.9, 0.8], [1, 1], 0.4999, 2), [0, -1])
  # Threshold 1 never suppresses (IoU <= 1), not even identical boxes; 0 suppresses any overlap.
  same = np.array([[0, 0, 3, 1]] * 2, np.float32)
  np.testing.assert_array_equal(_run(same, [0.9, 0.8], [1, 1], 1.0, 2), [0, 1])
  touching = np.array([[0, 0, 3, 1], [3, 0, 4, 1], [2.9, 0, 4, 1]], np.float32)
  np.testing.assert_array_equal(_run(touching, [0.9, 0.8, 0.7], [1, 1, 1], 0.0, 3), [0, 1, -1])
  # A negative threshold suppresses every later box of the class: the best box per class is left.
  np.testing.assert_array_equal(_run(touching, [0.8, 0.9, 0.7], [1, 2, 1], -0.5, 3), [1, 0, -1])


def test_invalid_entries_are_never_selected_and_suppress_nothing():
  boxes = np.array([[0, 0, 10, 10]] * 5, np.float32)
  scores = np.array([np.inf, -np.inf, np.nan, 0.5, 0.3], np.float32)
  one_class = [1, 1, 1, 1, 1]
  # +inf is a valid (best) score; -inf and NaN are never selected.
  np.testing.assert_array_equal(_run(boxes, scores, one_class, 0.5, 3), [0, -1, -1])
  # A valid=False box is never selected and suppresses nothing.
  valid = np.array([False, True, True, True, True])
  np.testing.assert_array_equal(_run(boxes, scores, one_class, 0.5, 3, valid), [3, -1, -1])
  out = _run(boxes, scores, [1, 2, 3, 4, 5], 0.5, 5, valid)
  np.testing.assert_array_equal(out, [3, 4, -1, -1, -1])


def test_ties_lower_index_first_and_signed_zero_is_a_tie():
  boxes = np.array([[0, 0, 1, 1], [5, 5, 6, 6], [0, 0, 1, 1], [9, 9, 10, 10]], np.float32)
  # Box 2 (score -0.0) ties with box 0 (0.0) and comes later, so box 0 suppresses it.
  out = _run(boxes, [0.0, 0.5, -0.0, 0.0], [1, 1, 1, 1], 0.5, 4)
  np.testing.assert_array_equal(out, [1, 0, 3, -1])
  out = _run(boxes, [-0.0, 0.5, 0.0, 0.0], [1, 1, 1, 1], 0.5, 4)
  np.testing.assert_array_equal(out, [1, 0, 3, -1])


def test_output_shape_dtype_and_degenerate_sizes():
  boxes = np.array([[0, 0, 2, 2], [10, 10, 12, 12]], np.float32)
  out = batched_nms(boxes, np.array([0.1, 0.2], np.float32), np.array([1, 1]), 0.5, 7)
  assert out.shape == (7,) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out, [1, 0, -1, -1, -1, -1, -1])
  no_boxes = np.zeros((0, 4), np.float32)
  empty = batched_nms(no_boxes, np.zeros((0,), np.float32), np.zeros((0,), np.int32), 0.5, 3)
  np.testing.assert_array_equal(empty, [-1, -1, -1])
  assert batched_nms(boxes, np.array([0.1, 0.2]), np.array([1, 1]), 0.5, 0).shape == (0,)
  # bfloat16 inputs are computed in float32.
  out = batched_nms(
      jnp.asarray(boxes, jnp.bfloat16), jnp.asarray([0.1, 0.2], jnp.bfloat16), jnp.array([1, 1]),
      0.5, 2)
  np.testing.assert_array_equal(out, [1, 0])


# ------------------------------------------------------------------------------ random sets


@st.composite
def nms_problems(draw, nonnegative=False, allow_invalid=True):
  """Clustered boxes on an integer grid (exact float32 IoU), score ties, zero-area boxes."""
  m = draw(st.sampled_from([1, 6, 33, 64]))  # few shapes: examples share jit compilations
  max_output = draw(st.sampled_from([1, 5, 100]))
  tile_size = draw(st.sampled_from([4, 256]))
  num_clusters = draw(st.integers(1, 6))
  num_classes = draw(st.sampled_from([1, 2, 5, 50]))
  tie_levels = draw(st.sampled_from([0, 1, 3]))  # 0: continuous scores; n: only n distinct scores
  zero_area = draw(st.sampled_from([0.0, 0.3]))
  invalid = draw(st.sampled_from([0.0, 0.2])) if allow_invalid else 0.0
  # torchvision separates classes by offsetting coordinates, so IoU 0 must not suppress there.
  thresholds = [0.0, 0.3, 0.4, 0.5, 0.7, 1.0] + ([] if nonnegative else [-0.5])
  iou_threshold = draw(st.sampled_from(thresholds))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

  low = 0 if nonnegative else -10  # negative coordinates: boxes partly out of the image
  centers = rng.integers(low + 10, 60, (num_clusters, 2))
  sizes = rng.integers(1, 20, (num_clusters, 2))
  k = rng.integers(0, num_clusters, m)
  x1y1 = centers[k] - sizes[k] // 2 + rng.integers(-2, 3, (m, 2))
  wh = np.maximum(sizes[k] + rng.integers(-2, 3, (m, 2)), 0)
  wh[rng.random(m) < zero_area] = 0
  boxes = np.concatenate([x1y1, x1y1 + wh], 1)
  boxes = np.maximum(boxes, low).astype(np.float32)
  classes = rng.integers(0, num_classes, m).astype(np.int32)
  if tie_levels:
    scores = (rng.integers(0, tie_levels, m) / 4).astype(np.float32)
    if not nonnegative:
      zeros = scores == 0
      scores[zeros] *= np.where(rng.random(np.sum(zeros)) < 0.5, -1.0, 1.0).astype(np.float32)
  else:
    scores = rng.random(m).astype(np.float32)
  valid = None
  if invalid:
    bad = rng.random(m) < invalid
    scores[bad] = rng.choice(np.array([-np.inf, np.nan], np.float32), np.sum(bad))
    if draw(st.booleans()):
      valid = rng.random(m) > invalid
  return dict(boxes=boxes, scores=scores, classes=classes, iou_threshold=iou_threshold,
              max_output=max_output, valid=valid, tile_size=tile_size)


@given(nms_problems())
def test_equals_greedy_reference(p):
  expected = greedy_nms_reference(
      p['boxes'], p['scores'], p['classes'], np.float32(p['iou_threshold']), p['max_output'],
      p['valid'])
  out = _run(**p)
  assert out.shape == (p['max_output'],) and out.dtype == np.int32
  np.testing.assert_array_equal(out, expected)


@settings(max_examples=25)  # each (shape, tile) pair compiles once; the reference test covers more
@given(nms_problems(), st.sampled_from([1, 7]))
def test_result_does_not_depend_on_tile_size(p, tile_size):
  baseline = _run(**p)
  p['tile_size'] = tile_size
  np.testing.assert_array_equal(_run(**p), baseline)


@requires_torchvision
@given(nms_problems(nonnegative=True, allow_invalid=False))
def test_equals_torchvision_batched_nms(p):
  import torch
  import torchvision

  keep = torchvision.ops.batched_nms(
      torch.tensor(p['boxes']), torch.tensor(p['scores']),
      torch.tensor(p['classes'], dtype=torch.int64), float(p['iou_threshold']))
  keep = keep.numpy()[:p['max_output']]
  expected = np.concatenate([keep, -np.ones(p['max_output'] - len(keep), np.int64)])
  np.testing.assert_array_equal(_run(**p), expected)


@requires_torchvision
def test_equals_torchvision_on_a_large_clustered_set():
  import torch
  import torchvision

  rng = np.random.default_rng(3)
  m = 3000
  centers = rng.uniform(0, 600, (30, 2))
  sizes = rng.uniform(10, 200, (30, 2))
  k = rng.integers(0, 30, m)
  ctr = centers[k] + rng.normal(0, 0.15, (m, 2)) * sizes[k]
  wh = sizes[k] * np.exp(rng.normal(0, 0.2, (m, 2)))
  boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], 1).astype(np.float32)
  scores = rng.random(m).astype(np.float32)
  for num_classes, max_output in ((1, 100), (80, 100), (80, 1000)):
    classes = rng.integers(0, num_classes, m)
    # torchvision NMS class by class: float32 IoU like ours (its offset trick could round).
    keep = []
    for c in range(num_classes):
      members = np.flatnonzero(classes == c)
      kept = torchvision.ops.nms(torch.tensor(boxes[members]), torch.tensor(scores[members]), 0.4)
      keep.append(members[kept.numpy()])
    keep = np.concatenate(keep)
    keep = keep[np.lexsort((keep, -scores[keep]))][:max_output]
    expected = np.concatenate([keep, -np.ones(max_output - len(keep), np.int64)])
    for tile_size in (64, 256):
      out = _run(boxes, scores, classes, 0.4, max_output, tile_size=tile_size)
      np.testing.assert_array_equal(out, expected)


# ------------------------------------------------------------------------------ transforms


def test_vmap_and_traced_threshold():
  rng = np.random.default_rng(0)
  n, m = 3, 40
  x1y1 = rng.integers(0, 20, (n, m, 2))
  boxes = np.concatenate([x1y1, x1y1 + rng.integers(8, 16, (n, m, 2))], -1).astype(np.float32)
  scores = rng.random((n, m)).astype(np.float32)
  classes = rng.integers(0, 3, (n, m)).astype(np.int32)
  thresholds = np.array([0.3, 0.4, 0.5], np.float32)

  fn = jax.jit(jax.vmap(functools.partial(batched_nms, max_output=10, tile_size=8)))
  out = np.asarray(fn(boxes, scores, classes, thresholds))
  assert out.shape == (n, 10)
  for i in range(n):
    expected = greedy_nms_reference(boxes[i], scores[i], classes[i], thresholds[i], 10)
    np.testing.assert_array_equal(out[i], expected)
    # Suppression changes the result of every problem.
    assert expected != greedy_nms_reference(boxes[i], scores[i], classes[i], 1.0, 10)
  # Other threshold values reuse the compilation.
  fn(boxes, scores, classes, thresholds[::-1])
  assert fn._cache_size() == 1
