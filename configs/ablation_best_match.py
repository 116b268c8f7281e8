"""Paper Table 1: the best-matching threshold (0.5 = plain RetinaNet matching ... 0.0 = any overlap).

    python -m retinamask_jax.sweep --config configs/ablation_best_match.py:shapes --workdir runs/table1  # or :coco

Every ground-truth box whose best anchor IoU is below 0.5 still gets that anchor as a positive when the IoU is at
least the threshold. Traced (HParams): the five points share one compiled train step.
"""

import ml_collections

from configs import ablation_base


def get_config(scale: str = 'shapes') -> ml_collections.ConfigDict:
  c = ablation_base.get_config(scale)
  c.sweep.title = 'Table 1: best-matching threshold'
  c.sweep.grid = ('matching.best_match_threshold=0.5,0.4,0.3,0.2,0.0',)
  if scale == 'shapes':
    c.sweep.class_columns = ('bar',)  # the thin class: the case best matching is for
  return c
