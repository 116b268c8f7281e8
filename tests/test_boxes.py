"""ops/boxes.py vs numpy float64 references (tests/references.py), torchvision, hand examples."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import references
from conftest import requires_torchvision
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from retinamask_jax.ops import boxes as box_ops

_iou = jax.jit(box_ops.box_iou)


def _boxes(n_min: int, n_max: int, lo=-20.0, hi=120.0, allow_inverted: bool = True):
  """Random xyxy boxes; x2 < x1 allowed (inverted), zero-size and out-of-image boxes included."""
  coord = st.floats(lo, hi, width=32, allow_nan=False, allow_infinity=False)
  # Small integers make exact ties, touching edges and zero-area boxes frequent.
  int_coord = st.integers(-4, 12).map(float)
  rows = st.lists(st.one_of(coord, int_coord), min_size=4, max_size=4)
  if not allow_inverted:
    rows = rows.map(lambda r: [min(r[0], r[2]), min(r[1], r[3]), max(r[0], r[2]), max(r[1], r[3])])
  return st.lists(rows, min_size=n_min, max_size=n_max).map(
      lambda r: np.asarray(r, np.float32).reshape(-1, 4)
  )


def test_box_area_hand_examples():
  b = np.array([[0, 0, 2, 3], [1, 1, 1, 5], [5, 5, 3, 9], [0, 0, 2, -1]], np.float32)
  np.testing.assert_array_equal(np.asarray(box_ops.box_area(b)), [6.0, 0.0, 0.0, 0.0])
  # Leading dims are kept.
  assert box_ops.box_area(np.zeros((2, 3, 4), np.float32)).shape == (2, 3)


def test_box_iou_hand_examples():
  a = np.array([[0, 0, 2, 2], [0, 0, 0, 0]], np.float32)
  b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [2, 0, 4, 2], [0, 0, 0, 0]], np.float32)
  got = np.asarray(_iou(a, b))
  # [1,1,2,2] overlap = 1, union = 4 + 4 - 1; identical; touching edges; empty-vs-box, -vs-empty.
  want = [[1 / 7, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
  np.testing.assert_allclose(got, want, rtol=1e-7)
  assert got.dtype == np.float32


@given(_boxes(1, 6), _boxes(1, 6))
def test_box_iou_matches_reference(a, b):
  got = np.asarray(_iou(a, b))
  want = references.box_iou(a, b)
  assert got.shape == (len(a), len(b))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


@requires_torchvision
@given(_boxes(1, 6, allow_inverted=False), _boxes(1, 6, allow_inverted=False))
def test_box_iou_matches_torchvision(a, b):
  import torch
  import torchvision

  # torchvision divides 0 by 0 for two empty boxes; compare where its union is positive.
  want = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  got = np.asarray(_iou(a, b))
  defined = np.isfinite(want)
  np.testing.assert_allclose(got[defined], want[defined], rtol=2e-6, atol=1e-7)


def test_box_iou_gradient_finite_on_empty_union():
  a = jnp.zeros((2, 4))
  b = jnp.array([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 3.0, 4.0]])
  g = jax.grad(lambda x: jnp.sum(box_ops.box_iou(x, b)))(a)
  assert np.all(np.isfinite(np.asarray(g)))


def test_clip_boxes_hand_example_and_broadcast():
  boxes = np.array(
      [[[-5, -1, 50, 70], [10, 20, 30, 40]], [[-5, -1, 50, 70], [90, 90, 95, 99]]], np.float32
  )
  size = np.array([[60, 40], [100, 200]], np.int32)  # (h, w) per image
  got = np.asarray(box_ops.clip_boxes(boxes, size[:, None, :]))
  want = [[[0, 0, 40, 60], [10, 20, 30, 40]], [[0, 0, 50, 70], [90, 90, 95, 99]]]
  np.testing.assert_array_equal(got, want)
  # A single (h, w) for everything.
  got = np.asarray(box_ops.clip_boxes(boxes, np.array([60, 40])))
  np.testing.assert_array_equal(got[1, 1], [40, 60, 40, 60])


def _valid_pairs():
  """(boxes, anchors) with positive widths/heights, the coder's domain."""
  xy = st.floats(-50, 250, width=32)
  wh = st.floats(0.5, 300, width=32)
  row = st.tuples(xy, xy, wh, wh).map(lambda r: [r[0], r[1], r[0] + r[2], r[1] + r[3]])
  return st.integers(1, 8).flatmap(
      lambda n: st.tuples(
          st.lists(row, min_size=n, max_size=n).map(lambda r: np.asarray(r, np.float32)),
          st.lists(row, min_size=n, max_size=n).map(lambda r: np.asarray(r, np.float32)),
      )
  )


_WEIGHTS = st.sampled_from([(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0), (2.0, 3.0, 4.0, 0.5)])


@given(_valid_pairs(), _WEIGHTS)
def test_encode_matches_reference(pair, weights):
  boxes, anchors = pair
  got = np.asarray(box_ops.encode_boxes(boxes, anchors, weights))
  want = references.encode(boxes, anchors, weights)
  scale = np.abs(want).max() + 1.0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * scale)


@given(_valid_pairs(), hnp.arrays(np.float32, (8, 4), elements=st.floats(-20, 30, width=32)))
def test_decode_matches_reference_including_clamp(pair, raw):
  _, anchors = pair
  deltas = raw[: len(anchors)]  # dw/dh up to 30 / 5 = 6 > log(1000/16): the clamp is exercised
  got = np.asarray(box_ops.decode_boxes(deltas, anchors))
  want = references.decode(deltas, anchors)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-3)


def test_decode_clamps_dw_dh_from_above_only():
  anchors = np.array([[0, 0, 16, 16]], np.float32)
  big = box_ops.decode_boxes(np.array([[0, 0, 100, 100]], np.float32), anchors)
  w = float(big[0, 2] - big[0, 0])
  np.testing.assert_allclose(w, 1000.0, rtol=1e-5)  # exp(log(1000/16)) * 16
  small = box_ops.decode_boxes(np.array([[0, 0, -100, -100]], np.float32), anchors)
  assert float(small[0, 2] - small[0, 0]) < 1e-6  # no lower clamp


@given(_valid_pairs())
def test_encode_decode_roundtrip(pair):
  boxes, anchors = pair
  # Ratios above the decode clamp cannot round-trip; keep within it.
  ratio_w = (boxes[:, 2] - boxes[:, 0]) / (anchors[:, 2] - anchors[:, 0])
  ratio_h = (boxes[:, 3] - boxes[:, 1]) / (anchors[:, 3] - anchors[:, 1])
  keep = (ratio_w < 60) & (ratio_h < 60)
  deltas = box_ops.encode_boxes(boxes, anchors)
  back = np.asarray(box_ops.decode_boxes(deltas, anchors))
  np.testing.assert_allclose(back[keep], boxes[keep], rtol=1e-4, atol=2e-3)


def test_encode_is_finite_for_degenerate_boxes_and_masked_gradient_is_clean():
  anchors = jnp.array([[0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 40.0, 24.0], [0.0, 0.0, 0.0, 0.0]])
  # All-zero (padding), inverted, ordinary.
  gt = jnp.array([[0.0, 0.0, 0.0, 0.0], [10.0, 10.0, 5.0, 20.0], [1.0, 1.0, 3.0, 3.0]])
  deltas = box_ops.encode_boxes(gt, anchors)
  assert np.all(np.isfinite(np.asarray(deltas)))

  # Masked rows (padding) must not poison the gradient of the kept rows' loss.
  valid = jnp.array([False, False, True])

  def loss(pred, gt_boxes):
    t = box_ops.encode_boxes(gt_boxes, anchors)
    return jnp.sum(jnp.where(valid[:, None], (pred - t) ** 2, 0.0))

  g_pred, g_gt = jax.grad(loss, argnums=(0, 1))(jnp.zeros((3, 4)), gt)
  assert np.all(np.isfinite(np.asarray(g_pred)))
  assert np.all(np.isfinite(np.asarray(g_gt)))
  np.testing.assert_array_equal(np.asarray(g_pred[:2]), 0.0)


def test_bfloat16_inputs_are_computed_in_float32():
  anchors = np.array([[0, 0, 32, 32]], np.float32)
  deltas = jnp.array([[0.1, -0.2, 0.3, 0.05]], jnp.bfloat16)
  got = box_ops.decode_boxes(deltas, anchors)
  assert got.dtype == jnp.float32
  want = references.decode(np.asarray(deltas.astype(jnp.float32)), anchors)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-5)
  assert box_ops.box_iou(jnp.asarray(anchors, jnp.bfloat16), anchors).dtype == jnp.float32


def test_default_coder_constants():
  assert box_ops.BOX_WEIGHTS == (10.0, 10.0, 5.0, 5.0)
  assert math.isclose(box_ops.MAX_LOG_RATIO, math.log(1000 / 16))
