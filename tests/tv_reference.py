"""Seeded random torchvision RetinaNets for the parity tests (nothing is downloaded), and the detection matching the
parity criterion uses.

`retinanet(depth, ...)`: torchvision's `retinanet_resnet50_fpn` (depth 50) or a `RetinaNet` on a ResNet-18 with
torchvision's own FPN extractor (`_resnet_fpn_extractor(..., returned_layers=[2, 3, 4],
extra_blocks=LastLevelP6P7(256, 256))`, the same layout), in eval mode, with random BN statistics and its predictors
rescaled so that a few hundred well-separated detections per image pass the 0.05 score threshold (at init every
score would be 0.01).
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7


def randomize_bn(model: torch.nn.Module, seed: int) -> None:
  """Random affine and running statistics in every BatchNorm2d; some variances near eps so that eps matters."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      with torch.no_grad():
        weight = 0.5 + torch.rand(m.weight.shape, generator=g)
        var = 0.5 + torch.rand(m.running_var.shape, generator=g)
        # Every 7th channel has var = eps (and a weight that keeps its output scale): a converter that ignored eps
        # would scale these channels by sqrt(2).
        var[::7] = 1e-5
        weight[::7] *= 2e-5**0.5
        m.weight.copy_(weight)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(var)
  model.eval()


def build(depth: int, seed: int, *, min_size: int = 800, max_size: int = 1333, num_classes: int = 91):
  """An untouched seeded torchvision RetinaNet (train-mode BN layers, random predictors)."""
  torch.manual_seed(seed)
  if depth == 50:
    return torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=min_size, max_size=max_size, num_classes=num_classes
    )
  resnet = getattr(torchvision.models, f'resnet{depth}')(weights=None)
  backbone = _resnet_fpn_extractor(resnet, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
  return torchvision.models.detection.RetinaNet(backbone, num_classes, min_size=min_size, max_size=max_size)


def retinanet(
    depth: int, seed: int, calibration_images, *, min_size: int = 800, max_size: int = 1333, num_classes: int = 91
):
  """A seeded random RetinaNet in eval mode whose scores spread: each (anchor, class) logit channel standardized
  over the calibration images (uint8 [H, W, 3]: those the test uses, since upscaled noise is smoother than noise
  and moves the logits' statistics), then shifted so that about 1 in 8000 pairs passes 0.05; box deltas of
  std 0.3."""
  model = build(depth, seed, min_size=min_size, max_size=max_size, num_classes=num_classes)
  randomize_bn(model, seed + 1)
  images = [torch.from_numpy(x).permute(2, 0, 1) / 255.0 for x in calibration_images]
  cls, box = model.head.classification_head.cls_logits, model.head.regression_head.bbox_reg
  num_classes = model.head.classification_head.num_classes
  with torch.no_grad():
    cls.bias.zero_()
    box.bias.zero_()
    batch, _ = model.transform(images)
    head = model.head(list(model.backbone(batch.tensors).values()))
    logits = head['cls_logits'].reshape(len(images), -1, 9 * num_classes)
    mean, std = logits.mean(dim=(0, 1)), logits.std(dim=(0, 1))
    cls.weight.div_(std[:, None, None, None])
    shift = float(np.log(0.05 / 0.95)) - float(torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - 1 / 8000)))
    cls.bias.copy_(-mean / std + shift)
    box.weight.mul_(0.3 / head['bbox_regression'].std())
  return model


def torchvision_detections(model, image: np.ndarray) -> dict[str, np.ndarray]:
  """torchvision's `model([uint8 image / 255])` for one uint8 [H, W, 3] image: boxes, scores, labels (numpy)."""
  with torch.no_grad():
    out = model([torch.from_numpy(image).permute(2, 0, 1) / 255.0])[0]
  return {k: v.numpy() for k, v in out.items()}


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[M, 4] x [K, 4] xyxy -> [M, K] float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
  return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-12)


def matched_fraction(ours: dict, want: dict, *, min_iou: float = 0.999, score_tol: float = 1e-3):
  """The share of torchvision's detections that one of ours matches (same category id = torchvision label, IoU >
  min_iou, |score difference| < score_tol), one to one, greedily in torchvision's score order; and the largest
  box coordinate and score differences over the matched pairs."""
  n = len(want['scores'])
  if n == 0:
    return 1.0, 0.0, 0.0
  ious = iou(want['boxes'], ours['boxes']) if len(ours['scores']) else np.zeros((n, 0))
  ok = (ious > min_iou) & (want['labels'][:, None] == np.asarray(ours['category_ids'])[None, :])
  ok &= np.abs(want['scores'][:, None] - ours['scores'][None, :]) < score_tol
  taken = np.zeros(ok.shape[1], bool)
  matched, box_err, score_err = 0, 0.0, 0.0
  for i in range(n):
    candidates = np.flatnonzero(ok[i] & ~taken)
    if len(candidates):
      j = candidates[np.argmax(ious[i, candidates])]
      taken[j] = True
      matched += 1
      box_err = max(box_err, float(np.abs(want['boxes'][i] - ours['boxes'][j]).max()))
      score_err = max(score_err, float(abs(want['scores'][i] - ours['scores'][j])))
  return matched / n, box_err, score_err
