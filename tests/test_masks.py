"""Mask proposals, mask targets, pasting and RLE (retinamask_jax/ops/masks.py)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
from hypothesis import given
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from retinamask_jax.ops import masks as masks_lib
from retinamask_jax.ops.masks import encode_rle, mask_proposals, mask_targets, paste_masks

# ---------------------------------------------------------------------------------- mask_proposals


def ref_mask_proposals(det_boxes, det_valid, gt_boxes, gt_classes, thr, cap):
  """Spec 5.1/5.2 in plain loops: detections then GT rows, max-IoU real GT, positives-first cap."""
  n, d = det_valid.shape
  g = gt_classes.shape[1]
  out = {k: [] for k in ('boxes', 'gt_index', 'classes', 'positive', 'num_positive_dropped')}
  for i in range(n):
    props = np.concatenate([det_boxes[i], gt_boxes[i]]).astype(np.float64)
    valid = [bool(v) for v in det_valid[i]] + [bool(c > 0) for c in gt_classes[i]]
    iou = references.box_iou(props, gt_boxes[i])
    rows = []
    for p in range(d + g):
      best, best_g = -1.0, 0
      for j in range(g):
        if gt_classes[i, j] > 0 and iou[p, j] > best:  # strict: the first GT wins ties
          best, best_g = iou[p, j], j
      pos = valid[p] and best >= thr
      rows.append((props[p], best_g if pos else 0, int(gt_classes[i, best_g]) if pos else 0, pos))
    num_pos = sum(r[3] for r in rows)
    dropped = 0
    if 0 < cap < d + g:
      rows = ([r for r in rows if r[3]] + [r for r in rows if not r[3]])[:cap]
      dropped = max(num_pos - cap, 0)
    out['boxes'].append([r[0] for r in rows])
    out['gt_index'].append([r[1] for r in rows])
    out['classes'].append([r[2] for r in rows])
    out['positive'].append([r[3] for r in rows])
    out['num_positive_dropped'].append(dropped)
  return {k: np.array(v) for k, v in out.items()}


def _random_proposal_inputs(rng, n=3, d=6, g=4):
  gt = np.zeros((n, g, 4), np.float32)
  classes = np.zeros((n, g), np.int32)
  det = np.zeros((n, d, 4), np.float32)
  det_valid = np.zeros((n, d), bool)
  for i in range(n):
    num_gt = rng.integers(0, g + 1)  # 0 = an image without GT
    ctr = rng.uniform(20, 80, (num_gt, 2))
    size = rng.uniform(5, 40, (num_gt, 2))
    gt[i, :num_gt] = np.concatenate([ctr - size / 2, ctr + size / 2], 1)
    classes[i, :num_gt] = rng.integers(1, 5, num_gt)
    gt[i, num_gt:] = rng.uniform(0, 50, (g - num_gt, 4))  # garbage in padded rows: must be ignored
    for j in range(d):
      if num_gt and rng.random() < 0.7:  # a detection jittered around some GT
        b = gt[i, rng.integers(num_gt)]
        wh = b[2:] - b[:2]
        det[i, j] = b + rng.uniform(-0.3, 0.3, 4) * np.concatenate([wh, wh])
      else:
        c = rng.uniform(0, 100, 2)
        det[i, j] = np.concatenate([c, c + rng.uniform(1, 30, 2)])
    det_valid[i] = rng.random(d) < 0.8
  return det, det_valid, gt, classes


def _check_proposals(got, want):
  assert got['boxes'].shape == want['boxes'].shape
  np.testing.assert_allclose(np.asarray(got['boxes']), want['boxes'], atol=1e-6)
  for k in ('gt_index', 'classes', 'positive', 'num_positive_dropped'):
    np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)
  assert got['gt_index'].dtype == jnp.int32 and got['classes'].dtype == jnp.int32
  assert got['positive'].dtype == jnp.bool_ and got['num_positive_dropped'].dtype == jnp.int32


@functools.cache
def _jitted_proposals(cap):
  def fn(d, v, g, c, thr):
    return mask_proposals(d, v, g, c, iou_threshold=thr, max_proposals=cap)

  return jax.jit(fn)


@given(seed=st.integers(0, 2**31 - 1), cap=st.sampled_from([0, 3, 7, 10, 50]))
def test_mask_proposals_random_vs_reference(seed, cap):
  rng = np.random.default_rng(seed)
  det, det_valid, gt, classes = _random_proposal_inputs(rng)
  got = _jitted_proposals(cap)(det, det_valid, gt, classes, jnp.float32(0.5))  # a traced threshold
  _check_proposals(got, ref_mask_proposals(det, det_valid, gt, classes, 0.5, cap))


def test_mask_proposals_hand_worked():
  # Image 0: GT 0 = [0, 0, 2, 1] (class 3), GT 1 = [10, 10, 20, 20] (class 7), GT 2 = padding that
  # overlaps detection 1 exactly (must be ignored). Image 1: no GT at all, all detections invalid.
  det = np.array(
      [
          [[0, 0, 1, 1], [30, 30, 40, 40], [10, 10, 20, 20], [11, 10, 20, 20]],
          [[0, 0, 5, 5], [0, 0, 5, 5], [0, 0, 5, 5], [0, 0, 5, 5]],
      ],
      np.float32,
  )
  det_valid = np.array([[True, True, True, False], [False] * 4])
  gt = np.array(
      [[[0, 0, 2, 1], [10, 10, 20, 20], [30, 30, 40, 40]], [[0, 0, 5, 5]] * 3], np.float32
  )
  classes = np.array([[3, 7, 0], [0, 0, 0]], np.int32)
  got = mask_proposals(det, det_valid, gt, classes)
  # Det 0 has IoU exactly 0.5 with GT 0 (>= threshold: positive). Det 3 is invalid although it
  # overlaps GT 1.
  np.testing.assert_array_equal(
      np.asarray(got['positive']),
      [[True, False, True, False, True, True, False], [False] * 7],
  )
  np.testing.assert_array_equal(np.asarray(got['gt_index'])[0], [0, 0, 1, 0, 0, 1, 0])
  np.testing.assert_array_equal(np.asarray(got['classes'])[0], [3, 0, 7, 0, 3, 7, 0])
  np.testing.assert_array_equal(np.asarray(got['num_positive_dropped']), [0, 0])
  np.testing.assert_array_equal(np.asarray(got['boxes'])[0, 4:], gt[0])
  # A stricter (traced-compatible) threshold drops the 0.5 match.
  got = mask_proposals(det, det_valid, gt, classes, iou_threshold=0.6)
  np.testing.assert_array_equal(
      np.asarray(got['positive'])[0], [False, False, True, False, True, True, False]
  )


def test_mask_proposals_cap_binds_and_reports():
  det = np.array([[[0, 0, 10, 10], [50, 50, 60, 60], [1, 0, 10, 10], [0, 0, 9, 10]]], np.float32)
  gt = np.array([[[0, 0, 10, 10], [100, 100, 110, 110]]], np.float32)
  classes = np.array([[2, 0]], np.int32)
  det_valid = np.ones((1, 4), bool)
  # Positives: det 0, 2, 3 and GT 0 -> 4 positives; a cap of 2 keeps the first two and reports 2
  # dropped.
  got = mask_proposals(det, det_valid, gt, classes, max_proposals=2)
  assert got['boxes'].shape == (1, 2, 4)
  np.testing.assert_array_equal(np.asarray(got['boxes'])[0], det[0, [0, 2]])
  np.testing.assert_array_equal(np.asarray(got['positive']), [[True, True]])
  np.testing.assert_array_equal(np.asarray(got['num_positive_dropped']), [2])
  # A cap of 5 keeps all 4 positives first, then the first non-positive (det 1); nothing dropped.
  got = mask_proposals(det, det_valid, gt, classes, max_proposals=5)
  want = np.concatenate([det[0, [0, 2, 3]], gt[0, :1], det[0, 1:2]])
  np.testing.assert_array_equal(np.asarray(got['boxes'])[0], want)
  np.testing.assert_array_equal(np.asarray(got['positive']), [[True] * 4 + [False]])
  np.testing.assert_array_equal(np.asarray(got['classes']), [[2, 2, 2, 2, 0]])
  np.testing.assert_array_equal(np.asarray(got['num_positive_dropped']), [0])
  # No cap: all D + G in order.
  assert mask_proposals(det, det_valid, gt, classes)['boxes'].shape == (1, 6, 4)


def test_mask_proposals_no_detections_and_no_gt_slots():
  det = np.zeros((2, 0, 4), np.float32)
  gt = np.array([[[0, 0, 4, 4], [0, 0, 4, 4]], [[1, 1, 2, 2], [0, 0, 0, 0]]], np.float32)
  classes = np.array([[5, 6], [1, 0]], np.int32)
  got = mask_proposals(det, np.zeros((2, 0), bool), gt, classes)
  _check_proposals(got, ref_mask_proposals(det, np.zeros((2, 0), bool), gt, classes, 0.5, 0))
  # Duplicate GT: the first index wins (spec 3.3 argmax); the second GT's own proposal matches GT 0
  # too.
  np.testing.assert_array_equal(np.asarray(got['gt_index'])[0], [0, 0])
  np.testing.assert_array_equal(np.asarray(got['classes'])[0], [5, 5])
  # G = 0: nothing can be positive.
  got = mask_proposals(
      np.ones((1, 2, 4), np.float32), np.ones((1, 2), bool), np.zeros((1, 0, 4)), np.zeros((1, 0))
  )
  assert not np.asarray(got['positive']).any() and got['boxes'].shape == (1, 2, 4)


# ------------------------------------------------------------------------------------ mask_targets


def ref_mask_target(crop, gt_box, prop, s):
  """The documented rule in plain float64 loops: [S, S] bilinear values (before thresholding)."""
  m = crop.shape[0]
  gx1, gy1, gx2, gy2 = (float(v) for v in gt_box)
  px1, py1, px2, py2 = (float(v) for v in prop)
  out = np.zeros((s, s))
  for i in range(s):
    y = py1 + (i + 0.5) * (py2 - py1) / s
    for j in range(s):
      x = px1 + (j + 0.5) * (px2 - px1) / s
      if not (gx1 <= x < gx2 and gy1 <= y < gy2):
        continue
      # Crop pixel (a, b) is centred at (gx1 + (b + 0.5) * gw / M, gy1 + (a + 0.5) * gh / M).
      u = min(max((x - gx1) / (gx2 - gx1) * m - 0.5, 0.0), m - 1.0)
      v = min(max((y - gy1) / (gy2 - gy1) * m - 0.5, 0.0), m - 1.0)
      b0, a0 = int(np.floor(u)), int(np.floor(v))
      b1, a1 = min(b0 + 1, m - 1), min(a0 + 1, m - 1)
      fu, fv = u - b0, v - a0
      out[i, j] = (
          (1 - fv) * (1 - fu) * crop[a0, b0]
          + (1 - fv) * fu * crop[a0, b1]
          + fv * (1 - fu) * crop[a1, b0]
          + fv * fu * crop[a1, b1]
      )
  return out


def test_mask_targets_hand_worked():
  # M = 2 crops of GT [0, 0, 4, 4]; S = 4 samples at 0.5, 1.5, 2.5, 3.5 -> crop coords -0.25
  # (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1).
  crops = np.array([[[[1, 0], [0, 0]], [[0, 1], [0, 0]]]], np.uint8)  # [1, G=2, 2, 2]
  gt = np.array([[[0, 0, 4, 4], [0, 0, 4, 4]]], np.float32)
  props = np.array([[[0, 0, 4, 4], [2, -2, 6, 2]]], np.float32)
  got = np.asarray(mask_targets(crops, gt, props, np.array([[0, 1]], np.int32), resolution=4))
  # Proposal 0 = GT 0: values a_i * a_j with a = (1, .75, .25, 0) -> >= .5 on the top-left 2 x 2.
  want0 = np.zeros((4, 4))
  want0[:2, :2] = 1
  # Proposal 1 samples x = 2.5, 3.5 (inside, u = .75, 1) and 4.5, 5.5 (outside -> 0); y = -1.5, -.5
  # (outside), .5, 1.5 (v = 0, .25). GT 1's crop has its 1 at (0, 1): values .75, 1 / .5625, .75 ->
  # all >= .5.
  want1 = np.zeros((4, 4))
  want1[2:, :2] = 1
  np.testing.assert_array_equal(got[0], np.stack([want0, want1]))
  assert got.dtype == np.float32


def test_mask_targets_random_vs_reference():
  rng = np.random.default_rng(10)
  n, g, r, m, s = 2, 3, 6, 8, 6
  crops = (rng.random((n, g, m, m)) < 0.5).astype(np.uint8)
  ctr = rng.uniform(10, 50, (n, g, 2))
  size = rng.uniform(3, 30, (n, g, 2))
  gt = np.concatenate([ctr - size / 2, ctr + size / 2], -1).astype(np.float32)
  gt[1, 2] = [20, 20, 20, 30]  # zero width: no target pixel
  gt_index = rng.integers(0, g, (n, r)).astype(np.int32)
  gt_index[1, 0] = 2
  props = np.take_along_axis(gt, gt_index[..., None], 1)
  wh = props[..., 2:] - props[..., :2]
  props = props + rng.uniform(-0.4, 0.4, props.shape) * np.concatenate([wh, wh], -1)
  props = props.astype(np.float32)
  props[0, 0] = [30, 30, 25, 28]  # inverted proposal box
  got = np.asarray(jax.jit(mask_targets, static_argnums=4)(crops, gt, props, gt_index, s))
  want = np.zeros((n, r, s, s))
  for i in range(n):
    for j in range(r):
      k = gt_index[i, j]
      want[i, j] = ref_mask_target(crops[i, k], gt[i, k], props[i, j], s)
  clear = np.abs(want - 0.5) > 1e-5  # exact 0.5 ties may round either way in float32
  np.testing.assert_array_equal(got[clear], (want >= 0.5)[clear])
  assert not got[1, 0].any()
  assert 0.1 < got.mean() < 0.9


def test_mask_targets_identity_when_proposal_is_gt_and_m_equals_s():
  rng = np.random.default_rng(11)
  crops = (rng.random((1, 2, 7, 7)) < 0.5).astype(np.uint8)
  gt = np.array([[[3.3, 4.1, 17.9, 11.0], [0.0, 0.0, 7.0, 7.0]]], np.float32)
  got = mask_targets(crops, gt, gt, np.array([[0, 1]], np.int32), resolution=7)
  np.testing.assert_array_equal(np.asarray(got), crops.astype(np.float32))


def _star_polygon(rng, ctr, radius):
  k = int(rng.integers(5, 12))
  ang = np.sort(rng.uniform(0, 2 * np.pi, k))
  rad = radius * rng.uniform(0.5, 1.0, (k, 1)) * rng.uniform(0.6, 1.4, (1, 2))
  return ctr + rad * np.stack([np.cos(ang), np.sin(ang)], 1)  # [k, 2] (x, y)


def _rasterize(poly_xy, origin, size, res):
  """pycocotools rasterization of a polygon, the box (origin, size) mapped onto a res x res grid."""
  q = (poly_xy - origin) * (res / size)
  rle = mask_utils.frPyObjects([q.ravel().tolist()], res, res)
  return mask_utils.decode(mask_utils.merge(rle)).astype(bool)


def test_mask_targets_agree_with_polygon_rasterization():
  """Resampled crops (M = 112) vs the authors' direct 28 x 28 rasterization into each proposal."""
  rng = np.random.default_rng(12)
  g, r, m, s = 8, 4, 112, 28
  polys, gts = [], []
  for _ in range(g):
    poly = _star_polygon(rng, rng.uniform(100, 300, 2), rng.uniform(10, 120))
    polys.append(poly)
    gts.append(np.concatenate([poly.min(0), poly.max(0)]))  # the COCO box of the polygon
  gt = np.array(gts, np.float32)[None]
  crops = np.stack([_rasterize(p, b[:2], b[2:] - b[:2], m) for p, b in zip(polys, gts)])
  crops = crops[None].astype(np.uint8)
  gt_index = np.repeat(np.arange(g), r)[None].astype(np.int32)
  props = gt[0, gt_index[0]]
  wh = props[:, 2:] - props[:, :2]
  props = props + rng.uniform(-0.2, 0.2, props.shape) * np.concatenate([wh, wh], 1)
  props = props.astype(np.float32)[None]
  got = np.asarray(mask_targets(crops, gt, props, gt_index, resolution=s))[0] > 0
  ious = []
  for k in range(g * r):
    p = props[0, k].astype(np.float64)
    want = _rasterize(polys[gt_index[0, k]], p[:2], p[2:] - p[:2], s)
    ious.append((got[k] & want).sum() / max((got[k] | want).sum(), 1))
  print(f'mean IoU {np.mean(ious):.3f}, min {np.min(ious):.3f}')
  assert np.mean(ious) >= 0.95, np.mean(ious)  # the brief asks 0.9; this implementation gives ~0.99
  assert np.min(ious) >= 0.75, np.min(ious)


# ------------------------------------------------------------------------------------- paste_masks


def ref_paste_one(mask, box, hw, threshold):
  """The authors' Masker rule, written the way they do it, per pixel in float64.

  Pad the S x S map with zeros to (S + 2) x (S + 2), stretch it over the box expanded by (S + 2) / S
  about its centre (padded pixel k centred at ex1 + (k + 0.5) * ew / (S + 2)), and read each image
  pixel centre bilinearly from it (clamped at the padded map's edges, where it is 0).
  """
  s = mask.shape[0]
  h, w = hw
  out = np.zeros((h, w), bool)
  x1, y1, x2, y2 = (float(v) for v in box)
  if not (x2 > x1 and y2 > y1):
    return out
  padded = np.zeros((s + 2, s + 2))
  padded[1:-1, 1:-1] = mask
  cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
  ew, eh = (x2 - x1) * (s + 2) / s, (y2 - y1) * (s + 2) / s
  ex1, ey1 = cx - ew / 2, cy - eh / 2
  for row in range(h):
    v = (row + 0.5 - ey1) / eh * (s + 2) - 0.5
    v = min(max(v, 0.0), s + 1.0)
    a0 = int(np.floor(v))
    a1 = min(a0 + 1, s + 1)
    fv = v - a0
    for col in range(w):
      u = (col + 0.5 - ex1) / ew * (s + 2) - 0.5
      u = min(max(u, 0.0), s + 1.0)
      b0 = int(np.floor(u))
      b1 = min(b0 + 1, s + 1)
      fu = u - b0
      val = (
          (1 - fv) * (1 - fu) * padded[a0, b0]
          + (1 - fv) * fu * padded[a0, b1]
          + fv * (1 - fu) * padded[a1, b0]
          + fv * fu * padded[a1, b1]
      )
      out[row, col] = val > threshold
  return out


def _paste_cases(rng, hw):
  h, w = hw
  boxes = [
      [5.3, 4.7, 30.2, 20.9],  # inside
      [-10.0, -6.5, 12.0, 9.0],  # partly outside (top-left)
      [w - 8.0, h - 5.0, w + 15.0, h + 9.0],  # partly outside (bottom-right)
      [10.2, 10.3, 10.9, 11.1],  # smaller than a pixel, around the centre of pixel (10, 10)
      [3.0, 3.0, 5.5, 6.0],  # a few pixels
      [-20.0, -20.0, w + 20.0, h + 20.0],  # larger than the image
      [12.0, 8.0, 12.0, 16.0],  # zero width: nothing
      [w + 5.0, 2.0, w + 25.0, 12.0],  # entirely outside: nothing
  ]
  d = len(boxes)
  masks = rng.random((d, 6, 6))
  masks[3] = 1.0  # the tiny box must still paste the pixel whose centre it holds
  return masks, np.array(boxes)


@pytest.mark.parametrize('chunk_values', [1 << 24, 64])
def test_paste_masks_matches_reference(monkeypatch, chunk_values):
  # 64 forces one detection per chunk.
  monkeypatch.setattr(masks_lib, '_PASTE_CHUNK_VALUES', chunk_values)
  rng = np.random.default_rng(13)
  hw = (23, 37)
  masks, boxes = _paste_cases(rng, hw)
  got = paste_masks(masks, boxes, hw)
  assert got.shape == (len(boxes), *hw) and got.dtype == bool
  for k in range(len(boxes)):
    want = ref_paste_one(masks[k], boxes[k], hw, 0.5)
    np.testing.assert_array_equal(got[k], want, err_msg=f'detection {k}')
  assert got[3].sum() >= 1 and not got[6].any() and not got[7].any()
  assert got[1].any() and got[2].any() and got[5].any()


@given(seed=st.integers(0, 2**31 - 1), threshold=st.sampled_from([0.3, 0.5, 0.7]))
def test_paste_masks_hypothesis(seed, threshold):
  rng = np.random.default_rng(seed)
  hw = (int(rng.integers(1, 20)), int(rng.integers(1, 20)))
  d = int(rng.integers(0, 4))
  ctr = rng.uniform(-5, 25, (d, 2))
  size = np.exp(rng.uniform(np.log(0.3), np.log(30), (d, 2)))
  boxes = np.concatenate([ctr - size / 2, ctr + size / 2], 1)
  masks = rng.random((d, 5, 5))
  got = paste_masks(masks, boxes, hw, threshold)
  assert got.shape == (d, *hw)
  for k in range(d):
    np.testing.assert_array_equal(got[k], ref_paste_one(masks[k], boxes[k], hw, threshold))


def test_paste_masks_full_box_mask_covers_the_box():
  # With an all-ones mask the interpolation towards the zero ring crosses 0.5 exactly at the box
  # edges, so the pasted mask is the set of pixels whose centres lie strictly inside the box:
  # columns 4..5, rows 2..7.
  got = paste_masks(np.ones((1, 4, 4)), np.array([[4.0, 2.0, 6.0, 8.0]]), (10, 10))
  want = np.zeros((10, 10), bool)
  want[2:8, 4:6] = True
  np.testing.assert_array_equal(got[0], want)


def test_paste_masks_chunked_large_image(monkeypatch):
  rng = np.random.default_rng(14)
  hw = (300, 400)
  boxes = np.array(
      [[-50.0, -40.0, 450.0, 350.0], [10.0, 20.0, 60.0, 50.0], [100.0, 0.0, 399.0, 299.0]]
  )
  masks = rng.random((3, 28, 28))
  monkeypatch.setattr(masks_lib, '_PASTE_CHUNK_VALUES', 300 * 400)
  got = paste_masks(masks, boxes, hw)
  for k in range(3):
    np.testing.assert_array_equal(got[k], paste_masks(masks[k : k + 1], boxes[k : k + 1], hw)[0])


def test_paste_masks_empty():
  got = paste_masks(np.zeros((0, 28, 28)), np.zeros((0, 4)), (5, 7))
  assert got.shape == (0, 5, 7) and got.dtype == bool


# -------------------------------------------------------------------------------------- encode_rle


def test_encode_rle_round_trip():
  rng = np.random.default_rng(15)
  m = rng.random((4, 13, 17)) < 0.4
  m[1] = False
  m[2] = True
  rles = encode_rle(m)
  assert len(rles) == 4
  for k, rle in enumerate(rles):
    assert isinstance(rle['counts'], str) and list(rle['size']) == [13, 17]
    back = dict(rle, counts=rle['counts'].encode('ascii'))
    np.testing.assert_array_equal(mask_utils.decode(back).astype(bool), m[k])
  json.dumps([dict(r, size=list(r['size'])) for r in rles])  # JSON-ready
  assert encode_rle(np.zeros((0, 3, 3), bool)) == []


def test_paste_then_rle_areas():
  rng = np.random.default_rng(16)
  masks, boxes = _paste_cases(rng, (23, 37))
  pasted = paste_masks(masks, boxes, (23, 37))
  rles = encode_rle(pasted)
  areas = mask_utils.area([dict(r, counts=r['counts'].encode()) for r in rles])
  np.testing.assert_array_equal(areas, pasted.sum((1, 2)))
