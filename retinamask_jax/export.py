"""`Detector`: a trained model plus its config, for inference on user images (predict.py, serving, notebooks).

    detector = Detector.from_checkpoint('runs/default')        # a workdir, its checkpoints/ folder or a step folder
    results = detector.predict(['a.jpg', image_array])          # one dict per image, original image coordinates
    detector.export('serving/model')                            # params-only Orbax checkpoint + config.json
    Detector.from_checkpoint('serving/model')                   # what a server loads: no optimizer state

A checkpoint written by train.py holds the config it was trained with (classes included), so nothing else is
needed. The jitted predictor compiles once per canvas: the test canvas of each orientation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from retinamask_jax.data import pipeline as pipeline_lib
from retinamask_jax.data import transforms as T
from retinamask_jax.ops import masks as masks_lib

PyTree = Any
ImageLike = str | np.ndarray
EXPORT_CONFIG = 'config.json'
EXPORT_VARIABLES = 'variables'


def _resolve_checkpoint(path: str) -> tuple[str, int | None]:
  """(checkpoints directory, step or None for the latest) from a workdir, checkpoints dir or step dir."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such checkpoint directory')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return os.path.join(path, 'checkpoints'), None
  name = os.path.basename(path.rstrip(os.sep))
  if name.isdigit() and os.path.isdir(os.path.join(path, 'state')):
    return os.path.dirname(path), int(name)
  return path, None


class Detector:
  """A RetinaMask model with its variables and config; `predict` maps images to detections.

  Attributes:
    config: the experiment config the model was trained with (`model.class_names`, `model.category_ids` set).
    variables: `{'params', 'frozen', ...}` as the model's `apply` takes them.
    score_threshold: detections below this score are dropped from `predict`'s results (default: the config's
      `postprocess.score_threshold`).
  """

  def __init__(self, model: Any, config: ml_collections.ConfigDict, variables: PyTree):
    from retinamask_jax.train.step import make_predict_fn

    self.model = model
    self.config = config
    self.variables = variables
    self.score_threshold = float(config.postprocess.score_threshold)
    self.with_masks = bool(config.model.mask.enabled)
    self._predict = jax.jit(make_predict_fn(model, config, self.with_masks))

  # ---------------------------------------------------------------------------------------------- loading

  @classmethod
  def from_checkpoint(cls, path: str, step: int | None = None) -> Detector:
    """Loads a checkpoint written by train.py.

    Args:
      path: a workdir (its `checkpoints/` is used), a checkpoints directory, or one step's directory.
      step: which step (default: the one in `path` if it names a step, else the latest).
    Raises:
      FileNotFoundError: no checkpoint there.
    """
    from retinamask_jax.models import retinamask as retinamask_lib
    from retinamask_jax.train.checkpoint import Checkpointer
    from retinamask_jax.train.loop import create_train_state

    if os.path.exists(os.path.join(path, EXPORT_CONFIG)):
      return cls._from_export(path)
    directory, path_step = _resolve_checkpoint(path)
    step = path_step if step is None else step
    checkpointer = Checkpointer(directory, async_save=False)
    try:
      step = checkpointer.latest_step() if step is None else step
      if step is None:
        raise FileNotFoundError(f'{directory}: no checkpoint (train.py writes them under <workdir>/checkpoints)')
      config_file = os.path.join(directory, str(step), 'config', 'metadata')
      if not os.path.exists(config_file):
        raise FileNotFoundError(f'{directory}: step {step} has no saved config ({config_file})')
      with open(config_file) as f:
        config = ml_collections.ConfigDict(json.load(f))
      model, init_variables = retinamask_lib.build_model(config)
      template = create_train_state(config, model, init_variables, jax.random.key(0))
      state, _ = checkpointer.restore(template, step=step)
    finally:
      checkpointer.close()
    return cls(model, config, state.variables)

  def export(self, path: str) -> str:
    """Writes the inference variables (params and frozen statistics, no optimizer state or loss statistics) as an
    Orbax checkpoint at `<path>/variables`, and the config as `<path>/config.json`; `from_checkpoint(path)` loads
    it. Returns the absolute path. Refuses to overwrite an existing export."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, EXPORT_CONFIG)):
      raise FileExistsError(f'{path}: an export is already there')
    os.makedirs(path, exist_ok=True)
    variables = {k: self.variables[k] for k in ('params', 'frozen') if k in self.variables}
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(path, EXPORT_VARIABLES), jax.device_get(variables))
    # The config last: its presence marks a complete export.
    with open(os.path.join(path, EXPORT_CONFIG), 'w') as f:
      json.dump(self.config.to_dict(), f, indent=1)
    return path

  @classmethod
  def _from_export(cls, path: str) -> Detector:
    import orbax.checkpoint as ocp

    from retinamask_jax.models import retinamask as retinamask_lib
    from retinamask_jax.train.checkpoint import check_compatible

    with open(os.path.join(path, EXPORT_CONFIG)) as f:
      config = ml_collections.ConfigDict(json.load(f))
    model, init_variables = retinamask_lib.build_model(config)
    abstract = jax.eval_shape(lambda rng: init_variables(rng, (512, 512)), jax.random.key(0))
    abstract = {k: abstract[k] for k in ('params', 'frozen') if k in abstract}
    with ocp.StandardCheckpointer() as checkpointer:
      location = os.path.join(path, EXPORT_VARIABLES)
      check_compatible(checkpointer.metadata(location).item_metadata, abstract, location)
      variables = checkpointer.restore(location, abstract)
    return cls(model, config, variables)

  # ---------------------------------------------------------------------------------------------- inference

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.config.model.class_names)

  def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int], str]:
    """The image on its test canvas, exactly as evaluation prepares it: (canvas [H, W, 3] float32, (nh, nw),
    orientation)."""
    s = pipeline_lib.eval_settings(self.config)
    h, w = image.shape[:2]
    orientation = 'landscape' if w >= h else 'portrait'
    out = np.zeros((*pipeline_lib.test_canvas(s.min_sizes[0], s.max_size, orientation), 3), np.float32)
    return out, pipeline_lib.place_image(image, out, s.min_sizes[0], s), orientation

  def predict(self, images: Sequence[ImageLike], *, batch_size: int = 4) -> list[dict[str, np.ndarray]]:
    """Detections for each image, in its original pixel coordinates.

    Args:
      images: file paths (any format PIL reads) or uint8 `[H, W, 3]` RGB arrays, any sizes.
      batch_size: images per device call (padded with blank rows; compiles once per orientation).
    Returns:
      One dict per image, by score descending, only detections with score >= `score_threshold`:
      boxes [D, 4] float32 xyxy; scores [D] float32; classes [D] int32 contiguous 1..K; category_ids [D] int64
      (the dataset's ids); names: list of D class names; masks [D, H, W] bool when the mask branch is on
      (detections past `model.mask.num_masks_test` get an empty mask).
    """
    if isinstance(images, (str, np.ndarray)):
      raise TypeError('predict takes a sequence of images; wrap a single one in a list')
    loaded = [
        T.load_image(x) if isinstance(x, str) else np.asarray(x) for x in images
    ]
    for i, image in enumerate(loaded):
      if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f'image {i}: expected uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}')
    prepared = [self._prepare(image) for image in loaded]
    results: list[dict[str, np.ndarray] | None] = [None] * len(loaded)
    for orientation in ('landscape', 'portrait'):
      order = [i for i, p in enumerate(prepared) if p[2] == orientation]
      for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        canvas = prepared[chunk[0]][0].shape
        batch = np.zeros((batch_size, *canvas), np.float32)
        sizes = np.tile(np.asarray(canvas[:2], np.int32), (batch_size, 1))
        for j, i in enumerate(chunk):
          batch[j] = prepared[i][0]
          sizes[j] = prepared[i][1]
        dets = jax.device_get(self._predict(self.variables, jnp.asarray(batch), jnp.asarray(sizes)))
        for j, i in enumerate(chunk):
          results[i] = self._unpack(dets, j, prepared[i][1], loaded[i].shape[:2])
    return results  # type: ignore[return-value]

  def _unpack(self, dets: dict[str, np.ndarray], j: int, resized: tuple[int, int], orig: tuple[int, int]):
    (h, w), (oh, ow) = resized, orig
    keep = np.flatnonzero(dets['valid'][j] & (dets['scores'][j] >= self.score_threshold))
    factor = np.array([ow / w, oh / h, ow / w, oh / h], np.float32)
    boxes = (dets['boxes'][j][keep] * factor).astype(np.float32)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, ow)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, oh)
    classes = dets['classes'][j][keep].astype(np.int32)
    out = {
        'boxes': boxes,
        'scores': dets['scores'][j][keep].astype(np.float32),
        'classes': classes,
        'category_ids': np.asarray(self.config.model.category_ids, np.int64)[classes - 1],
        'names': [self.class_names[c - 1] for c in classes],
    }
    if self.with_masks:
      masks = np.zeros((len(keep), oh, ow), bool)
      with_mask = keep[keep < dets['masks'].shape[1]]
      if len(with_mask):
        masks[: len(with_mask)] = masks_lib.paste_masks(dets['masks'][j][with_mask], boxes[: len(with_mask)], (oh, ow))
      out['masks'] = masks
    return out


def draw(image: np.ndarray, result: dict[str, np.ndarray], class_names: Sequence[str]):
  """A PIL image of `result` (from `Detector.predict`) drawn on uint8 RGB `image`."""
  from retinamask_jax.evaluation.visualize import draw_detections

  return draw_detections(image, result['boxes'], result['scores'], result['classes'], class_names,
                         result.get('masks'))


def write_predictions(
    detector: Detector,
    images: Sequence[ImageLike],
    out_dir: str,
    *,
    names: Sequence[str] | None = None,
    score_threshold: float = 0.3,
) -> list[str]:
  """Draws `detector`'s detections on each image into `<out_dir>/<name>.png`; all of them, as COCO-style entries
  with `file_name`, into `<out_dir>/detections.json`. Images are paths or uint8 RGB arrays; names default to the
  files' stems (`image_<i>` for arrays). Returns the PNG paths."""
  if names is None:
    names = [os.path.splitext(os.path.basename(x))[0] if isinstance(x, str) else f'image_{i}'
             for i, x in enumerate(images)]
  arrays = [T.load_image(x) if isinstance(x, str) else np.asarray(x) for x in images]
  os.makedirs(out_dir, exist_ok=True)
  previous, detector.score_threshold = detector.score_threshold, score_threshold
  try:
    results = detector.predict(arrays)
  finally:
    detector.score_threshold = previous
  paths, entries = [], []
  for image, name, source, result in zip(arrays, names, images, results):
    path = os.path.join(out_dir, f'{name}.png')
    draw(image, result, detector.class_names).save(path)
    paths.append(path)
    for box, score, cat in zip(result['boxes'], result['scores'], result['category_ids']):
      x1, y1, x2, y2 = (round(float(v), 2) for v in box)
      entries.append({'file_name': source if isinstance(source, str) else name, 'category_id': int(cat),
                      'bbox': [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], 'score': round(float(score), 5)})
  with open(os.path.join(out_dir, 'detections.json'), 'w') as f:
    json.dump(entries, f)
  return paths
