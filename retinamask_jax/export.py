"""`Detector`: a trained model plus its config, for inference on user images (predict.py, serving, notebooks).

    detector = Detector.from_checkpoint('runs/default')        # a workdir, its checkpoints/ folder or a step folder
    results = detector.predict(['a.jpg', image_array])          # one dict per image, original image coordinates
    detector.export('serving/model')                            # params-only Orbax checkpoint + config.json
    Detector.from_checkpoint('serving/model')                   # what a server loads: no optimizer state

A checkpoint written by train.py holds the config it was trained with (classes included), so nothing else is
needed. `predict` pays for what it is given: each image goes on its own canvas (its resized sides rounded up to
`data.canvas_multiple`, at most the test canvas of its orientation), images of one canvas share a device call
whose batch is their count rounded up to 1, 2, 4 or 8 (and to a multiple of the device count), and one compiled
program is kept per (batch, canvas).

Serving without the model code: `detector.export_serving(path, canvas_hw)` writes the jitted inference function for
one fixed canvas and batch as a serialized `jax.export` program, with its weights next to it (passed as an
argument, so the program stays small and the weights are stored once); `load_serving(path)` (or the ten lines of
`jax.export.deserialize` it wraps) runs it in a process that imports neither this package's models nor flax.
One artifact serves several platforms (`platforms=('cuda', 'tpu')`, made on any host, e.g. a CPU laptop): each
platform's compiler gets XLA's convolutions, the CPU its own conv algorithms (`models/layers.py`, "Per platform").

This module imports the data pipeline, ops and models only inside the functions that need them, so that
`load_serving` stays light.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

PyTree = Any
ImageLike = str | np.ndarray
EXPORT_CONFIG = 'config.json'
EXPORT_VARIABLES = 'variables'
# The serialized inference program (`Detector.export_serving`): the program, its weights, what it expects.
SERVING_PROGRAM = 'model.jax_export'
SERVING_VARIABLES = 'variables.npz'
SERVING_METADATA = 'serving.json'


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


# What a serving client must do to an image before the program sees it, per `data.resize` (serving.json).
_RESIZE_RULES = {
    'pil': 'scale the short side to min_size, unless the long side would then exceed max_size: then scale the long '
           'side to max_size, sizes rounded as transforms.resized_hw does; PIL bilinear on uint8 (antialiased when '
           'shrinking)',
    'torchvision': "torchvision's GeneralizedRCNNTransform: scale = min(min_size / short, max_size / long), each "
                   'side floor(side * scale) (transforms.torchvision_resized_hw); bilinear without antialiasing, '
                   'align_corners=False. Detector.predict resizes the normalized float image; resizing uint8 here '
                   'rounds it, so detections agree with predict up to that rounding',
}


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
    # Compiled programs by (batch, canvas H, canvas W): `predict` compiles each once (ahead of time, so the number of
    # compilations is visible and bounded), and the variables are placed on the devices once.
    self._programs: dict[tuple[int, int, int], Any] = {}
    self._placed: tuple[Any, PyTree] | None = None

  # ---------------------------------------------------------------------------------------------- loading

  @classmethod
  def from_checkpoint(cls, path: str, step: int | None = None) -> Detector:
    """Loads a checkpoint written by train.py.

    Without a step, the newest checkpoint that restores: a damaged newer one (truncated or missing array files,
    unreadable metadata) is named on stderr and skipped, not moved (a training run may be using the directory).

    Args:
      path: a workdir (its `checkpoints/` is used), a checkpoints directory, or one step's directory.
      step: which step (default: the one in `path` if it names a step, else the latest).
    Raises:
      FileNotFoundError: no checkpoint there (or none that restores).
      DamagedCheckpointError: the step asked for (by `step` or `path`) is damaged.
    """
    import functools

    import orbax.checkpoint as ocp

    from retinamask_jax.models import retinamask as retinamask_lib
    from retinamask_jax.train import workdir as workdir_lib
    from retinamask_jax.train.checkpoint import (
        Checkpointer,
        DamagedCheckpointError,
        ShapeMismatchError,
        check_compatible,
        failure_reason,
    )

    if os.path.exists(os.path.join(path, EXPORT_CONFIG)):
      return cls._from_export(path)
    directory, path_step = _resolve_checkpoint(path)
    step = path_step if step is None else step
    checkpointer = Checkpointer(directory, async_save=False)
    try:
      steps = checkpointer.all_steps()
    finally:
      checkpointer.close()
    if not steps:
      raise FileNotFoundError(f'{directory}: no checkpoint (train.py writes them under <workdir>/checkpoints)')
    if step is not None and step not in steps:
      raise FileNotFoundError(f'{directory}: no checkpoint step {step} (steps: {sorted(steps)})')

    def load(step: int) -> Detector:
      # Whatever the damage, Orbax, TensorStore and json raise their own types: each becomes DamagedCheckpointError.
      try:
        with open(os.path.join(directory, str(step), 'config', 'metadata')) as f:
          config = ml_collections.ConfigDict(json.load(f))
      except Exception as e:
        raise DamagedCheckpointError(directory, step, failure_reason(e)) from e
      model, init_variables = retinamask_lib.build_model(config)
      # Only the inference variables are read (Orbax partial restore): no optimizer is built, no optimizer state read.
      target = _abstract_inference_variables(init_variables)
      location = os.path.join(directory, str(step), 'state')
      try:
        with ocp.PyTreeCheckpointer() as reader:
          saved = reader.metadata(location).item_metadata
          if saved is None:  # Orbax logs the reason and returns None
            raise ValueError('its metadata (state/_METADATA) cannot be read')
          check_compatible({k: saved[k] for k in target if k in saved}, target, location)
          variables = reader.restore(
              location,
              args=ocp.args.PyTreeRestore(
                  item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                  partial_restore=True,
              ),
          )
      except ShapeMismatchError:
        raise  # the checkpoint is whole; the model built from its config differs
      except Exception as e:
        raise DamagedCheckpointError(directory, step, failure_reason(e)) from e
      return cls(model, config, variables)

    if step is not None:
      return load(step)
    found = workdir_lib.restore_newest_intact(steps, load, functools.partial(workdir_lib.report_damaged,
                                                                             doing='loading'))
    if found is None:
      raise FileNotFoundError(f'{directory}: no checkpoint restores (each one named above)')
    return found[1]

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

  def export_serving(
      self,
      path: str,
      canvas_hw: tuple[int, int] | None = None,
      *,
      batch_size: int = 1,
      with_masks: bool | None = None,
      platforms: Sequence[str] | None = None,
  ) -> str:
    """Writes the inference function for one canvas as a serialized `jax.export` program that runs without the
    model code (`load_serving`). Returns the absolute path.

    The program is `serve(weights, images, image_size) -> detections`:
      weights: the flat list of the variables' leaves (`variables.npz`, arrays '00000', '00001', ... in order);
      images: uint8 [batch_size, H, W, 3] RGB, each (already resized) image at the top left of the canvas; the
        normalization of `data.*` happens inside and everything outside `image_size` is zeroed, as evaluation pads;
      image_size: int32 [batch_size, 2] (h, w) of each image on the canvas;
      detections: boxes [B, D, 4] float32 xyxy in canvas pixels, scores [B, D], classes [B, D] int32 (1..K),
        valid [B, D] bool, and with masks also masks [B, Dm, S, S] float32 probabilities (to be pasted into the
        image with each box, e.g. `ops.masks.paste_masks`).
    The weights are an argument rather than constants so the program stays small and another set of weights of the
    same model runs with the same program.

    Files under `path`: `model.jax_export` (the program), `variables.npz` (the weights) and `serving.json` (canvas,
    batch size, resize rule, classes, score threshold, input / output description).

    Args:
      canvas_hw: (H, W); default the landscape test canvas of the config (`data.test_min_size` / `test_max_size`).
      batch_size: images per call (static).
      with_masks: include the mask head (default: when the model has one).
      platforms: the platforms the program is to serve besides the one JAX runs on now (always included, so the
        artifact can be tried where it is made), e.g. ('cuda', 'tpu') on a CPU laptop for GPU and TPU servers:
        one serialized module, each platform's program chosen when it is compiled there. Default: only the
        platform JAX runs on.
    """
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, SERVING_PROGRAM)):
      raise FileExistsError(f'{path}: a serving export is already there')
    serve, specs, leaves, paths, with_masks, s = self._serving_program(canvas_hw, batch_size, with_masks)
    (h, w) = specs[1].shape[1:3]
    exported = jax.export.export(serve, platforms=serving_platforms(platforms))(*specs)
    os.makedirs(path, exist_ok=True)
    np.savez(os.path.join(path, SERVING_VARIABLES), **{f'{i:05d}': x for i, x in enumerate(leaves)})
    metadata = {
        'canvas_hw': [h, w],
        'batch_size': int(batch_size),
        'with_masks': with_masks,
        'platforms': list(exported.platforms),
        'inputs': {
            'weights': f'{len(leaves)} arrays from {SERVING_VARIABLES}, in key order',
            'images': f'uint8 [{batch_size}, {h}, {w}, 3] RGB, each resized image at the top left',
            'image_size': f'int32 [{batch_size}, 2] (h, w) of each image on the canvas',
        },
        'outputs': sorted(exported.out_tree.unflatten(range(exported.out_tree.num_leaves)).keys()),
        'resize': {
            'mode': s.resize,
            'min_size': s.min_sizes[0],
            'max_size': s.max_size,
            'rule': _RESIZE_RULES[s.resize],
        },
        'score_threshold': self.score_threshold,
        'class_names': list(self.class_names),
        'category_ids': [int(x) for x in self.config.model.category_ids],
        'variable_paths': paths,
    }
    with open(os.path.join(path, SERVING_METADATA), 'w') as f:
      json.dump(metadata, f, indent=1)
    # The program last: its presence marks a complete export.
    with open(os.path.join(path, SERVING_PROGRAM), 'wb') as f:
      f.write(exported.serialize())
    return path

  def _serving_program(self, canvas_hw: tuple[int, int] | None, batch_size: int, with_masks: bool | None):
    """(jitted serve, its argument specs, weight arrays, their key paths, with_masks, eval settings) for
    `export_serving`; the jitted function can also be lowered for one platform (tests/test_lowering.py)."""
    from retinamask_jax.data import pipeline as pipeline_lib
    from retinamask_jax.train.step import make_predict_fn

    with_masks = self.with_masks if with_masks is None else bool(with_masks)
    if with_masks and not self.with_masks:
      raise ValueError('with_masks=True but the model has no mask head (model.mask.enabled is False)')
    s = pipeline_lib.eval_settings(self.config)
    if canvas_hw is None:
      canvas_hw = pipeline_lib.test_canvas(s.min_sizes[0], s.max_size, 'landscape')
    h, w = (int(v) for v in canvas_hw)
    stride = 2 ** int(self.config.model.fpn.max_level)
    if h <= 0 or w <= 0 or h % stride or w % stride:
      raise ValueError(f'canvas_hw must be positive multiples of {stride} (2^fpn.max_level), got {canvas_hw}')
    variables = {k: self.variables[k] for k in ('params', 'frozen') if k in self.variables}
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    leaves = [np.asarray(jax.device_get(x)) for _, x in flat]
    predict = make_predict_fn(self.model, self.config, with_masks)
    # Normalization through the very table `transforms.normalize` uses (pixel * a + b per output channel, float32),
    # so the program sees bit for bit the input evaluation and `predict` give the model.
    std = np.asarray(s.pixel_std, np.float64)
    a = (s.pixel_range / 255.0 / std).astype(np.float32)
    b = (-np.asarray(s.pixel_mean, np.float64) / std).astype(np.float32)
    table = np.arange(256, dtype=np.float32)[:, None] * a + b  # [256, 3]
    bgr = s.channel_order == 'bgr'

    def serve(weights, images, image_size):
      x = images[..., ::-1] if bgr else images
      x = jnp.stack([jnp.asarray(table[:, c])[x[..., c].astype(jnp.int32)] for c in range(3)], axis=-1)
      rows = jnp.arange(h)[None, :, None] < image_size[:, 0, None, None]
      cols = jnp.arange(w)[None, None, :] < image_size[:, 1, None, None]
      x = jnp.where((rows & cols)[..., None], x, 0.0)
      return predict(jax.tree.unflatten(treedef, list(weights)), x, image_size)

    specs = (
        [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
        jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.uint8),
        jax.ShapeDtypeStruct((batch_size, 2), jnp.int32),
    )
    return jax.jit(serve), specs, leaves, paths, with_masks, s

  @classmethod
  def _from_export(cls, path: str) -> Detector:
    import orbax.checkpoint as ocp

    from retinamask_jax.models import retinamask as retinamask_lib
    from retinamask_jax.train.checkpoint import check_compatible

    with open(os.path.join(path, EXPORT_CONFIG)) as f:
      config = ml_collections.ConfigDict(json.load(f))
    model, init_variables = retinamask_lib.build_model(config)
    abstract = _abstract_inference_variables(init_variables)
    with ocp.StandardCheckpointer() as checkpointer:
      location = os.path.join(path, EXPORT_VARIABLES)
      check_compatible(checkpointer.metadata(location).item_metadata, abstract, location)
      variables = checkpointer.restore(location, abstract)
    return cls(model, config, variables)

  # ---------------------------------------------------------------------------------------------- inference

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.config.model.class_names)

  def _settings(self):
    from retinamask_jax.data import pipeline as pipeline_lib

    return pipeline_lib.eval_settings(self.config)

  def _prepare(
      self, image: np.ndarray, out: np.ndarray | None = None
  ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """The image on its own canvas, as evaluation with `eval.bucket_canvases` prepares it: (canvas [H, W, 3]
    float32, resized (nh, nw), canvas (H, W)). The canvas is the resized sides rounded up to `data.canvas_multiple`,
    at most the test canvas of the orientation (`pipeline.bucket_canvas`). `out` ([H', W', 3] float32, H' >= H,
    W' >= W, zeros) receives it in place when given."""
    from retinamask_jax.data import pipeline as pipeline_lib

    s = self._settings()
    h, w = image.shape[:2]
    canvas = s.canvas_for(h, w)
    if out is None:
      out = np.zeros((*canvas, 3), np.float32)
    return out, pipeline_lib.place_image(image, out[: canvas[0], : canvas[1]], s.min_sizes[0], s), canvas

  def _devices(self) -> list[Any]:
    return jax.local_devices()

  @staticmethod
  def batch_for(num_images: int, num_devices: int = 1) -> int:
    """The batch of a device call holding `num_images` images: the next of 1, 2, 4, 8, 16, ... (powers of two, so
    few programs are compiled), then up to a multiple of `num_devices`. Padding rows are blank and invalid."""
    batch = 1 << max(int(num_images) - 1, 0).bit_length()
    return -(-batch // num_devices) * num_devices

  def _program(self, batch: int, canvas: tuple[int, int]) -> Any:
    """The compiled predictor for (batch, canvas), compiled on first use; the batch is split over the local
    devices (variables replicated) when there are several."""
    key = (batch, int(canvas[0]), int(canvas[1]))
    devices = self._devices()
    if self._placed is None:
      if len(devices) > 1:
        mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
        self._placed = (rows, jax.device_put(self.variables, replicated))
      else:
        self._placed = (None, jax.device_put(self.variables, devices[0]))
    if key not in self._programs:
      rows, variables = self._placed
      images = jax.ShapeDtypeStruct((batch, *key[1:], 3), jnp.float32, sharding=rows)
      sizes = jax.ShapeDtypeStruct((batch, 2), jnp.int32, sharding=rows)
      self._programs[key] = self._predict.lower(variables, images, sizes).compile()
    return self._programs[key]

  @property
  def num_programs(self) -> int:
    """How many (batch, canvas) programs `predict` has compiled so far."""
    return len(self._programs)

  def predict(self, images: Sequence[ImageLike], *, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    """Detections for each image, in its original pixel coordinates.

    Each image is placed on its own canvas (`_prepare`: resized by `data.resize`, padded to its sides rounded up
    to `data.canvas_multiple`), so an image's detections do not depend on the other images of the call. Images of
    the same canvas share device calls of up to `batch_size` images; a call's batch is its image count rounded up
    to a power of two and to a multiple of the local device count (blank, invalid padding rows, which change no
    result). One program is compiled per (batch, canvas) met and kept (`num_programs`).

    Args:
      images: file paths (any format PIL reads) or uint8 `[H, W, 3]` RGB arrays, any sizes.
      batch_size: at most this many images per device call.
    Returns:
      One dict per image, by score descending, only detections with score >= `score_threshold`:
      boxes [D, 4] float32 xyxy; scores [D] float32; classes [D] int32 contiguous 1..K; category_ids [D] int64
      (the dataset's ids); names: list of D class names; masks [D, H, W] bool when the mask branch is on
      (detections past `model.mask.num_masks_test` get an empty mask).
    """
    if isinstance(images, (str, np.ndarray)):
      raise TypeError('predict takes a sequence of images; wrap a single one in a list')
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    from retinamask_jax.data import transforms as T

    loaded = [
        T.load_image(x) if isinstance(x, str) else np.asarray(x) for x in images
    ]
    for i, image in enumerate(loaded):
      if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f'image {i}: expected uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}')
    s = self._settings()
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(loaded):
      groups.setdefault(s.canvas_for(*image.shape[:2]), []).append(i)
    num_devices = len(self._devices())
    results: list[dict[str, np.ndarray] | None] = [None] * len(loaded)
    for canvas, members in groups.items():
      for start in range(0, len(members), batch_size):
        chunk = members[start:start + batch_size]
        batch = self.batch_for(len(chunk), num_devices)
        canvases = np.zeros((batch, *canvas, 3), np.float32)
        # Padding rows: a harmless size (as evaluation pads); their detections are never read.
        sizes = np.tile(np.asarray(canvas, np.int32), (batch, 1))
        resized = {}
        for j, i in enumerate(chunk):
          _, resized[i], _ = self._prepare(loaded[i], canvases[j])
          sizes[j] = resized[i]
        program = self._program(batch, canvas)
        rows, variables = self._placed
        if rows is not None:
          canvases, sizes = jax.device_put(canvases, rows), jax.device_put(sizes, rows)
        dets = jax.device_get(program(variables, canvases, sizes))
        for j, i in enumerate(chunk):
          results[i] = self._unpack(dets, j, resized[i], loaded[i].shape[:2])
    return results  # type: ignore[return-value]

  def _unpack(self, dets: dict[str, np.ndarray], j: int, resized: tuple[int, int], orig: tuple[int, int]):
    from retinamask_jax.ops import masks as masks_lib

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


def _abstract_inference_variables(init_variables: Any) -> PyTree:
  """ShapeDtypeStructs (on the default device) of the `params` and `frozen` variables `init_variables` makes."""
  abstract = jax.eval_shape(lambda rng: init_variables(rng, (512, 512)), jax.random.key(0))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {
      k: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract[k])
      for k in ('params', 'frozen')
      if k in abstract
  }


class ServingModel:
  """A program written by `Detector.export_serving`, loaded with jax and numpy only (no model code, no flax).

  `model(images)`: a list of uint8 [h, w, 3] RGB images, each already resized by the rule in `metadata['resize']`
  (h <= H, w <= W of the canvas) -> one dict per image with the valid detections, by score descending: boxes [D, 4]
  (pixels of the given image), scores [D], classes [D] (1..K), and masks [D, S, S] probabilities for the first
  detections when exported with masks. `model.run(canvases, image_size)` is the raw program; `model.platforms` the
  platforms it serves (it runs on any of them: `jax.export` picks that platform's program when it compiles).
  """

  def __init__(self, path: str):
    with open(os.path.join(path, SERVING_METADATA)) as f:
      self.metadata = json.load(f)
    with open(os.path.join(path, SERVING_PROGRAM), 'rb') as f:
      self.exported = jax.export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(path, SERVING_VARIABLES)) as arrays:
      self.weights = [jnp.asarray(arrays[k]) for k in sorted(arrays.files)]
    self.canvas_hw = tuple(self.metadata['canvas_hw'])
    self.batch_size = int(self.metadata['batch_size'])

  @property
  def platforms(self) -> tuple[str, ...]:
    """The platforms this artifact serves, as `jax.export` names them ('cpu', 'cuda', 'rocm', 'tpu')."""
    return tuple(self.exported.platforms)

  def run(self, images: np.ndarray, image_size: np.ndarray) -> dict[str, np.ndarray]:
    """images uint8 [B, H, W, 3] canvases, image_size int32 [B, 2] -> the program's detections, as numpy."""
    out = self.exported.call(self.weights, jnp.asarray(images, jnp.uint8), jnp.asarray(image_size, jnp.int32))
    return jax.tree.map(np.asarray, out)

  def __call__(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
    h, w = self.canvas_hw
    results = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      canvas = np.zeros((self.batch_size, h, w, 3), np.uint8)
      sizes = np.tile(np.asarray([h, w], np.int32), (self.batch_size, 1))
      for j, image in enumerate(chunk):
        ih, iw = image.shape[:2]
        if ih > h or iw > w or image.dtype != np.uint8 or image.shape[2:] != (3,):
          raise ValueError(f'image {start + j}: expected uint8 [h <= {h}, w <= {w}, 3], got {image.dtype} '
                           f'{image.shape}; resize it first (metadata["resize"])')
        canvas[j, :ih, :iw] = image
        sizes[j] = (ih, iw)
      dets = self.run(canvas, sizes)
      for j in range(len(chunk)):
        keep = np.flatnonzero(dets['valid'][j])
        result = {k: dets[k][j][keep] for k in ('boxes', 'scores', 'classes')}
        if 'masks' in dets:
          result['masks'] = dets['masks'][j][keep[keep < dets['masks'].shape[1]]]
        results.append(result)
    return results


SERVING_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def serving_platforms(platforms: Sequence[str] | None = None) -> tuple[str, ...]:
  """The platforms an export serves: the one JAX runs on now, then `platforms` in order, without repeats
  ('gpu' means 'cuda'). Raises ValueError for a platform `jax.export` cannot lower for."""
  if isinstance(platforms, str):
    platforms = (platforms,)
  out = [jax.export.default_export_platform()]
  for name in platforms or ():
    name = {'gpu': 'cuda'}.get(str(name).lower(), str(name).lower())
    if name not in SERVING_PLATFORMS:
      raise ValueError(f'unknown platform {name!r}; expected some of {SERVING_PLATFORMS}')
    if name not in out:
      out.append(name)
  return tuple(out)


def load_serving(path: str) -> ServingModel:
  """Loads a `Detector.export_serving` directory. Equivalent, without this package:

      exported = jax.export.deserialize(bytearray(open(f'{path}/model.jax_export', 'rb').read()))
      weights = [arrays[k] for k in sorted(arrays.files)]   # arrays = np.load(f'{path}/variables.npz')
      detections = exported.call(weights, images_uint8, image_size_int32)
  """
  return ServingModel(path)


def draw(image: np.ndarray, result: dict[str, np.ndarray], class_names: Sequence[str]):
  """A PIL image of `result` (from `Detector.predict`) drawn on uint8 RGB `image`."""
  from retinamask_jax.evaluation.visualize import draw_detections

  return draw_detections(image, result['boxes'], result['scores'], result['classes'], class_names,
                         result.get('masks'))


# write_predictions decodes and predicts this many images at a time.
_WRITE_CHUNK = 16


def write_predictions(
    detector: Detector,
    images: Sequence[ImageLike],
    out_dir: str,
    *,
    names: Sequence[str] | None = None,
    score_threshold: float = 0.3,
    on_error: Callable[[str, str], None] | None = None,
) -> list[str]:
  """Draws `detector`'s detections on each image into `<out_dir>/<name>.png`, and writes all of them as COCO-style
  entries (`file_name`, `category_id`, `bbox` xywh, `score`) into `<out_dir>/detections.json`.

  Images are paths or uint8 RGB arrays; names default to the files' stems (`image_<i>` for arrays). Each path is
  decoded on its own (`transforms.decode_image`): upright (EXIF orientation applied), a JPEG much larger than
  `data.test_max_size` decoded at a reduced scale, and any image whose long side still exceeds twice
  `data.test_max_size` shrunk to that before prediction and drawing (so masks and PNGs stay small); the boxes in
  detections.json are in the pixels of the upright file at full resolution. A path that cannot be used (missing,
  not an image, truncated, more than `transforms.MAX_IMAGE_PIXELS` pixels) is skipped: no PNG, one entry
  `{"file_name": path, "error": reason}` in detections.json in its place, and `on_error(path, reason)` (default:
  a logged warning); the other images are still predicted. Returns the PNG paths written, in input order.
  """
  from retinamask_jax.data import transforms as T

  if names is None:
    names = [os.path.splitext(os.path.basename(x))[0] if isinstance(x, str) else f'image_{i}'
             for i, x in enumerate(images)]
  if on_error is None:
    from absl import logging

    def on_error(path: str, reason: str) -> None:
      logging.warning('skipped %s: %s', path, reason)

  max_side = int(detector.config.data.test_max_size)
  cap = int(T.DRAFT_REDUCING_GAP * max_side)
  os.makedirs(out_dir, exist_ok=True)
  paths, entries = [], {}  # entries: image index -> its detections.json entries
  previous, detector.score_threshold = detector.score_threshold, score_threshold
  try:
    # A few images at a time: a long list of large photos is never all in memory.
    for start in range(0, len(images), _WRITE_CHUNK):
      chunk = []  # (index, image to predict and draw, its factors to the file's full-resolution pixels)
      for i in range(start, min(start + _WRITE_CHUNK, len(images))):
        source = images[i]
        if not isinstance(source, str):
          chunk.append((i, np.asarray(source), None))
          continue
        try:
          decoded = T.decode_image(source, max_side=max_side)
        except T.DataError as e:
          reason = str(e).removeprefix(f'{source}: ')
          entries[i] = [{'file_name': source, 'error': reason}]
          on_error(source, reason)
          continue
        image = decoded.image
        h, w = image.shape[:2]
        if max(h, w) > cap:
          image = T.resize_image(image, (max(1, round(h * cap / max(h, w))), max(1, round(w * cap / max(h, w)))))
        (fh, fw), (h, w) = decoded.full_hw, image.shape[:2]
        chunk.append((i, image, None if (fh, fw) == (h, w) else np.array([fw / w, fh / h] * 2, np.float64)))
      results = detector.predict([image for _, image, _ in chunk]) if chunk else []
      for (i, image, factor), result in zip(chunk, results):
        path = os.path.join(out_dir, f'{names[i]}.png')
        draw(image, result, detector.class_names).save(path)
        paths.append(path)
        source = images[i]
        entries[i] = []
        for box, score, cat in zip(result['boxes'], result['scores'], result['category_ids']):
          box = np.asarray(box, np.float64) * factor if factor is not None else box
          x1, y1, x2, y2 = (round(float(v), 2) for v in box)
          entries[i].append({'file_name': source if isinstance(source, str) else names[i], 'category_id': int(cat),
                             'bbox': [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], 'score': round(float(score), 5)})
  finally:
    detector.score_threshold = previous
  with open(os.path.join(out_dir, 'detections.json'), 'w') as f:
    json.dump([e for i in sorted(entries) for e in entries[i]], f)
  return paths
