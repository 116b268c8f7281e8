"""Pretrained weights in: converters from other frameworks' checkpoints, and `model.backbone_init`.

`convert.torchvision` maps torchvision ResNet / RetinaNet state dicts onto this repository's variables (it needs
torch only to read `.pth` files). This module is torch-free: it loads a converted backbone (the directory
`python -m retinamask_jax.convert.torchvision` writes, a `Detector` export, or a `.pth` converted on the fly) and
puts it into freshly initialized variables at the start of training (`train.loop.create_train_state`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

PyTree = Any
VARIABLES_DIR = 'variables'
BACKBONE_JSON = 'backbone.json'


class BackboneInitError(ValueError):
  """`model.backbone_init` cannot be loaded into the model the config describes."""


def load_backbone(path: str) -> tuple[dict[str, PyTree], dict[str, Any]]:
  """The backbone variables stored at `path`, and what is known of their architecture.

  Args:
    path: a directory written by `python -m retinamask_jax.convert.torchvision` for a ResNet (`variables/` +
      `backbone.json`), a `Detector` export or converted RetinaNet (`variables/` holding `params/backbone`), or a
      torchvision ResNet `.pth` / `.pt` file (converted now; needs torch).
  Returns:
    ({'params': tree, 'frozen': tree} of numpy arrays, laid out as `models.resnet.ResNet`'s variables;
     info dict, e.g. {'depth': 50, 'stride_in_1x1': False, ...}, empty when unknown).
  Raises:
    FileNotFoundError: nothing usable at `path`.
  """
  if os.path.isfile(path) and path.endswith(('.pth', '.pt')):
    from retinamask_jax.convert import torchvision as tv

    sd = tv.load_state_dict(path)
    arch = tv.resnet_architecture(sd)
    info = dict(depth=arch.depth, groups=arch.groups, width_per_group=arch.width_per_group, stride_in_1x1=False)
    return tv.resnet_variables(sd, architecture=arch), info
  location = os.path.join(os.path.abspath(path), VARIABLES_DIR)
  if not os.path.isdir(location):
    raise FileNotFoundError(
        f'model.backbone_init={path!r}: expected a converted backbone directory (with {VARIABLES_DIR}/) or a .pth'
    )
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(location)
  restored = jax.tree.map(np.asarray, restored)
  info: dict[str, Any] = {}
  if os.path.exists(os.path.join(path, BACKBONE_JSON)):
    with open(os.path.join(path, BACKBONE_JSON)) as f:
      info = json.load(f)
  elif os.path.exists(os.path.join(path, 'config.json')):  # a Detector export: its config knows the backbone
    with open(os.path.join(path, 'config.json')) as f:
      info = dict(json.load(f).get('model', {}).get('backbone', {}))
  if 'backbone' in restored.get('params', {}):  # a whole detector: take its backbone
    restored = {c: restored.get(c, {}).get('backbone', {}) for c in ('params', 'frozen')}
  return {c: restored.get(c, {}) for c in ('params', 'frozen')}, info


def _flat(tree: PyTree) -> dict[str, Any]:
  return {
      '/'.join(str(getattr(k, 'key', k)) for k in path): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def init_backbone(variables: dict[str, PyTree], config: ml_collections.ConfigDict) -> dict[str, PyTree]:
  """`variables` with the backbone's params and frozen statistics replaced by those of `model.backbone_init`.

  Everything else (FPN, heads, loss statistics) keeps its fresh initialization; the optimizer state is created
  afterwards from these params. Returns a new dict; `variables` is not modified.
  Raises:
    BackboneInitError: naming the first variable whose presence or shape differs (with both shapes), or a
      torchvision backbone with `model.backbone.stride_in_1x1` True (its blocks carry the stride in the 3x3 conv;
      the parameter shapes would fit and the features be silently wrong).
  """
  path = str(config.model.backbone_init)
  loaded, info = load_backbone(path)
  b = config.model.backbone
  if info.get('stride_in_1x1') is False and bool(b.stride_in_1x1) and int(b.depth) >= 50:
    raise BackboneInitError(
        f'model.backbone_init={path!r} holds a torchvision ResNet-{info.get("depth", "?")} (stride in the 3x3 conv); '
        'set model.backbone.stride_in_1x1=False'
    )
  expected = {c: variables.get(c, {}).get('backbone', {}) for c in ('params', 'frozen')}
  got, want = _flat(loaded), _flat(expected)
  # Parameters first, each collection in its natural (sorted) order, as the message should name the cause.
  for key in sorted(set(got) | set(want), key=lambda k: (not k.startswith('params/'), k)):
    g, w = got.get(key), want.get(key)
    g_shape = None if g is None else tuple(np.shape(g))
    w_shape = None if w is None else tuple(np.shape(w))
    if g_shape != w_shape:
      collection, rest = key.split('/', 1)
      raise BackboneInitError(
          f'model.backbone_init={path!r} does not fit model.backbone ({_describe(b)}): at '
          f'{collection}/backbone/{rest} the converted backbone has '
          f'{"no entry" if g_shape is None else "shape " + str(g_shape)}, the model expects '
          f'{"no entry" if w_shape is None else "shape " + str(w_shape)}'
      )
  out = dict(variables)
  for c in ('params', 'frozen'):
    if not expected[c]:
      continue
    cast = jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype), loaded[c], expected[c])
    out[c] = {**variables[c], 'backbone': cast}
  return out


def _describe(b: ml_collections.ConfigDict) -> str:
  return (
      f'depth {b.depth}, base_width {b.base_width}, groups {b.groups}, width_per_group {b.width_per_group}, '
      f'norm {b.norm!r}'
  )
