"""Input pipeline (grain): aspect-grouped, multi-scale, sharded per process, deterministic.

Training (DESIGN.md 2.1, 4, 6). For each epoch e, a permutation drawn from (seed, e) orders the
images; they split into a landscape (w >= h) and a portrait group, each cut into *global* batches of
`global_batch_size` (the remainder of each group is dropped for that epoch), the batch order is
shuffled and one training scale is drawn per batch. Global step i reads global batch i (epochs
follow each other forever); process p of P reads only rows [p * B / P, (p + 1) * B / P) of every
global batch, so all processes agree on the canvas of every step. The state to checkpoint is the
next global batch index: `make_train_iterator(..., start_index=k)` yields exactly the stream that
the original iterator yields from batch k on. Flips come from an RNG keyed on (seed, batch index,
row), so they are the same after a resume and for any number of workers; so do copy-paste's draws
(`data.copy_paste.prob`, `copy_paste.py`: another image of the group pasted onto a row). (If the dataset is smaller
than one global batch in both groups, each group is instead cut with wrap-around, so that tiny
datasets still train.)

Every batch is one canvas `(H, W)` of `train_canvases`: landscape (min_size, max_size) each rounded
up to `data.canvas_multiple` (128 by default), portrait the transpose, so a training run compiles
once per (scale, orientation).

Batch dict (numpy, this process's n = B / P rows):
  image       float32 [n, H, W, 3]  normalized (data.channel_order, pixel_range, pixel_mean,
                                    pixel_std), zero-padded
  image_size  int32   [n, 2]        (h, w) after resize
  orig_size   int32   [n, 2]        (h, w) of the original image
  image_id    int64   [n]           dataset image id (-1 for padding rows in evaluation)
  scale       float32 [n]           resized / original short side
  gt_boxes    float32 [n, G, 4]     xyxy canvas pixels, after resize and flip; zeros in padding rows
  gt_classes  int32   [n, G]        1..K objects, -1 crowd ignore regions (data.crowd='ignore'),
                                    0 padding
  gt_masks    uint8   [n, G, M, M]  each row's mask cropped to its own box, M x M
                                    (transforms.masks_to_crops)
  valid       bool    [n]           False only for evaluation padding rows (and unreadable
                                    evaluation images)
  index       int64   []            the global batch index (0-d array; the checkpointable state
                                    is index + 1)
Evaluation batches have the same keys except the gt_* ones (unless `with_targets=True`).

A training image that cannot be read is replaced, deterministically, by the next readable image of
its orientation group in the epoch's order, and reported once. An evaluation image that
cannot be read becomes a row with valid False (reported); the others are evaluated.

Workers: with `num_workers > 0` grain runs the batch function in that many spawned processes (each
computes whole batches; the stream is identical to `num_workers=0`). The data problems a worker finds
travel to the main process with the batch they came up in and are logged and counted there, once
(`data_problem_counts`). Spawned processes re-import the
caller's `__main__` module, so scripts must keep their top-level work under `if __name__ ==
'__main__':` (absl's `app.run` does). absl flags are marked parsed in the workers (grain reads its
flags there).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from retinamask_jax.data import copy_paste
from retinamask_jax.data import transforms as T
from retinamask_jax.data.coco import CocoDataset, ImageRecord

Canvas = tuple[int, int]
ORIENTATIONS = ('landscape', 'portrait')
# Training streams are infinite; grain needs a length, so the range of batch indices ends here.
_END = 2**62
# How many other images of the group are tried before giving up on replacing an unreadable one.
_MAX_REPLACEMENT_TRIES = 64


# ----------------------------------------------------------------------------------------- canvases


def _ceil_to(x: float, multiple: int) -> int:
  return int(math.ceil(x / float(multiple))) * int(multiple)


def test_canvas(min_size: int, max_size: int, orientation: str, multiple: int = 128) -> Canvas:
  """(H, W) for one scale: landscape (ceil(min_size), ceil(max_size)) to `multiple` (`data.canvas_multiple`),
  portrait transposed: the largest canvas of that orientation.

  Any image resized by `transforms.resized_hw(h, w, min_size, max_size)` fits the canvas of its
  orientation (the long side can exceed max_size by half a pixel per unit of aspect ratio through
  rounding; the 128 padding covers aspect ratios up to ~100 at COCO sizes, and the pipeline shrinks
  anything that still does not fit). `torchvision_resized_hw` floors, so its sizes always fit.
  """
  if orientation not in ORIENTATIONS:
    raise ValueError(f'orientation must be one of {ORIENTATIONS}, got {orientation!r}')
  land = (_ceil_to(min(min_size, max_size), multiple), _ceil_to(max_size, multiple))
  return land if orientation == 'landscape' else (land[1], land[0])


def train_canvases(
  min_sizes: Sequence[int], max_size: int, multiple: int = 128
) -> dict[tuple[int, str], Canvas]:
  """{(scale_index, orientation): (H, W)} for every training scale and both orientations."""
  return {
    (i, o): test_canvas(int(s), int(max_size), o, multiple)
    for i, s in enumerate(min_sizes)
    for o in ORIENTATIONS
  }


def bucket_canvas(resized_hw: tuple[int, int], largest: Canvas, multiple: int) -> Canvas:
  """The canvas of one resized (nh, nw) image when canvases are bucketed to the image (`Detector.predict`, and
  evaluation with `eval.bucket_canvases`): each side rounded up to `multiple`, at most the `largest` canvas of
  its orientation (`test_canvas`). With multiple 32 this is torchvision's padding of a one-image batch.

  At most (largest_h / multiple) x (largest_w / multiple) canvases per orientation (each a compiled program):
  e.g. 7 x 11 at 800 / 1333 with 128, 25 x 42 with 32, of which ordinary photos use a few (a 4:3 or 3:4 photo
  at 800 / 1333 lands on 800 x 1088 or 1088 x 800 with 32).
  """
  return (min(_ceil_to(resized_hw[0], multiple), largest[0]), min(_ceil_to(resized_hw[1], multiple), largest[1]))


# ----------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class _Settings:
  """The config values the batch functions need (a small picklable copy of `config.data`)."""

  min_sizes: tuple[int, ...]
  max_size: int
  hflip_prob: float
  channel_order: str
  pixel_range: float
  pixel_mean: tuple[float, ...]
  pixel_std: tuple[float, ...]
  max_instances: int
  mask_size: int
  seed: int
  resize: str = 'pil'  # data.resize: transforms.RESIZE_MODES
  canvas_multiple: int = 128  # data.canvas_multiple
  copy_paste_prob: float = 0.0  # data.copy_paste.prob
  copy_paste_min_visible: float = 0.5  # data.copy_paste.min_visible

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> _Settings:
    d = config.data
    return cls(
      min_sizes=tuple(int(s) for s in d.min_sizes),
      max_size=int(d.max_size),
      hflip_prob=float(d.hflip_prob),
      channel_order=str(d.channel_order),
      pixel_range=float(d.pixel_range),
      pixel_mean=tuple(float(v) for v in d.pixel_mean),
      pixel_std=tuple(float(v) for v in d.pixel_std),
      max_instances=int(d.max_instances),
      mask_size=int(d.mask_size),
      seed=int(config.seed if d.get('seed') is None else d.seed),
      resize=str(d.get('resize', 'pil')),
      canvas_multiple=int(d.get('canvas_multiple', 128)),
      copy_paste_prob=float(d.get('copy_paste', {}).get('prob', 0.0)),
      copy_paste_min_visible=float(d.get('copy_paste', {}).get('min_visible', 0.5)),
    )

  def resized_hw(self, height: int, width: int, min_size: int) -> tuple[int, int]:
    """(nh, nw) of a (height, width) image at scale `min_size` by the rule of `resize`."""
    if self.resize == 'torchvision':
      return T.torchvision_resized_hw(height, width, min_size, self.max_size)
    if self.resize != 'pil':
      raise ValueError(f'data.resize must be one of {T.RESIZE_MODES}, got {self.resize!r}')
    return T.resized_hw(height, width, min_size, self.max_size)

  def largest_canvas(self, orientation: str) -> Canvas:
    """The test canvas of an orientation (evaluation and inference: `min_sizes[0]` / `max_size`)."""
    return test_canvas(self.min_sizes[0], self.max_size, orientation, self.canvas_multiple)

  def canvas_for(self, height: int, width: int) -> Canvas:
    """The bucketed test canvas (`bucket_canvas`) of an original (height, width) image."""
    orientation = 'landscape' if width >= height else 'portrait'
    resized = self.resized_hw(height, width, self.min_sizes[0])
    return bucket_canvas(resized, self.largest_canvas(orientation), self.canvas_multiple)


# ---------------------------------------------------------------------------------------- one image


def load_record_image(record: ImageRecord) -> np.ndarray:
  """uint8 [height, width, 3] of the record; raises DataError when unreadable."""
  source: str | bytes = record.file_name
  if record.image_bytes is not None:
    source = record.image_bytes
  elif record.image_ref is not None:
    try:
      source = record.image_ref.read()
    except Exception as e:  # noqa: BLE001  (whatever the storage raises, this image is unusable)
      raise T.DataError(f'{record.file_name}: cannot read the image ({e})') from e
  # Upright (EXIF orientation applied, as detectron2 reads images) unless the JSON's size is the stored grid's.
  image = T.load_image(source, name=record.file_name, grid_hw=(record.height, record.width))
  if image.shape[:2] != (record.height, record.width):
    # Annotations are in the JSON's pixel grid: bring the file to it rather than guess which one is
    # wrong.
    T.report_once(
      'image_size_mismatch',
      record.file_name,
      '%s: file is %dx%d but the annotation file says %dx%d; resized to the latter',
      record.file_name,
      image.shape[0],
      image.shape[1],
      record.height,
      record.width,
    )
    image = T.resize_image(image, (record.height, record.width))
  return image


def fit_size(
  name: str, height: int, width: int, min_size: int, max_size: int, canvas: Canvas, resize: str = 'pil'
) -> tuple[int, int]:
  """(nh, nw) of an image resized by `transforms.resized_hw` (or `torchvision_resized_hw` when resize is
  'torchvision'), clamped to `canvas` (reported once per file)."""
  if resize == 'torchvision':
    nh, nw = T.torchvision_resized_hw(height, width, min_size, max_size)
  else:
    nh, nw = T.resized_hw(height, width, min_size, max_size)
  if nh > canvas[0] or nw > canvas[1]:
    T.report_once(
      'resize_clamped',
      (name, canvas),
      '%s: resized %dx%d does not fit the %dx%d canvas (extreme aspect ratio); clamped',
      name,
      nh,
      nw,
      canvas[0],
      canvas[1],
    )
    nh, nw = min(nh, canvas[0]), min(nw, canvas[1])
  return nh, nw


def place_image(
  image: np.ndarray,
  out: np.ndarray,
  min_size: int,
  s: _Settings,
  *,
  flip: bool = False,
  name: str = '',
) -> tuple[int, int]:
  """Resizes uint8 RGB `image [h, w, 3]` by the resize rule, optionally flips it, and normalizes it into the
  top-left of `out` (float32 `[H, W, 3]`, the canvas; the rest is left as it is). Returns the resized (nh, nw).

  `s.resize` 'pil': PIL bilinear on uint8, then normalized. 'torchvision': normalized first, then float bilinear
  without antialiasing (`transforms.resize_float_bilinear`), as torchvision's `GeneralizedRCNNTransform`.
  """
  nh, nw = fit_size(name, image.shape[0], image.shape[1], min_size, s.max_size, out.shape[:2], s.resize)
  if s.resize == 'torchvision' and (nh, nw) != image.shape[:2]:
    normalized = T.normalize(
      image[:, ::-1] if flip else image,
      channel_order=s.channel_order,
      pixel_range=s.pixel_range,
      mean=s.pixel_mean,
      std=s.pixel_std,
    )
    T.resize_float_bilinear(normalized, (nh, nw), out=out[:nh, :nw])
    return nh, nw
  resized = T.resize_image(image, (nh, nw))
  # Flip as a strided view, normalized straight into the canvas: no intermediate copies.
  T.normalize(
    resized[:, ::-1] if flip else resized,
    channel_order=s.channel_order,
    pixel_range=s.pixel_range,
    mean=s.pixel_mean,
    std=s.pixel_std,
    out=out[:nh, :nw],
  )
  return nh, nw


def _targets(record: ImageRecord, resized: tuple[int, int], flip: bool, s: _Settings):
  """(boxes [G, 4] float32, classes [G] int32, masks [G, M, M] uint8), resized (flipped) pixels."""
  boxes = np.concatenate([record.boxes, record.crowd_boxes]).astype(np.float32).reshape(-1, 4)
  classes = np.concatenate([record.classes, np.full(len(record.crowd_boxes), -1, np.int32)]).astype(
    np.int32
  )
  segs = list(record.segmentations) + list(record.crowd_segmentations)
  if len(boxes) > s.max_instances:
    T.report_once(
      'gt_truncated',
      record.file_name,
      '%s: %d instances > data.max_instances = %d; kept the largest',
      record.file_name,
      len(boxes),
      s.max_instances,
    )
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  keep = T.select_instances(areas, s.max_instances, priority=classes > 0)
  boxes, classes = boxes[keep], classes[keep]
  crops = T.masks_to_crops(
    [segs[i] for i in keep], boxes, record.height, record.width, s.mask_size, name=record.file_name
  )
  boxes = T.scale_boxes(boxes, (record.height, record.width), resized)
  if flip:
    boxes = T.hflip_boxes(boxes, resized[1])
    crops = T.hflip_crops(crops)
  g = s.max_instances
  return T.pad_rows(boxes, g), T.pad_rows(classes, g), T.pad_rows(crops, g)


def _empty_batch(n: int, canvas: Canvas, s: _Settings, with_targets: bool) -> dict[str, np.ndarray]:
  h, w = canvas
  out = {
    'image': np.zeros((n, h, w, 3), np.float32),
    'image_size': np.zeros((n, 2), np.int32),
    'orig_size': np.zeros((n, 2), np.int32),
    'image_id': np.full((n,), -1, np.int64),
    'scale': np.ones((n,), np.float32),
    'valid': np.zeros((n,), bool),
  }
  if with_targets:
    g, m = s.max_instances, s.mask_size
    out.update(
      gt_boxes=np.zeros((n, g, 4), np.float32),
      gt_classes=np.zeros((n, g), np.int32),
      gt_masks=np.zeros((n, g, m, m), np.uint8),
    )
  return out


def _fill_row(
  out: dict[str, np.ndarray],
  j: int,
  record: ImageRecord,
  image: np.ndarray,
  canvas: Canvas,
  min_size: int,
  flip: bool,
  s: _Settings,
  with_targets: bool,
) -> None:
  """Resizes, flips, normalizes one decoded image (and its targets) into row j of a batch."""
  del canvas  # the row's shape is the canvas
  nh, nw = place_image(image, out['image'][j], min_size, s, flip=flip, name=record.file_name)
  out['image_size'][j] = (nh, nw)
  out['orig_size'][j] = (record.height, record.width)
  out['image_id'][j] = record.image_id
  out['scale'][j] = min(nh, nw) / min(record.height, record.width)
  out['valid'][j] = True
  if with_targets:
    out['gt_boxes'][j], out['gt_classes'][j], out['gt_masks'][j] = _targets(
      record, (nh, nw), flip, s
    )


# ----------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class _PlannedBatch:
  records: np.ndarray  # [B] int64 record indices (dataset order)
  positions: np.ndarray  # [B] int64 positions of those records in the group's epoch order
  group: np.ndarray  # the group's epoch order (record indices)
  orientation: str
  scale_index: int


class TrainPlan:
  """The deterministic order of global training batches (see the module docstring).

  `batch(i)` is a pure function of (landscape flags, global batch size, number of scales, seed, i).
  """

  def __init__(self, landscape: np.ndarray, global_batch_size: int, num_scales: int, seed: int):
    self.landscape = np.asarray(landscape, bool)
    self.batch_size = int(global_batch_size)
    self.num_scales = int(num_scales)
    self.seed = int(seed)
    if self.batch_size < 1:
      raise ValueError(f'global batch size must be >= 1, got {global_batch_size}')
    if len(self.landscape) == 0:
      raise ValueError('the training dataset has no images')
    counts = [int(self.landscape.sum()), int((~self.landscape).sum())]
    self.wrap = all(c < self.batch_size for c in counts)
    if self.wrap:
      self.batches_per_epoch = sum(-(-c // self.batch_size) for c in counts)
    else:
      self.batches_per_epoch = sum(c // self.batch_size for c in counts)

  @functools.lru_cache(maxsize=4)  # noqa: B019  (a handful of epochs per plan; plans live as long as the run)
  def _epoch(self, epoch: int) -> list[_PlannedBatch]:
    rng = np.random.default_rng([self.seed, 0x7EA1, epoch])
    perm = rng.permutation(len(self.landscape))
    batches = []
    for orientation, flag in (('landscape', True), ('portrait', False)):
      group = perm[self.landscape[perm] == flag]
      n = len(group)
      num = -(-n // self.batch_size) if self.wrap else n // self.batch_size
      for b in range(num):
        pos = (b * self.batch_size + np.arange(self.batch_size)) % max(n, 1)
        batches.append((group[pos], pos, group, orientation))
    order = rng.permutation(len(batches))
    scales = rng.integers(0, self.num_scales, size=len(batches))
    return [
      _PlannedBatch(batches[k][0], batches[k][1], batches[k][2], batches[k][3], int(scales[i]))
      for i, k in enumerate(order)
    ]

  def batch(self, index: int) -> _PlannedBatch:
    epoch, k = divmod(int(index), self.batches_per_epoch)
    return self._epoch(epoch)[k]

  def flip(self, index: int, row: int, prob: float) -> bool:
    """The flip decision of row `row` (of the global batch) of global batch `index`."""
    return bool(np.random.default_rng([self.seed, 0xF11B, int(index), int(row)]).random() < prob)

  def paste_rng(self, index: int, row: int) -> np.random.Generator:
    """The copy-paste draws (whether, which source, where) of row `row` of global batch `index`."""
    return np.random.default_rng([self.seed, 0xC0B7, int(index), int(row)])


class _TrainBatch:
  """grain map function: global batch index -> this process's batch dict (picklable)."""

  def __init__(
    self,
    records: Sequence[ImageRecord],
    plan: TrainPlan,
    settings: _Settings,
    process_index: int,
    process_count: int,
  ):
    self.records = records
    self.plan = plan
    self.settings = settings
    per_process = plan.batch_size // process_count
    self.rows = range(process_index * per_process, (process_index + 1) * per_process)
    self.canvases = train_canvases(settings.min_sizes, settings.max_size, settings.canvas_multiple)
    self.bad: set[int] = set()

  def _readable(self, planned: _PlannedBatch, row: int) -> tuple[ImageRecord, np.ndarray]:
    n = len(planned.group)
    start = int(planned.positions[row])
    for k in range(min(n, _MAX_REPLACEMENT_TRIES)):
      r = int(planned.group[(start + k) % n])
      if r in self.bad:
        continue
      record = self.records[r]
      try:
        return record, load_record_image(record)
      except T.DataError as e:
        self.bad.add(r)
        T.report_once(
          'unreadable_image',
          record.file_name,
          '%s; replaced by another %s image',
          e,
          planned.orientation,
        )
    raise T.DataError(
      f'no readable image among {min(n, _MAX_REPLACEMENT_TRIES)} {planned.orientation} images '
      'tried '
      f'(starting at {self.records[int(planned.records[row])].file_name}); check data.train_images'
    )

  def _copy_paste(
    self, planned: _PlannedBatch, index: int, row: int, record: ImageRecord, image: np.ndarray
  ) -> tuple[ImageRecord, np.ndarray]:
    """With probability `copy_paste_prob`, pastes the instances of a random other image of the row's orientation
    group onto it (`copy_paste.paste`); an unreadable source means no paste this time."""
    rng = self.plan.paste_rng(index, row)
    if rng.random() >= self.settings.copy_paste_prob:
      return record, image
    r = int(planned.group[rng.integers(len(planned.group))])
    source = self.records[r]
    if r in self.bad or source is record:
      return record, image
    try:
      source_image = load_record_image(source)
    except T.DataError as e:
      self.bad.add(r)
      T.report_once('unreadable_image', source.file_name, '%s; not pasted', e)
      return record, image
    return copy_paste.paste(record, image, source, source_image, rng, min_visible=self.settings.copy_paste_min_visible)

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    s = self.settings
    planned = self.plan.batch(index)
    canvas = self.canvases[(planned.scale_index, planned.orientation)]
    min_size = s.min_sizes[planned.scale_index]
    out = _empty_batch(len(self.rows), canvas, s, with_targets=True)
    for j, row in enumerate(self.rows):
      record, image = self._readable(planned, row)
      if s.copy_paste_prob > 0:
        record, image = self._copy_paste(planned, index, row, record, image)
      flip = self.plan.flip(index, row, s.hflip_prob)
      _fill_row(out, j, record, image, canvas, min_size, flip, s, with_targets=True)
    out['index'] = np.asarray(index, np.int64)
    return _with_reports(out)


def _mark_flags_parsed(*_: Any) -> None:
  """grain reads absl flags in its worker processes; a library caller may never have parsed them."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _init_worker(*_: Any) -> None:
  _mark_flags_parsed()
  T.defer_reports()


# Batch key under which a worker process sends the data problems it found to the main process; never seen by
# the iterator's callers.
_REPORTS_KEY = '_data_reports'


def _with_reports(out: dict[str, Any]) -> dict[str, Any]:
  reports = T.take_deferred_reports()
  if reports:
    out[_REPORTS_KEY] = reports
  return out


class _ReportingIterator:
  """Yields a worker-backed iterator's batches after logging (once) the data problems they carry."""

  def __init__(self, it: Any):
    self._it = iter(it)

  def __iter__(self) -> _ReportingIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    T.absorb_reports(batch.pop(_REPORTS_KEY, ()))
    return batch

  def close(self) -> None:
    close = getattr(self._it, 'close', None)
    if close is not None:
      close()


def data_problem_counts() -> dict[str, int]:
  """Problems reported by the pipeline in this process so far, by kind (those of worker processes included, as
  their batches arrive); each problem (kind, file) is counted once."""
  return T.report_counts()


def _iterate(ds: grain.MapDataset, num_workers: int) -> Iterator[dict[str, np.ndarray]]:
  if num_workers < 0:
    raise ValueError(f'num_workers must be >= 0, got {num_workers}')
  if num_workers == 0:
    # In the calling thread: simplest to debug; the stream is the same as with workers.
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
  _mark_flags_parsed()
  # One thread per worker with one batch of read-ahead: whole batches are large, and the GIL limits
  # threads.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)).mp_prefetch(
    grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2),
    worker_init_fn=_init_worker,
  )
  return _ReportingIterator(it)


def make_train_iterator(
  dataset: CocoDataset,
  config: ml_collections.ConfigDict,
  *,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  start_index: int = 0,
  num_workers: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of this process's training batches, starting at global batch `start_index`.

  Yields the batch dicts described in the module docstring, with `global_batch_size //
  process_count` rows. num_workers: grain worker processes (default `config.data.num_workers`; 0 =
  in the calling thread). Close it (`it.close()`) to stop workers early; they also stop when the
  iterator is garbage-collected.
  """
  if global_batch_size % process_count:
    raise ValueError(
      f'global batch size {global_batch_size} is not divisible by {process_count} processes'
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if start_index < 0:
    raise ValueError(f'start_index must be >= 0, got {start_index}')
  settings = _Settings.from_config(config)
  landscape = np.array([r.landscape for r in dataset.records], bool)
  plan = TrainPlan(landscape, global_batch_size, len(settings.min_sizes), settings.seed)
  fn = _TrainBatch(dataset.records, plan, settings, process_index, process_count)
  ds = grain.MapDataset.range(int(start_index), _END).map(fn)
  workers = config.data.num_workers if num_workers is None else num_workers
  return _iterate(ds, int(workers))


# --------------------------------------------------------------------------------------- evaluation


def _eval_batches(
  dataset: CocoDataset,
  batch_size: int,
  process_count: int,
  max_images: int,
  settings: _Settings,
  bucket: bool = False,
) -> list[tuple[Canvas, np.ndarray]]:
  """[(canvas, record indices [batch_size * process_count], -1 = padding)], all batches.

  One canvas per orientation (`settings.largest_canvas`), or with `bucket` each image's own bucketed canvas
  (`_Settings.canvas_for`, from the annotation file's size: no image is decoded), groups in canvas order.
  """
  n = len(dataset.records) if not max_images else min(max_images, len(dataset.records))
  groups: dict[tuple[int, Canvas], list[int]] = {}
  for i, r in enumerate(dataset.records[:n]):
    orientation = 'landscape' if r.landscape else 'portrait'
    canvas = settings.canvas_for(r.height, r.width) if bucket else settings.largest_canvas(orientation)
    # Landscape groups first, as without bucketing.
    groups.setdefault((0 if r.landscape else 1, canvas), []).append(i)
  global_size = batch_size * process_count
  out = []
  for (_, canvas), members in sorted(groups.items()):
    group = np.asarray(members, np.int64)
    for start in range(0, len(group), global_size):
      chunk = np.full(global_size, -1, np.int64)
      part = group[start : start + global_size]
      chunk[: len(part)] = part
      out.append((canvas, chunk))
  return out


class _EvalBatch:
  """grain map function: evaluation batch number -> this process's batch dict."""

  def __init__(
    self,
    records: Sequence[ImageRecord],
    batches: list[tuple[Canvas, np.ndarray]],
    settings: _Settings,
    process_index: int,
    batch_size: int,
    with_targets: bool,
  ):
    self.records = records
    self.batches = batches
    self.settings = settings
    self.rows = range(process_index * batch_size, (process_index + 1) * batch_size)
    self.with_targets = with_targets

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    s = self.settings
    canvas, chunk = self.batches[index]
    out = _empty_batch(len(self.rows), canvas, s, self.with_targets)
    # Padding rows: a harmless size for any post-processing that looks at it; they are marked
    # invalid.
    out['image_size'][:] = canvas
    out['orig_size'][:] = canvas
    for j, row in enumerate(self.rows):
      r = int(chunk[row])
      if r < 0:
        continue
      record = self.records[r]
      try:
        image = load_record_image(record)
      except T.DataError as e:
        T.report_once('unreadable_image', record.file_name, '%s; not evaluated', e)
        continue
      _fill_row(out, j, record, image, canvas, s.min_sizes[0], False, s, self.with_targets)
    out['index'] = np.asarray(index, np.int64)
    return _with_reports(out)


def eval_settings(config: ml_collections.ConfigDict) -> _Settings:
  """The settings of evaluation and inference: the test size, no flip."""
  s = _Settings.from_config(config)
  return dataclasses.replace(
    s,
    min_sizes=(int(config.data.test_min_size),),
    max_size=int(config.data.test_max_size),
    hflip_prob=0.0,
  )


def _bucket_eval_canvases(config: ml_collections.ConfigDict) -> bool:
  return bool(config.get('eval', {}).get('bucket_canvases', False))


def num_eval_batches(
  dataset: CocoDataset,
  config: ml_collections.ConfigDict,
  *,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  max_images: int = 0,
  num_workers: int | None = None,
  with_targets: bool = False,
) -> int:
  """How many batches `make_eval_iterator` yields with these arguments (same on every process)."""
  del process_index, num_workers, with_targets
  return len(_eval_batches(dataset, batch_size, process_count, max_images, eval_settings(config),
                           _bucket_eval_canvases(config)))


def make_eval_iterator(
  dataset: CocoDataset,
  config: ml_collections.ConfigDict,
  *,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  max_images: int = 0,
  num_workers: int | None = None,
  with_targets: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """Evaluation batches: single scale (data.test_min_size / test_max_size), no flip.

  Landscape images first, then portrait, each group in its own canvas (`test_canvas`, to
  `data.canvas_multiple`), in dataset order; with `eval.bucket_canvases` each orientation is further split by
  the images' own bucketed canvases (`bucket_canvas`, as `Detector.predict` places images). Every image (of
  the first `max_images`, 0 = all) appears exactly once over all processes: each global batch holds
  batch_size * process_count images, process p reads rows [p * batch_size, (p + 1) * batch_size), and the last
  batch of each group is padded with rows that have valid False and image_id -1. All processes get the same
  number of batches with the same canvases.
  `with_targets` adds the gt_* keys.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  settings = eval_settings(config)
  batches = _eval_batches(
    dataset, batch_size, process_count, max_images, settings, _bucket_eval_canvases(config)
  )
  fn = _EvalBatch(dataset.records, batches, settings, process_index, batch_size, with_targets)
  if not batches:
    return iter(())
  ds = grain.MapDataset.range(len(batches)).map(fn)
  workers = config.data.num_workers if num_workers is None else num_workers
  return _iterate(ds, int(workers))
