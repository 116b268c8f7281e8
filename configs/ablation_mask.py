"""Paper Table 3: the mask branch as a training signal for detection: none, on P3-P5 (1x and 1.5x), on P2-P5.

    python -m retinamask_jax.sweep --config configs/ablation_mask.py:shapes --workdir runs/table3  # or :coco

"1.5x" trains 1.5 times the base schedule's steps, with the LR steps scaled alike. P2-P5 builds a P2 level for
the mask branch only (the detector stays on P3-P7), as the authors' `retinanet_mask_p2p7` config.
"""

import ml_collections

from configs import ablation_base


def get_config(scale: str = 'shapes') -> ml_collections.ConfigDict:
  c = ablation_base.get_config(scale)
  steps, lr_steps = c.train.num_steps, tuple(c.train.lr_steps)
  keys = 'model.mask.enabled,model.mask.min_level,train.num_steps'
  points = [f'false:3:{steps}', f'true:3:{steps}', f'true:3:{int(1.5 * steps)}', f'true:2:{steps}']
  if c.train.lr_schedule == 'steps':  # a cosine schedule stretches with num_steps by itself
    keys += ',train.lr_steps'
    scaled = [lr_steps, lr_steps, tuple(int(1.5 * s) for s in lr_steps), lr_steps]
    points = [f'{p}:({",".join(map(str, s))},)' for p, s in zip(points, scaled)]
  c.sweep.title = 'Table 3: mask prediction'
  c.sweep.grid = (f'{keys}={",".join(points)}',)
  c.sweep.labels = ('base (no mask) 1x', 'P3-P5 1x', 'P3-P5 1.5x', 'P2-P5 1x')
  return c
