"""RetinaMask R-101-FPN-GN, 2x multi-scale (the authors' `retinanet_mask_R-101-FPN_2x_adjust_std011_ms_gn`).

GroupNorm(32) after the FPN lateral and output convs and in the head towers; not in the backbone (frozen BN), P6/P7,
the predictors or the mask head (spec 7, 9.9). Weight decay also on the GN scales, as theirs. Minival box AP 41.7.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.model.backbone.depth = 101
  c.model.fpn.norm = 'group_norm'
  c.model.head.norm = 'group_norm'
  c.train.weight_decay_norm = 1e-4
  return c
