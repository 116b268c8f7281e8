"""ops/matching.py against a numpy loop from spec 3.3 + DESIGN.md 5, and torchvision's Matcher."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
from conftest import requires_torchvision
from hypothesis import given
from hypothesis import strategies as st

from retinamask_jax.hparams import BEST_MATCH_OFF
from retinamask_jax.ops import anchors as anchor_ops
from retinamask_jax.ops.matching import match_anchors


def match_reference(anchors, gt_boxes, gt_valid, pos, neg, best_match_threshold):
  """Spec 3.3 as plain loops in float64. best_match_threshold None = best matching off."""
  num_anchors = len(anchors)
  valid_idx = [g for g in range(len(gt_boxes)) if gt_valid[g]]
  matched = np.zeros(num_anchors, np.int64)
  labels = np.zeros(num_anchors, np.int64)
  if not valid_idx:
    return matched, labels
  iou = references.box_iou(anchors, np.asarray(gt_boxes)[valid_idx])  # [A, Gv]
  for a in range(num_anchors):
    best, best_g = -math.inf, 0
    for j, g in enumerate(valid_idx):
      if iou[a, j] > best:  # strict: the first GT wins ties
        best, best_g = iou[a, j], g
    matched[a] = best_g
    if best < neg:
      labels[a] = 0
    elif best < pos:
      labels[a] = -1
    else:
      labels[a] = 1
  if best_match_threshold is not None:
    for j in range(len(valid_idx)):
      q = max(iou[a, j] for a in range(num_anchors))
      if q > 0 and q >= best_match_threshold:
        for a in range(num_anchors):
          if iou[a, j] == q:
            labels[a] = 1
  return matched, labels


_match = jax.jit(
    lambda a, g, v, pos, neg, thr: match_anchors(
        a, g, v, positive_iou=pos, negative_iou=neg, best_match_threshold=thr
    )
)


def run(anchors, gt, valid, pos=0.5, neg=0.4, thr=0.0):
  """Thresholds go in as traced float32 scalars, as they do from HParams."""
  thr = BEST_MATCH_OFF if thr is None else thr
  valid = np.asarray(valid, bool)
  m, lab = _match(anchors, gt, valid, np.float32(pos), np.float32(neg), np.float32(thr))
  return np.asarray(m), np.asarray(lab)


# Integer boxes on a small grid: IoUs are ratios of small integers, so float32 and float64 agree on
# every comparison and tie (distinct ratios differ by more than a float32 ulp), and ties and zero
# areas are frequent.
_coord = st.integers(-4, 36)
_box = st.tuples(_coord, _coord, st.integers(0, 20), st.integers(0, 20)).map(
    lambda r: [r[0], r[1], r[0] + r[2], r[1] + r[3]]
)
_inverted = st.tuples(_coord, _coord, _coord, _coord).map(list)  # may be inverted or zero-size


@st.composite
def matching_case(draw):
  anchors = draw(st.lists(_box, min_size=1, max_size=14))
  gt = draw(st.lists(st.one_of(_box, _box, _inverted), min_size=1, max_size=6))
  valid = draw(st.lists(st.booleans(), min_size=len(gt), max_size=len(gt)))
  pos, neg = draw(st.sampled_from([(0.5, 0.4), (0.5, 0.5), (0.6, 0.3), (0.25, 0.2)]))
  thr = draw(st.sampled_from([0.0, 0.2, 0.3, 0.4, 0.5, 0.75, None]))
  anchors, gt = np.asarray(anchors, np.float32), np.asarray(gt, np.float32)
  return anchors, gt, np.asarray(valid), pos, neg, thr


@given(matching_case())
def test_matches_numpy_reference(case):
  anchors, gt, valid, pos, neg, thr = case
  got_m, got_l = run(anchors, gt, valid, pos, neg, thr)
  want_m, want_l = match_reference(anchors, gt, valid, pos, neg, thr)
  np.testing.assert_array_equal(got_l, want_l)
  np.testing.assert_array_equal(got_m, want_m)
  assert got_m.dtype == np.int32 and got_l.dtype == np.int32


def test_all_ties_become_positive():
  # The GT straddles two anchors symmetrically: IoU 1/3 with both; both are its best anchors.
  anchors = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [40, 40, 50, 50]], np.float32)
  gt = np.array([[5, 0, 15, 10]], np.float32)
  m, lab = run(anchors, gt, [True])
  np.testing.assert_array_equal(lab, [1, 1, 0])
  np.testing.assert_array_equal(m, [0, 0, 0])
  _, lab = run(anchors, gt, [True], thr=0.34)  # 1/3 < 0.34: no best match
  np.testing.assert_array_equal(lab, [0, 0, 0])


def test_thresholds_are_inclusive_where_the_spec_says_so():
  # IoU exactly 1/4 (100 / 400) with the only overlapping anchor, and exactly 1/2 for the second GT.
  anchors = np.array([[0, 0, 10, 10], [50, 0, 60, 10], [100, 100, 110, 110]], np.float32)
  gt = np.array([[0, 0, 10, 40], [50, 0, 60, 20]], np.float32)
  _, lab = run(anchors, gt, [True, True], thr=0.25)  # q >= threshold: best match kept
  np.testing.assert_array_equal(lab, [1, 1, 0])
  _, lab = run(anchors, gt, [True, True], thr=None)  # IoU >= positive_iou: positive
  np.testing.assert_array_equal(lab, [0, 1, 0])
  # IoU >= negative_iou: ignore.
  _, lab = run(anchors, gt, [True, True], pos=0.6, neg=0.25, thr=None)
  np.testing.assert_array_equal(lab, [-1, -1, 0])


def test_best_anchor_keeps_its_own_argmax_gt():
  # GT1's best anchor is anchor 0, whose own best GT is GT0: it stays matched to GT0 (the quirk).
  anchors = np.array([[0, 0, 10, 10], [100, 100, 110, 110]], np.float32)
  gt = np.array([[0, 0, 10, 10], [0, 0, 20, 10]], np.float32)
  m, lab = run(anchors, gt, [True, True])
  np.testing.assert_array_equal(lab, [1, 0])
  assert m[0] == 0


def test_padded_rows_never_match_nor_create_best_matches():
  anchors = anchor_ops.generate_anchors((128, 128))
  gt = np.zeros((5, 4), np.float32)
  gt[0] = [10, 10, 40, 50]
  gt[3] = [60, 60, 120, 120]  # a padded row with a real-looking box must be ignored too
  valid = [True, False, False, False, False]
  m, lab = run(anchors, gt, valid)
  want_m, want_l = match_reference(anchors, gt, valid, 0.5, 0.4, 0.0)
  np.testing.assert_array_equal(lab, want_l)
  np.testing.assert_array_equal(m, want_m)
  assert np.all(m == 0)
  # Unmasked all-zero rows would make every zero-IoU anchor a best match; here only a few are.
  assert 0 < (lab == 1).sum() < 60


def test_image_without_gt_is_all_negative():
  anchors = anchor_ops.generate_anchors((128, 128))
  gt = np.array([[0, 0, 0, 0], [10, 10, 50, 50]], np.float32)
  for thr in (0.0, 0.5, None):
    m, lab = run(anchors, gt, [False, False], thr=thr)
    assert np.all(lab == 0) and np.all(m == 0)


def test_zero_area_and_outside_gt_make_no_best_match():
  anchors = np.array([[0, 0, 16, 16], [16, 0, 32, 16]], np.float32)
  gt = np.array([[4, 4, 4, 12], [200, 200, 240, 240]], np.float32)  # zero width; off every anchor
  m, lab = run(anchors, gt, [True, True], thr=0.0)
  np.testing.assert_array_equal(lab, [0, 0])


def test_tall_thin_gt_gets_its_best_anchors_only_when_the_threshold_allows():
  """Table 1's logic: which GT get positive anchors at each best-match threshold."""
  anchors = anchor_ops.generate_anchors((256, 256))
  gt = np.array(
      [
          [20, 20, 28, 200],  # 8 x 180: best IoU 0.174 (34 tied anchors)
          [100, 40, 116, 200],  # 16 x 160: best IoU 0.287 (30 tied anchors)
          [150, 150, 166, 230],  # 16 x 80: best IoU 6/13 = 0.46, above 0.4 but below 0.5
          [180, 20, 230, 70],  # an ordinary box: positives at IoU >= 0.5 anyway
      ],
      np.float32,
  )
  iou = references.box_iou(anchors, gt)
  best = iou.max(axis=0)
  assert best[0] < 0.2 < best[1] < 0.3 < 0.4 < best[2] < 0.5 < best[3]
  ties = (iou == best).sum(axis=0)
  assert ties[0] > 1 and ties[1] > 1  # the tall boxes tie across vertical anchor shifts
  # threshold -> which GT own positives ('covered') at that threshold
  expected = {
      0.0: [True, True, True, True],
      0.2: [False, True, True, True],
      0.3: [False, False, True, True],
      0.4: [False, False, True, True],
      0.5: [False, False, False, True],
      None: [False, False, False, True],
  }
  for thr, covered in expected.items():
    m, lab = run(anchors, gt, [True] * 4, thr=thr)
    per_gt = np.array([np.sum((lab == 1) & (m == g)) for g in range(4)])
    assert list(per_gt > 0) == covered, (thr, per_gt)
    for g in range(3):
      if covered[g]:
        # Exactly its tied best anchors become positive (the thin ones have none at IoU >= 0.4).
        assert per_gt[g] == ties[g], (thr, g, per_gt)
    want_m, want_l = match_reference(anchors, gt, [True] * 4, 0.5, 0.4, thr)
    np.testing.assert_array_equal(lab, want_l)
    np.testing.assert_array_equal(m, want_m)


def test_vmapped_over_images_and_thresholds_compiles_once():
  anchors = jnp.asarray(anchor_ops.generate_anchors((128, 128)))
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 90, (3, 4, 2))
  wh = rng.uniform(4, 60, (3, 4, 2))
  gt = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  valid = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
  traces = []

  @jax.jit
  def batched(gt, valid, thr):
    traces.append(1)
    return jax.vmap(
        lambda g, v: match_anchors(
            anchors, g, v, positive_iou=0.5, negative_iou=0.4, best_match_threshold=thr
        )
    )(gt, valid)

  for thr in (0.0, 0.3, BEST_MATCH_OFF):
    m, lab = batched(gt, valid, jnp.float32(thr))
    for i in range(3):
      want_m, want_l = match_reference(
          np.asarray(anchors), gt[i], valid[i], 0.5, 0.4, None if math.isinf(thr) else thr
      )
      np.testing.assert_array_equal(np.asarray(lab[i]), want_l)
      np.testing.assert_array_equal(np.asarray(m[i]), want_m)
  assert len(traces) == 1


@requires_torchvision
@pytest.mark.parametrize('seed', range(4))
def test_agrees_with_torchvision_matcher(seed):
  """torchvision's low-quality rule lacks the `> 0` condition: they agree when every GT overlaps."""
  import torch
  from torchvision.models.detection._utils import Matcher
  from torchvision.ops import box_iou as tv_box_iou

  rng = np.random.default_rng(seed)
  anchors = anchor_ops.generate_anchors((128, 192))
  g = 5
  xy = rng.uniform(-10, 150, (g, 2))
  wh = rng.uniform(2, 140, (g, 2)) * rng.uniform(0.2, 1.0, (g, 1))
  gt = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  quality = tv_box_iou(torch.from_numpy(gt), torch.from_numpy(np.array(anchors)))  # [G, A]
  assert bool((quality.max(dim=1).values > 0).all())
  matches = Matcher(0.5, 0.4, allow_low_quality_matches=True)(quality).numpy()
  want_l = np.where(matches >= 0, 1, np.where(matches == -1, 0, -1))

  m, lab = run(anchors, gt, [True] * g)
  np.testing.assert_array_equal(lab, want_l)
  np.testing.assert_array_equal(m[matches >= 0], matches[matches >= 0])


@requires_torchvision
def test_padded_batch_at_training_size_agrees_with_torchvision_matcher():
  """The training shapes: 512 x 512 anchors, 100 GT slots of which 30 are real, vmapped over 2 images, inside
  a jit. GT are drawn so that many contain anchors whole, where float32 IoUs of different anchors round to the
  same value: all those ties must become positive, as in torchvision's float32 Matcher."""
  import torch
  from torchvision.models.detection._utils import Matcher
  from torchvision.ops import box_iou as tv_box_iou

  anchors = anchor_ops.generate_anchors((512, 512))
  rng = np.random.default_rng(0)
  slots, real = 100, 30
  gt = np.zeros((2, slots, 4), np.float32)
  for i in range(2):
    xy = rng.uniform(0, 300, (real, 2))
    gt[i, :real] = np.concatenate([xy, xy + rng.uniform(10, 200, (real, 2))], 1)
  valid = np.arange(slots)[None, :].repeat(2, 0) < real
  m, lab = jax.jit(
      jax.vmap(
          lambda g, v: match_anchors(
              anchors, g, v, positive_iou=0.5, negative_iou=0.4, best_match_threshold=0.0
          )
      )
  )(gt, valid)
  matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
  ties = 0
  for i in range(2):
    quality = tv_box_iou(torch.from_numpy(gt[i, :real]), torch.from_numpy(np.array(anchors)))  # [G, A]
    ties += int((quality == quality.max(dim=1, keepdim=True).values).sum()) - real
    matches = matcher(quality).numpy()
    want_l = np.where(matches >= 0, 1, np.where(matches == -1, 0, -1))
    np.testing.assert_array_equal(np.asarray(lab[i]), want_l)
    np.testing.assert_array_equal(np.asarray(m[i])[matches >= 0], matches[matches >= 0])
  assert ties > 0  # the case exercises tied best anchors
