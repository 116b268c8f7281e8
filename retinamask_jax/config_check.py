"""Config validation: the checks that need no data and no compilation, each error naming the key.

Keys and types are checked against `configs/base.py` (every knob, with its default) when the repo's configs are
importable (the library does not ship them: installed on its own, it checks values only). The checks live in the
library rather than next to `configs/base.py` for that reason: `eval.py`, the sweep and a user's own script
validate the same way whether or not `configs/` is on the path.
"""

from __future__ import annotations

import difflib
from typing import Any

import jax
import ml_collections
import numpy as np

from retinamask_jax.data import pipeline as pipeline_lib


class ConfigError(ValueError):
  """The config cannot work; raised before anything compiles."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key of `config`.

  Canvases need no check of their own: `pipeline.train_canvases` rounds every training and test size up to a
  multiple of `data.canvas_multiple` (a multiple of 32), so any positive size gives valid canvases; what can be
  wrong is a size that is not a positive integer. `eval.batch_size` may be any positive number: evaluation pads
  each batch with blank rows up to a multiple of the device count.
  """
  _check_against_defaults(config)
  n = jax.device_count()
  t, d = config.train, config.data

  def need(ok: bool, message: str) -> None:
    if not ok:
      raise ConfigError(message)

  need(t.batch_size >= 1, f'train.batch_size must be >= 1, got {t.batch_size}')
  need(t.batch_size % n == 0, f'train.batch_size = {t.batch_size} is not divisible by the {n} devices')
  need(t.batch_size % jax.process_count() == 0,
       f'train.batch_size = {t.batch_size} is not divisible by the {jax.process_count()} processes')
  need(t.num_steps >= 0, f'train.num_steps must be >= 0, got {t.num_steps}')
  need(t.base_lr > 0, f'train.base_lr must be > 0, got {t.base_lr}')
  need(t.get('lr_scale', 1.0) > 0, f'train.lr_scale must be > 0, got {t.get("lr_scale")}')
  need(t.log_every_steps >= 1, f'train.log_every_steps must be >= 1, got {t.log_every_steps}')
  need(t.get('nonfinite', 'skip') in ('skip', 'stop'),
       f"train.nonfinite must be 'skip' or 'stop', got {t.get('nonfinite')!r}")
  need(config.checkpoint.every_steps >= 1, f'checkpoint.every_steps must be >= 1, got {config.checkpoint.every_steps}')
  need(config.checkpoint.keep >= 1, f'checkpoint.keep must be >= 1, got {config.checkpoint.keep}')
  need(config.eval.batch_size >= 1, f'eval.batch_size must be >= 1, got {config.eval.batch_size}')
  # eval.batch_size need not divide the device count: evaluation pads its batches up (train.evaluation).
  sizes = tuple(d.min_sizes) if isinstance(d.min_sizes, (tuple, list)) else ()
  need(len(sizes) > 0 and all(_positive_int(v) for v in sizes),
       f'data.min_sizes must be a non-empty sequence of positive integers, got {d.min_sizes!r}')
  for key in ('max_size', 'test_min_size', 'test_max_size', 'max_instances', 'mask_size'):
    need(_positive_int(d[key]), f'data.{key} must be a positive integer, got {d[key]!r}')
  need(d.crowd in ('drop', 'ignore'), f"data.crowd must be 'drop' or 'ignore', got {d.crowd!r}")
  for key in ('mean_objects', 'train_mean_objects'):
    value = d.shapes.get(key) if 'shapes' in d else None
    need(value is None or value >= 1, f'data.shapes.{key} must be >= 1, got {value!r}')
  need(0.0 <= d.hflip_prob <= 1.0, f'data.hflip_prob must be in [0, 1], got {d.hflip_prob}')
  paste = d.get('copy_paste', {})
  need(0.0 <= paste.get('prob', 0.0) <= 1.0, f"data.copy_paste.prob must be in [0, 1], got {paste.get('prob')}")
  need(0.0 < paste.get('min_visible', 0.5) <= 1.0,
       f"data.copy_paste.min_visible must be in (0, 1], got {paste.get('min_visible')}")
  need(d.num_workers >= 0, f'data.num_workers must be >= 0, got {d.num_workers}')
  need(config.model.compute_dtype in ('float32', 'bfloat16'),
       f"model.compute_dtype must be 'float32' or 'bfloat16', got {config.model.compute_dtype!r}")
  need(d.get('resize', 'pil') in ('pil', 'torchvision'),
       f"data.resize must be 'pil' or 'torchvision', got {d.get('resize')!r}")
  multiple = d.get('canvas_multiple', 128)
  # The backbone's stride-2 convs need even sizes down to C5 (stride 32); P6 / P7 round up (torchvision pads to 32).
  need(_positive_int(multiple) and multiple % 32 == 0,
       f'data.canvas_multiple must be a positive multiple of 32, got {multiple!r}')
  canvases = list(pipeline_lib.train_canvases(sizes, d.max_size, multiple).values())
  canvases += [pipeline_lib.test_canvas(d.test_min_size, d.test_max_size, o, multiple)
               for o in pipeline_lib.ORIENTATIONS]
  # A guard on train_canvases itself.
  need(all(h % multiple == 0 and w % multiple == 0 for h, w in canvases),
       f'data.min_sizes / data.max_size: canvases {canvases} are not all multiples of {multiple}')


def _positive_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def _flat_items(tree: Any, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat_items(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _same_kind(value: Any, default: Any) -> bool:
  """Whether `value` may stand where `default` is: same type, ints for floats, lists for tuples (JSON)."""
  if default is None or value is None:
    return True  # placeholders (e.g. matching.best_match_threshold = None turns a feature off)
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      return False
    kinds = {type(v) for v in default}
    return len(kinds) != 1 or not default or all(_same_kind(v, default[0]) for v in value)
  return isinstance(value, type(default))


def _check_against_defaults(config: ml_collections.ConfigDict) -> None:
  """Every key of `config` exists in configs/base.py with a value of the same kind (when configs/ is importable)."""
  try:
    from configs import base as base_config
  except ImportError:  # the library used without the repo's configs/: nothing to check against
    return
  if not hasattr(base_config, 'get_config'):
    return
  defaults = _flat_items(base_config.get_config().to_dict())
  for key, value in _flat_items(config.to_dict()).items():
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=1)
      hint = f' (did you mean {close[0]}?)' if close else ''
      raise ConfigError(f'{key}: unknown config key{hint}; every key is in configs/base.py')
    if not _same_kind(value, defaults[key]):
      raise ConfigError(f'{key}: expected a value like {defaults[key]!r} ({type(defaults[key]).__name__}), '
                        f'got {value!r} ({type(value).__name__})')
