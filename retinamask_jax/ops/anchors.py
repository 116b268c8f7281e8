"""RetinaNet anchors (authors_code_spec.md 3.1), computed once per canvas on the host with numpy.

The results are constants inside jit, so they are memoized on the (hashable) arguments and
returned read-only. Order everywhere: levels P3..P7 concatenated, within a level (y, x, anchor),
anchor = ratio_idx * scales + scale_idx, matching the head's output layout (DESIGN.md 4).

Presets:
- 'authors': Detectron/py-faster-rcnn `generate_anchors` as in the authors' code: the ratio widths
  are rounded (numpy round-half-to-even) at the base-stride resolution, then scaled by
  size / stride * 2**(k / scales). Their inclusive box [x1, y1, x2, y2] becomes
  [x1, y1, x2 + 1, y2 + 1] in our continuous coordinates, so a cell anchor is centred at
  (s/2, s/2) with the authors' width w.
- 'torchvision': torchvision's RetinaNet `AnchorGenerator` (sizes int(x * 2**(k / scales)), base
  anchors round([-w, -h, w, h] / 2) in float32, centred at the grid points (x * s_x, y * s_y)), with its
  strides canvas // grid per axis (`level_strides`): 2**l on canvases that are multiples of 2**l, less on others
  (torchvision pads to multiples of 32 only).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

PRESETS = ('authors', 'torchvision')


def level_shapes(
    canvas_hw: Sequence[int], min_level: int = 3, max_level: int = 7
) -> tuple[tuple[int, int], ...]:
  """Feature-map (h, w) per level min_level..max_level: ceil(H / 2**l), ceil(W / 2**l).

  Repeated stride-2 convolutions with padding give ceil at every step, and nested ceil divisions
  equal one ceil division, so this is exact for any canvas (plain division for multiples of 128).
  """
  h, w = (int(v) for v in canvas_hw)
  return tuple((-(-h // 2**level), -(-w // 2**level)) for level in range(min_level, max_level + 1))


def _authors_cell_anchors(
    stride: int, base_size: float, aspect_ratios: tuple[float, ...], scales_per_octave: int
) -> np.ndarray:
  # Detectron's _ratio_enum then _scale_enum, in their inclusive (+1) convention, float64.
  ctr = 0.5 * (stride - 1)  # centre of the reference window [0, 0, s - 1, s - 1]
  size = float(stride * stride)
  scales = [base_size * 2.0 ** (k / scales_per_octave) / stride for k in range(scales_per_octave)]
  rows = []
  for ratio in aspect_ratios:
    ws = np.round(np.sqrt(size / ratio))
    hs = np.round(ws * ratio)
    for scale in scales:
      w, h = ws * scale, hs * scale
      x1, y1 = ctr - 0.5 * (w - 1), ctr - 0.5 * (h - 1)
      x2, y2 = ctr + 0.5 * (w - 1), ctr + 0.5 * (h - 1)
      rows.append([x1, y1, x2 + 1.0, y2 + 1.0])  # inclusive x2 -> continuous x2 + 1
  return np.asarray(rows, np.float64)


def _torchvision_cell_anchors(
    base_size: float, aspect_ratios: tuple[float, ...], scales_per_octave: int
) -> np.ndarray:
  # torchvision's AnchorGenerator.generate_anchors, in float32 like torchvision so rounding agrees.
  sizes = [base_size]
  sizes += [int(base_size * 2 ** (k / scales_per_octave)) for k in range(1, scales_per_octave)]
  scales = np.asarray(sizes, np.float32)
  ratios = np.asarray(aspect_ratios, np.float32)
  h_ratios = np.sqrt(ratios)
  w_ratios = np.float32(1.0) / h_ratios
  ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
  base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2.0)
  return np.round(base).astype(np.float64)


def cell_anchors(
    stride: int,
    base_size: float,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    scales_per_octave: int = 3,
    preset: str = 'authors',
) -> np.ndarray:
  """The anchors of the grid cell at the origin of one level.

  Args:
    stride: the level's stride 2**l.
    base_size: the level's base anchor size (32 for P3, ...).
    aspect_ratios: h / w ratios (outer order).
    scales_per_octave: scales 2**(k / scales_per_octave), k = 0.. (inner order).
    preset: 'authors' (centred at s/2) or 'torchvision' (centred at 0).
  Returns:
    [len(aspect_ratios) * scales_per_octave, 4] float32 xyxy,
    anchor = ratio_idx * scales_per_octave + scale_idx.
  """
  return _cell_anchors64(stride, base_size, aspect_ratios, scales_per_octave, preset).astype(
      np.float32
  )


def _cell_anchors64(stride, base_size, aspect_ratios, scales_per_octave, preset) -> np.ndarray:
  aspect_ratios = tuple(float(r) for r in aspect_ratios)
  if preset == 'authors':
    return _authors_cell_anchors(
        int(stride), float(base_size), aspect_ratios, int(scales_per_octave)
    )
  if preset == 'torchvision':
    return _torchvision_cell_anchors(base_size, aspect_ratios, int(scales_per_octave))
  raise ValueError(f'unknown anchor preset {preset!r}; expected one of {PRESETS}')


def _normalize(canvas_hw, min_level, max_level, sizes, aspect_ratios, scales_per_octave, preset):
  sizes = tuple(sizes)
  if len(sizes) != max_level - min_level + 1:
    raise ValueError(
        f'{len(sizes)} anchor sizes {sizes} for levels {min_level}..{max_level}: need one per level'
    )
  if preset not in PRESETS:
    raise ValueError(f'unknown anchor preset {preset!r}; expected one of {PRESETS}')
  return (
      (int(canvas_hw[0]), int(canvas_hw[1])),
      int(min_level),
      int(max_level),
      sizes,
      tuple(float(r) for r in aspect_ratios),
      int(scales_per_octave),
      str(preset),
  )


def level_strides(canvas_hw: Sequence[int], level: int, preset: str = 'authors') -> tuple[int, int]:
  """(stride_y, stride_x) between anchor centres on one level.

  'authors': 2**level. 'torchvision': its `AnchorGenerator`'s canvas // grid per axis (H // ceil(H / 2**l)),
  which is 2**l on canvases that are multiples of 2**l but not otherwise: on a 800 x 1088 canvas (torchvision pads
  to multiples of 32) P6 is 13 x 17 with strides 61 x 64, P7 7 x 9 with strides 114 x 120.
  """
  if preset != 'torchvision':
    return 2**level, 2**level
  h, w = (int(v) for v in canvas_hw)
  fh, fw = -(-h // 2**level), -(-w // 2**level)
  return h // fh, w // fw


@functools.lru_cache(maxsize=64)
def _generate(canvas_hw, min_level, max_level, sizes, aspect_ratios, scales_per_octave, preset):
  per_level = []
  for level, (fh, fw), size in zip(
      range(min_level, max_level + 1), level_shapes(canvas_hw, min_level, max_level), sizes
  ):
    stride = 2**level
    cells = _cell_anchors64(stride, size, aspect_ratios, scales_per_octave, preset)
    stride_y, stride_x = level_strides(canvas_hw, level, preset)
    # Shifts in (y, x) raster order, xyxy shift (x s, y s, x s, y s); float64, one final rounding.
    sy, sx = np.meshgrid(np.arange(fh) * stride_y, np.arange(fw) * stride_x, indexing='ij')
    shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4).astype(np.float64)
    per_level.append((shifts + cells[None]).reshape(-1, 4))
  anchors = np.concatenate(per_level, axis=0).astype(np.float32)
  anchors.setflags(write=False)  # memoized: callers must not mutate the shared copy
  return anchors


def generate_anchors(
    canvas_hw: Sequence[int],
    *,
    min_level: int = 3,
    max_level: int = 7,
    sizes: Sequence[float] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    scales_per_octave: int = 3,
    preset: str = 'authors',
) -> np.ndarray:
  """All anchors of a padded canvas (covering the padding too, as the authors' straddle -1 does).

  Args:
    canvas_hw: (H, W) of the padded canvas.
    min_level, max_level: FPN levels (stride 2**l).
    sizes: base anchor size per level, min_level..max_level.
    aspect_ratios: h / w.
    scales_per_octave: scales per level.
    preset: 'authors' or 'torchvision' (see the module docstring).
  Returns:
    [A_total, 4] float32, read-only (memoized), levels concatenated, each in (y, x, anchor) order.
  """
  return _generate(
      *_normalize(canvas_hw, min_level, max_level, sizes, aspect_ratios, scales_per_octave, preset)
  )


def anchors_per_level(
    canvas_hw: Sequence[int],
    *,
    min_level: int = 3,
    max_level: int = 7,
    sizes: Sequence[float] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    scales_per_octave: int = 3,
    preset: str = 'authors',
) -> tuple[int, ...]:
  """Anchor count per level (same arguments as `generate_anchors`), to split its concatenation."""
  canvas_hw, min_level, max_level, _, aspect_ratios, scales_per_octave, _ = _normalize(
      canvas_hw, min_level, max_level, sizes, aspect_ratios, scales_per_octave, preset
  )
  per_cell = len(aspect_ratios) * scales_per_octave
  return tuple(h * w * per_cell for h, w in level_shapes(canvas_hw, min_level, max_level))


def num_anchors_per_location(
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), scales_per_octave: int = 3
) -> int:
  """Anchors per feature-map location (9 by default): the head's output multiplicity."""
  return len(tuple(aspect_ratios)) * int(scales_per_octave)
