"""3x3 stride-1 convolutions by Winograd's minimal filtering, F(m x m, 3 x 3) for m = 2 and 4 (Lavin & Gray 2016).

A 3x3 conv (padding 1, stride 1, one group) computes every m x m output tile from an (m + 2) x (m + 2) input tile
as `A^T [(G k G^T) * (B^T d B)] A`: the (m + 2)^2 elementwise products, summed over input channels, are
(m + 2)^2 independent matmuls [tiles, Cin] @ [Cin, Cout]. That is 36 products per 16 outputs for m = 4 where the
direct conv does 144 (4x fewer), 16 per 4 for m = 2 (2.25x fewer). The transforms B, G, A are small constant
matrices applied as sums of strided slices (elementwise work that XLA fuses). The kernel gradient is the same
structure run backwards (one contraction over the tiles per transform point) and the input gradient is this conv
with the kernel flipped, so training gets the same saving in all three matmul passes.

XLA's CPU backend computes 3x3 convs directly at about matmul speed (bench/bench_winograd.py), so on CPU fewer
multiplies is the lever left, above all for the RetinaNet head, whose convs are all 3x3 stride 1 and 256 wide.
GPU and TPU compilers have their own algorithms; `model.winograd='auto'` uses this only in programs lowered for CPU,
for every 3x3 stride-1 conv where `tile_for` says it pays: `layers.Conv` decides per lowering platform with
`jax.lax.platform_dependent`, so the same model exported for GPU or TPU (even from a CPU host) gets XLA's
convolution there, and its gradients too (tests/test_lowering.py).

Float32 error: the transforms' coefficients (up to 8 and 1/24 for m = 4) cost precision: relative to the largest
output, about 1e-5 for m = 4 and 1e-6 for m = 2 against ~1e-7 for the direct conv.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# (B^T [m + 2, m + 2], G [m + 2, 3], A^T [m, m + 2]) for interpolation points 0, +-1 (m = 2) and 0, +-1, +-2
# (m = 4), and infinity.
TRANSFORMS: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
    2: (
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64),
    ),
    4: (
        np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                  [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64),
    ),
}
TILES = tuple(TRANSFORMS)
# When a tile size pays on CPU (bench/bench_winograd.py): its matmuls ([rows, Cin] @ [Cin, Cout] per transform
# point, rows = N * tiles) need at least MIN_ROWS rows, or the small matmuls and the transforms cost more than the
# direct conv saves; and rounding H, W up to whole tiles may add at most MAX_WASTE of work (14 x 14 mask-head RoIs
# computed as 16 x 16, 1.31x, still gain from m = 4; a 5 x 5 map as 8 x 8 would not).
MIN_ROWS = 128
MAX_WASTE = 1.35
# Narrower convs are memory-bound: the transforms cost what the matmuls save.
MIN_CHANNELS = 64


def _lincomb(coefs: np.ndarray, xs: list[jax.Array]) -> jax.Array:
  """sum_i coefs[i] * xs[i], skipping zero coefficients and multiplying only where |coef| != 1."""
  out = None
  for c, x in zip(coefs, xs):
    if c == 0:
      continue
    term = x if c == 1 else (-x if c == -1 else float(c) * x)
    out = term if out is None else out + term
  assert out is not None
  return out


def _tiles(h: int, w: int, m: int) -> tuple[int, int]:
  return -(-h // m), -(-w // m)


def _combine(mat: np.ndarray, parts: list[jax.Array], axis: int) -> jax.Array:
  """Stack of sum_i mat[r, i] * parts[i] over the rows r of `mat`, on a new axis `axis`. Each part holds the
  whole of the other transform axis, so one call does a full 1-D stage: ~(m + 2) x 4 elementwise ops on large
  arrays instead of (m + 2)^2 x 4 on small ones (the HLO, and so the compile time, shrinks ~5x)."""
  return jnp.stack([_lincomb(row, parts) for row in mat], axis)


def input_transform(x: jax.Array, m: int) -> jax.Array:
  """x [N, H, W, C] -> V [(m + 2)^2, N * th * tw, C] = B^T d B for every (m + 2)^2 tile d of x padded by 1 (and on
  the bottom / right up to whole tiles), th, tw = ceil(H / m), ceil(W / m)."""
  bt = TRANSFORMS[m][0]
  al = m + 2
  n, h, w, c = x.shape
  th, tw = _tiles(h, w, m)
  xp = jnp.pad(x, ((0, 0), (1, m * th + 1 - h), (1, m * tw + 1 - w), (0, 0)))
  rows = _combine(bt, [xp[:, i:i + m * th:m] for i in range(al)], 0)  # [a, N, th, W + 2, C]
  v = _combine(bt, [rows[:, :, :, j:j + m * tw:m] for j in range(al)], 1)  # [a, b, N, th, tw, C]
  return v.reshape(al * al, n * th * tw, c)


def kernel_transform(k: jax.Array, m: int) -> jax.Array:
  """k [3, 3, Cin, Cout] -> U [(m + 2)^2, Cin, Cout] = G k G^T per channel pair (sums of the 9 taps: as a dot
  with a 3-long contraction XLA's CPU backend takes ms for what is a few MFLOP)."""
  g = TRANSFORMS[m][1]
  rows = _combine(g, [k[i] for i in range(3)], 0)  # [a, 3, Cin, Cout]
  u = _combine(g, [rows[:, j] for j in range(3)], 1)  # [a, b, Cin, Cout]
  return u.reshape(-1, *k.shape[2:])


def kernel_transform_transpose(du: jax.Array, m: int) -> jax.Array:
  """du [(m + 2)^2, Cin, Cout] -> [3, 3, Cin, Cout]: dk[i, j] = sum_{a, b} G[a, i] G[b, j] du[a, b]."""
  g = TRANSFORMS[m][1]
  al = m + 2
  du = du.reshape(al, al, *du.shape[1:])
  rows = _combine(g.T, [du[a] for a in range(al)], 0)  # [i, b, Cin, Cout]
  return _combine(g.T, [rows[:, b] for b in range(al)], 1)  # [i, j, Cin, Cout]


def output_transform(mm: jax.Array, m: int, n: int, h: int, w: int) -> jax.Array:
  """mm [(m + 2)^2, N * th * tw, Cout] -> y [N, H, W, Cout]: A^T M A per tile, tiles put in place, cropped."""
  at = TRANSFORMS[m][2]
  al = m + 2
  th, tw = _tiles(h, w, m)
  mm = mm.reshape(al, al, n, th, tw, -1)
  rows = _combine(at, [mm[a] for a in range(al)], 0)  # [u, b, N, th, tw, C]
  y = _combine(at, [rows[:, b] for b in range(al)], 4)  # [u, N, th, tw, v, C]
  y = jnp.transpose(y, (1, 2, 0, 3, 4, 5))  # [N, th, u, tw, v, C]: output pixel (m * ty + u, m * tx + v)
  return y.reshape(n, m * th, m * tw, -1)[:, :h, :w]


def output_transform_transpose(g: jax.Array, m: int) -> jax.Array:
  """g [N, H, W, Cout] (cotangent of y) -> dM [(m + 2)^2, N * th * tw, Cout]: dM[a, b] = sum_{u, v} A^T[u, a]
  A^T[v, b] g[m * ty + u, m * tx + v] (zero past the crop)."""
  at = TRANSFORMS[m][2]
  al = m + 2
  n, h, w, c = g.shape
  th, tw = _tiles(h, w, m)
  gp = jnp.pad(g, ((0, 0), (0, m * th - h), (0, m * tw - w), (0, 0)))
  rows = _combine(at.T, [gp[:, u::m] for u in range(m)], 0)  # [a, N, th, m * tw, C]
  dm = _combine(at.T, [rows[:, :, :, v::m] for v in range(m)], 1)  # [a, b, N, th, tw, C]
  return dm.reshape(al * al, n * th * tw, c)


def _accumulation_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _batched_matmul(v: jax.Array, u: jax.Array) -> jax.Array:
  out = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), preferred_element_type=_accumulation_dtype(v.dtype))
  return out.astype(v.dtype)


def forward(x: jax.Array, k: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """(y, V): `conv3x3`'s output and its residual V = `input_transform(x, m)` (for `conv3x3_backward`)."""
  n, h, w, _ = x.shape
  v = input_transform(x, m)
  y = output_transform(_batched_matmul(v, kernel_transform(k, m)), m, n, h, w)
  return y, v


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3(x: jax.Array, k: jax.Array, m: int = 4) -> jax.Array:
  """x [N, H, W, Cin], k [3, 3, Cin, Cout] (HWIO) -> [N, H, W, Cout]: the 3x3 conv with padding 1 and stride 1
  (`lax.conv_general_dilated`, NHWC), computed by Winograd F(m x m, 3 x 3), m in `TILES`. Any H and W: the last
  tile row / column is zero-padded and cropped. Gradients are Winograd too."""
  return forward(x, k, m)[0]


def _conv3x3_fwd(x, k, m):
  y, v = forward(x, k, m)
  return y, (v, k)


def conv3x3_backward(m: int, residuals: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(dx, dk) of `conv3x3` from its residuals (V, k) and the output cotangent g [N, H, W, Cout]."""
  v, k = residuals
  # The input gradient of a padding-1 3x3 conv is the padding-1 3x3 conv of g with the kernel rotated by 180
  # degrees and its channel axes swapped.
  dx = conv3x3(g, jnp.transpose(k[::-1, ::-1], (0, 1, 3, 2)), m)
  dm = output_transform_transpose(g, m)
  du = jax.lax.dot_general(v, dm, (((1,), (1,)), ((0,), (0,))), preferred_element_type=_accumulation_dtype(v.dtype))
  return dx, kernel_transform_transpose(du, m).astype(k.dtype)


conv3x3.defvjp(_conv3x3_fwd, conv3x3_backward)


def tile_for(n: int, h: int, w: int, cin: int, cout: int) -> int:
  """The Winograd tile size m that pays on CPU for a 3x3 stride-1 conv of an [n, h, w, cin] input to cout
  channels, or 0 for the direct conv: the largest m with at least `MIN_ROWS` rows per matmul and at most
  `MAX_WASTE` of extra work from whole tiles, for convs at least `MIN_CHANNELS` wide on both sides."""
  if min(cin, cout) < MIN_CHANNELS:
    return 0
  for m in sorted(TILES, reverse=True):
    th, tw = _tiles(h, w, m)
    if n * th * tw >= MIN_ROWS and (m * th * m * tw) / (h * w) <= MAX_WASTE:
      return m
  return 0
