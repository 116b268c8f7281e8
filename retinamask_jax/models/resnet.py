"""ResNet-18/34/50/101 and ResNeXt-101-32x8d backbones returning C2..C5 (spec section 7, "ResNet/ResNeXt").

Layout and names map one-to-one onto torchvision's `ResNet` (and the authors' MSRA models):

  torchvision                  here (under the module's scope)
  conv1, bn1                   stem/conv, stem/norm
  layer{i}.{j}.conv{k}, bn{k}  res{i+1}/block{j}/conv{k}, norm{k}
  layer{i}.{j}.downsample.0/1  res{i+1}/block{j}/downsample_conv, downsample_norm

Convolution kernels are in `params`; frozen-BN affines are in `frozen` (see `layers.FrozenBatchNorm`).
`freeze_at = k` stops gradients at the output of the last frozen stage (stem for k = 1, res{k} for k >= 2), so
no gradient and no backward compute reaches the frozen stages; `retinamask.frozen_params_mask` keeps the optimizer
off their parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from retinamask_jax.models import layers
from retinamask_jax.models.layers import Dtype, ModuleDef


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34); the stride sits in the first. Output channels = `planes`."""

  planes: int
  stride: int
  conv: ModuleDef
  norm: ModuleDef
  groups: int = 1  # unused; kept so every block takes the same arguments
  width_per_group: int = 64  # unused
  stride_in_1x1: bool = True  # unused: there is no 1x1 conv

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, Cin] -> [N, H / stride, W / stride, planes]."""
    shortcut = x
    y = self.conv(self.planes, (3, 3), self.stride, padding=1, name='conv1')(x)
    y = nn.relu(self.norm(name='norm1')(y))
    y = self.conv(self.planes, (3, 3), 1, padding=1, name='conv2')(y)
    y = self.norm(name='norm2')(y)
    if self.stride != 1 or x.shape[-1] != self.planes:
      shortcut = self.conv(self.planes, (1, 1), self.stride, name='downsample_conv')(x)
      shortcut = self.norm(name='downsample_norm')(shortcut)
    return nn.relu(y + shortcut.astype(y.dtype))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (grouped) -> 1x1 bottleneck (ResNet-50/101, ResNeXt). Output channels = 4 * `planes`.

  Bottleneck width = int(planes * width_per_group / 64) * groups (torchvision's formula; 256 in res2 of
  X-101-32x8d). The stride sits in the first 1x1 conv when `stride_in_1x1` (MSRA weights) and in the 3x3 conv
  otherwise (torchvision, ResNeXt).
  """

  planes: int
  stride: int
  conv: ModuleDef
  norm: ModuleDef
  groups: int = 1
  width_per_group: int = 64
  stride_in_1x1: bool = True

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, Cin] -> [N, H / stride, W / stride, 4 * planes]."""
    width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
    out = self.planes * self.expansion
    s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    shortcut = x
    y = self.conv(width, (1, 1), s1, name='conv1')(x)
    y = nn.relu(self.norm(name='norm1')(y))
    y = self.conv(width, (3, 3), s3, padding=1, feature_group_count=self.groups, name='conv2')(y)
    y = nn.relu(self.norm(name='norm2')(y))
    y = self.conv(out, (1, 1), 1, name='conv3')(y)
    y = self.norm(name='norm3')(y)
    if self.stride != 1 or x.shape[-1] != out:
      shortcut = self.conv(out, (1, 1), self.stride, name='downsample_conv')(x)
      shortcut = self.norm(name='downsample_norm')(shortcut)
    return nn.relu(y + shortcut.astype(y.dtype))


class Stem(nn.Module):
  """conv 7x7/2 pad 3 -> norm -> ReLU -> max-pool 3x3/2 pad 1 (padding with -inf, as PyTorch)."""

  features: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, 3] -> [N, ceil(H / 4), ceil(W / 4), features] (for H, W multiples of 4: H / 4, W / 4)."""
    x = self.conv(self.features, (7, 7), 2, padding=3, name='conv')(x)
    x = nn.relu(self.norm(name='norm')(x))
    # reduce_window pads with the init value (-inf for max), so padding never wins the max.
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Stage(nn.Module):
  """`num_blocks` blocks named block0..block{K}; the first one carries the stride and the projection."""

  block_cls: ModuleDef
  num_blocks: int
  planes: int
  stride: int
  conv: ModuleDef
  norm: ModuleDef
  groups: int = 1
  width_per_group: int = 64
  stride_in_1x1: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_blocks):
      x = self.block_cls(
          planes=self.planes,
          stride=self.stride if j == 0 else 1,
          conv=self.conv,
          norm=self.norm,
          groups=self.groups,
          width_per_group=self.width_per_group,
          stride_in_1x1=self.stride_in_1x1,
          name=f'block{j}',
      )(x)
    return x


class ResNet(nn.Module):
  """ResNet / ResNeXt feature extractor.

  Attributes:
    stage_sizes: blocks per stage res2..res5, e.g. (3, 4, 6, 3).
    block_cls: `BasicBlock` (18/34) or `Bottleneck` (50/101, ResNeXt).
    base_width: stem channels and res2 `planes` (64 = standard); stage i has base_width * 2^i planes. Smaller
      values give slim backbones for CPU tests.
    groups, width_per_group: ResNeXt cardinality and per-group bottleneck width (1, 64 = plain ResNet).
    stride_in_1x1: MSRA layout (True) or torchvision layout (False); parameter shapes do not depend on it.
    norm: 'frozen_bn' | 'group_norm' | 'none' (convs get a bias only with 'none').
    freeze_at: 0 = train everything; 1 = freeze the stem; k >= 2 = freeze the stem and res2..res{k}.
    conv1x1_as_matmul: compute 1x1 convs as matmuls (same parameters, same numbers).
    conv_kernel_grad: 'xla', 'taps' or 'by_size', see `layers.Conv.kernel_grad`.
    winograd: compute the 3x3 stride-1 convs by Winograd's algorithm where it pays, see `layers.Conv.winograd`.
    dtype: compute dtype; parameters are float32.
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  base_width: int = 64
  groups: int = 1
  width_per_group: int = 64
  stride_in_1x1: bool = True
  norm: str = 'frozen_bn'
  freeze_at: int = 2
  conv1x1_as_matmul: bool = False
  conv_kernel_grad: str = 'xla'
  winograd: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[int, jax.Array]:
    """x: [N, H, W, 3] -> {2: C2 [N, H/4, W/4, c2], 3: C3 [.., H/8, ..], 4: C4 [H/16], 5: C5 [H/32]}.

    Channels c_l = base_width * 2^(l-2) * expansion (expansion 4 for Bottleneck, 1 for BasicBlock), in `dtype`.
    """
    if not 0 <= self.freeze_at <= 5:
      raise ValueError(f'freeze_at must be in [0, 5], got {self.freeze_at}')
    if len(self.stage_sizes) != 4:
      raise ValueError(f'stage_sizes must list 4 stages (res2..res5), got {self.stage_sizes}')
    conv = functools.partial(
        layers.Conv, use_bias=self.norm == 'none', as_matmul=self.conv1x1_as_matmul,
        kernel_grad=self.conv_kernel_grad, winograd=self.winograd, dtype=self.dtype,
    )
    norm = layers.make_norm(self.norm, self.dtype)
    x = Stem(self.base_width, conv=conv, norm=norm, name='stem')(x)
    if self.freeze_at >= 1:
      x = jax.lax.stop_gradient(x)
    outputs = {}
    for i, num_blocks in enumerate(self.stage_sizes):
      level = i + 2
      x = Stage(
          block_cls=self.block_cls,
          num_blocks=num_blocks,
          planes=self.base_width * 2**i,
          stride=1 if i == 0 else 2,
          conv=conv,
          norm=norm,
          groups=self.groups,
          width_per_group=self.width_per_group,
          stride_in_1x1=self.stride_in_1x1,
          name=f'res{level}',
      )(x)
      if level <= self.freeze_at:
        x = jax.lax.stop_gradient(x)
      outputs[level] = x
    return outputs


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)
# The authors' X-101-32x8d yaml puts the stride in the 3x3 conv (STRIDE_IN_1X1 False), as torchvision does.
ResNeXt101_32x8d = functools.partial(
    ResNet101.func, **ResNet101.keywords, groups=32, width_per_group=8, stride_in_1x1=False
)

_DEPTHS = {18: ResNet18, 34: ResNet34, 50: ResNet50, 101: ResNet101, 152: ResNet152}


def resnet(depth: int, **kwargs) -> ResNet:
  """ResNet of `depth` (18, 34, 50, 101, 152); `groups` / `width_per_group` in kwargs make it a ResNeXt.

  `resnet(101, groups=32, width_per_group=8, stride_in_1x1=False)` is ResNeXt-101-32x8d.
  """
  if depth not in _DEPTHS:
    raise ValueError(f'unsupported ResNet depth {depth}; expected one of {sorted(_DEPTHS)}')
  if depth < 50 and (kwargs.get('groups', 1) != 1 or kwargs.get('width_per_group', 64) != 64):
    raise ValueError(f'ResNet-{depth} uses basic blocks: groups / width_per_group apply only to depth >= 50')
  return _DEPTHS[depth](**kwargs)


def stage_channels(depth: int, base_width: int = 64) -> dict[int, int]:
  """Channels of C2..C5 for a ResNet of `depth` and `base_width`: {2: 256, ..., 5: 2048} for R-50."""
  expansion = 1 if depth < 50 else 4
  return {level: base_width * 2 ** (level - 2) * expansion for level in range(2, 6)}
