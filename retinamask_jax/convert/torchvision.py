"""torchvision checkpoints -> retinamask-jax variables (DESIGN.md 3, 8).

    python -m retinamask_jax.convert.torchvision --in model.pth --out <dir>

- `resnet_variables(state_dict)`: an ImageNet ResNet-18/34/50/101/152, ResNeXt or wide ResNet state dict (torchvision
  `resnet50().state_dict()`, the `.pth` files of its weight enums) -> the backbone's `{'params', 'frozen'}`, for
  `model.backbone_init`. The architecture is read off the tensors (`resnet_architecture`).
- `retinanet_variables(state_dict)`: torchvision's `retinanet_resnet50_fpn` (COCO) -> the whole detector's
  `{'params', 'frozen'}`, to be used with `configs/torchvision_retinanet_r50.py` (`model.num_classes` = the
  checkpoint's class count, 91 for COCO; our class k is torchvision's label k - 1).

Mapping (torchvision -> here): conv `weight [O, I, kh, kw]` -> `kernel [kh, kw, I, O]`; every BatchNorm (plain
`BatchNorm2d` in eval mode or `FrozenBatchNorm2d`, both y = (x - mean) / sqrt(var + eps) * weight + bias) is folded
into the frozen affine: scale = weight / sqrt(var + eps), bias = bias - mean * scale, computed in float64, with
torchvision's eps = 1e-5 (`bn_eps`). Names:

  conv1, bn1                            backbone/stem/conv, stem/norm
  layer{i}.{j}.conv{k}, bn{k}           backbone/res{i+1}/block{j}/conv{k}, norm{k}
  layer{i}.{j}.downsample.0, .1         backbone/res{i+1}/block{j}/downsample_conv, downsample_norm
  backbone.fpn.inner_blocks.{i}.0       fpn/lateral{i+3}
  backbone.fpn.layer_blocks.{i}.0       fpn/output{i+3}
  backbone.fpn.extra_blocks.p6, p7      fpn/p6, fpn/p7
  head.classification_head.conv.{i}.0   head/cls_tower_{i};   .cls_logits -> head/cls_logits
  head.regression_head.conv.{i}.0       head/box_tower_{i};   .bbox_reg   -> head/box_deltas

The older key layout of torchvision's own checkpoints (`inner_blocks.{i}.weight`, head `conv.{2i}.weight`) is
renamed first, as torchvision's `_load_from_state_dict` does. Every expected tensor must be present with its exact
shape and nothing else may be left over (a ResNet's `fc` and BN `num_batches_tracked` are ignored); otherwise a
`ConversionError` names the first missing, mismatched or unexpected key with the shapes.

Files are read with `torch.load(..., weights_only=True)`: a pickle holding anything but tensors and plain
containers is refused. torch is needed only to read `.pth` files and is imported there, not at module import.

The command writes, under `--out`:
- a RetinaNet: a `Detector` export (`variables/` Orbax params-only checkpoint + `config.json` from
  `configs/torchvision_retinanet_r50.py`), loadable with `Detector.from_checkpoint(out)`;
- a ResNet: `variables/` (Orbax, `{'params', 'frozen'}` of the backbone alone) + `backbone.json` (its architecture),
  for `--config.model.backbone_init=<out>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from retinamask_jax.convert import BACKBONE_JSON, VARIABLES_DIR

PyTree = Any
StateDict = Mapping[str, Any]

BN_EPS = 1e-5  # torchvision's BatchNorm2d and FrozenBatchNorm2d
RETINANET_PREFIX = 'backbone.body.'
# Entries of a torchvision ImageNet ResNet that have no counterpart in a backbone.
_IGNORED_SUFFIXES = ('num_batches_tracked',)
_IGNORED_PREFIXES = ('fc.',)
_STAGES = {(2, 2, 2, 2): 18, (3, 4, 6, 3): None, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


class ConversionError(ValueError):
  """A state dict does not have the tensors of the architecture it is converted as."""


# ------------------------------------------------------------------------------------------------ reading


def _as_numpy(value: Any) -> np.ndarray:
  """A torch tensor (any device, with or without grad) or array-like -> numpy; floating types as float32."""
  if hasattr(value, 'detach'):
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  array = np.asarray(value)
  return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a `.pth` / `.pt` state dict with `torch.load(path, map_location='cpu', weights_only=True)`.

  A top-level `{'model': sd}` or `{'state_dict': sd}` wrapper (training checkpoints) is unwrapped.
  Returns {key: numpy array} (floating tensors as float32).
  Raises:
    ConversionError: the file is not a pickle of plain tensors (weights_only refused it), or holds something other
      than a flat {str: tensor} mapping.
  """
  import torch

  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as e:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, ... for foreign pickles)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConversionError(
        f'{path}: not a state dict of plain tensors; torch.load(weights_only=True) refused it ({first}). Save '
        'model.state_dict(), not the model object.'
    ) from None
  for wrapper in ('model', 'state_dict'):  # a state dict's own values are tensors, never dicts
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
      break
  if not isinstance(obj, dict):
    raise ConversionError(f'{path}: expected a state dict (a dict of tensors), got {type(obj).__name__}')
  out = {}
  for key, value in obj.items():
    if not isinstance(key, str) or not isinstance(value, torch.Tensor):
      raise ConversionError(
          f'{path}: expected a state dict of tensors; entry {key!r} is a {type(value).__name__}'
      )
    out[key] = _as_numpy(value)
  return out


# ------------------------------------------------------------------------------------------------ ResNet


@dataclasses.dataclass(frozen=True)
class ResNetArchitecture:
  """A torchvision ResNet's structure as `model.backbone.*` describes it (stride in the 3x3: stride_in_1x1 False)."""

  depth: int
  groups: int = 1
  width_per_group: int = 64
  base_width: int = 64

  @property
  def bottleneck(self) -> bool:
    return self.depth >= 50


def _require(sd: StateDict, key: str, what: str) -> np.ndarray:
  if key not in sd:
    raise ConversionError(f'{what}: the state dict has no key {key!r}')
  return _as_numpy(sd[key])


def _detect_prefix(sd: StateDict, prefix: str | None) -> str:
  if prefix is not None:
    return prefix
  for candidate in ('', RETINANET_PREFIX, 'module.'):
    if f'{candidate}conv1.weight' in sd:
      return candidate
  return ''


def resnet_architecture(state_dict: StateDict, prefix: str | None = None) -> ResNetArchitecture:
  """Depth, groups and widths of the ResNet in `state_dict` (keys `conv1.weight`, `layer{1-4}.{j}.conv{k}...`).

  `prefix` is prepended to every key ('' for an ImageNet ResNet; default: '' or `backbone.body.` or `module.`,
  whichever has `conv1.weight`).
  Raises:
    ConversionError: naming the first key of a ResNet that is missing, or block counts that are no ResNet's.
  """
  p = _detect_prefix(state_dict, prefix)
  what = 'ResNet'
  stem = _require(state_dict, f'{p}conv1.weight', what)
  base_width = int(stem.shape[0])
  bottleneck = f'{p}layer1.0.conv3.weight' in state_dict
  stages = []
  for i in range(1, 5):
    _require(state_dict, f'{p}layer{i}.0.conv1.weight', what)
    j = 0
    while f'{p}layer{i}.{j}.conv1.weight' in state_dict:
      j += 1
    stages.append(j)
  stages = tuple(stages)
  if stages not in _STAGES:
    raise ConversionError(f'{what}: blocks per stage {stages} are not those of ResNet-18/34/50/101/152')
  depth = _STAGES[stages] or (50 if bottleneck else 34)
  if bottleneck != (depth >= 50):
    raise ConversionError(f'{what}: {stages} blocks per stage with {"bottleneck" if bottleneck else "basic"} blocks')
  groups, width_per_group = 1, 64
  if bottleneck:
    # conv2 of layer1.0 is [width, width / groups, 3, 3] with width = width_per_group * groups (planes = 64).
    conv2 = _require(state_dict, f'{p}layer1.0.conv2.weight', what)
    width, per_group = int(conv2.shape[0]), int(conv2.shape[1])
    groups = width // per_group if per_group and width % per_group == 0 else 1
    width_per_group = width * 64 // (groups * base_width)
  return ResNetArchitecture(depth=depth, groups=groups, width_per_group=width_per_group, base_width=base_width)


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One variable here and the torchvision tensors it comes from."""

  ours: tuple[str, ...]  # (collection, *module path) up to the module: ('params', 'backbone', 'stem', 'conv')
  torch: str  # the torchvision module prefix: 'backbone.body.conv1'
  kind: str  # 'conv' (weight [+ bias]) or 'bn' (weight, bias, running_mean, running_var)
  bias: bool = False


def _resnet_entries(arch: ResNetArchitecture, tv: str, ours: tuple[str, ...]) -> Iterator[_Entry]:
  """In torchvision's state-dict order."""
  yield _Entry(('params', *ours, 'stem', 'conv'), f'{tv}conv1', 'conv')
  yield _Entry(('frozen', *ours, 'stem', 'norm'), f'{tv}bn1', 'bn')
  sizes = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}[arch.depth]
  convs = 3 if arch.bottleneck else 2
  for i, num_blocks in enumerate(sizes, start=1):
    for j in range(num_blocks):
      block = (*ours, f'res{i + 1}', f'block{j}')
      t = f'{tv}layer{i}.{j}.'
      for k in range(1, convs + 1):
        yield _Entry(('params', *block, f'conv{k}'), f'{t}conv{k}', 'conv')
        yield _Entry(('frozen', *block, f'norm{k}'), f'{t}bn{k}', 'bn')
      # The first block of every stage projects (stride 2, or 64 -> 256 channels in res2 of a bottleneck ResNet).
      if j == 0 and (i > 1 or arch.bottleneck):
        yield _Entry(('params', *block, 'downsample_conv'), f'{t}downsample.0', 'conv')
        yield _Entry(('frozen', *block, 'downsample_norm'), f'{t}downsample.1', 'bn')


def _torch_shape(kernel_shape: tuple[int, ...]) -> tuple[int, ...]:
  """HWIO kernel shape -> torchvision's OIHW weight shape."""
  h, w, i, o = kernel_shape
  return (o, i, h, w)


def _lookup(tree: PyTree, path: tuple[str, ...]) -> Any:
  node = tree
  for name in path:
    node = node[name]
  return node


def _assign(tree: dict, path: tuple[str, ...], value: Any) -> None:
  node = tree
  for name in path[:-1]:
    node = node.setdefault(name, {})
  node[path[-1]] = value


def _convert(
    sd: StateDict, entries: list[_Entry], expected: PyTree, what: str, bn_eps: float, ignore: tuple[str, ...] = ()
) -> dict[str, PyTree]:
  """Checks every entry's tensors against `expected` (abstract variables) and converts them; see module doc."""
  used = set()

  def get(key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in sd:
      raise ConversionError(f'{what}: the state dict has no key {key!r} (expected shape {shape})')
    value = _as_numpy(sd[key])
    if tuple(value.shape) != tuple(shape):
      raise ConversionError(f'{what}: key {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}')
    used.add(key)
    return value

  out: dict[str, PyTree] = {}
  for e in entries:
    node = _lookup(expected, e.ours)
    if e.kind == 'conv':
      kernel_shape = tuple(node['kernel'].shape)
      weight = get(f'{e.torch}.weight', _torch_shape(kernel_shape))
      _assign(out, (*e.ours, 'kernel'), np.ascontiguousarray(weight.transpose(2, 3, 1, 0), np.float32))
      if 'bias' in node:
        _assign(out, (*e.ours, 'bias'), get(f'{e.torch}.bias', tuple(node['bias'].shape)).astype(np.float32))
    else:
      shape = tuple(node['scale'].shape)
      names = ('weight', 'bias', 'running_mean', 'running_var')
      gamma, beta, mean, var = (get(f'{e.torch}.{name}', shape).astype(np.float64) for name in names)
      scale = gamma / np.sqrt(var + bn_eps)
      _assign(out, (*e.ours, 'scale'), scale.astype(np.float32))
      _assign(out, (*e.ours, 'bias'), (beta - mean * scale).astype(np.float32))
  for key in sd:
    if key in used or key.endswith(_IGNORED_SUFFIXES) or key.startswith(ignore):
      continue
    raise ConversionError(
        f'{what}: unexpected key {key!r} (shape {tuple(np.shape(sd[key]))}) in the state dict; it is not part '
        'of this architecture'
    )
  out.setdefault('frozen', {})
  return out


def _abstract_resnet(arch: ResNetArchitecture) -> PyTree:
  import jax
  import jax.numpy as jnp

  from retinamask_jax.models import resnet as resnet_lib

  module = resnet_lib.resnet(
      arch.depth,
      base_width=arch.base_width,
      groups=arch.groups,
      width_per_group=arch.width_per_group,
      stride_in_1x1=False,
      norm='frozen_bn',
  )
  return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))


def resnet_variables(
    state_dict: StateDict,
    *,
    prefix: str | None = None,
    architecture: ResNetArchitecture | None = None,
    bn_eps: float = BN_EPS,
) -> dict[str, PyTree]:
  """A torchvision ResNet / ResNeXt state dict -> `{'params': ..., 'frozen': ...}` of `models.resnet.ResNet`.

  Args:
    state_dict: {key: tensor or array}; an ImageNet checkpoint (its `fc` is ignored) or any dict holding a ResNet
      under `prefix`.
    prefix: key prefix of the ResNet ('' for ImageNet checkpoints; default: detected, '' / 'backbone.body.' /
      'module.').
    architecture: the ResNet expected (default: read off the tensors by `resnet_architecture`); given, a state
      dict of another depth or width fails.
    bn_eps: the BatchNorm eps folded into the frozen affine (torchvision: 1e-5).
  Returns:
    float32 numpy trees: params {stem, res2..res5: conv kernels [kh, kw, Cin / groups, Cout]}, frozen {..: scale,
    bias [C]}; the model needs `stride_in_1x1=False` (torchvision's v1.5 blocks) and `norm='frozen_bn'`.
  Raises:
    ConversionError: naming the first missing, mismatched (with both shapes) or unexpected key.
  """
  p = _detect_prefix(state_dict, prefix)
  arch = architecture or resnet_architecture(state_dict, p)
  entries = list(_resnet_entries(arch, p, ()))
  what = f'ResNet-{arch.depth}' + (f' ({arch.groups}x{arch.width_per_group}d)' if arch.groups > 1 else '')
  sd = {k: v for k, v in state_dict.items() if k.startswith(p)}
  return _convert(sd, entries, _abstract_resnet(arch), what, bn_eps, ignore=tuple(p + x for x in _IGNORED_PREFIXES))


# ------------------------------------------------------------------------------------------------ RetinaNet


def _rename_legacy(state_dict: StateDict) -> dict[str, Any]:
  """torchvision's pre-v2 key layout -> the current one (what its `_load_from_state_dict` hooks do)."""
  sd = dict(state_dict)
  for block in ('inner_blocks', 'layer_blocks'):
    for i in range(3):
      for leaf in ('weight', 'bias'):
        old, new = f'backbone.fpn.{block}.{i}.{leaf}', f'backbone.fpn.{block}.{i}.0.{leaf}'
        if old in sd and new not in sd:
          sd[new] = sd.pop(old)
  for head in ('classification_head', 'regression_head'):
    for i in range(4):
      for leaf in ('weight', 'bias'):
        old, new = f'head.{head}.conv.{2 * i}.{leaf}', f'head.{head}.conv.{i}.0.{leaf}'
        if old in sd and new not in sd:
          sd[new] = sd.pop(old)
  return sd


def retinanet_num_classes(state_dict: StateDict) -> tuple[int, int]:
  """(num_classes, num_anchors) of a torchvision RetinaNet state dict, from its predictors' shapes."""
  what = 'torchvision retinanet_resnet50_fpn'
  box = _require(state_dict, 'head.regression_head.bbox_reg.weight', what)
  cls = _require(state_dict, 'head.classification_head.cls_logits.weight', what)
  num_anchors = int(box.shape[0]) // 4
  if num_anchors == 0 or box.shape[0] % 4 or cls.shape[0] % num_anchors:
    raise ConversionError(
        f'{what}: cls_logits has {cls.shape[0]} and bbox_reg {box.shape[0]} output channels; expected A * K and A * 4'
    )
  return int(cls.shape[0]) // num_anchors, num_anchors


def _abstract_retinanet(
    num_classes: int, num_anchors: int, arch: ResNetArchitecture = ResNetArchitecture(50)
) -> PyTree:
  import jax
  import jax.numpy as jnp

  from retinamask_jax.models import retinamask as rm

  module = rm.RetinaMask(
      num_classes=num_classes,
      backbone_config=rm.BackboneConfig(
          depth=arch.depth, groups=arch.groups, width_per_group=arch.width_per_group, base_width=arch.base_width,
          stride_in_1x1=False,
      ),
      head_config=rm.HeadConfig(num_anchors=num_anchors),
      mask_config=None,
  )
  return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 128, 128, 3), jnp.float32))


def retinanet_variables(state_dict: StateDict, *, bn_eps: float = BN_EPS) -> dict[str, PyTree]:
  """torchvision `retinanet_resnet50_fpn` state dict -> `{'params': ..., 'frozen': ...}` of the detector.

  Use with `configs/torchvision_retinanet_r50.py` and `model.num_classes` = `retinanet_num_classes(sd)[0]` (91 for
  COCO; our class k is torchvision's label k - 1, so `category_ids = range(91)` gives COCO's ids). The mask head is
  not part of a RetinaNet (`model.mask.enabled = False`). A `RetinaNet` built on another ResNet with torchvision's
  own FPN extractor (`_resnet_fpn_extractor(resnet18(), 3, returned_layers=[2, 3, 4],
  extra_blocks=LastLevelP6P7(256, 256))`) converts too: the backbone is read off the tensors
  (`retinanet_architecture`; set `model.backbone.depth` etc. to it, as the command does).

  Returns:
    float32 numpy trees: params {backbone, fpn, head}, frozen {backbone}.
  Raises:
    ConversionError: naming the first missing, mismatched (both shapes) or unexpected key.
  """
  sd = _rename_legacy(state_dict)
  num_classes, num_anchors = retinanet_num_classes(sd)
  arch = retinanet_architecture(sd)
  entries = list(_resnet_entries(arch, RETINANET_PREFIX, ('backbone',)))
  for i in range(3):
    entries.append(_Entry(('params', 'fpn', f'lateral{i + 3}'), f'backbone.fpn.inner_blocks.{i}.0', 'conv'))
    entries.append(_Entry(('params', 'fpn', f'output{i + 3}'), f'backbone.fpn.layer_blocks.{i}.0', 'conv'))
  for level in ('p6', 'p7'):
    entries.append(_Entry(('params', 'fpn', level), f'backbone.fpn.extra_blocks.{level}', 'conv'))
  for tower, head, predictor, ours in (
      ('cls_tower', 'classification_head', 'cls_logits', 'cls_logits'),
      ('box_tower', 'regression_head', 'bbox_reg', 'box_deltas'),
  ):
    for i in range(4):
      entries.append(_Entry(('params', 'head', f'{tower}_{i}'), f'head.{head}.conv.{i}.0', 'conv'))
    entries.append(_Entry(('params', 'head', ours), f'head.{head}.{predictor}', 'conv'))
  what = 'torchvision retinanet_resnet50_fpn' if arch.depth == 50 else f'torchvision RetinaNet ResNet-{arch.depth}'
  return _convert(sd, entries, _abstract_retinanet(num_classes, num_anchors, arch), what, bn_eps)


def retinanet_architecture(state_dict: StateDict) -> ResNetArchitecture:
  """The ResNet under `backbone.body.` of a torchvision RetinaNet state dict (ResNet-50 when it cannot be read:
  the conversion then names the first mismatching key)."""
  try:
    return resnet_architecture(state_dict, RETINANET_PREFIX)
  except ConversionError:
    return ResNetArchitecture(depth=50)


def is_retinanet(state_dict: StateDict) -> bool:
  """Whether `state_dict` looks like a torchvision RetinaNet (it has a classification head)."""
  return any(k.startswith('head.classification_head.') for k in state_dict)


# ------------------------------------------------------------------------------------------------ files


def repo_config_path(name: str) -> str:
  """`configs/<name>.py` of this repository (the package's sibling directory)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.join(root, 'configs', f'{name}.py')


def load_config_file(path: str):
  """`get_config()` of a config file (the repository root is put on sys.path for its `from configs import`)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(f'_config_{os.path.basename(path)[:-3]}', path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f'{path}: not a config file')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def save_backbone(path: str, variables: dict[str, PyTree], architecture: ResNetArchitecture) -> str:
  """Writes `<path>/variables` (Orbax) and `<path>/backbone.json`; the directory `model.backbone_init` takes."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, VARIABLES_DIR)):
    raise FileExistsError(f'{path}: converted variables are already there')
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, VARIABLES_DIR), variables)
  info = dict(dataclasses.asdict(architecture), stride_in_1x1=False, norm='frozen_bn', source='torchvision')
  with open(os.path.join(path, BACKBONE_JSON), 'w') as f:
    json.dump(info, f, indent=1)
  return path


def convert_file(in_path: str, out_path: str, *, config_path: str | None = None, bn_eps: float = BN_EPS) -> str:
  """Converts a torchvision `.pth` into `out_path` (see the module doc); returns what was written, in words."""
  sd = load_state_dict(in_path)
  if is_retinanet(sd):
    from retinamask_jax.export import Detector
    from retinamask_jax.models import retinamask as rm

    variables = retinanet_variables(sd, bn_eps=bn_eps)
    num_classes, _ = retinanet_num_classes(sd)
    config = load_config_file(config_path or repo_config_path('torchvision_retinanet_r50'))
    arch = retinanet_architecture(_rename_legacy(sd))
    b = config.model.backbone
    b.depth, b.groups, b.width_per_group, b.base_width = arch.depth, arch.groups, arch.width_per_group, arch.base_width
    if num_classes != config.model.num_classes:
      config.model.num_classes = num_classes
      config.model.category_ids = tuple(range(num_classes))
      config.model.class_names = tuple(f'label_{k}' for k in range(num_classes))
    model, _ = rm.build_model(config)
    Detector(model, config, variables).export(out_path)
    return f'RetinaNet ({num_classes} classes): Detector export at {os.path.abspath(out_path)}'
  arch = resnet_architecture(sd)
  variables = resnet_variables(sd, architecture=arch, bn_eps=bn_eps)
  save_backbone(out_path, variables, arch)
  return (
      f'ResNet-{arch.depth} backbone (groups {arch.groups}, width/group {arch.width_per_group}) at '
      f'{os.path.abspath(out_path)}: use --config.model.backbone_init={os.path.abspath(out_path)} '
      '--config.model.backbone.stride_in_1x1=False'
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m retinamask_jax.convert.torchvision',
      description='Convert a torchvision ResNet (ImageNet) or retinanet_resnet50_fpn (COCO) .pth to Orbax.',
  )
  parser.add_argument('--in', dest='in_path', required=True, help='torchvision state dict (.pth)')
  parser.add_argument('--out', dest='out_path', required=True, help='output directory')
  parser.add_argument(
      '--config', default=None, help='config file for a RetinaNet (default: configs/torchvision_retinanet_r50.py)'
  )
  parser.add_argument('--bn_eps', type=float, default=BN_EPS, help='BatchNorm eps folded into the frozen affine')
  args = parser.parse_args(argv)
  try:
    print(convert_file(args.in_path, args.out_path, config_path=args.config, bn_eps=args.bn_eps))
  except (ConversionError, FileNotFoundError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
