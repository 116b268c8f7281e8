"""A config whose train step takes about a second on 2 CPU cores, for tests, smoke runs and checks.

Slim ResNet-18 with GroupNorm (trained from scratch), narrow FPN and heads, the mask branch on, a 128 x 128 canvas
(both orientations), and a small shapes dataset generated in the workdir.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.model.backbone.depth = 18
  c.model.backbone.base_width = 16
  c.model.backbone.norm = 'group_norm'
  c.model.backbone.freeze_at = 0
  c.model.fpn.channels = 32
  c.model.fpn.norm = 'group_norm'
  c.model.head.width = 32
  c.model.head.depth = 2
  c.model.head.norm = 'group_norm'
  c.model.anchors.sizes = (16, 32, 64, 128, 256)
  c.model.mask.head_width = 32
  c.model.mask.head_depth = 2
  c.model.mask.max_proposals = 32

  c.data.min_sizes = (128,)
  c.data.max_size = 128
  c.data.test_min_size = 128
  c.data.test_max_size = 128
  c.data.max_instances = 16
  c.data.mask_size = 28
  c.data.num_workers = 0
  c.data.shapes.num_train = 64
  c.data.shapes.num_val = 16
  c.data.shapes.image_size = (96, 128)

  c.train.batch_size = 2
  c.train.num_steps = 20
  c.train.base_lr = 0.01
  c.train.lr_reference_batch = 2
  c.train.warmup_steps = 5
  c.train.lr_steps = (15,)
  c.train.log_every_steps = 5
  c.checkpoint.every_steps = 10
  c.eval.batch_size = 4
  return c
