"""ROI-Align on NHWC feature maps, single- and multi-level (spec 5.3; DESIGN.md 5, 8).

Semantics are torchvision's `roi_align` for a fixed `sampling_ratio > 0`, which for `aligned=False`
is the authors' legacy kernel (maskrcnn-benchmark `ROIAlign_cuda.cu`):
  - a box is scaled by `spatial_scale` (minus 0.5 when aligned), RoI width/height clamped to >= 1
    unless aligned;
  - each of the S x S bins averages `sampling_ratio`^2 bilinear samples at the sub-bin centres;
  - a sample with y < -1 or y > H (likewise x) contributes 0; a coordinate <= 0 is clamped to 0; a
    sample whose floor is >= H - 1 reads row H - 1 only.

Implementation: the bilinear weights are separable, and so are the border rules (a sample is zero
when its y or its x is out of range), so each axis gets its own taps: for each of the S bins,
sampling_ratio sub-samples x {low, high} corner, i.e. 2 * sampling_ratio (row index, weight) pairs
along y and as many (column, weight) pairs along x, with validity and the 1/sampling_ratio of the
average folded into the weights. Their products are the T = 4 * sampling_ratio^2 two-dimensional
taps of each bin, and the output is sum_t w_t * features[index_t]. The features of all levels are
flattened into one [N * P, C] array (P = positions over all levels), so a tap index is
(image offset + level offset + row * level width + column), and several FPN levels cost the same
single gather per tap as one level (never one pass per level, never every box on every level).
A `lax.scan` over the T taps keeps memory at about twice the output both ways: each step is one
gather fused with a multiply-add into the accumulator, and its transpose one scatter-add.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _axis_taps(
    start: jnp.ndarray,
    bin_size: jnp.ndarray,
    length: jnp.ndarray,
    output_size: int,
    sampling_ratio: int,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Bilinear taps along one axis for every sample position of every box.

  Args:
    start: [N, R] float32, RoI start along the axis in feature pixels.
    bin_size: [N, R] float32, bin size in feature pixels.
    length: [N, R] float32, the feature map's extent along the axis (H or W of the box's level).
    output_size: S (static).
    sampling_ratio: samples per bin along the axis (static, > 0).
  Returns:
    lo, hi: [N, R, S * sampling_ratio] int32 indices in [0, length - 1].
    w_lo, w_hi: [N, R, S * sampling_ratio] float32 weights, zero for out-of-range samples.
  """
  # Sample k = p * g + i sits in bin p at sub-position i; the formula keeps torchvision's evaluation
  # order (start + p * bin + (i + 0.5) * bin / g) so float32 rounding matches it as closely as
  # possible.
  p = np.repeat(np.arange(output_size), sampling_ratio).astype(np.float32)
  i = np.tile(np.arange(sampling_ratio), output_size).astype(np.float32)
  bin_size = bin_size[..., None]
  coord = start[..., None] + p * bin_size + (i + 0.5) * bin_size / np.float32(sampling_ratio)
  length = length[..., None]
  valid = (coord >= -1.0) & (coord <= length)
  c = jnp.maximum(coord, 0.0)
  lo = jnp.floor(c)
  at_border = lo >= length - 1.0
  lo = jnp.where(at_border, length - 1.0, lo)
  frac = jnp.where(at_border, 0.0, c - lo)
  hi = jnp.where(at_border, lo, lo + 1.0)
  # Clipping only matters for invalid (zero-weight) samples, e.g. NaN or huge coordinates: keep
  # gathers in range.
  lo = jnp.clip(lo, 0.0, length - 1.0).astype(jnp.int32)
  hi = jnp.clip(hi, 0.0, length - 1.0).astype(jnp.int32)
  valid = valid.astype(jnp.float32)
  return lo, hi, (1.0 - frac) * valid, frac * valid


def _roi_align_flat(
    flat: jnp.ndarray,
    boxes: jnp.ndarray,
    base: jnp.ndarray,
    height: jnp.ndarray,
    width: jnp.ndarray,
    scale: jnp.ndarray,
    output_size: int,
    sampling_ratio: int,
    aligned: bool,
) -> jnp.ndarray:
  """ROI-Align of boxes that each read their own map out of one flattened feature array.

  Args:
    flat: [T, C] features; box (n, r) reads the row-major map flat[base : base + height * width].
    boxes: [N, R, 4] float, xyxy in image pixels.
    base: [N, R] int32 offset of the box's map in `flat`.
    height, width: [N, R] int32 size of the box's map.
    scale: [N, R] float32 image-to-feature scale of the box's map.
  Returns:
    [N, R, S, S, C] in flat's dtype.
  """
  if sampling_ratio <= 0:
    raise ValueError(f'sampling_ratio must be > 0 (static sample grid), got {sampling_ratio}')
  s, g = output_size, sampling_ratio
  # No gradient w.r.t. boxes, as in torchvision and the authors' kernel (proposals are detached).
  boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
  offset = 0.5 if aligned else 0.0
  x1 = boxes[..., 0] * scale - offset
  y1 = boxes[..., 1] * scale - offset
  x2 = boxes[..., 2] * scale - offset
  y2 = boxes[..., 3] * scale - offset
  roi_w = x2 - x1
  roi_h = y2 - y1
  if not aligned:
    roi_w = jnp.maximum(roi_w, 1.0)
    roi_h = jnp.maximum(roi_h, 1.0)
  hf = height.astype(jnp.float32)
  wf = width.astype(jnp.float32)
  ylo, yhi, wylo, wyhi = _axis_taps(y1, roi_h / s, hf, s, g)  # [N, R, K]
  xlo, xhi, wxlo, wxhi = _axis_taps(x1, roi_w / s, wf, s, g)

  n, r = boxes.shape[:2]

  def per_tap(a):
    # [N, R, S * g] ordered (bin, sub-sample) -> [g, N, R, S]: one slice per sub-sample position.
    return jnp.moveaxis(a.reshape(n, r, s, g), 3, 0)

  # 1-D taps: 2g per axis (g sub-samples x {low, high} corner), each an index and a weight per bin;
  # the 1/g of the bin average is folded into each axis' weights.
  rows = base[..., None] + jnp.stack([ylo, yhi]) * width[..., None]  # [2, N, R, K] flat row offsets
  rows = jnp.concatenate([per_tap(rows[0]), per_tap(rows[1])])  # [2g, N, R, S]
  cols = jnp.concatenate([per_tap(xlo), per_tap(xhi)])
  wy = jnp.concatenate([per_tap(wylo), per_tap(wyhi)]) * np.float32(1.0 / g)
  wx = jnp.concatenate([per_tap(wxlo), per_tap(wxhi)]) * np.float32(1.0 / g)
  # 2-D taps: the (2g)^2 products, [T = 4 g^2, N, R, S, S]; small (no channel dimension).
  num_taps = 4 * g * g
  idx = (rows[:, None, ..., :, None] + cols[None, :, ..., None, :]).reshape(num_taps, n, r, s, s)
  wts = (wy[:, None, ..., :, None] * wx[None, :, ..., None, :]).reshape(num_taps, n, r, s, s)

  # A scan over the taps, each step one gather fused with a multiply-add into the [N, R, S, S, C]
  # accumulator: peak memory stays about twice the output in the forward and in the backward (one
  # scatter-add per tap), whereas one gather of all taps materializes 4 g^2 outputs' worth (1.3 GB
  # at N=2, R=200, C=256; see bench/bench_roi_align.py). A gather feeding a reduction is not fused
  # on CPU, one feeding an add is.
  def step(acc, tap):
    i, w = tap
    return acc + w[..., None] * flat[i], None

  acc = jnp.zeros((n, r, s, s, flat.shape[-1]), jnp.float32)
  out, _ = jax.lax.scan(step, acc, (idx, wts))
  return out.astype(flat.dtype)


def _compute_dtype(x: jnp.ndarray) -> jnp.dtype:
  # bf16 features are read as bf16 and accumulated in float32 (the weights are float32).
  return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


def roi_align(
    features: jnp.ndarray,
    boxes: jnp.ndarray,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> jnp.ndarray:
  """ROI-Align with torchvision's semantics for a fixed sampling ratio (stable API, DESIGN.md 8).

  Args:
    features: [N, H, W, C] float (float32 or bfloat16), NHWC.
    boxes: [N, R, 4] float32 xyxy in image (canvas) pixels; box (n, r) is pooled from image n.
    output_size: S, static.
    spatial_scale: image-to-feature scale (e.g. 1/8 for P3); a Python float or a traced scalar.
    sampling_ratio: samples per bin along each axis, static and > 0 (the adaptive `<= 0` mode would
      need box-dependent sample counts, i.e. dynamic shapes).
    aligned: False = legacy (authors') variant, True = half-pixel corrected (offset -0.5, no size
      clamp).
  Returns:
    [N, R, S, S, C] in features' dtype. Differentiable w.r.t. features (not boxes).
  """
  features = jnp.asarray(features)
  features = features.astype(_compute_dtype(features))
  boxes = jnp.asarray(boxes)
  n, h, w, c = features.shape
  r = boxes.shape[1]
  flat = features.reshape(n * h * w, c)
  base = jnp.broadcast_to((jnp.arange(n, dtype=jnp.int32) * (h * w))[:, None], (n, r))
  height = jnp.full((n, r), h, jnp.int32)
  width = jnp.full((n, r), w, jnp.int32)
  scale = jnp.broadcast_to(jnp.asarray(spatial_scale, jnp.float32), (n, r))
  return _roi_align_flat(
      flat, boxes, base, height, width, scale, output_size, sampling_ratio, aligned
  )


def multilevel_roi_align(
    features: Sequence[jnp.ndarray],
    boxes: jnp.ndarray,
    levels: jnp.ndarray,
    *,
    min_level: int,
    output_size: int = 14,
    sampling_ratio: int = 2,
    aligned: bool = False,
) -> jnp.ndarray:
  """ROI-Align of each box on its own FPN level, in one gather over all levels (spec 5.3).

  Box (n, r) is pooled from `features[levels[n, r] - min_level][n]` with spatial scale
  2**-levels[n, r]; the result equals `roi_align` of that box on that level alone. Levels outside
  the given ones are clipped to them.

  Args:
    features: L arrays [N, H_l, W_l, C] for levels min_level .. min_level + L - 1 (same N, C and
      dtype).
    boxes: [N, R, 4] float32 xyxy in image (canvas) pixels.
    levels: [N, R] int, absolute FPN level of each box (e.g. from `assign_levels`).
    min_level: the level of features[0].
    output_size, sampling_ratio, aligned: as in `roi_align`.
  Returns:
    [N, R, S, S, C] in the features' dtype. Differentiable w.r.t. features (not boxes).
  """
  features = [jnp.asarray(f) for f in features]
  dtype = _compute_dtype(features[0])
  n, c = features[0].shape[0], features[0].shape[-1]
  sizes = [(f.shape[1], f.shape[2]) for f in features]
  for f in features:
    if f.shape[0] != n or f.shape[-1] != c:
      raise ValueError(f'levels disagree on batch/channels: {[f.shape for f in features]}')
  num_positions = [h * w for h, w in sizes]
  total = int(sum(num_positions))
  flat = jnp.concatenate(
      [f.astype(dtype).reshape(n, hw, c) for f, hw in zip(features, num_positions)], axis=1
  )
  flat = flat.reshape(n * total, c)

  # Per-level constants, looked up per box.
  level_start = np.concatenate([[0], np.cumsum(num_positions)[:-1]]).astype(np.int32)
  level_h = np.array([h for h, _ in sizes], np.int32)
  level_w = np.array([w for _, w in sizes], np.int32)
  level_scale = np.array([2.0 ** -(min_level + i) for i in range(len(features))], np.float32)

  boxes = jnp.asarray(boxes)
  idx = jnp.clip(jnp.asarray(levels).astype(jnp.int32) - min_level, 0, len(features) - 1)
  base = jnp.asarray(level_start)[idx] + (jnp.arange(n, dtype=jnp.int32) * total)[:, None]
  height = jnp.asarray(level_h)[idx]
  width = jnp.asarray(level_w)[idx]
  scale = jnp.asarray(level_scale)[idx]
  return _roi_align_flat(
      flat, boxes, base, height, width, scale, output_size, sampling_ratio, aligned
  )


def assign_levels(
    boxes: jnp.ndarray,
    min_level: int,
    max_level: int,
    canonical_level: int = 4,
    canonical_size: float = 224.0,
) -> jnp.ndarray:
  """FPN level of each box: floor(k0 + log2(sqrt(area) / canonical_size + 1e-6)) clipped (spec 5.3).

  Our continuous area equals the authors' +1 area, so levels match theirs. Degenerate boxes
  (negative extents count as 0) go to min_level.

  Args:
    boxes: [..., 4] float xyxy in image pixels.
  Returns:
    [...] int32 in [min_level, max_level].
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  k = jnp.floor(canonical_level + jnp.log2(jnp.sqrt(w * h) / canonical_size + 1e-6))
  return jnp.clip(k, min_level, max_level).astype(jnp.int32)
