"""Independent numpy float64 references written from the spec (shared/reference/authors_code_spec.md).

Plain loops and explicit formulas on purpose: they must not share code or vectorization tricks with the
library they check. Boxes are continuous xyxy (area = (x2 - x1) * (y2 - y1)).
"""

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[M, 4], [K, 4] -> [M, K] float64; 0 where the union is 0."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  out = np.zeros((len(a), len(b)))
  for i in range(len(a)):
    for j in range(len(b)):
      iw = max(0.0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
      ih = max(0.0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
      inter = iw * ih
      area_a = max(0.0, a[i, 2] - a[i, 0]) * max(0.0, a[i, 3] - a[i, 1])
      area_b = max(0.0, b[j, 2] - b[j, 0]) * max(0.0, b[j, 3] - b[j, 1])
      union = area_a + area_b - inter
      out[i, j] = inter / union if union > 0 else 0.0
  return out


def encode(boxes: np.ndarray, anchors: np.ndarray, weights=(10.0, 10.0, 5.0, 5.0)) -> np.ndarray:
  """Box-coder targets (spec 4.3, continuous widths): [..., 4] float64."""
  boxes = np.asarray(boxes, np.float64)
  anchors = np.asarray(anchors, np.float64)
  wx, wy, ww, wh = weights
  aw = anchors[..., 2] - anchors[..., 0]
  ah = anchors[..., 3] - anchors[..., 1]
  acx = anchors[..., 0] + 0.5 * aw
  acy = anchors[..., 1] + 0.5 * ah
  gw = boxes[..., 2] - boxes[..., 0]
  gh = boxes[..., 3] - boxes[..., 1]
  gcx = boxes[..., 0] + 0.5 * gw
  gcy = boxes[..., 1] + 0.5 * gh
  return np.stack(
      [wx * (gcx - acx) / aw, wy * (gcy - acy) / ah, ww * np.log(gw / aw), wh * np.log(gh / ah)], -1
  )


MAX_LOG_RATIO = float(np.log(1000.0 / 16))


def decode(deltas, anchors, weights=(10.0, 10.0, 5.0, 5.0), max_log_ratio=MAX_LOG_RATIO):
  """Inverse of `encode`, dw/dh clamped from above at max_log_ratio: [..., 4] float64."""
  deltas = np.asarray(deltas, np.float64)
  anchors = np.asarray(anchors, np.float64)
  wx, wy, ww, wh = weights
  aw = anchors[..., 2] - anchors[..., 0]
  ah = anchors[..., 3] - anchors[..., 1]
  acx = anchors[..., 0] + 0.5 * aw
  acy = anchors[..., 1] + 0.5 * ah
  dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
  dw = np.minimum(deltas[..., 2] / ww, max_log_ratio)
  dh = np.minimum(deltas[..., 3] / wh, max_log_ratio)
  cx, cy = dx * aw + acx, dy * ah + acy
  w, h = np.exp(dw) * aw, np.exp(dh) * ah
  return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def conv2d(x, kernel, stride=1, pad=0):
  """y = conv(x, kernel) (NHWC / HWIO, one group, symmetric zero padding) in numpy float64 from the definition
  y[n, y, x, o] = sum_{i, j, c} xpad[n, s*y + i, s*x + j, c] k[i, j, c, o]."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  kh, kw, _, cout = kernel.shape
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
  y = np.zeros((x.shape[0], ho, wo, cout))
  for i in range(kh):
    for j in range(kw):
      window = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      y += np.einsum('nyxc,co->nyxo', window, kernel[i, j])
  return y


def conv_grads(x, kernel, g, stride, pad, groups):
  """(dx, dkernel) of y = conv(x, kernel) (NHWC / HWIO, symmetric zero padding) for output cotangent g, in numpy
  float64 from the definition y[n, y, x, o] = sum_{i, j, c} xpad[n, s*y + i, s*x + j, c] k[i, j, c, o]."""
  x, kernel, g = (np.asarray(a, np.float64) for a in (x, kernel, g))
  kh, kw, cin_g, cout = kernel.shape
  n, ho, wo, _ = g.shape
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dxp, dk = np.zeros_like(xp), np.zeros_like(kernel)
  cout_g = cout // groups
  for i in range(kh):
    for j in range(kw):
      window = (slice(None), slice(i, i + stride * (ho - 1) + 1, stride), slice(j, j + stride * (wo - 1) + 1, stride))
      for k in range(groups):
        cs, os = slice(k * cin_g, (k + 1) * cin_g), slice(k * cout_g, (k + 1) * cout_g)
        dk[i, j, :, os] = np.einsum('nyxc,nyxo->co', xp[window + (cs,)], g[..., os])
        dxp[window + (cs,)] += np.einsum('nyxo,co->nyxc', g[..., os], kernel[i, j, :, os])
  return dxp[:, pad:pad + x.shape[1], pad:pad + x.shape[2]], dk
