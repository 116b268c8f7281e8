"""The base of the paper's ablations (configs/ablation_*.py), at COCO scale or at shapes scale.

    python -m retinamask_jax.sweep --config configs/ablation_best_match.py:coco --workdir runs/table1 \\
        --config.data.coco_root=/data/coco
    python -m retinamask_jax.sweep --config configs/ablation_best_match.py:shapes --workdir runs/table1_shapes

Both scales train what the paper's Table 1 ends on, which is also Table 2's "fixed beta = 0.11" row and Table 3's
"Base" row: RetinaNet with best matching at threshold 0.0, a fixed smooth-L1 beta of 0.11 and no mask branch. Each
ablation config changes one thing from here (its `sweep.grid`).

- 'coco': the authors' ablation setting, `configs/retinanet_r50_fpn_1x.py` (R-50-FPN, ImageNet backbone with
  frozen BN, 800 / 1333, 90k iterations at 16 images).
- 'shapes': the same method at the size where a 3-seed table fits in about an hour on 2 CPU cores: the
  `configs/tiny.py` model (a GN ResNet-18 of width 16, trained from scratch) on 128 x 128 shapes images, 600 steps
  of 2 images, evaluated on 100 held-out images. At this size a run's box AP is a few points and the seeds' spread
  is of the order of the differences the paper reports on COCO (ABLATIONS.md has the tables and what they show).
"""

import ml_collections

from configs import retinanet_r50_fpn_1x, tiny

SCALES = ('coco', 'shapes')


def get_config(scale: str = 'shapes') -> ml_collections.ConfigDict:
  if scale not in SCALES:
    raise ValueError(f'ablation scale must be one of {SCALES}, got {scale!r} (use configs/ablation_x.py:shapes)')
  if scale == 'coco':
    c = retinanet_r50_fpn_1x.get_config()
  else:
    c = tiny.get_config()
    c.model.mask.enabled = False
    c.loss.self_adjusting = False
    c.data.shapes.image_size = (128, 128)  # a fixed size: every image on one 128 x 128 canvas
    c.data.shapes.num_train = 600
    c.data.shapes.num_val = 100
    c.train.num_steps = 600
    c.train.warmup_steps = 50
    c.train.log_every_steps = 50
    c.checkpoint.every_steps = 600
    c.eval.batch_size = 10
    c.eval.num_prediction_images = 0
  c.matching.best_match_threshold = 0.0
  c.loss.beta = 0.11
  c.sweep.seeds = 3
  return c
