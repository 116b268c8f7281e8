"""The two sides of the side-by-side benches (issue 7): our R-50 models and their torchvision peers, built the same
way for inference (bench_inference.py) and training (bench_train_step.py), with synthetic images and targets.

Ours: `configs/retinanet_r50_fpn_1x.py` (RetinaNet mode: no mask branch) and `configs/retinamask_r50_fpn_2x_ms.py`
(RetinaMask mode), 80 classes, random initialization.

The peers, torchvision 0.29 with random weights:
- RetinaNet R50-FPN: the body of `torchvision.models.detection.retinanet_resnet50_fpn`, rebuilt here because that
  builder cannot give the configuration the issue asks for. Without weights it ignores `trainable_backbone_layers`
  (it warns and trains all 5 stages) and builds the ResNet with `nn.BatchNorm2d`, not `FrozenBatchNorm2d`. With
  `resnet50(norm_layer=FrozenBatchNorm2d)` and `_resnet_fpn_extractor(backbone, 3, [2, 3, 4], LastLevelP6P7(256,
  256))` it is what the builder makes with ImageNet weights: frozen BN everywhere, stem + layer1 frozen (our
  `freeze_at=2`), P3-P7 with P6 from P5 (our `fpn.p6_input='p5'`), 4-conv heads, 9 anchors.
- Mask R-CNN R50-FPN, the only torchvision detector with masks: the body of `maskrcnn_resnet50_fpn`, fixed in the
  same way (frozen BN, `trainable_backbone_layers=3`).
Classes: 80 for RetinaNet (sigmoid per class, as ours), 81 for Mask R-CNN (80 + its softmax background).

Known architecture differences that change FLOPs (not only speed): our configs keep the authors' MSRA ResNet with the
stride in the first 1x1 convolution of a stage (`backbone.stride_in_1x1=True`), torchvision's v1.5 puts it in the
3x3 convolution (a bit more work in the first block of res3-res5).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the config files import `configs.base`
  sys.path.insert(0, ROOT)
CONFIGS = {
    'retinanet': os.path.join(ROOT, 'configs', 'retinanet_r50_fpn_1x.py'),
    'retinamask': os.path.join(ROOT, 'configs', 'retinamask_r50_fpn_2x_ms.py'),
}
NUM_CLASSES = 80
BOXES_PER_IMAGE = 4  # ground-truth instances per synthetic training image


def parse_hw(text: str) -> tuple[int, int]:
  """'800x1216' -> (800, 1216)."""
  h, w = (int(v) for v in text.lower().split('x'))
  return h, w


def load_config(path: str):
  """`get_config()` of a config file, loaded by path (configs/ is not a package on sys.path here)."""
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def split_mode(mode: str) -> tuple[str, int]:
  """'retinamask@64' -> ('retinamask', 64): RetinaMask with its training mask proposals capped at 64 per image
  (`model.mask.max_proposals`, positives first); 'retinamask' -> ('retinamask', 0): all 100 + G (the authors')."""
  base, _, cap = mode.partition('@')
  if base not in CONFIGS or (cap and (base != 'retinamask' or not cap.isdigit())):
    raise ValueError(f"mode must be 'retinanet', 'retinamask' or 'retinamask@<cap>', got {mode!r}")
  return base, int(cap or 0)


def our_config(mode: str, size_hw: tuple[int, int], batch_size: int = 1, shrink: bool = False):
  """The experiment config of `mode` ('retinanet', 'retinamask' or 'retinamask@<cap>', see `split_mode`) for
  images of `size_hw`, `batch_size` images per step (the learning rate follows linearly, as in training).
  `shrink`: a narrow ResNet-18 instead of R-50 (for --quick smoke runs only: it compiles in seconds; its times say
  nothing about R-50)."""
  base, cap = split_mode(mode)
  config = load_config(CONFIGS[base])
  if cap:
    config.model.mask.max_proposals = cap
  h, w = size_hw
  config.model.num_classes = NUM_CLASSES
  config.data.min_sizes = (min(h, w),)
  config.data.max_size = max(h, w)
  config.data.test_min_size = min(h, w)
  config.data.test_max_size = max(h, w)
  config.train.batch_size = batch_size
  if shrink:
    config.model.backbone.depth = 18
    config.model.backbone.base_width = 16
    config.model.fpn.channels = 32
    config.model.head.width = 32
    config.model.mask.head_width = 32
  return config


def direct_conv_flops(config, lower: Any) -> float | None:
  """XLA's FLOPs of the program `lower(model)` returns (a `jax.stages.Lowered`) for the model of `config` rebuilt
  with `model.winograd='off'`: the model's own FLOPs, all convs counted directly. A FLOP floor divides these by the
  matmul peak; Winograd's algorithm executes fewer (`timing.xla_flops` of the compiled program)."""
  from timing import xla_flops

  from retinamask_jax.models import retinamask

  direct = config.copy_and_resolve_references()
  direct.model.winograd = 'off'
  return xla_flops(lower(retinamask.module_from_config(direct)))


def synthetic_images(n: int, size_hw: tuple[int, int], seed: int = 0) -> np.ndarray:
  """float32 [n, H, W, 3] in [0, 1): what both sides see (ours as is, torchvision as [3, H, W] tensors). Our
  models take normalized images and torchvision normalizes inside; at random weights the values only need to be
  the same."""
  return np.random.default_rng(seed).random((n, *size_hw, 3), dtype=np.float32)


def synthetic_targets(n: int, size_hw: tuple[int, int], seed: int = 0) -> list[dict[str, np.ndarray]]:
  """`BOXES_PER_IMAGE` objects per image: boxes float32 [k, 4] xyxy pixels, labels int64 [k] in 1..80, each object an
  ellipse filling its box."""
  rng = np.random.default_rng(seed + 1)
  h, w = size_hw
  out = []
  for _ in range(n):
    k = BOXES_PER_IMAGE
    wh = rng.uniform(0.1, 0.5, (k, 2)) * (w, h)
    x1y1 = rng.uniform(0, 1, (k, 2)) * ((w, h) - wh)
    boxes = np.concatenate([x1y1, x1y1 + wh], 1).astype(np.float32)
    out.append(dict(boxes=boxes, labels=rng.integers(1, NUM_CLASSES + 1, k).astype(np.int64)))
  return out


def _ellipse(height: int, width: int) -> np.ndarray:
  """uint8 [height, width]: 1 inside the ellipse inscribed in the array."""
  y = (np.arange(height) + 0.5) / height * 2 - 1
  x = (np.arange(width) + 0.5) / width * 2 - 1
  return (y[:, None] ** 2 + x[None, :] ** 2 <= 1).astype(np.uint8)


def our_train_batch(images: np.ndarray, targets: list[dict[str, np.ndarray]], config) -> dict[str, np.ndarray]:
  """The training batch contract (DESIGN.md 4) for `images` [N, H, W, 3] and `targets`: GT padded to
  `data.max_instances` rows, each mask cropped to its box at `data.mask_size`."""
  n, h, w, _ = images.shape
  g, m = int(config.data.max_instances), int(config.data.mask_size)
  batch = dict(
      image=images,
      image_size=np.tile(np.array([[h, w]], np.int32), (n, 1)),
      gt_boxes=np.zeros((n, g, 4), np.float32),
      gt_classes=np.zeros((n, g), np.int32),
      gt_masks=np.zeros((n, g, m, m), np.uint8),
  )
  crop = _ellipse(m, m)  # the object fills its box, so its crop is the inscribed ellipse at any box size
  for i, t in enumerate(targets):
    k = len(t['boxes'])
    batch['gt_boxes'][i, :k] = t['boxes']
    batch['gt_classes'][i, :k] = t['labels']
    batch['gt_masks'][i, :k] = crop
  return batch


def torch_targets(torch: Any, targets: list[dict[str, np.ndarray]], size_hw: tuple[int, int],
                  with_masks: bool) -> list[dict[str, Any]]:
  """torchvision's training targets: boxes float32 [k, 4], labels int64 [k], masks uint8 [k, H, W] (full image)."""
  h, w = size_hw
  out = []
  for t in targets:
    d = dict(boxes=torch.from_numpy(t['boxes']), labels=torch.from_numpy(t['labels']))
    if with_masks:
      masks = np.zeros((len(t['boxes']), h, w), np.uint8)
      for j, (x1, y1, x2, y2) in enumerate(np.round(t['boxes']).astype(int)):
        masks[j, y1:y2, x1:x2] = _ellipse(y2 - y1, x2 - x1)
      d['masks'] = torch.from_numpy(masks)
    out.append(d)
  return out


def torchvision_detector(torchvision: Any, mode: str, size_hw: tuple[int, int], **kwargs: Any) -> Any:
  """The peer of `mode`: RetinaNet R50-FPN ('retinanet') or Mask R-CNN R50-FPN ('retinamask'), random weights,
  frozen BN, stem + layer1 frozen, its transform resizing to `size_hw` (so images of that size are not rescaled).
  `kwargs` go to the detector's constructor (thresholds, detection counts)."""
  from torchvision.models import resnet50
  from torchvision.models.detection import MaskRCNN, RetinaNet
  from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
  from torchvision.ops import misc as misc_nn_ops
  from torchvision.ops.feature_pyramid_network import LastLevelP6P7

  backbone = resnet50(weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
  sizes = dict(min_size=min(size_hw), max_size=max(size_hw))
  if split_mode(mode)[0] == 'retinanet':
    backbone = _resnet_fpn_extractor(backbone, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(backbone, num_classes=NUM_CLASSES, **sizes, **kwargs)
  backbone = _resnet_fpn_extractor(backbone, 3)
  return MaskRCNN(backbone, num_classes=NUM_CLASSES + 1, **sizes, **kwargs)


def peer_name(mode: str) -> str:
  return 'torchvision RetinaNet R50-FPN' if split_mode(mode)[0] == 'retinanet' else 'torchvision Mask R-CNN R50-FPN'
