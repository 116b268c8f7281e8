"""RetinaMask R-50-FPN, 2x schedule, multi-scale training: the authors' `retinanet_mask_R-50-FPN_2x_adjust_std011_ms`.

Paper/authors' COCO minival: box AP 39.4 (spec section 8). ImageNet weights: convert torchvision's ResNet-50 with
`retinamask_jax.convert.torchvision.resnet_variables` (then set data.channel_order='rgb' and torchvision's
normalization; see the README), or train from MSRA weights converted elsewhere (BGR 0-255 input, the default).
    python train.py --config configs/retinamask_r50_fpn_2x_ms.py --workdir runs/r50 --config.data.coco_root=/data/coco
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  # base.py is this config: R-50, frozen BN, stem + res2 frozen, (640, 800, 1000) / 1333, self-adjusting smooth L1,
  # best matching at 0.0, mask branch on P3-P5, 180k iterations at 16 images (LR 0.01, steps 120k / 160k).
  return base.get_config()
