"""A config whose train step takes about a second on 2 CPU cores, for tests, smoke runs and checks.

The default recipe (`configs/shapes.py`: GN ResNet-18 from scratch, the mask branch on) at half its width, on a
128 x 128 canvas (both orientations) and a small shapes dataset generated in the workdir.
"""

import ml_collections

from configs import shapes


def get_config() -> ml_collections.ConfigDict:
  c = shapes.get_config()
  c.model.backbone.base_width = 16
  c.model.fpn.channels = 32
  c.model.head.width = 32
  c.model.mask.head_width = 32

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
  c.data.shapes.train_mean_objects = None  # the sparse data the tests were written against (3.5 in both splits)
  c.data.copy_paste.prob = 0.0  # and no copy-paste: tiny, and the ablation tables built on it, train as before

  c.train.batch_size = 2
  c.train.num_steps = 20
  c.train.base_lr = 0.002
  c.train.lr_reference_batch = 2
  c.train.warmup_steps = 5
  c.train.log_every_steps = 5
  c.checkpoint.every_steps = 10
  c.eval.batch_size = 4
  c.eval.every_steps = 0  # only at the end: tests and smoke runs time their own evaluations
  c.eval.num_prediction_images = 2
  return c
