"""RetinaNet classification / box heads and the RetinaMask mask head (spec sections 7 and 5.4).

RetinaNetHead names and their torchvision `retinanet_resnet50_fpn` counterparts:

  cls_tower_{i}, cls_tower_norm_{i}   head.classification_head.conv[i][0], conv[i][1] (GN, v2 only)
  cls_logits                          head.classification_head.cls_logits
  box_tower_{i}, box_tower_norm_{i}   head.regression_head.conv[i][0], conv[i][1]
  box_deltas                          head.regression_head.bbox_reg

MaskHead names follow the authors' checkpoint: mask_fcn1..mask_fcn{depth}, conv5_mask, mask_fcn_logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from retinamask_jax.models import layers
from retinamask_jax.models.layers import Dtype

_ZEROS = nn.initializers.zeros_init()


class RetinaNetHead(nn.Module):
  """Two towers (cls, box) of `depth` x [conv3x3 + (GN) + ReLU] and a 3x3 predictor each, shared by all levels.

  Attributes:
    num_classes: K (foreground classes; sigmoid outputs, no background).
    num_anchors: A per location.
    width: tower channels.
    depth: convs per tower (not counting the predictor).
    norm: 'none' or 'group_norm' (GN inside the towers only; tower convs keep their bias, as the authors').
    prior_prob: initial foreground probability of every class (cls predictor bias -log((1 - p) / p)).
    conv_kernel_grad: 'xla', 'taps' or 'by_size', see `layers.Conv.kernel_grad`.
    winograd: compute the 3x3 stride-1 convs by Winograd's algorithm where it pays, see `layers.Conv.winograd`.
    dtype: compute dtype; outputs are float32, parameters float32.
  """

  num_classes: int
  num_anchors: int = 9
  width: int = 256
  depth: int = 4
  norm: str = 'none'
  prior_prob: float = 0.01
  conv_kernel_grad: str = 'xla'
  winograd: bool = False
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.norm not in ('none', 'group_norm'):
      raise ValueError(f"head norm must be 'none' or 'group_norm', got {self.norm!r}")
    conv_init = nn.initializers.normal(0.01)

    def conv(features, bias_init=_ZEROS):
      return layers.Conv(
          features, (3, 3), padding=1, kernel_grad=self.conv_kernel_grad, winograd=self.winograd, dtype=self.dtype,
          kernel_init=conv_init, bias_init=bias_init,
      )

    norm = layers.make_norm(self.norm, self.dtype)
    # Lists assigned in setup() are named cls_tower_0, cls_tower_1, ...
    self.cls_tower = [conv(self.width) for _ in range(self.depth)]
    self.box_tower = [conv(self.width) for _ in range(self.depth)]
    if self.norm != 'none':
      self.cls_tower_norm = [norm() for _ in range(self.depth)]
      self.box_tower_norm = [norm() for _ in range(self.depth)]
    prior_bias = -math.log((1.0 - self.prior_prob) / self.prior_prob)
    self.cls_logits = conv(self.num_anchors * self.num_classes, nn.initializers.constant(prior_bias))
    self.box_deltas = conv(self.num_anchors * 4)

  def _tower(self, convs, norms, x: jax.Array) -> jax.Array:
    for i, c in enumerate(convs):
      x = c(x)
      if norms is not None:
        x = norms[i](x)
      x = nn.relu(x)
    return x

  def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """features: per level [N, H_l, W_l, C], lowest level first.

    Returns cls_logits [N, A_total, K] float32 and box_deltas [N, A_total, 4] float32, A_total = sum_l H_l*W_l*A,
    in (level, y, x, anchor) order; predictor channel a*K + c is anchor a, class c (a*4 + k for the box).
    """
    cls_norms = self.cls_tower_norm if self.norm != 'none' else None
    box_norms = self.box_tower_norm if self.norm != 'none' else None
    cls_out, box_out = [], []
    for x in features:
      n = x.shape[0]
      cls = self.cls_logits(self._tower(self.cls_tower, cls_norms, x))
      box = self.box_deltas(self._tower(self.box_tower, box_norms, x))
      # [N, H, W, A*K] -> [N, H*W*A, K]: channel a*K + c lands at anchor a, class c.
      cls_out.append(cls.reshape(n, -1, self.num_classes))
      box_out.append(box.reshape(n, -1, 4))
    cls_logits = jnp.concatenate(cls_out, axis=1).astype(jnp.float32)
    box_deltas = jnp.concatenate(box_out, axis=1).astype(jnp.float32)
    return cls_logits, box_deltas


class MaskHead(nn.Module):
  """RetinaMask's mask head (spec 5.4): depth x [conv3x3 + ReLU] -> deconv 2x2/2 + ReLU -> 1x1 conv to K.

  No GN, even in GN models. Init kaiming_normal(fan_out), bias 0. Channel k - 1 of the output is class k
  (the authors' predictor has K + 1 channels with an unused background channel 0; here it is dropped).

  Attributes:
    num_classes: K.
    width: channels of the convs and the deconv.
    depth: number of 3x3 convs.
    conv1x1_as_matmul: compute the final 1x1 conv as a matmul.
    conv_kernel_grad: 'xla', 'taps' or 'by_size', see `layers.Conv.kernel_grad`.
    winograd: compute the 3x3 stride-1 convs by Winograd's algorithm where it pays, see `layers.Conv.winograd`.
    dtype: compute dtype; logits are float32.
  """

  num_classes: int
  width: int = 256
  depth: int = 4
  conv1x1_as_matmul: bool = False
  conv_kernel_grad: str = 'xla'
  winograd: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, roi_features: jax.Array) -> jax.Array:
    """roi_features: [N, R, S, S, C] -> mask logits [N, R, 2S, 2S, K] float32."""
    n, r, s1, s2, c = roi_features.shape
    x = roi_features.reshape(n * r, s1, s2, c)
    for i in range(1, self.depth + 1):
      conv = layers.Conv(
          self.width, (3, 3), padding=1, kernel_grad=self.conv_kernel_grad, winograd=self.winograd, dtype=self.dtype,
          name=f'mask_fcn{i}',
      )
      x = nn.relu(conv(x))
    x = layers.ConvTransposeNonOverlapping(self.width, factor=2, dtype=self.dtype, name='conv5_mask')(x)
    x = nn.relu(x)
    x = layers.Conv(
        self.num_classes, (1, 1), as_matmul=self.conv1x1_as_matmul, dtype=self.dtype, name='mask_fcn_logits'
    )(x)
    return x.reshape(n, r, 2 * s1, 2 * s2, self.num_classes).astype(jnp.float32)
