"""RetinaNet R-50-FPN 1x baseline (the authors' `retinanet_R-50-FPN_1x`): no mask branch, fixed smooth-L1 beta.

Single scale 800 / 1333, 90k iterations at 16 images, LR 0.01 with steps at 60k and 80k. Authors' minival box AP
36.4 (their RetinaNet baseline; spec section 8).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.model.mask.enabled = False
  c.loss.self_adjusting = False
  c.data.min_sizes = (800,)
  c.train.num_steps = 90_000
  c.train.lr_steps = (60_000, 80_000)
  return c
