"""The datasets of a run: the training and validation COCO datasets (the shapes dataset generated in the workdir
when none is configured), the classes taken from the training data, and the end-of-run data problem summary."""

from __future__ import annotations

import os

import ml_collections
from absl import logging

from retinamask_jax.config_check import ConfigError
from retinamask_jax.data import coco as coco_lib
from retinamask_jax.data import pipeline as pipeline_lib
from retinamask_jax.data import shapes as shapes_lib


def prepare_datasets(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[coco_lib.CocoDataset, coco_lib.CocoDataset | None]:
  """The training and validation datasets; the shapes dataset is generated in the workdir when none is set."""
  d = config.data
  if d.get('coco_root'):
    root = d.coco_root
    with config.unlocked():
      for split in ('train', 'val'):
        if not d[f'{split}_json']:
          d[f'{split}_json'] = os.path.join(root, 'annotations', f'instances_{split}2017.json')
        if not d[f'{split}_images']:
          d[f'{split}_images'] = os.path.join(root, f'{split}2017')
  if not d.train_json:
    root = os.path.join(workdir, 'data', 'shapes')
    s = d.shapes
    # .get: configs written before the keys existed (a checkpoint's saved config) keep the generator's default.
    mean_objects = float(s.get('mean_objects', 3.5))
    train_mean = s.get('train_mean_objects')
    train_json, train_images = shapes_lib.write_shapes_dataset(
        root, 'train', s.num_train, image_size=tuple(s.image_size), seed=s.seed,
        mean_objects=mean_objects if train_mean is None else float(train_mean),
    )
    val_json, val_images = shapes_lib.write_shapes_dataset(
        root, 'val', s.num_val, image_size=tuple(s.image_size), seed=s.seed + 1, mean_objects=mean_objects
    )
  else:
    train_json, train_images = d.train_json, d.train_images
    val_json, val_images = d.val_json, d.val_images
  for key, path in (('data.train_json', train_json), ('data.train_images', train_images)):
    if not path or not os.path.exists(path):
      raise ConfigError(f'{key}: {path!r} does not exist')
  if val_json and (not os.path.exists(val_json) or not val_images or not os.path.exists(val_images)):
    raise ConfigError(f'data.val_json / data.val_images: {val_json!r} / {val_images!r} do not exist')
  train = coco_lib.load_coco(train_json, train_images, crowd=d.crowd)
  val = coco_lib.load_coco(val_json, val_images, crowd='drop') if val_json else None
  if not train.records:
    raise ConfigError(f'data.train_json: {train_json} has no images')
  return train, val


def resolve_classes(config: ml_collections.ConfigDict, dataset: coco_lib.CocoDataset) -> None:
  """Set model.num_classes / category_ids / class_names from the training dataset (in place)."""
  with config.unlocked():
    if config.model.num_classes == 0:
      config.model.num_classes = dataset.num_classes
    elif config.model.num_classes != dataset.num_classes:
      raise ConfigError(
          f'model.num_classes = {config.model.num_classes} but the training data has '
          f'{dataset.num_classes} categories; set model.num_classes=0 to take them from the data'
      )
    config.model.category_ids = tuple(int(i) for i in dataset.category_ids)
    config.model.class_names = tuple(str(n) for n in dataset.class_names)


class DataProblemReport:
  """One summary line, at the end of a session, of the data problems that were reported one by one: the annotation
  files' problems (found when loaded) and the images' problems this session's pipeline met (unreadable files,
  truncated GT, ...). Process 0's view: other processes read other images and report those themselves."""

  def __init__(self, train: coco_lib.CocoDataset, val: coco_lib.CocoDataset | None, *, enabled: bool):
    self.train, self.val, self.enabled = train, val, enabled
    self.before = pipeline_lib.data_problem_counts()

  def report(self) -> None:
    now = pipeline_lib.data_problem_counts()
    before = self.before
    parts = {
        'train annotations': self.train.report,
        'val annotations': self.val.report if self.val is not None else {},
        'images': {k: v - before.get(k, 0) for k, v in now.items() if v > before.get(k, 0)},
    }
    # Ordinary COCO content, handled as detectron2 does (crowd regions left out of training): information, not a
    # problem of the data.
    notes = {where: {k: v for k, v in counts.items() if k in coco_lib.INFORMATION_KINDS}
             for where, counts in parts.items()}
    parts = {where: {k: v for k, v in counts.items() if k not in coco_lib.INFORMATION_KINDS}
             for where, counts in parts.items()}
    text = '; '.join(f'{where}: ' + ', '.join(f'{k}={v}' for k, v in sorted(counts.items()))
                     for where, counts in parts.items() if counts)
    if text and self.enabled:
      line = f'data problems (each reported once above, with what was done): {text}'
      logging.warning(line)
      print(line, flush=True)
    info = '; '.join(f'{where}: ' + ', '.join(f'{k}={v}' for k, v in sorted(counts.items()))
                     for where, counts in notes.items() if counts)
    if info and self.enabled:
      print(f'data (information): {info} (crowd regions are not trained on, as in detectron2)', flush=True)
