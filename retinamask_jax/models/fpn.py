"""Feature pyramid P{min}..P{max} on top of C2..C5 (spec section 7, "FPN" and "P6/P7").

  lateral{l}:  1x1 conv on C_l (+ GN)             torchvision backbone.fpn.inner_blocks[l - 3]
  output{l}:   3x3 conv on the merged map (+ GN)  torchvision backbone.fpn.layer_blocks[l - 3]
  p6, p7:      3x3/2 convs, P6 on P5 (or C5), P7 on ReLU(P6), no GN  torchvision extra_blocks.p6 / p7

(For the mask-only P2, `lateral2` / `output2` correspond to torchvision index l - 2 with returned layer 1.)
The head receives the un-ReLU'd P6. Convs use kaiming_uniform(a=1) and zero bias; with GN they have no bias
(the authors' `make_conv`). The top-down path upsamples by nearest neighbour to the lateral's size.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retinamask_jax.models import layers
from retinamask_jax.models.layers import Dtype


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Nearest-neighbour resize of x [N, h, w, C] to [N, H, W, C] (PyTorch 'nearest': src = floor(dst * h / H)).

  For exact 2x (the canvases are multiples of 128) this is a plain repeat.
  """
  n, h, w, c = x.shape
  out_h, out_w = size
  if (out_h, out_w) == (2 * h, 2 * w):
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
    return x.reshape(n, out_h, out_w, c)
  rows = np.minimum(np.floor(np.arange(out_h) * (h / out_h)).astype(np.int32), h - 1)
  cols = np.minimum(np.floor(np.arange(out_w) * (w / out_w)).astype(np.int32), w - 1)
  return x[:, rows][:, :, cols]


class FPN(nn.Module):
  """Feature pyramid network.

  Attributes:
    channels: output channels of every level.
    norm: 'none' or 'group_norm' (GN after the lateral and output convs, not on P6/P7).
    p6_input: 'p5' (authors, torchvision v1) or 'c5' (RetinaNet paper, Detectron).
    min_level: lowest level built (2..5); laterals exist for C_min..C5.
    max_level: highest level (>= 5); levels above 5 are stride-2 convs, each on ReLU of the one below
      (except P6, which reads P5 or C5 without ReLU).
    build_p2: also build P2 (for the mask branch) even when min_level is 3.
    conv1x1_as_matmul: compute the lateral 1x1 convs as matmuls.
    conv_kernel_grad: 'xla', 'taps' or 'by_size', see `layers.Conv.kernel_grad`.
    winograd: compute the 3x3 stride-1 convs by Winograd's algorithm where it pays, see `layers.Conv.winograd`.
    dtype: compute dtype; parameters are float32.
  """

  channels: int = 256
  norm: str = 'none'
  p6_input: str = 'p5'
  min_level: int = 3
  max_level: int = 7
  build_p2: bool = False
  conv1x1_as_matmul: bool = False
  conv_kernel_grad: str = 'xla'
  winograd: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: dict[int, jax.Array]) -> dict[int, jax.Array]:
    """features: {l: C_l [N, H/2^l, W/2^l, c_l]} for l in 2..5 -> {l: P_l [N, H_l, W_l, channels]} in `dtype`.

    Levels returned: (2 if build_p2 else min_level)..max_level; H_l = ceil(H_{l-1} / 2) above 5.
    """
    if self.p6_input not in ('p5', 'c5'):
      raise ValueError(f"p6_input must be 'p5' or 'c5', got {self.p6_input!r}")
    if not 2 <= self.min_level <= 5 or self.max_level < 5:
      raise ValueError(f'FPN needs 2 <= min_level <= 5 <= max_level, got {self.min_level}, {self.max_level}')
    lowest = 2 if self.build_p2 else self.min_level
    with_gn = self.norm == 'group_norm'
    if self.norm not in ('none', 'group_norm'):
      raise ValueError(f"FPN norm must be 'none' or 'group_norm', got {self.norm!r}")
    conv = functools.partial(
        layers.Conv,
        self.channels,
        use_bias=not with_gn,
        as_matmul=self.conv1x1_as_matmul,
        kernel_grad=self.conv_kernel_grad,
        winograd=self.winograd,
        dtype=self.dtype,
        kernel_init=layers.kaiming_uniform_a1,
    )
    norm = layers.make_norm(self.norm, self.dtype)

    outputs = {}
    merged = None
    for level in range(5, lowest - 1, -1):
      lateral = norm(name=f'lateral{level}_norm')(conv((1, 1), name=f'lateral{level}')(features[level]))
      if merged is not None:
        lateral = lateral + upsample_nearest(merged, lateral.shape[1:3]).astype(lateral.dtype)
      merged = lateral
      outputs[level] = norm(name=f'output{level}_norm')(conv((3, 3), padding=1, name=f'output{level}')(merged))

    # P6/P7 never have GN, so they always carry a bias.
    extra = functools.partial(conv, (3, 3), strides=2, padding=1, use_bias=True)
    for level in range(6, self.max_level + 1):
      if level == 6:
        x = outputs[5] if self.p6_input == 'p5' else features[5]
      else:
        x = nn.relu(outputs[level - 1])
      outputs[level] = extra(name=f'p{level}')(x)
    return {level: outputs[level] for level in range(lowest, self.max_level + 1)}
