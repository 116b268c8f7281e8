"""Building blocks shared by the backbone, FPN and heads: conv, frozen BN, GroupNorm, norm factory.

Every module here takes a compute `dtype` (float32 or bfloat16) and keeps its parameters in float32
(`param_dtype`). Layout is NHWC; kernels are HWIO (`[kh, kw, Cin / groups, Cout]`), as in `flax.linen.Conv`,
so a PyTorch OIHW weight converts with `w.transpose(2, 3, 1, 0)`.

Paddings are explicit and symmetric, like PyTorch's: flax's 'SAME' pads (0, 1) for a stride-2 3x3 conv where
PyTorch pads (1, 1), which would shift every strided feature map by a pixel against converted weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from retinamask_jax.models import winograd as winograd_lib

Dtype = Any
Initializer = Callable[..., jax.Array]
ModuleDef = Any

NORMS = ('frozen_bn', 'group_norm', 'none')
KERNEL_GRADS = ('xla', 'taps', 'by_size')
# 'by_size' uses taps from this much kernel-gradient work up (2 * output pixels * kh * kw * Cin/groups * Cout,
# batch included), and for every grouped conv. Below it the 9 slices and small matmuls cost more than XLA's
# convolution saves (bench/bench_conv_grad.py: 64-128 channel convs at 0.45 GFLOP lose ~1.4x, from ~1.2 GFLOP up
# taps win 1.2-2.5x; grouped convs win 35x).
TAPS_MIN_FLOPS = 1e9

# torchvision ResNet / the authors' mask head: kaiming_normal_(mode='fan_out', nonlinearity='relu').
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# Caffe2 "XavierFill" = PyTorch kaiming_uniform_(a=1): U(-b, b) with b = sqrt(3 / fan_in) (FPN, P6/P7).
kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  a, b = v
  return (int(a), int(b))


def _conv(x, kernel, strides, padding, groups, precision):
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups, precision=precision,
  )


def pixel_contraction(a: jax.Array, b: jax.Array, precision: Any = None) -> jax.Array:
  """a [rows, P] and b [rows, Q] -> a^T b [P, Q] float32: a kernel gradient as one contraction over the pixel
  axis of both operands. Stated this way (not by autodiff of a forward einsum), XLA's CPU backend feeds both operands
  to the matmul as they are instead of transposing the cotangent inside a loop fusion that also recomputes the
  elementwise backward before it (~30 ms per R-50 res4 block at 512 x 512; 8% of that train step)."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def kernel_grad_by_taps(
    x: jax.Array, g: jax.Array, kernel_shape: Sequence[int], strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]], groups: int, precision: Any = None,
) -> jax.Array:
  """Gradient of a conv's kernel as one matmul per kernel tap: dK[i, j] = sum_{n,y,x} x[n, s*y + i, s*x + j] g[n, y, x].

  x: [N, H, W, Cin] conv input; g: [N, Ho, Wo, Cout] cotangent of its output; kernel_shape (kh, kw, Cin / groups,
  Cout); strides (sh, sw); padding ((top, bottom), (left, right)). Returns [kh, kw, Cin / groups, Cout] float32.
  The same sums as XLA's weight-gradient convolution in another order; on CPU, where that convolution runs far
  below matmul speed for large and grouped convs (bench/bench_conv_grad.py), the kh * kw strided slices and
  [Cin, N*Ho*Wo] @ [N*Ho*Wo, Cout] matmuls are faster.
  """
  kh, kw, cin_g, cout = kernel_shape
  n, ho, wo, _ = g.shape
  (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  rows = n * ho * wo
  g2 = g.reshape(rows, groups, cout // groups)
  taps = []
  for i in range(kh):
    for j in range(kw):
      # NHWC slices keep channels minor, so each tap is a plain [rows, Cin] matrix; contracting its leading
      # axis beats transposing x first (a strided copy) by 2x on CPU.
      xs = jax.lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, x.shape[3]),
                         (1, sh, sw, 1)).reshape(rows, groups, cin_g)
      if groups == 1:  # a plain matmul: XLA's CPU dot with a batch dimension is slower
        taps.append(pixel_contraction(xs[:, 0], g2[:, 0], precision))
      else:
        tap = jax.lax.dot_general(xs, g2, (((0,), (0,)), ((1,), (1,))), precision=precision,
                                  preferred_element_type=jnp.float32)  # [groups, cin_g, cout_g]
        # Output channel o of group k is k * cout_g + o.
        taps.append(jnp.moveaxis(tap, 0, 1).reshape(cin_g, cout))
  return jnp.stack(taps).reshape(kh, kw, cin_g, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv_with_tap_grad(x, kernel, strides, padding, groups, precision=None):
  """`lax.conv_general_dilated` (NHWC, HWIO) whose kernel gradient is `kernel_grad_by_taps`; the input gradient
  is XLA's own (a forward-type convolution, fast everywhere)."""
  return _conv(x, kernel, strides, padding, groups, precision)


def _conv_tap_fwd(x, kernel, strides, padding, groups, precision):
  return _conv(x, kernel, strides, padding, groups, precision), (x, kernel)


def _conv_tap_bwd(strides, padding, groups, precision, residuals, g):
  x, kernel = residuals
  # The input gradient alone (XLA drops it when nothing consumes it, e.g. behind a stop_gradient).
  _, input_vjp = jax.vjp(lambda x_: _conv(x_, kernel, strides, padding, groups, precision), x)
  (dx,) = input_vjp(g)
  return dx, kernel_grad_by_taps(x, g, kernel.shape, strides, padding, groups, precision).astype(kernel.dtype)


conv_with_tap_grad.defvjp(_conv_tap_fwd, _conv_tap_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul_1x1(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
  """x [N, H, W, Cin] @ kernel [Cin, Cout] -> [N, H, W, Cout]: an unpadded 1x1 conv, with its own VJP only to state
  the kernel gradient as a `pixel_contraction`."""
  return jnp.einsum('nhwc,cd->nhwd', x, kernel, precision=precision)


def _matmul_1x1_fwd(x, kernel, precision):
  return matmul_1x1(x, kernel, precision), (x, kernel)


def _matmul_1x1_bwd(precision, residuals, g):
  x, kernel = residuals
  dx = jnp.einsum('nhwd,cd->nhwc', g, kernel, precision=precision)
  dk = pixel_contraction(x.reshape(-1, x.shape[3]), g.reshape(-1, g.shape[3]), precision)
  return dx, dk.astype(kernel.dtype)


matmul_1x1.defvjp(_matmul_1x1_fwd, _matmul_1x1_bwd)


Geometry = tuple[tuple[int, int], tuple[int, int], int, Any]  # strides, symmetric padding, groups, precision


def compute_plan(plan: tuple[str, int], geometry: Geometry, x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [N, H, W, Cin], kernel [kh, kw, Cin / groups, Cout] -> the conv output computed by `plan` (`Conv.plan`)."""
  (sh, sw), (ph, pw), groups, precision = geometry
  algorithm, m = plan
  if algorithm == 'matmul':
    # Output pixel i of an unpadded 1x1 conv with stride s reads input pixel s * i.
    return matmul_1x1(x[:, ::sh, ::sw, :], kernel[0, 0], precision)
  if algorithm == 'winograd':
    return winograd_lib.conv3x3(x, kernel, m)
  if algorithm == 'taps':
    return conv_with_tap_grad(x, kernel, (sh, sw), ((ph, ph), (pw, pw)), groups, precision)
  return _conv(x, kernel, (sh, sw), ((ph, ph), (pw, pw)), groups, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def conv_by_platform(cpu_plan: tuple[str, int], other_plan: tuple[str, int], geometry: Geometry, x: jax.Array,
                     kernel: jax.Array) -> jax.Array:
  """`compute_plan(cpu_plan, ...)` in programs lowered for CPU, `compute_plan(other_plan, ...)` elsewhere
  (`jax.lax.platform_dependent`), with gradients chosen the same way.

  Its own VJP, each pass one platform switch over the plans' forward and backward rules, so that autodiff never
  runs through the switch: differentiating a `lax.platform_dependent` traces both branches' JVP, partial
  evaluation and transpose, which doubled the R-50 train step's trace time.
  """
  return jax.lax.platform_dependent(
      x, kernel, cpu=functools.partial(compute_plan, cpu_plan, geometry),
      default=functools.partial(compute_plan, other_plan, geometry),
  )


def _plan_forward(plan, geometry, v_like, x, kernel):
  """(y, (x or zeros, Winograd's V or zeros)): residuals of one structure for every plan of a switch."""
  if plan[0] == 'winograd':
    y, v = winograd_lib.forward(x, kernel, plan[1])
    return y, (jnp.zeros_like(x), v)  # unused on this branch's platform: XLA drops it
  zeros = None if v_like is None else jnp.zeros(v_like.shape, v_like.dtype)
  return compute_plan(plan, geometry, x, kernel), (x, zeros)


def _plan_backward(plan, geometry, x, v, kernel, g):
  if plan[0] == 'winograd':
    return winograd_lib.conv3x3_backward(plan[1], (v, kernel), g)
  # The plan's own gradient rules (custom ones for matmul / taps, XLA's for the conv); the recomputed forward
  # output is unused and dropped by XLA.
  _, vjp = jax.vjp(functools.partial(compute_plan, plan, geometry), x, kernel)
  return vjp(g)


def _conv_by_platform_fwd(cpu_plan, other_plan, geometry, x, kernel):
  tiles = [m for algorithm, m in (cpu_plan, other_plan) if algorithm == 'winograd']
  v_like = jax.eval_shape(functools.partial(winograd_lib.input_transform, m=tiles[0]), x) if tiles else None
  y, (xr, v) = jax.lax.platform_dependent(
      x, kernel, cpu=functools.partial(_plan_forward, cpu_plan, geometry, v_like),
      default=functools.partial(_plan_forward, other_plan, geometry, v_like),
  )
  return y, (xr, v, kernel)


def _conv_by_platform_bwd(cpu_plan, other_plan, geometry, residuals, g):
  x, v, kernel = residuals
  return jax.lax.platform_dependent(
      x, v, kernel, g, cpu=functools.partial(_plan_backward, cpu_plan, geometry),
      default=functools.partial(_plan_backward, other_plan, geometry),
  )


conv_by_platform.defvjp(_conv_by_platform_fwd, _conv_by_platform_bwd)


def _enabled(option: bool | str, on_cpu: bool, name: str) -> bool:
  """A CPU-algorithm option in a CPU program (`on_cpu`) or any other: True / 'on' and False / 'off' force,
  'auto' means CPU programs only."""
  if option == 'auto':
    return on_cpu
  if option in (True, 'on', False, 'off'):
    return option in (True, 'on')
  raise ValueError(f"{name} must be 'auto', 'on' or 'off' (or a bool), got {option!r}")


class Conv(nn.Module):
  """2-D convolution with PyTorch-style symmetric padding; a drop-in for `nn.Conv` parameter-wise.

  Parameters: `kernel` [kh, kw, Cin / feature_group_count, features] and, when `use_bias`, `bias` [features],
  exactly the names and shapes of `nn.Conv`, so checkpoints do not depend on `as_matmul`.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw) or an int.
    strides: (sh, sw) or an int.
    padding: symmetric zero padding per spatial dim, (ph, pw) or an int (PyTorch's `padding`).
    feature_group_count: groups (ResNeXt cardinality).
    use_bias: add a bias.
    as_matmul: compute an unpadded, ungrouped 1x1 conv as `x[:, ::sh, ::sw] @ kernel[0, 0]`. Numerically the
      same as the convolution; on CPU the weight gradient of a matmul is much faster than that of a conv.
      False / 'off', True / 'on', or 'auto' (in CPU programs only; see "Per platform" below).
    kernel_grad: how the kernel gradient of a (non-matmul) conv is computed: 'xla' (XLA's weight-gradient
      convolution), 'taps' (`kernel_grad_by_taps`, one matmul per kernel tap: the same sums, faster on CPU for
      large convs), 'by_size' (taps for grouped convs and from `TAPS_MIN_FLOPS` of work up, else xla; decided
      at trace time from the static shapes) or 'auto' ('by_size' in CPU programs, 'xla' elsewhere).
    winograd: compute a float32 3x3 conv with stride 1, padding 1 and one group by Winograd's algorithm
      (`winograd.conv3x3`, 2.25-4x fewer multiplies, its own gradients) with the tile size that pays for its
      shapes (`winograd.tile_for`; the direct conv where none does). The same function up to float32 rounding
      (~1e-5 of the largest output). False / 'off', True / 'on', or 'auto' (in CPU programs only).
    dtype: compute dtype (inputs and kernel are cast to it); param_dtype: parameter dtype.

  Per platform: the three options above are CPU algorithms (XLA's CPU convolutions run below matmul speed where
  they help; cuDNN and the TPU compiler pick their own algorithms for XLA's convolution). 'auto' decides per
  *lowering* platform, not per host: the layer emits `jax.lax.platform_dependent(cpu=<CPU algorithm>,
  default=<XLA's convolution>)`, so a program jitted on a CPU host runs the CPU algorithm, while the same model
  lowered or exported for 'cuda' / 'tpu' (even on a CPU host, even together with 'cpu' in one `jax.export`
  artifact) holds one `stablehlo.convolution` there. Only the branch of the platform being lowered reaches the
  compiler, and where both platforms would compute the same thing no branch is emitted at all. 'on' / 'off'
  force a choice on every platform.
  """

  features: int
  kernel_size: int | Sequence[int] = (3, 3)
  strides: int | Sequence[int] = 1
  padding: int | Sequence[int] = 0
  feature_group_count: int = 1
  use_bias: bool = True
  as_matmul: bool | str = False
  kernel_grad: str = 'xla'
  winograd: bool | str = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = kaiming_normal_fan_out
  bias_init: Initializer = nn.initializers.zeros_init()
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, Cin] -> [N, H', W', features] in `dtype`."""
    kh, kw = _pair(self.kernel_size)
    sh, sw = _pair(self.strides)
    ph, pw = _pair(self.padding)
    cin = x.shape[-1]
    if cin % self.feature_group_count:
      raise ValueError(f'{cin} input channels are not divisible by {self.feature_group_count} groups')
    kernel = self.param(
        'kernel', self.kernel_init, (kh, kw, cin // self.feature_group_count, self.features), self.param_dtype
    )
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    cpu_plan, other_plan = self.plan(x.shape, on_cpu=True), self.plan(x.shape, on_cpu=False)
    geometry = (_pair(self.strides), _pair(self.padding), self.feature_group_count, self.precision)
    if cpu_plan == other_plan:
      y = compute_plan(cpu_plan, geometry, x, kernel)
    else:
      # Resolved when the program is lowered for its platform(s): a CPU-only jit compiles only `cpu_plan`.
      y = conv_by_platform(cpu_plan, other_plan, geometry, x, kernel)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y

  def plan(self, x_shape: Sequence[int], on_cpu: bool) -> tuple[str, int]:
    """The algorithm this layer computes for an input of `x_shape` in a CPU program (`on_cpu`) or any other:
    ('matmul', 0), ('winograd', m), ('taps', 0) or ('xla', 0). Static: from the options and shapes only."""
    kh, kw = _pair(self.kernel_size)
    (sh, sw), (ph, pw) = _pair(self.strides), _pair(self.padding)
    if self.kernel_grad not in KERNEL_GRADS + ('auto',):
      raise ValueError(f"kernel_grad must be one of {KERNEL_GRADS + ('auto',)}, got {self.kernel_grad!r}")
    if _enabled(self.as_matmul, on_cpu, 'as_matmul') and (kh, kw, ph, pw, self.feature_group_count) == (
        1, 1, 0, 0, 1):
      return ('matmul', 0)
    if m := self._winograd_tile(x_shape, (kh, kw, sh, sw, ph, pw), on_cpu):
      return ('winograd', m)
    kernel_grad = ('by_size' if on_cpu else 'xla') if self.kernel_grad == 'auto' else self.kernel_grad
    if kernel_grad == 'taps' or (kernel_grad == 'by_size' and self._taps_pay(x_shape, (kh, kw))):
      return ('taps', 0)
    return ('xla', 0)

  def _winograd_tile(self, x_shape: Sequence[int], geometry: tuple[int, ...], on_cpu: bool) -> int:
    if not _enabled(self.winograd, on_cpu, 'winograd') or geometry != (3, 3, 1, 1, 1, 1):
      return 0
    if self.feature_group_count != 1:
      return 0
    if jnp.dtype(self.dtype) != jnp.float32 or self.precision is not None:
      return 0  # bfloat16 loses too much in the transforms; an explicit precision asks for XLA's conv
    n, h, w, cin = x_shape
    return winograd_lib.tile_for(n, h, w, cin, self.features)

  def _taps_pay(self, x_shape: Sequence[int], kernel_hw: tuple[int, int]) -> bool:
    if self.feature_group_count > 1:
      return True
    n, h, w, cin = x_shape
    (sh, sw), (ph, pw) = _pair(self.strides), _pair(self.padding)
    out_pixels = n * ((h + 2 * ph - kernel_hw[0]) // sh + 1) * ((w + 2 * pw - kernel_hw[1]) // sw + 1)
    return 2.0 * out_pixels * kernel_hw[0] * kernel_hw[1] * cin * self.features >= TAPS_MIN_FLOPS


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _deconv_matmul(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
  """x [N, H, W, Cin], kernel [f, f, Cin, Cout] -> [N, f*H, f*W, Cout] for a stride-f, kernel-f transposed conv."""
  n, h, w, _ = x.shape
  f = kernel.shape[0]
  y = jnp.einsum('nhwc,abco->nhawbo', x, kernel, precision=precision)
  return y.reshape(n, h * f, w * f, kernel.shape[-1])


def _deconv_matmul_fwd(x, kernel, precision):
  return _deconv_matmul(x, kernel, precision), (x, kernel)


def _deconv_matmul_bwd(precision, residuals, g):
  # As for `matmul_1x1`: the kernel gradient as a `pixel_contraction` (45 ms of op time per shapes-recipe step
  # before, in the mask head).
  x, kernel = residuals
  n, h, w, cin = x.shape
  f, cout = kernel.shape[0], kernel.shape[-1]
  g6 = g.reshape(n, h, f, w, f, cout)
  dx = jnp.einsum('nhawbo,abco->nhwc', g6, kernel, precision=precision)
  rows = n * h * w
  g2 = jnp.transpose(g6, (0, 1, 3, 2, 4, 5)).reshape(rows, f * f * cout)  # [(n, y, x), (a, b, o)]
  dk = pixel_contraction(x.reshape(rows, cin), g2, precision)  # [cin, (a, b, o)]
  dk = jnp.transpose(dk.reshape(cin, f, f, cout), (1, 2, 0, 3))
  return dx, dk.astype(kernel.dtype)


_deconv_matmul.defvjp(_deconv_matmul_fwd, _deconv_matmul_bwd)


class ConvTransposeNonOverlapping(nn.Module):
  """Transposed convolution whose kernel equals its stride (the mask head's 2x2/2 "deconv").

  With kernel == stride the output windows do not overlap: input pixel (i, j) writes `x[i, j] @ kernel[a, b]` to
  output pixel (f*i + a, f*j + b). That is one matmul and a reshape. Same function as PyTorch's
  `ConvTranspose2d(Cin, Cout, f, stride=f)` with `kernel[a, b, c, o] = weight[c, o, a, b]` (no flip).

  Parameters: `kernel` [f, f, Cin, features], `bias` [features].
  """

  features: int
  factor: int = 2
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # PyTorch's kaiming_normal_(mode='fan_out') on a ConvTranspose2d weight [Cin, Cout, f, f] takes
  # fan_out = Cin * f * f (its dim 0); in_axis / out_axis swapped reproduces that.
  kernel_init: Initializer = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal', in_axis=-1, out_axis=-2)
  bias_init: Initializer = nn.initializers.zeros_init()
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, Cin] -> [N, f*H, f*W, features] in `dtype`."""
    f = self.factor
    kernel = self.param('kernel', self.kernel_init, (f, f, x.shape[-1], self.features), self.param_dtype)
    y = _deconv_matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.precision)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class FrozenBatchNorm(nn.Module):
  """Fixed per-channel affine y = x * scale + bias (spec section 7 / 10, "Frozen BN").

  `scale` and `bias` [C] live in the `frozen` collection: never in `params`, never seen by the optimizer.
  They start at 1 and 0; converters fold BN statistics into them: scale = gamma / sqrt(var + eps),
  bias = beta - mean * scale (eps = 0 for the MSRA C2 weights, 1e-5 for torchvision's).
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] -> [..., C] in `dtype`."""
    c = x.shape[-1]
    scale = self.variable('frozen', 'scale', lambda: jnp.ones((c,), self.param_dtype))
    bias = self.variable('frozen', 'bias', lambda: jnp.zeros((c,), self.param_dtype))
    return x.astype(self.dtype) * scale.value.astype(self.dtype) + bias.value.astype(self.dtype)


def num_groups_for(channels: int, max_groups: int = 32) -> int:
  """GroupNorm group count: `max_groups` (32) when it divides `channels`, else the largest divisor <= it."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  raise ValueError(f'channels must be positive, got {channels}')


class GroupNorm(nn.Module):
  """GroupNorm over the last axis (PyTorch `nn.GroupNorm` semantics: biased variance, eps inside the sqrt).

  The group count is chosen from the channel count at call time (`num_groups_for`), so slim widths work.
  Statistics are computed in float32 whatever the compute dtype. Parameters: `scale` [C] (init 1), `bias` [C]
  (init 0), the names of `nn.GroupNorm`.
  """

  max_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, ..., C] -> same shape in `dtype`."""
    c = x.shape[-1]
    g = num_groups_for(c, self.max_groups)
    scale = self.param('scale', nn.initializers.ones_init(), (c,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (c,), self.param_dtype)
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], g, c // g)
    axes = tuple(range(1, x32.ndim - 2)) + (x32.ndim - 1,)
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (y * scale + bias).astype(self.dtype)


def _identity(x: jax.Array) -> jax.Array:
  return x


def make_norm(kind: str, dtype: Dtype = jnp.float32) -> Callable[..., Callable[[jax.Array], jax.Array]]:
  """Norm factory: `make_norm(kind, dtype)(name=...)` -> a layer `[..., C] -> [..., C]`.

  kind: 'frozen_bn' (FrozenBatchNorm, `frozen` collection), 'group_norm' (GroupNorm, 32 groups or the largest
  divisor of C below, eps 1e-5), or 'none' (identity; creates nothing).
  """
  if kind == 'frozen_bn':
    return functools.partial(FrozenBatchNorm, dtype=dtype)
  if kind == 'group_norm':
    return functools.partial(GroupNorm, dtype=dtype)
  if kind == 'none':
    return lambda name=None: _identity
  raise ValueError(f'unknown norm {kind!r}; expected one of {NORMS}')
