"""Paper Table 2: smooth L1 with a fixed beta (1.0, 0.11) against the self-adjusting one (beta_max 1.0, 0.11).

    python -m retinamask_jax.sweep --config configs/ablation_smooth_l1.py:shapes --workdir runs/table2  # or :coco

`loss.self_adjusting` is structural (two programs); `loss.beta` and `loss.beta_max` are traced.
"""

import ml_collections

from configs import ablation_base


def get_config(scale: str = 'shapes') -> ml_collections.ConfigDict:
  c = ablation_base.get_config(scale)
  c.sweep.title = 'Table 2: self-adjusting smooth L1'
  c.sweep.grid = ('loss.self_adjusting,loss.beta,loss.beta_max=false:1.0:1.0,false:0.11:0.11,true:1.0:1.0,'
                  'true:0.11:0.11',)
  c.sweep.labels = ('fixed beta = 1.0', 'fixed beta = 0.11', 'self-adjusting beta <= 1.0',
                    'self-adjusting beta <= 0.11')
  return c
