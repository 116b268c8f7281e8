"""Every shipped config loads, names the keys DESIGN.md section 7 promises, and builds its model (shapes only)."""

import glob
import importlib.util
import os

import jax
import numpy as np
import pytest

from retinamask_jax.models import retinamask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py')) if not p.endswith('__init__.py'))
PROMISED_KEYS = ('seed', 'train.batch_size', 'train.num_steps', 'train.log_every_steps', 'checkpoint.every_steps',
                 'data.train_json', 'data.train_images', 'data.val_json', 'data.val_images', 'data.coco_root')


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_the_promised_configs_exist():
  names = {os.path.basename(p) for p in CONFIGS}
  assert {'base.py', 'shapes.py', 'tiny.py', 'retinanet_r50_fpn_1x.py', 'retinamask_r50_fpn_2x_ms.py',
          'retinamask_r101_fpn_2x_ms.py', 'retinamask_r101_fpn_2x_ms_gn.py',
          'retinamask_x101_32x8d_fpn_2x_ms_gn.py'} <= names


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_keys_and_model(path):
  c = _load(path)
  for key in PROMISED_KEYS:
    node = c
    for part in key.split('.'):
      node = node[part]
  with c.unlocked():
    c.model.num_classes = 80
  model, init = retinamask.build_model(c)
  variables = jax.eval_shape(lambda rng: init(rng, (512, 512)), jax.random.key(0))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))
  assert count > 0
  if os.path.basename(path) == 'retinanet_r50_fpn_1x.py':
    # torchvision's retinanet_resnet50_fpn has 34,014,999 parameters with 91 classes; with 80 classes the cls
    # predictor loses 11 x 9 x (256 x 9 + 1) = 228,195 of them. Frozen BN here is a constant, not a parameter
    # (torchvision's FrozenBatchNorm2d are buffers), and stem + res2 weights are parameters in both.
    assert count == 34_014_999 - 228_195
