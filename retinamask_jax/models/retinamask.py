"""The RetinaMask detector module: ResNet -> FPN -> RetinaNet head, plus the mask head (DESIGN.md 3, 4, 8).

`RetinaMask.__call__` is exactly RetinaNet: it never touches the mask head, so detection-only inference costs
what RetinaNet costs. The mask head runs only through `RetinaMask.mask_logits`, on ROI-Aligned features of the
detections (training: detections + GT), which the train step computes between the two calls.

Variables: `params` (all convs, GN), `frozen` (frozen-BN affines), and from `build_model`'s init function also
`loss_stats` (the self-adjusting smooth-L1 running statistics, not used by the module itself).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from retinamask_jax import losses
from retinamask_jax.models import fpn as fpn_lib
from retinamask_jax.models import heads, layers
from retinamask_jax.models import resnet as resnet_lib
from retinamask_jax.models.layers import Dtype

PyTree = Any

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """Static backbone structure (config keys `model.backbone.*`)."""

  depth: int = 50
  groups: int = 1
  width_per_group: int = 64
  base_width: int = 64
  stride_in_1x1: bool = True
  norm: str = 'frozen_bn'
  freeze_at: int = 2


@dataclasses.dataclass(frozen=True)
class FPNConfig:
  """Static FPN structure (`model.fpn.*`); `min_level`..`max_level` are the detection levels."""

  channels: int = 256
  norm: str = 'none'
  p6_input: str = 'p5'
  min_level: int = 3
  max_level: int = 7


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Static RetinaNet head structure (`model.head.*`; `num_anchors` from `model.anchors`)."""

  num_anchors: int = 9
  width: int = 256
  depth: int = 4
  norm: str = 'none'
  prior_prob: float = 0.01


@dataclasses.dataclass(frozen=True)
class MaskHeadConfig:
  """Static mask-branch structure (`model.mask.*`); `min_level` 2 builds P2 for the mask branch."""

  min_level: int = 3
  max_level: int = 5
  width: int = 256
  depth: int = 4


class RetinaMask(nn.Module):
  """RetinaNet with RetinaMask's mask head.

  Attributes (plain hashable values):
    num_classes: K > 0.
    backbone_config, fpn_config, head_config: structure of the three detection parts.
    mask_config: structure of the mask branch; None = no mask head (a pure RetinaNet).
    conv1x1_as_matmul: compute 1x1 convs as matmuls (same variables, same numbers): True, False, or 'auto' (in
      CPU programs only; see `layers.Conv`, "Per platform").
    conv_kernel_grad: 'xla', 'taps', 'by_size' or 'auto': how every other conv's kernel gradient is computed (same
      variables, the same sums in another order; see `layers.Conv.kernel_grad`).
    winograd: compute the 3x3 stride-1 convs (backbone, FPN, heads, mask head) by Winograd's algorithm where it
      pays (same variables, the same function up to float32 rounding; see `layers.Conv.winograd`): True, False,
      or 'auto' (in CPU programs only).
    dtype: compute dtype (float32 or bfloat16); parameters float32, head outputs float32.
  """

  num_classes: int
  backbone_config: BackboneConfig = BackboneConfig()
  fpn_config: FPNConfig = FPNConfig()
  head_config: HeadConfig = HeadConfig()
  mask_config: MaskHeadConfig | None = MaskHeadConfig()
  conv1x1_as_matmul: bool | str = True
  conv_kernel_grad: str = 'xla'
  winograd: bool | str = False
  dtype: Dtype = jnp.float32

  def setup(self):
    b, f, h = self.backbone_config, self.fpn_config, self.head_config
    self.backbone = resnet_lib.resnet(
        b.depth,
        base_width=b.base_width,
        groups=b.groups,
        width_per_group=b.width_per_group,
        stride_in_1x1=b.stride_in_1x1,
        norm=b.norm,
        freeze_at=b.freeze_at,
        conv1x1_as_matmul=self.conv1x1_as_matmul,
        conv_kernel_grad=self.conv_kernel_grad,
        winograd=self.winograd,
        dtype=self.dtype,
    )
    self.fpn = fpn_lib.FPN(
        channels=f.channels,
        norm=f.norm,
        p6_input=f.p6_input,
        min_level=f.min_level,
        max_level=f.max_level,
        build_p2=self.mask_config is not None and self.mask_config.min_level == 2,
        conv1x1_as_matmul=self.conv1x1_as_matmul,
        conv_kernel_grad=self.conv_kernel_grad,
        winograd=self.winograd,
        dtype=self.dtype,
    )
    self.head = heads.RetinaNetHead(
        num_classes=self.num_classes,
        num_anchors=h.num_anchors,
        width=h.width,
        depth=h.depth,
        norm=h.norm,
        prior_prob=h.prior_prob,
        conv_kernel_grad=self.conv_kernel_grad,
        winograd=self.winograd,
        dtype=self.dtype,
    )
    if self.mask_config is not None:
      self.mask_head = heads.MaskHead(
          num_classes=self.num_classes,
          width=self.mask_config.width,
          depth=self.mask_config.depth,
          conv1x1_as_matmul=self.conv1x1_as_matmul,
          conv_kernel_grad=self.conv_kernel_grad,
          winograd=self.winograd,
          dtype=self.dtype,
      )

  def __call__(self, images: jax.Array) -> dict[str, Any]:
    """images: [N, H, W, 3] (H, W divisible by 2^max_level) -> dict with

    features: {level: [N, H / 2^l, W / 2^l, C]} for every FPN level (P2 included when built), in `dtype`;
    cls_logits: [N, A_total, K] float32; box_deltas: [N, A_total, 4] float32, over the detection levels
    fpn.min_level..fpn.max_level in (level, y, x, anchor) order.
    """
    f = self.fpn_config
    features = self.fpn(self.backbone(images))
    cls_logits, box_deltas = self.head([features[level] for level in range(f.min_level, f.max_level + 1)])
    return dict(features=features, cls_logits=cls_logits, box_deltas=box_deltas)

  def mask_logits(self, roi_features: jax.Array) -> jax.Array:
    """roi_features: [N, R, S, S, C] -> mask logits [N, R, 2S, 2S, K] float32 (channel k - 1 = class k)."""
    if self.mask_config is None:
      raise ValueError('this RetinaMask has no mask head (model.mask.enabled is False)')
    return self.mask_head(roi_features)

  def init_all(self, images: jax.Array, roi_features: jax.Array | None = None) -> dict[str, Any]:
    """Runs both paths so that `init` creates every variable, the mask head's included."""
    outputs = self(images)
    if self.mask_config is not None:
      if roi_features is None:
        c = self.fpn_config.channels
        roi_features = jnp.zeros((images.shape[0], 1, 14, 14, c), images.dtype)
      outputs['mask_logits'] = self.mask_logits(roi_features)
    return outputs


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def resolve_conv_kernel_grad(value: str, platform: str | None = None) -> str:
  """What `model.conv_kernel_grad` computes in a program for `platform` (default: the one JAX runs on): 'auto' ->
  'by_size' for 'cpu' (taps where XLA's CPU weight-gradient convolution runs far below matmul speed: large and
  grouped convs), 'xla' for GPU and TPU (cuDNN / the TPU compiler do better than per-tap matmuls); 'xla', 'taps'
  and 'by_size' are kept. The model itself keeps 'auto' and decides per lowering platform (`layers.Conv`)."""
  if value == 'auto':
    return 'by_size' if (platform or jax.default_backend()) == 'cpu' else 'xla'
  return value


def resolve_winograd(value: str | bool, compute_dtype: str, platform: str | None = None) -> bool:
  """Whether `model.winograd` computes Winograd convs in a program for `platform` (default: the one JAX runs on):
  'auto' -> on for float32 on CPU (XLA's CPU convs run at matmul speed, so fewer multiplies is the lever;
  bench/bench_winograd.py), off on GPU and TPU (cuDNN and the TPU compiler pick their own algorithms) and for
  bfloat16 (the transforms' coefficients cost too much of its precision); 'on' / True, 'off' / False are kept.
  The model itself keeps 'auto' and decides per lowering platform (`layers.Conv`)."""
  if value == 'auto':
    return (platform or jax.default_backend()) == 'cpu' and compute_dtype == 'float32'
  return value in ('on', True)


def module_from_config(config: ml_collections.ConfigDict) -> RetinaMask:
  """The `RetinaMask` module described by `config.model` (validated; see `build_model`)."""
  m = config.model
  _check(
      isinstance(m.num_classes, int) and m.num_classes > 0,
      f'model.num_classes must be a positive int here, got {m.num_classes!r} (0 means "from the dataset" and '
      'must be resolved before the model is built)',
  )
  _check(
      m.conv_kernel_grad in ('auto',) + layers.KERNEL_GRADS,
      f"model.conv_kernel_grad must be 'auto', 'xla', 'taps' or 'by_size', got {m.conv_kernel_grad!r}",
  )
  winograd = m.get('winograd', 'auto')  # configs exported before the key existed mean the default
  _check(
      winograd in ('auto', 'on', 'off', True, False), f"model.winograd must be 'auto', 'on' or 'off', got {winograd!r}"
  )
  _check(m.compute_dtype in _DTYPES, f'model.compute_dtype must be one of {sorted(_DTYPES)}, got {m.compute_dtype!r}')
  b, f, h, a, mk = m.backbone, m.fpn, m.head, m.anchors, m.mask
  _check(b.depth in (18, 34, 50, 101, 152), f'model.backbone.depth must be 18, 34, 50, 101 or 152, got {b.depth}')
  _check(b.norm in layers.NORMS, f'model.backbone.norm must be one of {layers.NORMS}, got {b.norm!r}')
  _check(0 <= b.freeze_at <= 5, f'model.backbone.freeze_at must be in [0, 5], got {b.freeze_at}')
  _check(b.base_width > 0, f'model.backbone.base_width must be > 0, got {b.base_width}')
  _check(
      b.depth >= 50 or (b.groups, b.width_per_group) == (1, 64),
      f'model.backbone.groups / width_per_group apply only to depth >= 50 (got depth {b.depth})',
  )
  _check(f.norm in ('none', 'group_norm'), f"model.fpn.norm must be 'none' or 'group_norm', got {f.norm!r}")
  _check(h.norm in ('none', 'group_norm'), f"model.head.norm must be 'none' or 'group_norm', got {h.norm!r}")
  _check(f.p6_input in ('p5', 'c5'), f"model.fpn.p6_input must be 'p5' or 'c5', got {f.p6_input!r}")
  _check(
      2 <= f.min_level <= 5 <= f.max_level,
      f'model.fpn levels must satisfy 2 <= min_level <= 5 <= max_level, got {f.min_level}..{f.max_level}',
  )
  _check(0.0 < h.prior_prob < 1.0, f'model.head.prior_prob must be in (0, 1), got {h.prior_prob}')
  num_anchors = len(a.aspect_ratios) * a.scales_per_octave
  _check(num_anchors > 0, 'model.anchors must give at least one anchor per location')
  mask_config = None
  if mk.enabled:
    lowest = min(f.min_level, 2 if mk.min_level == 2 else f.min_level)
    _check(
        lowest <= mk.min_level <= mk.max_level <= f.max_level,
        f'model.mask levels {mk.min_level}..{mk.max_level} must be FPN levels (2 builds P2; fpn levels are '
        f'{f.min_level}..{f.max_level})',
    )
    _check(
        mk.resolution == 2 * mk.pooler_resolution,
        f'model.mask.resolution ({mk.resolution}) must be 2 x pooler_resolution ({mk.pooler_resolution}): '
        'the mask head upsamples by 2',
    )
    mask_config = MaskHeadConfig(
        min_level=mk.min_level, max_level=mk.max_level, width=mk.head_width, depth=mk.head_depth
    )
  return RetinaMask(
      num_classes=m.num_classes,
      backbone_config=BackboneConfig(
          depth=b.depth,
          groups=b.groups,
          width_per_group=b.width_per_group,
          base_width=b.base_width,
          stride_in_1x1=bool(b.stride_in_1x1),
          norm=b.norm,
          freeze_at=b.freeze_at,
      ),
      fpn_config=FPNConfig(
          channels=f.channels, norm=f.norm, p6_input=f.p6_input, min_level=f.min_level, max_level=f.max_level
      ),
      head_config=HeadConfig(
          num_anchors=num_anchors, width=h.width, depth=h.depth, norm=h.norm, prior_prob=float(h.prior_prob)
      ),
      mask_config=mask_config,
      # The CPU algorithms stay 'auto' inside the model: each conv picks per lowering platform (layers.Conv), so a
      # model built on a CPU host still gives GPU / TPU programs XLA's convolutions. conv1x1_as_matmul=True is
      # CPU-motivated (faster weight gradients), so it means 'auto' too.
      conv1x1_as_matmul='auto' if m.conv1x1_as_matmul else False,
      conv_kernel_grad=m.conv_kernel_grad,
      winograd={'on': True, 'off': False}.get(winograd, winograd),
      dtype=_DTYPES[m.compute_dtype],
  )


def build_model(
    config: ml_collections.ConfigDict,
) -> tuple[RetinaMask, Callable[..., dict[str, PyTree]]]:
  """The detector for an experiment config, and `init_variables_fn(rng, canvas_hw=(H, W)) -> variables`.

  `config` is the full experiment config (`model.*`; `model.num_classes` must be resolved to K > 0, and
  `loss.beta_max` seeds the loss statistics). The returned variables are
  `{'params', 'frozen', 'loss_stats'}`, the mask head's parameters included when the mask branch is on.

  Raises ValueError naming the config key when the model part of the config is invalid.
  """
  module = module_from_config(config)
  beta_max = float(config.loss.beta_max)
  pooler = int(config.model.mask.pooler_resolution)
  # One jitted initializer per model: every state created from it reuses the compilation.
  init_all = jax.jit(functools.partial(module.init, method=RetinaMask.init_all))

  def init_variables_fn(rng: jax.Array, canvas_hw: tuple[int, int] = (512, 512)) -> dict[str, PyTree]:
    """rng: a PRNG key; canvas_hw: (H, W) the model will run on.

    The variables do not depend on the canvas (flax derives each parameter's key from its path, and no
    parameter shape depends on H, W), so the canvas is only checked and init runs on a square canvas of side
    2^max_level. Under jit the forward pass is dead code, so the cost is compiling the initializers.
    """
    h, w = (int(v) for v in canvas_hw)
    _check(h > 0 and w > 0, f'canvas_hw must be positive, got {canvas_hw}')
    side = 2**module.fpn_config.max_level
    images = jnp.zeros((1, side, side, 3), jnp.float32)
    rois = jnp.zeros((1, 1, pooler, pooler, module.fpn_config.channels), jnp.float32)
    variables = dict(init_all(rng, images, rois))
    variables.setdefault('frozen', {})
    variables['loss_stats'] = losses.init_loss_stats(beta_max)
    return variables

  return module, init_variables_fn


def _frozen_prefixes(freeze_at: int) -> tuple[str, ...]:
  names = ('stem',) if freeze_at >= 1 else ()
  return names + tuple(f'res{k}' for k in range(2, freeze_at + 1))


def frozen_params_mask(params: PyTree, config: ml_collections.ConfigDict) -> PyTree:
  """Same tree as `params`, True for the parameters of frozen backbone stages (`model.backbone.freeze_at`).

  freeze_at = 1 marks `backbone/stem`; k >= 2 marks the stem and `backbone/res2`..`backbone/res{k}`. The
  optimizer gives these no update and no state; the module already stops their gradients.
  """
  frozen = _frozen_prefixes(int(config.model.backbone.freeze_at))

  def is_frozen(path, _):
    keys = [getattr(p, 'key', getattr(p, 'name', None)) for p in path]
    return len(keys) >= 2 and keys[0] == 'backbone' and keys[1] in frozen

  return jax.tree_util.tree_map_with_path(is_frozen, params)
