"""RetinaMask ResNeXt-101-32x8d-FPN-GN, 2x multi-scale (`retinanet_mask_X-101-32x8d_FPN_2x_adjust_std011_ms_gn`).

Cardinality 32, 8 channels per group, stride in the 3x3 conv (FAIR weights), 11 training scales 640..1000. The
authors ran 4 images, LR 0.0025, 720k iterations; written here for 16 images. Minival box AP 42.6.
"""

import ml_collections

from configs import retinamask_r101_fpn_2x_ms_gn


def get_config() -> ml_collections.ConfigDict:
  c = retinamask_r101_fpn_2x_ms_gn.get_config()
  c.model.backbone.groups = 32
  c.model.backbone.width_per_group = 8
  c.model.backbone.stride_in_1x1 = False
  c.data.min_sizes = (640, 672, 704, 736, 768, 800, 840, 880, 920, 960, 1000)
  return c
