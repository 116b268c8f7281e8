"""RetinaMask R-101-FPN, 2x multi-scale (the authors' `retinanet_mask_R-101-FPN_2x_adjust_std011_ms`).

The authors ran it at 4 images (1 per GPU), LR 0.0025, 720k iterations; written here for 16 images (LR 0.01,
180k iterations), the same schedule in images, scaled linearly to `train.batch_size`. Minival box AP 41.1.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.model.backbone.depth = 101
  return c
