"""The base of the paper's ablations (configs/ablation_*.py), at COCO scale or at shapes scale.

    python -m retinamask_jax.sweep --config configs/ablation_best_match.py:coco --workdir runs/table1 \\
        --config.data.coco_root=/data/coco
    python -m retinamask_jax.sweep --config configs/ablation_best_match.py:shapes --workdir runs/table1_shapes

Both scales train what the paper's Table 1 ends on, which is also Table 2's "fixed beta = 0.11" row and Table 3's
"Base" row: RetinaNet with best matching at threshold 0.0, a fixed smooth-L1 beta of 0.11 and no mask branch. Each
ablation config changes one thing from here (its `sweep.grid`).

- 'coco': the authors' ablation setting, `configs/retinanet_r50_fpn_1x.py` (R-50-FPN, ImageNet backbone with
  frozen BN, 800 / 1333, 90k iterations at 16 images).
- 'shapes': the same method at the size where one run, `python train.py --config configs/ablation_base.py:shapes`
  (data generation, compilation, training and evaluation), takes under 3 minutes on 2 CPU cores, so that a 5-row x
  3-seed table fits in 45: the `configs/tiny.py` model (a GN ResNet-18 of width 16, trained from scratch) on 128 x
  128 shapes images, 1,500 training images, 2,500 steps of 4 images, evaluated on 200 held-out images. Where the
  budget went, and what each choice was measured to buy, is in BENCHMARKS.md ("A CPU ablation scale"); the tables
  and what they show are in ABLATIONS.md.
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
    c.data.shapes.num_train = 1500
    c.data.shapes.num_val = 200
    # Steps buy more AP than pixels or width here (BENCHMARKS.md): the budget goes to 2,500 steps of 4 images.
    c.train.batch_size = 4
    c.train.lr_reference_batch = 4
    c.train.num_steps = 2500
    c.train.warmup_steps = 100
    c.train.log_every_steps = 100
    c.checkpoint.every_steps = 2500
    c.eval.batch_size = 10
    c.eval.num_prediction_images = 0
  c.matching.best_match_threshold = 0.0
  c.loss.beta = 0.11
  c.loss.focal_gamma = 2.0  # the paper's, under every table (configs/shapes.py, hence tiny.py, trains with 1)
  c.sweep.seeds = 3
  return c
